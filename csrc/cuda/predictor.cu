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
// Three passes over the logits, every reduction in a fixed order: per-pixel
// softmax statistics (a warp per pixel), per-(image, codeword) means (a block
// per image and 32 codewords, its warps on interleaved pixels), then the
// gradient (a warp per pixel). Lanes always walk codewords, so every read of
// a logits row is coalesced.
#include "common.cuh"

namespace srm_cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarpSize;

__global__ void __launch_bounds__(kThreads)
    pixel_softmax_stats_kernel(const float* __restrict__ logits,
                               const float* __restrict__ intercept,
                               const int64_t* __restrict__ labels,
                               int64_t num_pixels, int64_t num_codes,
                               float* __restrict__ lse,
                               float* __restrict__ local_terms,
                               int* error_flag) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                    threadIdx.x / kWarpSize;
  if (p >= num_pixels) {
    return;  // warp-uniform
  }
  const float bias = intercept[0];
  const float* row = logits + p * num_codes;
  // q lies in [0, 1], so exp(q) cannot overflow: no max shift needed.
  float sum_exp = 0.0f;
  for (int64_t c = lane; c < num_codes; c += kWarpSize) {
    sum_exp += expf(sigmoid(row[c] + bias));
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

// Block (chunk, n) owns codewords [32 chunk, 32 chunk + 32) of image n; warp
// w sums the image's pixels w, w + kRowsPerBlock, ... in order, and the warps'
// sums are added in warp order: a fixed order whatever the scheduling.
__global__ void __launch_bounds__(kThreads)
    image_means_kernel(const float* __restrict__ logits,
                       const float* __restrict__ intercept,
                       const float* __restrict__ targets,
                       int64_t pixels_per_image, int64_t num_codes,
                       int64_t column_chunks, float global_scale,
                       float* __restrict__ bce_terms,
                       float* __restrict__ global_coef) {
  __shared__ float warp_sums[kRowsPerBlock][kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t n = blockIdx.x / column_chunks;
  const int64_t c = (blockIdx.x % column_chunks) * kWarpSize + lane;
  const float bias = intercept[0];
  float sum = 0.0f;
  if (c < num_codes) {
    const float* column = logits + n * pixels_per_image * num_codes + c;
    for (int64_t hw = warp; hw < pixels_per_image; hw += kRowsPerBlock) {
      sum += sigmoid(column[hw * num_codes] + bias);
    }
  }
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || c >= num_codes) {
    return;
  }
  sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kRowsPerBlock; ++w) {
    sum += warp_sums[w][lane];
  }
  const int64_t i = n * num_codes + c;
  const float hw_count = static_cast<float>(pixels_per_image);
  const float m = sum / hw_count;
  const float t = targets[i];
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

unsigned clamp_blocks(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace

int64_t predictor_workspace_size(int64_t batch, int64_t pixels_per_image,
                                 int64_t num_codewords) {
  const int64_t pixels = batch * pixels_per_image;
  // lse, local terms | BCE terms, global coefficients | two partial losses
  return 2 * pixels + 2 * batch * num_codewords + 2;
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
  if (pixels < 1 || num_codewords < 1 ||
      detail::ceil_div(pixels, kRowsPerBlock) > 0x7fffffff ||
      batch * detail::ceil_div(num_codewords, kWarpSize) > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  float* lse = float_workspace;
  float* local_terms = lse + pixels;
  float* bce_terms = local_terms + pixels;
  float* global_coef = bce_terms + columns;
  float* partial_losses = global_coef + columns;

  pixel_softmax_stats_kernel<<<
      static_cast<unsigned>(detail::ceil_div(pixels, kRowsPerBlock)), kThreads,
      0, stream>>>(logits, intercept, pixel_labels, pixels, num_codewords, lse,
                   local_terms, error_flag);
  SRM_RETURN_IF_ERROR(cudaGetLastError());

  const float global_scale =
      static_cast<float>(static_cast<double>(global_weight) / columns);
  const int64_t column_chunks = detail::ceil_div(num_codewords, kWarpSize);
  image_means_kernel<<<static_cast<unsigned>(batch * column_chunks), kThreads,
                       0, stream>>>(logits, intercept, image_labels,
                                    pixels_per_image, num_codewords,
                                    column_chunks, global_scale, bce_terms,
                                    global_coef);
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
  logit_grad_kernel<<<clamp_blocks(detail::ceil_div(pixels, kRowsPerBlock)),
                      kThreads, 0, stream>>>(logits, intercept, pixel_labels,
                                             lse, global_coef, pixels,
                                             pixels_per_image, num_codewords,
                                             local_scale);
  return cudaGetLastError();
}

}  // namespace srm_cuda
