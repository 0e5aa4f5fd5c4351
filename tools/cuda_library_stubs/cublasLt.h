// Only the types torch's CUDA headers name (see README.md).
#pragma once
typedef struct cublasLtContext* cublasLtHandle_t;
