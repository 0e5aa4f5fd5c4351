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

}  // namespace srm_ext::cpu
