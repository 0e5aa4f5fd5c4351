// Deterministic sum of a float buffer: a grid whose size depends only on the
// element count writes one float64 partial per block, then a single block adds
// the partials. The summation order is therefore fixed for a given count,
// unlike atomics.
#include "common.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;
int64_t sum_blocks(int64_t count) {
  return grid_stride_blocks(ceil_div(count, kThreads * kItemsPerThread), 1024);
}

__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(const float* __restrict__ input, int64_t count,
                        double* __restrict__ partials) {
  __shared__ double scratch[kThreads];
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       i < count; i += stride) {
    acc += static_cast<double>(input[i]);
  }
  acc = block_sum<kThreads>(acc, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    final_sum_kernel(const double* __restrict__ partials, int num_partials,
                     double scale, float* __restrict__ out) {
  __shared__ double scratch[kThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < num_partials; i += kThreads) {
    acc += partials[i];
  }
  acc = block_sum<kThreads>(acc, scratch);
  if (threadIdx.x == 0) {
    out[0] = static_cast<float>(acc * scale);
  }
}

}  // namespace

int64_t deterministic_sum_workspace_size(int64_t count) {
  return sum_blocks(count);
}

cudaError_t launch_deterministic_sum(const float* input, int64_t count,
                                     double scale, double* workspace,
                                     float* out, cudaStream_t stream) {
  if (count < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = sum_blocks(count);
  partial_sums_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      input, count, workspace);
  SRM_RETURN_IF_ERROR(cudaGetLastError());
  final_sum_kernel<<<1, kThreads, 0, stream>>>(
      workspace, static_cast<int>(blocks), scale, out);
  return cudaGetLastError();
}

}  // namespace srm_cuda
