// CUDA implementations of the operators between teacher and student (schemas
// in csrc/registration.cpp): sparse_labels, and the student-side
// predictor_loss, which forms its gradients in forward (its backward op is
// device-generic, csrc/predictor_loss_backward.cpp). Dense GEMMs go to cuBLAS
// through ATen.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "../argument_checks.h"
#include "op_support.h"

namespace srm_ext::cuda_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_labels(const at::Tensor& values,
                                                 const at::Tensor& indices,
                                                 int64_t num_codewords) {
  TORCH_CHECK(values.is_cuda(), "srm_ext: values must be a CUDA tensor");
  TORCH_CHECK(num_codewords >= 1 && num_codewords <= srm_cuda::kMaxCodewords,
              "srm_ext CUDA: num_codewords = ", num_codewords,
              " must be in [1, ", srm_cuda::kMaxCodewords, "]");
  check_sparse_code(values, indices, values, num_codewords);
  check_pixels_per_image(values.size(1), values.size(2), "srm_ext: values");
  // One block of the kernel's grid per image.
  TORCH_CHECK(values.size(0) <= std::numeric_limits<int>::max(),
              "srm_ext CUDA: sparse_labels takes at most ",
              std::numeric_limits<int>::max(), " images, got values of shape ",
              values.sizes());

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
                   "srm_ext: sparse_labels: indices must lie in [0, ",
                   num_codewords, ")");
  return {pixel_labels, image_labels};
}

// (P, D_s) rows of y, one per pixel (a view when y is channels_last). P is
// spelled out: with D_s = 0 a -1 could not be inferred.
at::Tensor pixel_rows(const at::Tensor& y) {
  return y.permute({0, 2, 3, 1})
      .reshape({y.size(0) * y.size(2) * y.size(3), y.size(1)});
}

// The gradients of the loss for a unit upstream gradient, from dloss/dz as a
// float32 (P, K) matrix g and y's pixel rows (a copy unless y is
// channels_last, so formed once per call). The products run in float32, as
// the reference's do; gradients come back in y's dtype, float16's in float32:
// a gradient for a unit upstream gradient can lie below float16's
// subnormals, which a loss scale (GradScaler's) would have lifted had it been
// applied before rounding.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unit_gradients(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& rows,
    const at::Tensor& dictionary, std::array<bool, 3> output_mask) {
  const int64_t n = y.size(0), depth = y.size(1), h = y.size(2),
                w = y.size(3);
  const auto grad_dtype =
      y.scalar_type() == at::kHalf ? at::kFloat : y.scalar_type();
  // Unformed gradients are (0,)-shaped, in the dtype formed ones have (the
  // fake kernel promises the same).
  const auto unformed = [&] { return at::empty({0}, y.options().dtype(grad_dtype)); };
  at::Tensor grad_y = unformed();
  at::Tensor grad_dictionary = unformed();
  at::Tensor grad_intercept = unformed();
  if (output_mask[0]) {
    grad_y = at::mm(g, dictionary.t().to(at::kFloat))
                 .view({n, h, w, depth})
                 .permute({0, 3, 1, 2})
                 .to(grad_dtype);
  }
  if (output_mask[1]) {
    grad_dictionary =
        laid_out_like(at::mm(rows.t().to(at::kFloat), g), dictionary)
            .to(grad_dtype);
  }
  if (output_mask[2]) {
    grad_intercept = g.sum().to(grad_dtype);
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
  kernel_dtype(y.scalar_type(), "y");  // float32, float16 or bfloat16
  check_dictionary(dictionary, y.size(1), y, "y");
  check_intercept(intercept, y, "y");
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
  check_same_dtype(image_labels, "image_labels", y, "y");
  check_loss_weight(local_weight, "srm_ext: local_weight");
  check_loss_weight(global_weight, "srm_ext: global_weight");
  TORCH_CHECK(srm_cuda::predictor_loss_fits(n, h * w, num_codewords),
              "srm_ext CUDA: predictor_loss: y of shape ", y.sizes(),
              " (K = ", num_codewords, ") is too large for the kernels' grids "
              "(at most 2^31 - 1 blocks); split the batch");

  const c10::cuda::CUDAGuard guard(y.device());
  // The GEMMs below accumulate and return float32 whatever the caller's
  // autocast state: under autocast the dispatcher would run them in 16 bits
  // (a 16-bit logits buffer, gradients rounded to 16 bits).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::autocast_dispatch_keyset);
  const at::Tensor bias = intercept_as_float(intercept);
  const int64_t pixels = n * h * w;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor labels = pixel_labels.contiguous();
  const at::Tensor targets = image_labels.to(at::kFloat).contiguous();

  // The float32 logits buffer becomes dloss/dz in place; it lives only until
  // the gradients for the inputs are formed from it.
  const at::Tensor rows = pixel_rows(y);
  at::Tensor logits = float_product(rows, dictionary).contiguous();
  auto float_workspace = at::empty(
      {srm_cuda::predictor_workspace_size(n, h * w, num_codewords)},
      y.options().dtype(at::kFloat));
  auto sum_workspace = at::empty(
      {srm_cuda::deterministic_sum_workspace_size(
          std::max(pixels, n * num_codewords))},
      y.options().dtype(at::kDouble));
  auto loss = at::empty({}, y.options().dtype(at::kFloat));
  // Flags for a pixel label outside [0, K) and an image label outside [0, 1].
  auto error_flags = at::zeros({2}, y.options().dtype(at::kInt));
  check_launch(srm_cuda::launch_predictor_loss(
                   logits.data_ptr<float>(), bias.data_ptr<float>(),
                   labels.data_ptr<int64_t>(), targets.data_ptr<float>(), n,
                   h * w, num_codewords, static_cast<float>(local_weight),
                   static_cast<float>(global_weight),
                   float_workspace.data_ptr<float>(),
                   sum_workspace.data_ptr<double>(), loss.data_ptr<float>(),
                   error_flags.data_ptr<int>(), stream),
               "predictor_loss");
  const auto [grad_y, grad_dictionary, grad_intercept] =
      unit_gradients(logits, y, rows, dictionary, output_mask);
  // Checked once the gradient GEMMs are queued, so the GPU stays busy while
  // the host waits for the flags; a bad label's gradients are never returned.
  if (const auto flags = error_flags_on_host(error_flags)) {
    TORCH_CHECK_VALUE((*flags)[0] == 0,
                      "srm_ext: predictor_loss: pixel_labels must lie in [0, ",
                      num_codewords, ")");
    TORCH_CHECK_VALUE((*flags)[1] == 0,
                      "srm_ext: predictor_loss: image_labels must lie in [0, 1]");
  }
  return {loss.to(y.scalar_type()), grad_y, grad_dictionary, grad_intercept};
}

}  // namespace
}  // namespace srm_ext::cuda_ops

TORCH_LIBRARY_IMPL(srm_ext, CUDA, m) {
  m.impl("sparse_labels", &srm_ext::cuda_ops::sparse_labels);
  m.impl("predictor_loss", &srm_ext::cuda_ops::predictor_loss);
}
