// The float32 screening steps of TopkSelector, in vector lanes and compiled
// once per instruction set (SRM_EXT_MULTIVERSION). Each gives exactly what
// its template in topk_select.h gives.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector values never cross a call
#endif

#include "topk_select.h"

#include <limits>

#include "float8.h"
#include "vector_math.h"

namespace srm_ext::cpu {

#if defined(__GNUC__)
static_assert(kScreenBlock == 16, "a block is two vectors of eight");

namespace {

// Above these sizes the quadratic counts below cost more than the plain
// versions' sorted insertion.
constexpr int64_t kCountedMaxima = 256;
constexpr int64_t kRankedCandidates = 256;

SRM_EXT_INLINE Float8 max8(Float8 a, Float8 b) { return a > b ? a : b; }

// Lane l of the result is the largest lane of m[l]: the transpose network
// with each stage's two results reduced by max.
SRM_EXT_INLINE Float8 lane_maxima(const Float8 (&m)[8]) {
  Float8 t[4], u[2];
  for (int i = 0; i < 4; ++i) {
    t[i] = max8(interleave_lanes_low(m[2 * i], m[2 * i + 1]),
                interleave_lanes_high(m[2 * i], m[2 * i + 1]));
  }
  for (int i = 0; i < 2; ++i) {
    u[i] = max8(interleave_pairs_low(t[2 * i], t[2 * i + 1]),
                interleave_pairs_high(t[2 * i], t[2 * i + 1]));
  }
  return max8(join_low_halves(u[0], u[1]), join_high_halves(u[0], u[1]));
}

SRM_EXT_INLINE int64_t lane_total(Int8 v) {
  int64_t total = 0;
  for (int l = 0; l < 8; ++l) total += v[l];
  return total;
}

}  // namespace

// Eight blocks at a time: their lane-wise maxima are reduced across lanes
// together, like an 8 x 8 transpose.
SRM_EXT_MULTIVERSION bool block_maxima(const float* row, int64_t num_blocks, float bias,
                                       float* maxima) {
  Int8 nan = {};
  int64_t b = 0;
  for (; b + 8 <= num_blocks; b += 8) {
    Float8 m[8];
    for (int i = 0; i < 8; ++i) {
      // With the bias added first, as the template does: a NaN or infinite
      // bias can make NaN of any entry.
      const Float8 lo = load8(row + (b + i) * kScreenBlock) + bias;
      const Float8 hi = load8(row + (b + i) * kScreenBlock + 8) + bias;
      nan |= (lo != lo) | (hi != hi);
      m[i] = max8(lo, hi);
    }
    store8(maxima + b, lane_maxima(m));
  }
  const bool tail_nan = block_maxima<float>(row + b * kScreenBlock, num_blocks - b, bias,
                                            maxima + b);
  return tail_nan || lane_total(nan) != 0;
}

// v is the k-th largest exactly when it is the largest value with at least
// k values >= it: count those for eight values at a time.
SRM_EXT_MULTIVERSION float kth_largest(const float* values, int64_t n, int64_t k, float* work) {
  if (n > kCountedMaxima) return kth_largest<float>(values, n, k, work);
  const float lowest = -std::numeric_limits<float>::infinity();
  Float8 best = broadcast8(lowest);
  const Int8 needed = Int8{} + static_cast<int32_t>(k);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Float8 vi = load8(values + i);
    Int8 count = {};
    for (int64_t j = 0; j < n; ++j) count -= broadcast8(values[j]) >= vi;
    best = max8(best, count >= needed ? vi : broadcast8(lowest));
  }
  float result = lowest;
  for (int l = 0; l < 8; ++l) result = best[l] > result ? best[l] : result;
  for (; i < n; ++i) {
    int64_t count = 0;
    for (int64_t j = 0; j < n; ++j) count += values[j] >= values[i];
    if (count >= k && values[i] > result) result = values[i];
  }
  return result;
}

// The rank of candidate i is the number that rank before it: larger values,
// and equal values at lower indices (candidates come in index order). Each
// candidate with rank < k goes straight to its place.
SRM_EXT_MULTIVERSION void best_candidates(const float* values, const int64_t* indices, int64_t n,
                                          int64_t k, float* top_pre, int64_t* top_idx) {
  if (n > kRankedCandidates) {
    best_by_insertion(values, indices, n, k, top_pre, top_idx);
    return;
  }
  const Int8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  // The last n % 8 values, padded with NaN (it compares false either way),
  // so every candidate is ranked in whole vectors.
  const int64_t full = n / 8 * 8;
  float tail[8];
  for (int l = 0; l < 8; ++l) {
    tail[l] = full + l < n ? values[full + l] : std::numeric_limits<float>::quiet_NaN();
  }
  const Float8 tail_values = load8(tail);
  for (int64_t i = 0; i < n; ++i) {
    const float v = values[i];
    const Float8 vi = broadcast8(v);
    const Int8 position_i = Int8{} + static_cast<int32_t>(i);
    auto ranks_before_i = [&](Float8 vj, int64_t j) {
      const Int8 earlier = (lane + static_cast<int32_t>(j)) < position_i;
      return (vj > vi) | ((vj == vi) & earlier);
    };
    Int8 before = ranks_before_i(tail_values, full);
    for (int64_t j = 0; j < full; j += 8) before += ranks_before_i(load8(values + j), j);
    const int64_t rank = -lane_total(before);
    if (rank < k) {
      top_pre[rank] = v;
      top_idx[rank] = indices[i];
    }
  }
}

#else

bool block_maxima(const float* row, int64_t num_blocks, float bias, float* maxima) {
  return block_maxima<float>(row, num_blocks, bias, maxima);
}

float kth_largest(const float* values, int64_t n, int64_t k, float* work) {
  return kth_largest<float>(values, n, k, work);
}

void best_candidates(const float* values, const int64_t* indices, int64_t n, int64_t k,
                     float* top_pre, int64_t* top_idx) {
  best_by_insertion(values, indices, n, k, top_pre, top_idx);
}

#endif

}  // namespace srm_ext::cpu
