// sparse_labels on the CPU: the stage-2 targets from a sparse code.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../argument_checks.h"
#include "checks.h"

namespace srm_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_labels(const at::Tensor& values,
                                                 const at::Tensor& indices,
                                                 int64_t num_codewords) {
  TORCH_CHECK(num_codewords >= 1, "num_codewords must be >= 1, got ", num_codewords);
  check_sparse_code(values, indices, num_codewords);
  check_pixels_per_image(values.size(1), values.size(2), "values");
  const int64_t n = values.size(0), h = values.size(1), w = values.size(2), k = values.size(3);
  const auto vals = values.contiguous();
  const auto idx = indices.contiguous();
  // A fresh tensor even when k == 1 (a contiguous select would alias indices).
  auto pixel_labels = idx.select(3, 0).clone(at::MemoryFormat::Contiguous);
  auto image_labels = at::zeros({n, num_codewords}, values.options());
  const int64_t per_image = h * w * k;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_labels_cpu", [&] {
    // One image per task: each task owns its output row.
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row = image_labels.mutable_data_ptr<scalar_t>() + i * num_codewords;
        const scalar_t* v = vals.const_data_ptr<scalar_t>() + i * per_image;
        const int64_t* ix = idx.const_data_ptr<int64_t>() + i * per_image;
        for (int64_t e = 0; e < per_image; ++e) row[ix[e]] += v[e];
        const auto pixels = static_cast<scalar_t>(h * w);
        for (int64_t c = 0; c < num_codewords; ++c) row[c] /= pixels;
      }
    });
  });
  return {pixel_labels, image_labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(srm_ext, CPU, m) { m.impl("sparse_labels", &sparse_labels); }

}  // namespace srm_ext::cpu
