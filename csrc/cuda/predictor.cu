// Stage-2 predictor loss on precomputed float32 logits z - b = C_s^T y_p (a
// dense GEMM done by cuBLAS in the glue, accumulated and kept in float32 for
// every input dtype, as the reference does), and its gradient dloss/dz written
// over the logits in place, so the (P, K) logits buffer is the only one of
// that size.
//
//   q = sigmoid(z)
//   local  = mean_p(lse_p - q_p[label_p]),          lse_p = log sum_c exp(q_pc)
//   m_nc   = mean over image n's pixels of q_pc
//   global = mean_{n,c} BCE(m_nc, t_nc)             (logs clamped at -100)
//   dq_pc  = lw / P * (softmax(q_p)_c - [c == label_p])
//          + gw / (N K) * (m_nc - t_nc) / max(m_nc (1 - m_nc), 1e-12) / HW
//   dz     = dq * q * (1 - q)
//
// Two passes over the logits, every reduction in a fixed order. The forward
// pass reads each image's pixels once: a block per (image, chunk of
// kChunkPixels pixels), a warp per pixel with its lanes on codewords, gives
// each pixel's softmax statistics and the chunk's per-codeword sums of q
// (per-warp sums in shared memory, added in warp order). A small kernel adds
// the chunks' sums in chunk order into the image means. The backward pass
// writes the gradient, a warp per pixel. Every read of a logits row is
// coalesced.
#include "common.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarpSize;
// Pixels per block of the forward pass (32 per warp when eight fit).
constexpr int64_t kChunkPixels = 256;
// Per-warp column sums of the forward pass live in shared memory, as many
// warps' as fit in the default dynamic shared memory. Past that K a single
// warp sums straight into the block's row of chunk sums in global memory.

// Block n * chunks + chunk takes pixels [chunk * kChunkPixels,
// + kChunkPixels) of image n; warp w takes those of them at w, w + warps, ...
// in order. Writes lse and the local loss term of each pixel, and
// chunk_sums[block * K + c] = the chunk's sum of q_pc.
template <bool kSharedSums>
__global__ void __launch_bounds__(kThreads)
    pixel_stats_kernel(const float* __restrict__ logits,
                       const float* __restrict__ intercept,
                       const int64_t* __restrict__ labels,
                       int64_t pixels_per_image, int num_codes,
                       int64_t chunks, float* __restrict__ lse,
                       float* __restrict__ local_terms,
                       float* __restrict__ chunk_sums, int* error_flag) {
  extern __shared__ float column_sums[];  // (warps, num_codes) if kSharedSums
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t n = blockIdx.x / chunks;
  const int64_t first = (blockIdx.x - n * chunks) * kChunkPixels;
  const int64_t end = first + kChunkPixels < pixels_per_image
                          ? first + kChunkPixels
                          : pixels_per_image;
  const float bias = intercept[0];
  float* block_sums = chunk_sums + static_cast<int64_t>(blockIdx.x) * num_codes;
  float* own_sums = kSharedSums ? column_sums + warp * num_codes : block_sums;
  for (int c = lane; c < num_codes; c += kWarpSize) {
    own_sums[c] = 0.0f;
  }
  // Each warp adds only to its own sums, lane l to the columns c = l mod 32.
  for (int64_t hw = first + warp; hw < end; hw += warps) {  // warp-uniform
    const int64_t p = n * pixels_per_image + hw;
    const float* row = logits + p * num_codes;
    // q lies in [0, 1], so exp(q) cannot overflow: no max shift needed.
    float sum_exp = 0.0f;
    for (int c = lane; c < num_codes; c += kWarpSize) {
      const float q = sigmoid(row[c] + bias);
      sum_exp += expf(q);
      own_sums[c] += q;
    }
    sum_exp = warp_sum(sum_exp);
    if (lane == 0) {
      const float log_sum = logf(sum_exp);
      const int64_t label = labels[p];
      float term = log_sum;
      if (label >= 0 && label < num_codes) {
        term -= sigmoid(row[label] + bias);
      } else {
        *error_flag = 1;
      }
      lse[p] = log_sum;
      local_terms[p] = term;
    }
  }
  if constexpr (kSharedSums) {
    __syncthreads();
    for (int c = threadIdx.x; c < num_codes; c += blockDim.x) {
      float sum = 0.0f;
      for (int w = 0; w < warps; ++w) {
        sum += column_sums[w * num_codes + c];
      }
      block_sums[c] = sum;
    }
  }
}

// One thread per (image, codeword): the image mean of q from the chunks'
// sums, added in chunk order, and the BCE term and gradient coefficient.
__global__ void __launch_bounds__(kThreads)
    image_means_kernel(const float* __restrict__ chunk_sums, int64_t chunks,
                       const float* __restrict__ targets, int64_t batch,
                       int64_t pixels_per_image, int64_t num_codes,
                       float global_scale, float* __restrict__ bce_terms,
                       float* __restrict__ global_coef, int* error_flag) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * num_codes) {
    return;
  }
  const int64_t n = i / num_codes;
  const int64_t c = i - n * num_codes;
  const float* sums = chunk_sums + n * chunks * num_codes + c;
  float sum = 0.0f;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    sum += sums[chunk * num_codes];
  }
  const float hw_count = static_cast<float>(pixels_per_image);
  const float m = sum / hw_count;
  const float t = targets[i];
  if (!(t >= 0.0f && t <= 1.0f)) {  // NaN too
    error_flag[1] = 1;
  }
  // Same clamping as torch.nn.functional.binary_cross_entropy.
  const float log_m = fmaxf(logf(m), -100.0f);
  const float log_1m = fmaxf(log1pf(-m), -100.0f);
  bce_terms[i] = (t - 1.0f) * log_1m - t * log_m;
  global_coef[i] =
      global_scale * (m - t) / fmaxf(m * (1.0f - m), 1e-12f) / hw_count;
}

__global__ void __launch_bounds__(kThreads)
    logit_grad_kernel(float* __restrict__ logits,
                      const float* __restrict__ intercept,
                      const int64_t* __restrict__ labels,
                      const float* __restrict__ lse,
                      const float* __restrict__ global_coef,
                      int64_t num_pixels, int64_t pixels_per_image,
                      int64_t num_codes, float local_scale) {
  const int lane = threadIdx.x % kWarpSize;
  const float bias = intercept[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  // Grid-stride over pixels, a warp per pixel (warp-uniform bounds).
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                   threadIdx.x / kWarpSize;
       p < num_pixels; p += stride) {
    float* row = logits + p * num_codes;
    const float* image_coef = global_coef + (p / pixels_per_image) * num_codes;
    const float row_lse = lse[p];
    const int64_t label = labels[p];
    for (int64_t c = lane; c < num_codes; c += kWarpSize) {
      const float q = sigmoid(row[c] + bias);
      const float softmax = expf(q - row_lse);
      const float one_hot = label == c ? 1.0f : 0.0f;
      const float dq = local_scale * (softmax - one_hot) + image_coef[c];
      row[c] = dq * q * (1.0f - q);
    }
  }
}

__global__ void add_scalars_kernel(const float* a, const float* b,
                                   float* out) {
  out[0] = a[0] + b[0];
}

}  // namespace

bool predictor_loss_fits(int64_t batch, int64_t pixels_per_image,
                         int64_t num_codewords) {
  const int64_t pixels = batch * pixels_per_image;
  const int64_t chunks = detail::ceil_div(pixels_per_image, kChunkPixels);
  // The forward pass indexes a row's codewords with 32-bit ints.
  return pixels >= 1 && num_codewords >= 1 &&
         num_codewords <= 0x7fffffff - kWarpSize &&
         batch * chunks <= 0x7fffffff &&
         detail::ceil_div(pixels, kRowsPerBlock) <= 0x7fffffff &&
         detail::ceil_div(batch * num_codewords, kThreads) <= 0x7fffffff;
}

int64_t predictor_workspace_size(int64_t batch, int64_t pixels_per_image,
                                 int64_t num_codewords) {
  const int64_t pixels = batch * pixels_per_image;
  const int64_t chunks = detail::ceil_div(pixels_per_image, kChunkPixels);
  // lse, local terms | BCE terms, global coefficients | chunk sums |
  // two partial losses
  return 2 * pixels + 2 * batch * num_codewords +
         batch * chunks * num_codewords + 2;
}

cudaError_t launch_predictor_loss(float* logits, const float* intercept,
                                  const int64_t* pixel_labels,
                                  const float* image_labels, int64_t batch,
                                  int64_t pixels_per_image,
                                  int64_t num_codewords, float local_weight,
                                  float global_weight, float* float_workspace,
                                  double* sum_workspace, float* loss_out,
                                  int* error_flag, cudaStream_t stream) {
  const int64_t pixels = batch * pixels_per_image;
  const int64_t columns = batch * num_codewords;
  const int64_t chunks = detail::ceil_div(pixels_per_image, kChunkPixels);
  if (!predictor_loss_fits(batch, pixels_per_image, num_codewords)) {
    return cudaErrorInvalidValue;
  }
  float* lse = float_workspace;
  float* local_terms = lse + pixels;
  float* bce_terms = local_terms + pixels;
  float* global_coef = bce_terms + columns;
  float* chunk_sums = global_coef + columns;
  float* partial_losses = chunk_sums + batch * chunks * num_codewords;

  const int warps = warps_with_private_floats(num_codewords, kRowsPerBlock);
  const unsigned blocks = static_cast<unsigned>(batch * chunks);
  if (warps > 0) {
    const size_t column_sum_bytes =
        static_cast<size_t>(warps) * num_codewords * sizeof(float);
    pixel_stats_kernel<true><<<blocks, static_cast<unsigned>(warps * kWarpSize),
                               column_sum_bytes, stream>>>(
        logits, intercept, pixel_labels, pixels_per_image,
        static_cast<int>(num_codewords), chunks, lse, local_terms, chunk_sums,
        error_flag);
  } else {
    pixel_stats_kernel<false><<<blocks, kWarpSize, 0, stream>>>(
        logits, intercept, pixel_labels, pixels_per_image,
        static_cast<int>(num_codewords), chunks, lse, local_terms, chunk_sums,
        error_flag);
  }
  SRM_RETURN_IF_ERROR(cudaGetLastError());

  const float global_scale =
      static_cast<float>(static_cast<double>(global_weight) / columns);
  image_means_kernel<<<static_cast<unsigned>(detail::ceil_div(columns, kThreads)),
                       kThreads, 0, stream>>>(
      chunk_sums, chunks, image_labels, batch, pixels_per_image,
      num_codewords, global_scale, bce_terms, global_coef, error_flag);
  SRM_RETURN_IF_ERROR(cudaGetLastError());

  SRM_RETURN_IF_ERROR(launch_deterministic_sum(
      local_terms, pixels, static_cast<double>(local_weight) / pixels,
      sum_workspace, partial_losses, stream));
  SRM_RETURN_IF_ERROR(launch_deterministic_sum(
      bce_terms, columns, static_cast<double>(global_weight) / columns,
      sum_workspace, partial_losses + 1, stream));
  add_scalars_kernel<<<1, 1, 0, stream>>>(partial_losses, partial_losses + 1,
                                          loss_out);
  SRM_RETURN_IF_ERROR(cudaGetLastError());

  const float local_scale =
      static_cast<float>(static_cast<double>(local_weight) / pixels);
  const int64_t grad_blocks =
      detail::grid_stride_blocks(detail::ceil_div(pixels, kRowsPerBlock), 65535);
  logit_grad_kernel<<<static_cast<unsigned>(grad_blocks), kThreads, 0,
                      stream>>>(logits, intercept, pixel_labels, lse,
                                global_coef, pixels, pixels_per_image,
                                num_codewords, local_scale);
  return cudaGetLastError();
}

}  // namespace srm_cuda
