// Stand-in for torch's header when the CUDA glue is built for the emulator:
// there is one host "device", so the guard has nothing to switch.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
