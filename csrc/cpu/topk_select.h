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
  int64_t count = 0;
  for (int64_t c = 0; c < K; ++c) {
    const scalar_t v = row[c] + bias;
    int64_t pos;
    if (count == k) {
      // c is larger than every kept index, so an equal value never enters.
      if (!ranks_before<scalar_t>(v, c, top_pre[k - 1], top_idx[k - 1])) continue;
      pos = k - 1;
    } else {
      pos = count++;
    }
    while (pos > 0 && ranks_before<scalar_t>(v, c, top_pre[pos - 1], top_idx[pos - 1])) {
      top_pre[pos] = top_pre[pos - 1];
      top_idx[pos] = top_idx[pos - 1];
      --pos;
    }
    top_pre[pos] = v;
    top_idx[pos] = c;
  }
}

}  // namespace srm_ext::cpu
