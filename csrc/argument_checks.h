// Checks of arguments that every backend makes alike, with one message. The
// Python layer makes them first; these keep a direct torch.ops call from
// returning NaN where the public functions refuse the input.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace srm_ext {

// A loss weight scales the loss and every gradient, in float32 in the CUDA
// kernels: NaN, inf or a float32 overflow would make them NaN or inf, and a
// negative weight would train against the labels.
inline void check_loss_weight(double weight, const char* name) {
  TORCH_CHECK(weight >= 0.0 && weight <= std::numeric_limits<float>::max(), name,
              " must be finite, >= 0 and at most float32's largest, got ", weight);
}

// The image labels are means over each image's pixels: with none there are none.
inline void check_pixels_per_image(int64_t h, int64_t w, const char* name) {
  TORCH_CHECK(h * w > 0, name, " must have at least one pixel per image (H*W > 0), got H = ",
              h, ", W = ", w);
}

}  // namespace srm_ext
