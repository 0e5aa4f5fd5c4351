// The srm_ext._C Python module. Importing it loads this library, which
// registers the operator schemas and CPU kernels with the dispatcher; the
// module itself reports how the library was built, and exposes the CPU
// kernels' matrix product so that tests can check it directly.
#include <torch/extension.h>

#include <string>

#include "cpu/matmul.h"

namespace {

std::string compiler_version() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = compiler_version();
  info["torch_built_against"] = TORCH_VERSION;
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;  // kernels run on one thread
#endif
  info["float32_matmul"] = srm_ext::cpu::float32_matmul_kernel();
  return info;
}

// out = a @ b (out += a @ b when accumulate) through the products the CPU
// kernels use, so tests can hold them against torch.mm.
void matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "matmul: expected a (m, n), b (n, p), out (m, p), got ", a.sizes(), ", ",
              b.sizes(), ", ", out.sizes());
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == b.scalar_type() &&
                  a.scalar_type() == out.scalar_type(),
              "matmul: expected CPU tensors of one dtype");
  TORCH_CHECK(out.stride(0) == 1 || out.stride(1) == 1, "matmul: out needs a unit stride");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "matmul", [&] {
    srm_ext::cpu::matmul_into<scalar_t>(a, b, out, accumulate);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "srm_ext compiled CPU backend";
  m.def("build_info", &build_info, "How the compiled srm_ext library was built.");
  m.def("matmul", &matmul, "out = a @ b (or +=) as the CPU kernels compute it.", pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("out"), pybind11::arg("accumulate") = false);
}
