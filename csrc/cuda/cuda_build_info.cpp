// Python module srm_ext._C_cuda: loading it registers the CUDA kernels of the
// srm_ext operators (teacher_ops.cpp and student_ops.cpp, linked into the
// same library) and exposes build_info() describing how they were compiled
// and which encode path runs.
#include <cuda.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "op_support.h"
#include "srm_kernels.h"

// Architectures compiled into this module, e.g. SRM_EXT_CUDA_ARCHS="80;90+PTX".
// Stringified so that both a bare token list and a string literal work.
#define SRM_EXT_STRINGIFY_IMPL(...) #__VA_ARGS__
#define SRM_EXT_STRINGIFY(...) SRM_EXT_STRINGIFY_IMPL(__VA_ARGS__)
#ifdef SRM_EXT_CUDA_ARCHS
#define SRM_EXT_CUDA_ARCHS_STRING SRM_EXT_STRINGIFY(SRM_EXT_CUDA_ARCHS)
#else
#define SRM_EXT_CUDA_ARCHS_STRING ""
#endif

namespace {

// Splits "80;90" (quotes, spaces and commas tolerated) into {"80", "90"}.
std::vector<std::string> parse_archs(const std::string& spec) {
  std::vector<std::string> archs;
  std::string current;
  for (const char ch : spec) {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!current.empty()) {
        archs.push_back(current);
        current.clear();
      }
    } else if (ch != '"' && ch != '\\') {
      current.push_back(ch);
    }
  }
  if (!current.empty()) {
    archs.push_back(current);
  }
  return archs;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = std::to_string(CUDA_VERSION);
  info["cuda_archs"] = parse_archs(SRM_EXT_CUDA_ARCHS_STRING);
  info["deterministic_supported"] = true;
  // Beyond these the sparse-code ops raise; srm_ext's functions fall back.
  pybind11::dict limits;
  limits["D"] = srm_cuda::kMaxFeatureDim;
  limits["K"] = srm_cuda::kMaxCodewords;
  limits["k"] = srm_cuda::kMaxTopK;
  info["sparse_code_limits"] = limits;
  // How the encode runs now (SRM_EXT_CUDA_ENCODE and deterministic mode);
  // encode_path_for tells the path of a given problem.
  info["encode"] = srm_ext::cuda_ops::encode_path_name(
      srm_ext::cuda_ops::encode_path());
  return info;
}

std::string encode_path_for(at::ScalarType dtype, int64_t num_codewords,
                            int64_t k) {
  return srm_ext::cuda_ops::encode_path_name(srm_ext::cuda_ops::encode_path_for(
      srm_ext::cuda_ops::kernel_dtype(dtype, "dtype"), num_codewords, k));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of srm_ext (operators register on import)";
  m.def("build_info", &build_info,
        "CUDA version, compiled architectures and capabilities of the "
        "srm_ext CUDA kernels.");
  m.def("encode_path_for", &encode_path_for, pybind11::arg("dtype"),
        pybind11::arg("num_codewords"), pybind11::arg("k"),
        "The encode path (gemm, fused or screened) that sparse_encode takes "
        "for a problem of this dtype, K and k, under the current settings.");
}
