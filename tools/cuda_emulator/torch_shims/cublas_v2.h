// Stand-in for cuBLAS when the CUDA glue is built for the emulator: the one
// call the glue makes, computed on the host as TF32 tensor cores would at
// their least precise: operands truncated to 10 mantissa bits, products
// summed in float32, and subnormal operands, products and sums flushed to
// zero.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "tf32.h"  // the emulator's include folder

typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_SUPPORTED = 15 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUDA_R_32F = 0 } cudaDataType;

namespace cuda_emulator {
inline float flush_subnormal(float v) { return std::fabs(v) < 0x1p-126f ? 0.0f : v; }

inline float truncate_to_tf32(float v) { return flush_subnormal(tf32_bits(v)); }
}  // namespace cuda_emulator

// Column-major C (m x n) = op(A) (m x k) op(B) (k x n), per batch entry.
inline cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m,
    int n, int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
    long long int strideA, const void* B, cudaDataType Btype, int ldb,
    long long int strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
    long long int strideC, int batchCount, cublasComputeType_t computeType,
    cublasGemmAlgo_t) {
  if (Atype != CUDA_R_32F || Btype != CUDA_R_32F || Ctype != CUDA_R_32F ||
      computeType != CUBLAS_COMPUTE_32F_FAST_TF32) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const float a_scale = *static_cast<const float*>(alpha);
  const float c_scale = *static_cast<const float*>(beta);
  for (int batch = 0; batch < batchCount; ++batch) {
    const float* a = static_cast<const float*>(A) + batch * strideA;
    const float* b = static_cast<const float*>(B) + batch * strideB;
    float* c = static_cast<float*>(C) + batch * strideC;
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        float sum = 0.0f;
        for (int p = 0; p < k; ++p) {
          const float av = transa == CUBLAS_OP_N ? a[i + int64_t{p} * lda] : a[p + int64_t{i} * lda];
          const float bv = transb == CUBLAS_OP_N ? b[p + int64_t{j} * ldb] : b[j + int64_t{p} * ldb];
          const float product =
              cuda_emulator::truncate_to_tf32(av) * cuda_emulator::truncate_to_tf32(bv);
          sum = cuda_emulator::flush_subnormal(sum + cuda_emulator::flush_subnormal(product));
        }
        float& out = c[i + int64_t{j} * ldc];
        out = a_scale * sum + (c_scale != 0.0f ? c_scale * out : 0.0f);
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}
