// The float32 matrix-product kernel, BLIS-style. Per depth block of
// kDepthBlock rows, a row block of the left factor is packed into
// micro-panels of kPanelRows rows (L2), and the right factor a panel of
// kPanelCols columns at a time (L1), right before the micro-kernels that read
// it: nothing the size of the right factor is allocated. A micro-kernel holds
// a kPanelRows x kPanelCols block of the product in AVX-512 registers and
// accumulates it with one fused multiply-add per element and depth row, in
// depth order: every element of the product is summed the same way, whatever
// its position, so equal columns give bitwise-equal results.
#include "matmul.h"

#include "vector_math.h"

#include <algorithm>
#include <cstdlib>
#include <string_view>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define SRM_EXT_AVX512_MATMUL 1
#include <immintrin.h>
#else
#define SRM_EXT_AVX512_MATMUL 0
#endif

namespace srm_ext::cpu {
namespace {

// Two 16-lane vectors of columns by 12 rows: 24 accumulators, 2 registers
// for the right factor's row, the left factor's values broadcast from memory.
constexpr int64_t kPanelCols = 32, kPanelRows = 12;
// A packed right panel (32 KiB) stays in L1, a packed row block of the left
// factor (384 KiB) in L2; the right panel is packed once per row block, so
// row blocks hold the kernels' pixel tiles (up to 512 rows) in one or two.
constexpr int64_t kDepthBlock = 256, kRowBlock = 32 * kPanelRows;

#if SRM_EXT_AVX512_MATMUL

// Lanes [0, n) of a 16-lane mask, n clamped to [0, 16].
__attribute__((target("avx512f"))) inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// out[i][j] (+)= sum_d a[d][i] * b[d][j] for the first `rows` rows and
// `cols` columns of one micro-panel pair; a: depth x kPanelRows, b: depth x
// kPanelCols, both packed.
__attribute__((target("avx512f"))) void micro_kernel(int64_t depth, const float* a,
                                                      const float* b, float* out,
                                                      int64_t out_row_stride, int64_t rows,
                                                      int64_t cols, bool accumulate) {
  __m512 lo[kPanelRows], hi[kPanelRows];
#pragma GCC unroll 12
  for (int i = 0; i < kPanelRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < depth; ++d, a += kPanelRows, b += kPanelCols) {
    const __m512 b_lo = _mm512_loadu_ps(b), b_hi = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kPanelRows; ++i) {
      const __m512 a_i = _mm512_set1_ps(a[i]);
      lo[i] = _mm512_fmadd_ps(a_i, b_lo, lo[i]);
      hi[i] = _mm512_fmadd_ps(a_i, b_hi, hi[i]);
    }
  }
  const __mmask16 mask_lo = first_lanes(cols), mask_hi = first_lanes(cols - 16);
#pragma GCC unroll 12
  for (int i = 0; i < kPanelRows; ++i) {
    if (i >= rows) break;
    float* row = out + i * out_row_stride;
    if (accumulate) {
      lo[i] = _mm512_add_ps(lo[i], _mm512_maskz_loadu_ps(mask_lo, row));
      hi[i] = _mm512_add_ps(hi[i], _mm512_maskz_loadu_ps(mask_hi, row + 16));
    }
    _mm512_mask_storeu_ps(row, mask_lo, lo[i]);
    _mm512_mask_storeu_ps(row + 16, mask_hi, hi[i]);
  }
}

#endif  // SRM_EXT_AVX512_MATMUL

// A strip of n <= width lanes (rows of a, or columns of b) over `depth`
// steps, packed as depth x width values: out[d * width + i] =
// src[i * lane_stride + d * depth_stride], lanes past n zero.
void pack_strip(const float* src, int64_t lane_stride, int64_t depth_stride, int64_t n,
                int64_t depth, int64_t width, float* out) {
  if (depth_stride == 1) {  // each lane's run is contiguous
    transpose(src, lane_stride, n, depth, out, width);
  } else if (lane_stride == 1) {  // each step's lanes are contiguous
    for (int64_t d = 0; d < depth; ++d) {
      std::copy(src + d * depth_stride, src + d * depth_stride + n, out + d * width);
    }
  } else {
    for (int64_t d = 0; d < depth; ++d) {
      for (int64_t i = 0; i < n; ++i) out[d * width + i] = src[i * lane_stride + d * depth_stride];
    }
  }
  for (int64_t d = 0; d < depth; ++d) std::fill(out + d * width + n, out + (d + 1) * width, 0.0f);
}

// Rows [r0, r0 + rows) and depth [d0, d0 + depth) of a as micro-panels of
// kPanelRows rows.
void pack_left(const MatrixRef<float>& a, int64_t r0, int64_t rows, int64_t d0, int64_t depth,
               float* out) {
  for (int64_t p = 0; p < rows; p += kPanelRows, out += depth * kPanelRows) {
    pack_strip(a.data + (r0 + p) * a.row_stride + d0 * a.col_stride, a.row_stride, a.col_stride,
               std::min(kPanelRows, rows - p), depth, kPanelRows, out);
  }
}

// Columns [c0, c0 + kPanelCols) and depth [d0, d0 + depth) of b as one panel.
void pack_right(const MatrixRef<float>& b, int64_t c0, int64_t d0, int64_t depth, float* out) {
  pack_strip(b.data + d0 * b.row_stride + c0 * b.col_stride, b.col_stride, b.row_stride,
             std::min(kPanelCols, b.cols - c0), depth, kPanelCols, out);
}

}  // namespace

bool avx512_matmul_enabled() {
  static const bool enabled = [] {
    const char* choice = std::getenv("SRM_EXT_CPU_GEMM");
    const std::string_view name = choice ? choice : "auto";
    TORCH_CHECK(name == "auto" || name == "blas",
                "SRM_EXT_CPU_GEMM must be 'auto' or 'blas', got '", name, "'");
#if SRM_EXT_AVX512_MATMUL
    return name == "auto" && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return enabled;
}

void multiply_avx512(const MatrixRef<float>& a, const MatrixRef<float>& b, float* out,
                     int64_t out_row_stride, bool accumulate) {
  TORCH_INTERNAL_ASSERT(a.cols == b.rows, "inner sizes differ: ", a.cols, " vs ", b.rows);
#if SRM_EXT_AVX512_MATMUL
  if (b.rows == 0 && !accumulate) {
    for (int64_t i = 0; i < a.rows; ++i) {
      std::fill(out + i * out_row_stride, out + i * out_row_stride + b.cols, 0.0f);
    }
  }
  // Scratch of the calling thread, kept between calls (400 KiB).
  thread_local std::vector<float> left(kRowBlock * kDepthBlock), right(kDepthBlock * kPanelCols);
  for (int64_t d0 = 0; d0 < b.rows; d0 += kDepthBlock) {
    const int64_t depth = std::min(kDepthBlock, b.rows - d0);
    const bool add = accumulate || d0 > 0;
    for (int64_t r0 = 0; r0 < a.rows; r0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, a.rows - r0);
      pack_left(a, r0, rows, d0, depth, left.data());
      for (int64_t c0 = 0; c0 < b.cols; c0 += kPanelCols) {
        pack_right(b, c0, d0, depth, right.data());
        const int64_t cols = std::min(kPanelCols, b.cols - c0);
        for (int64_t i = 0; i < rows; i += kPanelRows) {
          micro_kernel(depth, left.data() + i * depth, right.data(),
                       out + (r0 + i) * out_row_stride + c0, out_row_stride,
                       std::min(kPanelRows, rows - i), cols, add);
        }
      }
    }
  }
#else
  TORCH_INTERNAL_ASSERT(false, "the AVX-512 matmul kernel is not compiled in");
#endif
}

}  // namespace srm_ext::cpu
