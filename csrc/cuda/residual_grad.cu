// Gradients of the reconstruction loss for x and the dictionary, with the
// residual rebuilt where it is used instead of stored:
//   g_p      = scale * (sum_j coef_pj C[idx_pj, :] - x_p)
//   grad_x_p = sum_j gp_pj C[idx_pj, :] - g_p
//   G[c, :] += gp_pj x_p + coef_pj g_p   for every entry with idx_pj == c
//
// A block owns a 32-channel slice of a range of codewords and a run of pixel
// tiles (codeword_slice.cuh). A warp rebuilds g of one pixel on the slice's
// channels from x and the pixel's codewords (lanes on channels, so each
// codeword row is one coalesced read) and keeps it in registers for both
// gradients: the float32 residual never goes to global memory, where it
// would cost writing and reading back P x D floats. Every sum runs in the
// order launch_combine_codewords uses, so g and grad_x are bitwise what the
// stored-residual path gives.
#include "codeword_slice.cuh"
#include "common.cuh"
#include "pixel_tile.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

template <typename T>
__global__ void __launch_bounds__(kTileThreads, 2)
    residual_gradients_kernel(const T* __restrict__ x,
                              FeatureMapLayout x_layout,
                              const float* __restrict__ coef,
                              const float* __restrict__ grad_pre,
                              const int64_t* __restrict__ indices, int k,
                              const T* __restrict__ dictionary_t,
                              int64_t num_codes,
                              const float* __restrict__ device_scale,
                              float host_scale, T* __restrict__ grad_x,
                              FeatureMapLayout grad_x_layout,
                              int codes_per_block, int64_t tiles_per_block,
                              float* __restrict__ grad_t) {
  extern __shared__ float slice[];  // (codes_per_block, kTileChannels)
  __shared__ int64_t x_offsets[kTilePixels];
  __shared__ int64_t grad_x_offsets[kTilePixels];
  __shared__ PixelTile x_tile;
  __shared__ PixelTile grad_x_tile;
  __shared__ StagedEntries staged[kTileWarps];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t total_pixels = num_pixels(x_layout);
  const int64_t depth = x_layout.d;
  const SliceBlock block =
      slice_block(num_codes, codes_per_block, tiles_per_block, total_pixels);
  const int64_t d = block.d0 + lane;
  const float scale =
      host_scale * (device_scale != nullptr ? device_scale[0] : 1.0f);
  // Both are the same for the whole block.
  const bool with_dictionary = grad_t != nullptr;
  const bool writes_grad_x = grad_x != nullptr && blockIdx.z == 0;
  if (with_dictionary) {
    zero_slice(slice, block.codes);
  }

  for (int64_t tile = block.first_tile; tile < block.end_tile; ++tile) {
    const int64_t first_pixel = tile * kTilePixels;
    __syncthreads();  // the previous tile is consumed
    load_tile_pixel_offsets(x_offsets, x_layout, first_pixel);
    if (writes_grad_x) {
      load_tile_pixel_offsets(grad_x_offsets, grad_x_layout, first_pixel);
    }
    __syncthreads();
    load_pixel_tile(x_tile, x, x_layout, x_offsets, block.d0);
    __syncthreads();

    for_each_warp_pixel(first_pixel, total_pixels, [&](int pl, int64_t p) {
      const float xv = x_tile[pl][lane];  // 0 past D
      // The decoding and grad_x's codeword sum over every entry, in order.
      float x_hat = 0.0f;
      float grad_sum = 0.0f;
      for_each_pixel_entry(
          indices, coef, grad_pre, p, k, 0, num_codes, staged[warp],
          [&](int c, float w, float wg) {
            if (d < depth) {
              const float codeword = to_float(dictionary_t[c * depth + d]);
              x_hat = fmaf(w, codeword, x_hat);
              grad_sum = fmaf(wg, codeword, grad_sum);
            }
          });
      const float g = fmaf(-1.0f, xv, x_hat) * scale;
      if (writes_grad_x) {
        grad_x_tile[pl][lane] = fmaf(-1.0f, g, grad_sum);
      }
      if (with_dictionary) {
        add_entries_to_slice(
            slice, block, indices, coef, grad_pre, p, k, staged[warp],
            [&](float w, float wg) { return fmaf(w, g, wg * xv); });
      }
    });

    if (writes_grad_x) {
      __syncthreads();
      for_each_tile_element(
          grad_x_layout, grad_x_offsets, block.d0,
          [&](int i, int c, int64_t offset) {
            if (offset >= 0) {
              grad_x[offset] = from_float<T>(grad_x_tile[i][c]);
            }
          });
    }
  }
  if (with_dictionary) {
    __syncthreads();
    add_slice_to_gradient(slice, block, depth, grad_t);
  }
}

}  // namespace

cudaError_t launch_residual_gradients(
    const FeatureMap& x, const float* coef, const float* grad_pre,
    const int64_t* indices, int64_t k, const void* dictionary_t,
    int64_t num_codewords, const float* device_scale, float host_scale,
    const FeatureMap* grad_x, float* grad_dictionary_t, cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || num_codewords < 1 ||
      num_codewords > kMaxCodewords || x.layout.d > kMaxFeatureDim ||
      (grad_x != nullptr &&
       (grad_x->dtype != x.dtype || !same_sizes(grad_x->layout, x.layout)))) {
    return cudaErrorInvalidValue;
  }
  const int64_t total_pixels = detail::num_pixels(x.layout);
  if (total_pixels == 0 || x.layout.d == 0 ||
      (grad_x == nullptr && grad_dictionary_t == nullptr)) {
    return cudaSuccess;
  }
  const FeatureMapLayout grad_x_layout =
      grad_x != nullptr ? grad_x->layout : x.layout;
  return detail::dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = residual_gradients_kernel<T>;
    SliceGrid plan{};
    SRM_RETURN_IF_ERROR(plan_slice_grid(
        reinterpret_cast<const void*>(kernel), num_codewords, x.layout.d,
        total_pixels, /*with_slice=*/grad_dictionary_t != nullptr, &plan));
    kernel<<<plan.grid, kTileThreads, plan.slice_bytes, stream>>>(
        static_cast<const T*>(x.data), x.layout, coef, grad_pre, indices,
        static_cast<int>(k), static_cast<const T*>(dictionary_t),
        num_codewords, device_scale, host_scale,
        grad_x != nullptr ? static_cast<T*>(grad_x->data) : nullptr,
        grad_x_layout, plan.codes_per_block, plan.tiles_per_block,
        grad_dictionary_t);
    return cudaGetLastError();
  });
}

}  // namespace srm_cuda
