// The part of the CUDA runtime API the srm_ext kernels and launchers use,
// for the CPU emulator (cuda_emulator.h). Launches run synchronously; the
// emulated device is one GPU with 227 KiB of opt-in shared memory per block
// and few multiprocessors (launchers that size their grids by them then
// give each block little work, which spreads small test inputs over many
// blocks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};

namespace cuda_emulator {

constexpr int kOptInSharedBytes = 227 * 1024;
constexpr int kMultiProcessors = 2;

struct BlockRun;

// Orders in which the blocks of a grid run, and the threads of a block
// between synchronisation points (set_schedule): forward, reverse, shuffled
// with the seed, or, with the blocks shuffled, each warp alone in a shuffled
// order until all its lanes wait at __syncthreads or have exited.
enum Schedule : int { kForward = 0, kReverse = 1, kShuffled = 2, kWarpSerial = 3 };

// Emulated device state, per host thread.
struct State {
  BlockRun* run = nullptr;
  cudaError_t last_error = cudaSuccess;
  std::string failure;  // the first kernel failure since take_failure()
  int schedule = kForward;
  uint64_t seed = 0;
  std::map<void*, size_t> shared_regions;
  // The launch's dynamic shared memory (fenced_alloc), and its size.
  unsigned char* dynamic_shared = nullptr;
  size_t dynamic_shared_bytes = 0;
  std::map<const void*, size_t> dynamic_shared_limit;
  std::vector<std::unique_ptr<char[]>> stacks;  // one per emulated thread
};

inline State& state() {
  static thread_local State s;
  return s;
}

// The Schedule, and the seed of its shuffles.
inline void set_schedule(int schedule, uint64_t seed) {
  state().schedule = schedule;
  state().seed = seed;
}

// The first failure message since the last call, or "" when none.
inline std::string take_failure() {
  std::string message;
  message.swap(state().failure);
  return message;
}

}  // namespace cuda_emulator

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emulator::state().last_error;
  cuda_emulator::state().last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
  }
  return "unknown error";
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cuda_emulator::kOptInSharedBytes;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = cuda_emulator::kMultiProcessors;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// Static shared memory is not known before a kernel runs; reported as 0.
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  *attributes = cudaFuncAttributes{0, 1024};
  return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > cuda_emulator::kOptInSharedBytes) {
    return cudaErrorInvalidValue;
  }
  cuda_emulator::state().dynamic_shared_limit[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}
