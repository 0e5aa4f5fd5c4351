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

// Maps a linear tile element to (pixel, channel) so that neighbouring threads
// touch neighbouring addresses.
__device__ __forceinline__ void tile_element(int e, bool channel_major,
                                             int& pixel, int& channel) {
  pixel = channel_major ? e / kTileChannels : e % kTilePixels;
  channel = channel_major ? e % kTileChannels : e / kTilePixels;
}

// tile[i][c] = src[pixel i, channel first_channel + c] as float, 0 outside.
template <typename T>
__device__ __forceinline__ void load_pixel_tile(PixelTile& tile, const T* src,
                                                const FeatureMapLayout& l,
                                                const int64_t* offsets,
                                                int64_t first_channel) {
  const bool channel_major = channels_fastest(l);
  for (int e = threadIdx.x; e < kTilePixels * kTileChannels;
       e += kTileThreads) {
    int i, c;
    tile_element(e, channel_major, i, c);
    const int64_t d = first_channel + c;
    float v = 0.0f;
    if (offsets[i] >= 0 && d < l.d) {
      v = to_float(src[offsets[i] + d * l.stride_d]);
    }
    tile[i][c] = v;
  }
}

}  // namespace detail
}  // namespace srm_cuda
