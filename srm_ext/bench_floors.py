"""How close the stage-1 step comes to the floors the machine sets.

Two floors bound a stage-1 step (``reconstruction_loss`` forward and
backward) whatever the implementation:

* memory: the bytes it must move, at the copy bandwidth measured on the same
  device. The forward reads x and the dictionary and writes the sparse code;
  the backward reads x, the code and the dictionary again and writes the
  dictionary's gradient. x is counted twice, as read in both passes:
  ``2 P D e + 2 P k (e + 8) + 3 D K e`` bytes for P = N H W pixels, element
  size e and int64 indices. That holds where x is larger than the last-level
  cache (ImageNet layer 1 on any GPU: 205 MB in float32); where it fits (an
  H100's 50 MB L2 holds x at the CIFAR shapes and ImageNet layer 4) a step
  could read it once, and this floor overstates the bytes by up to P D e.
* compute: the dense similarity product ``(P x D) @ (D x K)`` that every
  encode needs, timed alone as the benchmark's ``dense_gemm`` case (cuBLAS on
  a GPU, the CPU BLAS otherwise).

A step's fraction of a floor is the floor's time over the step's: 1.0 would
be a step that costs only its bytes at copy speed, or only the product at
the library's speed. The larger floor is the one that binds.
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["stage1_step_bytes", "copy_bandwidth", "stage1_floors", "floors_markdown"]

_INDEX_BYTES = 8  # int64 codeword indices


def stage1_step_bytes(shape, element_size: int) -> int:
    """Bytes a stage-1 step over ``shape`` (a benchmark Shape) must move."""
    pixels = shape.batch * shape.height * shape.width
    features = pixels * shape.channels * element_size
    code = pixels * shape.k * (element_size + _INDEX_BYTES)
    dictionary = shape.channels * shape.num_codewords * element_size
    return 2 * features + 2 * code + 3 * dictionary


def copy_bandwidth(device: str | torch.device, nbytes: int | None = None,
                   repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read plus write),
    median of ``repeats`` copies of an ``nbytes`` buffer (default 1 GiB on a
    GPU, 256 MiB on the CPU: far past every cache)."""
    dev = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if dev.type == "cuda" else 1 << 28
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    dst.copy_(src)  # warm-up: first-touch page faults on the CPU
    sync()
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def stage1_floors(records: list[dict], shapes: list, element_size: int,
                  bandwidth: float) -> list[dict]:
    """One row per shape with a native forward+backward stage-1 step: its
    byte count, both floors in ms, and the step's fraction of each (None
    where the dense GEMM was not timed)."""
    timed = {(r["shape"], r["op"], r["mode"], r["implementation"]): r["median_ms"]
             for r in records}
    rows = []
    for shape in shapes:
        step_ms = timed.get((shape.name, "stage1_step", "forward+backward", "native"))
        if step_ms is None:
            continue
        nbytes = stage1_step_bytes(shape, element_size)
        memory_ms = nbytes / bandwidth * 1e3
        gemm_ms = timed.get((shape.name, "dense_gemm", "forward", "research"))
        rows.append(dict(
            shape=shape.name, bytes=nbytes, memory_floor_ms=memory_ms, gemm_ms=gemm_ms,
            step_ms=step_ms, memory_fraction=memory_ms / step_ms,
            gemm_fraction=None if gemm_ms is None else gemm_ms / step_ms,
            # Unknown where the GEMM was not timed (--ops without dense_gemm).
            bound_by=None if gemm_ms is None else ("gemm" if gemm_ms > memory_ms else "memory"),
        ))
    return rows


def floors_markdown(rows: list[dict], bandwidth: float) -> str:
    """The floors table, under a heading that states the copy bandwidth."""
    lines = [
        f"### Stage-1 step (forward+backward) against its floors; measured copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s",
        "",
        "Bytes it must move: `2 P D e + 2 P k (e + 8) + 3 D K e` for P = N*H*W pixels of "
        "element size e (x read in forward and again in backward, the sparse code with int64 "
        "indices written and read back, the dictionary read twice and its gradient written); "
        "memory floor: those bytes at the copy bandwidth. Dense GEMM: the (P x D) @ (D x K) "
        "similarity product alone, same dtype. A fraction is that floor's time over the step's.",
        "",
        "| shape | bytes it must move (MB) | memory floor ms | dense GEMM ms | native step ms "
        "| fraction of memory roofline | fraction of GEMM throughput | bound by |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gemm = "n/a" if r["gemm_ms"] is None else f"{r['gemm_ms']:.2f}"
        gemm_fraction = "n/a" if r["gemm_fraction"] is None else f"{r['gemm_fraction']:.0%}"
        lines.append(
            f"| {r['shape']} | {r['bytes'] / 1e6:.1f} | {r['memory_floor_ms']:.3f} | {gemm} "
            f"| {r['step_ms']:.2f} | {r['memory_fraction']:.0%} | {gemm_fraction} "
            f"| {r['bound_by'] or 'n/a'} |"
        )
    return "\n".join(lines) + "\n"
