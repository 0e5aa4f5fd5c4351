// Small kernels with known defects (and their correct twins) that show the
// CPU emulator's checks fire: tests/test_cuda_emulated.py runs them through
// cuda_emulation_binding.cpp. Not part of the srm_ext build.
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace emulator_probes {
namespace {

constexpr int kThreads = 64;

// out[i] = the value thread i + 1 stored in shared memory; without the
// barrier a thread may read before its neighbour wrote.
template <bool kWithBarrier>
__global__ void neighbour_kernel(float* out) {
  __shared__ float stored[kThreads];
  const int i = threadIdx.x;
  stored[i] = static_cast<float>(i);
  if (kWithBarrier) {
    __syncthreads();
  }
  out[blockIdx.x * kThreads + i] = stored[(i + 1) % kThreads];
}

// out[lane] = lane + 1 for the lanes of warp 0, read from what warp 1
// stored, after shuffles of warp 0's own; without the barrier nothing orders
// warp 1's store before warp 0's read.
template <bool kWithBarrier>
__global__ void warp_handoff_kernel(float* out) {
  __shared__ float stored[32];
  const int lane = threadIdx.x % 32;
  const bool reader = threadIdx.x < 32;
  if (!reader) {
    stored[lane] = static_cast<float>(lane + 1);
  }
  float own = static_cast<float>(lane);
  if (reader) {
    for (int round = 0; round < 4; ++round) {  // an even count: back to lane
      own = __shfl_xor_sync(0xffffffffu, own, 1);
    }
  }
  if (kWithBarrier) {
    __syncthreads();
  }
  if (reader) {
    out[lane] = stored[lane] + own - static_cast<float>(lane);
  }
}

// out[i] = an accumulator that thread i adds `count` ones to but never
// initialises, as a forgotten `= 0` leaves it.
__global__ void uninitialised_local_kernel(int count, float* out) {
  float acc;
  for (int i = 0; i < count; ++i) {
    acc += 1.0f;
  }
  out[threadIdx.x] = acc;
}

// out[block b] = b + 1 everywhere. The chained twin takes it from block
// b - 1's output, which nothing orders before block b in the same launch.
template <bool kChained>
__global__ void block_count_kernel(float* out) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (kChained) {
    out[i] = (blockIdx.x == 0 ? 0.0f : out[i - kThreads]) + 1.0f;
  } else {
    out[i] = static_cast<float>(blockIdx.x + 1);
  }
}

// Half the block waits at a barrier the other half never reaches.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Thread 0 leaves before the others synchronise.
__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x == 0) {
    return;
  }
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Reads shared memory no thread wrote: the poison shows as NaN.
__global__ void uninitialised_shared_kernel(float* out) {
  __shared__ float never_written[kThreads];
  out[blockIdx.x * kThreads + threadIdx.x] = never_written[threadIdx.x];
}

// out[i] = sum over the warp of lane values (butterfly shuffles),
// ballot[warp] = mask of odd lanes and ballot[2 + warp] = the warp's largest
// (37 * thread) % 61.
__global__ void warp_primitives_kernel(float* out, unsigned* ballot) {
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  out[threadIdx.x] = v;
  const unsigned mask = __ballot_sync(0xffffffffu, threadIdx.x % 2);
  const unsigned largest =
      __reduce_max_sync(0xffffffffu, (37u * threadIdx.x) % 61u);
  if (threadIdx.x % 32 == 0) {
    ballot[threadIdx.x / 32] = mask;
    ballot[2 + threadIdx.x / 32] = largest;
  }
}

// out[i] = the value thread i + 1 stored, read after a barrier; the split
// twin's two halves of the block wait at two different __syncthreads.
template <bool kSplit>
__global__ void split_barrier_kernel(float* out) {
  __shared__ float stored[kThreads];
  const int i = threadIdx.x;
  stored[i] = static_cast<float>(i);
  if (kSplit && i < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[i] = stored[(i + 1) % kThreads];
}

// out[i] = i ^ 1 by a butterfly shuffle; in the mixed twin the upper half of
// each warp calls a ballot instead while the lower half shuffles. The halves
// meeting at two different __syncwarp calls is fine (sm_70 and later).
template <bool kMixed>
__global__ void warp_collectives_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) {
    __syncwarp();
  } else {
    __syncwarp();
  }
  unsigned v = 0;
  if (kMixed && lane >= 16) {
    v = __ballot_sync(0xffffffffu, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
  }
  out[threadIdx.x] = static_cast<float>(v);
}

// Copies the first floats of its dynamic shared memory after writing them.
__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ float dynamic[];
  dynamic[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = dynamic[threadIdx.x];
}

// The same with 1 KiB of static shared memory, which counts against the
// block's 48 KiB as the dynamic bytes do.
__global__ void static_and_dynamic_shared_kernel(float* out) {
  extern __shared__ float dynamic[];
  __shared__ float fixed[256];
  fixed[threadIdx.x] = static_cast<float>(threadIdx.x);
  dynamic[threadIdx.x] = fixed[threadIdx.x];
  out[threadIdx.x] = dynamic[threadIdx.x];
}

// Declared for blocks of at most kThreads / 2 threads: a GPU refuses a
// larger block (its registers were allotted for the bound).
__global__ void __launch_bounds__(kThreads / 2, 1) bounded_kernel(float* out) {
  out[threadIdx.x] = static_cast<float>(threadIdx.x);
}

// out[0:4) = shared floats [first, first + 4) read as one float4: a GPU
// faults unless first is a multiple of four.
__global__ void vector_load_kernel(int first, float* out) {
  __shared__ __align__(16) float values[8];
  if (threadIdx.x < 8) {
    values[threadIdx.x] = static_cast<float>(threadIdx.x);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const float4 v = *reinterpret_cast<const float4*>(&values[first]);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
}

// out[i] = in[i + shift]: with a shift the last (or, negative, the first)
// threads read past the end (start) of `in`, as an off-by-one index does.
__global__ void shifted_read_kernel(const float* in, int shift, float* out) {
  out[threadIdx.x] = in[static_cast<int>(threadIdx.x) + shift];
}

// out[0] = element (0, 0) of A B by one tf32 MMA (k = 8) of a warp, A all
// 1 + 3 * 2^-12 and B all ones. With kRound the operands are first rounded
// by __float_to_tf32 (to 1 + 2^-10), as kernels must; without it the tensor
// cores ignore their low bits (1).
template <bool kRound>
__global__ void tf32_mma_kernel(float* out) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) float a_tile[16 * 8];
  __shared__ __align__(32) float b_tile[8 * 16];
  __shared__ __align__(32) float c_tile[16 * 16];
  for (int i = threadIdx.x; i < 16 * 8; i += 32) {
    a_tile[i] = 1.0f + 3.0f / 4096.0f;
    b_tile[i] = 1.0f;
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
  wmma::fill_fragment(c, 0.0f);
  wmma::load_matrix_sync(a, a_tile, 8);
  wmma::load_matrix_sync(b, b_tile, 16);
  if (kRound) {
    for (int i = 0; i < a.num_elements; ++i) {
      a.x[i] = wmma::__float_to_tf32(a.x[i]);
    }
    for (int i = 0; i < b.num_elements; ++i) {
      b.x[i] = wmma::__float_to_tf32(b.x[i]);
    }
  }
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(c_tile, c, 16, wmma::mem_row_major);
  __syncwarp();
  if (threadIdx.x == 0) {
    out[0] = c_tile[0];
  }
}

}  // namespace

cudaError_t launch_neighbour(bool with_barrier, int blocks, float* out) {
  if (with_barrier) {
    neighbour_kernel<true><<<blocks, kThreads>>>(out);
  } else {
    neighbour_kernel<false><<<blocks, kThreads>>>(out);
  }
  return cudaGetLastError();
}

cudaError_t launch_warp_handoff(bool with_barrier, float* out) {
  if (with_barrier) {
    warp_handoff_kernel<true><<<1, kThreads>>>(out);
  } else {
    warp_handoff_kernel<false><<<1, kThreads>>>(out);
  }
  return cudaGetLastError();
}

cudaError_t launch_uninitialised_local(int count, float* out) {
  uninitialised_local_kernel<<<1, kThreads>>>(count, out);
  return cudaGetLastError();
}

cudaError_t launch_block_count(bool chained, int blocks, float* out) {
  if (chained) {
    block_count_kernel<true><<<blocks, kThreads>>>(out);
  } else {
    block_count_kernel<false><<<blocks, kThreads>>>(out);
  }
  return cudaGetLastError();
}

cudaError_t launch_divergent_barrier(float* out) {
  divergent_barrier_kernel<<<1, kThreads>>>(out);
  return cudaGetLastError();
}

cudaError_t launch_barrier_after_exit(float* out) {
  barrier_after_exit_kernel<<<1, kThreads>>>(out);
  return cudaGetLastError();
}

cudaError_t launch_split_barrier(bool split, float* out) {
  if (split) {
    split_barrier_kernel<true><<<1, kThreads>>>(out);
  } else {
    split_barrier_kernel<false><<<1, kThreads>>>(out);
  }
  return cudaGetLastError();
}

cudaError_t launch_warp_collectives(bool mixed, float* out) {
  if (mixed) {
    warp_collectives_kernel<true><<<1, kThreads>>>(out);
  } else {
    warp_collectives_kernel<false><<<1, kThreads>>>(out);
  }
  return cudaGetLastError();
}

cudaError_t launch_uninitialised_shared(float* out) {
  // Two blocks: the poison is laid before every block, not only the first.
  uninitialised_shared_kernel<<<2, kThreads>>>(out);
  return cudaGetLastError();
}

cudaError_t launch_warp_primitives(float* out, unsigned* ballot) {
  warp_primitives_kernel<<<1, kThreads>>>(out, ballot);
  return cudaGetLastError();
}

// One block of `kernel` with `bytes` of dynamic shared memory, its limit
// raised to that first when raise_limit.
cudaError_t launch_with_dynamic_shared(void (*kernel)(float*), size_t bytes,
                                       bool raise_limit, float* out) {
  if (raise_limit) {
    const cudaError_t status = cudaFuncSetAttribute(
        reinterpret_cast<const void*>(kernel),
        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) {
      return status;
    }
  }
  kernel<<<1, kThreads, bytes>>>(out);
  return cudaGetLastError();
}

cudaError_t launch_dynamic_shared(size_t bytes, bool raise_limit, float* out) {
  return launch_with_dynamic_shared(dynamic_shared_kernel, bytes, raise_limit, out);
}

cudaError_t launch_static_and_dynamic_shared(size_t bytes, bool raise_limit,
                                             float* out) {
  return launch_with_dynamic_shared(static_and_dynamic_shared_kernel, bytes,
                                    raise_limit, out);
}

cudaError_t launch_bounded(int threads, float* out) {
  bounded_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

cudaError_t launch_vector_load(int first, float* out) {
  vector_load_kernel<<<1, kThreads>>>(first, out);
  return cudaGetLastError();
}

cudaError_t launch_shifted_read(const float* in, int shift, float* out) {
  shifted_read_kernel<<<1, kThreads>>>(in, shift, out);
  return cudaGetLastError();
}

cudaError_t launch_tf32_mma(bool round, float* out) {
  if (round) {
    tf32_mma_kernel<true><<<1, 32>>>(out);
  } else {
    tf32_mma_kernel<false><<<1, 32>>>(out);
  }
  return cudaGetLastError();
}

}  // namespace emulator_probes
