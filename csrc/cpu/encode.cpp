// sparse_encode and its backward on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "pixel_tiles.h"
#include "sparse_math.h"
#include "tile_encoder.h"

namespace srm_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_encode(const at::Tensor& x,
                                                 const at::Tensor& dictionary,
                                                 const at::Tensor& intercept, int64_t k) {
  check_features_and_dictionary(x, "x", dictionary);
  check_intercept(intercept, x, "x");
  const int64_t num_codewords = dictionary.size(1);
  check_k(k, num_codewords);

  const PixelGrid grid(x);
  auto values = at::empty({grid.n, grid.h, grid.w, k}, x.options());
  auto indices = at::empty({grid.n, grid.h, grid.w, k}, x.options().dtype(at::kLong));
  const int64_t tile = tile_pixels(num_codewords, grid.pixels());
  const int64_t num_tiles = (grid.pixels() + tile - 1) / tile;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_encode_cpu", [&] {
    const scalar_t bias = intercept.item<scalar_t>();
    const RightFactor<scalar_t> dict(dictionary.detach());
    at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
      TileEncoder<scalar_t> encoder(x.const_data_ptr<scalar_t>(), grid, dict, k, bias, tile);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p0 = t * tile, count = std::min(tile, grid.pixels() - p0);
        encoder.encode(p0, count, values.mutable_data_ptr<scalar_t>() + p0 * k,
                       indices.mutable_data_ptr<int64_t>() + p0 * k);
      }
    });
  });
  return {values, indices};
}

// gp_pj = grad_values_pj * v_pj * (1 - v_pj) is the gradient of pixel p's j-th
// kept pre-activation; it reaches the intercept, the kept codewords
// (gp_pj * x_p) and x (sum_j gp_pj * C[:, idx_pj]). float32 and float64
// values are the sigmoid itself, so the intercept is only checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_encode_backward(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& dictionary, const at::Tensor& intercept,
    std::array<bool, 3> output_mask) {
  check_features_and_dictionary(x, "x", dictionary);
  check_intercept(intercept, x, "x");
  const int64_t num_codewords = dictionary.size(1), dim = dictionary.size(0);
  check_sparse_code(values, indices, num_codewords);
  check_code_covers(values, x, "x");
  check_same_dtype(x, "x", values, "values");
  check_cpu_float(grad_values, "grad_values");
  check_same_dtype(values, "values", grad_values, "grad_values");
  TORCH_CHECK(grad_values.sizes() == values.sizes(), "grad_values must have shape ",
              values.sizes(), ", got ", grad_values.sizes());
  const bool want_x = output_mask[0], want_dict = output_mask[1], want_bias = output_mask[2];

  const PixelGrid grid(x);
  const int64_t k = values.size(3);
  const auto grad_v = grad_values.contiguous();
  const auto vals = values.contiguous();
  const auto idx = indices.contiguous();
  auto grad_x = want_x ? at::empty_like(x) : unwanted(x);
  const PixelGrid grad_grid = want_x ? PixelGrid(grad_x) : grid;
  at::Tensor grad_dict, grad_bias;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_encode_backward_cpu", [&] {
    const scalar_t* v_all = vals.const_data_ptr<scalar_t>();
    const int64_t* ix_all = idx.const_data_ptr<int64_t>();
    const scalar_t* gv_all = grad_v.const_data_ptr<scalar_t>();
    auto pre_grad = [&](int64_t e) { return gv_all[e] * v_all[e] * (scalar_t(1) - v_all[e]); };

    DictionaryGradient<scalar_t> dict_grad(dictionary, want_dict);
    dict_grad.add_weighted_pixels(x.const_data_ptr<scalar_t>(), grid, ix_all, k, pre_grad);
    grad_dict = dict_grad.finish(dictionary);

    const auto codewords = codeword_rows(dictionary);  // K x D
    PieceSums bias_grads(grid.pixels());
    PerThreadScratch<scalar_t> scratch(k + (want_x ? kPiecePixels * dim : 0));
    for_each_piece(0, grid.pixels(), [&](int64_t piece, int64_t p0, int64_t count) {
      scalar_t* gp = scratch.get();
      scalar_t* grad_features = gp + k;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t e0 = (p0 + i) * k;
        for (int64_t j = 0; j < k; ++j) {
          gp[j] = pre_grad(e0 + j);
          bias_grads[piece] += gp[j];
        }
        if (want_x) {
          combine_rows(codewords.const_data_ptr<scalar_t>(), dim, ix_all + e0, gp, k,
                       grad_features + i * dim);
        }
      }
      if (want_x) {
        scatter_tile(grad_features, grad_grid, p0, count, grad_x.mutable_data_ptr<scalar_t>());
      }
    });
    grad_bias = want_bias ? scalar_like(bias_grads.total(), x) : unwanted(x);
  });
  return {grad_x, grad_dict, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) {
  m.impl("sparse_encode", &sparse_encode);
  m.impl("sparse_encode_backward", &sparse_encode_backward);
}

}  // namespace srm_ext::cpu
