// CUDA implementations of the teacher-side operators (schemas in
// csrc/registration.cpp): sparse_encode, sparse_decode, reconstruction_loss
// and their backward ops. Each checks its arguments, allocates its outputs
// and launches the nvcc-built kernels of srm_kernels.h on the current stream
// under a device guard.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "op_support.h"

namespace srm_ext::cuda_ops {
namespace {

// The fused encode kernel: values, indices and (with loss_partials) the
// squared-residual partials of every block in one launch.
void encode_fused(const at::Tensor& x, const at::Tensor& dictionary,
                  const at::Tensor& bias, int64_t k, at::Tensor& values,
                  at::Tensor& indices, at::Tensor* loss_partials,
                  cudaStream_t stream) {
  const at::Tensor dict = dictionary.contiguous();  // (D, K) row-major
  if (loss_partials != nullptr) {
    *loss_partials = at::empty(
        {srm_cuda::sparse_encode_num_blocks(values.numel() / k)},
        x.options().dtype(at::kFloat));
  }
  // float32 follows torch's matmul TF32 setting; 16-bit inputs always use
  // their tensor-core MMA (exact products, float32 accumulation).
  const bool use_tensor_cores =
      x.scalar_type() != at::kFloat || at::globalContext().allowTF32CuBLAS();
  const cudaError_t status = srm_cuda::launch_sparse_encode(
      feature_map(x, "x"), dict.data_ptr(), dict.size(1),
      bias.data_ptr<float>(), k, use_tensor_cores, values.data_ptr(),
      indices.data_ptr<int64_t>(),
      loss_partials != nullptr ? loss_partials->data_ptr<float>() : nullptr,
      stream);
  // The per-pixel top-k lists live in shared memory; every GPU the kernels
  // build for gives a block enough for k <= 64. Registers could run short
  // too, so the message names both.
  TORCH_CHECK(status != cudaErrorLaunchOutOfResources,
              "srm_ext CUDA: the fused encode at k = ", k,
              " needs more resources per block (shared memory or registers) "
              "than this GPU allows; use k <= 64 on it");
  check_launch(status, "sparse_encode");
}

// The GEMM encode: cuBLAS writes the float32 pre-activations of one box of
// pixels at a time (an NCHW box is read through its transposed view, as it
// lies in memory, and the dictionary in either layout) and the row-wise
// selection keeps each pixel's top k. The box bounds the pre-activation
// buffer; the full (P, K) matrix never exists.
void encode_by_gemm(const at::Tensor& x, Dtype dtype,
                    const at::Tensor& dictionary, const at::Tensor& bias,
                    int64_t k, at::Tensor& values, at::Tensor& indices,
                    cudaStream_t stream) {
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t num_codewords = dictionary.size(1);
  const at::Tensor value_rows = values.view({-1, k});
  const at::Tensor index_rows = indices.view({-1, k});
  for (const PixelBox& box :
       pixel_boxes(x, box_values(kEncodeBoxValues) / num_codewords)) {
    // (nc, pixels of an image in the box, D): a strided view for NCHW and
    // channels_last boxes, which cuBLAS takes as they are.
    const at::Tensor rows = box.of_map(x).flatten(2).transpose(1, 2);
    const at::Tensor pre = float_product(rows, dictionary).contiguous();
    const int64_t first = box.first_row(h, w);
    const int64_t count = box.num_rows();
    check_launch(srm_cuda::launch_select_top_k(
                     pre.data_ptr<float>(), count, num_codewords,
                     num_codewords, bias.data_ptr<float>(), k, dtype,
                     value_rows.narrow(0, first, count).data_ptr(),
                     index_rows.narrow(0, first, count).data_ptr<int64_t>(),
                     stream),
                 "select_top_k");
  }
}

// The screened encode (float32; srm_kernels.h): per box of pixels a TF32
// GEMM ranks the codewords and the selection keeps each pixel's best few;
// those are scored exactly, and the exact top k is kept where TF32's error
// bound certifies it. The pixels it cannot certify are listed and encoded
// exactly in full at the end.
void encode_screened(const at::Tensor& x, const at::Tensor& dictionary,
                     const at::Tensor& bias, int64_t k,
                     int64_t num_candidates, at::Tensor& values,
                     at::Tensor& indices, cudaStream_t stream) {
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t num_codewords = dictionary.size(1);
  const at::Tensor dict_t = transposed_dictionary(dictionary);
  const at::Tensor norm_max =
      at::linalg_vector_norm(dict_t, 2, {1}).max().reshape({1});
  const srm_cuda::Tf32ErrorBound error = srm_cuda::tf32_error_bound(x.size(1));
  const int64_t pixels = x.size(0) * h * w;
  const at::Tensor fallback_rows =
      at::empty({pixels}, x.options().dtype(at::kLong));
  const at::Tensor fallback_count = at::zeros({1}, x.options().dtype(at::kLong));
  const at::Tensor value_rows = values.view({-1, k});
  const at::Tensor index_rows = indices.view({-1, k});
  for (const PixelBox& box :
       pixel_boxes(x, box_values(kEncodeBoxValues) / num_codewords)) {
    const at::Tensor xb = box.of_map(x);
    const at::Tensor pre =
        tf32_product(xb.flatten(2).transpose(1, 2), dictionary);
    const int64_t first = box.first_row(h, w);
    const int64_t count = box.num_rows();
    const at::Tensor candidates = at::empty(
        {box.nc, box.hc, box.wc, num_candidates}, indices.options());
    const at::Tensor cutoff = at::empty({count}, pre.options());
    check_launch(srm_cuda::launch_select_candidates(
                     pre.data_ptr<float>(), count, num_codewords,
                     num_codewords, bias.data_ptr<float>(), num_candidates,
                     candidates.data_ptr<int64_t>(),
                     cutoff.data_ptr<float>(), stream),
                 "select_candidates");
    at::Tensor norms;
    const at::Tensor dots =
        codeword_dots(xb, candidates, dict_t, nullptr, stream, &norms);
    check_launch(srm_cuda::launch_certify_top_k(
                     dots.data_ptr<float>(), candidates.data_ptr<int64_t>(),
                     cutoff.data_ptr<float>(), count, num_candidates,
                     norms.data_ptr<float>(), norm_max.data_ptr<float>(),
                     error, bias.data_ptr<float>(), k,
                     value_rows.narrow(0, first, count).data_ptr<float>(),
                     index_rows.narrow(0, first, count).data_ptr<int64_t>(),
                     first, fallback_rows.data_ptr<int64_t>(),
                     fallback_count.data_ptr<int64_t>(), stream),
                 "certify_top_k");
  }
  check_launch(srm_cuda::launch_exact_rows_top_k(
                   feature_map(x, "x"), dict_t.data_ptr<float>(),
                   num_codewords, fallback_rows.data_ptr<int64_t>(),
                   fallback_count.data_ptr<int64_t>(), pixels,
                   bias.data_ptr<float>(), k, values.data_ptr<float>(),
                   indices.data_ptr<int64_t>(), stream),
               "exact_rows_top_k");
}

// Shared by sparse_encode and reconstruction_loss; with_loss also gives the
// squared-residual partials that the loss sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_impl(
    const at::Tensor& x, const at::Tensor& dictionary,
    const at::Tensor& intercept, int64_t k, bool with_loss) {
  TORCH_CHECK(x.is_cuda(), "srm_ext: x must be a CUDA tensor");
  check_dim(x, 4, "x", "(N, D, H, W)");
  const Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  check_dictionary(dictionary, x.size(1), x, "x");
  const int64_t num_codewords = dictionary.size(1);
  TORCH_CHECK(k >= 1 && k <= num_codewords, "srm_ext: k = ", k,
              " must be in [1, K = ", num_codewords, "]");
  check_sparse_kernel_limits(dictionary, k);
  TORCH_CHECK(x.size(1) >= 1, "srm_ext: x must have at least one channel");
  check_intercept(intercept, x, "x");
  const EncodePath path = encode_path_for(dtype, num_codewords, k);
  const int64_t num_candidates = screen_candidates(k);

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bias = intercept_as_float(intercept);

  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  auto values = at::empty({n, h, w, k}, x.options());
  auto indices = at::empty({n, h, w, k}, x.options().dtype(at::kLong));
  at::Tensor partials = at::empty({0}, x.options().dtype(at::kFloat));
  if (n * h * w == 0) {
    return {values, indices, partials};
  }
  if (path == EncodePath::kFused) {
    encode_fused(x, dictionary, bias, k, values, indices,
                 with_loss ? &partials : nullptr, stream);
    return {values, indices, partials};
  }
  if (path == EncodePath::kScreened) {
    encode_screened(x, dictionary, bias, k, num_candidates, values, indices,
                    stream);
  } else {
    encode_by_gemm(x, dtype, dictionary, bias, k, values, indices, stream);
  }
  if (with_loss) {
    // Rebuilt from the written (dtype-rounded) values, as the fused kernel
    // and the reference do.
    partials = at::empty(
        {srm_cuda::residual_square_sums_num_blocks(n * h * w)},
        x.options().dtype(at::kFloat));
    const at::Tensor coef = values.to(at::kFloat).contiguous();
    const at::Tensor dict_t = transposed_dictionary(dictionary);
    check_launch(srm_cuda::launch_residual_square_sums(
                     coef.data_ptr<float>(), indices.data_ptr<int64_t>(), k,
                     dict_t.data_ptr(), dtype, num_codewords,
                     feature_map(x, "x"), partials.data_ptr<float>(), stream),
                 "residual_square_sums");
  }
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
  check_intercept(intercept, x, "x");
  check_on_device(grad_values, "grad_values", x);
  check_same_dtype(grad_values, "grad_values", values, "values");
  TORCH_CHECK(grad_values.sizes() == values.sizes(),
              "srm_ext: grad_values must have the shape of values (",
              values.sizes(), "), got ", grad_values.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor vals = values.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor grad_vals = grad_values.contiguous();
  const bool want_codewords =
      output_mask[0] || values.scalar_type() != at::kFloat;
  const at::Tensor dict_t =
      want_codewords ? transposed_dictionary(dictionary) : at::Tensor();

  // gp = d pre for every kept entry.
  const at::Tensor grad_pre =
      pre_activation_grad(grad_vals, vals, idx, x, dict_t, intercept, stream);

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
        dictionary_grad(x, grad_pre, nullptr, nullptr, idx, dictionary,
                        dictionary.scalar_type(), stream);
  }
  if (output_mask[2]) {
    grad_intercept = intercept_grad(grad_pre, x, stream);
  }
  return {grad_x, grad_dictionary, grad_intercept};
}

// A sparse code on CUDA and a (D, K) dictionary of its dtype, within the
// decode kernels' limits: the inputs both decode ops share.
void check_decode_args(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& dictionary) {
  TORCH_CHECK(values.is_cuda(), "srm_ext: values must be a CUDA tensor");
  check_dim(dictionary, 2, "dictionary", "(D, K)");
  check_sparse_code(values, indices, values, dictionary.size(1));
  check_dictionary(dictionary, dictionary.size(0), values, "values");
  check_sparse_kernel_limits(dictionary, values.size(3));
}

at::Tensor sparse_decode(const at::Tensor& values, const at::Tensor& indices,
                         const at::Tensor& dictionary) {
  check_decode_args(values, indices, dictionary);

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The decode kernels pass over an index outside [0, K); a code from
  // anywhere but sparse_encode gets an error instead, as from the CPU op
  // (srm_ext.sparse_decode leaves this check to the op).
  if (indices.numel() > 0) {
    const int64_t num_codewords = dictionary.size(1);
    const at::Tensor outside =
        at::logical_or(indices < 0, indices >= num_codewords).any();
    check_error_flag(outside.to(at::kInt).reshape({1}),
                     "srm_ext: sparse_decode: indices must lie in [0, ",
                     num_codewords, ")");
  }
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
  check_decode_args(values, indices, dictionary);
  check_on_device(grad_output, "grad_output", values);
  check_same_dtype(grad_output, "grad_output", values, "values");
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
  const at::Tensor idx = indices.contiguous();

  at::Tensor grad_values = empty_gradient(values);
  at::Tensor grad_dictionary = empty_gradient(values);
  if (output_mask[0]) {
    grad_values = codeword_dots(grad_output, idx,
                                transposed_dictionary(dictionary), nullptr,
                                stream)
                      .to(values.scalar_type());
  }
  if (output_mask[1]) {
    const at::Tensor coef = values.to(at::kFloat).contiguous();
    grad_dictionary = dictionary_grad(grad_output, coef, nullptr, nullptr, idx,
                                      dictionary, dictionary.scalar_type(),
                                      stream);
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
  check_intercept(intercept, x, "x");
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) {
    return {empty_gradient(x), empty_gradient(x), empty_gradient(x)};
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t depth = x.size(1), k = values.size(3);
  const int64_t elements = x.numel();
  const at::Tensor dict_t = transposed_dictionary(dictionary);
  const at::Tensor upstream =
      grad_loss.to(x.device(), at::kFloat).reshape({1}).contiguous();
  const float mean_scale =
      elements > 0 ? static_cast<float>(2.0 / static_cast<double>(elements))
                   : 0.0f;

  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : empty_gradient(x);
  // With one range of codewords per block of the atomic dictionary gradient,
  // both gradients rebuild the residual g where they need it, so g is never
  // stored. Past it (each range would rebuild g again) and for the
  // deterministic reductions, g is stored once per box.
  const bool store_residual =
      (output_mask[0] || output_mask[1]) &&
      (dictionary.size(1) > srm_cuda::kSliceCodewords ||
       at::globalContext().deterministicAlgorithms());
  // (K, D) float32, added to by every box when the residual is rebuilt.
  const at::Tensor grad_dictionary_t =
      !store_residual && output_mask[1]
          ? at::zeros({dictionary.size(1), depth},
                      x.options().dtype(at::kFloat))
          : at::Tensor();
  // Otherwise summed over the boxes in float32, in box order.
  at::Tensor grad_dictionary_sum, grad_intercept_sum;
  // float32 values are the kept entries' sigmoid; 16-bit ones have it
  // recomputed from x's pre-activations plus this intercept (KeptSigmoid).
  const at::Tensor sigmoid_intercept = values.scalar_type() == at::kFloat
                                           ? at::Tensor()
                                           : intercept_as_float(intercept);

  for (const PixelBox& box :
       pixel_boxes(x, box_values(kBackwardBoxValues) / (depth + 3 * k))) {
    const at::Tensor xb = box.of_map(x);
    const at::Tensor vals = box.of_code(values);
    const at::Tensor idx = box.of_code(indices);
    const at::Tensor coef_values = vals.to(at::kFloat).contiguous();
    const KeptSigmoid sigmoid{
        sigmoid_intercept.defined() ? at::Tensor() : coef_values,
        sigmoid_intercept};
    // g = 2 * grad_loss / M * (x_hat - x), and gp = <g_p, C[:, idx]> s (1 - s)
    // for every kept entry.
    at::Tensor grad_pre;
    if (!store_residual) {
      grad_pre = residual_entry_dots(coef_values, idx, dict_t, xb, upstream,
                                     mean_scale, sigmoid, nullptr, stream);
      const at::Tensor grad_x_box =
          output_mask[0] ? box.of_map(grad_x) : at::Tensor();
      // grad_x = -g_p + sum_j gp_pj C[:, idx_pj]; the dictionary gets
      // v_pj g_p (through x_hat) + gp_pj x_p (through the encoder).
      residual_gradients(xb, coef_values, grad_pre, idx, dict_t, upstream,
                         mean_scale, output_mask[0] ? &grad_x_box : nullptr,
                         output_mask[1] ? &grad_dictionary_t : nullptr,
                         stream);
    } else {
      const at::Tensor g =
          empty_pixel_major_float(box.nc, depth, box.hc, box.wc, x);
      grad_pre = residual_entry_dots(coef_values, idx, dict_t, xb, upstream,
                                     mean_scale, sigmoid, &g, stream);
      if (output_mask[0]) {
        combine_codewords(grad_pre, idx, dict_t, &g, -1.0f, nullptr, 1.0f,
                          box.of_map(grad_x), stream);
      }
      if (output_mask[1]) {
        const at::Tensor part =
            dictionary_grad(xb, grad_pre, &g, &coef_values, idx, dictionary,
                            at::kFloat, stream);
        grad_dictionary_sum = grad_dictionary_sum.defined()
                                  ? grad_dictionary_sum.add_(part)
                                  : part;
      }
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
  if (grad_dictionary_t.defined()) {
    grad_dictionary = dictionary_grad_from_partials(
        grad_dictionary_t, dictionary, dictionary.scalar_type(), stream);
  } else if (output_mask[1]) {
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

}  // namespace
}  // namespace srm_ext::cuda_ops

TORCH_LIBRARY_IMPL(srm_ext, CUDA, m) {
  m.impl("sparse_encode", &srm_ext::cuda_ops::sparse_encode);
  m.impl("sparse_encode_backward", &srm_ext::cuda_ops::sparse_encode_backward);
  m.impl("sparse_decode", &srm_ext::cuda_ops::sparse_decode);
  m.impl("sparse_decode_backward", &srm_ext::cuda_ops::sparse_decode_backward);
  m.impl("reconstruction_loss", &srm_ext::cuda_ops::reconstruction_loss);
  m.impl("reconstruction_loss_backward", &srm_ext::cuda_ops::reconstruction_loss_backward);
}
