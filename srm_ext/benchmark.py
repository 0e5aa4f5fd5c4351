"""Microbenchmarks of the SRM ops: compiled kernels vs the reference vs the
dense masked research-style computation.

Every implementation is timed in the same run, so the ratios hold on a noisy
machine. Reported per case: median wall time, peak memory above the inputs
(CPU: the process's resident high-water mark, reset before each case; CUDA:
the allocator's peak), and ratios against the compiled kernels. All cases are
timed before any memory is measured (see run_benchmarks). What the run ran
on is recorded by bench_environment; bench_report writes the table and chart.

``python -m srm_ext bench --help`` lists the options.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import _backend, bench_floors, functional, reference, research_style
from .bench_environment import environment
from .bench_report import markdown_table, speedup_chart
from .distill.config import error_line

__all__ = ["Shape", "SHAPE_SETS", "run_benchmarks", "main"]


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    num_codewords: int
    k: int
    student_channels: int


# The paper's layers (see srm-spec.md); student widths as in AllCNN-0.66 and ResNet18.
SHAPE_SETS = {
    "cifar": [
        Shape("cifar-block1", 64, 128, 16, 16, 256, 5, 63),
        Shape("cifar-block2", 64, 256, 8, 8, 512, 10, 126),
        Shape("cifar-block4", 64, 1024, 4, 4, 2048, 40, 253),
    ],
    "imagenet": [
        Shape("imagenet-layer1", 256, 64, 56, 56, 256, 5, 64),
        Shape("imagenet-layer2", 256, 128, 28, 28, 512, 10, 128),
        Shape("imagenet-layer3", 256, 256, 14, 14, 1024, 20, 256),
        Shape("imagenet-layer4", 256, 512, 7, 7, 2048, 40, 512),
    ],
}

IMPLEMENTATIONS = ("native", "reference", "compiled", "research")
# The error of a case left out by running out of GPU memory, which a run
# that sizes its cases for a large GPU expects on a smaller one.
OUT_OF_MEMORY = "out of memory"


class _CompiledReference:
    """The reference ops under ``torch.compile``, each compiled on first use."""

    def __init__(self) -> None:
        self._compiled: dict[str, Callable] = {}

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._compiled:
            self._compiled[name] = torch.compile(getattr(reference, name), dynamic=False)
        return self._compiled[name]


_COMPILED_REFERENCE = _CompiledReference()
# dense_gemm is the (N*H*W x D) @ (D x K) similarity product that every encode
# needs, timed alone as the floor of a stage-1 step; it runs under "research",
# the implementation that computes it as a plain product.
OPS = ("sparse_encode", "sparse_decode", "stage1_step", "sparse_labels", "predictor_loss",
       "dense_gemm")


class _Case:
    """Inputs of one shape, built once and shared by every implementation."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

        s = shape
        self.shape = s
        self.x = randn(s.batch, s.channels, s.height, s.width).relu()  # post-ReLU features
        # Codeword-major, as SparseRepresentation stores it: each codeword is
        # contiguous, which the sparse kernels read and write directly.
        self.dictionary = randn(s.num_codewords, s.channels, scale=s.channels**-0.5).t()
        self.intercept = randn(1)
        with torch.no_grad():
            self.values, self.indices = reference.sparse_encode(
                self.x, self.dictionary, self.intercept, s.k
            )
            self.pixel_labels, self.image_labels = reference.sparse_labels(
                self.values, self.indices, s.num_codewords
            )
            self.dense_code = research_style.dense_sparse_code(
                self.x, self.dictionary, self.intercept, s.k
            )
        self.y = randn(s.batch, s.student_channels, s.height, s.width)
        self.student_dictionary = randn(
            s.student_channels, s.num_codewords, scale=s.student_channels**-0.5
        )
        self.student_intercept = randn(1)


def _trainable(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _backward(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    torch.autograd.grad(loss, params)


def _applies(op: str, impl: str, with_backward: bool) -> bool:
    """Whether (op, implementation, mode) is a case: labels carry no gradient,
    the dense GEMM is the research code's forward alone, and the student loss
    has no research-style version (the reference is that dense computation)."""
    if op == "dense_gemm":
        return impl == "research" and not with_backward
    if op == "sparse_labels":
        return not with_backward
    if op == "predictor_loss":
        return impl != "research"
    return True


def _build_callable(
    case: _Case, op: str, impl: str, with_backward: bool
) -> Callable[[], object] | None:
    """A closure running one (op, implementation, mode), or None if not applicable."""
    if not _applies(op, impl, with_backward):
        return None
    c = case
    k, K = c.shape.k, c.shape.num_codewords
    ops = {"native": functional, "reference": reference, "compiled": _COMPILED_REFERENCE}.get(impl)

    if op == "sparse_encode":
        C, b = _trainable(c.dictionary, c.intercept)
        if impl == "research":
            fwd = lambda: research_style.dense_sparse_code(c.x, C, b, k)
        else:
            fwd = lambda: ops.sparse_encode(c.x, C, b, k)[0]
        params = [C, b]
    elif op == "sparse_decode":
        (C,) = _trainable(c.dictionary)
        if impl == "research":
            (code,) = _trainable(c.dense_code)
            fwd = lambda: F.linear(code, C)
            params = [code, C]
        else:
            (values,) = _trainable(c.values)
            fwd = lambda: ops.sparse_decode(values, c.indices, C)
            params = [values, C]
    elif op == "stage1_step":
        C, b = _trainable(c.dictionary, c.intercept)
        if impl == "research":
            fwd = lambda: research_style.dense_reconstruction_loss(c.x, C, b, k)
        else:
            fwd = lambda: ops.reconstruction_loss(c.x, C, b, k)
        params = [C, b]
    elif op == "sparse_labels":
        if impl == "research":
            # Labels from the dense masked code the research code already holds.
            return lambda: (c.dense_code.argmax(-1), c.dense_code.mean(dim=(1, 2)))
        return lambda: ops.sparse_labels(c.values, c.indices, K)
    elif op == "predictor_loss":
        y, C, b = _trainable(c.y, c.student_dictionary, c.student_intercept)
        fwd = lambda: ops.predictor_loss(y, C, b, c.pixel_labels, c.image_labels)
        params = [y, C, b]
    elif op == "dense_gemm":
        rows = c.x.permute(0, 2, 3, 1).reshape(-1, c.shape.channels).contiguous()
        return lambda: rows @ c.dictionary
    else:
        raise ValueError(f"unknown op {op!r}")

    if not with_backward:
        def run_forward():
            with torch.no_grad():
                return fwd()
        return run_forward

    def run_step():
        out = fwd()
        _backward(out if out.dim() == 0 else out.float().square().mean(), params)

    return run_step


class _PeakMemory:
    """Peak memory a callable uses above what is allocated before it runs."""

    def __init__(self, device: torch.device):
        self.device = device
        global _libc
        if device.type == "cpu" and _libc is None:
            _libc = _load_glibc()
        self.available = device.type == "cuda" or _cpu_peak_resettable()

    def measure(self, fn: Callable[[], object]) -> float | None:
        if not self.available:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - base)
        _reset_cpu_peak()
        base = _proc_status_kb("VmRSS")
        fn()
        return float(max(_proc_status_kb("VmHWM") - base, 0) * 1024)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_cpu_peak() -> None:
    # Give freed heap memory back first, so the baseline holds only live data.
    if _libc is not None:
        _libc.malloc_trim(0)
    # Linux: writing 5 resets the resident-set high-water mark (VmHWM).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _load_glibc():
    """glibc, set so that large blocks are mapped and unmapped on each
    allocation: freed tensors then leave the resident set at once, and the
    resident high-water mark measures the memory in use."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        return libc
    except (OSError, AttributeError):
        return None


_libc = None


def _cpu_peak_resettable() -> bool:
    try:
        _reset_cpu_peak()
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


def _time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, min_repeats: int,
    min_seconds: float, max_repeats: int, first_calls: dict[str, float] | None = None,
    errors: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each callable, timed in rounds that call every one
    once (starting at a different one each round), so a slow spell of a
    shared machine falls on all of them alike and their ratios stay fair.

    A callable whose warm-up call fails (out of GPU memory, or a compiler's
    error) is left out (no times), so that the others of the case and the
    cases after it run; ``errors`` is given its error in one line.
    ``first_calls`` is given each warm-up call's seconds (torch.compile's
    compilation included), which the timings leave out.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = []
    for name, fn in fns.items():
        t0 = time.perf_counter()
        try:
            fn()  # warm-up: first-call allocations, lazy initialisation
            sync()
            if first_calls is not None:
                first_calls[name] = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            if errors is not None:
                errors[name] = OUT_OF_MEMORY
            continue
        except Exception as exc:  # noqa: BLE001 - reported, not hidden: see main()
            if errors is not None:
                errors[name] = f"{type(exc).__name__}: {error_line(exc)}"
            continue
        names.append(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (
        rounds < min_repeats or time.perf_counter() - start < min_seconds * len(names)
    ):
        for i in range(len(names)):
            name = names[(rounds + i) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def run_benchmarks(
    shapes: list[Shape],
    ops: tuple[str, ...] = OPS,
    implementations: tuple[str, ...] = IMPLEMENTATIONS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_repeats: int = 5,
    min_seconds: float = 1.0,
    max_repeats: int = 50,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Times every (shape, op, mode, implementation); returns one record each.

    ``partial`` is handed the records so far after every timed case (their
    peak memory still None), so that a run cut short keeps its timings.
    """
    dev = torch.device(device)
    if "native" in implementations and not _native_covers(dev, dtype, shapes):
        raise RuntimeError(
            f"no compiled srm_ext kernel for {dev.type}/{dtype} at every shape; "
            f"backend_info() = {_backend.backend_info()}"
        )

    if dev.type == "cpu" and "compiled" in implementations:
        # Compile in this process: on a machine with few cores, a pool of
        # compile workers keeps running beside the cases timed next and slows
        # them down. (On a GPU machine the pool only shortens the compiles.)
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    if "compiled" in implementations:
        _allow_recompiles(2 * len(shapes))

    def cases():
        """(shape, op, mode, {implementation: callable}) for every applicable case."""
        for shape in shapes:
            case = _Case(shape, dev, dtype)
            for op in ops:
                for mode in ("forward", "forward+backward"):
                    fns = {}
                    for impl in implementations:
                        fn = _build_callable(case, op, impl, mode == "forward+backward")
                        if fn is not None:
                            fns[impl] = fn
                    if fns:
                        yield shape.name, op, mode, fns
            del case
            gc.collect()

    records = {}
    for shape, op, mode, fns in cases():
        if progress:
            progress(f"{shape} {op} {mode}: {', '.join(fns)}")
        first_calls: dict[str, float] = {}
        errors: dict[str, str] = {}
        timings = _time_interleaved(
            fns, dev, min_repeats, min_seconds, max_repeats, first_calls, errors
        )
        for impl in fns:
            times = timings.get(impl)
            first = first_calls.get(impl)
            records[shape, op, mode, impl] = dict(
                shape=shape, op=op, mode=mode, implementation=impl,
                median_ms=statistics.median(times) * 1e3 if times else None,
                min_ms=min(times) * 1e3 if times else None,
                repeats=len(times or ()), peak_bytes=None,
                first_call_ms=None if first is None else first * 1e3,
                **({"error": errors[impl]} if impl in errors else {}),
            )
        if partial:
            partial(list(records.values()))
    # Memory in a second pass, after every timing: on the CPU, measuring sets
    # glibc to map and unmap each large block for the rest of the process,
    # which makes every large allocation fault its pages in and would slow the
    # allocation-heavy implementations' timings.
    memory = _PeakMemory(dev)
    for shape, op, mode, fns in cases():
        for impl, fn in fns.items():
            if "error" in records[shape, op, mode, impl]:
                continue
            fn()  # warm-up, so one-time allocations are not counted
            records[shape, op, mode, impl]["peak_bytes"] = memory.measure(fn)
    return list(records.values())


def _allow_recompiles(entries: int) -> None:
    """Lets each compiled reference op keep ``entries`` compiled variants
    (one per shape and grad mode). Past Dynamo's limit (8 by default: the
    four ImageNet shapes exactly) an op runs eagerly with only a warning, and
    the eager reference would be timed as the compiled one."""
    import torch._dynamo.config as dynamo_config

    # recompile_limit is the name from torch 2.6 on.
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), entries + 2))


def _native_covers(device: torch.device, dtype: torch.dtype, shapes: list[Shape] = ()) -> bool:
    """Whether the compiled ops serve every call at ``shapes``: past the CUDA
    kernels' limits on D, K or k the ops fall back to the reference, which
    would then be timed under the native name."""
    t = torch.empty(0, device=device, dtype=dtype)
    return _backend.use_native(t) and all(
        _backend.use_native(t, {"D": s.channels, "K": s.num_codewords, "k": s.k}) for s in shapes
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="srm-ext bench",
        description="Time the SRM ops: compiled kernels vs reference vs research-style dense.",
    )
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="cifar")
    p.add_argument("--batch", type=int, default=None, help="override the batch size N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument(
        "--implementations", default=None,
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)} (default: all; on CPU "
        "all but 'compiled', whose C++ compilation takes minutes there)",
    )
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each group of implementations at least this long per implementation")
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, one repeat per case")
    p.add_argument("--out", type=Path, default=None, help="write <out>/<name>.json, .md and .png here")
    p.add_argument("--name", default=None, help="file name stem (default: <shapes>-<device>-<dtype>)")
    return p.parse_args(argv)


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file: a run stopped by a time
    limit while writing keeps the previous complete file, not half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _refused_arguments(args: argparse.Namespace, batch: int | None) -> str | None:
    """What is wrong with the arguments, in one line, before anything runs."""
    if batch is not None and batch < 1:
        return f"--batch must be >= 1, got {batch}"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device {args.device!r} is no device; use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {args.device!r}: the benchmarks run on cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device!r}: no GPU is available here"
    if args.max_repeats < 1:
        return f"--max-repeats must be >= 1, got {args.max_repeats}"
    if not 0 <= args.min_repeats <= args.max_repeats:
        return (
            f"--min-repeats must lie in [0, --max-repeats = {args.max_repeats}], "
            f"got {args.min_repeats}"
        )
    if not 0.0 <= args.min_seconds < math.inf:
        return f"--min-seconds must be finite and >= 0, got {args.min_seconds}"
    if args.name is not None and Path(args.name).name != args.name:
        return f"--name {args.name!r} must be a file name stem, without a directory"
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} is a file, not a directory"
    if args.out is not None:
        # Made now, not after the first cases have been timed (minutes on a GPU).
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"--out {args.out}: cannot create the folder ({exc.strerror})"
        if not os.access(args.out, os.W_OK | os.X_OK):
            return f"--out {args.out}: the folder is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    shapes = SHAPE_SETS[args.shapes]
    batch = 2 if args.quick else args.batch
    refused = _refused_arguments(args, batch)
    if refused:
        print(f"srm-ext bench: {refused}", file=sys.stderr)
        return 2
    if batch is not None:
        shapes = [Shape(**{**asdict(s), "batch": batch}) for s in shapes]
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    unknown = set(ops) - set(OPS)
    if not ops:
        print(f"srm-ext bench: --ops names no op; choose from {','.join(OPS)}", file=sys.stderr)
        return 2
    if unknown:
        print(f"srm-ext bench: unknown op(s) {sorted(unknown)}; choose from {OPS}", file=sys.stderr)
        return 2
    default_impls = IMPLEMENTATIONS if args.device.startswith("cuda") else tuple(
        i for i in IMPLEMENTATIONS if i != "compiled"
    )
    listed = ",".join(default_impls) if args.implementations is None else args.implementations
    impls = tuple(i.strip() for i in listed.split(",") if i.strip())
    if not impls or set(impls) - set(IMPLEMENTATIONS):
        print(f"srm-ext bench: --implementations must name some of {','.join(IMPLEMENTATIONS)}, "
              f"got {listed!r}", file=sys.stderr)
        return 2
    if not any(_applies(o, i, b) for o in ops for i in impls for b in (False, True)):
        print(f"srm-ext bench: --ops {','.join(ops)} has no case for --implementations "
              f"{','.join(impls)} (dense_gemm is research-style only; predictor_loss has no "
              "research-style version)", file=sys.stderr)
        return 2
    repeats = dict(min_repeats=1, min_seconds=0.0, max_repeats=1) if args.quick else dict(
        min_repeats=args.min_repeats, min_seconds=args.min_seconds, max_repeats=args.max_repeats
    )
    env = environment(args.device, args.dtype, shapes)
    if env["commit"] is None:
        print("srm-ext bench: warning: the commit is unknown (no git metadata here); "
              "set SRM_EXT_COMMIT to record it", file=sys.stderr)
    # Another batch than the set's is named, so that a smoke run (--quick) or a
    # larger batch never overwrites the results of the set's own.
    sized = "" if batch is None else f"-n{batch}"
    stem = args.name or f"{args.shapes}{sized}-{args.device.split(':')[0]}-{args.dtype}"

    def report(records: list[dict], complete: bool, floors: list[dict] | None = None) -> str:
        """Writes the JSON and markdown (when --out is given); returns the markdown.
        Called after every case too: a run stopped by a time limit keeps what
        it measured, marked incomplete."""
        data = {"environment": {**env, "complete": complete}, "results": records}
        text = markdown_table(records, data["environment"])
        if floors is not None:
            data["stage1_floors"] = floors
            text += "\n" + bench_floors.floors_markdown(floors, env["copy_bandwidth_bytes_per_s"])
        if args.out is not None:
            _write_atomically(args.out / f"{stem}.json", json.dumps(data, indent=2))
            _write_atomically(args.out / f"{stem}.md", text)
        return text

    dtype = getattr(torch, args.dtype)
    if "native" in impls and not _native_covers(torch.device(args.device), dtype, shapes):
        why = (
            "SRM_EXT_BACKEND=reference turns the compiled kernels off"
            if _backend.backend_info()["forced_reference"]
            else f"no compiled srm_ext kernel for {args.device}/{args.dtype} (see srm-ext info)"
        )
        print(
            f"srm-ext bench: {why}; pass --implementations without native to time the others",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    records = run_benchmarks(
        shapes, ops, impls, device=args.device, dtype=dtype,
        # Elapsed time on each line: a run stopped by a time limit shows where its time went.
        progress=lambda msg: print(f"  [{time.perf_counter() - started:5.0f} s] {msg}",
                                   file=sys.stderr, flush=True),
        partial=lambda so_far: report(so_far, complete=False), **repeats,
    )
    env["complete"] = True
    env["timing_seconds"] = time.perf_counter() - started  # compilation included
    floors = None
    if any(r["op"] == "stage1_step" and r["implementation"] == "native" for r in records):
        # The memory floor's bandwidth, measured on the same device after the cases.
        copy = dict(nbytes=1 << 24, repeats=2) if args.quick else {}
        env["copy_bandwidth_bytes_per_s"] = bench_floors.copy_bandwidth(args.device, **copy)
        floors = bench_floors.stage1_floors(
            records, shapes, torch.empty(0, dtype=dtype).element_size(),
            env["copy_bandwidth_bytes_per_s"],
        )
    print(report(records, complete=True, floors=floors))
    if args.out is not None:
        if "native" in impls:  # the chart shows speed-ups over the compiled kernels
            speedup_chart(records, env, args.out / f"{stem}.png")
            print(f"wrote {args.out / stem}.json, .md and .png", file=sys.stderr)
        else:
            print(f"wrote {args.out / stem}.json and .md", file=sys.stderr)
    failed = [r for r in records if r.get("error") not in (None, OUT_OF_MEMORY)]
    for r in failed:
        print(f"srm-ext bench: {r['implementation']} failed at {r['shape']} {r['op']} "
              f"{r['mode']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
