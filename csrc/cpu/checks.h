// Argument checks at the kernel boundary. The Python layer checks shapes and
// dtypes first with friendlier messages; these keep direct torch.ops calls
// safe. The checks of values (index and label ranges) are the only ones a
// call through srm_ext makes: they raise ValueError, as the Python checks do.
#pragma once

#include <ATen/ATen.h>

namespace srm_ext::cpu {

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64 for the CPU kernels, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* name_a,
                             const at::Tensor& b, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name_b, " has dtype ", b.scalar_type(),
              " but ", name_a, " has ", a.scalar_type(), "; expected the same dtype");
}

// x (N, D, H, W) against dictionary (D, K), and a one-element intercept.
inline void check_features_and_dictionary(const at::Tensor& x, const char* x_name,
                                          const at::Tensor& dictionary) {
  check_cpu_float(x, x_name);
  check_cpu_float(dictionary, "dictionary");
  check_same_dtype(x, x_name, dictionary, "dictionary");
  TORCH_CHECK(x.dim() == 4, x_name, " must be 4-D (N, D, H, W), got ", x.sizes());
  TORCH_CHECK(dictionary.dim() == 2 && dictionary.size(0) == x.size(1),
              "dictionary must have shape (", x.size(1), ", K) to match ", x_name,
              ", got ", dictionary.sizes());
  TORCH_CHECK(dictionary.size(1) >= 1, "dictionary must have at least one codeword");
}

inline void check_intercept(const at::Tensor& intercept, const at::Tensor& x,
                            const char* x_name) {
  TORCH_CHECK(intercept.numel() == 1, "intercept must have one element, got shape ",
              intercept.sizes());
  check_cpu_float(intercept, "intercept");
  check_same_dtype(x, x_name, intercept, "intercept");
}

inline void check_k(int64_t k, int64_t num_codewords) {
  TORCH_CHECK(k >= 1 && k <= num_codewords, "k must satisfy 1 <= k <= K=", num_codewords,
              ", got ", k);
}

// Every entry of the int64 tensor t lies in [0, bound).
inline void check_index_range(const at::Tensor& t, const char* name, int64_t bound) {
  if (t.numel() == 0) {
    return;
  }
  const auto [lo, hi] = at::aminmax(t);
  const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < bound, name, " must lie in [0, ", bound,
                    "), got values in [", low, ", ", high, "]");
}

// values (N, H, W, k) and int64 indices of the same shape, all in [0, K).
inline void check_sparse_code(const at::Tensor& values, const at::Tensor& indices,
                              int64_t num_codewords) {
  check_cpu_float(values, "values");
  TORCH_CHECK(values.dim() == 4, "values must be 4-D (N, H, W, k), got ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.sizes() == values.sizes(), "indices has shape ", indices.sizes(),
              " but values has ", values.sizes());
  TORCH_CHECK(values.size(3) >= 1 && values.size(3) <= num_codewords,
              "values keeps k=", values.size(3), " entries but there are K=",
              num_codewords, " codewords");
  check_index_range(indices, "indices", num_codewords);
}

// A sparse code (N, H, W, k) must cover exactly the pixels of the map
// (N, D, H, W) it is used with: the kernels index both by pixel.
inline void check_code_covers(const at::Tensor& values, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(values.size(0) == x.size(0) && values.size(1) == x.size(2) &&
                  values.size(2) == x.size(3),
              "values must have shape (", x.size(0), ", ", x.size(2), ", ", x.size(3),
              ", k) to match ", x_name, ", got ", values.sizes());
}

// Mask entries of a backward op; unwanted gradients are returned as (0,).
inline at::Tensor unwanted(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A sum kept in double, as a 0-dim tensor of like's dtype. Rounded as a cast
// rounds, so past float32's range it is +-inf, as the reference's result would
// be; at::scalar_tensor refuses such a value.
inline at::Tensor scalar_like(double value, const at::Tensor& like) {
  return at::scalar_tensor(value, like.options().dtype(at::kDouble)).to(like.scalar_type());
}

}  // namespace srm_ext::cpu
