// What the CUDA operator implementations (teacher_ops.cpp, student_ops.cpp)
// share: argument checks, conversions between ATen tensors and the kernels'
// raw views (srm_kernels.h), and composite steps that several ops use.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "srm_kernels.h"

namespace srm_ext::cuda_ops {

using srm_cuda::Dtype;
using srm_cuda::FeatureMap;

// Checks: each error names the argument (or kernel) and what was expected.

void check_launch(cudaError_t err, const char* kernel);

Dtype kernel_dtype(at::ScalarType type, const char* name);

void check_on_device(const at::Tensor& t, const char* name,
                     const at::Tensor& ref);

void check_dim(const at::Tensor& t, int64_t dim, const char* name,
               const char* shape);

void check_same_dtype(const at::Tensor& t, const char* name,
                      const at::Tensor& ref, const char* ref_name);

// (D, K) dictionary matching feature dimension `depth` and dtype of `ref`.
void check_dictionary(const at::Tensor& dictionary, int64_t depth,
                      const at::Tensor& ref, const char* ref_name);

// D, K and k within what the sparse encode/decode kernels support
// (srm_kernels.h). The labels check K alone (the same maximum); the
// student-side loss has no such limits.
void check_sparse_kernel_limits(const at::Tensor& dictionary, int64_t k);

// values (N, H, W, k) and int64 indices of the same shape, with
// 1 <= k <= num_codewords (a code keeps distinct codewords). The indices'
// range is not read here, which would synchronise with the device: the
// kernels skip an entry outside [0, K) (sparse_labels flags it).
void check_sparse_code(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& ref, int64_t num_codewords);

// x (N, D, H, W) on CUDA, its (D, K) dictionary, and a sparse code of its
// pixels: the inputs every backward op of the encoder shares.
void check_code_of_x(const at::Tensor& x, const at::Tensor& dictionary,
                     const at::Tensor& values, const at::Tensor& indices);

// A one-element intercept on ref's device, in ref's dtype (as on the CPU,
// where the features, dictionary and intercept share one dtype).
void check_intercept(const at::Tensor& intercept, const at::Tensor& ref,
                     const char* ref_name);

// An intercept that check_intercept passed, as the one-element float32
// tensor the kernels read.
at::Tensor intercept_as_float(const at::Tensor& intercept);

FeatureMap feature_map(const at::Tensor& t, const char* name);

// Float32 (N, D, H, W) view over pixel-major storage (channels contiguous),
// the layout the kernels walk fastest per pixel.
at::Tensor empty_pixel_major_float(int64_t n, int64_t d, int64_t h, int64_t w,
                                   const at::Tensor& ref);

at::Tensor empty_gradient(const at::Tensor& ref);

// The int error flags a kernel set, read back to the host. Reading them
// synchronises with the device, which a stream under CUDA graph capture must
// not do; there nothing is read (nullopt) and the kernels' fallback for a bad
// entry (it is ignored) stands.
inline std::optional<std::vector<int>> error_flags_on_host(
    const at::Tensor& flags) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() !=
      c10::cuda::CaptureStatus::None) {
    return std::nullopt;
  }
  const at::Tensor host = flags.cpu();
  const int* first = host.data_ptr<int>();
  return std::vector<int>(first, first + host.numel());
}

// Raises `message` as a ValueError (a value out of range, as on the CPU) when
// a kernel set its one int flag.
template <typename... Message>
void check_error_flag(const at::Tensor& flag, const Message&... message) {
  const auto flags = error_flags_on_host(flag);
  TORCH_CHECK_VALUE(!flags || (*flags)[0] == 0, message...);
}

// 0-dim float32 tensor: scale * sum(input), summed in a fixed order.
at::Tensor deterministic_sum(const at::Tensor& input, double scale,
                             cudaStream_t stream);

// Transposed (K, D) contiguous copy of the dictionary: one codeword per row.
at::Tensor transposed_dictionary(const at::Tensor& dictionary);

// The dictionary gradient in the dictionary's own layout (at::empty_like; the
// gradient's dtype), which is what the fake kernels promise for every backend.
at::Tensor laid_out_like(const at::Tensor& grad, const at::Tensor& dictionary);

// Gradient of the dictionary, laid out like it, in grad_dtype:
//   G[:, c] = sum over (p, j) with indices[p, j] == c of
//             coef_a[p, j] * features_a[p] + coef_b[p, j] * features_b[p]
// (b term optional, float32). Deterministic when torch asks for it.
at::Tensor dictionary_grad(const at::Tensor& features_a,
                           const at::Tensor& coef_a,
                           const at::Tensor* features_b,
                           const at::Tensor* coef_b,
                           const at::Tensor& indices,
                           const at::Tensor& dictionary,
                           at::ScalarType grad_dtype, cudaStream_t stream);

// A (K, D) float32 dictionary gradient, or (S, K, D) partials summed over S
// in order, as a gradient laid out like `dictionary` in grad_dtype.
at::Tensor dictionary_grad_from_partials(const at::Tensor& partials,
                                         const at::Tensor& dictionary,
                                         at::ScalarType grad_dtype,
                                         cudaStream_t stream);

// Gradient of the shared intercept: the sum of the kept pre-activation
// gradients, 0-dim in x's dtype.
at::Tensor intercept_grad(const at::Tensor& grad_pre, const at::Tensor& x,
                          cudaStream_t stream);

// out (N, D, H, W, any strides) = host_scale * device_scale[0]
//   * (sum_j coef[p, j] * C[:, indices[p, j]] + addend_scale * addend).
void combine_codewords(const at::Tensor& coef, const at::Tensor& indices,
                       const at::Tensor& dictionary_t, const at::Tensor* addend,
                       float addend_scale, const at::Tensor* device_scale,
                       float host_scale, const at::Tensor& out,
                       cudaStream_t stream);

// The sigmoid s of every kept entry of a code of x, whose s (1 - s) scales
// the entry dots of the passes below: float32 values are s; 16-bit values
// are rounded (see pre_activation_grad), so s is recomputed there from x's
// pre-activations plus the intercept, in the pass that reads x anyway.
struct KeptSigmoid {
  at::Tensor values;     // (N, H, W, k) float32, or undefined
  at::Tensor intercept;  // (1,) float32 when values is undefined
};

// The entry dots <g_p, C[:, indices[p, j]]> s (1 - s) of the reconstruction
// loss's residual
// g = host_scale * device_scale[0] * (sum_j coef[p, j] C[:, indices[p, j]] - x),
// the kept entries' s from `sigmoid`, in one pass that also writes g to a
// float32 `residual` when given (otherwise g is never stored).
at::Tensor residual_entry_dots(const at::Tensor& coef,
                               const at::Tensor& indices,
                               const at::Tensor& dictionary_t,
                               const at::Tensor& x,
                               const at::Tensor& device_scale,
                               float host_scale, const KeptSigmoid& sigmoid,
                               const at::Tensor* residual,
                               cudaStream_t stream);

// grad_x (when given, x's layout) and the (K, D) float32 dictionary gradient
// (when given, added to) of the reconstruction loss through that residual,
// rebuilt from x and the code (srm_cuda::launch_residual_gradients).
void residual_gradients(const at::Tensor& x, const at::Tensor& coef,
                        const at::Tensor& grad_pre, const at::Tensor& indices,
                        const at::Tensor& dictionary_t,
                        const at::Tensor& device_scale, float host_scale,
                        const at::Tensor* grad_x,
                        const at::Tensor* grad_dictionary_t,
                        cudaStream_t stream);

// (N, H, W, k) float32: <features_p, C[:, indices[p, j]]>, times s (1 - s)
// when the kept entries' float32 sigmoid s is given. pixel_norms, when not
// null, is set to the (N, H, W) float32 norms |features_p| from the same pass.
at::Tensor codeword_dots(const at::Tensor& features, const at::Tensor& indices,
                         const at::Tensor& dictionary_t,
                         const at::Tensor* sigmoid, cudaStream_t stream,
                         at::Tensor* pixel_norms = nullptr);

// The float32 gradient of every kept entry's pre-activation,
// grad_values * s (1 - s) with s the entry's float32 sigmoid. float32 values
// are s. 16-bit values are rounded, to exactly 1 once the pre-activation
// passes about 8 (float16) or 6 (bfloat16), which would stop their gradient;
// for them s is recomputed from the pre-activation <x_p, C[:, idx]> + b,
// which is what the reference's autograd keeps. grad_values, values and
// indices are contiguous, grad_values in values' dtype.
at::Tensor pre_activation_grad(const at::Tensor& grad_values,
                               const at::Tensor& values,
                               const at::Tensor& indices, const at::Tensor& x,
                               const at::Tensor& dictionary_t,
                               const at::Tensor& intercept,
                               cudaStream_t stream);

// a @ b for a (M, D) or batched (B, M, D) and b (D, K) of the same dtype,
// accumulated and returned in float32 by cuBLAS. 16-bit inputs stay 16-bit
// on the way into the tensor cores where torch has the products with an
// output dtype (2.8 on); float32 follows torch's TF32 setting, as any torch
// matmul does.
at::Tensor float_product(const at::Tensor& a, const at::Tensor& b);

// a @ b for a batch a (B, M, D) and b (D, K), both float32, on TF32 tensor
// cores whatever torch's TF32 setting (the screened encode's ranking; its
// error is bounded by srm_cuda::tf32_error_bound). Returns (B, M, K)
// float32. a and b are read in place where one of their two inner strides
// is 1, as NCHW and channels_last boxes and either dictionary layout are.
at::Tensor tf32_product(const at::Tensor& a, const at::Tensor& b);

// How the encode runs, from SRM_EXT_CUDA_ENCODE (other values are refused
// by name):
//   auto (default), gemm  a cuBLAS GEMM per box of pixels writes the
//                         pre-activations, the row-wise selection keeps the
//                         top k;
//   fused                 one kernel does both, no pre-activation buffer;
//   screened              for float32, a TF32 GEMM ranks, each pixel's best
//                         few are scored exactly and the exact top k is kept
//                         where TF32's error bound certifies it (other pixels
//                         are encoded exactly in full); 16-bit inputs, and
//                         float32 where TF32 is already allowed or where the
//                         candidates would be every codeword or no more
//                         than k, take the GEMM.
// Deterministic mode takes the fused kernel, where torch would demand
// CUBLAS_WORKSPACE_CONFIG of the GEMM.
enum class EncodePath { kGemm, kFused, kScreened };
EncodePath encode_path();
const char* encode_path_name(EncodePath path);
// The path an encode of K = num_codewords and k takes in `dtype`:
// encode_path(), or the GEMM where the screen is asked for but does not run.
EncodePath encode_path_for(Dtype dtype, int64_t num_codewords, int64_t k);
// Candidates per pixel that the screened encode scores exactly.
int64_t screen_candidates(int64_t k);

// Ops that walk x in boxes of pixels keep a float32 workspace of a few values
// per pixel: the GEMM encode K pre-activations, the backward of the fused
// loss about D + 3k (the residual and per-entry terms). Each box holds at
// most about `default_values` workspace values, so memory stays bounded
// whatever the size of x. SRM_EXT_CUDA_BOX_VALUES overrides every budget, so
// that tests can cover many boxes with small inputs.
int64_t box_values(int64_t default_values);
constexpr int64_t kEncodeBoxValues = int64_t{1} << 23;    // 32 MiB
constexpr int64_t kBackwardBoxValues = int64_t{1} << 26;  // 256 MiB

// A box of pixels [n0, n0 + nc) x [h0, h0 + hc) x [w0, w0 + wc): whole
// images, whole rows of one image, or part of one row, so its part of a
// contiguous (N, H, W, k) code is contiguous too.
struct PixelBox {
  int64_t n0, nc, h0, hc, w0, wc;

  at::Tensor of_map(const at::Tensor& t) const {  // (N, C, H, W)
    return t.narrow(0, n0, nc).narrow(2, h0, hc).narrow(3, w0, wc);
  }
  at::Tensor of_code(const at::Tensor& t) const {  // (N, H, W, k)
    return t.narrow(0, n0, nc).narrow(1, h0, hc).narrow(2, w0, wc).contiguous();
  }
  // Its pixels as rows [first_row, first_row + num_rows) of a (P, k) code
  // of an H x W map.
  int64_t first_row(int64_t h, int64_t w) const { return (n0 * h + h0) * w + w0; }
  int64_t num_rows() const { return nc * hc * wc; }
};

// Boxes covering x's pixels, each with at most max_pixels pixels (at least
// one): as many whole images as fit, else as many whole rows of one image,
// else parts of one row. None when x has no pixels.
std::vector<PixelBox> pixel_boxes(const at::Tensor& x, int64_t max_pixels);

}  // namespace srm_ext::cuda_ops
