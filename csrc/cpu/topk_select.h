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

// Exact selection by one pass of sorted insertion over all K entries.
template <typename scalar_t>
void select_by_insertion(const scalar_t* row, int64_t K, int64_t k, scalar_t bias,
                         scalar_t* top_pre, int64_t* top_idx) {
  int64_t count = 0;
  for (int64_t c = 0; c < K; ++c) {
    const scalar_t v = row[c] + bias;
    if (count == k && !ranks_before<scalar_t>(v, c, top_pre[k - 1], top_idx[k - 1])) continue;
    count = insert_candidate(v, c, count, k, top_pre, top_idx);
  }
}

constexpr int64_t kScreenBlock = 16;

// Selects the top-k of row[c] + bias, c in [0, K). Writes the kept
// pre-activations to top_pre and their indices to top_idx, best first.
// `scratch` must hold K indices when k > kInsertionSelectMaxK, else
// K / kScreenBlock values.
//
// Screening: the k-th largest of the blocks' maxima is a lower bound t on the
// k-th largest entry (k blocks each hold an entry >= t), so only entries
// >= t can be kept. One vectorizable pass finds the block maxima; the exact
// insertion then visits, in index order, only the few blocks that reach t.
template <typename scalar_t>
void select_topk(const scalar_t* row, int64_t K, int64_t k, scalar_t bias,
                 scalar_t* top_pre, int64_t* top_idx, void* scratch) {
  if (k > kInsertionSelectMaxK) {
    auto* order = static_cast<int64_t*>(scratch);
    std::iota(order, order + K, int64_t{0});
    std::partial_sort(order, order + k, order + K, [&](int64_t a, int64_t b) {
      return ranks_before<scalar_t>(row[a] + bias, a, row[b] + bias, b);
    });
    for (int64_t j = 0; j < k; ++j) {
      top_idx[j] = order[j];
      top_pre[j] = row[order[j]] + bias;
    }
    return;
  }
  const int64_t num_blocks = K / kScreenBlock;
  if (num_blocks < 2 * k) {
    select_by_insertion(row, K, k, bias, top_pre, top_idx);
    return;
  }
  auto* maxima = static_cast<scalar_t*>(scratch);
  int has_nan = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    // Lane-wise over the block's two halves, then across the lanes: the
    // first loop has no loop-carried dependency, so it vectorizes.
    constexpr int kLanes = kScreenBlock / 2;
    const scalar_t* block = row + b * kScreenBlock;
    scalar_t lanes[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t lo = block[l] + bias, hi = block[l + kLanes] + bias;
      lanes[l] = lo > hi ? lo : hi;
      has_nan |= (lo != lo) | (hi != hi);
    }
    scalar_t m = lanes[0];
    for (int l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
    maxima[b] = m;
  }
  if (has_nan) {  // NaN ranks first; the plain pass handles it exactly
    select_by_insertion(row, K, k, bias, top_pre, top_idx);
    return;
  }
  // The k-th largest block maximum, by insertion into top_pre (reused).
  int64_t count = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (count == k && !(maxima[b] > top_pre[k - 1])) continue;
    int64_t pos = count < k ? count++ : k - 1;
    while (pos > 0 && maxima[b] > top_pre[pos - 1]) {
      top_pre[pos] = top_pre[pos - 1];
      --pos;
    }
    top_pre[pos] = maxima[b];
  }
  const scalar_t bound = top_pre[k - 1];

  count = 0;
  auto visit = [&](int64_t c) {
    const scalar_t v = row[c] + bias;
    if (v < bound) return;
    if (count == k && !ranks_before<scalar_t>(v, c, top_pre[k - 1], top_idx[k - 1])) return;
    count = insert_candidate(v, c, count, k, top_pre, top_idx);
  };
  for (int64_t b = 0; b < num_blocks; ++b) {
    if (maxima[b] < bound) continue;
    // Which entries of a block reach the bound is unpredictable: collect
    // them without branching, then visit only those.
    int64_t candidates[kScreenBlock];
    int64_t n = 0;
    const scalar_t* block = row + b * kScreenBlock;
    for (int64_t i = 0; i < kScreenBlock; ++i) {
      candidates[n] = b * kScreenBlock + i;
      n += block[i] + bias >= bound;
    }
    for (int64_t j = 0; j < n; ++j) visit(candidates[j]);
  }
  for (int64_t c = num_blocks * kScreenBlock; c < K; ++c) visit(c);
}

}  // namespace srm_ext::cpu
