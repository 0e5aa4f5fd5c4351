"""Where the time of an op goes: its kernels' device time, from torch.profiler.

    python benchmarks/profile_ops.py --shapes imagenet --device cuda \\
        --ops stage1_step,predictor_loss --out benchmarks/results

For every (shape, op) the chosen implementation runs forward+backward once to
warm up, then --steps times under the profiler. The table lists each kernel
(or, on CPU, each operator) by its self time per step, largest first, with its
share of the step: the breakdown that bench_ops.py's end-to-end medians do not
give. Inputs are the benchmark's own (srm_ext.benchmark).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from srm_ext.bench_environment import environment
from srm_ext.bench_report import describe_run
from srm_ext.benchmark import OPS, SHAPE_SETS, Shape, _build_callable, _Case, _native_covers


def kernel_times(step, device: torch.device, steps: int) -> list[tuple[str, float, int]]:
    """(name, self time per step in ms, calls per step) of every kernel or
    CPU operator that ran, largest time first."""
    step()  # warm-up: allocator, cuBLAS handles, first-use compilation
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            # Kernels and copies only: the CPU operators that launch them
            # carry the same device time again.
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, us / 1000.0 / steps, event.count // steps))
    return sorted(rows, key=lambda r: -r[1])


def table(title: str, rows: list[tuple[str, float, int]], limit: int) -> str:
    total = sum(ms for _, ms, _ in rows)
    lines = [f"### {title}: {total:.3f} ms per step", "",
             "| kernel | ms per step | share | calls per step |", "|---|---:|---:|---:|"]
    for name, ms, calls in rows[:limit]:
        name = name.replace("|", "\\|")
        if len(name) > 100:
            name = name[:97] + "..."
        lines.append(f"| `{name}` | {ms:.3f} | {ms / total:.0%} | {calls} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="cifar")
    p.add_argument("--batch", type=int, default=None, help="override the batch size N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32")
    p.add_argument("--ops", default="stage1_step,predictor_loss",
                   help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--implementation", default="native",
                   choices=["native", "reference", "compiled", "research"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--limit", type=int, default=15, help="kernels listed per case")
    p.add_argument("--out", type=Path, default=None, help="write <out>/<name>.md here")
    p.add_argument("--name", default=None,
                   help="file name stem (default: profile-<shapes>-<device>-<dtype>)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = SHAPE_SETS[args.shapes]
    if args.batch is not None:
        shapes = [Shape(**{**asdict(s), "batch": args.batch}) for s in shapes]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if set(ops) - set(OPS):
        print(f"profile_ops: ops must be among {OPS}", file=sys.stderr)
        return 2

    if args.implementation == "native" and not _native_covers(device, dtype, shapes):
        # A profile of the reference under the native name would be worse than none.
        print(f"profile_ops: no compiled srm_ext kernel for {device.type}/{args.dtype}",
              file=sys.stderr)
        return 1

    env = environment(args.device, args.dtype, shapes)
    sections = [
        f"{describe_run(env)}, {args.implementation}"
        + (f", CUDA encode: {env['cuda_encode']}" if env.get("cuda_encode") else ""),
        "",
    ]
    for shape in shapes:
        case = _Case(shape, device, dtype)
        for op in ops:
            step = _build_callable(case, op, args.implementation, with_backward=True)
            if step is None:
                step = _build_callable(case, op, args.implementation, with_backward=False)
            if step is None:
                continue
            rows = kernel_times(step, device, args.steps)
            sections.append(table(f"{shape.name} {op}", rows, args.limit))
            print(sections[-1], flush=True)
        del case
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"profile-{args.shapes}-{args.device.split(':')[0]}-{args.dtype}"
        (args.out / f"{stem}.md").write_text("\n".join(sections))
        print(f"wrote {args.out / stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
