// The fused stage-1 loss mean((decode(encode(x)) - x)^2) on the CPU.
//
// Forward: per pixel tile, encode (GEMM + top-k), reconstruct from k
// codewords and accumulate the squared residual; only the sparse code is kept
// for backward. Backward recomputes each pixel's residual from the code
// (k*D work) instead of storing an (N, D, H, W) residual.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "pixel_tiles.h"
#include "sparse_math.h"
#include "tile_encoder.h"

namespace srm_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss(
    const at::Tensor& x, const at::Tensor& dictionary, const at::Tensor& intercept, int64_t k) {
  check_features_and_dictionary(x, "x", dictionary);
  check_intercept(intercept, x, "x");
  const int64_t dim = dictionary.size(0), num_codewords = dictionary.size(1);
  check_k(k, num_codewords);

  const PixelGrid grid(x);
  auto values = at::empty({grid.n, grid.h, grid.w, k}, x.options());
  auto indices = at::empty({grid.n, grid.h, grid.w, k}, x.options().dtype(at::kLong));
  const auto codewords = codeword_rows(dictionary);  // K x D
  const int64_t tile = tile_pixels(num_codewords, grid.pixels());
  const int64_t num_tiles = (grid.pixels() + tile - 1) / tile;
  // Partial sums per piece of pixels, added in piece order: the loss does not
  // depend on the tiling or the threads.
  PieceSums piece_sums(grid.pixels());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reconstruction_loss_cpu", [&] {
    const scalar_t bias = intercept.item<scalar_t>();
    const RightFactor<scalar_t> dict(dictionary.detach());
    const scalar_t* cw = codewords.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
      TileEncoder<scalar_t> encoder(x.const_data_ptr<scalar_t>(), grid, dict, k, bias, tile);
      std::vector<scalar_t> x_hat(dim);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p0 = t * tile, count = std::min(tile, grid.pixels() - p0);
        scalar_t* v = values.mutable_data_ptr<scalar_t>() + p0 * k;
        int64_t* ix = indices.mutable_data_ptr<int64_t>() + p0 * k;
        encoder.encode(p0, count, v, ix);
        for (int64_t i = 0; i < count; ++i) {
          combine_rows(cw, dim, ix + i * k, v + i * k, k, x_hat.data());
          const scalar_t* xp = encoder.features() + i * dim;
          piece_sums[(p0 + i) / kPiecePixels] += sum_in_lanes<double>(dim, [&](int64_t d) {
            const scalar_t r = x_hat[d] - xp[d];
            return static_cast<double>(r * r);
          });
        }
      }
    });
  });
  const double total = piece_sums.total();
  const double count = static_cast<double>(grid.pixels() * dim);
  auto loss = scalar_like(count > 0 ? total / count : std::nan(""), x);
  return {loss, values, indices};
}

// With M = N*D*H*W and r_p = x_hat_p - x_p:
//   g_p = 2 * grad_loss / M * r_p                 (d loss / d x_hat_p)
//   gp_pj = <g_p, C[:, idx_pj]> * v_pj (1 - v_pj)  (d loss / d pre_pj)
//   grad_dictionary[:, idx_pj] += v_pj g_p + gp_pj x_p
//   grad_intercept = sum gp;  grad_x_p = -g_p + sum_j gp_pj C[:, idx_pj]
// v is the sigmoid itself in float32 and float64; the intercept is only checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reconstruction_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& dictionary,
    const at::Tensor& intercept, const at::Tensor& values, const at::Tensor& indices,
    std::array<bool, 3> output_mask) {
  check_features_and_dictionary(x, "x", dictionary);
  check_intercept(intercept, x, "x");
  const int64_t dim = dictionary.size(0), num_codewords = dictionary.size(1);
  check_sparse_code(values, indices, num_codewords);
  check_code_covers(values, x, "x");
  check_same_dtype(x, "x", values, "values");
  check_cpu_float(grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must have one element, got shape ",
              grad_loss.sizes());
  const bool want_x = output_mask[0], want_dict = output_mask[1], want_bias = output_mask[2];
  if (!want_x && !want_dict && !want_bias) return {unwanted(x), unwanted(x), unwanted(x)};

  const PixelGrid grid(x);
  const int64_t k = values.size(3);
  const auto vals = values.contiguous();
  const auto idx = indices.contiguous();
  const auto codewords = codeword_rows(dictionary);  // K x D
  auto grad_x = want_x ? at::empty_like(x) : unwanted(x);
  const PixelGrid grad_grid = want_x ? PixelGrid(grad_x) : grid;
  at::Tensor grad_dict, grad_bias;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reconstruction_loss_backward_cpu", [&] {
    const scalar_t scale = static_cast<scalar_t>(
        2.0 * grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(x.numel(), 1)));
    const scalar_t* cw = codewords.const_data_ptr<scalar_t>();
    const scalar_t* v_all = vals.const_data_ptr<scalar_t>();
    const int64_t* ix_all = idx.const_data_ptr<int64_t>();
    DictionaryGradient<scalar_t> dict_grad(dictionary, want_dict);
    PieceSums bias_grads(grid.pixels());

    // Per block of pixels, the block's x_p, g_p (when the dictionary gradient
    // is wanted) and gp, pixel-major.
    const int64_t block = block_pixels(dim + k);
    std::vector<scalar_t> features(block * dim), grads(want_dict ? block * dim : 0);
    std::vector<scalar_t> pre_grads(block * k);
    // Per worker: one pixel's g (when not kept in `grads`) and a piece's grad_x.
    PerThreadScratch<scalar_t> scratch(dim + (want_x ? kPiecePixels * dim : 0));

    for_each_pixel_block(grid.pixels(), block, [&](int64_t p0, int64_t count) {
      // Over pixels: g_p = scale * (x_hat_p - x_p), gp, the intercept
      // gradient and grad_x_p = -g_p + sum_j gp_pj C[:, idx_pj].
      for_each_piece(p0, count, [&](int64_t piece, int64_t q0, int64_t n) {
        scalar_t* xb = features.data() + (q0 - p0) * dim;
        gather_tile(x.const_data_ptr<scalar_t>(), grid, q0, n, xb);
        scalar_t* own = scratch.get();
        scalar_t* grad_features = own + dim;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = q0 + i;
          const scalar_t* xp = xb + i * dim;
          scalar_t* g = want_dict ? grads.data() + (p - p0) * dim : own;
          combine_rows(cw, dim, ix_all + p * k, v_all + p * k, k, g);
          for (int64_t d = 0; d < dim; ++d) g[d] = scale * (g[d] - xp[d]);
          scalar_t* gp = pre_grads.data() + (p - p0) * k;
          dot_rows(g, cw, dim, ix_all + p * k, k, gp);
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t v = v_all[p * k + j];
            gp[j] *= v * (scalar_t(1) - v);
            bias_grads[piece] += gp[j];
          }
          if (want_x) {
            scalar_t* gx = grad_features + i * dim;
            combine_rows(cw, dim, ix_all + p * k, gp, k, gx);
            for (int64_t d = 0; d < dim; ++d) gx[d] -= g[d];
          }
        }
        if (want_x) {
          scatter_tile(grad_features, grad_grid, q0, n, grad_x.mutable_data_ptr<scalar_t>());
        }
      });
      // Over codewords: grad_dictionary[:, idx_e] += v_e g_p + gp_e x_p.
      dict_grad.template add_entries<2>(
          ix_all, k, p0, count, [&](int64_t e, scalar_t* weights, const scalar_t** sources) {
            const int64_t i = e / k - p0;
            weights[0] = v_all[e];
            sources[0] = grads.data() + i * dim;
            weights[1] = pre_grads[e - p0 * k];
            sources[1] = features.data() + i * dim;
          });
    });
    grad_dict = dict_grad.finish(dictionary);
    grad_bias = want_bias ? scalar_like(bias_grads.total(), x) : unwanted(x);
  });
  return {grad_x, grad_dict, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) {
  m.impl("reconstruction_loss", &reconstruction_loss);
  m.impl("reconstruction_loss_backward", &reconstruction_loss_backward);
}

}  // namespace srm_ext::cpu
