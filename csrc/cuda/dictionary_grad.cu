// Dictionary gradients of the sparse codes:
//   G[c, :] = sum over entries (p, j) with indices[p, j] == c of
//             coef_a[p, j] * features_a[p, :] + coef_b[p, j] * features_b[p, :]
// accumulated in float32 in the transposed (K, D) layout so that one codeword
// is one contiguous row. Nothing of size K x P is ever formed.
//
// Fast path: a block owns a 32-channel slice of a range of codewords and a
// run of pixel tiles, accumulates its entries into the slice in shared
// memory and adds it to the gradient once (codeword_slice.cuh).
// Deterministic path: entries arrive grouped by codeword (stable sort done by
// the caller); a block sums one fixed part of one codeword's run in entry
// order, and the parts are added in a fixed order at the end.
#include "codeword_slice.cuh"
#include "common.cuh"
#include "pixel_tile.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

template <typename T>
__global__ void __launch_bounds__(kTileThreads, 2)
    scatter_codewords_atomic_kernel(const T* __restrict__ features_a,
                                    FeatureMapLayout layout_a,
                                    const float* __restrict__ coef_a,
                                    const float* __restrict__ features_b,
                                    FeatureMapLayout layout_b,
                                    const float* __restrict__ coef_b,
                                    const int64_t* __restrict__ indices, int k,
                                    int64_t num_codes, int codes_per_block,
                                    int64_t tiles_per_block,
                                    float* __restrict__ grad_t) {
  extern __shared__ float slice[];  // (codes_per_block, kTileChannels)
  __shared__ int64_t offsets_a[kTilePixels];
  __shared__ int64_t offsets_b[kTilePixels];
  __shared__ PixelTile tile_a;
  __shared__ PixelTile tile_b;
  __shared__ StagedEntries staged[kTileWarps];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t total_pixels = num_pixels(layout_a);
  const SliceBlock block =
      slice_block(num_codes, codes_per_block, tiles_per_block, total_pixels);
  const bool has_b = features_b != nullptr;
  zero_slice(slice, block.codes);

  for (int64_t tile = block.first_tile; tile < block.end_tile; ++tile) {
    const int64_t first_pixel = tile * kTilePixels;
    __syncthreads();  // the previous tile is consumed
    load_tile_pixel_offsets(offsets_a, layout_a, first_pixel);
    if (has_b) {
      load_tile_pixel_offsets(offsets_b, layout_b, first_pixel);
    }
    __syncthreads();
    load_pixel_tile(tile_a, features_a, layout_a, offsets_a, block.d0);
    if (has_b) {
      load_pixel_tile(tile_b, features_b, layout_b, offsets_b, block.d0);
    }
    __syncthreads();
    for_each_warp_pixel(first_pixel, total_pixels, [&](int pl, int64_t p) {
      // Lanes outside D hold 0 and add nothing that is ever read back.
      const float fa = tile_a[pl][lane];
      const float fb = has_b ? tile_b[pl][lane] : 0.0f;
      add_entries_to_slice(slice, block, indices, coef_a, coef_b, p, k,
                           staged[warp], [&](float ca, float cb) {
                             const float v = ca * fa;
                             return has_b ? fmaf(cb, fb, v) : v;
                           });
    });
  }
  __syncthreads();
  add_slice_to_gradient(slice, block, layout_a.d, grad_t);
}

constexpr int kSortedThreads = 256;
// Channels per thread; kSortedThreads * kSortedChannelsPerThread covers
// kMaxFeatureDim.
constexpr int kSortedChannelsPerThread =
    static_cast<int>(kMaxFeatureDim) / kSortedThreads;
static_assert(kSortedThreads * kSortedChannelsPerThread >= kMaxFeatureDim,
              "sorted scatter must cover the largest feature dimension");

template <typename T>
__global__ void __launch_bounds__(kSortedThreads)
    scatter_codewords_sorted_kernel(const T* __restrict__ features_a,
                                    FeatureMapLayout layout_a,
                                    const float* __restrict__ coef_a,
                                    const float* __restrict__ features_b,
                                    FeatureMapLayout layout_b,
                                    const float* __restrict__ coef_b,
                                    const int64_t* __restrict__ entry_order,
                                    const int64_t* __restrict__ run_offsets,
                                    int k, int64_t num_codes,
                                    float* __restrict__ segment_partials) {
  __shared__ int64_t batch_offset_a[kSortedThreads];
  __shared__ int64_t batch_offset_b[kSortedThreads];
  __shared__ float batch_coef_a[kSortedThreads];
  __shared__ float batch_coef_b[kSortedThreads];

  const int64_t code = blockIdx.x;
  const int64_t segment = blockIdx.y;
  const int64_t num_segments = gridDim.y;
  const int64_t depth = layout_a.d;
  const bool has_b = features_b != nullptr;

  // Fixed split of the run into num_segments contiguous parts.
  const int64_t run_begin = run_offsets[code];
  const int64_t run_length = run_offsets[code + 1] - run_begin;
  const int64_t begin = run_begin + run_length * segment / num_segments;
  const int64_t end = run_begin + run_length * (segment + 1) / num_segments;

  float acc[kSortedChannelsPerThread];
#pragma unroll
  for (int i = 0; i < kSortedChannelsPerThread; ++i) {
    acc[i] = 0.0f;
  }

  for (int64_t batch = begin; batch < end; batch += kSortedThreads) {
    __syncthreads();  // previous batch fully consumed
    const int64_t e = batch + threadIdx.x;
    if (e < end) {
      const int64_t entry = entry_order[e];
      const int64_t p = entry / k;
      batch_offset_a[threadIdx.x] = pixel_offset(layout_a, p);
      batch_coef_a[threadIdx.x] = coef_a[entry];
      if (has_b) {
        batch_offset_b[threadIdx.x] = pixel_offset(layout_b, p);
        batch_coef_b[threadIdx.x] = coef_b[entry];
      }
    }
    __syncthreads();
    const int64_t batch_size =
        end - batch < kSortedThreads ? end - batch : kSortedThreads;
    for (int t = 0; t < batch_size; ++t) {
      const T* fa = features_a + batch_offset_a[t];
      const float ca = batch_coef_a[t];
#pragma unroll
      for (int i = 0; i < kSortedChannelsPerThread; ++i) {
        const int64_t d = threadIdx.x + static_cast<int64_t>(i) * kSortedThreads;
        if (d < depth) {
          float v = ca * to_float(fa[d * layout_a.stride_d]);
          if (has_b) {
            v = fmaf(batch_coef_b[t],
                     features_b[batch_offset_b[t] + d * layout_b.stride_d], v);
          }
          acc[i] += v;
        }
      }
    }
  }

  float* out = segment_partials + (segment * num_codes + code) * depth;
#pragma unroll
  for (int i = 0; i < kSortedChannelsPerThread; ++i) {
    const int64_t d = threadIdx.x + static_cast<int64_t>(i) * kSortedThreads;
    if (d < depth) {
      out[d] = acc[i];
    }
  }
}

__global__ void codeword_run_offsets_kernel(const int64_t* __restrict__ sorted,
                                            int64_t num_entries,
                                            int64_t num_codes,
                                            int64_t* __restrict__ offsets) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c > num_codes) {
    return;
  }
  // First position whose code is >= c.
  int64_t lo = 0;
  int64_t hi = num_entries;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  offsets[c] = lo;
}

// One 32 x 32 tile of (codeword, feature) per block. Each element sums its
// segments in order. A codeword-major gradient has the partials' layout and
// is written in place of the reads; a (D, K) row-major one goes through
// shared memory, so the partials are read along their rows of D features and
// the gradient written along its rows of K codewords, both coalesced (a
// thread per output element would read with a stride of D).
constexpr int kTransposeTile = 32;
constexpr int kTransposeRows = 8;

template <typename T>
__global__ void __launch_bounds__(kTransposeTile * kTransposeRows)
    reduce_dictionary_partials_kernel(const float* __restrict__ partials,
                                      int64_t num_segments, int64_t depth,
                                      int64_t num_codes, bool codeword_major,
                                      T* __restrict__ grad) {
  __shared__ float tile[kTransposeTile][kTransposeTile + 1];  // +1: no bank conflicts
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTransposeTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kTransposeTile;
  for (int row = threadIdx.y; row < kTransposeTile; row += kTransposeRows) {
    const int64_t c = c0 + row;
    const int64_t d = d0 + threadIdx.x;
    float sum = 0.0f;
    if (c < num_codes && d < depth) {
      for (int64_t s = 0; s < num_segments; ++s) {
        sum += partials[(s * num_codes + c) * depth + d];
      }
      if (codeword_major) {
        grad[c * depth + d] = from_float<T>(sum);
      }
    }
    tile[row][threadIdx.x] = sum;
  }
  if (codeword_major) {
    return;  // the same for the whole block, so no thread waits below
  }
  __syncthreads();
  for (int row = threadIdx.y; row < kTransposeTile; row += kTransposeRows) {
    const int64_t d = d0 + row;
    const int64_t c = c0 + threadIdx.x;
    if (d < depth && c < num_codes) {
      grad[d * num_codes + c] = from_float<T>(tile[threadIdx.x][row]);
    }
  }
}

bool valid_terms(const FeatureMap& a, const FeatureMap* b) {
  if (a.layout.d > kMaxFeatureDim) {
    return false;
  }
  return b == nullptr ||
         (b->dtype == Dtype::kFloat32 && same_sizes(a.layout, b->layout));
}

// Kernel arguments of the optional float32 b term; a's layout stands in
// when there is none (the kernels then never read it).
struct SecondTerm {
  const float* data;
  FeatureMapLayout layout;
};

SecondTerm second_term(const FeatureMap& a, const FeatureMap* b) {
  if (b == nullptr) {
    return {nullptr, a.layout};
  }
  return {static_cast<const float*>(b->data), b->layout};
}

}  // namespace

cudaError_t launch_scatter_codewords_atomic(
    const FeatureMap& features_a, const float* coef_a,
    const FeatureMap* features_b, const float* coef_b, const int64_t* indices,
    int64_t k, int64_t num_codewords, float* grad_dictionary_t,
    cudaStream_t stream) {
  if (!valid_terms(features_a, features_b) || k < 0 || k > 0x7fffffff ||
      num_codewords < 0 || num_codewords > kMaxCodewords) {
    return cudaErrorInvalidValue;
  }
  const int64_t total_pixels = detail::num_pixels(features_a.layout);
  if (total_pixels == 0 || k == 0 || features_a.layout.d == 0 ||
      num_codewords == 0) {
    return cudaSuccess;
  }
  const SecondTerm b = second_term(features_a, features_b);
  return detail::dispatch_dtype(features_a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = scatter_codewords_atomic_kernel<T>;
    SliceGrid plan{};
    SRM_RETURN_IF_ERROR(plan_slice_grid(reinterpret_cast<const void*>(kernel),
                                        num_codewords, features_a.layout.d,
                                        total_pixels, /*with_slice=*/true,
                                        &plan));
    kernel<<<plan.grid, kTileThreads, plan.slice_bytes, stream>>>(
        static_cast<const T*>(features_a.data), features_a.layout, coef_a,
        b.data, b.layout, coef_b, indices, static_cast<int>(k), num_codewords,
        plan.codes_per_block, plan.tiles_per_block, grad_dictionary_t);
    return cudaGetLastError();
  });
}

cudaError_t launch_codeword_run_offsets(const int64_t* sorted_codes,
                                        int64_t num_entries,
                                        int64_t num_codewords,
                                        int64_t* run_offsets,
                                        cudaStream_t stream) {
  if (num_codewords < 0 || num_entries < 0) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  const unsigned blocks =
      static_cast<unsigned>(detail::ceil_div(num_codewords + 1, kThreads));
  codeword_run_offsets_kernel<<<blocks, kThreads, 0, stream>>>(
      sorted_codes, num_entries, num_codewords, run_offsets);
  return cudaGetLastError();
}

cudaError_t launch_scatter_codewords_sorted(
    const FeatureMap& features_a, const float* coef_a,
    const FeatureMap* features_b, const float* coef_b,
    const int64_t* entry_order, const int64_t* run_offsets, int64_t k,
    int64_t num_codewords, int64_t num_segments, float* segment_partials,
    cudaStream_t stream) {
  if (!valid_terms(features_a, features_b) || k < 1 || k > 0x7fffffff ||
      num_segments < 1 || num_segments > 65535 || num_codewords > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (num_codewords == 0 || features_a.layout.d == 0) {
    return cudaSuccess;
  }
  const SecondTerm b = second_term(features_a, features_b);
  const dim3 grid(static_cast<unsigned>(num_codewords),
                  static_cast<unsigned>(num_segments));
  return detail::dispatch_dtype(features_a.dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_codewords_sorted_kernel<T><<<grid, kSortedThreads, 0, stream>>>(
        static_cast<const T*>(features_a.data), features_a.layout, coef_a,
        b.data, b.layout, coef_b, entry_order, run_offsets,
        static_cast<int>(k), num_codewords, segment_partials);
    return cudaGetLastError();
  });
}

cudaError_t launch_reduce_dictionary_partials(const float* segment_partials,
                                              int64_t num_segments,
                                              int64_t feature_dim,
                                              int64_t num_codewords,
                                              bool codeword_major,
                                              void* grad_dictionary,
                                              Dtype dtype,
                                              cudaStream_t stream) {
  if (num_segments < 1 || feature_dim < 0 || num_codewords < 0) {
    return cudaErrorInvalidValue;
  }
  if (feature_dim == 0 || num_codewords == 0) {
    return cudaSuccess;
  }
  const int64_t tiles_c = ceil_div(num_codewords, kTransposeTile);
  const int64_t tiles_d = ceil_div(feature_dim, kTransposeTile);
  if (tiles_c > 0x7fffffff || tiles_d > 65535) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(tiles_c), static_cast<unsigned>(tiles_d));
  const dim3 block(kTransposeTile, kTransposeRows);
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    reduce_dictionary_partials_kernel<T><<<grid, block, 0, stream>>>(
        segment_partials, num_segments, feature_dim, num_codewords,
        codeword_major, static_cast<T*>(grad_dictionary));
    return cudaGetLastError();
  });
}

}  // namespace srm_cuda
