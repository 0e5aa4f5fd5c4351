// Per-pixel codeword gathers: decoding (sum_j coef_pj * C[:, idx_pj]), the
// squared residual of a decoding against the map it rebuilds, the adjoint
// (<f_p, C[:, idx_pj]> for every kept entry), and the sigmoid derivative of
// kept entries.
//
// A block owns 32 pixels and walks the channels in chunks of 32. Within a
// chunk a warp handles one pixel at a time with its lanes on consecutive
// channels, so each codeword row of the (K, D) transposed dictionary is read
// as one coalesced segment; feature maps go through pixel_tile.cuh. Decoding
// walks a pixel's entries through for_each_pixel_entry; the entry dots take
// them in groups whose warp sums share one butterfly (warp_sums_spread).
#include <type_traits>

#include "common.cuh"
#include "pixel_tile.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

// Per-entry dot products of a tile's pixels, accumulated over the chunks of
// 32 channels: (kTilePixels, kMaxTopK) floats in shared memory.
using EntryDots = float[kTilePixels][kMaxTopK];

__device__ __forceinline__ void zero_entry_dots(EntryDots& dots, int k) {
  for (int e = threadIdx.x; e < kTilePixels * k; e += kTileThreads) {
    dots[e / k][e % k] = 0.0f;
  }
}

// Entries whose chunk dots one warp_sums_spread call finishes.
constexpr int kEntryGroup = 8;
static_assert(kEntryGroup % 4 == 0, "codes are read four at a time");

// dots[pl][j] += sum over the chunk's channels d = d0 + c of
// tile[pl][c] * C[idx[p, j], d], for the tile's pixels pl that this warp
// owns (rows warp, warp + kTileWarps, ...), with `staged` the warp's own.
// Each product is rounded (never fused into an add) and the chunk's 32 are
// summed in warp_sum's butterfly, so a dot does not depend on the compiler.
// With kSecondTile, also second_dots[pl][j] from second_tile, against the
// same codeword elements read once. Called by every warp.
template <bool kSecondTile = false, typename TDict>
__device__ __forceinline__ void add_tile_entry_dots(
    EntryDots& dots, const PixelTile& tile, int64_t first_pixel,
    int64_t total_pixels, int64_t d0, const int64_t* __restrict__ indices,
    int k, const TDict* __restrict__ dictionary_t, int64_t num_codes,
    int64_t depth, StagedEntries& staged, EntryDots* second_dots = nullptr,
    const PixelTile* second_tile = nullptr) {
  constexpr int kLanesPerEntry = kWarpSize / kEntryGroup;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t d = d0 + lane;
  for_each_warp_pixel(first_pixel, total_pixels, [&](int pl, int64_t p) {
    const float f = tile[pl][lane];  // 0 past D
    float f2 = 0.0f;
    if constexpr (kSecondTile) {
      f2 = (*second_tile)[pl][lane];
    }
    for (int j0 = 0; j0 < k; j0 += kWarpSize) {
      stage_pixel_entries(staged, indices, nullptr, nullptr, p, k, j0, 0,
                          num_codes);
      // Past k the entries have no codeword, so a group's tail adds zeros.
      for (int g = 0; g < kWarpSize && j0 + g < k; g += kEntryGroup) {
        int codes[kEntryGroup / 4][4];
#pragma unroll
        for (int q = 0; q < kEntryGroup / 4; ++q) {
          unpack(staged_codes(staged, g + 4 * q), codes[q]);
        }
        float prods[kEntryGroup];
        float prods2[kEntryGroup];
#pragma unroll
        for (int i = 0; i < kEntryGroup; ++i) {
          const int c = codes[i / 4][i % 4];
          prods[i] = 0.0f;
          prods2[i] = 0.0f;
          if (c >= 0 && d < depth) {
            const float codeword = to_float(dictionary_t[c * depth + d]);
            prods[i] = __fmul_rn(f, codeword);
            prods2[i] = __fmul_rn(f2, codeword);
          }
        }
        const float sum = warp_sums_spread(prods);
        float sum2 = 0.0f;
        if constexpr (kSecondTile) {
          sum2 = warp_sums_spread(prods2);
        }
        const int j = j0 + g + lane / kLanesPerEntry;
        if (lane % kLanesPerEntry == 0 && j < k) {
          dots[pl][j] += sum;
          if constexpr (kSecondTile) {
            (*second_dots)[pl][j] += sum2;
          }
        }
      }
    }
  });
}

// The sigmoid of a kept entry whose derivative s (1 - s) scales its dot:
// given (sigmoid_values, (P, k)), or recomputed from its pre-activation
// <x_p, C[:, idx_pj]> (pre_dots) plus the intercept; neither: no scaling.
struct EntrySigmoid {
  const float* values;
  const EntryDots* pre_dots;
  const float* intercept;
};

// out[p, j] = dots, times s (1 - s) when the entries' sigmoid s is known,
// for the tile's pixels. Needs a barrier after the last add_tile_entry_dots.
__device__ __forceinline__ void store_entry_dots(
    const EntryDots& dots, int64_t first_pixel, int64_t total_pixels, int k,
    const EntrySigmoid& sigmoid_of, float* __restrict__ out) {
  for (int e = threadIdx.x; e < kTilePixels * k; e += kTileThreads) {
    const int pl = e / k;
    const int j = e % k;
    const int64_t p = first_pixel + pl;
    if (p < total_pixels) {
      float r = dots[pl][j];
      if (sigmoid_of.values != nullptr || sigmoid_of.pre_dots != nullptr) {
        const float s =
            sigmoid_of.values != nullptr
                ? sigmoid_of.values[p * k + j]
                : sigmoid((*sigmoid_of.pre_dots)[pl][j] + sigmoid_of.intercept[0]);
        r *= s * (1.0f - s);
      }
      out[p * k + j] = r;
    }
  }
}

// What combine_codewords_kernel gives besides the combined vectors: nothing,
// every kept entry's dot with them, or those dots scaled by the sigmoid
// derivative of the entry's pre-activation, taken from the addend (x) in the
// same pass.
enum class EntryDotsMode { kNone, kDots, kDotsWithAddendSigmoid };

// Writes every combined element to `out` (when not null) and, when
// square_sums is not null, the block's sum of their squares to
// square_sums[blockIdx.x]. With entry dots it also gives every kept entry's
// dot product with the combined vector (float32, before any rounding to
// out's dtype), as codeword_dots_kernel would from `out`, scaled by the
// derivative of sigmoid_values or (kDotsWithAddendSigmoid) of the sigmoid of
// <addend_p, C[:, idx_pj]> + intercept, summed as codeword_dots_kernel sums.
template <typename TDict, typename TOut, typename TAdd, EntryDotsMode kMode>
__global__ void __launch_bounds__(kTileThreads, 4)
    combine_codewords_kernel(const float* __restrict__ coef,
                             const int64_t* __restrict__ indices, int k,
                             const TDict* __restrict__ dictionary_t,
                             int64_t num_codes, const TAdd* addend,
                             FeatureMapLayout add_layout, float addend_scale,
                             const float* device_scale, float host_scale,
                             TOut* out, FeatureMapLayout out_layout,
                             float* __restrict__ square_sums,
                             const float* __restrict__ sigmoid_values,
                             const float* __restrict__ intercept,
                             float* __restrict__ entry_dots) {
  constexpr bool kEntryDots = kMode != EntryDotsMode::kNone;
  constexpr bool kAddendDots = kMode == EntryDotsMode::kDotsWithAddendSigmoid;
  __shared__ int64_t out_offsets[kTilePixels];
  __shared__ int64_t add_offsets[kTilePixels];
  __shared__ PixelTile sums;
  __shared__ PixelTile add_tile;
  __shared__ float sum_scratch[kTileThreads];
  __shared__ StagedEntries staged[kTileWarps];
  // Only the variants with entry dots take their 16 KiB (twice with the
  // addend's pre-activations).
  __shared__ std::conditional_t<kEntryDots, EntryDots, float> dots;
  __shared__ std::conditional_t<kAddendDots, EntryDots, float> addend_dots;
  EntryDots* addend_dots_or_null = nullptr;
  if constexpr (kAddendDots) {
    addend_dots_or_null = &addend_dots;
  }
  float sum_sq = 0.0f;

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t total_pixels = num_pixels(out_layout);
  const int64_t depth = out_layout.d;
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kTilePixels;
  const float scale =
      host_scale * (device_scale != nullptr ? device_scale[0] : 1.0f);

  load_tile_pixel_offsets(out_offsets, out_layout, first_pixel);
  if (addend != nullptr) {
    load_tile_pixel_offsets(add_offsets, add_layout, first_pixel);
  }
  if constexpr (kEntryDots) {
    zero_entry_dots(dots, k);
  }
  if constexpr (kAddendDots) {
    zero_entry_dots(*addend_dots_or_null, k);
  }
  __syncthreads();

  for (int64_t d0 = 0; d0 < depth; d0 += kTileChannels) {
    if (addend != nullptr) {
      load_pixel_tile(add_tile, addend, add_layout, add_offsets, d0);
    }
    const int64_t d = d0 + lane;
#pragma unroll
    for (int i = 0; i < kTilePixelsPerWarp; ++i) {
      const int pl = warp + i * kTileWarps;
      const int64_t p = first_pixel + pl;
      float acc = 0.0f;
      if (p < total_pixels) {  // warp-uniform
        for_each_pixel_entry(
            indices, coef, nullptr, p, k, 0, num_codes, staged[warp],
            [&](int c, float w, float) {
              if (d < depth) {
                acc = fmaf(w, to_float(dictionary_t[c * depth + d]), acc);
              }
            });
      }
      sums[pl][lane] = acc;
    }
    __syncthreads();

    for_each_tile_element(
        out_layout, out_offsets, d0, [&](int i, int c, int64_t offset) {
          if (offset < 0) {
            return;
          }
          float v = sums[i][c];
          if (addend != nullptr) {
            v = fmaf(addend_scale, add_tile[i][c], v);
          }
          v *= scale;
          if (out != nullptr) {
            out[offset] = from_float<TOut>(v);
          }
          sum_sq = fmaf(v, v, sum_sq);
          if constexpr (kEntryDots) {
            sums[i][c] = v;  // this thread's own element; outside stays 0
          }
        });
    if constexpr (kEntryDots) {
      __syncthreads();
      add_tile_entry_dots<kAddendDots>(dots, sums, first_pixel, total_pixels,
                                       d0, indices, k, dictionary_t,
                                       num_codes, depth, staged[warp],
                                       addend_dots_or_null, &add_tile);
    }
    __syncthreads();  // tiles are rewritten by the next chunk
  }
  if constexpr (kEntryDots) {
    const EntrySigmoid sigmoid_of{sigmoid_values, addend_dots_or_null,
                                  intercept};
    store_entry_dots(dots, first_pixel, total_pixels, k, sigmoid_of,
                     entry_dots);
  }
  if (square_sums != nullptr) {  // grid-uniform
    const float block_total = block_sum<kTileThreads>(sum_sq, sum_scratch);
    if (threadIdx.x == 0) {
      square_sums[blockIdx.x] = block_total;
    }
  }
}

// square_norms[pl] += the squares of the chunk's channels of the tile's
// pixels pl that this warp owns. Called by every warp.
__device__ __forceinline__ void add_tile_square_norms(float* square_norms,
                                                      const PixelTile& tile,
                                                      int64_t first_pixel,
                                                      int64_t total_pixels) {
  const int lane = threadIdx.x % kWarpSize;
  for_each_warp_pixel(first_pixel, total_pixels, [&](int pl, int64_t) {
    const float f = tile[pl][lane];  // 0 past D
    const float sum = warp_sum(f * f);
    if (lane == 0) {
      square_norms[pl] += sum;
    }
  });
}

// out[p, j] = <features_p, C[:, idx_pj]>, times s (1 - s) with s given by
// sigmoid_values, and pixel_norms[p] = |features_p| when not null. With
// kSigmoidBackward, out[p, j] = grad_values[p, j] * s (1 - s) instead,
// s = sigmoid(that dot + intercept[0]).
template <typename TFeat, typename TDict, bool kSigmoidBackward>
__global__ void __launch_bounds__(kTileThreads, 4)
    codeword_dots_kernel(const TFeat* __restrict__ features,
                         FeatureMapLayout layout,
                         const int64_t* __restrict__ indices, int k,
                         const TDict* __restrict__ dictionary_t,
                         int64_t num_codes,
                         const float* __restrict__ sigmoid_values,
                         const TDict* __restrict__ grad_values,
                         const float* __restrict__ intercept,
                         float* __restrict__ out,
                         float* __restrict__ pixel_norms) {
  __shared__ int64_t offsets[kTilePixels];
  __shared__ PixelTile tile;
  __shared__ EntryDots dots;
  __shared__ float square_norms[kTilePixels];
  __shared__ StagedEntries staged[kTileWarps];

  const int64_t total_pixels = num_pixels(layout);
  const int64_t depth = layout.d;
  const int64_t first_pixel = static_cast<int64_t>(blockIdx.x) * kTilePixels;

  load_tile_pixel_offsets(offsets, layout, first_pixel);
  zero_entry_dots(dots, k);
  if (threadIdx.x < kTilePixels) {
    square_norms[threadIdx.x] = 0.0f;
  }
  __syncthreads();

  for (int64_t d0 = 0; d0 < depth; d0 += kTileChannels) {
    load_pixel_tile(tile, features, layout, offsets, d0);
    __syncthreads();
    add_tile_entry_dots(dots, tile, first_pixel, total_pixels, d0, indices, k,
                        dictionary_t, num_codes, depth,
                        staged[threadIdx.x / kWarpSize]);
    if (pixel_norms != nullptr) {  // grid-uniform
      // From the tile already staged: the norms cost no second read of x.
      add_tile_square_norms(square_norms, tile, first_pixel, total_pixels);
    }
    __syncthreads();  // tile is rewritten by the next chunk
  }
  if (pixel_norms != nullptr && threadIdx.x < kTilePixels &&
      first_pixel + threadIdx.x < total_pixels) {
    pixel_norms[first_pixel + threadIdx.x] = sqrtf(square_norms[threadIdx.x]);
  }
  if constexpr (kSigmoidBackward) {
    for (int e = threadIdx.x; e < kTilePixels * k; e += kTileThreads) {
      const int pl = e / k;
      const int j = e % k;
      const int64_t p = first_pixel + pl;
      if (p < total_pixels) {
        const float s = sigmoid(dots[pl][j] + intercept[0]);
        out[p * k + j] = to_float(grad_values[p * k + j]) * s * (1.0f - s);
      }
    }
  } else {
    store_entry_dots(dots, first_pixel, total_pixels, k,
                     EntrySigmoid{sigmoid_values, nullptr, nullptr}, out);
  }
}

template <typename T>
__global__ void sigmoid_backward_kernel(const T* __restrict__ grad_values,
                                        const float* __restrict__ sigmoid,
                                        int64_t count, float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = sigmoid[i];
    out[i] = to_float(grad_values[i]) * s * (1.0f - s);
  }
}

bool valid_tile_grid(int64_t total_pixels) {
  return ceil_div(total_pixels, kTilePixels) <= 0x7fffffff;
}

// What combine_codewords_kernel gives besides `out`; null pointers for what
// is not wanted. entry_dots needs a float32 out and k <= kMaxTopK; the
// entries' sigmoid comes from sigmoid_values, from the addend's
// pre-activations plus addend_intercept[0], or neither.
struct CombineExtras {
  float* square_sums;
  const float* sigmoid_values;
  const float* addend_intercept;
  float* entry_dots;
};

// launch_combine_codewords, with the extras of combine_codewords_kernel;
// out.data may be null when only those are wanted.
cudaError_t launch_combine(const float* coef, const int64_t* indices,
                           int64_t k, const void* dictionary_t,
                           Dtype dictionary_dtype, int64_t num_codewords,
                           const FeatureMap* addend, float addend_scale,
                           const float* device_scale, float host_scale,
                           const FeatureMap& out, const CombineExtras& extras,
                           cudaStream_t stream) {
  const int64_t total_pixels = detail::num_pixels(out.layout);
  const bool with_dots = extras.entry_dots != nullptr;
  const bool addend_sigmoid = extras.addend_intercept != nullptr;
  if (k < 0 || k > 0x7fffffff || !valid_tile_grid(total_pixels) ||
      (with_dots && (k > kMaxTopK || out.dtype != Dtype::kFloat32))) {
    return cudaErrorInvalidValue;
  }
  if (addend_sigmoid && (!with_dots || addend == nullptr ||
                         extras.sigmoid_values != nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (addend != nullptr && !same_sizes(addend->layout, out.layout)) {
    return cudaErrorInvalidValue;
  }
  // Without channels the entry dots are still written (as zeros).
  if (total_pixels == 0 || (out.layout.d == 0 && !with_dots)) {
    return cudaSuccess;
  }
  const Dtype add_dtype = addend != nullptr ? addend->dtype : dictionary_dtype;
  const bool out_ok = out.dtype == dictionary_dtype || out.dtype == Dtype::kFloat32;
  const bool add_ok = add_dtype == dictionary_dtype || add_dtype == Dtype::kFloat32;
  if (!out_ok || !add_ok) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks =
      static_cast<unsigned>(detail::ceil_div(total_pixels, kTilePixels));
  const FeatureMapLayout add_layout =
      addend != nullptr ? addend->layout : out.layout;
  const void* add_data = addend != nullptr ? addend->data : nullptr;

  return detail::dispatch_dtype(dictionary_dtype, [&](auto tag) {
    using T = decltype(tag);
    // Output and addend are either the dictionary dtype or float32.
    auto launch = [&](auto out_tag, auto add_tag, auto mode_tag) {
      using TOut = decltype(out_tag);
      using TAdd = decltype(add_tag);
      constexpr EntryDotsMode kMode = decltype(mode_tag)::value;
      combine_codewords_kernel<T, TOut, TAdd, kMode>
          <<<blocks, kTileThreads, 0, stream>>>(
              coef, indices, static_cast<int>(k),
              static_cast<const T*>(dictionary_t), num_codewords,
              static_cast<const TAdd*>(add_data), add_layout, addend_scale,
              device_scale, host_scale, static_cast<TOut*>(out.data),
              out.layout, extras.square_sums, extras.sigmoid_values,
              extras.addend_intercept, extras.entry_dots);
      return cudaGetLastError();
    };
    using Mode = EntryDotsMode;
    const std::integral_constant<Mode, Mode::kNone> plain;
    const bool out_float = out.dtype == Dtype::kFloat32;
    const bool add_float = add_dtype == Dtype::kFloat32;
    if (addend_sigmoid) {
      const std::integral_constant<Mode, Mode::kDotsWithAddendSigmoid> dots;
      return add_float ? launch(float{}, float{}, dots)
                       : launch(float{}, T{}, dots);
    }
    if (with_dots) {
      const std::integral_constant<Mode, Mode::kDots> dots;
      return add_float ? launch(float{}, float{}, dots)
                       : launch(float{}, T{}, dots);
    }
    if (out_float) {
      return add_float ? launch(float{}, float{}, plain)
                       : launch(float{}, T{}, plain);
    }
    return add_float ? launch(T{}, float{}, plain) : launch(T{}, T{}, plain);
  });
}

}  // namespace

cudaError_t launch_combine_codewords(
    const float* coef, const int64_t* indices, int64_t k,
    const void* dictionary_t, Dtype dictionary_dtype, int64_t num_codewords,
    const FeatureMap* addend, float addend_scale, const float* device_scale,
    float host_scale, const FeatureMap& out, const float* sigmoid_values,
    const float* addend_intercept, float* entry_dots, cudaStream_t stream) {
  // Without entry dots there must be somewhere to store: an empty out (no
  // pixels or no channels, whose data pointer torch leaves null) needs none.
  const int64_t out_elements = detail::num_pixels(out.layout) * out.layout.d;
  if (out.data == nullptr && entry_dots == nullptr && out_elements > 0) {
    return cudaErrorInvalidValue;
  }
  return launch_combine(coef, indices, k, dictionary_t, dictionary_dtype,
                        num_codewords, addend, addend_scale, device_scale,
                        host_scale, out,
                        CombineExtras{nullptr, sigmoid_values,
                                      addend_intercept, entry_dots},
                        stream);
}

int64_t residual_square_sums_num_blocks(int64_t num_pixels) {
  return detail::ceil_div(num_pixels, kTilePixels);
}

cudaError_t launch_residual_square_sums(const float* coef,
                                        const int64_t* indices, int64_t k,
                                        const void* dictionary_t,
                                        Dtype dictionary_dtype,
                                        int64_t num_codewords,
                                        const FeatureMap& x, float* partials,
                                        cudaStream_t stream) {
  // With no channels no block would write its (zero) sum.
  if (partials == nullptr || x.layout.d < 1) {
    return cudaErrorInvalidValue;
  }
  // The residual x_hat - x: x enters as the addend with scale -1; nothing is
  // written but the per-block sums.
  const FeatureMap no_out{nullptr, Dtype::kFloat32, x.layout};
  return launch_combine(coef, indices, k, dictionary_t, dictionary_dtype,
                        num_codewords, &x, -1.0f, nullptr, 1.0f, no_out,
                        CombineExtras{partials, nullptr, nullptr, nullptr},
                        stream);
}

namespace {

// launch_codeword_dots, or with grad_values and intercept given,
// launch_recomputed_sigmoid_backward.
cudaError_t launch_codeword_dots_kernel(
    const FeatureMap& features, const int64_t* indices, int64_t k,
    const void* dictionary_t, Dtype dictionary_dtype, int64_t num_codewords,
    const float* sigmoid_values, const void* grad_values,
    const float* intercept, float* out, float* pixel_norms,
    cudaStream_t stream) {
  const int64_t total_pixels = detail::num_pixels(features.layout);
  if (k < 0 || k > kMaxTopK || !valid_tile_grid(total_pixels)) {
    return cudaErrorInvalidValue;
  }
  if (features.dtype != dictionary_dtype && features.dtype != Dtype::kFloat32) {
    return cudaErrorInvalidValue;
  }
  if (total_pixels == 0 || (k == 0 && pixel_norms == nullptr)) {
    return cudaSuccess;
  }
  const unsigned blocks =
      static_cast<unsigned>(detail::ceil_div(total_pixels, kTilePixels));
  return detail::dispatch_dtype(dictionary_dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto feature_tag, auto backward_tag) {
      using TFeat = decltype(feature_tag);
      codeword_dots_kernel<TFeat, T, decltype(backward_tag)::value>
          <<<blocks, kTileThreads, 0, stream>>>(
              static_cast<const TFeat*>(features.data), features.layout,
              indices, static_cast<int>(k),
              static_cast<const T*>(dictionary_t), num_codewords,
              sigmoid_values, static_cast<const T*>(grad_values), intercept,
              out, pixel_norms);
      return cudaGetLastError();
    };
    const bool feature_float = features.dtype == Dtype::kFloat32;
    if (grad_values != nullptr) {
      const std::true_type backward;
      return feature_float ? launch(float{}, backward) : launch(T{}, backward);
    }
    const std::false_type dots;
    return feature_float ? launch(float{}, dots) : launch(T{}, dots);
  });
}

}  // namespace

cudaError_t launch_codeword_dots(const FeatureMap& features,
                                 const int64_t* indices, int64_t k,
                                 const void* dictionary_t,
                                 Dtype dictionary_dtype, int64_t num_codewords,
                                 const float* sigmoid_values, float* out,
                                 float* pixel_norms, cudaStream_t stream) {
  return launch_codeword_dots_kernel(features, indices, k, dictionary_t,
                                     dictionary_dtype, num_codewords,
                                     sigmoid_values, nullptr, nullptr, out,
                                     pixel_norms, stream);
}

cudaError_t launch_recomputed_sigmoid_backward(
    const void* grad_values, const FeatureMap& features,
    const int64_t* indices, int64_t k, const void* dictionary_t,
    Dtype dictionary_dtype, int64_t num_codewords, const float* intercept,
    float* out, cudaStream_t stream) {
  // grad_values may be null only where there are no entries (torch leaves
  // an empty tensor's data pointer null).
  const int64_t entries = detail::num_pixels(features.layout) * k;
  if ((grad_values == nullptr && entries > 0) || intercept == nullptr) {
    return cudaErrorInvalidValue;
  }
  return launch_codeword_dots_kernel(features, indices, k, dictionary_t,
                                     dictionary_dtype, num_codewords, nullptr,
                                     grad_values, intercept, out, nullptr,
                                     stream);
}

cudaError_t launch_sigmoid_backward(const void* grad_values,
                                    Dtype grad_dtype, const float* sigmoid,
                                    int64_t count, float* out,
                                    cudaStream_t stream) {
  if (count <= 0) {
    return count == 0 ? cudaSuccess : cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(
      detail::grid_stride_blocks(detail::ceil_div(count, kThreads), 65535));
  return detail::dispatch_dtype(grad_dtype, [&](auto tag) {
    using T = decltype(tag);
    sigmoid_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(grad_values), sigmoid, count, out);
    return cudaGetLastError();
  });
}

}  // namespace srm_cuda
