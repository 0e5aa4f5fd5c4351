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

// Inserts (v, c) into the sorted list top[0, count) of capacity k, where c
// is larger than every index already kept. Returns the new count.
template <typename scalar_t>
inline int64_t insert_candidate(scalar_t v, int64_t c, int64_t count, int64_t k,
                                scalar_t* top_pre, int64_t* top_idx) {
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

// Selects the top-k of row[c] + bias, c in [0, K). Writes the kept
// pre-activations to top_pre and their indices to top_idx, best first.
// `scratch` must hold K indices when k > kInsertionSelectMaxK.
template <typename scalar_t>
void select_topk(const scalar_t* row, int64_t K, int64_t k, scalar_t bias,
                 scalar_t* top_pre, int64_t* top_idx, int64_t* scratch) {
  if (k > kInsertionSelectMaxK) {
    std::iota(scratch, scratch + K, int64_t{0});
    std::partial_sort(scratch, scratch + k, scratch + K, [&](int64_t a, int64_t b) {
      return ranks_before<scalar_t>(row[a] + bias, a, row[b] + bias, b);
    });
    for (int64_t j = 0; j < k; ++j) {
      top_idx[j] = scratch[j];
      top_pre[j] = row[scratch[j]] + bias;
    }
    return;
  }
  int64_t count = 0, c = 0;
  for (; c < k; ++c) count = insert_candidate(row[c] + bias, c, count, k, top_pre, top_idx);
  // Once the list is full, a later codeword enters only if it is above the
  // k-th value or NaN (an equal value loses on index). Blocks of candidates
  // are screened with one vectorizable comparison each; most blocks hold no
  // candidate and are skipped.
  constexpr int64_t kBlock = 16;
  scalar_t threshold = top_pre[k - 1];
  if (std::isnan(threshold)) return;  // k NaNs kept: nothing later ranks above
  for (; c < K; c += kBlock) {
    const int64_t n = std::min(kBlock, K - c);
    int any = 0;
    for (int64_t i = 0; i < n; ++i) any |= !(row[c + i] + bias <= threshold);
    if (!any) continue;
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t v = row[c + i] + bias;
      if (v <= threshold) continue;
      insert_candidate(v, c + i, k, k, top_pre, top_idx);
      threshold = top_pre[k - 1];
      if (std::isnan(threshold)) return;
    }
  }
}

}  // namespace srm_ext::cpu
