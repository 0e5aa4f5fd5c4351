// Out-of-line float32 vector helpers, compiled once per instruction set
// (see SRM_EXT_MULTIVERSION) and picked by the CPU at load time.
#if defined(__GNUC__)
// Vector values are passed only between functions inlined into one clone;
// the note that AVX changes the ABI for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "vector_math.h"

#include "float8.h"

namespace srm_ext::cpu {

SRM_EXT_MULTIVERSION float dot(const float* a, const float* b, int64_t n) {
  return sum_in_lanes<float>(n, [&](int64_t i) { return a[i] * b[i]; });
}

#if defined(__GNUC__)

// exp_approx on eight lanes.
static inline Float8 exp8(Float8 x) {
  const Float8 low = Float8{} + kExpLow, high = Float8{} + kExpHigh;
  const Int8 overflow = x > high;
  x = x < low ? low : x;  // NaN compares false and passes through
  x = overflow ? high : x;
  Float8 n;
  const Float8 p = exp_reduced(x, n);
  const Int8 e = __builtin_convertvector(n, Int8), half = e >> 1;
  const Int8 bits_half = (half + 127) << 23, bits_rest = (e - half + 127) << 23;
  const Float8 result = p * reinterpret_cast<const Float8&>(bits_half) *
                        reinterpret_cast<const Float8&>(bits_rest);
  return overflow ? Float8{} + __builtin_inff() : result;
}

// log(x) on eight lanes within about 2 ulp (Cephes' logf): x = 2^e * m with
// m in [sqrt(1/2), sqrt(2)) and log(m) = f - f^2/2 + f^3 P(f), f = m - 1.
// Subnormal x is scaled up by 2^23 first. log(0) = -inf, log(inf) = inf; NaN
// and negative x give NaN.
static SRM_EXT_INLINE Float8 log8(Float8 x) {
  constexpr float kSmallestNormal = 1.17549435e-38f;
  const Int8 subnormal = x < kSmallestNormal;  // all ones where true
  const Float8 scaled = subnormal ? x * 8388608.0f : x;
  const Int8 bits = reinterpret_cast<const Int8&>(scaled);
  const Int8 mantissa_bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  Float8 m = reinterpret_cast<const Float8&>(mantissa_bits);
  const Int8 halve = m > 1.41421356f;
  m = halve ? m * 0.5f : m;
  const Int8 e = (bits >> 23) - 127 - halve - (subnormal & 23);  // halve is -1 where true
  const Float8 exponent = __builtin_convertvector(e, Float8);
  const Float8 f = m - 1.0f;
  const Float8 f2 = f * f;
  Float8 p = f * 0.0f + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const Float8 y = p * f * f2 + exponent * -2.12194440e-4f - 0.5f * f2;
  Float8 result = (f + y) + exponent * 0.693359375f;
  const Float8 inf = Float8{} + __builtin_inff();
  result = x == 0.0f ? -inf : result;
  result = x == inf ? inf : result;
  return (x < 0.0f) | (x != x) ? Float8{} + __builtin_nanf("") : result;
}

// log1p(x) on eight lanes: log(u) * x / (u - 1) with u = 1 + x rounded, which
// cancels the rounding of u (Goldberg), and x itself where u rounds to 1.
static SRM_EXT_INLINE Float8 log1p8(Float8 x) {
  const Float8 u = 1.0f + x;
  const Float8 ratio = log8(u) * x / (u - 1.0f);
  return u == 1.0f ? x : ratio;
}

typedef double Double4 __attribute__((vector_size(32), aligned(8), may_alias));

// sums[0, 8) += v, in double precision.
static inline void add_to_doubles(double* sums, Float8 v) {
  Double4* s = reinterpret_cast<Double4*>(sums);  // not auto: it would drop the alignment
  s[0] += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), Double4);
  s[1] += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), Double4);
}

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

// Four rows per pass over the output: each pass streams four whole rows
// front to back and the output stays in L1. (Walking all k rows per column
// block instead keeps k streams a row apart in flight, which the hardware
// prefetcher cannot follow once the rows leave the L2.)
SRM_EXT_MULTIVERSION void combine_rows(const float* rows, int64_t dim, const int64_t* indices,
                                       const float* weights, int64_t k, float* out) {
  std::fill_n(out, dim, 0.0f);
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const float* r0 = rows + indices[j] * dim;
    const float* r1 = rows + indices[j + 1] * dim;
    const float* r2 = rows + indices[j + 2] * dim;
    const float* r3 = rows + indices[j + 3] * dim;
    const float w0 = weights[j], w1 = weights[j + 1], w2 = weights[j + 2], w3 = weights[j + 3];
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      store8(out + d, load8(out + d) + w0 * load8(r0 + d) + w1 * load8(r1 + d) +
                          w2 * load8(r2 + d) + w3 * load8(r3 + d));
    }
    for (; d < dim; ++d) out[d] += w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d];
  }
  for (; j < k; ++j) {
    const float* r = rows + indices[j] * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] += weights[j] * r[d];
  }
}

// The row's values stay in registers, 64 at a time, while all n sources
// stream past: one load per multiply-add, where adding the sources one by one
// loads and stores the row for each.
SRM_EXT_MULTIVERSION void add_weighted_rows(float* row, int64_t dim, const float* const* sources,
                                            const float* weights, int64_t n) {
  int64_t d = 0;
  for (; d + 64 <= dim; d += 64) {
    Float8 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = load8(row + d + 8 * u);
    for (int64_t i = 0; i < n; ++i) {
      const Float8 w = broadcast8(weights[i]);
      const float* s = sources[i] + d;
      for (int u = 0; u < 8; ++u) acc[u] += w * load8(s + 8 * u);
    }
    for (int u = 0; u < 8; ++u) store8(row + d + 8 * u, acc[u]);
  }
  for (; d + 8 <= dim; d += 8) {
    Float8 acc = load8(row + d);
    for (int64_t i = 0; i < n; ++i) acc += broadcast8(weights[i]) * load8(sources[i] + d);
    store8(row + d, acc);
  }
  for (; d < dim; ++d) {
    float acc = row[d];
    for (int64_t i = 0; i < n; ++i) acc += weights[i] * sources[i][d];
    row[d] = acc;
  }
}

SRM_EXT_MULTIVERSION float sigmoid_exp_sum_row(float* row, int64_t n, float bias,
                                             double* column_sums) {
  Float8 exp_sum = {};
  int64_t c = 0;
  // Two vectors per iteration: each is a long dependent chain (exp, divide,
  // exp), and two independent chains keep the FMA units busy. Written out
  // interleaved: as two calls of one helper, the compiler emits one chain
  // after the other, which measured slower.
  Float8 exp_sum2 = {};
  for (; c + 16 <= n; c += 16) {
    const Float8 q = 1.0f / (1.0f + exp8(-(load8(row + c) + bias)));
    const Float8 q2 = 1.0f / (1.0f + exp8(-(load8(row + c + 8) + bias)));
    store8(row + c, q);
    store8(row + c + 8, q2);
    exp_sum += exp_unit_interval(q);
    exp_sum2 += exp_unit_interval(q2);
    add_to_doubles(column_sums + c, q);
    add_to_doubles(column_sums + c + 8, q2);
  }
  exp_sum += exp_sum2;
  for (; c + 8 <= n; c += 8) {
    const Float8 q = 1.0f / (1.0f + exp8(-(load8(row + c) + bias)));
    store8(row + c, q);
    exp_sum += exp_unit_interval(q);
    add_to_doubles(column_sums + c, q);
  }
  float total = lane_sum(exp_sum);
  for (; c < n; ++c) {
    row[c] = sigmoid_approx(row[c] + bias);
    total += exp_unit_interval(row[c]);
    column_sums[c] += row[c];
  }
  return total;
}

SRM_EXT_MULTIVERSION double binary_cross_entropy_sum(const float* mean, const float* target,
                                                     int64_t n) {
  // Clamps as x < clamp ? clamp : x, which lets NaN through like std::max.
  auto clamped = [](Float8 x) { return x < kBceLogClamp ? Float8{} + kBceLogClamp : x; };
  alignas(32) double sums[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Float8 m = load8(mean + i), t = load8(target + i);
    add_to_doubles(sums, -(t * clamped(log8(m)) + (1.0f - t) * clamped(log1p8(-m))));
  }
  double total = 0;
  for (; i < n; ++i) total += binary_cross_entropy(mean[i], target[i]);
  for (double s : sums) total += s;
  return total;
}

SRM_EXT_MULTIVERSION void softmax_sigmoid_grad_row(float* row, int64_t n, float softmax_scale,
                                                   const float* add) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const Float8 q = load8(row + c);
    store8(row + c, (softmax_scale * exp_unit_interval(q) + load8(add + c)) * q * (1.0f - q));
  }
  for (; c < n; ++c) {
    const float q = row[c];
    row[c] = (softmax_scale * exp_unit_interval(q) + add[c]) * q * (1.0f - q);
  }
}

// dst[j][i] = src[i][j] for an 8 x 8 block, in registers.
static SRM_EXT_INLINE void transpose8x8(const float* src, int64_t src_stride, float* dst,
                                        int64_t dst_stride) {
  Float8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = interleave_lanes_low(r[i], r[i + 1]);
    t[i + 1] = interleave_lanes_high(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = interleave_pairs_low(t[i], t[i + 2]);
    u[i + 1] = interleave_pairs_high(t[i], t[i + 2]);
    u[i + 2] = interleave_pairs_low(t[i + 1], t[i + 3]);
    u[i + 3] = interleave_pairs_high(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    store8(dst + i * dst_stride, join_low_halves(u[i], u[i + 4]));
    store8(dst + (i + 4) * dst_stride, join_high_halves(u[i], u[i + 4]));
  }
}

// Column blocks outer: each pass writes 8 destination rows front to back.
SRM_EXT_MULTIVERSION void transpose(const float* src, int64_t src_stride, int64_t rows,
                                    int64_t cols, float* dst, int64_t dst_stride) {
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) {
      transpose8x8(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
    }
    for (; i < rows; ++i) {
      for (int64_t q = 0; q < 8; ++q) dst[(j + q) * dst_stride + i] = src[i * src_stride + j + q];
    }
  }
  for (; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
}

#else
void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
               int64_t dst_stride) {
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
}

double binary_cross_entropy_sum(const float* mean, const float* target, int64_t n) {
  return binary_cross_entropy_sum<float>(mean, target, n);
}

float sigmoid_exp_sum_row(float* row, int64_t n, float bias, double* column_sums) {
  float total = 0;
  for (int64_t c = 0; c < n; ++c) {
    row[c] = sigmoid_approx(row[c] + bias);
    total += exp_unit_interval(row[c]);
    column_sums[c] += row[c];
  }
  return total;
}

void softmax_sigmoid_grad_row(float* row, int64_t n, float softmax_scale, const float* add) {
  for (int64_t c = 0; c < n; ++c) {
    const float q = row[c];
    row[c] = (softmax_scale * exp_unit_interval(q) + add[c]) * q * (1.0f - q);
  }
}

void dot_rows(const float* v, const float* rows, int64_t dim, const int64_t* indices, int64_t k,
              float* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = dot(v, rows + indices[j] * dim, dim);
}

void combine_rows(const float* rows, int64_t dim, const int64_t* indices, const float* weights,
                  int64_t k, float* out) {
  std::fill_n(out, dim, 0.0f);
  for (int64_t j = 0; j < k; ++j) axpy(weights[j], rows + indices[j] * dim, out, dim);
}

void add_weighted_rows(float* row, int64_t dim, const float* const* sources,
                       const float* weights, int64_t n) {
  for (int64_t i = 0; i < n; ++i) axpy(weights[i], sources[i], row, dim);
}
#endif

}  // namespace srm_ext::cpu
