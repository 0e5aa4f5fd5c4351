// sparse_decode and its backward on the CPU: k codewords per pixel, never a
// dense (pixels x K) matrix.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "pixel_tiles.h"
#include "sparse_math.h"

namespace srm_ext::cpu {
namespace {

void check_decode_args(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& dictionary) {
  check_cpu_float(dictionary, "dictionary");
  TORCH_CHECK(dictionary.dim() == 2, "dictionary must be 2-D (D, K), got ", dictionary.sizes());
  check_sparse_code(values, indices, dictionary.size(1));
  check_same_dtype(values, "values", dictionary, "dictionary");
}

at::Tensor sparse_decode(const at::Tensor& values, const at::Tensor& indices,
                         const at::Tensor& dictionary) {
  check_decode_args(values, indices, dictionary);
  const int64_t n = values.size(0), h = values.size(1), w = values.size(2), k = values.size(3);
  const int64_t dim = dictionary.size(0), num_codewords = dictionary.size(1);
  auto out = at::empty({n, dim, h, w}, values.options());
  const PixelGrid grid(out);
  const auto vals = values.contiguous();
  const auto idx = indices.contiguous();
  const auto codewords = codeword_rows(dictionary);  // K x D
  const int64_t tile = tile_pixels(num_codewords, grid.pixels());
  const int64_t num_tiles = (grid.pixels() + tile - 1) / tile;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_decode_cpu", [&] {
    at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> rows(tile * dim);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p0 = t * tile, count = std::min(tile, grid.pixels() - p0);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t p = p0 + i;
          combine_rows(codewords.const_data_ptr<scalar_t>(), dim,
                       idx.const_data_ptr<int64_t>() + p * k,
                       vals.const_data_ptr<scalar_t>() + p * k, k, rows.data() + i * dim);
        }
        scatter_tile(rows.data(), grid, p0, count, out.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return out;
}

// grad_values_pj = <grad_output_p, C[:, idx_pj]>;
// grad_dictionary[:, c] = sum over idx_pj == c of values_pj * grad_output_p.
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward(const at::Tensor& grad_output,
                                                          const at::Tensor& values,
                                                          const at::Tensor& indices,
                                                          const at::Tensor& dictionary,
                                                          std::array<bool, 2> output_mask) {
  check_decode_args(values, indices, dictionary);
  check_cpu_float(grad_output, "grad_output");
  check_same_dtype(values, "values", grad_output, "grad_output");
  const int64_t n = values.size(0), h = values.size(1), w = values.size(2), k = values.size(3);
  const int64_t dim = dictionary.size(0), num_codewords = dictionary.size(1);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == n && grad_output.size(1) == dim &&
                  grad_output.size(2) == h && grad_output.size(3) == w,
              "grad_output must have shape (", n, ", ", dim, ", ", h, ", ", w, "), got ",
              grad_output.sizes());
  const bool want_values = output_mask[0], want_dict = output_mask[1];

  const PixelGrid grid(grad_output);
  const auto vals = values.contiguous();
  const auto idx = indices.contiguous();
  auto grad_values = want_values ? at::empty_like(vals) : unwanted(values);
  const int64_t tile = tile_pixels(num_codewords, grid.pixels());
  const int64_t num_tiles = (grid.pixels() + tile - 1) / tile;
  at::Tensor grad_dict;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_decode_backward_cpu", [&] {
    const scalar_t* v_all = vals.const_data_ptr<scalar_t>();
    const int64_t* ix_all = idx.const_data_ptr<int64_t>();
    const scalar_t* g_all = grad_output.const_data_ptr<scalar_t>();

    DictionaryGradient<scalar_t> dict_grad(dictionary, want_dict);
    dict_grad.add_weighted_pixels(g_all, grid, ix_all, k, [&](int64_t e) { return v_all[e]; });
    grad_dict = dict_grad.finish(dictionary);

    if (want_values) {
      const auto codewords = codeword_rows(dictionary);  // K x D
      const scalar_t* cw = codewords.const_data_ptr<scalar_t>();
      at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
        std::vector<scalar_t> grads(tile * dim);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p0 = t * tile, count = std::min(tile, grid.pixels() - p0);
          gather_tile(g_all, grid, p0, count, grads.data());
          for (int64_t i = 0; i < count; ++i) {
            const int64_t e0 = (p0 + i) * k;
            dot_rows(grads.data() + i * dim, cw, dim, ix_all + e0, k,
                     grad_values.mutable_data_ptr<scalar_t>() + e0);
          }
        }
      });
    }
  });
  return {grad_values, grad_dict};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) {
  m.impl("sparse_decode", &sparse_decode);
  m.impl("sparse_decode_backward", &sparse_decode_backward);
}

}  // namespace srm_ext::cpu
