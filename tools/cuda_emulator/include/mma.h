// nvcuda::wmma for the CPU emulator. Every lane holds the whole tile of a
// fragment (the element-to-lane layout is the hardware's business; code that
// only maps over fragment elements works either way). Loads, stores and
// products are warp-collective, as on the GPU: each synchronises the warp.
// Products are exact and summed in float32 in k order. A tf32 operand is
// used as the tensor cores read it: its 13 low mantissa bits are ignored, so
// an element not rounded with __float_to_tf32 is truncated.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_emulator.h"
#include "tf32.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision

enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct Extent;
template <int M, int N, int K>
struct Extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename E>
float operand(E v) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    return cuda_emulator::tf32_bits(v);
  } else {
    return as_float(v);
  }
}

inline void collective(const char* what) { cuda_emulator::sync_warp(0xffffffffu, what); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::Extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major tile
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  detail::collective("wmma::fill_fragment");
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Layout, void>, "operand fragments carry a layout");
  detail::collective("wmma::load_matrix_sync");
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(P)) % 16 != 0) {
    cuda_emulator::fail("wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not a "
                        "multiple of 16 bytes");
  }
  for (int r = 0; r < f.rows; ++r) {
    for (int c = 0; c < f.cols; ++c) {
      const size_t at = std::is_same_v<Layout, row_major> ? size_t(r) * ldm + c
                                                          : size_t(c) * ldm + r;
      f.x[r * f.cols + c] = p[at];
    }
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::collective("wmma::store_matrix_sync");
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(float)) % 16 != 0) {
    cuda_emulator::fail("wmma::store_matrix_sync: pointer not 32-byte aligned or ldm not a "
                        "multiple of 16 bytes");
  }
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      const size_t at = layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r;
      p[at] = f.x[r * N + c];
    }
  }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, TC>& c) {
  detail::collective("wmma::mma_sync");
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int kk = 0; kk < K; ++kk) {
        acc += detail::operand<TA>(a.x[i * K + kk]) * detail::operand<TB>(b.x[kk * N + j]);
      }
      out[i * N + j] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

}  // namespace wmma
}  // namespace nvcuda
