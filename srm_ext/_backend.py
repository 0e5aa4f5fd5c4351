"""Loading the compiled extensions and choosing a backend per call."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import re
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch._C import _functorch
from torch._functorch.pyfunctorch import (
    retrieve_all_functorch_interpreters,
    retrieve_current_functorch_interpreter,
)

__all__ = [
    "backend_info",
    "use_native",
    "needs_reference_autograd",
    "transform_depth",
    "native_module",
    "cuda_module",
]

# dtypes each compiled backend has kernels for; anything else uses the reference.
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

_load_errors: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()
# Per CUDA device index: whether the compiled kernels run on that GPU.
_cuda_runs_on: dict[int, bool] = {}


# Why a compiled module is absent, where it was never built.
_NOT_BUILT = {
    "srm_ext._C": "not built: install with pip install --no-build-isolation .",
    "srm_ext._C_cuda": (
        "not built: the build found no CUDA build of torch or no nvcc, or "
        "SRM_EXT_NO_CUDA=1 was set"
    ),
}


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        _load_errors[name] = _NOT_BUILT[name] if exc.name == name else str(exc)
        return None
    except ImportError as exc:  # built, but against another torch or missing a library
        _load_errors[name] = str(exc)
        return None


native_module = _try_import("srm_ext._C")
# The CUDA library only adds kernels to the operators that _C defines.
cuda_module = _try_import("srm_ext._C_cuda") if native_module is not None else None


# The sizes the CUDA sparse-code kernels take ({"D": 4096, "K": 8192, "k": 128}),
# read once here so that traced calls need no query of the extension. (A
# module built before it reported them has none: its ops raise beyond them.)
_cuda_code_limits: dict[str, int] = (
    dict(cuda_module.build_info().get("sparse_code_limits", {})) if cuda_module is not None else {}
)


def _forced_reference() -> bool:
    return os.environ.get("SRM_EXT_BACKEND", "").strip().lower() == "reference"


def _has_kernels(device_type: str) -> bool:
    if device_type == "cpu":
        return native_module is not None
    if device_type == "cuda":
        return cuda_module is not None
    return False


def archs_run_on(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (as in build_info: "80", "90a",
    "90+PTX") runs on a GPU of compute ``capability``.

    Machine code for X.Y runs on X.Y' for Y' >= Y ("a" variants on X.Y only);
    PTX is compiled at load time for any later GPU. An entry this does not
    understand counts as running, so that only a known mismatch falls back.
    """
    for arch in archs:
        match = re.fullmatch(r"(\d+)(\d)([af]?)(\+PTX)?", arch)
        if match is None:
            return True
        built = (int(match.group(1)), int(match.group(2)))
        if match.group(4) and capability >= built:
            return True
        if match.group(3):
            if capability == built:
                return True
        elif capability[0] == built[0] and capability[1] >= built[1]:
            return True
    return False


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cuda_kernels_run_on(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True  # the device is queried by eager calls, not while tracing
    index = _cuda_index(device)
    if index not in _cuda_runs_on:
        archs = cuda_module.build_info()["cuda_archs"]
        _cuda_runs_on[index] = archs_run_on(archs, torch.cuda.get_device_capability(index))
    return _cuda_runs_on[index]


def _beyond_cuda_code_limits(code_sizes: dict[str, int]) -> tuple[str, str] | None:
    """The first of ``code_sizes`` (D, K, k) over the CUDA kernels' limit, as
    (name, explanation), or None when they take them all."""
    for name, size in code_sizes.items():
        limit = _cuda_code_limits.get(name)
        if limit is not None and size > limit:
            return name, f"the CUDA kernels take {name} <= {limit}, got {name} = {size}"
    return None


def use_native(t: torch.Tensor, code_sizes: dict[str, int] | None = None) -> bool:
    """Whether the compiled op serves a call whose main input is ``t``.

    Falls back to the reference, with a one-time warning per (device, dtype),
    when no compiled kernel covers the tensor: the backend is missing, has no
    kernels for the dtype, or was built for other GPUs than this one. Ops on
    sparse codes pass their ``code_sizes`` (any of "D", "K", "k"): beyond the
    CUDA kernels' limits they fall back too, with a one-time warning per size.
    """
    # Meta tensors hold no data: the reference gives their shapes, and no
    # kernel is missed.
    if _forced_reference() or t.device.type == "meta":
        return False
    device_type = t.device.type
    supported = _has_kernels(device_type) and t.dtype in _NATIVE_DTYPES.get(device_type, ())
    if supported and (device_type != "cuda" or _cuda_kernels_run_on(t.device)):
        beyond = _beyond_cuda_code_limits(code_sizes) if device_type == "cuda" and code_sizes else None
        if beyond is None:
            return True
        name, why = beyond
        # Dynamo cannot trace warnings.warn: traced calls leave the warning to eager ones.
        if not torch.compiler.is_compiling() and ("cuda", name) not in _warned:
            _warned.add(("cuda", name))
            _warn_fallback(why)
        return False
    key = (device_type, str(t.dtype))
    if not torch.compiler.is_compiling() and key not in _warned:
        _warned.add(key)
        if not _has_kernels(device_type):
            why = f"the compiled {device_type} backend is not available"
            if device_type == "cpu" and "srm_ext._C" in _load_errors:
                why += f" ({_load_errors['srm_ext._C']})"
        elif not supported:
            why = f"the {device_type} kernels do not support {t.dtype}"
        else:
            major, minor = torch.cuda.get_device_capability(_cuda_index(t.device))
            archs = ", ".join(cuda_module.build_info()["cuda_archs"])
            why = (
                f"the CUDA kernels were built for sm {archs}, which do not run on this GPU "
                f"(compute capability {major}.{minor}; rebuild with "
                f"TORCH_CUDA_ARCH_LIST={major}.{minor} to use them)"
            )
        _warn_fallback(why)
    return False


# Frames in these files lie between a user's call and a warning about it:
# srm_ext's own, torch's Module.__call__, transforms and wrappers, and the
# context managers of contextlib.
_LIBRARY_FILES = (
    *(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__)),
    os.path.abspath(contextlib.__file__),
)


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning issued by the caller of
    this function to the user's line that led to it: the first frame outside
    srm_ext, torch and contextlib."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_FILES):
        frame, level = frame.f_back, level + 1
    return level


def _warn_fallback(why: str) -> None:
    """Warns that a call runs the reference, attributed to the user's line that made it."""
    warnings.warn(
        f"srm_ext: {why}; using the PyTorch reference implementation", stacklevel=user_stacklevel()
    )


# The torch.func transforms that differentiate: the compiled ops' autograd
# (a backward registered with torch.library) works under neither.
_DIFFERENTIATING_TRANSFORMS = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)


@torch.compiler.assume_constant_result
def transform_depth() -> int:
    """How many torch.func transforms are active. Under torch.compile a
    constant of the trace, which dynamo guards through the functorch stack
    (older dynamo cannot trace the call itself)."""
    return _functorch.get_dynamic_layer_stack_depth()


def needs_reference_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` must run the reference for its derivatives.

    The compiled ops define a backward only. Forward-mode AD
    (``torch.autograd.forward_ad``, ``torch.func.jvp``) would pass them by and
    leave the outputs without tangents (zero under ``jvp``), and
    ``torch.func.grad``/``vjp``/``jacrev`` refuse them; the reference is plain
    PyTorch and supports both. ``torch.func.vmap`` alone keeps the compiled ops.
    """
    return _carry_tangents(tensors) or _under_differentiating_transform()


def _carry_tangents(tensors: tuple[torch.Tensor, ...]) -> bool:
    if fwAD._current_level < 0:  # no dual level open
        return False
    if torch.compiler.is_compiling() or transform_depth() > 0:
        # Traced tensors show no tangents, and torch.func's wrapped ones cannot
        # be asked (vmap has no batching rule for unpack_dual): an open dual
        # level is enough.
        # Dynamo guards on it, so calls outside one are traced anew.
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _under_differentiating_transform() -> bool:
    depth = transform_depth()
    if depth == 0:
        return False
    if torch.compiler.is_compiling():
        # Dynamo can trace the innermost transform only: under nested ones
        # (grad of vmap) the reference is the safe choice.
        innermost = retrieve_current_functorch_interpreter().key()
        return depth > 1 or innermost in _DIFFERENTIATING_TRANSFORMS
    return any(
        interpreter.key() in _DIFFERENTIATING_TRANSFORMS
        for interpreter in retrieve_all_functorch_interpreters()
    )


def backend_info() -> dict[str, Any]:
    """Which compiled backends are present, and the versions they were built with."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "forced_reference": _forced_reference(),
        "cpu": None,
        "cuda": None,
        "cuda_device_available": torch.cuda.is_available(),
    }
    if native_module is not None:
        info["cpu"] = dict(native_module.build_info(), dtypes=_dtype_names("cpu"))
    else:
        info["cpu_error"] = _load_errors.get("srm_ext._C", "not built")
    if cuda_module is not None:
        info["cuda"] = dict(cuda_module.build_info(), dtypes=_dtype_names("cuda"))
    elif "srm_ext._C_cuda" in _load_errors:
        info["cuda_error"] = _load_errors["srm_ext._C_cuda"]
    return info


def _dtype_names(device_type: str) -> list[str]:
    return [str(d).removeprefix("torch.") for d in _NATIVE_DTYPES[device_type]]
