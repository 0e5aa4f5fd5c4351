// Helpers shared by the srm_ext CUDA kernels: dtype conversion, pixel
// addressing, sparse code entries, warp/block reductions and host-side dtype
// dispatch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "srm_kernels.h"

#define SRM_RETURN_IF_ERROR(expr)          \
  do {                                     \
    const cudaError_t srm_err_ = (expr);   \
    if (srm_err_ != cudaSuccess) {         \
      return srm_err_;                     \
    }                                      \
  } while (0)

namespace srm_cuda {
namespace detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------
// Scalar conversion. Explicit intrinsics only: torch builds CUDA sources with
// the implicit half/bfloat16 conversions and operators disabled.
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Converts between element types, bit-exact when they are the same.
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else {
    return from_float<To>(to_float(v));
  }
}

__device__ __forceinline__ float sigmoid(float v) {
  return 1.0f / (1.0f + expf(-v));
}

// ---------------------------------------------------------------------------
// Pixel addressing
// ---------------------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t num_pixels(
    const FeatureMapLayout& l) {
  return l.n * l.h * l.w;
}

// Element offset of channel 0 of pixel p = (n * H + h) * W + w.
__device__ __forceinline__ int64_t pixel_offset(const FeatureMapLayout& l,
                                                int64_t p) {
  const int64_t hw = l.h * l.w;
  const int64_t n = p / hw;
  const int64_t rest = p - n * hw;
  const int64_t h = rest / l.w;
  const int64_t w = rest - h * l.w;
  return n * l.stride_n + h * l.stride_h + w * l.stride_w;
}

__host__ __device__ __forceinline__ bool same_sizes(const FeatureMapLayout& a,
                                                   const FeatureMapLayout& b) {
  return a.n == b.n && a.d == b.d && a.h == b.h && a.w == b.w;
}

// Whether consecutive channels of one pixel are adjacent in memory
// (channels_last); tile loaders then walk channels fastest to coalesce.
__device__ __forceinline__ bool channels_fastest(const FeatureMapLayout& l) {
  return l.stride_d == 1;
}

// ---------------------------------------------------------------------------
// Sparse code entries, for kernels that run a warp per pixel
// ---------------------------------------------------------------------------

// A warp's round of 32 entries of a pixel in shared memory, which every lane
// then reads four at a time by broadcast: one 16-byte read per four entries
// and field instead of a shuffle per entry and field, and reads through the
// codewords do not each wait on an index load.
struct alignas(16) StagedEntries {
  int code[kWarpSize];
  float coef[kWarpSize];
  float coef2[kWarpSize];
};
// 16-byte reads of four entries need every field 16-byte aligned.
static_assert(offsetof(StagedEntries, coef) % 16 == 0 &&
                  offsetof(StagedEntries, coef2) % 16 == 0,
              "StagedEntries fields start on 16 bytes");

// Stages entries j0 + lane of pixel p of a (P, k) sparse code, each lane
// loading one (coalesced), once every lane has read the previous round: its
// codeword c as c - code_begin when c lies in [code_begin, code_end), else -1
// (also past k), and coef[p, j0 + lane] and coef2[p, j0 + lane], a second
// coefficient where a kernel has one (each 0 without a codeword or where
// null). Called by a whole warp.
__device__ __forceinline__ void stage_pixel_entries(
    StagedEntries& staged, const int64_t* __restrict__ indices,
    const float* __restrict__ coef, const float* __restrict__ coef2,
    int64_t p, int k, int j0, int64_t code_begin, int64_t code_end) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int j = j0 + lane;
  int code = -1;
  float w = 0.0f;
  float w2 = 0.0f;
  if (j < k) {
    const int64_t e = p * k + j;
    const int64_t c = indices[e];
    if (c >= code_begin && c < code_end) {
      code = static_cast<int>(c - code_begin);
      w = coef != nullptr ? coef[e] : 0.0f;
      w2 = coef2 != nullptr ? coef2[e] : 0.0f;
    }
  }
  __syncwarp();
  staged.code[lane] = code;
  staged.coef[lane] = w;
  staged.coef2[lane] = w2;
  __syncwarp();
}

// out = the four components of a CUDA vector (int4, float4).
template <typename Vec4, typename T>
__device__ __forceinline__ void unpack(const Vec4& v, T (&out)[4]) {
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}

// The fields of staged entries [j, j + 4), j a multiple of 4, one read each.
__device__ __forceinline__ int4 staged_codes(const StagedEntries& staged,
                                             int j) {
  return *reinterpret_cast<const int4*>(&staged.code[j]);
}
__device__ __forceinline__ float4 staged_coefs(const StagedEntries& staged,
                                               int j) {
  return *reinterpret_cast<const float4*>(&staged.coef[j]);
}
__device__ __forceinline__ float4 staged_coef2s(const StagedEntries& staged,
                                                int j) {
  return *reinterpret_cast<const float4*>(&staged.coef2[j]);
}

// Calls fn(code, coef, coef2) for each entry of pixel p whose codeword lies
// in [code_begin, code_end), in entry order, in every lane of the warp, with
// the fields as stage_pixel_entries gives them. Fields are read four entries
// at a time, and a group of four without such an entry (most, where a
// kernel's block covers one of several ranges of codewords) costs one read.
// `staged` is the warp's own. Called by a whole warp.
template <typename Fn>
__device__ __forceinline__ void for_each_pixel_entry(
    const int64_t* __restrict__ indices, const float* __restrict__ coef,
    const float* __restrict__ coef2, int64_t p, int k, int64_t code_begin,
    int64_t code_end, StagedEntries& staged, Fn&& fn) {
  for (int j0 = 0; j0 < k; j0 += kWarpSize) {
    stage_pixel_entries(staged, indices, coef, coef2, p, k, j0, code_begin,
                        code_end);
    const int count = k - j0 < kWarpSize ? k - j0 : kWarpSize;
    for (int j = 0; j < count; j += 4) {
      int code[4];
      unpack(staged_codes(staged, j), code);
      // Warp-uniform, as every lane reads the same entries.
      if ((code[0] & code[1] & code[2] & code[3]) < 0) {
        continue;  // all four are -1: none lies in the range
      }
      float w[4] = {};
      float w2[4] = {};
      if (coef != nullptr) {
        unpack(staged_coefs(staged, j), w);
      }
      if (coef2 != nullptr) {
        unpack(staged_coef2s(staged, j), w2);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (code[i] >= 0) {  // -1 also past k
          fn(code[i], w[i], w2[i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Reductions with a fixed summation order
// ---------------------------------------------------------------------------

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// Warp sums of kSums values at once: v[i] holds each lane's term of sum i,
// and lane l gets sum l / (kWarpSize / kSums) in full. Each exchange of the
// warp_sum butterfly sends half of the sums a lane still carries, so 8 sums
// cost 9 shuffles where 8 warp_sum calls cost 40; every sum is added in
// exactly warp_sum's order, so the results are bitwise the same.
template <int kSums>
__device__ __forceinline__ float warp_sums_spread(float (&v)[kSums]) {
  static_assert(kSums > 0 && kSums <= kWarpSize && (kSums & (kSums - 1)) == 0,
                "a power of two up to the warp size");
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  int offset = kWarpSize / 2;
#pragma unroll
  for (int half = kSums / 2; half > 0; half /= 2, offset /= 2) {
    // The upper half of the lanes keeps the upper half of the sums.
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float keep = upper ? v[i + half] : v[i];
      const float send = upper ? v[i] : v[i + half];
      v[i] = keep + __shfl_xor_sync(kFullWarpMask, send, offset);
    }
  }
  float sum = v[0];
#pragma unroll
  for (; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(kFullWarpMask, sum, offset);
  }
  return sum;
}

// Tree sum over a block of kThreads threads (a power of two); the result is
// valid in thread 0. `scratch` holds kThreads elements. Starts with a barrier
// so that scratch may be reused across calls.
template <int kThreads, typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
  static_assert((kThreads & (kThreads - 1)) == 0, "power of two");
  __syncthreads();
  scratch[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      scratch[threadIdx.x] += scratch[threadIdx.x + half];
    }
    __syncthreads();
  }
  return scratch[0];
}

// ---------------------------------------------------------------------------
// Host-side launch helpers.
// ---------------------------------------------------------------------------

// The most dynamic shared memory a block of `kernel` can be given on the
// current device, on top of the kernel's static shared memory.
inline cudaError_t max_dynamic_shared_memory(const void* kernel,
                                             size_t* bytes) {
  int device = 0;
  SRM_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaFuncAttributes attributes{};
  SRM_RETURN_IF_ERROR(cudaFuncGetAttributes(&attributes, kernel));
  int opt_in_bytes = 0;
  SRM_RETURN_IF_ERROR(cudaDeviceGetAttribute(
      &opt_in_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t opt_in = static_cast<size_t>(opt_in_bytes);
  *bytes = opt_in > attributes.sharedSizeBytes
               ? opt_in - attributes.sharedSizeBytes
               : 0;
  return cudaSuccess;
}

// Lets `kernel` take `dynamic_bytes` of dynamic shared memory on the current
// device, or returns cudaErrorLaunchOutOfResources where the device cannot
// give a block that much on top of the kernel's static shared memory. The
// limit is state of the kernel on a device, shared by every host thread, so
// it is only ever raised (lowering it could fail another thread's launch
// between its own raise and launch) and set once per size, not per launch.
inline cudaError_t allow_dynamic_shared_memory(const void* kernel,
                                               size_t dynamic_bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  int device = 0;
  SRM_RETURN_IF_ERROR(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{kernel, device}];
  if (dynamic_bytes <= current) {
    return cudaSuccess;
  }
  size_t available = 0;
  SRM_RETURN_IF_ERROR(max_dynamic_shared_memory(kernel, &available));
  if (dynamic_bytes > available) {
    return cudaErrorLaunchOutOfResources;
  }
  SRM_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(dynamic_bytes)));
  current = dynamic_bytes;
  return cudaSuccess;
}

// Dynamic shared memory any block may take without opting in to more.
constexpr int64_t kDefaultDynamicSharedBytes = 48 * 1024;

// How many warps of a block (at most max_warps) can each keep a private
// array of `length` floats in the default dynamic shared memory; 0 where not
// even one can.
inline int warps_with_private_floats(int64_t length, int max_warps) {
  const int64_t fit = kDefaultDynamicSharedBytes /
                      (length * static_cast<int64_t>(sizeof(float)));
  return static_cast<int>(fit < max_warps ? fit : max_warps);
}

// Blocks of a grid-stride launch: the `needed` ones, at most `cap` (at
// least one); the kernel's later strides cover the rest. The emulated build
// defines SRM_CUDA_GRID_STRIDE_BLOCKS, a far lower cap, so that its small
// tests reach those strides, as a GPU's large inputs do.
inline int64_t grid_stride_blocks(int64_t needed, int64_t cap) {
#ifdef SRM_CUDA_GRID_STRIDE_BLOCKS
  cap = cap < SRM_CUDA_GRID_STRIDE_BLOCKS ? cap : SRM_CUDA_GRID_STRIDE_BLOCKS;
#endif
  const int64_t blocks = needed < cap ? needed : cap;
  return blocks < 1 ? 1 : blocks;
}

// Multiprocessors of the current device, for kernels that size their grid
// to fill it and loop over the rest of the work.
inline cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  SRM_RETURN_IF_ERROR(cudaGetDevice(&device));
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

// ---------------------------------------------------------------------------
// Host-side dtype dispatch: calls fn(T{}) with the element type for `dtype`.
// ---------------------------------------------------------------------------

template <typename Fn>
cudaError_t dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      return fn(float{});
    case Dtype::kFloat16:
      return fn(__half{});
    case Dtype::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace srm_cuda
