// Warp-level running top-k over (pre-activation, codeword) candidates.
//
// A candidate is packed into one 64-bit key whose unsigned order is the
// selection order: the high word is an order-preserving image of the float
// (NaN above +inf, -0 equal to +0), the low word the bit-complemented codeword
// index so that, between equal values, the lower index wins. Keys of distinct
// codewords are distinct and every key is non-zero, so 0 pads lists.
//
// Each pixel owns a shared-memory list of `list_len` keys (a power of two):
// after a merge its first min(count, k) slots hold the best keys sorted
// descending, and new candidates above the k-th best (the threshold) are
// appended behind them. When the list could not take another tile of
// candidates the owning warp sorts its live keys and truncates them to k.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace srm_cuda {
namespace detail {

__device__ __forceinline__ uint32_t float_order_bits(float v) {
  if (isnan(v)) {
    return 0xffffffffu;  // every NaN ranks above +inf (0xff800000)
  }
  uint32_t bits = __float_as_uint(v);
  if (v == 0.0f) {
    bits = 0u;  // -0 ties with +0
  }
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float float_from_order_bits(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return __uint_as_float(bits);
}

__device__ __forceinline__ uint64_t make_topk_key(float value,
                                                  uint32_t codeword) {
  return (static_cast<uint64_t>(float_order_bits(value)) << 32) |
         static_cast<uint64_t>(~codeword);
}

__device__ __forceinline__ float topk_key_value(uint64_t key) {
  return float_from_order_bits(static_cast<uint32_t>(key >> 32));
}

__device__ __forceinline__ uint32_t topk_key_codeword(uint64_t key) {
  return ~static_cast<uint32_t>(key);
}

// List length for k winners when candidates arrive tile_size at a time: room
// for k kept keys plus one full tile, rounded up to a power of two for the
// bitonic sort.
__host__ __device__ constexpr int topk_list_length(int k, int tile_size) {
  int len = 128;
  while (len < k + tile_size) {
    len *= 2;
  }
  return len;
}

// Sorts list[0:len) descending; len is a power of two >= 2. Called by all 32
// lanes of one warp; ends synchronised.
__device__ __forceinline__ void warp_bitonic_sort_descending(uint64_t* list,
                                                             int len,
                                                             int lane) {
  for (int size = 2; size <= len; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int pair = lane; pair < len / 2; pair += kWarpSize) {
        // Lower element of the pair'th compare-exchange at this stride.
        const int i = 2 * pair - (pair & (stride - 1));
        const int j = i + stride;
        // Blocks of `size` alternate direction; the final pass (size == len)
        // is descending everywhere because i & len == 0.
        const bool descending = (i & size) == 0;
        const uint64_t a = list[i];
        const uint64_t b = list[j];
        if (descending ? (a < b) : (a > b)) {
          list[i] = b;
          list[j] = a;
        }
      }
      __syncwarp();
    }
  }
}

// Appends the candidates of one tile row that beat `threshold`. Lane l looks
// at tile_scores[base + l]; codewords at or beyond num_codewords are skipped.
// `count` is warp-uniform and must leave room for tile_size more keys.
template <int kTileSize>
__device__ __forceinline__ void topk_append_tile(const float* tile_scores,
                                                 int64_t first_codeword,
                                                 int64_t num_codewords,
                                                 float bias,
                                                 uint64_t threshold,
                                                 uint64_t* list, int& count,
                                                 int lane) {
  static_assert(kTileSize % kWarpSize == 0, "tile must be whole warps");
  // A key above the threshold has a value at or above the threshold's (or is
  // NaN): a float comparison screens most candidates before any key is built.
  // While there is no threshold (0) its value reads as NaN and passes all.
  const float floor_value = topk_key_value(threshold);
#pragma unroll
  for (int base = 0; base < kTileSize; base += kWarpSize) {
    const int64_t codeword = first_codeword + base + lane;
    float value = 0.0f;
    bool maybe = false;
    if (codeword < num_codewords) {
      value = tile_scores[base + lane] + bias;
      maybe = !(value < floor_value);
    }
    if (__ballot_sync(kFullWarpMask, maybe) == 0) {
      continue;  // warp-uniform: nothing in this row of the tile can enter
    }
    const uint64_t key =
        maybe ? make_topk_key(value, static_cast<uint32_t>(codeword)) : 0;
    const bool keep = key > threshold;
    const unsigned keep_mask = __ballot_sync(kFullWarpMask, keep);
    if (keep) {
      const unsigned lanes_below = (1u << lane) - 1u;
      list[count + __popc(keep_mask & lanes_below)] = key;
    }
    count += __popc(keep_mask);
  }
  __syncwarp();
}

// Below this k, picking the best k of 33 to 64 keys by rounds of a warp-wide
// maximum (warp_max_key per key kept) costs less than sorting them (21
// compare-exchange passes over 64 keys), which is how the first merge of a
// row starts when k is small.
constexpr int kRoundsMaxTopK = 8;

// The largest key of the warp, in every lane. sm_80 reduces 32-bit words in
// one instruction: the high words first, then the low words of the lanes
// that hold the largest high word. Older GPUs take five 64-bit shuffles.
__device__ __forceinline__ uint64_t warp_max_key(uint64_t key) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  const unsigned high_word = static_cast<unsigned>(key >> 32);
  const unsigned high = __reduce_max_sync(kFullWarpMask, high_word);
  const unsigned low = __reduce_max_sync(
      kFullWarpMask, high_word == high ? static_cast<unsigned>(key) : 0u);
  return (static_cast<uint64_t>(high) << 32) | low;
#else
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const uint64_t other = __shfl_xor_sync(kFullWarpMask, key, offset);
    key = other > key ? other : key;
  }
  return key;
#endif
}

// Writes the best `kept` of list[0:count) (count <= 64) to list[0:kept),
// sorted descending. Each lane holds two keys in registers; every round the
// warp's maximum is written out and cleared where it was (keys of distinct
// codewords are distinct, so exactly one slot holds it).
__device__ __forceinline__ void topk_select_by_rounds(uint64_t* list,
                                                      int count, int kept,
                                                      int lane) {
  uint64_t a = lane < count ? list[lane] : 0;
  uint64_t b = lane + kWarpSize < count ? list[lane + kWarpSize] : 0;
  __syncwarp();  // every key is read before list[0:kept) is overwritten
  for (int r = 0; r < kept; ++r) {
    const uint64_t best = warp_max_key(a > b ? a : b);
    if (lane == 0) {
      list[r] = best;
    }
    if (a == best) {
      a = 0;
    } else if (b == best) {
      b = 0;
    }
  }
  __syncwarp();
}

// Keeps the best min(count, k) of the list's count live keys, sorted
// descending at its front, and returns the new threshold (0, i.e. accept
// anything, while fewer than k keys were seen). A small k out of a tile's
// worth of keys is picked by rounds; otherwise only the smallest power of two
// holding the live keys is sorted: the final merge of a pixel whose later
// tiles added few keys sorts a short list.
__device__ __forceinline__ uint64_t topk_merge(uint64_t* list, int& count,
                                               int k, int lane) {
  const int kept = count < k ? count : k;
  if (k <= kRoundsMaxTopK && count > kWarpSize && count <= 2 * kWarpSize) {
    topk_select_by_rounds(list, count, kept, lane);
  } else {
    int sort_len = 2;
    while (sort_len < count) {
      sort_len *= 2;
    }
    for (int i = count + lane; i < sort_len; i += kWarpSize) {
      list[i] = 0;
    }
    __syncwarp();
    warp_bitonic_sort_descending(list, sort_len, lane);
  }
  count = kept;
  return count >= k ? list[k - 1] : 0;
}

// Appends one tile row of candidates (topk_append_tile), then merges when the
// list could not take another tile, and as soon as k candidates are in: from
// then on the k-th best screens every tile, and most candidates never enter
// the list. `threshold` is the last merge's (0 before the first).
template <int kTileSize>
__device__ __forceinline__ void topk_add_tile(const float* tile_scores,
                                              int64_t first_codeword,
                                              int64_t num_codewords,
                                              float bias, int k, int list_len,
                                              uint64_t& threshold,
                                              uint64_t* list, int& count,
                                              int lane) {
  topk_append_tile<kTileSize>(tile_scores, first_codeword, num_codewords,
                              bias, threshold, list, count, lane);
  if (count > list_len - kTileSize || (threshold == 0 && count >= k)) {
    threshold = topk_merge(list, count, k, lane);
  }
}

// The top k of one row of scores (num_codewords of them, read tile_size at
// a time, bias added), sorted descending at the front of `list`, whose
// length list_len is topk_list_length(k, kTileSize). Called by a whole warp.
template <int kTileSize>
__device__ __forceinline__ void topk_of_row(const float* scores,
                                            int64_t num_codewords, float bias,
                                            int k, int list_len,
                                            uint64_t* list, int lane) {
  int count = 0;
  uint64_t threshold = 0;
  for (int64_t code0 = 0; code0 < num_codewords; code0 += kTileSize) {
    topk_add_tile<kTileSize>(scores + code0, code0, num_codewords, bias, k,
                             list_len, threshold, list, count, lane);
  }
  topk_merge(list, count, k, lane);
}

// Writes the first k keys of a merged list as pixel `row`'s code in a
// (rows, k) sparse code: each value's sigmoid in T, and its codeword.
// Called by a whole warp.
template <typename T>
__device__ __forceinline__ void topk_write_code(const uint64_t* list, int k,
                                                int64_t row, int lane,
                                                T* values, int64_t* indices) {
  for (int j = lane; j < k; j += kWarpSize) {
    const uint64_t key = list[j];
    values[row * k + j] = from_float<T>(sigmoid(topk_key_value(key)));
    indices[row * k + j] = static_cast<int64_t>(topk_key_codeword(key));
  }
}

}  // namespace detail
}  // namespace srm_cuda
