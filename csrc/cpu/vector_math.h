// Elementwise math written so the compiler vectorizes it: no branches, no
// calls into libm inside hot loops. On x86-64 Linux, row functions marked
// SRM_EXT_MULTIVERSION get an x86-64-v3 (AVX2 + FMA) clone picked at load
// time, so the binary still runs on CPUs without them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define SRM_EXT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SRM_EXT_MULTIVERSION
#endif

// Helpers called from multiversioned functions must be inlined into each
// clone, or they run the baseline instructions in all of them.
#if defined(__GNUC__)
#define SRM_EXT_INLINE inline __attribute__((always_inline))
#else
#define SRM_EXT_INLINE inline
#endif

namespace srm_ext::cpu {

// exp(x) within about 2 ulp for a float, or for a vector of floats (the
// vector clone in vector_math.cpp): x = n*ln2 + r with |r| <= ln2/2 and a
// degree-6 polynomial for exp(r) (Cephes' expf). Returns exp(r) and sets n;
// the caller assembles 2^n from the bits of two normal floats 2^(n/2) and
// 2^(n - n/2): x must be clamped to [kExpLow, kExpHigh], where n lies in
// [-126, 128] and 2^128 alone is not a float.
template <typename V>
SRM_EXT_INLINE V exp_reduced(V x, V& n) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  n = (x * 1.44269504088896341f + kRound) - kRound;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = r * 0.0f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// log(smallest normal float) and log(largest float).
constexpr float kExpLow = -87.33654f, kExpHigh = 88.72283f;

// 2^e for an integer e in [-126, 127], from its bits.
SRM_EXT_INLINE float power_of_two(int32_t e) {
  const int32_t bits = (e + 127) << 23;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// Above kExpHigh the result is +inf, where float32 exp overflows too (so a
// sigmoid underflows to 0 where torch's does); below kExpLow it is clamped
// (absolute error below 1e-38); NaN propagates.
SRM_EXT_INLINE float exp_approx(float x) {
  if (x > kExpHigh) return std::numeric_limits<float>::infinity();
  x = std::max(x, kExpLow);
  float n;
  const float p = exp_reduced(x, n);
  const auto e = static_cast<int32_t>(n), half = e >> 1;
  return p * power_of_two(half) * power_of_two(e - half);
}

inline double exp_approx(double x) { return std::exp(x); }

// exp(q) for q in [0, 1] (a sigmoid's output) within about 1 ulp, for a
// float or a vector of floats: the degree-8 Taylor polynomial about 1/2,
// whose remainder is below 1e-8 there, so no range reduction is needed.
template <typename V>
SRM_EXT_INLINE V exp_unit_interval(V q) {
  const V d = q - 0.5f;
  V p = d * 0.0f + 4.0890905e-05f;
  p = p * d + 3.2712724e-04f;
  p = p * d + 2.2898907e-03f;
  p = p * d + 1.3739344e-02f;
  p = p * d + 6.8696720e-02f;
  p = p * d + 2.7478688e-01f;
  p = p * d + 8.2436064e-01f;
  p = p * d + 1.6487213f;
  return p * d + 1.6487213f;
}

template <typename scalar_t>
SRM_EXT_INLINE scalar_t sigmoid_approx(scalar_t z) {
  return scalar_t(1) / (scalar_t(1) + exp_approx(-z));
}

// sum_{i < n} term(i) with eight independent partial sums: a fixed order
// the compiler can keep in vector lanes (it may not reorder a plain float
// reduction).
template <typename scalar_t, typename Term>
SRM_EXT_INLINE scalar_t sum_in_lanes(int64_t n, const Term& term) {
  constexpr int kLanes = 8;
  scalar_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  }
  scalar_t total = 0;
  for (; i < n; ++i) total += term(i);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  return sum_in_lanes<scalar_t>(n, [&](int64_t i) { return a[i] * b[i]; });
}

// y += alpha * x
template <typename scalar_t>
inline void axpy(scalar_t alpha, const scalar_t* x, scalar_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out[j] = <v, rows[indices[j]]> for j < k; rows is (num_rows x dim).
template <typename scalar_t>
inline void dot_rows(const scalar_t* v, const scalar_t* rows, int64_t dim,
                     const int64_t* indices, int64_t k, scalar_t* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = dot(v, rows + indices[j] * dim, dim);
}

// out = sum_{j < k} weights[j] * rows[indices[j]]; rows is (num_rows x dim).
template <typename scalar_t>
inline void combine_rows(const scalar_t* rows, int64_t dim, const int64_t* indices,
                         const scalar_t* weights, int64_t k, scalar_t* out) {
  std::fill_n(out, dim, scalar_t(0));
  for (int64_t j = 0; j < k; ++j) axpy(weights[j], rows + indices[j] * dim, out, dim);
}

// row += sum_{i < n} weights[i] * sources[i], over dim values.
template <typename scalar_t>
inline void add_weighted_rows(scalar_t* row, int64_t dim, const scalar_t* const* sources,
                              const scalar_t* weights, int64_t n) {
  for (int64_t i = 0; i < n; ++i) axpy(weights[i], sources[i], row, dim);
}

// float32 overloads, chosen over the templates above: the sparse kernels
// spend most of their time here, so they get AVX2 clones and register-blocked
// loops (vector_math.cpp).
float dot(const float* a, const float* b, int64_t n);
void dot_rows(const float* v, const float* rows, int64_t dim, const int64_t* indices, int64_t k,
              float* out);
void combine_rows(const float* rows, int64_t dim, const int64_t* indices, const float* weights,
                  int64_t k, float* out);
void add_weighted_rows(float* row, int64_t dim, const float* const* sources,
                       const float* weights, int64_t n);

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols:
// moves channel-major pixels into pixel-major rows and back, 8 x 8 blocks at
// a time in registers.
void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
               int64_t dst_stride);

// torch.nn.functional.binary_cross_entropy's term for one image mean and
// target. torch clamps each log at -100, which keeps saturated means (exactly
// 0 or 1) finite; NaN propagates.
constexpr float kBceLogClamp = -100.0f;

template <typename scalar_t>
inline double binary_cross_entropy(scalar_t mean, scalar_t target) {
  const double log_m = std::max<double>(std::log(mean), kBceLogClamp);
  const double log_1m = std::max<double>(std::log1p(-mean), kBceLogClamp);
  return -(target * log_m + (1.0 - target) * log_1m);
}

// sum_{i < n} binary_cross_entropy(mean[i], target[i]), in double.
template <typename scalar_t>
inline double binary_cross_entropy_sum(const scalar_t* mean, const scalar_t* target, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += binary_cross_entropy(mean[i], target[i]);
  return total;
}

// The float32 version takes its logs eight lanes at a time (vector_math.cpp):
// libm's scalar log1pf alone cost as much as the whole sigmoid pass.
double binary_cross_entropy_sum(const float* mean, const float* target, int64_t n);

// The predictor loss's two passes over a row of K logits (predictor.cpp
// holds the math): q = sigmoid(z + bias) in place, returning sum_c exp(q_c)
// and adding q to column_sums; then q -> (softmax_scale * exp(q) + add_c) *
// q * (1 - q) in place, where softmax_scale carries the 1 / sum_c exp(q_c)
// of the softmax.
float sigmoid_exp_sum_row(float* row, int64_t n, float bias, double* column_sums);
void softmax_sigmoid_grad_row(float* row, int64_t n, float softmax_scale, const float* add);

}  // namespace srm_ext::cpu
