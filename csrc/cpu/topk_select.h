// Per-pixel top-k selection over K pre-activations.
//
// Order (the spec's): larger value first, NaN above +inf, and among equal
// values the lower codeword index first. Exactly k entries are kept.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace srm_ext::cpu {

// True when (va, ia) ranks strictly before (vb, ib).
template <typename scalar_t>
inline bool ranks_before(scalar_t va, int64_t ia, scalar_t vb, int64_t ib) {
  const bool nan_a = std::isnan(va), nan_b = std::isnan(vb);
  if (nan_a || nan_b) return nan_a && (!nan_b || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// Up to this k, an insertion into a sorted list beats a partial sort: most
// candidates fail the first comparison against the current k-th value.
constexpr int64_t kInsertionSelectMaxK = 64;

// Offers (v, c) to the sorted list top[0, count) of capacity k, where c is
// larger than every index already kept: a full list keeps it only if it
// ranks before the last entry, which most candidates fail at the first
// comparison. Returns the new count.
template <typename scalar_t>
inline int64_t offer_candidate(scalar_t v, int64_t c, int64_t count, int64_t k,
                               scalar_t* top_pre, int64_t* top_idx) {
  if (count == k && !ranks_before<scalar_t>(v, c, top_pre[k - 1], top_idx[k - 1])) return count;
  int64_t pos = count < k ? count++ : k - 1;
  while (pos > 0 && ranks_before<scalar_t>(v, c, top_pre[pos - 1], top_idx[pos - 1])) {
    top_pre[pos] = top_pre[pos - 1];
    top_idx[pos] = top_idx[pos - 1];
    --pos;
  }
  top_pre[pos] = v;
  top_idx[pos] = c;
  return count;
}

// The k best of n candidates (values[i], indices[i]), indices increasing,
// best first, by sorted insertion.
template <typename scalar_t>
void best_by_insertion(const scalar_t* values, const int64_t* indices, int64_t n, int64_t k,
                       scalar_t* top_pre, int64_t* top_idx) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    count = offer_candidate(values[i], indices[i], count, k, top_pre, top_idx);
  }
}

// Exact selection by one pass of sorted insertion over all K entries.
template <typename scalar_t>
void select_by_insertion(const scalar_t* row, int64_t K, int64_t k, scalar_t bias,
                         scalar_t* top_pre, int64_t* top_idx) {
  int64_t count = 0;
  for (int64_t c = 0; c < K; ++c) {
    count = offer_candidate(row[c] + bias, c, count, k, top_pre, top_idx);
  }
}

// The screening steps of TopkSelector. Each template is the plain version;
// the float32 overloads (topk_select.cpp) do the same in vector lanes.
constexpr int64_t kScreenBlock = 16;

// maxima[b] = the largest of row[16b, 16b + 16) + bias, for b < num_blocks.
// Returns whether any of those entries is NaN (then maxima are unspecified).
template <typename scalar_t>
bool block_maxima(const scalar_t* row, int64_t num_blocks, scalar_t bias, scalar_t* maxima) {
  bool has_nan = false;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const scalar_t* block = row + b * kScreenBlock;
    scalar_t m = block[0] + bias;
    for (int64_t i = 0; i < kScreenBlock; ++i) {
      const scalar_t v = block[i] + bias;
      has_nan |= std::isnan(v);
      m = v > m ? v : m;
    }
    maxima[b] = m;
  }
  return has_nan;
}

// The k-th largest of values[0, n) (no NaN, 1 <= k <= n); `work` holds k.
template <typename scalar_t>
scalar_t kth_largest(const scalar_t* values, int64_t n, int64_t k, scalar_t* work) {
  int64_t count = 0;  // work[0, count) sorted, descending
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = values[i];
    if (count == k && !(v > work[k - 1])) continue;
    int64_t pos = count < k ? count++ : k - 1;
    for (; pos > 0 && v > work[pos - 1]; --pos) work[pos] = work[pos - 1];
    work[pos] = v;
  }
  return work[k - 1];
}

// The k best of n candidates (no NaN, indices increasing, n >= k), best
// first.
template <typename scalar_t>
void best_candidates(const scalar_t* values, const int64_t* indices, int64_t n, int64_t k,
                     scalar_t* top_pre, int64_t* top_idx) {
  best_by_insertion(values, indices, n, k, top_pre, top_idx);
}

bool block_maxima(const float* row, int64_t num_blocks, float bias, float* maxima);
float kth_largest(const float* values, int64_t n, int64_t k, float* work);
void best_candidates(const float* values, const int64_t* indices, int64_t n, int64_t k,
                     float* top_pre, int64_t* top_idx);

// Selects, for rows of K pre-activations, the top-k of row[c] + bias. One
// selector per worker thread: it owns its scratch.
//
// Screening: the k-th largest of the 16-entry blocks' maxima is a lower bound
// t on the k-th largest entry (k blocks each hold an entry >= t), so only
// entries >= t can be kept. A vector pass finds the block maxima; only the
// few blocks that reach t are then scanned for candidates, and the
// candidates ranked.
template <typename scalar_t>
class TopkSelector {
 public:
  TopkSelector(int64_t num_codewords, int64_t k)
      : num_codewords_(num_codewords), k_(k), num_blocks_(num_codewords / kScreenBlock),
        screened_(k <= kInsertionSelectMaxK && num_blocks_ >= 2 * k),
        order_(k > kInsertionSelectMaxK ? num_codewords : 0),
        maxima_(screened_ ? num_blocks_ : 0),
        candidate_values_(screened_ ? num_codewords : 0),
        candidate_indices_(screened_ ? num_codewords : 0) {}

  // Writes the kept pre-activations to top_pre and their indices to
  // top_idx, best first.
  void select(const scalar_t* row, scalar_t bias, scalar_t* top_pre, int64_t* top_idx) {
    const int64_t K = num_codewords_, k = k_;
    if (k > kInsertionSelectMaxK) {
      std::iota(order_.begin(), order_.end(), int64_t{0});
      std::partial_sort(order_.begin(), order_.begin() + k, order_.end(),
                        [&](int64_t a, int64_t b) {
                          return ranks_before<scalar_t>(row[a] + bias, a, row[b] + bias, b);
                        });
      for (int64_t j = 0; j < k; ++j) {
        top_idx[j] = order_[j];
        top_pre[j] = row[order_[j]] + bias;
      }
      return;
    }
    // NaN ranks first; the plain pass handles it exactly.
    if (!screened_ || block_maxima(row, num_blocks_, bias, maxima_.data()) ||
        tail_has_nan(row, bias)) {
      select_by_insertion(row, K, k, bias, top_pre, top_idx);
      return;
    }
    const scalar_t bound = kth_largest(maxima_.data(), num_blocks_, k, top_pre);
    scalar_t* values = candidate_values_.data();
    int64_t* indices = candidate_indices_.data();
    int64_t n = 0;
    // Which entries of a block reach the bound is unpredictable: collect
    // them without branching.
    auto collect = [&](int64_t c) {
      const scalar_t v = row[c] + bias;
      values[n] = v;
      indices[n] = c;
      n += v >= bound;
    };
    for (int64_t b = 0; b < num_blocks_; ++b) {
      if (maxima_[b] < bound) continue;
      for (int64_t c = b * kScreenBlock; c < (b + 1) * kScreenBlock; ++c) collect(c);
    }
    for (int64_t c = num_blocks_ * kScreenBlock; c < K; ++c) collect(c);
    best_candidates(values, indices, n, k, top_pre, top_idx);
  }

 private:
  // block_maxima sees whole blocks only, so the last K % 16 entries are
  // checked for NaN here.
  bool tail_has_nan(const scalar_t* row, scalar_t bias) const {
    for (int64_t c = num_blocks_ * kScreenBlock; c < num_codewords_; ++c) {
      if (std::isnan(row[c] + bias)) return true;
    }
    return false;
  }

  int64_t num_codewords_, k_, num_blocks_;
  bool screened_;
  std::vector<int64_t> order_;
  std::vector<scalar_t> maxima_, candidate_values_;
  std::vector<int64_t> candidate_indices_;
};

}  // namespace srm_ext::cpu
