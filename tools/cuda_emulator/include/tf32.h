// The TF32 value a tensor core reads from a float: sign, exponent and the 10
// high mantissa bits (the 13 low ones ignored), shared by the emulated wmma
// products and the cuBLAS stand-in.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cuda_emulator {
inline float tf32_bits(float v) {
  if (std::isnan(v)) return v;  // a NaN whose payload is all low bits stays NaN
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}
}  // namespace cuda_emulator
