// Out-of-line float32 vector helpers, compiled once per instruction set
// (see SRM_EXT_MULTIVERSION) and picked by the CPU at load time.
#include "vector_math.h"

namespace srm_ext::cpu {

SRM_EXT_MULTIVERSION float dot(const float* a, const float* b, int64_t n) {
  return sum_in_lanes<float>(n, [&](int64_t i) { return a[i] * b[i]; });
}

SRM_EXT_MULTIVERSION void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

#if defined(__GNUC__)
// The helpers below are inlined into each clone; the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// Eight floats as one value: the compiler maps it onto one AVX2 register (or
// two SSE registers in the baseline clone). Unaligned and alias-safe.
typedef float Float8 __attribute__((vector_size(32), aligned(4), may_alias));

static inline Float8 load8(const float* p) { return *reinterpret_cast<const Float8*>(p); }
static inline void store8(float* p, Float8 v) { *reinterpret_cast<Float8*>(p) = v; }
static inline float lane_sum(Float8 v) {
  float total = 0;
  for (int l = 0; l < 8; ++l) total += v[l];
  return total;
}

// Four rows at a time, each with its own accumulator: independent chains
// keep the FMA units busy where one dot product would wait on each addition.
SRM_EXT_MULTIVERSION void dot_rows(const float* v, const float* rows, int64_t dim,
                                   const int64_t* indices, int64_t k, float* out) {
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const float* r0 = rows + indices[j] * dim;
    const float* r1 = rows + indices[j + 1] * dim;
    const float* r2 = rows + indices[j + 2] * dim;
    const float* r3 = rows + indices[j + 3] * dim;
    Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      const Float8 x = load8(v + d);
      a0 += x * load8(r0 + d);
      a1 += x * load8(r1 + d);
      a2 += x * load8(r2 + d);
      a3 += x * load8(r3 + d);
    }
    float t0 = lane_sum(a0), t1 = lane_sum(a1), t2 = lane_sum(a2), t3 = lane_sum(a3);
    for (; d < dim; ++d) {
      t0 += v[d] * r0[d];
      t1 += v[d] * r1[d];
      t2 += v[d] * r2[d];
      t3 += v[d] * r3[d];
    }
    out[j] = t0;
    out[j + 1] = t1;
    out[j + 2] = t2;
    out[j + 3] = t3;
  }
  for (; j < k; ++j) out[j] = dot(v, rows + indices[j] * dim, dim);
}

// 32 outputs held in four registers while the k rows stream through them:
// one store per output instead of one per row.
SRM_EXT_MULTIVERSION void combine_rows(const float* rows, int64_t dim, const int64_t* indices,
                                       const float* weights, int64_t k, float* out) {
  int64_t d = 0;
  for (; d + 32 <= dim; d += 32) {
    Float8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t j = 0; j < k; ++j) {
      const float* r = rows + indices[j] * dim + d;
      const float w = weights[j];
      a0 += w * load8(r);
      a1 += w * load8(r + 8);
      a2 += w * load8(r + 16);
      a3 += w * load8(r + 24);
    }
    store8(out + d, a0);
    store8(out + d + 8, a1);
    store8(out + d + 16, a2);
    store8(out + d + 24, a3);
  }
  for (; d + 8 <= dim; d += 8) {
    Float8 a = {};
    for (int64_t j = 0; j < k; ++j) a += weights[j] * load8(rows + indices[j] * dim + d);
    store8(out + d, a);
  }
  for (; d < dim; ++d) {
    float a = 0;
    for (int64_t j = 0; j < k; ++j) a += weights[j] * rows[indices[j] * dim + d];
    out[d] = a;
  }
}
#else
void dot_rows(const float* v, const float* rows, int64_t dim, const int64_t* indices, int64_t k,
              float* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = dot(v, rows + indices[j] * dim, dim);
}

void combine_rows(const float* rows, int64_t dim, const int64_t* indices, const float* weights,
                  int64_t k, float* out) {
  std::fill_n(out, dim, 0.0f);
  for (int64_t j = 0; j < k; ++j) axpy(weights[j], rows + indices[j] * dim, out, dim);
}
#endif

}  // namespace srm_ext::cpu
