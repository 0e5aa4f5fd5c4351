// 32-pixel x 32-channel shared-memory tiles of an (N, D, H, W) feature map.
//
// Kernels that combine per-pixel work (one warp per pixel, lanes over
// channels, so that codeword rows are read coalesced) with arbitrary feature
// map strides stage the map through these tiles: the load and store walk
// whichever of pixels or channels is contiguous in memory fastest across a
// warp, so both NCHW and channels_last are accessed coalesced.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace srm_cuda {
namespace detail {

constexpr int kTilePixels = 32;
constexpr int kTileChannels = 32;
constexpr int kTileThreads = 256;
constexpr int kTileWarps = kTileThreads / kWarpSize;
constexpr int kTilePixelsPerWarp = kTilePixels / kTileWarps;

// +1 column: conflict-free for both row and column walks.
using PixelTile = float[kTilePixels][kTileChannels + 1];

// offsets[i] = element offset of pixel first_pixel + i, or -1 past the end.
// Needs a barrier before use.
__device__ __forceinline__ void load_tile_pixel_offsets(
    int64_t* offsets, const FeatureMapLayout& l, int64_t first_pixel) {
  if (threadIdx.x < kTilePixels) {
    const int64_t p = first_pixel + threadIdx.x;
    offsets[threadIdx.x] = p < num_pixels(l) ? pixel_offset(l, p) : -1;
  }
}

// Calls fn(i, c, offset) for every element (pixel i, channel first_channel + c)
// of a tile, with offset its element offset in the map or -1 when the pixel
// or channel is out of range. Neighbouring threads take neighbouring
// addresses: channels fastest for channels_last, pixels fastest otherwise.
template <typename Fn>
__device__ __forceinline__ void for_each_tile_element(
    const FeatureMapLayout& l, const int64_t* offsets, int64_t first_channel,
    Fn&& fn) {
  const bool channel_major = channels_fastest(l);
  for (int e = threadIdx.x; e < kTilePixels * kTileChannels;
       e += kTileThreads) {
    const int i = channel_major ? e / kTileChannels : e % kTilePixels;
    const int c = channel_major ? e % kTileChannels : e / kTilePixels;
    const int64_t d = first_channel + c;
    fn(i, c, offsets[i] >= 0 && d < l.d ? offsets[i] + d * l.stride_d : -1);
  }
}

// tile[i][c] = src[pixel i, channel first_channel + c] as float, 0 outside.
template <typename T>
__device__ __forceinline__ void load_pixel_tile(PixelTile& tile, const T* src,
                                                const FeatureMapLayout& l,
                                                const int64_t* offsets,
                                                int64_t first_channel) {
  for_each_tile_element(
      l, offsets, first_channel, [&](int i, int c, int64_t offset) {
        tile[i][c] = offset >= 0 ? to_float(src[offset]) : 0.0f;
      });
}

// Calls fn(pl, p) for the tile's pixels that this warp owns (rows warp,
// warp + kTileWarps, ...) and that exist, p = first_pixel + pl. Whether a
// pixel exists is the same for the whole warp, so fn may use warp
// primitives.
template <typename Fn>
__device__ __forceinline__ void for_each_warp_pixel(int64_t first_pixel,
                                                    int64_t total_pixels,
                                                    Fn&& fn) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int i = 0; i < kTilePixelsPerWarp; ++i) {
    const int pl = warp + i * kTileWarps;
    const int64_t p = first_pixel + pl;
    if (p < total_pixels) {
      fn(pl, p);
    }
  }
}

}  // namespace detail
}  // namespace srm_cuda
