// Per-row top-k of precomputed pre-activations (the GEMM encode paths).
//
// One warp owns one row at a time: it reads the row from global memory in
// coalesced tiles of kTileCodes codewords and folds each tile into the row's
// running top-k list in shared memory (topk.cuh), so after the first merge
// the k-th best so far screens every later candidate with one comparison.
// Only the k winners get their sigmoid and reach the outputs (or, for the
// screened encode, only their indices).
#include <algorithm>

#include "common.cuh"
#include "topk.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kTileCodes = 64;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// With kScreen the winners are candidates for an exact rescoring
// (launch_select_candidates): only their indices are written, and the last
// one's pre-activation as the row's cutoff; otherwise their sigmoid in T.
template <typename T, bool kScreen>
__global__ void __launch_bounds__(kThreads)
    select_top_k_kernel(const float* __restrict__ pre, int64_t rows,
                        int64_t row_stride, int64_t num_codes,
                        const float* __restrict__ intercept, int k,
                        int list_len, T* __restrict__ values,
                        float* __restrict__ cutoff,
                        int64_t* __restrict__ indices) {
  extern __shared__ uint64_t topk_lists[];  // kWarps * list_len keys
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  uint64_t* list = topk_lists + static_cast<int64_t>(warp) * list_len;
  const float bias = intercept[0];

  // Grid-stride over rows; the loop bound is warp-uniform.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
       row < rows; row += static_cast<int64_t>(gridDim.x) * kWarps) {
    topk_of_row<kTileCodes>(pre + row * row_stride, num_codes, bias, k,
                            list_len, list, lane);
    if constexpr (kScreen) {
      for (int j = lane; j < k; j += kWarpSize) {
        indices[row * k + j] = static_cast<int64_t>(topk_key_codeword(list[j]));
      }
      if (lane == 0) {
        cutoff[row] = topk_key_value(list[k - 1]);
      }
    } else {
      topk_write_code(list, k, row, lane, values, indices);
    }
    __syncwarp();  // the list is reused by this warp's next row
  }
}

template <typename T, bool kScreen>
cudaError_t launch_selection(const float* pre, int64_t rows,
                             int64_t row_stride, int64_t num_codewords,
                             const float* intercept, int64_t k, void* values,
                             float* cutoff, int64_t* indices,
                             cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || k > num_codewords ||
      num_codewords > kMaxCodewords || row_stride < num_codewords ||
      rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) {
    return cudaSuccess;
  }
  const int top_k = static_cast<int>(k);
  const int list_len = topk_list_length(top_k, kTileCodes);
  const size_t list_bytes =
      static_cast<size_t>(kWarps) * list_len * sizeof(uint64_t);
  // Enough warps to fill any GPU many times over; more rows are strided.
  const int64_t blocks =
      grid_stride_blocks(ceil_div(rows, kWarps), int64_t{1} << 16);
  auto kernel = select_top_k_kernel<T, kScreen>;
  SRM_RETURN_IF_ERROR(allow_dynamic_shared_memory(
      reinterpret_cast<const void*>(kernel), list_bytes));
  kernel<<<static_cast<unsigned>(blocks), kThreads, list_bytes, stream>>>(
      pre, rows, row_stride, num_codewords, intercept, top_k, list_len,
      static_cast<T*>(values), cutoff, indices);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_select_top_k(const float* pre, int64_t rows,
                                int64_t row_stride, int64_t num_codewords,
                                const float* intercept, int64_t k, Dtype dtype,
                                void* values, int64_t* indices,
                                cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    return launch_selection<decltype(tag), false>(
        pre, rows, row_stride, num_codewords, intercept, k, values, nullptr,
        indices, stream);
  });
}

cudaError_t launch_select_candidates(const float* pre, int64_t rows,
                                     int64_t row_stride,
                                     int64_t num_codewords,
                                     const float* intercept,
                                     int64_t num_candidates,
                                     int64_t* candidates, float* cutoff,
                                     cudaStream_t stream) {
  return launch_selection<float, true>(pre, rows, row_stride, num_codewords,
                                       intercept, num_candidates, nullptr,
                                       cutoff, candidates, stream);
}

}  // namespace srm_cuda
