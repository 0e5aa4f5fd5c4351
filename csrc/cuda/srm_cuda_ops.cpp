// CUDA implementations of the srm_ext operators (schemas in
// csrc/registration.cpp): argument checks, output allocation, device guard and
// current stream around the nvcc-built kernels of srm_kernels.h. Dense GEMMs
// (the student predictor) go to cuBLAS through ATen.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "srm_kernels.h"

namespace srm_ext {
namespace {

using srm_cuda::Dtype;
using srm_cuda::FeatureMap;

// ---------------------------------------------------------------------------
// Checks and conversions
// ---------------------------------------------------------------------------

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "srm_ext: CUDA kernel ", kernel,
              " failed: ", cudaGetErrorString(err));
}

Dtype kernel_dtype(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "srm_ext: ", name,
              " must be float32, float16 or bfloat16 on CUDA, got ", type);
  return Dtype::kFloat32;
}

void check_on_device(const at::Tensor& t, const char* name,
                     const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "srm_ext: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "srm_ext: ", name,
              " must be on the same device as the other inputs (",
              ref.device(), "), got ", t.device());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name,
               const char* shape) {
  TORCH_CHECK(t.dim() == dim, "srm_ext: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

void check_same_dtype(const at::Tensor& t, const char* name,
                      const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "srm_ext: ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(),
              "), got ", t.scalar_type());
}

// (D, K) dictionary matching feature dimension `depth` and dtype of `ref`.
void check_dictionary(const at::Tensor& dictionary, int64_t depth,
                      const at::Tensor& ref, const char* ref_name) {
  check_on_device(dictionary, "dictionary", ref);
  check_dim(dictionary, 2, "dictionary", "(D, K)");
  check_same_dtype(dictionary, "dictionary", ref, ref_name);
  TORCH_CHECK(dictionary.size(0) == depth, "srm_ext: dictionary has ",
              dictionary.size(0), " rows but ", ref_name, " has ", depth,
              " channels");
  TORCH_CHECK(dictionary.size(0) <= srm_cuda::kMaxFeatureDim,
              "srm_ext CUDA: feature dimension D = ", dictionary.size(0),
              " exceeds the supported maximum of ", srm_cuda::kMaxFeatureDim);
  TORCH_CHECK(dictionary.size(1) >= 1 &&
                  dictionary.size(1) <= srm_cuda::kMaxCodewords,
              "srm_ext CUDA: number of codewords K = ", dictionary.size(1),
              " must be in [1, ", srm_cuda::kMaxCodewords, "]");
}

// values (N, H, W, k) and int64 indices of the same shape, k <= kMaxTopK.
void check_sparse_code(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& ref) {
  check_on_device(values, "values", ref);
  check_on_device(indices, "indices", ref);
  check_dim(values, 4, "values", "(N, H, W, k)");
  TORCH_CHECK(indices.sizes() == values.sizes(),
              "srm_ext: indices must have the shape of values (",
              values.sizes(), "), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong,
              "srm_ext: indices must be int64, got ", indices.scalar_type());
  kernel_dtype(values.scalar_type(), "values");
  TORCH_CHECK(values.size(3) >= 1 && values.size(3) <= srm_cuda::kMaxTopK,
              "srm_ext CUDA: k = ", values.size(3), " must be in [1, ",
              srm_cuda::kMaxTopK, "]");
}

// x (N, D, H, W) on CUDA, its (D, K) dictionary, and a sparse code of its
// pixels: the inputs every backward op of the encoder shares.
void check_code_of_x(const at::Tensor& x, const at::Tensor& dictionary,
                     const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK(x.is_cuda(), "srm_ext: x must be a CUDA tensor");
  check_dim(x, 4, "x", "(N, D, H, W)");
  kernel_dtype(x.scalar_type(), "x");
  check_dictionary(dictionary, x.size(1), x, "x");
  check_sparse_code(values, indices, x);
  check_same_dtype(values, "values", x, "x");
  TORCH_CHECK(values.size(0) == x.size(0) && values.size(1) == x.size(2) &&
                  values.size(2) == x.size(3),
              "srm_ext: values ", values.sizes(),
              " do not match the pixels of x ", x.sizes());
}

void check_intercept(const at::Tensor& intercept, const at::Tensor& ref) {
  check_on_device(intercept, "intercept", ref);
  TORCH_CHECK(intercept.numel() == 1,
              "srm_ext: intercept must have exactly one element, got shape ",
              intercept.sizes());
  TORCH_CHECK(at::isFloatingType(intercept.scalar_type()),
              "srm_ext: intercept must be floating point, got ",
              intercept.scalar_type());
}

// The shared intercept as a one-element float32 tensor on the device.
at::Tensor intercept_as_float(const at::Tensor& intercept,
                              const at::Tensor& ref) {
  check_intercept(intercept, ref);
  return intercept.reshape({1}).to(at::kFloat).contiguous();
}

FeatureMap feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "srm_ext: ", name,
              " must have shape (N, D, H, W), got ", t.sizes());
  FeatureMap map;
  map.data = t.data_ptr();
  map.dtype = kernel_dtype(t.scalar_type(), name);
  map.layout = {t.size(0),   t.size(1),   t.size(2),   t.size(3),
                t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return map;
}

// Float32 (N, D, H, W) view over pixel-major storage (channels contiguous),
// the layout the kernels walk fastest per pixel.
at::Tensor empty_pixel_major_float(int64_t n, int64_t d, int64_t h, int64_t w,
                                   const at::Tensor& ref) {
  return at::empty({n, h, w, d}, ref.options().dtype(at::kFloat))
      .permute({0, 3, 1, 2});
}

at::Tensor empty_gradient(const at::Tensor& ref) {
  return at::empty({0}, ref.options());
}

// Raises `message` when a kernel set the int flag. Reading it back
// synchronises with the device, which a stream under CUDA graph capture must
// not do; there the check is skipped and the kernels' fallback for a bad
// entry (it is ignored) stands.
template <typename... Message>
void check_error_flag(const at::Tensor& flag, const Message&... message) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() !=
      c10::cuda::CaptureStatus::None) {
    return;
  }
  TORCH_CHECK(flag.item<int>() == 0, message...);
}

// 0-dim float32 tensor: scale * sum(input), summed in a fixed order.
at::Tensor deterministic_sum(const at::Tensor& input, double scale,
                             cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(input.scalar_type() == at::kFloat &&
                        input.is_contiguous());
  const int64_t count = input.numel();
  auto workspace = at::empty(
      {srm_cuda::deterministic_sum_workspace_size(count)},
      input.options().dtype(at::kDouble));
  auto out = at::empty({}, input.options().dtype(at::kFloat));
  check_launch(srm_cuda::launch_deterministic_sum(
                   input.data_ptr<float>(), count, scale,
                   workspace.data_ptr<double>(), out.data_ptr<float>(), stream),
               "deterministic_sum");
  return out;
}

// Transposed (K, D) contiguous copy of the dictionary: one codeword per row.
at::Tensor transposed_dictionary(const at::Tensor& dictionary) {
  return dictionary.t().contiguous();
}

// The dictionary gradient in the dictionary's own layout (at::empty_like),
// which is what the fake kernels promise for every backend.
at::Tensor laid_out_like(const at::Tensor& grad, const at::Tensor& dictionary) {
  auto out = at::empty_like(dictionary);
  if (out.strides() == grad.strides()) return grad;
  return out.copy_(grad);
}

// Gradient of the dictionary, laid out like it:
//   G[:, c] = sum over (p, j) with indices[p, j] == c of
//             coef_a[p, j] * features_a[p] + coef_b[p, j] * features_b[p]
// (b term optional, float32). Deterministic when torch asks for it.
at::Tensor dictionary_grad(const at::Tensor& features_a,
                           const at::Tensor& coef_a,
                           const at::Tensor* features_b,
                           const at::Tensor* coef_b,
                           const at::Tensor& indices,
                           const at::Tensor& dictionary, cudaStream_t stream) {
  const int64_t depth = features_a.size(1);
  const int64_t num_codewords = dictionary.size(1);
  const int64_t k = indices.size(-1);
  const auto float_options = features_a.options().dtype(at::kFloat);
  auto grad = at::empty({depth, num_codewords}, dictionary.options());
  const Dtype grad_dtype = kernel_dtype(dictionary.scalar_type(), "dictionary");

  if (at::globalContext().deterministicAlgorithms()) {
    // Group entries by codeword; the stable sort keeps entry order inside a
    // group, so every codeword is summed in a fixed order.
    const at::Tensor flat_indices = indices.reshape({-1});
    at::Tensor sorted_codes, entry_order;
    std::tie(sorted_codes, entry_order) =
        at::sort(flat_indices, /*stable=*/std::optional<bool>(true),
                 /*dim=*/0, /*descending=*/false);
    auto run_offsets = at::empty({num_codewords + 1}, indices.options());
    check_launch(srm_cuda::launch_codeword_run_offsets(
                     sorted_codes.data_ptr<int64_t>(), sorted_codes.numel(),
                     num_codewords, run_offsets.data_ptr<int64_t>(), stream),
                 "codeword_run_offsets");
    // Pixel-major features: each entry then reads one contiguous row.
    const at::Tensor rows_a =
        features_a.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor rows_b;
    FeatureMap map_b{};
    if (features_b != nullptr) {
      rows_b = features_b->contiguous(at::MemoryFormat::ChannelsLast);
      map_b = feature_map(rows_b, "features");
    }
    // Split long runs so that a popular codeword does not serialise on one
    // block; the split depends only on the sizes.
    const int64_t entries = flat_indices.numel();
    int64_t segments = (entries + num_codewords * 256 - 1) /
                       std::max<int64_t>(num_codewords * 256, 1);
    const int64_t partial_budget = int64_t{1} << 26;  // floats
    segments = std::min<int64_t>(
        segments, std::max<int64_t>(1, partial_budget /
                                           std::max<int64_t>(
                                               num_codewords * depth, 1)));
    segments = std::max<int64_t>(1, std::min<int64_t>(segments, 32));
    auto partials =
        at::empty({segments, num_codewords, depth}, float_options);
    check_launch(srm_cuda::launch_scatter_codewords_sorted(
                     feature_map(rows_a, "features"),
                     coef_a.data_ptr<float>(),
                     features_b != nullptr ? &map_b : nullptr,
                     coef_b != nullptr ? coef_b->data_ptr<float>() : nullptr,
                     entry_order.data_ptr<int64_t>(),
                     run_offsets.data_ptr<int64_t>(), k, num_codewords,
                     segments, partials.data_ptr<float>(), stream),
                 "scatter_codewords_sorted");
    check_launch(srm_cuda::launch_reduce_dictionary_partials(
                     partials.data_ptr<float>(), segments, depth,
                     num_codewords, grad.data_ptr(), grad_dtype, stream),
                 "reduce_dictionary_partials");
    return laid_out_like(grad, dictionary);
  }

  auto grad_t = at::zeros({num_codewords, depth}, float_options);
  FeatureMap map_b{};
  if (features_b != nullptr) {
    map_b = feature_map(*features_b, "features");
  }
  check_launch(srm_cuda::launch_scatter_codewords_atomic(
                   feature_map(features_a, "features"),
                   coef_a.data_ptr<float>(),
                   features_b != nullptr ? &map_b : nullptr,
                   coef_b != nullptr ? coef_b->data_ptr<float>() : nullptr,
                   indices.data_ptr<int64_t>(), k, num_codewords,
                   grad_t.data_ptr<float>(), stream),
               "scatter_codewords_atomic");
  check_launch(srm_cuda::launch_reduce_dictionary_partials(
                   grad_t.data_ptr<float>(), 1, depth, num_codewords,
                   grad.data_ptr(), grad_dtype, stream),
               "reduce_dictionary_partials");
  return laid_out_like(grad, dictionary);
}

// Gradient of the shared intercept: the sum of the kept pre-activation
// gradients, 0-dim in x's dtype.
at::Tensor intercept_grad(const at::Tensor& grad_pre, const at::Tensor& x,
                          cudaStream_t stream) {
  return deterministic_sum(grad_pre, 1.0, stream).to(x.scalar_type());
}

// out (N, D, H, W, any strides) = host_scale * device_scale[0]
//   * (sum_j coef[p, j] * C[:, indices[p, j]] + addend_scale * addend).
void combine_codewords(const at::Tensor& coef, const at::Tensor& indices,
                       const at::Tensor& dictionary_t, const at::Tensor* addend,
                       float addend_scale, const at::Tensor* device_scale,
                       float host_scale, const at::Tensor& out,
                       cudaStream_t stream) {
  FeatureMap add_map{};
  if (addend != nullptr) {
    add_map = feature_map(*addend, "addend");
  }
  check_launch(
      srm_cuda::launch_combine_codewords(
          coef.data_ptr<float>(), indices.data_ptr<int64_t>(),
          indices.size(-1), dictionary_t.data_ptr(),
          kernel_dtype(dictionary_t.scalar_type(), "dictionary"),
          dictionary_t.size(0), addend != nullptr ? &add_map : nullptr,
          addend_scale,
          device_scale != nullptr ? device_scale->data_ptr<float>() : nullptr,
          host_scale, feature_map(out, "output"), stream),
      "combine_codewords");
}

// (N, H, W, k) float32: <features_p, C[:, indices[p, j]]>, times s (1 - s)
// when the kept entries' float32 sigmoid s is given (see kept_sigmoid).
at::Tensor codeword_dots(const at::Tensor& features, const at::Tensor& indices,
                         const at::Tensor& dictionary_t,
                         const at::Tensor* sigmoid, cudaStream_t stream) {
  auto out = at::empty(indices.sizes(), features.options().dtype(at::kFloat));
  check_launch(srm_cuda::launch_codeword_dots(
                   feature_map(features, "features"),
                   indices.data_ptr<int64_t>(), indices.size(-1),
                   dictionary_t.data_ptr(),
                   kernel_dtype(dictionary_t.scalar_type(), "dictionary"),
                   dictionary_t.size(0),
                   sigmoid != nullptr ? sigmoid->data_ptr<float>() : nullptr,
                   out.data_ptr<float>(), stream),
               "codeword_dots");
  return out;
}

// The float32 sigmoid of every kept entry, whose s (1 - s) the backward ops
// need. float32 values are that sigmoid. 16-bit values are rounded, to
// exactly 1 once the pre-activation passes about 8 (float16) or 6
// (bfloat16), which would stop their gradient; for them s is recomputed from
// the pre-activation <x_p, C[:, idx]> + b, which is what the reference's
// autograd keeps.
at::Tensor kept_sigmoid(const at::Tensor& x, const at::Tensor& values,
                        const at::Tensor& indices,
                        const at::Tensor& dictionary_t,
                        const at::Tensor& intercept, cudaStream_t stream) {
  if (values.scalar_type() == at::kFloat) {
    return values.contiguous();
  }
  at::Tensor pre = codeword_dots(x, indices, dictionary_t, nullptr, stream);
  return pre.add_(intercept_as_float(intercept, x)).sigmoid_();
}

// The backward of the fused loss keeps a float32 workspace of about D + 3k
// values per pixel (the residual and per-entry terms); it walks the pixels in
// boxes of at most about this many workspace values, so its memory stays
// bounded whatever the size of x. SRM_EXT_CUDA_BOX_VALUES overrides it, so
// that tests can cover many boxes with small inputs.
int64_t backward_box_values() {
  constexpr int64_t kDefault = int64_t{1} << 26;
  const char* text = std::getenv("SRM_EXT_CUDA_BOX_VALUES");
  const int64_t value = text != nullptr ? std::atoll(text) : 0;
  return value > 0 ? value : kDefault;
}

// A box of pixels [n0, n0 + nc) x [h0, h0 + hc) x [0, W): whole images, or
// whole rows of one image, so its part of a contiguous (N, H, W, k) code is
// contiguous too.
struct PixelBox {
  int64_t n0, nc, h0, hc;

  at::Tensor of_map(const at::Tensor& t) const {  // (N, C, H, W)
    return t.narrow(0, n0, nc).narrow(2, h0, hc);
  }
  at::Tensor of_code(const at::Tensor& t) const {  // (N, H, W, k)
    return t.narrow(0, n0, nc).narrow(1, h0, hc).contiguous();
  }
};

// Boxes covering x's pixels, each with at most max_pixels pixels where a
// single row allows: as many whole images as fit, else rows of one image.
std::vector<PixelBox> pixel_boxes(const at::Tensor& x, int64_t max_pixels) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t per_image = h * w;
  max_pixels = std::max<int64_t>(max_pixels, 1);
  std::vector<PixelBox> boxes;
  if (per_image <= max_pixels) {
    const int64_t images = per_image > 0 ? max_pixels / per_image : n;
    for (int64_t n0 = 0; n0 < n; n0 += images) {
      boxes.push_back({n0, std::min(images, n - n0), 0, h});
    }
  } else {
    const int64_t rows = std::max<int64_t>(1, max_pixels / w);
    for (int64_t n0 = 0; n0 < n; ++n0) {
      for (int64_t h0 = 0; h0 < h; h0 += rows) {
        boxes.push_back({n0, 1, h0, std::min(rows, h - h0)});
      }
    }
  }
  return boxes;
}

// ---------------------------------------------------------------------------
// Teacher side
// ---------------------------------------------------------------------------

// Shared by sparse_encode and reconstruction_loss; returns the per-block
// squared-residual partials when with_loss.
std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_impl(
    const at::Tensor& x, const at::Tensor& dictionary,
    const at::Tensor& intercept, int64_t k, bool with_loss) {
  TORCH_CHECK(x.is_cuda(), "srm_ext: x must be a CUDA tensor");
  check_dim(x, 4, "x", "(N, D, H, W)");
  const Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  check_dictionary(dictionary, x.size(1), x, "x");
  const int64_t num_codewords = dictionary.size(1);
  TORCH_CHECK(k >= 1 && k <= std::min(num_codewords, srm_cuda::kMaxTopK),
              "srm_ext CUDA: k = ", k, " must be in [1, min(K, ",
              srm_cuda::kMaxTopK, ")] with K = ", num_codewords);
  TORCH_CHECK(x.size(1) >= 1, "srm_ext: x must have at least one channel");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias = intercept_as_float(intercept, x);
  const at::Tensor dict = dictionary.contiguous();

  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  auto values = at::empty({n, h, w, k}, x.options());
  auto indices = at::empty({n, h, w, k}, x.options().dtype(at::kLong));
  at::Tensor partials;
  const int64_t pixels = n * h * w;
  if (with_loss) {
    partials = at::empty({srm_cuda::sparse_encode_num_blocks(pixels)},
                         x.options().dtype(at::kFloat));
  }
  if (pixels == 0) {
    return {values, indices, partials};
  }
  // float32 follows torch's matmul TF32 setting; 16-bit inputs always use
  // their tensor-core MMA (exact products, float32 accumulation).
  const bool use_tensor_cores = dtype != Dtype::kFloat32 ||
                                at::globalContext().allowTF32CuBLAS();
  check_launch(srm_cuda::launch_sparse_encode(
                   feature_map(x, "x"), dict.data_ptr(), num_codewords,
                   bias.data_ptr<float>(), k, use_tensor_cores,
                   values.data_ptr(), indices.data_ptr<int64_t>(),
                   with_loss ? partials.data_ptr<float>() : nullptr, stream),
               "sparse_encode");
  return {values, indices, partials};
}

std::tuple<at::Tensor, at::Tensor> sparse_encode(const at::Tensor& x,
                                                 const at::Tensor& dictionary,
                                                 const at::Tensor& intercept,
                                                 int64_t k) {
  auto result = encode_impl(x, dictionary, intercept, k, /*with_loss=*/false);
  return {std::get<0>(result), std::get<1>(result)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_encode_backward(
    const at::Tensor& grad_values, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& x,
    const at::Tensor& dictionary, const at::Tensor& intercept,
    std::array<bool, 3> output_mask) {
  check_code_of_x(x, dictionary, values, indices);
  check_on_device(grad_values, "grad_values", x);
  TORCH_CHECK(grad_values.sizes() == values.sizes(),
              "srm_ext: grad_values must have the shape of values (",
              values.sizes(), "), got ", grad_values.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor grad_vals = grad_values.to(values.scalar_type()).contiguous();
  check_intercept(intercept, x);
  const bool want_codewords =
      output_mask[0] || values.scalar_type() != at::kFloat;
  const at::Tensor dict_t =
      want_codewords ? transposed_dictionary(dictionary) : at::Tensor();

  // gp = d pre for every kept entry.
  const at::Tensor sigmoid =
      kept_sigmoid(x, vals, idx, dict_t, intercept, stream);
  auto grad_pre = at::empty(vals.sizes(), x.options().dtype(at::kFloat));
  check_launch(srm_cuda::launch_sigmoid_backward(
                   grad_vals.data_ptr(),
                   kernel_dtype(grad_vals.scalar_type(), "grad_values"),
                   sigmoid.data_ptr<float>(), vals.numel(),
                   grad_pre.data_ptr<float>(), stream),
               "sigmoid_backward");

  at::Tensor grad_x = empty_gradient(x);
  at::Tensor grad_dictionary = empty_gradient(x);
  at::Tensor grad_intercept = empty_gradient(x);
  if (output_mask[0]) {
    grad_x = at::empty_like(x);
    combine_codewords(grad_pre, idx, dict_t, nullptr, 0.0f, nullptr, 1.0f,
                      grad_x, stream);
  }
  if (output_mask[1]) {
    grad_dictionary =
        dictionary_grad(x, grad_pre, nullptr, nullptr, idx, dictionary, stream);
  }
  if (output_mask[2]) {
    grad_intercept = intercept_grad(grad_pre, x, stream);
  }
  return {grad_x, grad_dictionary, grad_intercept};
}

at::Tensor sparse_decode(const at::Tensor& values, const at::Tensor& indices,
                         const at::Tensor& dictionary) {
  TORCH_CHECK(values.is_cuda(), "srm_ext: values must be a CUDA tensor");
  check_sparse_code(values, indices, values);
  check_dim(dictionary, 2, "dictionary", "(D, K)");
  check_dictionary(dictionary, dictionary.size(0), values, "values");

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = values.size(0), h = values.size(1), w = values.size(2);
  const int64_t depth = dictionary.size(0);
  auto x_hat = at::empty({n, depth, h, w}, values.options());
  const at::Tensor coef = values.to(at::kFloat).contiguous();
  combine_codewords(coef, indices.contiguous(),
                    transposed_dictionary(dictionary), nullptr, 0.0f, nullptr,
                    1.0f, x_hat, stream);
  return x_hat;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward(
    const at::Tensor& grad_output, const at::Tensor& values,
    const at::Tensor& indices, const at::Tensor& dictionary,
    std::array<bool, 2> output_mask) {
  TORCH_CHECK(values.is_cuda(), "srm_ext: values must be a CUDA tensor");
  check_sparse_code(values, indices, values);
  check_dim(dictionary, 2, "dictionary", "(D, K)");
  check_dictionary(dictionary, dictionary.size(0), values, "values");
  check_on_device(grad_output, "grad_output", values);
  check_dim(grad_output, 4, "grad_output", "(N, D, H, W)");
  TORCH_CHECK(grad_output.size(0) == values.size(0) &&
                  grad_output.size(1) == dictionary.size(0) &&
                  grad_output.size(2) == values.size(1) &&
                  grad_output.size(3) == values.size(2),
              "srm_ext: grad_output must have shape (N, D, H, W) = (",
              values.size(0), ", ", dictionary.size(0), ", ", values.size(1),
              ", ", values.size(2), "), got ", grad_output.sizes());

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad_out = grad_output.to(values.scalar_type());
  const at::Tensor idx = indices.contiguous();

  at::Tensor grad_values = empty_gradient(values);
  at::Tensor grad_dictionary = empty_gradient(values);
  if (output_mask[0]) {
    grad_values = codeword_dots(grad_out, idx, transposed_dictionary(dictionary),
                                nullptr, stream)
                      .to(values.scalar_type());
  }
  if (output_mask[1]) {
    const at::Tensor coef = values.to(at::kFloat).contiguous();
    grad_dictionary = dictionary_grad(grad_out, coef, nullptr, nullptr, idx,
                                      dictionary, stream);
  }
  return {grad_values, grad_dictionary};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss(
    const at::Tensor& x, const at::Tensor& dictionary,
    const at::Tensor& intercept, int64_t k) {
  at::Tensor values, indices, partials;
  std::tie(values, indices, partials) =
      encode_impl(x, dictionary, intercept, k, /*with_loss=*/true);
  const int64_t elements = x.numel();
  if (elements == 0) {
    // Mean over nothing, as torch.mean gives.
    return {at::full({}, std::numeric_limits<double>::quiet_NaN(), x.options()),
            values, indices};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor loss =
      deterministic_sum(partials, 1.0 / static_cast<double>(elements), stream)
          .to(x.scalar_type());
  return {loss, values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& x,
    const at::Tensor& dictionary, const at::Tensor& intercept,
    const at::Tensor& values, const at::Tensor& indices,
    std::array<bool, 3> output_mask) {
  check_code_of_x(x, dictionary, values, indices);
  TORCH_CHECK(grad_loss.numel() == 1,
              "srm_ext: grad_loss must have one element, got shape ",
              grad_loss.sizes());
  check_intercept(intercept, x);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t depth = x.size(1), w = x.size(3), k = values.size(3);
  const int64_t elements = x.numel();
  const at::Tensor dict_t = transposed_dictionary(dictionary);
  const at::Tensor upstream =
      grad_loss.to(x.device(), at::kFloat).reshape({1}).contiguous();
  const float mean_scale =
      elements > 0 ? static_cast<float>(2.0 / static_cast<double>(elements))
                   : 0.0f;

  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : empty_gradient(x);
  // Summed over the boxes in float32, in box order (deterministic);
  // layout_of_grad only carries the dictionary's layout in float32.
  at::Tensor grad_dictionary_sum, grad_intercept_sum;
  const at::Tensor layout_of_grad =
      at::empty_like(dictionary, dictionary.options().dtype(at::kFloat));

  for (const PixelBox& box :
       pixel_boxes(x, backward_box_values() / (depth + 3 * k))) {
    const at::Tensor xb = box.of_map(x);
    const at::Tensor vals = box.of_code(values);
    const at::Tensor idx = box.of_code(indices);
    // g = 2 * grad_loss / M * (x_hat - x), float32 and pixel-major.
    const at::Tensor g = empty_pixel_major_float(box.nc, depth, box.hc, w, x);
    const at::Tensor coef_values = vals.to(at::kFloat).contiguous();
    combine_codewords(coef_values, idx, dict_t, &xb, -1.0f, &upstream,
                      mean_scale, g, stream);
    // gp = <g_p, C[:, idx]> * s (1 - s).
    const at::Tensor sigmoid =
        kept_sigmoid(xb, vals, idx, dict_t, intercept, stream);
    const at::Tensor grad_pre = codeword_dots(g, idx, dict_t, &sigmoid, stream);

    if (output_mask[0]) {
      // -g_p + sum_j gp_pj C[:, idx_pj]
      combine_codewords(grad_pre, idx, dict_t, &g, -1.0f, nullptr, 1.0f,
                        box.of_map(grad_x), stream);
    }
    if (output_mask[1]) {
      // v_pj g_p (through x_hat) + gp_pj x_p (through the encoder)
      const at::Tensor part = dictionary_grad(xb, grad_pre, &g, &coef_values,
                                              idx, layout_of_grad, stream);
      grad_dictionary_sum = grad_dictionary_sum.defined()
                                ? grad_dictionary_sum.add_(part)
                                : part;
    }
    if (output_mask[2]) {
      const at::Tensor part = deterministic_sum(grad_pre, 1.0, stream);
      grad_intercept_sum = grad_intercept_sum.defined()
                               ? grad_intercept_sum.add_(part)
                               : part;
    }
  }

  at::Tensor grad_dictionary = empty_gradient(x);
  at::Tensor grad_intercept = empty_gradient(x);
  if (output_mask[1]) {
    grad_dictionary = grad_dictionary_sum.defined()
                          ? grad_dictionary_sum.to(dictionary.scalar_type())
                          : at::zeros_like(dictionary);
  }
  if (output_mask[2]) {
    grad_intercept = grad_intercept_sum.defined()
                         ? grad_intercept_sum.to(x.scalar_type())
                         : at::zeros({}, x.options());
  }
  return {grad_x, grad_dictionary, grad_intercept};
}

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

// ---------------------------------------------------------------------------
// Student side
// ---------------------------------------------------------------------------

// (P, D_s) rows of y, one per pixel (a view when y is channels_last).
at::Tensor pixel_rows(const at::Tensor& y) {
  return y.permute({0, 2, 3, 1}).reshape({-1, y.size(1)});
}

// The power of two by which predictor_loss scales grad_logits and its backward
// divides again. dloss/dz has terms of order 1/P (one-hot) and 1/(P*K)
// (softmax, BCE); at training batch sizes they fall below float16's smallest
// normal (6.1e-5) and round to zero. Scaled by about P*K/64 they sit near 1
// with ample headroom. float32 and bfloat16 have float32's range and keep
// dloss/dz itself, as the CPU kernels do.
double grad_logits_scale(at::ScalarType dtype, int64_t pixels,
                         int64_t num_codewords) {
  if (dtype != at::kHalf || pixels == 0) {
    return 1.0;
  }
  const int exponent = std::ilogb(static_cast<double>(pixels) *
                                  static_cast<double>(num_codewords)) - 6;
  return std::ldexp(1.0, std::max(exponent, 0));
}

// alpha * (a @ b), alpha applied to the GEMM's float32 accumulator: a 16-bit
// product that fits only once scaled down cannot overflow first.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  // beta = 0: the uninitialised input is ignored, as in at::mm.
  return at::addmm(at::empty({}, a.options()), a, b, /*beta=*/0, alpha);
}

std::tuple<at::Tensor, at::Tensor> predictor_loss(
    const at::Tensor& y, const at::Tensor& dictionary,
    const at::Tensor& intercept, const at::Tensor& pixel_labels,
    const at::Tensor& image_labels, double local_weight,
    double global_weight) {
  TORCH_CHECK(y.is_cuda(), "srm_ext: y must be a CUDA tensor");
  check_dim(y, 4, "y", "(N, D_s, H, W)");
  const Dtype dtype = kernel_dtype(y.scalar_type(), "y");
  check_dictionary(dictionary, y.size(1), y, "y");
  const int64_t n = y.size(0), h = y.size(2), w = y.size(3);
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
  if (pixels == 0) {
    // Means over no pixels: NaN, as on the CPU; nothing to launch.
    return {at::full({}, std::numeric_limits<double>::quiet_NaN(), y.options()),
            at::empty({n, h, w, num_codewords}, y.options())};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor labels = pixel_labels.contiguous();
  const at::Tensor targets = image_labels.to(y.scalar_type()).contiguous();
  const double grad_scale =
      grad_logits_scale(y.scalar_type(), pixels, num_codewords);

  // The logits buffer becomes grad_logits in place.
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
  return {loss.to(y.scalar_type()), logits.view({n, h, w, num_codewords})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictor_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_logits,
    const at::Tensor& y, const at::Tensor& dictionary,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(y.is_cuda(), "srm_ext: y must be a CUDA tensor");
  check_dim(y, 4, "y", "(N, D_s, H, W)");
  kernel_dtype(y.scalar_type(), "y");
  check_dictionary(dictionary, y.size(1), y, "y");
  const int64_t n = y.size(0), depth = y.size(1), h = y.size(2),
                w = y.size(3);
  const int64_t num_codewords = dictionary.size(1);
  check_on_device(grad_logits, "grad_logits", y);
  TORCH_CHECK(grad_logits.dim() == 4 && grad_logits.size(0) == n &&
                  grad_logits.size(1) == h && grad_logits.size(2) == w &&
                  grad_logits.size(3) == num_codewords,
              "srm_ext: grad_logits must have shape (N, H, W, K) = (", n, ", ",
              h, ", ", w, ", ", num_codewords, "), got ", grad_logits.sizes());
  TORCH_CHECK(grad_loss.numel() == 1,
              "srm_ext: grad_loss must have one element, got shape ",
              grad_loss.sizes());

  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor upstream = grad_loss.to(y.device(), at::kFloat).reshape({});
  const at::Tensor g =
      grad_logits.to(y.scalar_type()).reshape({n * h * w, num_codewords});
  const double unscale =
      1.0 / grad_logits_scale(y.scalar_type(), n * h * w, num_codewords);

  at::Tensor grad_y = empty_gradient(y);
  at::Tensor grad_dictionary = empty_gradient(y);
  at::Tensor grad_intercept = empty_gradient(y);
  if (output_mask[0]) {
    grad_y = scaled_mm(g, dictionary.t(), unscale)
                 .mul_(upstream)
                 .view({n, h, w, depth})
                 .permute({0, 3, 1, 2});
  }
  if (output_mask[1]) {
    grad_dictionary = laid_out_like(
        scaled_mm(pixel_rows(y).t(), g, unscale).mul_(upstream), dictionary);
  }
  if (output_mask[2]) {
    grad_intercept =
        (at::sum(g, at::kFloat).mul_(unscale) * upstream).to(y.scalar_type());
  }
  return {grad_y, grad_dictionary, grad_intercept};
}

}  // namespace
}  // namespace srm_ext

TORCH_LIBRARY_IMPL(srm_ext, CUDA, m) {
  m.impl("sparse_encode", &srm_ext::sparse_encode);
  m.impl("sparse_encode_backward", &srm_ext::sparse_encode_backward);
  m.impl("sparse_decode", &srm_ext::sparse_decode);
  m.impl("sparse_decode_backward", &srm_ext::sparse_decode_backward);
  m.impl("reconstruction_loss", &srm_ext::reconstruction_loss);
  m.impl("reconstruction_loss_backward",
         &srm_ext::reconstruction_loss_backward);
  m.impl("sparse_labels", &srm_ext::sparse_labels);
  m.impl("predictor_loss", &srm_ext::predictor_loss);
  m.impl("predictor_loss_backward", &srm_ext::predictor_loss_backward);
}
