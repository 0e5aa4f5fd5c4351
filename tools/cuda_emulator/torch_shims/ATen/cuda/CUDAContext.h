// Stand-in for torch's header when the CUDA glue is built for the emulator:
// the emulated kernels run synchronously on the host, so the stream is null,
// and cuBLAS is the host stand-in of cublas_v2.h beside this folder.
#pragma once
#include <cuda_runtime_api.h>

#include "cublas_v2.h"

namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline cublasHandle_t getCurrentCUDABlasHandle() { return nullptr; }
}  // namespace at::cuda
