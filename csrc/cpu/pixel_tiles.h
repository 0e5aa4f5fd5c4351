// Pixel-tile plumbing shared by the CPU kernels.
//
// The kernels treat a feature map (N, C, H, W) as P = N*H*W pixels, each a
// C-vector, and work on tiles of consecutive pixels. A tile is gathered into a
// small row-major (pixels x C) buffer, whatever the map's strides, so one GEMM
// per tile can feed the per-pixel work while the tile is still in cache.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vector_math.h"

namespace srm_ext::cpu {

// Where pixel p's channel c lives in a strided (N, C, H, W) tensor.
struct PixelGrid {
  int64_t n, c, h, w;
  int64_t stride_n, stride_c, stride_h, stride_w;

  explicit PixelGrid(const at::Tensor& t)
      : n(t.size(0)), c(t.size(1)), h(t.size(2)), w(t.size(3)),
        stride_n(t.stride(0)), stride_c(t.stride(1)),
        stride_h(t.stride(2)), stride_w(t.stride(3)) {}

  int64_t pixels() const { return n * h * w; }
  int64_t pixels_per_image() const { return h * w; }

  // Offset of channel 0 of pixel p (pixels ordered n, h, w).
  int64_t pixel_offset(int64_t p) const {
    const int64_t hw = h * w;
    const int64_t img = p / hw, rem = p % hw;
    return img * stride_n + (rem / w) * stride_h + (rem % w) * stride_w;
  }
};

// Copies float pixels [p0, p0 + count) between a map whose pixels are
// adjacent along W (stride_w == 1, as in NCHW) and a (count x C) tile. Within
// a run of pixels in one row (or one image, when its rows are adjacent too)
// every channel is contiguous, so the run moves as one (C x run) transpose.
template <bool kToTile>
void copy_tile_by_runs(float* map, const PixelGrid& g, int64_t p0, int64_t count, float* tile) {
  const int64_t hw = g.pixels_per_image();
  const bool rows_adjacent = g.stride_h == g.w;
  for (int64_t i = 0; i < count;) {
    const int64_t rem = (p0 + i) % hw;
    const int64_t left = rows_adjacent ? hw - rem : g.w - rem % g.w;
    const int64_t run = std::min(count - i, left);
    float* pixels = map + g.pixel_offset(p0 + i);
    float* rows = tile + i * g.c;
    if constexpr (kToTile) {
      transpose(pixels, g.stride_c, g.c, run, rows, g.c);
    } else {
      transpose(rows, g.c, run, g.c, pixels, g.stride_c);
    }
    i += run;
  }
}

// Copies pixels [p0, p0 + count) between a strided map and a (count x C)
// row-major tile. channels_last pixels are copied whole, float maps with
// stride_w == 1 by runs (above); any other layout is walked in 16 x 16
// blocks: a plain loop would touch C cache lines a power of two apart per
// pixel and thrash the L1 sets whenever H*W is a power of two.
template <typename scalar_t, bool kToTile>
void copy_tile(scalar_t* map, const PixelGrid& g, int64_t p0, int64_t count, scalar_t* tile) {
  auto move = [](scalar_t& tile_value, scalar_t& map_value) {
    if constexpr (kToTile) tile_value = map_value; else map_value = tile_value;
  };
  const int64_t channels = g.c;
  if (g.stride_c == 1) {  // channels_last: each pixel is contiguous
    for (int64_t i = 0; i < count; ++i) {
      scalar_t* pixel = map + g.pixel_offset(p0 + i);
      for (int64_t c = 0; c < channels; ++c) move(tile[i * channels + c], pixel[c]);
    }
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (g.stride_w == 1) {
      copy_tile_by_runs<kToTile>(map, g, p0, count, tile);
      return;
    }
  }
  constexpr int64_t kBlock = 16;
  int64_t offsets[kBlock];
  for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
    const int64_t pixels = std::min(kBlock, count - i0);
    for (int64_t i = 0; i < pixels; ++i) offsets[i] = g.pixel_offset(p0 + i0 + i);
    for (int64_t b0 = 0; b0 < channels; b0 += kBlock) {
      const int64_t b1 = std::min(b0 + kBlock, channels);
      for (int64_t c = b0; c < b1; ++c) {
        for (int64_t i = 0; i < pixels; ++i) {
          move(tile[(i0 + i) * channels + c], map[offsets[i] + c * g.stride_c]);
        }
      }
    }
  }
}

// Pixels [p0, p0 + count) of a map into a (count x C) tile.
template <typename scalar_t>
void gather_tile(const scalar_t* src, const PixelGrid& g, int64_t p0, int64_t count,
                 scalar_t* tile) {
  copy_tile<scalar_t, true>(const_cast<scalar_t*>(src), g, p0, count, tile);
}

template <typename scalar_t>
void scatter_tile(const scalar_t* tile, const PixelGrid& g, int64_t p0, int64_t count,
                  scalar_t* dst) {
  copy_tile<scalar_t, false>(dst, g, p0, count, const_cast<scalar_t*>(tile));
}

// The backward kernels walk the pixels in blocks, keeping per-pixel rows of a
// block (its feature vectors, the kept entries' terms) in a few buffers of
// about 2^16 values each (256 KiB in float32): small enough that the rows
// the dictionary gradient reads over and over stay in L2. Each block is split
// into pieces of kPiecePixels for the workers; blocks are whole pieces, so
// piece q always covers pixels [q * kPiecePixels, (q + 1) * kPiecePixels).
constexpr int64_t kPiecePixels = 32;

// Pixels per block such that `row_values` values per pixel fit in about
// 2^16, in a whole number of pieces per worker thread (an uneven split
// would leave threads waiting at the end of every block).
inline int64_t block_pixels(int64_t row_values) {
  constexpr int64_t kBlockValues = 1 << 16;
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t pieces = kBlockValues / kPiecePixels / std::max<int64_t>(row_values, 1);
  return std::max<int64_t>(pieces / threads, 1) * threads * kPiecePixels;
}

// Pixels per encode tile: enough rows for an efficient GEMM (the product
// packs the whole dictionary once per tile), few enough that the tile's
// (pixels x K) similarity block stays in L2 (1 MiB in float32; the block is
// also the encode's whole workspace per thread), and at most a thread's
// share of the pixels, so every thread gets work. Whole pieces, so per-piece
// partial sums never straddle two tiles.
inline int64_t tile_pixels(int64_t num_codewords, int64_t pixels) {
  constexpr int64_t kTileElements = 1 << 18, kMaxTile = 512;
  const int64_t threads = std::max(at::get_num_threads(), 1);
  const int64_t by_cache = kTileElements / std::max<int64_t>(num_codewords, 1);
  const int64_t share = (pixels + threads - 1) / threads;
  const int64_t tile = std::clamp<int64_t>(std::min(by_cache, share), 1, kMaxTile);
  return (tile + kPiecePixels - 1) / kPiecePixels * kPiecePixels;
}

inline int64_t num_pieces(int64_t pixels) { return (pixels + kPiecePixels - 1) / kPiecePixels; }

// Runs fn(first_pixel, count) for consecutive blocks of `block` pixels.
template <typename F>
void for_each_pixel_block(int64_t pixels, int64_t block, const F& fn) {
  for (int64_t p0 = 0; p0 < pixels; p0 += block) fn(p0, std::min(block, pixels - p0));
}

// Runs fn(piece, first_pixel, count) on the pieces of pixels [p0, p0 + count)
// in parallel; p0 must be a multiple of kPiecePixels.
template <typename F>
void for_each_piece(int64_t p0, int64_t count, const F& fn) {
  const int64_t first = p0 / kPiecePixels, last = first + num_pieces(count);
  at::parallel_for(first, last, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t start = q * kPiecePixels;
      fn(q, start, std::min(kPiecePixels, p0 + count - start));
    }
  });
}

// One partial sum per piece, added in piece order: the total is the same
// for any thread count.
class PieceSums {
 public:
  explicit PieceSums(int64_t pixels) : sums_(num_pieces(pixels), 0.0) {}
  double& operator[](int64_t piece) { return sums_[piece]; }
  double total() const {
    double t = 0.0;
    for (double s : sums_) t += s;
    return t;
  }

 private:
  std::vector<double> sums_;
};

// A scratch buffer of `size` values for each worker thread.
template <typename scalar_t>
class PerThreadScratch {
 public:
  explicit PerThreadScratch(int64_t size)
      : size_(size), values_(size * at::get_num_threads()) {}
  scalar_t* get() { return values_.data() + at::get_thread_num() * size_; }

 private:
  int64_t size_;
  std::vector<scalar_t> values_;
};

}  // namespace srm_ext::cpu
