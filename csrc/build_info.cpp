// The srm_ext._C Python module. Importing it loads this library, which
// registers the operator schemas and CPU kernels with the dispatcher; the
// module itself only reports how the library was built.
#include <torch/extension.h>

#include <string>

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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "srm_ext compiled CPU backend";
  m.def("build_info", &build_info, "How the compiled srm_ext library was built.");
}
