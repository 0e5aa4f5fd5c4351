// Pieces shared by the sparse kernels: the codeword combination, the
// dictionary-gradient accumulator and fixed-order partial sums. Codewords are
// read from the transposed dictionary (K x D, row-major) so each codeword is
// a contiguous D-vector.
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
  combine_rows(codewords, dim, dim, indices, weights, k, out);
}

// The dictionary gradient, accumulated without per-thread copies: worker r
// owns channels [d0, d1) of every codeword row and adds, in pixel order, the
// slice of every kept entry's contribution. Workers never share a value and
// do no redundant work; each value is summed in the same order whatever the
// thread count (bitwise reproducible); the only buffer is the gradient itself.
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

  scalar_t* row(int64_t c) { return rows_.mutable_data_ptr<scalar_t>() + c * dim_; }

  // Runs fn(d0, d1) once per worker's slice of channels (multiples of 8
  // wide, so the vector loops stay aligned to whole registers).
  template <typename F>
  void for_each_slice(const F& fn) const {
    constexpr int64_t kAlign = 8;
    const int64_t units = (dim_ + kAlign - 1) / kAlign;
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
    at::parallel_for(0, slices, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        fn(std::min(dim_, units * r / slices * kAlign),
           std::min(dim_, units * (r + 1) / slices * kAlign));
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
    for_each_slice([&](int64_t d0, int64_t d1) {
      const int64_t width = d1 - d0;
      std::vector<scalar_t> pixels(tile * width);
      for (int64_t p0 = 0; p0 < grid.pixels(); p0 += tile) {
        const int64_t count = std::min(tile, grid.pixels() - p0);
        gather_tile(source, grid, p0, count, pixels.data(), d0, d1);
        for (int64_t e = p0 * k; e < (p0 + count) * k; ++e) {
          axpy(coefficient(e), pixels.data() + (e / k - p0) * width, row(indices[e]) + d0, width);
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
