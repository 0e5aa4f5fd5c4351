// Stage-2 targets from the teacher's sparse codes: pixel labels (argmax
// codeword = first kept index) and image labels (per-image average of the
// kept value of every codeword).
//
// One block per image. Entries are staged in shared memory in their original
// order and thread t accumulates exactly the codewords c with
// c % kThreads == t, so every image label is summed in entry order without
// atomics.
#include "common.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kBatch = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sparse_labels_kernel(const T* __restrict__ values,
                         const int64_t* __restrict__ indices,
                         int64_t pixels_per_image, int k, int64_t num_codes,
                         int64_t* __restrict__ pixel_labels,
                         T* __restrict__ image_labels, int* error_flag) {
  extern __shared__ float sums[];  // num_codes floats, one owner thread each
  __shared__ int batch_code[kBatch];
  __shared__ float batch_value[kBatch];

  const int64_t image = blockIdx.x;
  const int64_t first_entry = image * pixels_per_image * k;
  const int64_t num_entries = pixels_per_image * k;

  for (int64_t c = threadIdx.x; c < num_codes; c += kThreads) {
    sums[c] = 0.0f;
  }

  for (int64_t batch = 0; batch < num_entries; batch += kBatch) {
    __syncthreads();  // previous batch consumed
    for (int i = threadIdx.x; i < kBatch; i += kThreads) {
      const int64_t e = batch + i;
      if (e >= num_entries) {
        break;
      }
      const int64_t code = indices[first_entry + e];
      const bool in_range = code >= 0 && code < num_codes;
      if (!in_range) {
        *error_flag = 1;
      }
      batch_code[i] = in_range ? static_cast<int>(code) : -1;
      batch_value[i] = to_float(values[first_entry + e]);
      if (e % k == 0) {
        pixel_labels[image * pixels_per_image + e / k] = code;
      }
    }
    __syncthreads();
    const int64_t remaining = num_entries - batch;
    const int batch_size =
        remaining < kBatch ? static_cast<int>(remaining) : kBatch;
    for (int i = 0; i < batch_size; ++i) {
      const int code = batch_code[i];
      if (code >= 0 && code % kThreads == static_cast<int>(threadIdx.x)) {
        sums[code] += batch_value[i];
      }
    }
  }
  __syncthreads();

  const float inv_pixels = 1.0f / static_cast<float>(pixels_per_image);
  for (int64_t c = threadIdx.x; c < num_codes; c += kThreads) {
    image_labels[image * num_codes + c] = from_float<T>(sums[c] * inv_pixels);
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
  const size_t sums_bytes = static_cast<size_t>(num_codewords) * sizeof(float);
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // Opt in beyond the 48 KiB default should kMaxCodewords ever need it.
    SRM_RETURN_IF_ERROR(allow_dynamic_shared_memory(
        reinterpret_cast<const void*>(sparse_labels_kernel<T>), sums_bytes));
    sparse_labels_kernel<T>
        <<<static_cast<unsigned>(batch), kThreads, sums_bytes, stream>>>(
            static_cast<const T*>(values), indices, pixels_per_image,
            static_cast<int>(k), num_codewords, pixel_labels,
            static_cast<T*>(image_labels), error_flag);
    return cudaGetLastError();
  });
}

}  // namespace srm_cuda
