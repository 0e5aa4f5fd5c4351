// Host-side launcher API of the srm_ext CUDA kernels.
//
// The kernels (csrc/cuda/*.cu) are compiled by nvcc without any torch header;
// this plain C++ header is the only contract between them and the ATen glue
// (op_support.cpp, teacher_ops.cpp, student_ops.cpp). Every launcher enqueues
// its work on `stream`, never synchronises, and returns the first CUDA error
// it saw (a bad argument is reported as cudaErrorInvalidValue).
//
// Conventions:
//   * A pixel p = (n, h, w) is numbered in row-major order n, h, w, so that
//     p = (n * H + h) * W + w and there are P = N * H * W pixels.
//   * Feature maps (N, D, H, W) are read and written through explicit element
//     strides (FeatureMap), so NCHW, channels_last and other strided views work
//     without copies.
//   * Sparse codes are (P, k) row-major: values in the feature dtype, indices
//     int64. Per-entry float buffers (coefficients, dot products) use the same
//     (P, k) layout.
//   * A "transposed dictionary" is the (K, D) row-major copy of the (D, K)
//     dictionary, so that a codeword is one contiguous row.
//   * All arithmetic accumulates in float32.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace srm_cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Limits of the kernels; the glue rejects larger problems with a clear error.
constexpr int64_t kMaxTopK = 128;
constexpr int64_t kMaxCodewords = 8192;
constexpr int64_t kMaxFeatureDim = 4096;
// Most codewords one block of the atomic dictionary-gradient kernels holds
// (their slice of it fills 64 KiB of shared memory; GPUs that give a block
// less hold fewer). Larger dictionaries are split into ranges of codewords.
constexpr int64_t kSliceCodewords = 512;

// Sizes and element strides of an (N, D, H, W) feature map.
struct FeatureMapLayout {
  int64_t n, d, h, w;
  int64_t stride_n, stride_d, stride_h, stride_w;
};

// A feature map in memory. `data` is only written by launchers that document
// the map as an output.
struct FeatureMap {
  void* data;
  Dtype dtype;
  FeatureMapLayout layout;
};

// ---------------------------------------------------------------------------
// Sparse encoding (encode.cu)
// ---------------------------------------------------------------------------

// Number of thread blocks launch_sparse_encode uses for `num_pixels` pixels,
// i.e. the length of its `loss_partials` output.
int64_t sparse_encode_num_blocks(int64_t num_pixels);

// For every pixel p, pre = dictionary^T x_p + intercept[0]; keeps the k largest
// pre-activations (NaN above +inf, ties to the lower codeword index), sorted
// descending, and writes values = sigmoid(pre) in x's dtype and the codeword
// indices. The GEMM is fused with the selection: no (P, K) buffer exists.
//   dictionary      (D, K) row-major, x's dtype
//   intercept       one float32 on the device
//   use_tensor_cores  TF32 MMA for float32, bf16/fp16 MMA for 16-bit inputs;
//                   false selects exact float32 FMA for every dtype
//   loss_partials   optional (sparse_encode_num_blocks(P) floats): when not
//                   null, block b also writes the sum over its pixels and
//                   channels of (x_hat - x)^2, x_hat rebuilt from the written
//                   (dtype-rounded) values; reduce them in order with
//                   launch_deterministic_sum.
cudaError_t launch_sparse_encode(const FeatureMap& x, const void* dictionary,
                                 int64_t num_codewords, const float* intercept,
                                 int64_t k, bool use_tensor_cores, void* values,
                                 int64_t* indices, float* loss_partials,
                                 cudaStream_t stream);

// ---------------------------------------------------------------------------
// Row-wise selection (select.cu): the second half of the GEMM encode path
// ---------------------------------------------------------------------------

// For each of `rows` rows of float32 pre-activations (row r at
// pre + r * row_stride, num_codewords entries, intercept not yet added) keeps
// the k largest pre[r, c] + intercept[0] in launch_sparse_encode's order and
// writes values = sigmoid(pre) in `dtype` and the codeword indices, (rows, k)
// row-major each. Paired with a GEMM that writes a bounded box of pixels'
// pre-activations at a time, this is the encode without its fusion.
cudaError_t launch_select_top_k(const float* pre, int64_t rows,
                                int64_t row_stride, int64_t num_codewords,
                                const float* intercept, int64_t k, Dtype dtype,
                                void* values, int64_t* indices,
                                cudaStream_t stream);

// The same selection for the screened encode (screen.cu), where `pre` is a
// TF32 approximation: keeps each row's best num_candidates codewords as
// candidates for an exact rescoring, writing only their indices (rows,
// num_candidates) and, as cutoff[r], the last one's pre-activation
// pre[r, c] + intercept[0].
cudaError_t launch_select_candidates(const float* pre, int64_t rows,
                                     int64_t row_stride,
                                     int64_t num_codewords,
                                     const float* intercept,
                                     int64_t num_candidates,
                                     int64_t* candidates, float* cutoff,
                                     cudaStream_t stream);

// ---------------------------------------------------------------------------
// Screened encode, float32 (screen.cu): a TF32 GEMM ranks every codeword,
// launch_select_candidates keeps each pixel's best few, launch_codeword_dots
// scores them exactly (and gives the pixels' norms), and launch_certify_top_k
// keeps the exact top k where TF32's error bound proves that no other
// codeword can reach it. The other pixels are listed and encoded exactly in
// full by launch_exact_rows_top_k.
// ---------------------------------------------------------------------------

// Bound on |TF32 product - exact float32 product| of a D-long dot product
// <x_p, C[:, c]>: relative * |x_p| |C|max + underflow * (|x_p| + |C|max + 2),
// Euclidean norms, |C|max the largest codeword's. The relative term covers
// operands rounded (or truncated) to 10 mantissa bits, products accumulated
// in float32 in any order, and the exact dot's own float32 rounding; the
// underflow term, subnormal operands, products and partial sums flushed to
// zero (as tensor cores may), at most 2^-126 per element and per addition.
// Each has a factor 2 to spare. The norms are float32 sums of squares, which
// underflow too (features of 2^-76 square to 0): norm_floor, added to each,
// makes them bounds of the true norms, at most 2^-126 lost per square and
// per addition.
struct Tf32ErrorBound {
  float relative;
  float underflow;
  float norm_floor;
};

inline Tf32ErrorBound tf32_error_bound(int64_t depth) {
  const float d = static_cast<float>(depth);
  return {0x1p-8f + d * 0x1p-21f, d * 0x1p-125f, std::sqrt(2.0f * d) * 0x1p-63f};
}

// For `rows` pixels with `num_candidates` candidates each (rows, c) and
// their exact dots <x_p, C[:, candidate]> (rows, c) float32: writes the top
// k of dot + intercept[0] in launch_sparse_encode's order, values as the
// sigmoid (float32) and indices, (rows, k) each. A pixel is certified when
// its k-th best exceeds cutoff[r] (launch_select_candidates) by more than
// the error bound for |x_p| = pixel_norms[r] and |C|max =
// codeword_norm_max[0], which no codeword outside the candidates can (NaN and
// infinity never certify); the row first_row + r of every other pixel is
// appended to fallback_rows, counted by *fallback_count (an int64 the caller
// zeroed), for launch_exact_rows_top_k.
cudaError_t launch_certify_top_k(const float* dots, const int64_t* candidates,
                                 const float* cutoff, int64_t rows,
                                 int64_t num_candidates,
                                 const float* pixel_norms,
                                 const float* codeword_norm_max,
                                 Tf32ErrorBound error, const float* intercept,
                                 int64_t k, float* values, int64_t* indices,
                                 int64_t first_row, int64_t* fallback_rows,
                                 int64_t* fallback_count, cudaStream_t stream);

// The exact encode of the pixels that launch_certify_top_k could not
// certify: for each of the first *fallback_count entries p of fallback_rows,
// every <x_p, dictionary_t[c, :]> in float32, and the top k written to
// values (float32 sigmoid) and indices at row p, as launch_sparse_encode
// orders them. x is float32, dictionary_t (K, D) float32; the launch covers
// at most max_rows listed pixels.
cudaError_t launch_exact_rows_top_k(const FeatureMap& x,
                                    const float* dictionary_t,
                                    int64_t num_codewords,
                                    const int64_t* fallback_rows,
                                    const int64_t* fallback_count,
                                    int64_t max_rows, const float* intercept,
                                    int64_t k, float* values, int64_t* indices,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------
// Codeword gathers and dot products (decode.cu)
// ---------------------------------------------------------------------------

// out[p, :] = host_scale * (device_scale ? device_scale[0] : 1)
//             * (sum_j coef[p, j] * dictionary_t[indices[p, j], :]
//                + addend_scale * addend[p, :])
// dictionary_t is (K, D) in `dictionary_dtype`; out and the optional addend
// have dtype dictionary_dtype or float32 and any strides. Out-of-range
// indices contribute nothing. D and P come from out.layout.
// entry_dots (optional, (P, k) float32, k <= kMaxTopK, out float32): in the
// same pass, entry_dots[p, j] = <out[p, :], dictionary_t[indices[p, j], :]>
// (0 for out-of-range indices), multiplied by s * (1 - s) with
// s = sigmoid_values[p, j] when sigmoid_values is not null: what
// launch_codeword_dots would give from `out`, without reading it back.
// With addend_intercept (a float32 scalar; needs entry_dots and the addend,
// excludes sigmoid_values) s is instead the sigmoid of the entry's
// pre-activation <addend[p, :], dictionary_t[indices[p, j], :]> +
// addend_intercept[0], that dot summed as launch_codeword_dots sums it.
// With entry_dots, out.data may be null: the combined vectors are then only
// dotted, not stored. An empty out (no pixels or no channels) may have a null
// data pointer too.
cudaError_t launch_combine_codewords(
    const float* coef, const int64_t* indices, int64_t k,
    const void* dictionary_t, Dtype dictionary_dtype, int64_t num_codewords,
    const FeatureMap* addend, float addend_scale, const float* device_scale,
    float host_scale, const FeatureMap& out, const float* sigmoid_values,
    const float* addend_intercept, float* entry_dots, cudaStream_t stream);

// Number of thread blocks launch_residual_square_sums uses for `num_pixels`
// pixels, i.e. the length of its `partials` output.
int64_t residual_square_sums_num_blocks(int64_t num_pixels);

// partials[b] = sum over block b's pixels p and channels d of
// (sum_j coef[p, j] * dictionary_t[indices[p, j], d] - x[p, d])^2: the
// squared residual of a decoding (launch_combine_codewords with x as the
// addend at scale -1) without forming it. x has dtype dictionary_dtype or
// float32 and at least one channel; reduce the partials in order with
// launch_deterministic_sum.
cudaError_t launch_residual_square_sums(const float* coef,
                                        const int64_t* indices, int64_t k,
                                        const void* dictionary_t,
                                        Dtype dictionary_dtype,
                                        int64_t num_codewords,
                                        const FeatureMap& x, float* partials,
                                        cudaStream_t stream);

// out[p, j] = <features[p, :], dictionary_t[indices[p, j], :]>, multiplied by
// s * (1 - s) with s = sigmoid_values[p, j] when sigmoid_values is not null,
// and, when pixel_norms is not null, pixel_norms[p] = |features[p, :]|
// (Euclidean, float32) from the same read of the features. features has
// dtype dictionary_dtype or float32 and any strides; sigmoid_values is
// (P, k) float32 (the kept entries' sigmoid, unrounded); out is (P, k)
// float32.
cudaError_t launch_codeword_dots(const FeatureMap& features,
                                 const int64_t* indices, int64_t k,
                                 const void* dictionary_t,
                                 Dtype dictionary_dtype, int64_t num_codewords,
                                 const float* sigmoid_values, float* out,
                                 float* pixel_norms, cudaStream_t stream);

// out[p, j] = grad_values[p, j] * s * (1 - s), s = sigmoid(<features[p, :],
// dictionary_t[indices[p, j], :]> + intercept[0]), that dot summed as
// launch_codeword_dots sums it: the gradient of every kept entry's
// pre-activation when the values are too rounded to give s (16-bit). features
// has dtype dictionary_dtype or float32 and any strides; grad_values is
// (P, k) in dictionary_dtype (null only when P * k = 0); intercept is a
// float32 scalar; out is (P, k) float32.
cudaError_t launch_recomputed_sigmoid_backward(
    const void* grad_values, const FeatureMap& features,
    const int64_t* indices, int64_t k, const void* dictionary_t,
    Dtype dictionary_dtype, int64_t num_codewords, const float* intercept,
    float* out, cudaStream_t stream);

// out[i] = grad_values[i] * sigmoid[i] * (1 - sigmoid[i]) in float32: the
// gradient of the pre-activation of every kept entry. grad_values has
// grad_dtype; sigmoid is float32.
cudaError_t launch_sigmoid_backward(const void* grad_values,
                                    Dtype grad_dtype, const float* sigmoid,
                                    int64_t count, float* out,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------
// Dictionary gradients (dictionary_grad.cu)
// ---------------------------------------------------------------------------
//
// Both variants compute, for every codeword c,
//   G[c, :] = sum over entries (p, j) with indices[p, j] == c of
//             coef_a[p, j] * features_a[p, :] + coef_b[p, j] * features_b[p, :]
// where the b term is optional (features_b null) and features_b is float32.
// features_a has the dictionary dtype; both maps have any strides and the same
// N, D, H, W. Out-of-range indices are skipped.

// Fast path: float atomics into grad_dictionary_t (K, D) float32, which the
// caller zero-fills. Summation order is not deterministic.
cudaError_t launch_scatter_codewords_atomic(
    const FeatureMap& features_a, const float* coef_a,
    const FeatureMap* features_b, const float* coef_b, const int64_t* indices,
    int64_t k, int64_t num_codewords, float* grad_dictionary_t,
    cudaStream_t stream);

// The reconstruction loss's gradients for x and the dictionary through its
// residual, rebuilding the residual instead of reading it:
//   g_p      = host_scale * (device_scale ? device_scale[0] : 1)
//              * (sum_j coef[p, j] * dictionary_t[indices[p, j], :] - x_p)
//   grad_x_p = sum_j grad_pre[p, j] * dictionary_t[indices[p, j], :] - g_p
//   G[c, :] += grad_pre[p, j] * x_p + coef[p, j] * g_p  per entry of codeword c
// x and dictionary_t ((K, D)) share a dtype; grad_x (optional) has x's dtype
// and shape and any strides; grad_dictionary_t (optional) is (K, D) float32,
// added to with float atomics as by launch_scatter_codewords_atomic. coef and
// grad_pre are (P, k) float32, 1 <= k <= kMaxTopK; out-of-range indices
// contribute nothing. g and grad_x are bitwise what launch_combine_codewords
// gives when it stores g (x as the addend at scale -1) and then adds
// grad_pre's codewords to -g. With the dictionary gradient, each residual is
// rebuilt once per range of up to kSliceCodewords codewords: past one range,
// storing it moves less.
cudaError_t launch_residual_gradients(
    const FeatureMap& x, const float* coef, const float* grad_pre,
    const int64_t* indices, int64_t k, const void* dictionary_t,
    int64_t num_codewords, const float* device_scale, float host_scale,
    const FeatureMap* grad_x, float* grad_dictionary_t, cudaStream_t stream);

// run_offsets[c] = first position of codeword c in sorted_codes (ascending,
// num_entries long), for c in [0, K]; entries outside [0, K) fall outside
// every run.
cudaError_t launch_codeword_run_offsets(const int64_t* sorted_codes,
                                        int64_t num_entries,
                                        int64_t num_codewords,
                                        int64_t* run_offsets,
                                        cudaStream_t stream);

// Deterministic path. entry_order lists the flat entries p * k + j grouped by
// codeword (a stable sort of the flattened indices) and run_offsets comes from
// launch_codeword_run_offsets. Each codeword's run is split into
// num_segments contiguous parts that are summed in order; part s of codeword
// c goes to segment_partials[(s * K + c) * D + d] (num_segments * K * D
// floats, fully overwritten).
cudaError_t launch_scatter_codewords_sorted(
    const FeatureMap& features_a, const float* coef_a,
    const FeatureMap* features_b, const float* coef_b,
    const int64_t* entry_order, const int64_t* run_offsets, int64_t k,
    int64_t num_codewords, int64_t num_segments, float* segment_partials,
    cudaStream_t stream);

// grad_dictionary[d, c] (`dtype`) = sum over s in order of
// segment_partials[(s * K + c) * D + d], stored (D, K) row-major, or (K, D)
// row-major when codeword_major (the layout of a dictionary that is the
// transpose of a contiguous (K, D) tensor). With num_segments == 1 this turns
// the (K, D) float32 result of either scatter into the dictionary's layout.
cudaError_t launch_reduce_dictionary_partials(const float* segment_partials,
                                              int64_t num_segments,
                                              int64_t feature_dim,
                                              int64_t num_codewords,
                                              bool codeword_major,
                                              void* grad_dictionary,
                                              Dtype dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Deterministic reductions (reduce.cu)
// ---------------------------------------------------------------------------

// Length of the float64 workspace launch_deterministic_sum needs.
int64_t deterministic_sum_workspace_size(int64_t count);

// out[0] = scale * sum(input[0:count]) with a summation order that depends
// only on count (float64 accumulation). count == 0 gives 0.
cudaError_t launch_deterministic_sum(const float* input, int64_t count,
                                     double scale, double* workspace,
                                     float* out, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Stage-2 labels and predictor loss (labels.cu, predictor.cu)
// ---------------------------------------------------------------------------

// pixel_labels[p] = indices[p, 0]; image_labels[n, c] = (1 / HW) * sum over
// the image's pixels and entries with index c of the value (N, K row-major,
// `dtype`), summed in a fixed order. Sets error_flag[0] = 1 when an index is
// outside [0, K) (the entry is then ignored).
cudaError_t launch_sparse_labels(const void* values, Dtype dtype,
                                 const int64_t* indices, int64_t batch,
                                 int64_t pixels_per_image, int64_t k,
                                 int64_t num_codewords, int64_t* pixel_labels,
                                 void* image_labels, int* error_flag,
                                 cudaStream_t stream);

// Whether launch_predictor_loss takes these sizes: its grids hold at most
// 2^31 - 1 blocks of pixels (and of image labels).
bool predictor_loss_fits(int64_t batch, int64_t pixels_per_image,
                         int64_t num_codewords);

// Float32 workspace length of launch_predictor_loss.
int64_t predictor_workspace_size(int64_t batch, int64_t pixels_per_image,
                                 int64_t num_codewords);

// On entry `logits` (P, K row-major) holds C_s^T y_p; on exit it holds
// dloss/dz for z = logits + intercept and a unit upstream gradient.
//   local  = mean_p(logsumexp_c q_pc - q_p[label_p]),  q = sigmoid(z)
//   global = mean_{n,c} BCE(mean_hw q, image_labels) with logs clamped at -100
//   loss_out[0] = local_weight * local + global_weight * global
// Everything is float32 whatever the student's dtype (the reference works on
// float32 pre-activations too). pixel_labels is (P,) int64, image_labels
// (N, K). A pixel label outside [0, K) sets error_flag[0] = 1 and drops its
// one-hot term; an image label outside [0, 1] (or NaN) sets error_flag[1] = 1.
// float_workspace: predictor_workspace_size(...) floats;
// sum_workspace: deterministic_sum_workspace_size(max(P, N * K)) doubles.
cudaError_t launch_predictor_loss(float* logits, const float* intercept,
                                  const int64_t* pixel_labels,
                                  const float* image_labels, int64_t batch,
                                  int64_t pixels_per_image,
                                  int64_t num_codewords, float local_weight,
                                  float global_weight, float* float_workspace,
                                  double* sum_workspace, float* loss_out,
                                  int* error_flag, cudaStream_t stream);

}  // namespace srm_cuda
