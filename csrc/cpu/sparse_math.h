// Pieces shared by the sparse kernels: the sigmoid of kept pre-activations
// and the dictionary-gradient accumulator. Codewords are read from the
// transposed dictionary (K x D, row-major, combined with combine_rows and
// dot_rows) so each codeword is a contiguous D-vector.
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

// dst (C x R) = src (R x C)^T, both contiguous. float32 goes through the
// register-blocked transpose, a band of source columns per task: torch's
// strided copy moves a dictionary-sized matrix at a fraction of memory speed
// (5 ms for 1024 x 2048 on two cores, several times the kernels' own work).
inline void transpose_into(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && dst.is_contiguous() && src.dim() == 2 &&
                        dst.sizes() == at::IntArrayRef({src.size(1), src.size(0)}));
  if (src.scalar_type() != at::kFloat) {
    dst.copy_(src.t());
    return;
  }
  const int64_t rows = src.size(0), cols = src.size(1);
  constexpr int64_t kBand = 64;  // source columns per task: 4 cache lines of each row
  const float* from = src.const_data_ptr<float>();
  float* to = dst.mutable_data_ptr<float>();
  at::parallel_for(0, (cols + kBand - 1) / kBand, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kBand;
      transpose(from + j0, cols, rows, std::min(kBand, cols - j0), to + j0 * rows, rows);
    }
  });
}

// The codewords as the rows of a contiguous (K, D) tensor: the dictionary
// itself when it is codeword-major, else a transposed copy.
inline at::Tensor codeword_rows(const at::Tensor& dictionary) {
  if (dictionary.t().is_contiguous()) return dictionary.t();
  auto rows = at::empty({dictionary.size(1), dictionary.size(0)}, dictionary.options());
  transpose_into(dictionary.contiguous(), rows);
  return rows;
}

// The dictionary gradient, accumulated codeword by codeword. The kept entries
// of a block of pixels are grouped by codeword (a counting sort, pixel order
// kept); each worker then owns a range of codewords and adds every entry of
// a codeword to its row, so the row stays in registers or L1 while the
// entries' pixel rows stream past. Workers never share a value, there are
// no per-thread copies, and each value is summed in the same order whatever
// the thread count (bitwise reproducible).
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
    starts_.resize(num_codewords_ + 1);
  }

  // Adds sum_t weight_t * source_t (D values each) to the gradient row of
  // codeword indices[e], for every kept entry e = p * k + j of pixels
  // [p0, p0 + count): terms(e, weights, sources) writes entry e's kTerms
  // weights and source pointers.
  template <int kTerms, typename EntryTerms>
  void add_entries(const int64_t* indices, int64_t k, int64_t p0, int64_t count,
                   const EntryTerms& terms) {
    if (!enabled_) return;
    group_by_codeword(indices, p0 * k, (p0 + count) * k);
    // Each worker takes a range of codewords holding about an equal share of
    // the entries: a trained dictionary's codewords are far from equally
    // used, and equal ranges of codewords would leave workers waiting.
    const int64_t workers = std::max<int64_t>(at::get_num_threads(), 1);
    const int64_t total = starts_[num_codewords_];
    auto first_codeword = [&](int64_t worker) {
      if (worker >= workers) return num_codewords_;
      const int64_t share = total * worker / workers;
      return static_cast<int64_t>(
          std::lower_bound(starts_.begin(), starts_.end() - 1, share) - starts_.begin());
    };
    // A codeword's terms are added kBatch at a time, each batch in one pass
    // over its row. Batches depend only on the codeword's entries, so the
    // summation order does not depend on the thread count.
    constexpr int kBatch = 16;
    static_assert(kTerms >= 1 && kTerms <= kBatch, "kTerms must fit a batch");
    scalar_t* const rows = rows_.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      scalar_t weights[kBatch];
      const scalar_t* sources[kBatch];
      for (int64_t c = first_codeword(w0); c < first_codeword(w1); ++c) {
        scalar_t* row = rows + c * dim_;
        int n = 0;
        for (int64_t i = starts_[c]; i < starts_[c + 1]; ++i) {
          if (n + kTerms > kBatch) {
            add_weighted_rows(row, dim_, sources, weights, n);
            n = 0;
          }
          terms(entries_[i], weights + n, sources + n);
          n += kTerms;
        }
        if (n > 0) add_weighted_rows(row, dim_, sources, weights, n);
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
    const int64_t block = block_pixels(std::max(dim_, k));
    std::vector<scalar_t> rows(block * dim_);  // the block's pixels, pixel-major
    for_each_pixel_block(grid.pixels(), block, [&](int64_t p0, int64_t count) {
      for_each_piece(p0, count, [&](int64_t, int64_t q0, int64_t n) {
        gather_tile(source, grid, q0, n, rows.data() + (q0 - p0) * dim_);
      });
      add_entries<1>(indices, k, p0, count,
                     [&](int64_t e, scalar_t* weights, const scalar_t** sources) {
                       weights[0] = coefficient(e);
                       sources[0] = rows.data() + (e / k - p0) * dim_;
                     });
    });
  }

  at::Tensor finish(const at::Tensor& like) {
    if (!enabled_) return at::empty({0}, like.options());
    if (!result_.t().is_contiguous()) transpose_into(rows_, result_);
    return result_;
  }

 private:
  // Afterwards entries_[starts_[c], starts_[c + 1]) are the entries in
  // [e0, e1) of codeword c, in increasing order.
  void group_by_codeword(const int64_t* indices, int64_t e0, int64_t e1) {
    std::fill(starts_.begin(), starts_.end(), 0);
    for (int64_t e = e0; e < e1; ++e) ++starts_[indices[e] + 1];
    for (int64_t c = 0; c < num_codewords_; ++c) starts_[c + 1] += starts_[c];
    cursor_.assign(starts_.begin(), starts_.end() - 1);
    entries_.resize(e1 - e0);
    for (int64_t e = e0; e < e1; ++e) entries_[cursor_[indices[e]]++] = e;
  }

  bool enabled_;
  int64_t num_codewords_, dim_;
  at::Tensor result_, rows_;
  std::vector<int64_t> starts_, cursor_, entries_;
};

}  // namespace srm_ext::cpu
