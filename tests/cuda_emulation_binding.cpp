// Python binding of the srm_ext kernel launchers (csrc/cuda/srm_kernels.h)
// built against the CPU emulator (tools/cuda_emulator), so that the tests can
// run the CUDA kernels on CPU tensors. Each function passes the tensors'
// pointers to one launcher and raises if it reported an error or a kernel
// failed in the emulator. The tensors are fenced copies (see with_fences), so
// that a kernel reading or writing outside one fails as on a GPU.
#include <torch/extension.h>

#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"  // grid_stride_blocks, as the emulated build caps it
#include "op_support.h"
#include "srm_kernels.h"

#include <cuda_runtime.h>  // the emulator's, for its fenced memory

namespace emulator_probes {
cudaError_t launch_neighbour(bool with_barrier, int blocks, float* out);
cudaError_t launch_warp_handoff(bool with_barrier, float* out);
cudaError_t launch_uninitialised_local(int count, float* out);
cudaError_t launch_block_count(bool chained, int blocks, float* out);
cudaError_t launch_divergent_barrier(float* out);
cudaError_t launch_barrier_after_exit(float* out);
cudaError_t launch_uninitialised_shared(float* out);
cudaError_t launch_split_barrier(bool split, float* out);
cudaError_t launch_warp_collectives(bool mixed, float* out);
cudaError_t launch_warp_primitives(float* out, unsigned* ballot);
cudaError_t launch_dynamic_shared(size_t bytes, bool raise_limit, float* out);
cudaError_t launch_static_and_dynamic_shared(size_t bytes, bool raise_limit, float* out);
cudaError_t launch_bounded(int threads, float* out);
cudaError_t launch_vector_load(int first, float* out);
cudaError_t launch_shifted_read(const float* in, int shift, float* out);
cudaError_t launch_tf32_mma(bool round, float* out);
}  // namespace emulator_probes

namespace {

using srm_cuda::Dtype;
using srm_cuda::FeatureMap;
using OptionalTensor = std::optional<at::Tensor>;

// Copies of a call's tensors in fenced memory (cuda_emulator::fenced_alloc),
// written back to the originals after the call. Each copy spans its tensor's
// elements exactly, against the inaccessible page after them, or under the
// reverse schedule the one before them (the shuffled one picks per tensor),
// so that an index one past either end faults instead of reading a
// neighbouring allocation. Tensors that share storage with another argument
// are passed as they are: separate copies would not alias.
class Fences {
 public:
  template <typename T>
  void count(const T& arg) {
    if constexpr (std::is_same_v<T, at::Tensor>) {
      if (arg.defined()) ++storages_[arg.storage().data()];
    } else if constexpr (std::is_same_v<T, OptionalTensor>) {
      if (arg.has_value()) count(*arg);
    }
  }

  template <typename T>
  T fence(const T& arg) {
    if constexpr (std::is_same_v<T, at::Tensor>) {
      return copy_of(arg);
    } else if constexpr (std::is_same_v<T, OptionalTensor>) {
      return arg.has_value() ? OptionalTensor(copy_of(*arg)) : arg;
    } else {
      return arg;
    }
  }

  // Writes the copies back; raises where a kernel wrote into the poisoned
  // bytes beside a copy, which no fault catches.
  void finish() {
    for (const Copy& c : copies_) {
      TORCH_CHECK(cuda_emulator::fenced_intact(c.copy.data_ptr()),
                  "a kernel wrote outside a ", c.bytes, "-byte tensor argument");
      std::memcpy(c.original.data_ptr(), c.copy.data_ptr(), c.bytes);
    }
  }

 private:
  struct Copy {
    at::Tensor original, copy;
    size_t bytes;
  };

  at::Tensor copy_of(const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0 || storages_[t.storage().data()] > 1) return t;
    int64_t span = 1;
    for (int64_t i = 0; i < t.dim(); ++i) {
      if (t.stride(i) < 0) return t;
      span += (t.size(i) - 1) * t.stride(i);
    }
    const size_t bytes = static_cast<size_t>(span) * t.element_size();
    const cuda_emulator::State& s = cuda_emulator::state();
    const bool at_start = s.schedule == 1 || (s.schedule == 2 && (s.seed + copies_.size()) % 2 == 1);
    void* data = cuda_emulator::fenced_alloc(bytes, t.element_size(), "tensor", at_start);
    std::memcpy(data, t.data_ptr(), bytes);
    at::Tensor copy = at::from_blob(
        data, t.sizes(), t.strides(), [](void* p) { cuda_emulator::fenced_free(p); }, t.options());
    copies_.push_back({t, copy, bytes});
    return copy;
  }

  std::map<const void*, int> storages_;
  std::vector<Copy> copies_;
};

// `function` with every tensor argument fenced.
template <typename... Params>
auto with_fences(void (*function)(Params...)) {
  return [function](Params... args) {
    Fences fences;
    (fences.count(args), ...);
    function(fences.fence(args)...);
    fences.finish();
  };
}

// An uninitialised float tensor of `numel` elements in fenced memory (0xff
// bytes), for workspaces.
at::Tensor fenced_empty(int64_t numel, at::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* data = cuda_emulator::fenced_alloc(bytes, c10::elementSize(dtype), "workspace");
  return at::from_blob(
      data, {numel}, [](void* p) { cuda_emulator::fenced_free(p); }, at::TensorOptions(dtype));
}

void check(cudaError_t status, const char* launcher) {
  const std::string failure = cuda_emulator::take_failure();
  TORCH_CHECK(failure.empty(), launcher, ": ", failure);
  TORCH_CHECK(status == cudaSuccess, launcher, " returned ", cudaGetErrorString(status), " (",
              static_cast<int>(status), ")");
}

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

FeatureMap feature_map(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "feature maps are (N, D, H, W)");
  return {t.data_ptr(), dtype_of(t),
          {t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2),
           t.stride(3)}};
}

// The map of an optional tensor, for launchers that take `const FeatureMap*`.
std::optional<FeatureMap> optional_map(const OptionalTensor& t) {
  return t.has_value() ? std::optional<FeatureMap>(feature_map(*t)) : std::nullopt;
}

template <typename T>
T* pointer(const OptionalTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

void sparse_encode(const at::Tensor& x, const at::Tensor& dictionary,
                   const at::Tensor& intercept, int64_t k, bool use_tensor_cores,
                   at::Tensor values, at::Tensor indices, const OptionalTensor& loss_partials) {
  check(srm_cuda::launch_sparse_encode(feature_map(x), dictionary.data_ptr(), dictionary.size(1),
                                       intercept.data_ptr<float>(), k, use_tensor_cores,
                                       values.data_ptr(), indices.data_ptr<int64_t>(),
                                       pointer<float>(loss_partials), nullptr),
        "launch_sparse_encode");
}

void select_top_k(const at::Tensor& pre, const at::Tensor& intercept, int64_t k,
                  at::Tensor values, at::Tensor indices) {
  TORCH_CHECK(pre.dim() == 2 && pre.stride(1) == 1, "pre is (rows, K) with unit column stride");
  check(srm_cuda::launch_select_top_k(pre.data_ptr<float>(), pre.size(0), pre.stride(0),
                                      pre.size(1), intercept.data_ptr<float>(), k,
                                      dtype_of(values), values.data_ptr(),
                                      indices.data_ptr<int64_t>(), nullptr),
        "launch_select_top_k");
}

void select_candidates(const at::Tensor& pre, const at::Tensor& intercept, int64_t count,
                       at::Tensor candidates, at::Tensor cutoff) {
  TORCH_CHECK(pre.dim() == 2 && pre.stride(1) == 1, "pre is (rows, K) with unit column stride");
  check(srm_cuda::launch_select_candidates(pre.data_ptr<float>(), pre.size(0), pre.stride(0),
                                           pre.size(1), intercept.data_ptr<float>(), count,
                                           candidates.data_ptr<int64_t>(),
                                           cutoff.data_ptr<float>(), nullptr),
        "launch_select_candidates");
}

void certify_top_k(const at::Tensor& dots, const at::Tensor& candidates, const at::Tensor& cutoff,
                   const at::Tensor& pixel_norms, const at::Tensor& norm_max,
                   double relative_error, double underflow_error, double norm_floor,
                   const at::Tensor& intercept, int64_t k,
                   at::Tensor values, at::Tensor indices, int64_t first_row,
                   at::Tensor fallback_rows, at::Tensor fallback_count) {
  check(srm_cuda::launch_certify_top_k(
            dots.data_ptr<float>(), candidates.data_ptr<int64_t>(), cutoff.data_ptr<float>(),
            dots.size(0), dots.size(1), pixel_norms.data_ptr<float>(), norm_max.data_ptr<float>(),
            srm_cuda::Tf32ErrorBound{static_cast<float>(relative_error),
                                     static_cast<float>(underflow_error),
                                     static_cast<float>(norm_floor)},
            intercept.data_ptr<float>(), k,
            values.data_ptr<float>(), indices.data_ptr<int64_t>(), first_row,
            fallback_rows.data_ptr<int64_t>(), fallback_count.data_ptr<int64_t>(), nullptr),
        "launch_certify_top_k");
}

void exact_rows_top_k(const at::Tensor& x, const at::Tensor& dictionary_t,
                      const at::Tensor& fallback_rows, const at::Tensor& fallback_count,
                      int64_t max_rows, const at::Tensor& intercept, int64_t k,
                      at::Tensor values, at::Tensor indices) {
  check(srm_cuda::launch_exact_rows_top_k(
            feature_map(x), dictionary_t.data_ptr<float>(), dictionary_t.size(0),
            fallback_rows.data_ptr<int64_t>(), fallback_count.data_ptr<int64_t>(), max_rows,
            intercept.data_ptr<float>(), k, values.data_ptr<float>(),
            indices.data_ptr<int64_t>(), nullptr),
        "launch_exact_rows_top_k");
}

void residual_square_sums(const at::Tensor& coef, const at::Tensor indices, int64_t k,
                          const at::Tensor& dictionary_t, const at::Tensor& x,
                          at::Tensor partials) {
  check(srm_cuda::launch_residual_square_sums(
            coef.data_ptr<float>(), indices.data_ptr<int64_t>(), k, dictionary_t.data_ptr(),
            dtype_of(dictionary_t), dictionary_t.size(0), feature_map(x),
            partials.data_ptr<float>(), nullptr),
        "launch_residual_square_sums");
}

void combine_codewords(const at::Tensor& coef, const at::Tensor indices, int64_t k,
                       const at::Tensor& dictionary_t, const OptionalTensor& addend,
                       double addend_scale, const OptionalTensor& device_scale,
                       double host_scale, at::Tensor out) {
  const std::optional<FeatureMap> add = optional_map(addend);
  check(srm_cuda::launch_combine_codewords(
            coef.data_ptr<float>(), indices.data_ptr<int64_t>(), k, dictionary_t.data_ptr(),
            dtype_of(dictionary_t), dictionary_t.size(0), add ? &*add : nullptr,
            static_cast<float>(addend_scale), pointer<float>(device_scale),
            static_cast<float>(host_scale), feature_map(out), nullptr, nullptr, nullptr,
            nullptr),
        "launch_combine_codewords");
}

void combine_codewords_and_dots(const at::Tensor& coef, const at::Tensor indices, int64_t k,
                                const at::Tensor& dictionary_t, const OptionalTensor& addend,
                                double addend_scale, const OptionalTensor& device_scale,
                                double host_scale, at::Tensor out,
                                const OptionalTensor& sigmoid_values,
                                const OptionalTensor& addend_intercept, at::Tensor entry_dots) {
  const std::optional<FeatureMap> add = optional_map(addend);
  check(srm_cuda::launch_combine_codewords(
            coef.data_ptr<float>(), indices.data_ptr<int64_t>(), k, dictionary_t.data_ptr(),
            dtype_of(dictionary_t), dictionary_t.size(0), add ? &*add : nullptr,
            static_cast<float>(addend_scale), pointer<float>(device_scale),
            static_cast<float>(host_scale), feature_map(out), pointer<float>(sigmoid_values),
            pointer<float>(addend_intercept), entry_dots.data_ptr<float>(), nullptr),
        "launch_combine_codewords (with entry dots)");
}

void codeword_dots(const at::Tensor& features, const at::Tensor indices, int64_t k,
                   const at::Tensor& dictionary_t, const OptionalTensor& sigmoid_values,
                   at::Tensor out, const OptionalTensor& pixel_norms) {
  check(srm_cuda::launch_codeword_dots(feature_map(features), indices.data_ptr<int64_t>(), k,
                                       dictionary_t.data_ptr(), dtype_of(dictionary_t),
                                       dictionary_t.size(0), pointer<float>(sigmoid_values),
                                       out.data_ptr<float>(), pointer<float>(pixel_norms),
                                       nullptr),
        "launch_codeword_dots");
}

void recomputed_sigmoid_backward(const at::Tensor& grad_values, const at::Tensor& features,
                                 const at::Tensor indices, int64_t k,
                                 const at::Tensor& dictionary_t,
                                 const OptionalTensor& intercept, at::Tensor out) {
  check(srm_cuda::launch_recomputed_sigmoid_backward(
            grad_values.data_ptr(), feature_map(features), indices.data_ptr<int64_t>(), k,
            dictionary_t.data_ptr(), dtype_of(dictionary_t), dictionary_t.size(0),
            pointer<float>(intercept), out.data_ptr<float>(), nullptr),
        "launch_recomputed_sigmoid_backward");
}

void sigmoid_backward(const at::Tensor& grad_values, const at::Tensor& sigmoid, at::Tensor out) {
  check(srm_cuda::launch_sigmoid_backward(grad_values.data_ptr(), dtype_of(grad_values),
                                          sigmoid.data_ptr<float>(), sigmoid.numel(),
                                          out.data_ptr<float>(), nullptr),
        "launch_sigmoid_backward");
}

void scatter_codewords_atomic(const at::Tensor& features_a, const at::Tensor& coef_a,
                              const OptionalTensor& features_b, const OptionalTensor& coef_b,
                              const at::Tensor indices, int64_t k, int64_t num_codewords,
                              at::Tensor grad_dictionary_t) {
  const std::optional<FeatureMap> b = optional_map(features_b);
  check(srm_cuda::launch_scatter_codewords_atomic(
            feature_map(features_a), coef_a.data_ptr<float>(), b ? &*b : nullptr,
            pointer<float>(coef_b), indices.data_ptr<int64_t>(), k, num_codewords,
            grad_dictionary_t.data_ptr<float>(), nullptr),
        "launch_scatter_codewords_atomic");
}

void residual_gradients(const at::Tensor& x, const at::Tensor& coef,
                        const at::Tensor& grad_pre, const at::Tensor indices, int64_t k,
                        const at::Tensor& dictionary_t, const OptionalTensor& device_scale,
                        double host_scale, const OptionalTensor& grad_x,
                        const OptionalTensor& grad_dictionary_t) {
  const std::optional<FeatureMap> out = optional_map(grad_x);
  check(srm_cuda::launch_residual_gradients(
            feature_map(x), coef.data_ptr<float>(), grad_pre.data_ptr<float>(),
            indices.data_ptr<int64_t>(), k, dictionary_t.data_ptr(), dictionary_t.size(0),
            pointer<float>(device_scale), static_cast<float>(host_scale), out ? &*out : nullptr,
            pointer<float>(grad_dictionary_t), nullptr),
        "launch_residual_gradients");
}

void codeword_run_offsets(const at::Tensor& sorted_codes, int64_t num_codewords,
                          at::Tensor run_offsets) {
  check(srm_cuda::launch_codeword_run_offsets(sorted_codes.data_ptr<int64_t>(),
                                              sorted_codes.numel(), num_codewords,
                                              run_offsets.data_ptr<int64_t>(), nullptr),
        "launch_codeword_run_offsets");
}

void scatter_codewords_sorted(const at::Tensor& features_a, const at::Tensor& coef_a,
                              const OptionalTensor& features_b, const OptionalTensor& coef_b,
                              const at::Tensor& entry_order, const at::Tensor run_offsets,
                              int64_t k, int64_t num_codewords, int64_t num_segments,
                              at::Tensor segment_partials) {
  const std::optional<FeatureMap> b = optional_map(features_b);
  check(srm_cuda::launch_scatter_codewords_sorted(
            feature_map(features_a), coef_a.data_ptr<float>(), b ? &*b : nullptr,
            pointer<float>(coef_b), entry_order.data_ptr<int64_t>(),
            run_offsets.data_ptr<int64_t>(), k, num_codewords, num_segments,
            segment_partials.data_ptr<float>(), nullptr),
        "launch_scatter_codewords_sorted");
}

void reduce_dictionary_partials(const at::Tensor segment_partials, int64_t num_segments,
                                at::Tensor grad_dictionary) {
  // A (D, K) view of a contiguous (K, D) tensor asks for the codeword-major store.
  check(srm_cuda::launch_reduce_dictionary_partials(
            segment_partials.data_ptr<float>(), num_segments, grad_dictionary.size(0),
            grad_dictionary.size(1), !grad_dictionary.is_contiguous(),
            grad_dictionary.data_ptr(), dtype_of(grad_dictionary), nullptr),
        "launch_reduce_dictionary_partials");
}

void deterministic_sum(const at::Tensor& input, double scale, at::Tensor out) {
  auto workspace = fenced_empty(srm_cuda::deterministic_sum_workspace_size(input.numel()),
                               at::kDouble);
  check(srm_cuda::launch_deterministic_sum(input.data_ptr<float>(), input.numel(), scale,
                                           workspace.data_ptr<double>(),
                                           out.data_ptr<float>(), nullptr),
        "launch_deterministic_sum");
}

void sparse_labels(const at::Tensor values, const at::Tensor indices, int64_t num_codewords,
                   at::Tensor pixel_labels, at::Tensor image_labels, at::Tensor error_flag) {
  check(srm_cuda::launch_sparse_labels(
            values.data_ptr(), dtype_of(values), indices.data_ptr<int64_t>(), values.size(0),
            values.size(1) * values.size(2), values.size(3), num_codewords,
            pixel_labels.data_ptr<int64_t>(), image_labels.data_ptr(),
            error_flag.data_ptr<int>(), nullptr),
        "launch_sparse_labels");
}

void predictor_loss(at::Tensor logits, const at::Tensor& intercept,
                    const at::Tensor pixel_labels, const at::Tensor image_labels,
                    int64_t batch, int64_t pixels_per_image, double local_weight,
                    double global_weight, at::Tensor loss,
                    at::Tensor error_flag) {
  const int64_t num_codewords = logits.size(-1);
  auto workspace = fenced_empty(
      srm_cuda::predictor_workspace_size(batch, pixels_per_image, num_codewords), at::kFloat);
  const int64_t sum_count = std::max(batch * pixels_per_image, batch * num_codewords);
  auto sums = fenced_empty(srm_cuda::deterministic_sum_workspace_size(sum_count), at::kDouble);
  check(srm_cuda::launch_predictor_loss(
            logits.data_ptr<float>(), intercept.data_ptr<float>(),
            pixel_labels.data_ptr<int64_t>(), image_labels.data_ptr<float>(), batch,
            pixels_per_image, num_codewords, static_cast<float>(local_weight),
            static_cast<float>(global_weight), workspace.data_ptr<float>(),
            sums.data_ptr<double>(), loss.data_ptr<float>(), error_flag.data_ptr<int>(),
            nullptr),
        "launch_predictor_loss");
}

// The emulator's own probes (cuda_emulation_probes.cu); `out` is float32,
// `extra` the ballot words (int32) or the shifted read's input (float32).
void probe(const std::string& name, at::Tensor out, const OptionalTensor& extra, int64_t arg,
           bool flag) {
  namespace p = emulator_probes;
  float* o = out.data_ptr<float>();
  cudaError_t status = cudaErrorInvalidValue;
  if (name == "neighbour") status = p::launch_neighbour(flag, static_cast<int>(arg), o);
  if (name == "warp_handoff") status = p::launch_warp_handoff(flag, o);
  if (name == "uninitialised_local") {
    status = p::launch_uninitialised_local(static_cast<int>(arg), o);
  }
  if (name == "block_count") status = p::launch_block_count(flag, static_cast<int>(arg), o);
  if (name == "divergent_barrier") status = p::launch_divergent_barrier(o);
  if (name == "barrier_after_exit") status = p::launch_barrier_after_exit(o);
  if (name == "uninitialised_shared") status = p::launch_uninitialised_shared(o);
  if (name == "split_barrier") status = p::launch_split_barrier(flag, o);
  if (name == "warp_collectives") status = p::launch_warp_collectives(flag, o);
  if (name == "warp_primitives") {
    status = p::launch_warp_primitives(o, reinterpret_cast<unsigned*>(extra->data_ptr<int>()));
  }
  if (name == "tf32_mma") status = p::launch_tf32_mma(flag, o);
  if (name == "shifted_read") {
    status = p::launch_shifted_read(extra->data_ptr<float>(), static_cast<int>(arg), o);
  }
  if (name == "dynamic_shared") status = p::launch_dynamic_shared(arg, flag, o);
  if (name == "static_and_dynamic_shared") {
    status = p::launch_static_and_dynamic_shared(arg, flag, o);
  }
  if (name == "bounded") status = p::launch_bounded(static_cast<int>(arg), o);
  if (name == "vector_load") status = p::launch_vector_load(static_cast<int>(arg), o);
  check(status, name.c_str());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_schedule", &cuda_emulator::set_schedule,
        "Order of the blocks of a grid and of the threads of a block: 0 forward, 1 reverse, 2 shuffled with seed");
  m.def("take_failure", &cuda_emulator::take_failure,
        "The first kernel failure since the last call (empty if none), cleared");
  m.def("sparse_encode_num_blocks", &srm_cuda::sparse_encode_num_blocks);
  m.def("sparse_encode", with_fences(&sparse_encode));
  m.def("select_top_k", with_fences(&select_top_k));
  m.def("select_candidates", with_fences(&select_candidates));
  m.def("certify_top_k", with_fences(&certify_top_k));
  m.def("exact_rows_top_k", with_fences(&exact_rows_top_k));
  m.def("tf32_error_bound", [](int64_t depth) {
    const srm_cuda::Tf32ErrorBound error = srm_cuda::tf32_error_bound(depth);
    return std::make_tuple(error.relative, error.underflow, error.norm_floor);
  });
  m.def("residual_square_sums_num_blocks", &srm_cuda::residual_square_sums_num_blocks);
  m.def("residual_square_sums", with_fences(&residual_square_sums));
  m.def("combine_codewords", with_fences(&combine_codewords));
  m.def("combine_codewords_and_dots", with_fences(&combine_codewords_and_dots));
  m.def("codeword_dots", with_fences(&codeword_dots));
  m.def("recomputed_sigmoid_backward", with_fences(&recomputed_sigmoid_backward));
  m.def("sigmoid_backward", with_fences(&sigmoid_backward));
  m.def("scatter_codewords_atomic", with_fences(&scatter_codewords_atomic));
  m.def("residual_gradients", with_fences(&residual_gradients));
  m.def("codeword_run_offsets", with_fences(&codeword_run_offsets));
  m.def("scatter_codewords_sorted", with_fences(&scatter_codewords_sorted));
  m.def("reduce_dictionary_partials", with_fences(&reduce_dictionary_partials));
  m.def("deterministic_sum", with_fences(&deterministic_sum));
  m.def("sparse_labels", with_fences(&sparse_labels));
  m.def("predictor_loss", with_fences(&predictor_loss));
  m.def("probe", with_fences(&probe));
  m.def("encode_path_for", [](at::ScalarType dtype, int64_t num_codewords, int64_t k) {
    namespace ops = srm_ext::cuda_ops;
    return std::string(ops::encode_path_name(
        ops::encode_path_for(ops::kernel_dtype(dtype, "dtype"), num_codewords, k)));
  });
  m.def("grid_stride_blocks", &srm_cuda::detail::grid_stride_blocks);
  m.def("pixel_boxes", [](const at::Tensor& x, int64_t max_pixels) {
    std::vector<std::vector<int64_t>> boxes;
    for (const auto& box : srm_ext::cuda_ops::pixel_boxes(x, max_pixels)) {
      boxes.push_back({box.n0, box.nc, box.h0, box.hc, box.w0, box.wc});
    }
    return boxes;
  });
}
