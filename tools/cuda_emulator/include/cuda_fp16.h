// __half for the CPU emulator: storage and round-to-nearest-even conversions.
#pragma once

#include <cstring>

struct __half {
  unsigned short __x;
};

inline __half __float2half_rn(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  __half out;
  std::memcpy(&out.__x, &h, 2);
  return out;
}

inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.__x, 2);
  return static_cast<float>(h);
}
