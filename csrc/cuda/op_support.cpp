// Definitions for op_support.h.
#include "op_support.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

namespace srm_ext::cuda_ops {

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "srm_ext: CUDA kernel ", kernel,
              " failed: ", cudaGetErrorString(err));
}

Dtype kernel_dtype(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "srm_ext: ", name,
              " must be float32, float16 or bfloat16 on CUDA, got ", type);
  return Dtype::kFloat32;
}

void check_on_device(const at::Tensor& t, const char* name,
                     const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "srm_ext: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "srm_ext: ", name,
              " must be on the same device as the other inputs (",
              ref.device(), "), got ", t.device());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name,
               const char* shape) {
  TORCH_CHECK(t.dim() == dim, "srm_ext: ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

void check_same_dtype(const at::Tensor& t, const char* name,
                      const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "srm_ext: ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(),
              "), got ", t.scalar_type());
}

void check_dictionary(const at::Tensor& dictionary, int64_t depth,
                      const at::Tensor& ref, const char* ref_name) {
  check_on_device(dictionary, "dictionary", ref);
  check_dim(dictionary, 2, "dictionary", "(D, K)");
  check_same_dtype(dictionary, "dictionary", ref, ref_name);
  TORCH_CHECK(dictionary.size(0) == depth, "srm_ext: dictionary has ",
              dictionary.size(0), " rows but ", ref_name, " has ", depth,
              " channels");
  TORCH_CHECK(dictionary.size(1) >= 1,
              "srm_ext: dictionary must have at least one codeword, got shape ",
              dictionary.sizes());
}

void check_sparse_kernel_limits(const at::Tensor& dictionary, int64_t k) {
  TORCH_CHECK(dictionary.size(0) <= srm_cuda::kMaxFeatureDim,
              "srm_ext CUDA: feature dimension D = ", dictionary.size(0),
              " exceeds the supported maximum of ", srm_cuda::kMaxFeatureDim);
  TORCH_CHECK(dictionary.size(1) <= srm_cuda::kMaxCodewords,
              "srm_ext CUDA: number of codewords K = ", dictionary.size(1),
              " exceeds the supported maximum of ", srm_cuda::kMaxCodewords);
  TORCH_CHECK(k <= srm_cuda::kMaxTopK, "srm_ext CUDA: k = ", k,
              " exceeds the supported maximum of ", srm_cuda::kMaxTopK);
}

void check_sparse_code(const at::Tensor& values, const at::Tensor& indices,
                       const at::Tensor& ref, int64_t num_codewords) {
  check_on_device(values, "values", ref);
  check_on_device(indices, "indices", ref);
  check_dim(values, 4, "values", "(N, H, W, k)");
  TORCH_CHECK(indices.sizes() == values.sizes(),
              "srm_ext: indices must have the shape of values (",
              values.sizes(), "), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong,
              "srm_ext: indices must be int64, got ", indices.scalar_type());
  kernel_dtype(values.scalar_type(), "values");
  TORCH_CHECK(values.size(3) >= 1,
              "srm_ext: values must keep at least one entry per pixel, got "
              "shape ", values.sizes());
  TORCH_CHECK(values.size(3) <= num_codewords, "srm_ext: values keeps k = ",
              values.size(3), " entries per pixel but there are only K = ",
              num_codewords, " codewords");
}

void check_code_of_x(const at::Tensor& x, const at::Tensor& dictionary,
                     const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK(x.is_cuda(), "srm_ext: x must be a CUDA tensor");
  check_dim(x, 4, "x", "(N, D, H, W)");
  kernel_dtype(x.scalar_type(), "x");
  check_dictionary(dictionary, x.size(1), x, "x");
  check_sparse_code(values, indices, x, dictionary.size(1));
  check_sparse_kernel_limits(dictionary, values.size(3));
  check_same_dtype(values, "values", x, "x");
  TORCH_CHECK(values.size(0) == x.size(0) && values.size(1) == x.size(2) &&
                  values.size(2) == x.size(3),
              "srm_ext: values ", values.sizes(),
              " do not match the pixels of x ", x.sizes());
}

void check_intercept(const at::Tensor& intercept, const at::Tensor& ref,
                     const char* ref_name) {
  check_on_device(intercept, "intercept", ref);
  TORCH_CHECK(intercept.numel() == 1,
              "srm_ext: intercept must have exactly one element, got shape ",
              intercept.sizes());
  check_same_dtype(intercept, "intercept", ref, ref_name);
}

at::Tensor intercept_as_float(const at::Tensor& intercept) {
  return intercept.reshape({1}).to(at::kFloat).contiguous();
}

FeatureMap feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "srm_ext: ", name,
              " must have shape (N, D, H, W), got ", t.sizes());
  FeatureMap map;
  map.data = t.data_ptr();
  map.dtype = kernel_dtype(t.scalar_type(), name);
  map.layout = {t.size(0),   t.size(1),   t.size(2),   t.size(3),
                t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return map;
}

at::Tensor empty_pixel_major_float(int64_t n, int64_t d, int64_t h, int64_t w,
                                   const at::Tensor& ref) {
  return at::empty({n, h, w, d}, ref.options().dtype(at::kFloat))
      .permute({0, 3, 1, 2});
}

at::Tensor empty_gradient(const at::Tensor& ref) {
  return at::empty({0}, ref.options());
}

at::Tensor deterministic_sum(const at::Tensor& input, double scale,
                             cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(input.scalar_type() == at::kFloat &&
                        input.is_contiguous());
  const int64_t count = input.numel();
  auto workspace = at::empty(
      {srm_cuda::deterministic_sum_workspace_size(count)},
      input.options().dtype(at::kDouble));
  auto out = at::empty({}, input.options().dtype(at::kFloat));
  check_launch(srm_cuda::launch_deterministic_sum(
                   input.data_ptr<float>(), count, scale,
                   workspace.data_ptr<double>(), out.data_ptr<float>(), stream),
               "deterministic_sum");
  return out;
}

at::Tensor transposed_dictionary(const at::Tensor& dictionary) {
  return dictionary.t().contiguous();
}

at::Tensor laid_out_like(const at::Tensor& grad, const at::Tensor& dictionary) {
  auto out = at::empty_like(dictionary, grad.options());
  if (out.strides() == grad.strides()) return grad;
  return out.copy_(grad);
}

at::Tensor dictionary_grad(const at::Tensor& features_a,
                           const at::Tensor& coef_a,
                           const at::Tensor* features_b,
                           const at::Tensor* coef_b,
                           const at::Tensor& indices,
                           const at::Tensor& dictionary,
                           at::ScalarType grad_dtype, cudaStream_t stream) {
  const int64_t depth = features_a.size(1);
  const int64_t num_codewords = dictionary.size(1);
  const int64_t k = indices.size(-1);
  const auto float_options = features_a.options().dtype(at::kFloat);

  if (at::globalContext().deterministicAlgorithms()) {
    // Group entries by codeword; the stable sort keeps entry order inside a
    // group, so every codeword is summed in a fixed order.
    const at::Tensor flat_indices = indices.reshape({-1});
    at::Tensor sorted_codes, entry_order;
    std::tie(sorted_codes, entry_order) =
        at::sort(flat_indices, /*stable=*/std::optional<bool>(true),
                 /*dim=*/0, /*descending=*/false);
    auto run_offsets = at::empty({num_codewords + 1}, indices.options());
    check_launch(srm_cuda::launch_codeword_run_offsets(
                     sorted_codes.data_ptr<int64_t>(), sorted_codes.numel(),
                     num_codewords, run_offsets.data_ptr<int64_t>(), stream),
                 "codeword_run_offsets");
    // Pixel-major features: each entry then reads one contiguous row.
    const at::Tensor rows_a =
        features_a.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor rows_b;
    FeatureMap map_b{};
    if (features_b != nullptr) {
      rows_b = features_b->contiguous(at::MemoryFormat::ChannelsLast);
      map_b = feature_map(rows_b, "features");
    }
    // Split long runs so that a popular codeword does not serialise on one
    // block; the split depends only on the sizes.
    const int64_t entries = flat_indices.numel();
    int64_t segments = (entries + num_codewords * 256 - 1) /
                       std::max<int64_t>(num_codewords * 256, 1);
    const int64_t partial_budget = int64_t{1} << 26;  // floats
    segments = std::min<int64_t>(
        segments, std::max<int64_t>(1, partial_budget /
                                           std::max<int64_t>(
                                               num_codewords * depth, 1)));
    segments = std::max<int64_t>(1, std::min<int64_t>(segments, 32));
    auto partials =
        at::empty({segments, num_codewords, depth}, float_options);
    check_launch(srm_cuda::launch_scatter_codewords_sorted(
                     feature_map(rows_a, "features"),
                     coef_a.data_ptr<float>(),
                     features_b != nullptr ? &map_b : nullptr,
                     coef_b != nullptr ? coef_b->data_ptr<float>() : nullptr,
                     entry_order.data_ptr<int64_t>(),
                     run_offsets.data_ptr<int64_t>(), k, num_codewords,
                     segments, partials.data_ptr<float>(), stream),
                 "scatter_codewords_sorted");
    return dictionary_grad_from_partials(partials, dictionary, grad_dtype,
                                         stream);
  }

  auto grad_t = at::zeros({num_codewords, depth}, float_options);
  FeatureMap map_b{};
  if (features_b != nullptr) {
    map_b = feature_map(*features_b, "features");
  }
  check_launch(srm_cuda::launch_scatter_codewords_atomic(
                   feature_map(features_a, "features"),
                   coef_a.data_ptr<float>(),
                   features_b != nullptr ? &map_b : nullptr,
                   coef_b != nullptr ? coef_b->data_ptr<float>() : nullptr,
                   indices.data_ptr<int64_t>(), k, num_codewords,
                   grad_t.data_ptr<float>(), stream),
               "scatter_codewords_atomic");
  return dictionary_grad_from_partials(grad_t, dictionary, grad_dtype, stream);
}

at::Tensor dictionary_grad_from_partials(const at::Tensor& partials,
                                         const at::Tensor& dictionary,
                                         at::ScalarType grad_dtype,
                                         cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(partials.scalar_type() == at::kFloat &&
                        partials.is_contiguous() &&
                        (partials.dim() == 2 || partials.dim() == 3));
  // Laid out like the dictionary, as the fake kernels promise. A 2-D dense
  // tensor is either (D, K) row-major or codeword-major, and the reduction
  // writes either layout directly.
  auto grad = at::empty_like(dictionary, dictionary.options().dtype(grad_dtype));
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() || grad.t().is_contiguous());
  const int64_t segments = partials.dim() == 3 ? partials.size(0) : 1;
  check_launch(srm_cuda::launch_reduce_dictionary_partials(
                   partials.data_ptr<float>(), segments, dictionary.size(0),
                   dictionary.size(1), /*codeword_major=*/!grad.is_contiguous(),
                   grad.data_ptr(), kernel_dtype(grad_dtype, "dictionary"),
                   stream),
               "reduce_dictionary_partials");
  return grad;
}

at::Tensor intercept_grad(const at::Tensor& grad_pre, const at::Tensor& x,
                          cudaStream_t stream) {
  return deterministic_sum(grad_pre, 1.0, stream).to(x.scalar_type());
}

namespace {

// launch_combine_codewords on tensors; sigmoid and entry_dots optional, and
// out.data null when only the entry dots are wanted.
void run_combine_codewords(const at::Tensor& coef, const at::Tensor& indices,
                           const at::Tensor& dictionary_t,
                           const at::Tensor* addend, float addend_scale,
                           const at::Tensor* device_scale, float host_scale,
                           const FeatureMap& out, const KeptSigmoid* sigmoid,
                           at::Tensor* entry_dots, cudaStream_t stream) {
  FeatureMap add_map{};
  if (addend != nullptr) {
    add_map = feature_map(*addend, "addend");
  }
  const auto pointer = [](const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  check_launch(
      srm_cuda::launch_combine_codewords(
          coef.data_ptr<float>(), indices.data_ptr<int64_t>(),
          indices.size(-1), dictionary_t.data_ptr(),
          kernel_dtype(dictionary_t.scalar_type(), "dictionary"),
          dictionary_t.size(0), addend != nullptr ? &add_map : nullptr,
          addend_scale,
          device_scale != nullptr ? device_scale->data_ptr<float>() : nullptr,
          host_scale, out,
          sigmoid != nullptr ? pointer(sigmoid->values) : nullptr,
          sigmoid != nullptr ? pointer(sigmoid->intercept) : nullptr,
          entry_dots != nullptr ? entry_dots->data_ptr<float>() : nullptr,
          stream),
      "combine_codewords");
}

}  // namespace

void combine_codewords(const at::Tensor& coef, const at::Tensor& indices,
                       const at::Tensor& dictionary_t, const at::Tensor* addend,
                       float addend_scale, const at::Tensor* device_scale,
                       float host_scale, const at::Tensor& out,
                       cudaStream_t stream) {
  run_combine_codewords(coef, indices, dictionary_t, addend, addend_scale,
                        device_scale, host_scale, feature_map(out, "output"),
                        nullptr, nullptr, stream);
}

at::Tensor residual_entry_dots(const at::Tensor& coef,
                               const at::Tensor& indices,
                               const at::Tensor& dictionary_t,
                               const at::Tensor& x,
                               const at::Tensor& device_scale,
                               float host_scale, const KeptSigmoid& sigmoid,
                               const at::Tensor* residual,
                               cudaStream_t stream) {
  auto dots = at::empty(indices.sizes(), x.options().dtype(at::kFloat));
  FeatureMap out;
  if (residual != nullptr) {
    out = feature_map(*residual, "residual");
  } else {  // the residual's layout with no data: dotted, never stored
    out = feature_map(x, "x");
    out.data = nullptr;
    out.dtype = Dtype::kFloat32;
  }
  run_combine_codewords(coef, indices, dictionary_t, &x, -1.0f,
                        &device_scale, host_scale, out, &sigmoid, &dots,
                        stream);
  return dots;
}

void residual_gradients(const at::Tensor& x, const at::Tensor& coef,
                        const at::Tensor& grad_pre, const at::Tensor& indices,
                        const at::Tensor& dictionary_t,
                        const at::Tensor& device_scale, float host_scale,
                        const at::Tensor* grad_x,
                        const at::Tensor* grad_dictionary_t,
                        cudaStream_t stream) {
  FeatureMap grad_x_map{};
  if (grad_x != nullptr) {
    grad_x_map = feature_map(*grad_x, "grad_x");
  }
  check_launch(
      srm_cuda::launch_residual_gradients(
          feature_map(x, "x"), coef.data_ptr<float>(),
          grad_pre.data_ptr<float>(), indices.data_ptr<int64_t>(),
          indices.size(-1), dictionary_t.data_ptr(), dictionary_t.size(0),
          device_scale.data_ptr<float>(), host_scale,
          grad_x != nullptr ? &grad_x_map : nullptr,
          grad_dictionary_t != nullptr ? grad_dictionary_t->data_ptr<float>()
                                       : nullptr,
          stream),
      "residual_gradients");
}

at::Tensor codeword_dots(const at::Tensor& features, const at::Tensor& indices,
                         const at::Tensor& dictionary_t,
                         const at::Tensor* sigmoid, cudaStream_t stream,
                         at::Tensor* pixel_norms) {
  auto out = at::empty(indices.sizes(), features.options().dtype(at::kFloat));
  if (pixel_norms != nullptr) {
    *pixel_norms = at::empty(indices.sizes().slice(0, indices.dim() - 1),
                             features.options().dtype(at::kFloat));
  }
  check_launch(srm_cuda::launch_codeword_dots(
                   feature_map(features, "features"),
                   indices.data_ptr<int64_t>(), indices.size(-1),
                   dictionary_t.data_ptr(),
                   kernel_dtype(dictionary_t.scalar_type(), "dictionary"),
                   dictionary_t.size(0),
                   sigmoid != nullptr ? sigmoid->data_ptr<float>() : nullptr,
                   out.data_ptr<float>(),
                   pixel_norms != nullptr ? pixel_norms->data_ptr<float>()
                                          : nullptr,
                   stream),
               "codeword_dots");
  return out;
}

at::Tensor pre_activation_grad(const at::Tensor& grad_values,
                               const at::Tensor& values,
                               const at::Tensor& indices, const at::Tensor& x,
                               const at::Tensor& dictionary_t,
                               const at::Tensor& intercept,
                               cudaStream_t stream) {
  auto out = at::empty(values.sizes(), x.options().dtype(at::kFloat));
  const Dtype grad_dtype = kernel_dtype(grad_values.scalar_type(), "grad_values");
  if (values.scalar_type() == at::kFloat) {
    check_launch(srm_cuda::launch_sigmoid_backward(
                     grad_values.data_ptr(), grad_dtype,
                     values.data_ptr<float>(), values.numel(),
                     out.data_ptr<float>(), stream),
                 "sigmoid_backward");
    return out;
  }
  const at::Tensor bias = intercept_as_float(intercept);
  check_launch(srm_cuda::launch_recomputed_sigmoid_backward(
                   grad_values.data_ptr(), feature_map(x, "x"),
                   indices.data_ptr<int64_t>(), indices.size(-1),
                   dictionary_t.data_ptr(),
                   kernel_dtype(dictionary_t.scalar_type(), "dictionary"),
                   dictionary_t.size(0), bias.data_ptr<float>(),
                   out.data_ptr<float>(), stream),
               "recomputed_sigmoid_backward");
  return out;
}

at::Tensor float_product(const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(b.dim() == 2 && (a.dim() == 2 || a.dim() == 3));
  // A float32 product whatever the caller's autocast state: an op called
  // under autocast would otherwise have its GEMM run in 16 bits.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::autocast_dispatch_keyset);
  // The batch shares b through an expanded view, which cuBLAS reads with a
  // batch stride of 0: no copy per batch entry.
  const auto shared = [&](const at::Tensor& right) {
    return right.expand({a.size(0), right.size(0), right.size(1)});
  };
  const bool batched = a.dim() == 3;
  if (a.scalar_type() == at::kFloat) {
    return batched ? at::bmm(a, shared(b)) : at::mm(a, b);
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return batched ? at::bmm(a, shared(b), at::kFloat) : at::mm(a, b, at::kFloat);
#else
  const at::Tensor fa = a.to(at::kFloat), fb = b.to(at::kFloat);
  return batched ? at::bmm(fa, shared(fb)) : at::mm(fa, fb);
#endif
}

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// The last two dimensions (R, C) of t as the column-major C x R matrix that
// cuBLAS multiplies by: t itself (op N) when its columns are unit-stride,
// its transpose read in place (op T) when its rows are, else a copy. Read in
// place only where the leading dimension fits cuBLAS's int (an NCHW map's
// is H*W).
struct BlasOperand {
  at::Tensor tensor;
  cublasOperation_t op;
  int64_t ld;
};

BlasOperand transposed_operand(const at::Tensor& t) {
  const int64_t rows = t.size(-2), cols = t.size(-1);
  if (t.stride(-1) == 1 && t.stride(-2) >= cols && t.stride(-2) <= kIntMax) {
    return {t, CUBLAS_OP_N, t.stride(-2)};
  }
  if (t.stride(-2) == 1 && t.stride(-1) >= rows && t.stride(-1) <= kIntMax) {
    return {t, CUBLAS_OP_T, t.stride(-1)};
  }
  return {t.contiguous(), CUBLAS_OP_N, cols};
}

}  // namespace

at::Tensor tf32_product(const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 3 && b.dim() == 2 &&
                        a.scalar_type() == at::kFloat &&
                        b.scalar_type() == at::kFloat && a.size(2) == b.size(0));
  const int64_t batch = a.size(0), rows = a.size(1), depth = a.size(2);
  const int64_t num_codes = b.size(1);
  auto out = at::empty({batch, rows, num_codes}, a.options());
  if (out.numel() == 0) {
    return out;
  }
  // In cuBLAS's column-major terms, out^T (K x M) = b^T (K x D) a^T (D x M)
  // for each batch entry, b shared by all of them.
  const BlasOperand b_op = transposed_operand(b);
  const BlasOperand a_op = transposed_operand(a);
  TORCH_CHECK(rows <= kIntMax && num_codes <= kIntMax && depth <= kIntMax &&
                  batch <= kIntMax,
              "srm_ext CUDA: a box of ", batch, " x ", rows,
              " pixels is too large for the TF32 GEMM");
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t status = cublasGemmStridedBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(), b_op.op, a_op.op,
      static_cast<int>(num_codes), static_cast<int>(rows),
      static_cast<int>(depth), &one, b_op.tensor.data_ptr(), CUDA_R_32F,
      static_cast<int>(b_op.ld), 0, a_op.tensor.data_ptr(), CUDA_R_32F,
      static_cast<int>(a_op.ld), a_op.tensor.stride(0), &zero,
      out.data_ptr(), CUDA_R_32F, static_cast<int>(num_codes),
      rows * num_codes, static_cast<int>(batch), CUBLAS_COMPUTE_32F_FAST_TF32,
      CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS,
              "srm_ext CUDA: the TF32 GEMM of the screened encode failed "
              "(cuBLAS status ", static_cast<int>(status), ")");
  return out;
}

EncodePath encode_path() {
  const char* choice = std::getenv("SRM_EXT_CUDA_ENCODE");
  const std::string_view name = choice != nullptr ? choice : "auto";
  TORCH_CHECK(name == "auto" || name == "gemm" || name == "fused" ||
                  name == "screened",
              "srm_ext: SRM_EXT_CUDA_ENCODE must be 'auto', 'gemm', 'fused' "
              "or 'screened', got '", name, "'");
  if (name == "fused" || at::globalContext().deterministicAlgorithms()) {
    return EncodePath::kFused;
  }
  return name == "screened" ? EncodePath::kScreened : EncodePath::kGemm;
}

// Candidates the screened encode scores exactly per pixel: enough beyond k
// that TF32's error rarely leaves the k-th best too close to the cutoff.
// Twice k (at least k + 8) certified every pixel sampled at the paper's
// shapes in benchmarks/screen_certification.py's model, where k + 8 left
// up to 98% uncertified at k = 40.
int64_t screen_candidates(int64_t k) {
  return std::min<int64_t>(k + std::max<int64_t>(k, 8), srm_cuda::kMaxTopK);
}

EncodePath encode_path_for(Dtype dtype, int64_t num_codewords, int64_t k) {
  const EncodePath path = encode_path();
  const int64_t num_candidates = screen_candidates(k);
  // The screen pays only where TF32 is not allowed anyway (the GEMM then
  // uses it), where it leaves codewords out, and where candidates beyond k
  // leave room to certify (not at the largest k).
  if (path == EncodePath::kScreened &&
      (dtype != Dtype::kFloat32 || at::globalContext().allowTF32CuBLAS() ||
       num_candidates >= num_codewords || num_candidates <= k)) {
    return EncodePath::kGemm;
  }
  return path;
}

const char* encode_path_name(EncodePath path) {
  switch (path) {
    case EncodePath::kFused:
      return "fused";
    case EncodePath::kScreened:
      return "screened";
    case EncodePath::kGemm:
      break;
  }
  return "gemm";
}

int64_t box_values(int64_t default_values) {
  const char* text = std::getenv("SRM_EXT_CUDA_BOX_VALUES");
  const int64_t value = text != nullptr ? std::atoll(text) : 0;
  return value > 0 ? value : default_values;
}

std::vector<PixelBox> pixel_boxes(const at::Tensor& x, int64_t max_pixels) {
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t per_image = h * w;
  max_pixels = std::max<int64_t>(max_pixels, 1);
  std::vector<PixelBox> boxes;
  if (per_image == 0) {
    return boxes;
  }
  if (per_image <= max_pixels) {
    const int64_t images = max_pixels / per_image;
    for (int64_t n0 = 0; n0 < n; n0 += images) {
      boxes.push_back({n0, std::min(images, n - n0), 0, h, 0, w});
    }
  } else if (w <= max_pixels) {
    const int64_t rows = max_pixels / w;
    for (int64_t n0 = 0; n0 < n; ++n0) {
      for (int64_t h0 = 0; h0 < h; h0 += rows) {
        boxes.push_back({n0, 1, h0, std::min(rows, h - h0), 0, w});
      }
    }
  } else {
    for (int64_t n0 = 0; n0 < n; ++n0) {
      for (int64_t h0 = 0; h0 < h; ++h0) {
        for (int64_t w0 = 0; w0 < w; w0 += max_pixels) {
          boxes.push_back({n0, 1, h0, 1, w0, std::min(max_pixels, w - w0)});
        }
      }
    }
  }
  return boxes;
}

}  // namespace srm_ext::cuda_ops
