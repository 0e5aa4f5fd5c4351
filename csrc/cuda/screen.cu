// The last two steps of the screened float32 encode (srm_kernels.h): the
// exact top k of each pixel's TF32-screened candidates, certified by TF32's
// error bound, and the exact encode in full of the pixels it cannot certify.
//
// A pixel's candidates are its best c codewords by the TF32 score t; every
// other codeword c' has t(c') + b at or below the cutoff (the c-th best), and
// its exact score at most TF32's error bound above t(c'). So when
// the exact k-th best among the candidates exceeds cutoff + that bound (with
// a margin for the float32 additions that form it), no codeword outside the
// candidates can rank in the top k, ties included, and the candidates' exact
// top k is the pixel's exact top k.
#include <algorithm>

#include "common.cuh"
#include "topk.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kCertifyThreads = 256;
constexpr int kCertifyWarps = kCertifyThreads / kWarpSize;

// Warp per pixel: the candidates' exact keys are sorted in the warp's list.
__global__ void __launch_bounds__(kCertifyThreads)
    certify_top_k_kernel(const float* __restrict__ dots,
                         const int64_t* __restrict__ candidates,
                         const float* __restrict__ cutoff, int64_t rows,
                         int num_candidates, int list_len,
                         const float* __restrict__ pixel_norms,
                         const float* __restrict__ codeword_norm_max,
                         Tf32ErrorBound error,
                         const float* __restrict__ intercept, int k,
                         float* __restrict__ values,
                         int64_t* __restrict__ indices, int64_t first_row,
                         int64_t* __restrict__ fallback_rows,
                         int64_t* __restrict__ fallback_count) {
  extern __shared__ uint64_t certify_lists[];  // kCertifyWarps * list_len
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  uint64_t* list = certify_lists + static_cast<int64_t>(warp) * list_len;
  const float bias = intercept[0];
  const float norm_max = codeword_norm_max[0] + error.norm_floor;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kCertifyWarps + warp;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kCertifyWarps) {
    const int64_t first = row * num_candidates;
    for (int j = lane; j < list_len; j += kWarpSize) {
      list[j] = j < num_candidates
                    ? make_topk_key(dots[first + j] + bias,
                                    static_cast<uint32_t>(candidates[first + j]))
                    : 0;
    }
    __syncwarp();
    warp_bitonic_sort_descending(list, list_len, lane);
    topk_write_code(list, k, row, lane, values, indices);
    if (lane == 0) {
      const float kth = topk_key_value(list[k - 1]);
      const float norm = pixel_norms[row] + error.norm_floor;
      const float bound = error.relative * norm * norm_max +
                          error.underflow * (norm + norm_max + 2.0f);
      const float limit = cutoff[row];
      // The margin covers the rounding of the sums beside it; the
      // comparison is false for NaN, as for an infinite bound.
      const bool certified =
          kth > limit + (bound * (1.0f + 0x1p-10f) +
                         0x1p-20f * (fabsf(limit) + bound));
      if (!certified) {
        // A 64-bit count: more than 2^31 pixels may fall back.
        const auto slot = atomicAdd(
            reinterpret_cast<unsigned long long*>(fallback_count), 1ull);
        fallback_rows[slot] = first_row + row;
      }
    }
    __syncwarp();  // the list is reused by this warp's next row
  }
}

constexpr int kExactThreads = 256;
constexpr int kExactWarps = kExactThreads / kWarpSize;
constexpr int kTileCodes = 64;

// Block per listed pixel: the pixel is staged in shared memory, each warp
// scores its share of the codewords (lanes over channels, a fixed-order
// warp sum), and warp 0 selects the top k from the scores as the row-wise
// selection does.
__global__ void __launch_bounds__(kExactThreads)
    exact_rows_top_k_kernel(const float* __restrict__ x,
                            FeatureMapLayout layout,
                            const float* __restrict__ dictionary_t,
                            int64_t num_codes,
                            const int64_t* __restrict__ fallback_rows,
                            const int64_t* __restrict__ fallback_count,
                            const float* __restrict__ intercept, int k,
                            int list_len, float* __restrict__ values,
                            int64_t* __restrict__ indices) {
  // list (list_len keys), then scores (num_codes), then the pixel (D).
  extern __shared__ uint64_t exact_shared[];
  uint64_t* list = exact_shared;
  float* scores = reinterpret_cast<float*>(list + list_len);
  float* pixel = scores + num_codes;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t depth = layout.d;
  const float bias = intercept[0];
  const int64_t count = *fallback_count;

  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    const int64_t row = fallback_rows[i];
    __syncthreads();  // the previous pixel's scores are selected
    const float* xp = x + pixel_offset(layout, row);
    for (int64_t d = threadIdx.x; d < depth; d += kExactThreads) {
      pixel[d] = xp[d * layout.stride_d];
    }
    __syncthreads();
    for (int64_t c = warp; c < num_codes; c += kExactWarps) {
      const float* codeword = dictionary_t + c * depth;
      float dot = 0.0f;
      for (int64_t d = lane; d < depth; d += kWarpSize) {
        dot = fmaf(pixel[d], codeword[d], dot);
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        scores[c] = dot;
      }
    }
    __syncthreads();
    if (warp == 0) {
      topk_of_row<kTileCodes>(scores, num_codes, bias, k, list_len, list,
                              lane);
      topk_write_code(list, k, row, lane, values, indices);
    }
  }
}

}  // namespace

cudaError_t launch_certify_top_k(const float* dots, const int64_t* candidates,
                                 const float* cutoff, int64_t rows,
                                 int64_t num_candidates,
                                 const float* pixel_norms,
                                 const float* codeword_norm_max,
                                 Tf32ErrorBound error, const float* intercept,
                                 int64_t k, float* values, int64_t* indices,
                                 int64_t first_row, int64_t* fallback_rows,
                                 int64_t* fallback_count, cudaStream_t stream) {
  if (k < 1 || k > num_candidates || num_candidates > kMaxTopK || rows < 0 ||
      first_row < 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) {
    return cudaSuccess;
  }
  // A power of two for the bitonic sort, at least a warp's worth.
  int list_len = kWarpSize;
  while (list_len < num_candidates) {
    list_len *= 2;
  }
  const size_t list_bytes =
      static_cast<size_t>(kCertifyWarps) * list_len * sizeof(uint64_t);
  const int64_t blocks =
      grid_stride_blocks(ceil_div(rows, kCertifyWarps), int64_t{1} << 16);
  certify_top_k_kernel<<<static_cast<unsigned>(blocks), kCertifyThreads,
                         list_bytes, stream>>>(
      dots, candidates, cutoff, rows, static_cast<int>(num_candidates),
      list_len, pixel_norms, codeword_norm_max, error, intercept,
      static_cast<int>(k), values, indices, first_row, fallback_rows,
      fallback_count);
  return cudaGetLastError();
}

cudaError_t launch_exact_rows_top_k(const FeatureMap& x,
                                    const float* dictionary_t,
                                    int64_t num_codewords,
                                    const int64_t* fallback_rows,
                                    const int64_t* fallback_count,
                                    int64_t max_rows, const float* intercept,
                                    int64_t k, float* values, int64_t* indices,
                                    cudaStream_t stream) {
  const int64_t depth = x.layout.d;
  if (x.dtype != Dtype::kFloat32 || k < 1 || k > kMaxTopK ||
      k > num_codewords || num_codewords > kMaxCodewords || depth < 1 ||
      depth > kMaxFeatureDim || max_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (max_rows == 0) {
    return cudaSuccess;
  }
  const int list_len = topk_list_length(static_cast<int>(k), kTileCodes);
  const size_t shared_bytes = list_len * sizeof(uint64_t) +
                              (num_codewords + depth) * sizeof(float);
  SRM_RETURN_IF_ERROR(allow_dynamic_shared_memory(
      reinterpret_cast<const void*>(exact_rows_top_k_kernel), shared_bytes));
  // Uncertified pixels are few: a modest grid strides over however many
  // there are, and blocks past the count return at once.
  const int64_t blocks = grid_stride_blocks(max_rows, 1024);
  exact_rows_top_k_kernel<<<static_cast<unsigned>(blocks), kExactThreads,
                            shared_bytes, stream>>>(
      static_cast<const float*>(x.data), x.layout, dictionary_t,
      num_codewords, fallback_rows, fallback_count, intercept,
      static_cast<int>(k), list_len, values, indices);
  return cudaGetLastError();
}

}  // namespace srm_cuda
