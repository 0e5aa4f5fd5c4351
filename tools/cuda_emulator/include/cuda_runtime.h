// CUDA runtime and device-side model for the CPU emulator.
#pragma once

#include "cuda_runtime_api.h"
#include "cuda_emulator.h"
