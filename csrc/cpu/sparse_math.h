// Small dense-vector helpers and the per-chunk dictionary-gradient buffers
// used by the sparse kernels. Codewords are read from the transposed
// dictionary (K x D, row-major) so each codeword is a contiguous D-vector.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "pixel_tiles.h"

namespace srm_ext::cpu {

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t z) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-z));
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha * x
template <typename scalar_t>
inline void axpy(scalar_t alpha, const scalar_t* x, scalar_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out = sum_j weights[j] * codewords[indices[j]]
template <typename scalar_t>
inline void combine_codewords(const scalar_t* codewords, int64_t dim,
                              const int64_t* indices, const scalar_t* weights,
                              int64_t k, scalar_t* out) {
  std::fill_n(out, dim, scalar_t(0));
  for (int64_t j = 0; j < k; ++j) axpy(weights[j], codewords + indices[j] * dim, out, dim);
}

// Dictionary gradient accumulated per chunk (a K x D buffer each, no atomics)
// and summed in chunk order, so results do not depend on thread timing.
template <typename scalar_t>
class CodewordGradients {
 public:
  CodewordGradients(int64_t num_chunks, int64_t num_codewords, int64_t dim, bool enabled)
      : k_(num_codewords), d_(dim),
        buffer_(enabled ? num_chunks * num_codewords * dim : 0, scalar_t(0)) {}

  bool enabled() const { return !buffer_.empty(); }

  // The gradient row of codeword `c` in chunk `chunk`.
  scalar_t* row(int64_t chunk, int64_t c) { return buffer_.data() + (chunk * k_ + c) * d_; }

  // Sums the chunks into a (D x K) tensor shaped like the dictionary.
  at::Tensor reduce(const at::TensorOptions& options) {
    const int64_t chunks = static_cast<int64_t>(buffer_.size()) / (k_ * d_);
    auto summed = at::from_blob(buffer_.data(), {chunks, k_, d_}, options.device(at::kCPU))
                      .sum(0);
    return summed.t().contiguous();
  }

 private:
  int64_t k_, d_;
  std::vector<scalar_t> buffer_;
};

// Intercept gradient partials, one per chunk, summed in chunk order.
class ChunkSums {
 public:
  explicit ChunkSums(int64_t num_chunks) : sums_(num_chunks, 0.0) {}
  double& operator[](int64_t chunk) { return sums_[chunk]; }
  double total() const {
    double t = 0.0;
    for (double s : sums_) t += s;
    return t;
  }

 private:
  std::vector<double> sums_;
};

}  // namespace srm_ext::cpu
