// Stage-2 targets from the teacher's sparse codes: pixel labels (argmax
// codeword = first kept index) and image labels (per-image average of the
// kept value of every codeword).
//
// One block per image. Each warp keeps a private histogram of the image's
// codewords in shared memory and takes fixed 32-entry groups of the image's
// entries; within a group, lanes holding the same codeword are summed in
// lane order and their lowest lane adds the sum, so no two writes to a
// histogram ever race. The histograms are then added in warp order: every
// image label is summed in a fixed order, without atomics, and each entry is
// read by one thread only.
#include "common.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kMaxWarps = 8;
// Each warp's shared memory: its histogram and one group of entry values.
// All of it is dynamic, so that the warps per block are sized against the
// whole block's default 48 KiB (one warp at the largest K).
inline int64_t floats_per_warp(int64_t num_codes) {
  return num_codes + kWarpSize;
}
static_assert((kMaxCodewords + kWarpSize) * static_cast<int64_t>(sizeof(float)) <=
                  kDefaultDynamicSharedBytes,
              "one warp's histogram and group at the largest K fit without "
              "opting in");

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
    sparse_labels_kernel(const T* __restrict__ values,
                         const int64_t* __restrict__ indices,
                         int64_t pixels_per_image, int k, int64_t num_codes,
                         int64_t* __restrict__ pixel_labels,
                         T* __restrict__ image_labels, int* error_flag) {
  // (warps, num_codes) histograms, then (warps, kWarpSize) group values.
  extern __shared__ float warp_floats[];

  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t image = blockIdx.x;
  const int64_t num_entries = pixels_per_image * k;
  const int64_t first_entry = image * num_entries;
  float* const histograms = warp_floats;
  float* histogram = histograms + warp * num_codes;
  float* group_values = warp_floats + warps * num_codes + warp * kWarpSize;

  for (int64_t c = lane; c < num_codes; c += kWarpSize) {
    histogram[c] = 0.0f;
  }
  __syncwarp();

  for (int64_t group = static_cast<int64_t>(warp) * kWarpSize;
       group < num_entries; group += static_cast<int64_t>(warps) * kWarpSize) {
    const int64_t e = group + lane;
    int code = -1;
    float value = 0.0f;
    if (e < num_entries) {
      const int64_t raw = indices[first_entry + e];
      if (raw >= 0 && raw < num_codes) {
        code = static_cast<int>(raw);
        value = to_float(values[first_entry + e]);
      } else {
        *error_flag = 1;
      }
      if (e % k == 0) {
        pixel_labels[image * pixels_per_image + e / k] = raw;
      }
    }
    group_values[lane] = value;
    const unsigned same = __match_any_sync(kFullWarpMask, code);
    __syncwarp();
    if (code >= 0 && __ffs(same) - 1 == lane) {
      float sum = 0.0f;
      for (unsigned m = same; m != 0; m &= m - 1) {
        sum += group_values[__ffs(m) - 1];
      }
      histogram[code] += sum;
    }
    __syncwarp();  // group_values is rewritten by the next group
  }
  __syncthreads();

  const float inv_pixels = 1.0f / static_cast<float>(pixels_per_image);
  for (int64_t c = threadIdx.x; c < num_codes; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) {
      sum += histograms[w * num_codes + c];
    }
    image_labels[image * num_codes + c] = from_float<T>(sum * inv_pixels);
  }
}

}  // namespace

cudaError_t launch_sparse_labels(const void* values, Dtype dtype,
                                 const int64_t* indices, int64_t batch,
                                 int64_t pixels_per_image, int64_t k,
                                 int64_t num_codewords, int64_t* pixel_labels,
                                 void* image_labels, int* error_flag,
                                 cudaStream_t stream) {
  if (batch < 0 || batch > 0x7fffffff || pixels_per_image < 0 || k < 1 ||
      k > 0x7fffffff || num_codewords < 1 || num_codewords > kMaxCodewords) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0) {
    return cudaSuccess;
  }
  const int warps =
      warps_with_private_floats(floats_per_warp(num_codewords), kMaxWarps);
  const size_t shared_bytes = static_cast<size_t>(warps) *
                              floats_per_warp(num_codewords) * sizeof(float);
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sparse_labels_kernel<T><<<static_cast<unsigned>(batch),
                              static_cast<unsigned>(warps * kWarpSize),
                              shared_bytes, stream>>>(
        static_cast<const T*>(values), indices, pixels_per_image,
        static_cast<int>(k), num_codewords, pixel_labels,
        static_cast<T*>(image_labels), error_flag);
    return cudaGetLastError();
  });
}

}  // namespace srm_cuda
