"""Builds srm_ext's compiled backends.

- ``srm_ext._C``: operator schemas and C++ CPU kernels; built everywhere.
- ``srm_ext._C_cuda``: CUDA kernels; built when torch has CUDA and nvcc is
  found, unless ``SRM_EXT_NO_CUDA=1``. ``TORCH_CUDA_ARCH_LIST`` picks the
  architectures (default ``8.0;9.0+PTX``: sm_80 and sm_90 code, and PTX that
  newer GPUs compile when the extension loads).

Build against the installed torch: ``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# torch's CUDA headers (ATen/cuda/CUDAContext.h, which the glue includes)
# include these CUDA library headers.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def cpu_extension() -> CppExtension:
    sources = [
        "csrc/registration.cpp",
        "csrc/build_info.cpp",
        "csrc/predictor_loss_backward.cpp",
        *sorted(glob.glob("csrc/cpu/*.cpp")),
    ]
    if sys.platform == "win32":
        cxx = ["/O2", "/openmp", "/std:c++20"]
        link = []
    elif sys.platform == "darwin":
        cxx = ["-O3", "-std=c++20"]  # Apple clang has no OpenMP: kernels run on one thread
        link = []
    else:
        # at::parallel_for expands to OpenMP pragmas in this translation unit.
        cxx = ["-O3", "-std=c++20", "-fopenmp"]
        link = ["-fopenmp"]
    return CppExtension("srm_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


def cuda_wanted() -> bool:
    if os.environ.get("SRM_EXT_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvidia_wheel_roots() -> list[str]:
    """Where the NVIDIA library wheels that a PyPI CUDA torch depends on are
    installed (the ``nvidia`` namespace package), if anywhere."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec is not None else []


def cuda_library_include_dirs(cuda_home: str, wheel_roots: list[str]) -> list[str]:
    """Include folders for the CUDA library headers that the toolkit at
    ``cuda_home`` lacks, from the NVIDIA wheels under ``wheel_roots``
    (``nvidia/cu13/include``, or ``nvidia/<library>/include`` for CUDA 12).

    A toolkit installed with only its compiler and runtime has no cuBLAS,
    cuSPARSE or cuSOLVER headers; the wheels ship the ones matching torch's own
    libraries. Raises with what to do when a header is found nowhere.
    """
    toolkit_include = os.path.join(cuda_home, "include")
    if not os.path.isfile(os.path.join(toolkit_include, "cuda_runtime_api.h")):
        raise RuntimeError(
            f"srm_ext: the CUDA toolkit found at CUDA_HOME={cuda_home} has no "
            "include/cuda_runtime_api.h; set CUDA_HOME to the toolkit's root (the folder "
            "holding bin/nvcc and include/), or SRM_EXT_NO_CUDA=1 to build without the "
            "CUDA kernels"
        )
    missing = [h for h in CUDA_LIBRARY_HEADERS if not os.path.isfile(os.path.join(toolkit_include, h))]
    dirs: list[str] = []
    for root in wheel_roots:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            found = [h for h in missing if os.path.isfile(os.path.join(include, h))]
            if found and include not in dirs:
                dirs.append(include)
            missing = [h for h in missing if h not in found]
    if missing:
        raise RuntimeError(
            f"srm_ext: torch's CUDA headers include {', '.join(missing)}, which neither the "
            f"CUDA toolkit at CUDA_HOME={cuda_home} nor torch's NVIDIA library wheels provide; "
            "install the toolkit's cuBLAS, cuSPARSE and cuSOLVER development headers, or set "
            "SRM_EXT_NO_CUDA=1 to build without the CUDA kernels"
        )
    return dirs


def cuda_extension() -> CUDAExtension:
    # Searched after every other folder, so that the toolkit's own headers
    # (cuda_runtime_api.h above all) win over the wheels' copies.
    library_includes = [
        flag
        for include in cuda_library_include_dirs(CUDA_HOME, nvidia_wheel_roots())
        for flag in ("-idirafter", include)
    ]
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # "8.0;9.0+PTX" -> "80;90+PTX": srm_ext.backend_info() reports these, and
    # the dispatcher falls back to the reference on a GPU none of them runs on.
    arch_names = ";".join(a.replace(".", "") for a in archs.replace(" ", ";").split(";") if a)
    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension(
        "srm_ext._C_cuda",
        sources,
        define_macros=[("SRM_EXT_CUDA_ARCHS", f'"{arch_names}"')],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20", *library_includes],
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
        },
    )


extensions = [cpu_extension()]
if cuda_wanted():
    extensions.append(cuda_extension())

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
