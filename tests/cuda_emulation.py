"""The CUDA kernels of csrc/cuda built for the CPU emulator (tools/cuda_emulator).

``load()`` translates the ``.cu`` sources, compiles them with the emulator's
headers and ``cuda_emulation_binding.cpp`` into a Python module, and returns
it; the build is cached in ``build/cuda_emulation`` and only redone when a
source changes. The module's functions take CPU tensors and run the kernels
exactly as written, thread block by thread block (see the emulator's header
for what that does and does not check).

The same module also holds the torch glue of csrc/cuda (the operators'
CUDA implementations), registered as the ``srm_emu`` library for CPU
tensors: ``torch.ops.srm_emu.sparse_encode`` and the rest run the real glue
code over the emulated kernels. Only what has no CPU meaning is replaced: the
device guard, the stream and the graph-capture query come from
``tools/cuda_emulator/torch_shims``, and the few lines below rewrite the
device checks and the registration.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shlex
import subprocess
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tools" / "cuda_emulator"
KERNELS = ROOT / "csrc" / "cuda"
BUILD = ROOT / "build" / "cuda_emulation"
PROBES = Path(__file__).with_name("cuda_emulation_probes.cu")  # the emulator's own checks


def translator():
    """tools/cuda_emulator/translate.py as a module."""
    spec = importlib.util.spec_from_file_location("cuda_translate", EMULATOR / "translate.py")
    translate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(translate)
    return translate


def _translate() -> list[Path]:
    translate = translator()
    out = BUILD / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    targets = [translate.translate_file(p, out) for p in [*sorted(KERNELS.iterdir()), PROBES]]
    return [t for t in targets if t is not None and t.suffix == ".cpp"]


# (source, [(text, replacement), ...]): each text must occur in its source, so
# that a change to the glue that these rewrites no longer fit fails the build
# here, by name, instead of leaving a CUDA check in place.
_GLUE_REWRITES = [
    (
        KERNELS / "op_support.cpp",
        [
            (".is_cuda()", ".is_cpu()"),
            # CPU torch has no products with an output dtype; the results are the same.
            (
                "#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)",
                "#if 0",
            ),
        ],
    ),
    (
        KERNELS / "teacher_ops.cpp",
        [(".is_cuda()", ".is_cpu()"), ("TORCH_LIBRARY_IMPL(srm_ext, CUDA,", "TORCH_LIBRARY_IMPL(srm_emu, CPU,")],
    ),
    (
        KERNELS / "student_ops.cpp",
        [
            (".is_cuda()", ".is_cpu()"),
            ("TORCH_LIBRARY_IMPL(srm_ext, CUDA,", "TORCH_LIBRARY_IMPL(srm_emu, CPU,"),
        ],
    ),
    (ROOT / "csrc" / "registration.cpp", [("TORCH_LIBRARY(srm_ext,", "TORCH_LIBRARY(srm_emu,")]),
    (
        ROOT / "csrc" / "predictor_loss_backward.cpp",
        [("TORCH_LIBRARY_IMPL(srm_ext,", "TORCH_LIBRARY_IMPL(srm_emu,")],
    ),
]


def _glue_sources() -> list[Path]:
    out = BUILD / "glue"
    out.mkdir(parents=True, exist_ok=True)
    targets = []
    for source, rewrites in _GLUE_REWRITES:
        text = source.read_text()
        for old, new in rewrites:
            if old not in text:
                raise RuntimeError(
                    f"{source.relative_to(ROOT)} no longer contains {old!r}: update the "
                    "glue rewrites in tests/cuda_emulation.py"
                )
            text = text.replace(old, new)
        target = out / source.name
        if not target.exists() or target.read_text() != text:  # keep the build cache
            target.write_text(text)
        targets.append(target)
    return targets


# The emulator's schedules (Schedule in the emulator's cuda_runtime_api.h).
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2, "warp_serial": 3}


def schedule_of_case(node_id: str) -> int:
    """Shuffled or warp-serial, by a hash of a test case's id: about half
    the cases of a parametrised test take each."""
    serial = zlib.crc32(node_id.encode()) % 2 == 1
    return SCHEDULES["warp_serial" if serial else "shuffled"]


POISONED_LOCALS = "-ftrivial-auto-var-init=pattern"


@functools.lru_cache(maxsize=None)
def poisons_locals() -> bool:
    """Whether the compiler fills uninitialised locals with a pattern (GCC
    12, clang 8 and later). The fibers' stacks are reused: without it an
    uninitialised local reads what an earlier thread left there, often a
    plausible value."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        probe = subprocess.run(
            [*compiler, POISONED_LOCALS, "-x", "c++", "-fsyntax-only", "-"],
            input="", capture_output=True, text=True, check=False,
        )
    except OSError:
        return False
    return probe.returncode == 0


@functools.lru_cache(maxsize=None)
def load():
    from torch.utils import cpp_extension

    sources = [*_translate(), *_glue_sources(), Path(__file__).with_name("cuda_emulation_binding.cpp")]
    return cpp_extension.load(
        name="srm_cuda_emulated",
        sources=[str(s) for s in sources],
        # The emulator's CUDA headers and torch shims must shadow any real ones.
        extra_include_paths=[
            str(EMULATOR / "include"),
            str(EMULATOR / "torch_shims"),
            str(BUILD / "kernels"),
            str(KERNELS),
        ],
        extra_cflags=[
            "-O1",
            "-std=c++20",
            # Grid-stride launches of at most 2 blocks: the tests' inputs
            # reach the later strides, as a GPU's large ones do.
            "-DSRM_CUDA_GRID_STRIDE_BLOCKS=2",
            *([POISONED_LOCALS] if poisons_locals() else []),
        ],
        build_directory=str(BUILD),
        verbose=False,
    )
