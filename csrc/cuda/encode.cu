// Fused sparse encoding: pre = C^T x_p + b, top-k per pixel, sigmoid.
//
// A block owns kPixels pixels and sweeps the dictionary in tiles of kTileCodes
// codewords. For each tile it computes the kPixels x kTileCodes pre-activation
// tile into shared memory (float32 FMA, or tensor-core MMA with float32
// accumulation) and every warp folds the tile rows of its own pixels into the
// pixels' running top-k lists (topk.cuh). Only the k winners per pixel ever
// reach global memory. Optionally the block also rebuilds x_hat from the
// winners and writes the sum of squared residuals of its pixels.
#include <mma.h>

#include "common.cuh"
#include "topk.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kPixels = 32;      // pixels per block (GEMM rows)
constexpr int kTileCodes = 64;   // codewords per tile (GEMM columns)
constexpr int kDepthStep = 32;   // channels staged per GEMM step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kPixelsPerWarp = kPixels / kWarps;
// FMA path: each thread owns a kFmaRows x kFmaCols block of the score tile and
// reads its operands per channel as one float2 and one float4 (two shared
// loads for eight FMAs, where one column per load made shared memory the
// bottleneck).
constexpr int kFmaRows = 2;
constexpr int kFmaCols = 4;
constexpr int kFmaColGroups = kTileCodes / kFmaCols;
// MMA path: 16x16 output fragments, one per warp.
constexpr int kFragment = 16;
static_assert((kPixels / kFragment) * (kTileCodes / kFragment) == kWarps,
              "one MMA output fragment per warp");
static_assert((kPixels / kFmaRows) * kFmaColGroups == kThreads,
              "FMA thread mapping");
static_assert(kPixels % kWarps == 0, "whole pixels per warp");

// Tensor cores need sm_80 for bf16 and tf32; older targets use the FMA path.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SRM_ENCODE_HAS_MMA 1
#else
#define SRM_ENCODE_HAS_MMA 0
#endif

// MMA shape per staging type: tf32 consumes k = 8, 16-bit types k = 16.
template <typename Stage>
struct MmaShape {
  static constexpr int kK = 16;
  using Element = Stage;
};
#if SRM_ENCODE_HAS_MMA  // wmma declares tf32 for sm_80 and later only
template <>
struct MmaShape<float> {
  static constexpr int kK = 8;
  using Element = nvcuda::wmma::precision::tf32;
};
#endif

// Shared-memory rows are padded by 16 bytes: fewer bank conflicts, and every
// fragment pointer stays 32-byte aligned as wmma requires.
template <typename Stage>
constexpr int kPad = 16 / static_cast<int>(sizeof(Stage));
constexpr int kScorePad = 4;

// Shared memory, not registers, bounds residency here; the (kThreads, 1)
// bound leaves ptxas enough registers for the unrolled per-pixel merges.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads, 1)
    sparse_encode_kernel(const T* __restrict__ x, FeatureMapLayout xl,
                         const T* __restrict__ dictionary, int64_t num_codes,
                         const float* __restrict__ intercept, int k,
                         int list_len, T* __restrict__ values,
                         int64_t* __restrict__ indices,
                         float* __restrict__ loss_partials) {
  constexpr bool kUseMma = kTensorCores && SRM_ENCODE_HAS_MMA;
  // Operands are staged in their own 16-bit type for MMA, else as float.
  using Stage = std::conditional_t<kUseMma, T, float>;
  constexpr int kXLd = kPixels + kPad<Stage>;
  constexpr int kCLd = kTileCodes + kPad<Stage>;
  constexpr int kScoreLd = kTileCodes + kScorePad;

  // x^T tile stored channel-major, i.e. a column-major kPixels x kDepthStep
  // matrix; dictionary tile row-major kDepthStep x kTileCodes.
  __shared__ __align__(128) Stage x_tile[kDepthStep][kXLd];
  __shared__ __align__(128) Stage code_tile[kDepthStep][kCLd];
  __shared__ __align__(128) float scores[kPixels][kScoreLd];
  __shared__ int64_t x_offset[kPixels];
  __shared__ float loss_scratch[kThreads];
  extern __shared__ uint64_t topk_lists[];  // kPixels * list_len keys

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int64_t total_pixels = num_pixels(xl);
  const int64_t depth = xl.d;
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kPixels;
  const bool x_channels_fastest = channels_fastest(xl);
  const float bias = intercept[0];

  if (tid < kPixels) {
    const int64_t p = first_pixel + tid;
    x_offset[tid] = p < total_pixels ? pixel_offset(xl, p) : -1;
  }

  // Running top-k state of this warp's pixels (warp-uniform registers).
  int count[kPixelsPerWarp];
  uint64_t threshold[kPixelsPerWarp];
#pragma unroll
  for (int i = 0; i < kPixelsPerWarp; ++i) {
    count[i] = 0;
    threshold[i] = 0;
  }

  // FMA-path ownership of the score tile.
  const int fma_row = (tid / kFmaColGroups) * kFmaRows;
  const int fma_col = (tid % kFmaColGroups) * kFmaCols;
  // MMA-path ownership: warp -> one 16x16 fragment (unused below sm_80).
  [[maybe_unused]] const int mma_row = (warp / (kTileCodes / kFragment)) * kFragment;
  [[maybe_unused]] const int mma_col = (warp % (kTileCodes / kFragment)) * kFragment;

  for (int64_t code0 = 0; code0 < num_codes; code0 += kTileCodes) {
    float acc[kFmaRows][kFmaCols] = {};
#if SRM_ENCODE_HAS_MMA
    using Shape = MmaShape<Stage>;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFragment, kFragment,
                           Shape::kK, float>
        mma_acc;
    if constexpr (kUseMma) {
      nvcuda::wmma::fill_fragment(mma_acc, 0.0f);
    }
#endif

    for (int64_t d0 = 0; d0 < depth; d0 += kDepthStep) {
      __syncthreads();  // previous step's tiles (and x_offset) are settled
      for (int e = tid; e < kDepthStep * kPixels; e += kThreads) {
        // Walk memory-contiguous direction fastest across the warp.
        const int pl = x_channels_fastest ? e / kDepthStep : e % kPixels;
        const int dl = x_channels_fastest ? e % kDepthStep : e / kPixels;
        const int64_t d = d0 + dl;
        const int64_t offset = x_offset[pl];
        Stage v = from_float<Stage>(0.0f);
        if (offset >= 0 && d < depth) {
          v = convert<Stage>(x[offset + d * xl.stride_d]);
        }
        x_tile[dl][pl] = v;
      }
      for (int e = tid; e < kDepthStep * kTileCodes; e += kThreads) {
        const int cl = e % kTileCodes;
        const int dl = e / kTileCodes;
        const int64_t d = d0 + dl;
        const int64_t c = code0 + cl;
        Stage v = from_float<Stage>(0.0f);
        if (d < depth && c < num_codes) {
          v = convert<Stage>(dictionary[d * num_codes + c]);
        }
        code_tile[dl][cl] = v;
      }
      __syncthreads();

      if constexpr (kUseMma) {
#if SRM_ENCODE_HAS_MMA
        namespace wmma = nvcuda::wmma;
        using Element = typename Shape::Element;
#pragma unroll
        for (int kk = 0; kk < kDepthStep; kk += Shape::kK) {
          wmma::fragment<wmma::matrix_a, kFragment, kFragment, Shape::kK,
                         Element, wmma::col_major>
              a;
          wmma::fragment<wmma::matrix_b, kFragment, kFragment, Shape::kK,
                         Element, wmma::row_major>
              b;
          wmma::load_matrix_sync(a, &x_tile[kk][mma_row], kXLd);
          wmma::load_matrix_sync(b, &code_tile[kk][mma_col], kCLd);
          if constexpr (std::is_same_v<Stage, float>) {
            for (int i = 0; i < a.num_elements; ++i) {
              a.x[i] = wmma::__float_to_tf32(a.x[i]);
            }
            for (int i = 0; i < b.num_elements; ++i) {
              b.x[i] = wmma::__float_to_tf32(b.x[i]);
            }
          }
          wmma::mma_sync(mma_acc, a, b, mma_acc);
        }
#endif
      } else {
        static_assert(std::is_same_v<Stage, float>, "FMA path stages float");
        static_assert(kXLd % kFmaRows == 0 && kCLd % kFmaCols == 0,
                      "vector loads stay aligned");
#pragma unroll 8
        for (int dl = 0; dl < kDepthStep; ++dl) {
          const float2 xv = *reinterpret_cast<const float2*>(&x_tile[dl][fma_row]);
          const float4 cv = *reinterpret_cast<const float4*>(&code_tile[dl][fma_col]);
          const float xs[kFmaRows] = {xv.x, xv.y};
          const float cs[kFmaCols] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
          for (int i = 0; i < kFmaRows; ++i) {
#pragma unroll
            for (int j = 0; j < kFmaCols; ++j) {
              acc[i][j] = fmaf(xs[i], cs[j], acc[i][j]);
            }
          }
        }
      }
    }

    // All warps are done with the previous tile's scores (they passed the
    // barriers of the depth loop, or this one when depth == 0).
    __syncthreads();
    if constexpr (kUseMma) {
#if SRM_ENCODE_HAS_MMA
      nvcuda::wmma::store_matrix_sync(&scores[mma_row][mma_col], mma_acc,
                                      kScoreLd, nvcuda::wmma::mem_row_major);
#endif
    } else {
      static_assert(kScoreLd % kFmaCols == 0, "vector stores stay aligned");
#pragma unroll
      for (int i = 0; i < kFmaRows; ++i) {
        *reinterpret_cast<float4*>(&scores[fma_row + i][fma_col]) =
            make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kPixelsPerWarp; ++i) {
      const int pl = warp * kPixelsPerWarp + i;
      uint64_t* list = topk_lists + static_cast<int64_t>(pl) * list_len;
      topk_add_tile<kTileCodes>(scores[pl], code0, num_codes, bias, k,
                                list_len, threshold[i], list, count[i], lane);
    }
  }

  // Final merge and output. With loss_partials the list slots are then
  // rewritten as (rounded value bits, codeword) pairs for the residual pass.
#pragma unroll
  for (int i = 0; i < kPixelsPerWarp; ++i) {
    const int pl = warp * kPixelsPerWarp + i;
    uint64_t* list = topk_lists + static_cast<int64_t>(pl) * list_len;
    topk_merge(list, count[i], k, lane);
    __syncwarp();  // every lane has read list[k - 1] before one rewrites it
    const int64_t p = first_pixel + pl;
    if (p < total_pixels) {
      for (int j = lane; j < k; j += kWarpSize) {
        const uint64_t key = list[j];
        const uint32_t codeword = topk_key_codeword(key);
        const T value = from_float<T>(sigmoid(topk_key_value(key)));
        values[p * k + j] = value;
        indices[p * k + j] = static_cast<int64_t>(codeword);
        list[j] = (static_cast<uint64_t>(__float_as_uint(to_float(value)))
                   << 32) |
                  codeword;
      }
    }
  }

  if (loss_partials == nullptr) {
    return;  // block-uniform
  }
  __syncthreads();
  float sum_sq = 0.0f;
  const int tile_elems = kPixels * static_cast<int>(depth);
  for (int e = tid; e < tile_elems; e += kThreads) {
    const int pl = x_channels_fastest ? e / static_cast<int>(depth)
                                      : e % kPixels;
    const int64_t d = x_channels_fastest ? e % static_cast<int>(depth)
                                         : e / kPixels;
    const int64_t offset = x_offset[pl];
    if (offset < 0) {
      continue;
    }
    const uint64_t* list = topk_lists + static_cast<int64_t>(pl) * list_len;
    const T* code_row = dictionary + d * num_codes;
    float x_hat = 0.0f;
    for (int j = 0; j < k; ++j) {
      const uint64_t entry = list[j];
      x_hat = fmaf(__uint_as_float(static_cast<uint32_t>(entry >> 32)),
                   to_float(code_row[static_cast<uint32_t>(entry)]), x_hat);
    }
    const float r = x_hat - to_float(x[offset + d * xl.stride_d]);
    sum_sq = fmaf(r, r, sum_sq);
  }
  const float block_total = block_sum<kThreads>(sum_sq, loss_scratch);
  if (tid == 0) {
    loss_partials[blockIdx.x] = block_total;
  }
}

template <typename T, bool kTensorCores>
cudaError_t launch_sparse_encode_typed(const FeatureMap& x,
                                       const void* dictionary,
                                       int64_t num_codewords,
                                       const float* intercept, int k,
                                       void* values, int64_t* indices,
                                       float* loss_partials,
                                       cudaStream_t stream) {
  const int list_len = topk_list_length(k, kTileCodes);
  const size_t list_bytes =
      static_cast<size_t>(kPixels) * list_len * sizeof(uint64_t);
  auto kernel = sparse_encode_kernel<T, kTensorCores>;
  SRM_RETURN_IF_ERROR(allow_dynamic_shared_memory(
      reinterpret_cast<const void*>(kernel), list_bytes));
  const int64_t blocks = sparse_encode_num_blocks(num_pixels(x.layout));
  kernel<<<static_cast<unsigned>(blocks), kThreads, list_bytes, stream>>>(
      static_cast<const T*>(x.data), x.layout, static_cast<const T*>(dictionary),
      num_codewords, intercept, k, list_len, static_cast<T*>(values), indices,
      loss_partials);
  return cudaGetLastError();
}

}  // namespace

int64_t sparse_encode_num_blocks(int64_t num_pixels) {
  return detail::ceil_div(num_pixels, kPixels);
}

cudaError_t launch_sparse_encode(const FeatureMap& x, const void* dictionary,
                                 int64_t num_codewords, const float* intercept,
                                 int64_t k, bool use_tensor_cores, void* values,
                                 int64_t* indices, float* loss_partials,
                                 cudaStream_t stream) {
  const FeatureMapLayout& l = x.layout;
  if (k < 1 || k > kMaxTopK || k > num_codewords ||
      num_codewords > kMaxCodewords || l.d < 1 || l.d > kMaxFeatureDim) {
    return cudaErrorInvalidValue;
  }
  if (detail::num_pixels(l) == 0) {
    return cudaSuccess;
  }
  if (detail::ceil_div(detail::num_pixels(l), kPixels) > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  const int top_k = static_cast<int>(k);
  return detail::dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    return use_tensor_cores
               ? launch_sparse_encode_typed<T, true>(
                     x, dictionary, num_codewords, intercept, top_k, values,
                     indices, loss_partials, stream)
               : launch_sparse_encode_typed<T, false>(
                     x, dictionary, num_codewords, intercept, top_k, values,
                     indices, loss_partials, stream);
  });
}

}  // namespace srm_cuda
