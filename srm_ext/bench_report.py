"""A benchmark run's results as a markdown table and a PNG chart of the
compiled kernels' speed-ups, each headed by the machine they came from."""

from __future__ import annotations

from pathlib import Path

__all__ = ["describe_run", "markdown_table", "speedup_chart"]


def _mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "n/a"
    return f"{num / den:.2f}x"


def _others_than_native(records: list[dict]) -> list[str]:
    """The implementations compared with the compiled kernels, in the order
    the run timed them."""
    return [i for i in dict.fromkeys(r["implementation"] for r in records) if i != "native"]


def describe_run(env: dict) -> str:
    """One line naming what the numbers were measured on: the table's files
    are read apart from the JSON, so they carry the dtype, the batch and the
    GPU's driver and CUDA versions themselves."""
    device = env.get("gpu") or env["cpu"]
    if env.get("gpu"):
        device += f", driver {env.get('driver') or 'unknown'}, CUDA {env.get('cuda')}"
        if "tf32_matmul" in env:
            device += f", TF32 {'on' if env['tf32_matmul'] else 'off'}"
    batches = sorted({s["batch"] for s in env.get("shapes", [])})
    return (
        f"Device: {env['device']} ({device}), {env.get('dtype', 'dtype not recorded')}"
        + (f", N={'/'.join(map(str, batches))}" if batches else "")
        + f", torch {env['torch']}, {env['threads']} threads, commit {env['commit']}, {env['date']}"
    )


def markdown_table(records: list[dict], env: dict) -> str:
    """One row per (shape, op, mode): each implementation's median time and
    peak memory, and the compiled kernels' speed-up and memory saving."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["shape"], r["op"], r["mode"]), {})[r["implementation"]] = r
    others = _others_than_native(records)
    header = ["shape", "op", "mode", "native ms", *[f"{i} ms" for i in others],
              *[f"speed-up vs {i}" for i in others], "native MiB", *[f"{i} MiB" for i in others],
              *[f"memory saving vs {i}" for i in others]]
    lines = [
        describe_run(env)
        + (f", native float32 products: {env['cpu_float32_matmul']}"
           if env.get("cpu_float32_matmul") else "")
        + (f", CUDA encode: {env['cuda_encode']}" if env.get("cuda_encode") else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---|" + "---:|" * (len(header) - 3),
    ]
    if env.get("complete") is False:
        lines[1:1] = ["", "Incomplete: the run stopped after the cases below; memory is measured at the end."]
    for (shape, op, mode), impls in by_key.items():
        def get(impl, field):
            return impls[impl][field] if impl in impls else None

        def ms(impl):
            v = get(impl, "median_ms")
            if impl in impls and impls[impl].get("error"):
                return impls[impl]["error"]
            return "n/a" if v is None else f"{v:.2f}"

        native_ms, native_mem = get("native", "median_ms"), get("native", "peak_bytes")
        row = [shape, op, mode, ms("native"), *[ms(i) for i in others],
               *[_ratio(get(i, "median_ms"), native_ms) for i in others],
               _mib(native_mem), *[_mib(get(i, "peak_bytes")) for i in others],
               *[_ratio(get(i, "peak_bytes"), native_mem) for i in others]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def speedup_chart(records: list[dict], env: dict, path: Path) -> None:
    """PNG: forward+backward speed-up of the compiled kernels over each other
    implementation, one panel per op, one bar group per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["mode"] == "forward+backward"]
    ops = list(dict.fromkeys(r["op"] for r in steps))
    shapes = list(dict.fromkeys(r["shape"] for r in steps))
    others = _others_than_native(steps)
    time = {(r["shape"], r["op"], r["implementation"]): r["median_ms"] for r in steps}
    fig, axes = plt.subplots(1, max(len(ops), 1), figsize=(4.2 * max(len(ops), 1), 3.6), squeeze=False)
    width = 0.8 / max(len(others), 1)

    def ratio(shape, op, impl):
        num, den = time.get((shape, op, impl)), time.get((shape, op, "native"))
        return num / den if num is not None and den else float("nan")

    for ax, op in zip(axes[0], ops):
        for j, impl in enumerate(others):
            # A pair not timed draws no bar and no legend entry: a bar of
            # height 0 would read as a measured speed-up of 0.
            ratios = [ratio(s, op, impl) for s in shapes]
            if all(r != r for r in ratios):
                continue
            ax.bar([i + j * width for i in range(len(shapes))], ratios, width,
                   label=f"vs {impl}", color=f"C{j}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{op} (forward+backward)", fontsize=9)
        ax.set_xticks([i + width * (len(others) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels([s.split("-", 1)[-1] for s in shapes], fontsize=8)
        ax.set_ylabel("speed-up of srm_ext (x)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{env['device']}: {env.get('gpu') or env['cpu']}, {env['dtype']}, torch {env['torch']}, "
                 f"commit {env['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
