// The fused encode step shared by sparse_encode and reconstruction_loss:
// for a tile of pixels, one GEMM against the dictionary, then a per-pixel
// top-k on the pre-activations and the sigmoid of the k winners. The dense
// similarity exists only for the tile being encoded.
#pragma once

#include <cstdint>
#include <vector>

#include "matmul.h"
#include "pixel_tiles.h"
#include "sparse_math.h"
#include "topk_select.h"

namespace srm_ext::cpu {

template <typename scalar_t>
class TileEncoder {
 public:
  // dictionary: (D, K), shared by the workers. One encoder per worker thread.
  TileEncoder(const scalar_t* x, const PixelGrid& grid, const RightFactor<scalar_t>& dictionary,
              int64_t k, scalar_t bias, int64_t tile_capacity)
      : x_(x), grid_(grid), dictionary_(dictionary), num_codewords_(dictionary.cols()),
        k_(k), bias_(bias),
        features_(tile_capacity * grid.c),
        similarity_(tile_capacity * num_codewords_),
        selector_(num_codewords_, k) {}

  // Encodes pixels [p0, p0 + count): writes count x k values and indices.
  // Afterwards features() holds the tile's pixels as rows of D values.
  void encode(int64_t p0, int64_t count, scalar_t* values, int64_t* indices) {
    gather_tile(x_, grid_, p0, count, features_.data());
    const MatrixRef<scalar_t> tile{features_.data(), count, grid_.c, grid_.c, 1};
    dictionary_.multiply(tile, similarity_.data(), num_codewords_, /*accumulate=*/false);
    for (int64_t i = 0; i < count; ++i) {
      scalar_t* v = values + i * k_;
      selector_.select(similarity_.data() + i * num_codewords_, bias_, v, indices + i * k_);
      for (int64_t j = 0; j < k_; ++j) v[j] = sigmoid(v[j]);
    }
  }

  const scalar_t* features() const { return features_.data(); }

 private:
  const scalar_t* x_;
  PixelGrid grid_;
  const RightFactor<scalar_t>& dictionary_;
  int64_t num_codewords_, k_;
  scalar_t bias_;
  std::vector<scalar_t> features_;    // tile x D
  std::vector<scalar_t> similarity_;  // tile x K pre-activations (without bias)
  TopkSelector<scalar_t> selector_;
};

}  // namespace srm_ext::cpu
