// Only the types torch's CUDA headers name (see README.md).
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
