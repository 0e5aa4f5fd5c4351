// A block's slice of the (K, D) float32 dictionary gradient in shared
// memory: 32 channels [d0, d0 + 32) of a range of codewords [c0, c0 + codes).
//
// Kernels that add per-entry terms to the dictionary gradient own one slice
// each (blockIdx.y picks the channels, blockIdx.z the codewords) and a run
// of consecutive 32-pixel tiles (blockIdx.x). They add their entries with
// shared atomics, which only collide when two of the block's warps hit the
// same codeword, and add the slice to the gradient once at the end: one
// global atomic per element and block instead of one per entry and channel,
// which at small K x D would all contend for the same few lines.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "pixel_tile.cuh"

namespace srm_cuda {
namespace detail {

// Codewords per slice: kSliceCodewords (srm_kernels.h), at most 64 KiB, so
// that two blocks fit on an sm_80 or sm_90 multiprocessor (fewer codewords
// where the device gives a block less shared memory).
static_assert(kSliceCodewords * kTileChannels * sizeof(float) <= 64 * 1024,
              "a slice fits in 64 KiB");
// Blocks per multiprocessor the grid aims at; each block's slice is added to
// the gradient once, so fewer, longer blocks move less.
constexpr int64_t kSliceBlocksPerMultiprocessor = 4;

// The block's share of the work, from its grid position.
struct SliceBlock {
  int64_t d0;          // first channel of the slice
  int64_t c0;          // first codeword of the slice
  int codes;           // codewords in the slice
  int64_t first_tile;  // its 32-pixel tiles [first_tile, end_tile)
  int64_t end_tile;
};

__device__ __forceinline__ SliceBlock slice_block(int64_t num_codes,
                                                  int codes_per_block,
                                                  int64_t tiles_per_block,
                                                  int64_t total_pixels) {
  SliceBlock b;
  b.d0 = static_cast<int64_t>(blockIdx.y) * kTileChannels;
  b.c0 = static_cast<int64_t>(blockIdx.z) * codes_per_block;
  b.codes = static_cast<int>(num_codes - b.c0 < codes_per_block
                                 ? num_codes - b.c0
                                 : codes_per_block);
  b.first_tile = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t num_tiles = ceil_div(total_pixels, kTilePixels);
  b.end_tile = b.first_tile + tiles_per_block < num_tiles
                   ? b.first_tile + tiles_per_block
                   : num_tiles;
  return b;
}

// slice[c][lane] for the block's codewords; needs a barrier before use.
__device__ __forceinline__ void zero_slice(float* slice, int codes) {
  for (int e = threadIdx.x; e < codes * kTileChannels; e += kTileThreads) {
    slice[e] = 0.0f;
  }
}

// Adds term(coef, coef2) to slice[c][lane] for each entry of pixel p whose
// codeword c0 + c lies in the block's slice, in entry order. Called by a
// whole warp; `staged` is its own.
template <typename Term>
__device__ __forceinline__ void add_entries_to_slice(
    float* slice, const SliceBlock& b, const int64_t* __restrict__ indices,
    const float* __restrict__ coef, const float* __restrict__ coef2,
    int64_t p, int k, StagedEntries& staged, Term&& term) {
  const int lane = threadIdx.x % kWarpSize;
  for_each_pixel_entry(indices, coef, coef2, p, k, b.c0, b.c0 + b.codes,
                       staged, [&](int c, float w, float w2) {
                         atomicAdd(slice + c * kTileChannels + lane,
                                   term(w, w2));
                       });
}

// grad_t[c0 + c, d0 + lane] += slice[c][lane] for channels inside D. Needs a
// barrier after the last add to the slice.
__device__ __forceinline__ void add_slice_to_gradient(const float* slice,
                                                      const SliceBlock& b,
                                                      int64_t depth,
                                                      float* grad_t) {
  for (int e = threadIdx.x; e < b.codes * kTileChannels; e += kTileThreads) {
    const int64_t d = b.d0 + e % kTileChannels;
    const float v = slice[e];
    if (d < depth && v != 0.0f) {  // codewords no entry of the block hit
      atomicAdd(grad_t + (b.c0 + e / kTileChannels) * depth + d, v);
    }
  }
}

// Launch shape of a slice kernel over `total_pixels` pixels of depth D.
struct SliceGrid {
  dim3 grid;
  size_t slice_bytes;  // dynamic shared memory
  int codes_per_block;
  int64_t tiles_per_block;
};

// Sizes the slices from the shared memory `kernel` can be given on the
// current device and lets it take them; with `with_slice` false the kernel
// holds none (one range of codewords, no dynamic shared memory).
inline cudaError_t plan_slice_grid(const void* kernel, int64_t num_codewords,
                                   int64_t depth, int64_t total_pixels,
                                   bool with_slice, SliceGrid* plan) {
  int multiprocessors = 0;
  SRM_RETURN_IF_ERROR(multiprocessor_count(&multiprocessors));
  const int64_t slice_row_bytes = kTileChannels * sizeof(float);
  int64_t codes_per_block = num_codewords;
  if (with_slice) {
    size_t available = 0;
    SRM_RETURN_IF_ERROR(max_dynamic_shared_memory(kernel, &available));
    const int64_t fit = static_cast<int64_t>(available) / slice_row_bytes;
    codes_per_block = fit < kSliceCodewords ? fit : kSliceCodewords;
    codes_per_block =
        codes_per_block < num_codewords ? codes_per_block : num_codewords;
    if (codes_per_block < 1) {
      return cudaErrorLaunchOutOfResources;
    }
  }
  const size_t slice_bytes =
      with_slice ? static_cast<size_t>(codes_per_block * slice_row_bytes) : 0;
  SRM_RETURN_IF_ERROR(allow_dynamic_shared_memory(kernel, slice_bytes));

  const int64_t slices = ceil_div(depth, kTileChannels);
  const int64_t ranges = ceil_div(num_codewords, codes_per_block);
  const int64_t num_tiles = ceil_div(total_pixels, kTilePixels);
  const int64_t target_groups = ceil_div(
      kSliceBlocksPerMultiprocessor * multiprocessors, slices * ranges);
  // At least one: no pixels (which callers return before) must not divide by 0.
  const int64_t tiles_per_block =
      std::max<int64_t>(1, ceil_div(num_tiles, target_groups));
  const int64_t groups = ceil_div(num_tiles, tiles_per_block);
  if (groups > 0x7fffffff || slices > 65535 || ranges > 65535 ||
      codes_per_block > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  plan->grid = dim3(static_cast<unsigned>(groups),
                    static_cast<unsigned>(slices),
                    static_cast<unsigned>(ranges));
  plan->slice_bytes = slice_bytes;
  plan->codes_per_block = static_cast<int>(codes_per_block);
  plan->tiles_per_block = tiles_per_block;
  return cudaSuccess;
}

}  // namespace detail
}  // namespace srm_cuda
