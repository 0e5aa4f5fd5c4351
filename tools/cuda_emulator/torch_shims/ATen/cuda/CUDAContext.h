// Stand-in for torch's header when the CUDA glue is built for the emulator:
// the emulated kernels run synchronously on the host, so the stream is null.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda
