// Only the types torch's CUDA headers name (see README.md).
#pragma once
typedef int cusolverStatus_t;
