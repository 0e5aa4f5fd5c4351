// Eight float32 lanes as one GCC/Clang vector value, for the multiversioned
// kernels (SRM_EXT_MULTIVERSION): the compiler maps one onto an AVX2
// register, or two SSE registers in the baseline clone. GNU compilers only;
// the kernels have plain fallbacks elsewhere.
#pragma once

#if defined(__GNUC__)
#include <cstdint>

#include "vector_math.h"

namespace srm_ext::cpu {

// Unaligned and alias-safe, so they can view any float or int32 array.
typedef float Float8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t Int8 __attribute__((vector_size(32), aligned(4), may_alias));

SRM_EXT_INLINE Float8 load8(const float* p) { return *reinterpret_cast<const Float8*>(p); }
SRM_EXT_INLINE void store8(float* p, Float8 v) { *reinterpret_cast<Float8*>(p) = v; }
SRM_EXT_INLINE Float8 broadcast8(float v) { return Float8{} + v; }

// The three stages of an 8 x 8 transpose network (unpack, shuffle and
// 128-bit permute instructions on AVX2), each combining two vectors: their
// single lanes interleaved, their pairs of lanes interleaved, then their
// 128-bit halves joined. transpose() keeps both results of each stage; the top-k screening
// reduces them with max instead.
SRM_EXT_INLINE Float8 interleave_lanes_low(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13);
}
SRM_EXT_INLINE Float8 interleave_lanes_high(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
}
SRM_EXT_INLINE Float8 interleave_pairs_low(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
}
SRM_EXT_INLINE Float8 interleave_pairs_high(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
SRM_EXT_INLINE Float8 join_low_halves(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11);
}
SRM_EXT_INLINE Float8 join_high_halves(Float8 a, Float8 b) {
  return __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}

}  // namespace srm_ext::cpu
#endif
