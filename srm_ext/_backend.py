"""Loading the compiled extensions and choosing a backend per call."""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from types import ModuleType
from typing import Any

import torch

__all__ = ["backend_info", "use_native", "native_module", "cuda_module"]

# dtypes each compiled backend has kernels for; anything else uses the reference.
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

_load_errors: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()


def _try_import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # missing or built against another torch
        _load_errors[name] = str(exc)
        return None


native_module = _try_import("srm_ext._C")
# The CUDA library only adds kernels to the operators that _C defines.
cuda_module = _try_import("srm_ext._C_cuda") if native_module is not None else None


def _forced_reference() -> bool:
    return os.environ.get("SRM_EXT_BACKEND", "").strip().lower() == "reference"


def _has_kernels(device_type: str) -> bool:
    if device_type == "cpu":
        return native_module is not None
    if device_type == "cuda":
        return cuda_module is not None
    return False


def use_native(t: torch.Tensor) -> bool:
    """Whether the compiled op serves a call whose main input is ``t``.

    Falls back to the reference, with a one-time warning per (device, dtype),
    when no compiled kernel covers the tensor.
    """
    if _forced_reference():
        return False
    device_type = t.device.type
    if _has_kernels(device_type) and t.dtype in _NATIVE_DTYPES.get(device_type, ()):
        return True
    key = (device_type, str(t.dtype))
    if key not in _warned:
        _warned.add(key)
        if not _has_kernels(device_type):
            why = f"the compiled {device_type} backend is not available"
            if device_type == "cpu" and "srm_ext._C" in _load_errors:
                why += f" ({_load_errors['srm_ext._C']})"
        else:
            why = f"the {device_type} kernels do not support {t.dtype}"
        warnings.warn(
            f"srm_ext: {why}; using the PyTorch reference implementation", stacklevel=3
        )
    return False


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
