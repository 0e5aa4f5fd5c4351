// Stand-in for torch's header when the CUDA glue is built for the emulator:
// an emulated stream is never being captured into a graph.
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
enum class CaptureStatus { None, Active };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace c10::cuda
