// Small dense-vector helpers and the per-chunk dictionary-gradient buffers
// used by the sparse kernels. Codewords are read from the transposed
// dictionary (K x D, row-major) so each codeword is a contiguous D-vector.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pixel_tiles.h"
#include "vector_math.h"

namespace srm_ext::cpu {

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t z) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-z));
}

// out = sum_j weights[j] * codewords[indices[j]], codewords (K x D).
template <typename scalar_t>
inline void combine_codewords(const scalar_t* codewords, int64_t dim,
                              const int64_t* indices, const scalar_t* weights,
                              int64_t k, scalar_t* out) {
  combine_rows(codewords, dim, indices, weights, k, out);
}

// The dictionary gradient, accumulated without per-thread copies: worker r
// owns codewords [K*r/R, K*(r+1)/R) and adds, in pixel order, every kept
// entry that falls in its range. Each codeword's row is therefore summed in
// the same order whatever the thread count (bitwise reproducible), and the
// only buffer is the gradient itself.
//
// Rows are codeword-major (K x D). The result is laid out like the dictionary
// (at::empty_like), so a codeword-major dictionary gets its gradient with no
// transposed copy.
template <typename scalar_t>
class DictionaryGradient {
 public:
  DictionaryGradient(const at::Tensor& dictionary, bool enabled)
      : enabled_(enabled), num_codewords_(dictionary.size(1)), dim_(dictionary.size(0)) {
    if (!enabled) return;
    result_ = at::empty_like(dictionary);
    rows_ = result_.t().is_contiguous()
                ? result_.t()
                : at::empty({num_codewords_, dim_}, dictionary.options());
    rows_.zero_();
  }

  bool enabled() const { return enabled_; }
  scalar_t* row(int64_t c) { return rows_.mutable_data_ptr<scalar_t>() + c * dim_; }

  // Runs fn(codeword_begin, codeword_end) once per worker's range.
  template <typename F>
  void for_each_range(const F& fn) const {
    const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_codewords_));
    at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        fn(num_codewords_ * r / ranges, num_codewords_ * (r + 1) / ranges);
      }
    });
  }

  // Adds coefficient(e) * source_p to the row of codeword indices[e], for
  // every kept entry e = p * k + j: the gradient of a term sum_e coef_e *
  // <C[:, indices_e], source_p>. `source` is an (N, D, H, W) map.
  template <typename Coefficient>
  void add_weighted_pixels(const scalar_t* source, const PixelGrid& grid, const int64_t* indices,
                           int64_t k, const Coefficient& coefficient) {
    if (!enabled_) return;
    const int64_t tile = tile_pixels(num_codewords_);
    for_each_range([&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> pixels(tile * dim_);
      for (int64_t p0 = 0; p0 < grid.pixels(); p0 += tile) {
        const int64_t count = std::min(tile, grid.pixels() - p0);
        gather_tile(source, grid, p0, count, pixels.data());
        for (int64_t e = p0 * k; e < (p0 + count) * k; ++e) {
          if (indices[e] < lo || indices[e] >= hi) continue;
          axpy(coefficient(e), pixels.data() + (e / k - p0) * dim_, row(indices[e]), dim_);
        }
      }
    });
  }

  at::Tensor finish(const at::Tensor& like) {
    if (!enabled_) return at::empty({0}, like.options());
    if (!result_.t().is_contiguous()) result_.copy_(rows_.t());
    return result_;
  }

 private:
  bool enabled_;
  int64_t num_codewords_, dim_;
  at::Tensor result_, rows_;
};

// Whether any of a pixel's k kept indices lies in [lo, hi).
inline bool has_index_in(const int64_t* indices, int64_t k, int64_t lo, int64_t hi) {
  for (int64_t j = 0; j < k; ++j) {
    if (indices[j] >= lo && indices[j] < hi) return true;
  }
  return false;
}

// Intercept gradient partials, one per chunk, summed in chunk order.
class ChunkSums {
 public:
  explicit ChunkSums(int64_t num_chunks) : sums_(num_chunks, 0.0) {}
  double& operator[](int64_t chunk) { return sums_[chunk]; }
  double total() const {
    double t = 0.0;
    for (double s : sums_) t += s;
    return t;
  }

 private:
  std::vector<double> sums_;
};

}  // namespace srm_ext::cpu
