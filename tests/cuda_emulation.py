"""The CUDA kernels of csrc/cuda built for the CPU emulator (tools/cuda_emulator).

``load()`` translates the ``.cu`` sources, compiles them with the emulator's
headers and ``cuda_emulation_binding.cpp`` into a Python module, and returns
it; the build is cached in ``build/cuda_emulation`` and only redone when a
source changes. The module's functions take CPU tensors and run the kernels
exactly as written, thread block by thread block (see the emulator's header
for what that does and does not check).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tools" / "cuda_emulator"
KERNELS = ROOT / "csrc" / "cuda"
BUILD = ROOT / "build" / "cuda_emulation"
PROBES = Path(__file__).with_name("cuda_emulation_probes.cu")  # the emulator's own checks


def _translate() -> list[Path]:
    spec = importlib.util.spec_from_file_location("cuda_translate", EMULATOR / "translate.py")
    translate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(translate)
    out = BUILD / "kernels"
    out.mkdir(parents=True, exist_ok=True)
    targets = [translate.translate_file(p, out) for p in [*sorted(KERNELS.iterdir()), PROBES]]
    return [t for t in targets if t is not None and t.suffix == ".cpp"]


@functools.lru_cache(maxsize=None)
def load():
    from torch.utils import cpp_extension

    sources = _translate() + [Path(__file__).with_name("cuda_emulation_binding.cpp")]
    return cpp_extension.load(
        name="srm_cuda_emulated",
        sources=[str(s) for s in sources],
        # The emulator's CUDA headers must shadow any real ones.
        extra_include_paths=[str(EMULATOR / "include"), str(BUILD / "kernels"), str(KERNELS)],
        extra_cflags=["-O1", "-std=c++17"],
        build_directory=str(BUILD),
        verbose=False,
    )
