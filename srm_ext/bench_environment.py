"""What a benchmark ran on, recorded beside its numbers: the date, torch,
Python, thread count, CPU, commit and device, and on a GPU its name, driver,
CUDA version, capability, TF32 setting and encode path at each shape."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _backend

__all__ = ["environment", "describe_cpu"]


def environment(device: str, dtype: str = "float32", shapes: Sequence = ()) -> dict:
    """The description of this machine for a run on ``device`` (see above),
    with the run's ``dtype`` and ``shapes`` (benchmark ``Shape``s)."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "commit": _git_commit(),
        "device": device,
        "dtype": dtype,
        "shapes": [dataclasses.asdict(shape) for shape in shapes],
    }
    if torch.device(device).type == "cpu" and _backend.native_module is not None:
        # The compiled CPU kernels' float32 products: their own AVX-512
        # kernel or ATen's BLAS (see csrc/cpu/matmul.h).
        env["cpu_float32_matmul"] = _backend.native_module.build_info().get("float32_matmul")
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            gpu=props.name, cuda=torch.version.cuda, driver=_nvidia_driver(),
            capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
            memory_bytes=props.total_memory,
            # float32 products of the reference, the research-style code, the
            # dense GEMM and the native GEMM encode all follow this setting.
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
        if _backend.cuda_module is not None and dtype in _CUDA_KERNEL_DTYPES:
            env["cuda_encode"] = _cuda_encode_paths(getattr(torch, dtype), shapes)
    return env


# The dtypes of the CUDA kernels; float64 falls back to the reference there.
_CUDA_KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def _cuda_encode_paths(dtype: torch.dtype, shapes: Sequence) -> str:
    """The CUDA encode's path (the GEMM and a row-wise selection, the fused
    kernel, or the screened one; csrc/cuda/op_support.h) at each shape: one
    name where they agree, else "screened at a, b; gemm at c"."""
    cuda = _backend.cuda_module
    if not shapes:
        return cuda.build_info()["encode"]
    shapes_by_path: dict[str, list[str]] = {}
    for shape in shapes:
        path = cuda.encode_path_for(dtype, shape.num_codewords, shape.k)
        shapes_by_path.setdefault(path, []).append(shape.name)
    if len(shapes_by_path) == 1:
        return next(iter(shapes_by_path))
    return "; ".join(f"{path} at {', '.join(names)}" for path, names in shapes_by_path.items())


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        described = describe_cpu(cpuinfo.read_text())
    except OSError:
        described = None
    return described or platform.processor() or platform.machine()


def describe_cpu(cpuinfo: str) -> str | None:
    """The first CPU of a /proc/cpuinfo text: its model name, and on x86 its
    family and model numbers. A virtual machine may name only the vendor's
    line ("AMD EPYC"); the numbers still tell its generation apart, and the
    CPU kernels' speed depends on it (Zen 4 runs each AVX-512 instruction as
    two 256-bit halves, Zen 5 in one)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    family, model = fields.get("cpu family"), fields.get("model")
    return f"{name}, family {family} model {model}" if family and model else name


def _git_commit(cwd: Path = Path(__file__).resolve().parent) -> str | None:
    # A copy of the tree without git metadata is told its commit this way.
    if os.environ.get("SRM_EXT_COMMIT"):
        return os.environ["SRM_EXT_COMMIT"]

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Numbers from edited tracked files are not that commit's numbers.
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
        return commit or None
    except (OSError, subprocess.SubprocessError):
        return None


# The loaded kernel module's version, readable where nvidia-smi is not installed.
_NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  <build date>"
        for line in _NVIDIA_PROC_VERSION.read_text().splitlines():
            if line.startswith("NVRM version:"):
                match = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", line + " ")
                return match.group(1) if match else None
    except OSError:
        pass
    return None
