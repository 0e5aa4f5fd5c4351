// CUDA implementations of the operators between teacher and student (schemas
// in csrc/registration.cpp): sparse_labels, and the student-side
// predictor_loss, which forms its gradients in forward (its backward op is
// device-generic, csrc/predictor_loss_backward.cpp). Dense GEMMs go to cuBLAS
// through ATen.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "op_support.h"

namespace srm_ext::cuda_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_labels(const at::Tensor& values,
                                                 const at::Tensor& indices,
                                                 int64_t num_codewords) {
  TORCH_CHECK(values.is_cuda(), "srm_ext: values must be a CUDA tensor");
  check_sparse_code(values, indices, values);
  TORCH_CHECK(num_codewords >= 1 && num_codewords <= srm_cuda::kMaxCodewords,
              "srm_ext CUDA: num_codewords = ", num_codewords,
              " must be in [1, ", srm_cuda::kMaxCodewords, "]");

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = values.size(0), h = values.size(1), w = values.size(2),
                k = values.size(3);
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  auto pixel_labels = at::empty({n, h, w}, idx.options());
  auto image_labels = at::empty({n, num_codewords}, vals.options());
  auto error_flag = at::zeros({1}, idx.options().dtype(at::kInt));
  check_launch(srm_cuda::launch_sparse_labels(
                   vals.data_ptr(), kernel_dtype(vals.scalar_type(), "values"),
                   idx.data_ptr<int64_t>(), n, h * w, k, num_codewords,
                   pixel_labels.data_ptr<int64_t>(), image_labels.data_ptr(),
                   error_flag.data_ptr<int>(), stream),
               "sparse_labels");
  check_error_flag(error_flag,
                   "srm_ext: sparse_labels: indices must lie in [0, "
                   "num_codewords = ",
                   num_codewords, ")");
  return {pixel_labels, image_labels};
}

// (P, D_s) rows of y, one per pixel (a view when y is channels_last).
at::Tensor pixel_rows(const at::Tensor& y) {
  return y.permute({0, 2, 3, 1}).reshape({-1, y.size(1)});
}

// The power of two by which the predictor kernel scales dloss/dz in float16,
// divided out again in the GEMMs that map it to the inputs. dloss/dz has
// terms of order 1/P (one-hot) and 1/(P*K) (softmax, BCE); at training batch
// sizes they fall below float16's smallest normal (6.1e-5) and round to zero.
// Scaled by about P*K/64 they sit near 1 with ample headroom. float32 and
// bfloat16 have float32's range and keep dloss/dz itself, as the CPU kernels
// do.
double grad_logits_scale(at::ScalarType dtype, int64_t pixels,
                         int64_t num_codewords) {
  if (dtype != at::kHalf) {
    return 1.0;
  }
  const int exponent = std::ilogb(static_cast<double>(pixels) *
                                  static_cast<double>(num_codewords)) - 6;
  return std::ldexp(1.0, std::max(exponent, 0));
}

// alpha * (a @ b), alpha applied to the GEMM's float32 accumulator. float16
// products are returned in float32: a gradient for a unit upstream gradient
// can lie below float16's subnormals, which a loss scale (GradScaler's) would
// have lifted had it been applied before rounding.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (a.scalar_type() == at::kHalf) {
    return at::mm(a, b, at::kFloat).mul_(alpha);
  }
  // beta = 0: the uninitialised input is ignored, as in at::mm.
  return at::addmm(at::empty({}, a.options()), a, b, /*beta=*/0, alpha);
}

// The gradients of the loss for a unit upstream gradient, from
// g = grad_scale * dloss/dz as a (P, K) matrix.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unit_gradients(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& dictionary,
    double grad_scale, std::array<bool, 3> output_mask) {
  const int64_t n = y.size(0), depth = y.size(1), h = y.size(2),
                w = y.size(3);
  const double unscale = 1.0 / grad_scale;
  const auto grad_dtype =
      y.scalar_type() == at::kHalf ? at::kFloat : y.scalar_type();
  // Unformed gradients are (0,)-shaped, in the dtype formed ones have (the
  // fake kernel promises the same).
  const auto unformed = [&] { return at::empty({0}, y.options().dtype(grad_dtype)); };
  at::Tensor grad_y = unformed();
  at::Tensor grad_dictionary = unformed();
  at::Tensor grad_intercept = unformed();
  if (output_mask[0]) {
    grad_y = scaled_mm(g, dictionary.t(), unscale)
                 .view({n, h, w, depth})
                 .permute({0, 3, 1, 2});
  }
  if (output_mask[1]) {
    grad_dictionary = laid_out_like(scaled_mm(pixel_rows(y).t(), g, unscale),
                                    dictionary);
  }
  if (output_mask[2]) {
    grad_intercept = at::sum(g, at::kFloat).mul_(unscale).to(grad_dtype);
  }
  return {grad_y, grad_dictionary, grad_intercept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> predictor_loss(
    const at::Tensor& y, const at::Tensor& dictionary,
    const at::Tensor& intercept, const at::Tensor& pixel_labels,
    const at::Tensor& image_labels, double local_weight, double global_weight,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(y.is_cuda(), "srm_ext: y must be a CUDA tensor");
  check_dim(y, 4, "y", "(N, D_s, H, W)");
  const Dtype dtype = kernel_dtype(y.scalar_type(), "y");
  check_dictionary(dictionary, y.size(1), y, "y");
  const int64_t n = y.size(0), h = y.size(2), w = y.size(3);
  TORCH_CHECK(n * h * w > 0, "srm_ext: y must have at least one pixel (N*H*W > 0), got shape ",
              y.sizes());
  const int64_t num_codewords = dictionary.size(1);
  check_on_device(pixel_labels, "pixel_labels", y);
  TORCH_CHECK(pixel_labels.scalar_type() == at::kLong,
              "srm_ext: pixel_labels must be int64, got ",
              pixel_labels.scalar_type());
  TORCH_CHECK(pixel_labels.dim() == 3 && pixel_labels.size(0) == n &&
                  pixel_labels.size(1) == h && pixel_labels.size(2) == w,
              "srm_ext: pixel_labels must have shape (N, H, W) = (", n, ", ",
              h, ", ", w, "), got ", pixel_labels.sizes());
  check_on_device(image_labels, "image_labels", y);
  TORCH_CHECK(image_labels.dim() == 2 && image_labels.size(0) == n &&
                  image_labels.size(1) == num_codewords,
              "srm_ext: image_labels must have shape (N, K) = (", n, ", ",
              num_codewords, "), got ", image_labels.sizes());
  TORCH_CHECK(at::isFloatingType(image_labels.scalar_type()),
              "srm_ext: image_labels must be floating point, got ",
              image_labels.scalar_type());

  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor bias = intercept_as_float(intercept, y);
  const int64_t pixels = n * h * w;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor labels = pixel_labels.contiguous();
  const at::Tensor targets = image_labels.to(y.scalar_type()).contiguous();
  const double grad_scale =
      grad_logits_scale(y.scalar_type(), pixels, num_codewords);

  // The logits buffer becomes grad_scale * dloss/dz in place; it lives only
  // until the gradients for the inputs are formed from it.
  at::Tensor logits = at::mm(pixel_rows(y), dictionary).contiguous();
  auto float_workspace = at::empty(
      {srm_cuda::predictor_workspace_size(n, h * w, num_codewords)},
      y.options().dtype(at::kFloat));
  auto sum_workspace = at::empty(
      {srm_cuda::deterministic_sum_workspace_size(
          std::max(pixels, n * num_codewords))},
      y.options().dtype(at::kDouble));
  auto loss = at::empty({}, y.options().dtype(at::kFloat));
  auto error_flag = at::zeros({1}, y.options().dtype(at::kInt));
  check_launch(srm_cuda::launch_predictor_loss(
                   logits.data_ptr(), dtype, bias.data_ptr<float>(),
                   labels.data_ptr<int64_t>(), targets.data_ptr(), n, h * w,
                   num_codewords, static_cast<float>(local_weight),
                   static_cast<float>(global_weight),
                   static_cast<float>(grad_scale),
                   float_workspace.data_ptr<float>(),
                   sum_workspace.data_ptr<double>(), loss.data_ptr<float>(),
                   error_flag.data_ptr<int>(), stream),
               "predictor_loss");
  check_error_flag(error_flag,
                   "srm_ext: predictor_loss: pixel_labels must lie in [0, K = ",
                   num_codewords, ")");
  const auto [grad_y, grad_dictionary, grad_intercept] =
      unit_gradients(logits, y, dictionary, grad_scale, output_mask);
  return {loss.to(y.scalar_type()), grad_y, grad_dictionary, grad_intercept};
}

}  // namespace
}  // namespace srm_ext::cuda_ops

TORCH_LIBRARY_IMPL(srm_ext, CUDA, m) {
  m.impl("sparse_labels", &srm_ext::cuda_ops::sparse_labels);
  m.impl("predictor_loss", &srm_ext::cuda_ops::predictor_loss);
}
