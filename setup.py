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
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


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


def cuda_extension() -> CUDAExtension:
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
            "cxx": ["-O3", "-std=c++20"],
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
