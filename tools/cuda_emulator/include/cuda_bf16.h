// __nv_bfloat16 for the CPU emulator: storage and round-to-nearest-even
// conversions.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short __x;
};

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  __nv_bfloat16 out;
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out.__x = static_cast<unsigned short>((bits >> 16) | 0x0040u);  // quiet NaN
    return out;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out.__x = static_cast<unsigned short>(bits >> 16);
  return out;
}

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.__x) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
