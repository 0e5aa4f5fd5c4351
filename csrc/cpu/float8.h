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

}  // namespace srm_ext::cpu
#endif
