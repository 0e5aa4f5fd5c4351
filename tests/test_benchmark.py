"""The benchmark harness and scripts on a tiny shape: records, tables and charts."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

import srm_ext
from srm_ext import _backend, bench_environment, bench_floors, bench_report, benchmark

from conftest import requires_native_cpu

TINY = benchmark.Shape("tiny", batch=2, channels=8, height=4, width=4, num_codewords=16, k=2,
                       student_channels=4)


def load_benchmark_script(name):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_native_cpu
def test_run_benchmarks_records_every_case():
    records = benchmark.run_benchmarks(
        [TINY], implementations=("native", "reference", "research"),
        min_repeats=1, min_seconds=0.0, max_repeats=2,
    )
    keys = {(r["op"], r["mode"], r["implementation"]) for r in records}
    # labels have no backward, the student loss no research-style variant
    assert ("sparse_labels", "forward+backward", "native") not in keys
    assert ("predictor_loss", "forward", "research") not in keys
    assert ("stage1_step", "forward+backward", "research") in keys
    # the dense GEMM floor: one plain product, forward only
    assert {key for key in keys if key[0] == "dense_gemm"} == {("dense_gemm", "forward", "research")}
    assert len(keys) == len(records) == 3 * 2 * 3 + 3 + 2 * 2 + 1
    assert all(r["median_ms"] > 0 and r["repeats"] >= 1 for r in records)


@requires_native_cpu
def test_main_writes_json_markdown_and_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    assert benchmark.main(["--quick", "--device", "cpu", "--ops", "stage1_step,predictor_loss", "--out", str(tmp_path), "--name", "t"]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["environment"]["device"] == "cpu" and data["results"]
    assert data["environment"]["complete"] and all(r["peak_bytes"] is not None for r in data["results"])
    table = (tmp_path / "t.md").read_text()
    assert "| tiny | stage1_step | forward+backward |" in table and "Incomplete" not in table
    assert (tmp_path / "t.png").stat().st_size > 0
    if _backend.native_module is not None:
        # Which kernel ran the native float32 products, as backend_info says.
        kernel = srm_ext.backend_info()["cpu"]["float32_matmul"]
        assert data["environment"]["cpu_float32_matmul"] == kernel
        assert f"native float32 products: {kernel}" in table


@requires_native_cpu
def test_a_run_stopped_midway_keeps_the_cases_it_timed(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    timed = []
    real_time = benchmark._time_interleaved

    def time_then_stop(fns, *args):
        if len(timed) == 3:  # as a time limit would, during the fourth case
            raise KeyboardInterrupt
        timed.append(sorted(fns))
        return real_time(fns, *args)

    monkeypatch.setattr(benchmark, "_time_interleaved", time_then_stop)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--quick", "--device", "cpu", "--ops", "stage1_step,predictor_loss",
                        "--out", str(tmp_path), "--name", "t"])
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["environment"]["complete"] is False
    assert len(data["results"]) == sum(len(impls) for impls in timed)
    assert all(r["median_ms"] > 0 and r["peak_bytes"] is None for r in data["results"])
    assert "Incomplete" in (tmp_path / "t.md").read_text()
    assert not (tmp_path / "t.png").exists()


def test_every_case_is_timed_before_memory_is_measured(monkeypatch):
    # Measuring CPU memory changes how glibc allocates for the rest of the
    # process, which would slow the timings of allocation-heavy cases after it.
    events = []

    def fake_time(fns, *args):
        events.extend("time" for _ in fns)
        return {name: [1e-3] for name in fns}

    class FakeMemory:
        def __init__(self, device):
            events.append("memory setup")

        def measure(self, fn):
            events.append("memory")
            return 1.0

    monkeypatch.setattr(benchmark, "_time_interleaved", fake_time)
    monkeypatch.setattr(benchmark, "_PeakMemory", FakeMemory)
    records = benchmark.run_benchmarks(
        [TINY, dataclasses.replace(TINY, name="tiny2")], ops=("stage1_step", "dense_gemm"),
        implementations=("reference", "research"),
    )
    timings = events.count("time")
    assert timings == len(records) == 2 * (2 * 2 + 1)
    assert events[:timings] == ["time"] * timings and events[timings] == "memory setup"
    assert all(r["peak_bytes"] == 1.0 for r in records)


def test_implementations_are_timed_in_interleaved_rounds():
    # A slow spell of a shared machine must not fall on one implementation
    # only: each round calls every implementation once, from a rotating start.
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = benchmark._time_interleaved(
        fns, torch.device("cpu"), min_repeats=3, min_seconds=0.0, max_repeats=3
    )
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_unknown_op_is_a_usage_error(capsys):
    assert benchmark.main(["--ops", "nope"]) == 2
    assert "unknown op" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--device", "nonsense"], "--device 'nonsense' is no device; use cpu, cuda or cuda:N"),
        (["--device", "meta"], "--device 'meta': the benchmarks run on cpu or cuda"),
        (["--name", "a/b"], "--name 'a/b' must be a file name stem, without a directory"),
        (["--out", "{file}"], "--out {file} is a file, not a directory"),
        (["--out", "{file}/sub"], "--out {file}/sub: cannot create the folder (Not a directory)"),
        (["--max-repeats", "0"], "--max-repeats must be >= 1, got 0"),
        (["--min-repeats", "-1"], "--min-repeats must lie in [0, --max-repeats = 50], got -1"),
        (["--min-repeats", "5", "--max-repeats", "3"],
         "--min-repeats must lie in [0, --max-repeats = 3], got 5"),
        (["--min-seconds", "-1"], "--min-seconds must be finite and >= 0, got -1.0"),
        (["--min-seconds", "nan"], "--min-seconds must be finite and >= 0, got nan"),
        (["--ops", "dense_gemm", "--implementations", "native"],
         "--ops dense_gemm has no case for --implementations native (dense_gemm is "
         "research-style only; predictor_loss has no research-style version)"),
        (["--ops", "predictor_loss", "--implementations", "research"],
         "--ops predictor_loss has no case for --implementations research (dense_gemm is "
         "research-style only; predictor_loss has no research-style version)"),
        (["--ops", ","], "--ops names no op; choose from " + ",".join(benchmark.OPS)),
        (["--implementations", ""], "--implementations must name some of "
         + ",".join(benchmark.IMPLEMENTATIONS) + ", got ''"),
        (["--implementations", "native,fast"], "--implementations must name some of "
         + ",".join(benchmark.IMPLEMENTATIONS) + ", got 'native,fast'"),
    ],
)
def test_arguments_that_cannot_run_are_one_line_usage_errors(tmp_path, capsys, arguments, message):
    file = tmp_path / "a_file"
    file.write_text("")
    argv = [a.format(file=file) for a in ["--ops", "sparse_labels", "--device", "cpu", *arguments]]
    assert benchmark.main(argv) == 2
    assert capsys.readouterr().err == f"srm-ext bench: {message.format(file=file)}\n"


def test_a_gpu_run_without_a_gpu_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.main(["--device", "cuda:1", "--ops", "sparse_labels"]) == 2
    assert capsys.readouterr().err == "srm-ext bench: --device 'cuda:1': no GPU is available here\n"


def test_a_native_run_without_the_kernels_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(_backend, "use_native", lambda t, code_sizes=None: False)
    assert benchmark.main(["--device", "cpu", "--dtype", "float16", "--ops", "sparse_labels"]) == 2
    assert "no compiled srm_ext kernel for cpu/float16" in capsys.readouterr().err


def test_a_native_run_with_the_kernels_turned_off_says_so(monkeypatch, capsys):
    monkeypatch.setenv("SRM_EXT_BACKEND", "reference")
    assert benchmark.main(["--device", "cpu", "--ops", "sparse_labels"]) == 2
    assert capsys.readouterr().err == (
        "srm-ext bench: SRM_EXT_BACKEND=reference turns the compiled kernels off; pass "
        "--implementations without native to time the others\n"
    )


@requires_native_cpu
@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_a_smoke_run_is_named_by_its_batch_and_records_the_cpu_products(tmp_path, monkeypatch, device):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    args = ["--quick", "--device", device, "--ops", "sparse_labels", "--out", str(tmp_path)]
    assert benchmark.main(args) == 0
    data = json.loads((tmp_path / "cifar-n2-cpu-float32.json").read_text())
    assert data["environment"]["cpu_float32_matmul"] in ("avx512", "blas")
    assert "native float32 products" in (tmp_path / "cifar-n2-cpu-float32.md").read_text()


def test_native_is_required_for_a_native_run(monkeypatch):
    monkeypatch.setattr(_backend, "use_native", lambda t, code_sizes=None: False)
    with pytest.raises(RuntimeError, match="no compiled srm_ext kernel"):
        benchmark.run_benchmarks([TINY], ops=("stage1_step",), min_repeats=1, min_seconds=0.0)


def test_native_is_required_at_every_shape(monkeypatch):
    # Past the CUDA kernels' size limits the ops fall back to the reference,
    # which must not be timed under the native name.
    monkeypatch.setattr(_backend, "use_native",
                        lambda t, code_sizes=None: code_sizes is None or code_sizes["K"] <= 16)
    assert benchmark._native_covers(torch.device("cpu"), torch.float32, [TINY])
    wide = dataclasses.replace(TINY, name="wide", num_codewords=32)
    with pytest.raises(RuntimeError, match="no compiled srm_ext kernel"):
        benchmark.run_benchmarks([TINY, wide], ops=("stage1_step",), min_repeats=1, min_seconds=0.0)
    profile_ops = load_benchmark_script("profile_ops")
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY, wide])
    assert profile_ops.main(["--device", "cpu", "--steps", "1"]) == 1


@requires_native_cpu
def test_profile_script_writes_a_time_breakdown_per_case(tmp_path, monkeypatch):
    profile_ops = load_benchmark_script("profile_ops")
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    argv = ["--device", "cpu", "--steps", "1", "--ops", "stage1_step,sparse_labels", "--out", str(tmp_path)]
    assert profile_ops.main(argv) == 0
    text = (tmp_path / "profile-cifar-cpu-float32.md").read_text()
    # One table per (shape, op); labels have no backward and are profiled forward.
    assert "### tiny stage1_step:" in text and "### tiny sparse_labels:" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert any("reconstruction_loss" in row for row in rows)
    assert all(float(row.split("|")[2]) >= 0 for row in rows)


def test_certification_model_refuses_what_tf32_misranks_and_keeps_clear_winners():
    screen = load_benchmark_script("screen_certification")
    # Pixel 0: codewords 0-3 score 4094.5 exactly (TF32: 4094), codeword 4
    # 4095 (TF32: 4094 too): four candidates leave the best one out.
    # Pixel 1: codeword 2 wins by far. Pixel 2: NaN.
    rows = torch.tensor([[4095.0, 2.0], [0.0, 1.0], [float("nan"), 1.0]])
    C = torch.zeros(2, 5)
    C[1, :4] = 2047.25
    C[0, 4] = 1.0
    assert screen.uncertified_fraction(rows[:1], C, 0.0, 1, 4) == 1.0
    C2 = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 3.0, 0.0, 0.0]])
    assert screen.uncertified_fraction(rows[1:2], C2, 0.5, 1, 2) == 0.0
    assert screen.uncertified_fraction(rows[1:], C2, 0.5, 1, 2) == 0.5  # NaN never certifies


def test_certification_script_writes_fractions_that_fall_with_more_candidates(tmp_path, monkeypatch):
    screen = load_benchmark_script("screen_certification")
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [dataclasses.replace(TINY, num_codewords=40)])
    argv = ["--shapes", "cifar", "--pixels", "256", "--train-steps", "2", "--out", str(tmp_path)]
    assert screen.main(argv) == 0
    records = json.loads((tmp_path / "screen-certification-cifar.json").read_text())["records"]
    assert {r["dictionary"] for r in records} == {"random", "trained"}
    for name in ("random", "trained"):
        rows = [r for r in records if r["dictionary"] == name]
        counts = [r["candidates"] for r in rows]
        assert counts == sorted(counts) and counts[0] == TINY.k + 1
        assert [r["chosen"] for r in rows].count(True) == 1  # k + max(k, 8) = 10
        assert rows[[r["chosen"] for r in rows].index(True)]["candidates"] == 10
        fractions = [r["uncertified"] for r in rows]
        assert all(0.0 <= f <= 1.0 for f in fractions)
        assert fractions == sorted(fractions, reverse=True)
    assert "**10**" in (tmp_path / "screen-certification-cifar.md").read_text()


def test_stage1_bytes_count_x_twice_the_code_twice_and_the_dictionary_three_times():
    # P = 2 * 4 * 4 = 32 pixels, D = 8, k = 2, K = 16, float32 (4 bytes).
    x, code, dictionary = 32 * 8 * 4, 32 * 2 * (4 + 8), 8 * 16 * 4
    assert bench_floors.stage1_step_bytes(TINY, 4) == 2 * x + 2 * code + 3 * dictionary
    assert bench_floors.stage1_step_bytes(TINY, 2) == 2 * (x // 2) + 2 * 32 * 2 * 10 + 3 * dictionary // 2


def test_copy_bandwidth_is_bytes_read_and_written_per_second(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(bench_floors.time, "perf_counter", lambda: float(next(ticks)) * 0.5)
    # Each copy of 4 MiB takes one tick (0.5 s) and moves 8 MiB.
    assert bench_floors.copy_bandwidth("cpu", nbytes=1 << 22, repeats=3) == pytest.approx(2 * (1 << 23))
    assert bench_floors.copy_bandwidth("cpu", nbytes=1 << 20, repeats=1) > 0


def test_floors_pick_the_larger_floor_and_state_each_fraction():
    wide = dataclasses.replace(TINY, name="wide", channels=64)
    records = [
        dict(shape="tiny", op="stage1_step", mode="forward+backward", implementation="native", median_ms=2.0),
        dict(shape="tiny", op="dense_gemm", mode="forward", implementation="research", median_ms=1.0),
        dict(shape="wide", op="stage1_step", mode="forward+backward", implementation="native", median_ms=4.0),
        dict(shape="wide", op="stage1_step", mode="forward+backward", implementation="research", median_ms=9.0),
    ]
    tiny_bytes = bench_floors.stage1_step_bytes(TINY, 4)
    bandwidth = tiny_bytes / 0.5e-3  # tiny's bytes in 0.5 ms
    rows = bench_floors.stage1_floors(records, [TINY, wide], 4, bandwidth)
    tiny, wide_row = rows
    assert tiny["memory_floor_ms"] == pytest.approx(0.5) and tiny["memory_fraction"] == pytest.approx(0.25)
    assert tiny["gemm_fraction"] == pytest.approx(0.5) and tiny["bound_by"] == "gemm"
    # No GEMM timed: the memory floor alone, its fraction against the native step only.
    assert wide_row["gemm_ms"] is None and wide_row["bound_by"] is None
    assert wide_row["memory_fraction"] == pytest.approx(
        bench_floors.stage1_step_bytes(wide, 4) / bandwidth * 1e3 / 4.0
    )
    table = bench_floors.floors_markdown(rows, bandwidth)
    assert f"copy bandwidth {bandwidth / 1e9:.0f} GB/s" in table
    assert "`2 P D e + 2 P k (e + 8) + 3 D K e`" in table  # what the byte count counts
    assert "| tiny |" in table and "| 50% | gemm |" in table and "| n/a | n/a |" in table


@requires_native_cpu
def test_main_reports_the_stage1_floors(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    args = ["--quick", "--device", "cpu", "--ops", "stage1_step,dense_gemm", "--out", str(tmp_path), "--name", "t"]
    assert benchmark.main(args) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["environment"]["copy_bandwidth_bytes_per_s"] > 0
    (row,) = data["stage1_floors"]
    assert row["shape"] == "tiny" and row["bytes"] == bench_floors.stage1_step_bytes(TINY, 4)
    assert row["gemm_ms"] > 0 and row["bound_by"] in ("gemm", "memory")
    assert "against its floors" in (tmp_path / "t.md").read_text()
    assert "against its floors" in capsys.readouterr().out


def test_markdown_names_the_dtype_batch_driver_and_cuda_version():
    # The .md files are read apart from the JSON: float32 and bfloat16 tables
    # of one GPU must be told apart by their contents.
    env = dict(device="cuda", gpu="NVIDIA H100 80GB HBM3", driver="580.159.04", cuda="13.0",
               cpu="x", torch="2.11.0", threads=16, commit="abc1234", date="today",
               dtype="bfloat16", shapes=[dataclasses.asdict(TINY)])
    records = [dict(shape="tiny", op="stage1_step", mode="forward", implementation="native",
                    median_ms=1.0, peak_bytes=None)]
    header = bench_report.markdown_table(records, env).splitlines()[0]
    for part in ("NVIDIA H100 80GB HBM3", "driver 580.159.04", "CUDA 13.0", "bfloat16", "N=2",
                 "commit abc1234"):
        assert part in header
    assert "driver unknown" in bench_report.markdown_table(records, {**env, "driver": None})


def test_markdown_columns_follow_the_order_the_implementations_were_timed_in():
    env = dict(device="cpu", cpu="x", torch="2", threads=2, commit="abc", date="today")
    records = [dict(shape="tiny", op="stage1_step", mode="forward", implementation=impl,
                    median_ms=ms, peak_bytes=None)
               for impl, ms in (("research", 4.0), ("native", 1.0), ("reference", 2.0))]
    header = bench_report.markdown_table(records, env).splitlines()[2]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[3:8] == ["native ms", "research ms", "reference ms",
                            "speed-up vs research", "speed-up vs reference"]
    row = bench_report.markdown_table(records, env).splitlines()[4]
    assert "| 4.00x | 2.00x |" in row


def _fake_cuda_device(monkeypatch):
    """What environment() asks of torch.cuda, as one H100 answers it."""
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                                  total_memory=85 * 2**30, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_driver_is_read_from_the_kernel_module_where_nvidia_smi_is_missing(monkeypatch, tmp_path):
    def no_nvidia_smi(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  "
                       "Release Build  (dvs-builder@U16)  Thu Oct  2 2025\n"
                       "GCC version:  gcc version 12.3.0\n")
    _fake_cuda_device(monkeypatch)
    monkeypatch.setattr(bench_environment.subprocess, "run", no_nvidia_smi)
    monkeypatch.setattr(bench_environment, "_NVIDIA_PROC_VERSION", version)
    env = bench_environment.environment("cuda")
    assert (env["gpu"], env["cuda"], env["driver"]) == ("NVIDIA H100 80GB HBM3", "13.0", "580.159.04")
    assert (env["capability"], env["sms"], env["tf32_matmul"]) == ("9.0", 132, False)
    # Set by hand: pytest 9.2's monkeypatch undo deletes this attribute instead of restoring it.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        env = {**bench_environment.environment("cuda"), "dtype": "float32"}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert env["tf32_matmul"] is True and "TF32 on" in bench_report.describe_run(env)
    monkeypatch.setattr(bench_environment, "_NVIDIA_PROC_VERSION", tmp_path / "missing")
    assert bench_environment.environment("cuda")["driver"] is None


def test_the_cuda_encode_path_is_recorded_per_shape(monkeypatch):
    # The screened encode, asked for, runs only where it pays (csrc/cuda/op_support.h):
    # here, as the kernels decide for float32 with TF32 off, not at k = 128.
    asked = []

    def encode_path_for(dtype, num_codewords, k):
        asked.append((dtype, num_codewords, k))
        return "gemm" if k == 128 else "screened"

    _fake_cuda_device(monkeypatch)
    monkeypatch.setattr(bench_environment, "_nvidia_driver", lambda: None)
    monkeypatch.setattr(_backend, "cuda_module", types.SimpleNamespace(
        build_info=lambda: {"encode": "screened"}, encode_path_for=encode_path_for))
    shapes = [dataclasses.replace(TINY, name=name, k=k) for name, k in
              [("a", 5), ("b", 128), ("c", 10)]]
    env = bench_environment.environment("cuda", "bfloat16", shapes)
    assert env["cuda_encode"] == "screened at a, c; gemm at b"
    assert asked == [(torch.bfloat16, 16, 5), (torch.bfloat16, 16, 128), (torch.bfloat16, 16, 10)]
    assert env["dtype"] == "bfloat16" and [s["name"] for s in env["shapes"]] == ["a", "b", "c"]
    assert bench_environment.environment("cuda", "float32", shapes[::2])["cuda_encode"] == "screened"
    assert bench_environment.environment("cuda")["cuda_encode"] == "screened"  # no shapes: the setting
    # float64 runs the reference on CUDA: there is no encode path to record.
    assert "cuda_encode" not in bench_environment.environment("cuda", "float64", shapes)
    assert "CUDA encode: screened at a, c; gemm at b" in bench_report.markdown_table([], env)


def test_cpu_is_recorded_with_its_family_and_model(tmp_path):
    # Two processors of a VM that names only the vendor's line: the first one's
    # family and model tell Zen 4 (25, 17) from Zen 5 (26, ...).
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nstepping\t: 1\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\n\n"
    )
    assert bench_environment._cpu_model(cpuinfo) == "AMD EPYC, family 25 model 17"
    # Where there are no x86 numbers the name stands alone; where there is no
    # name at all (an Arm cpuinfo), or no file, the platform's answer is taken.
    assert bench_environment.describe_cpu("model name\t: Neoverse-V2\n") == "Neoverse-V2"
    assert bench_environment.describe_cpu("processor\t: 0\nBogoMIPS\t: 2000.00\n") is None
    fallback = bench_environment.platform.processor() or bench_environment.platform.machine()
    assert bench_environment._cpu_model(tmp_path / "missing") == fallback
    assert bench_environment.environment("cpu")["cpu"] == bench_environment._cpu_model()


def test_commit_is_marked_dirty_where_tracked_files_were_edited(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("SRM_EXT_COMMIT", raising=False)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "a")
    commit = bench_environment._git_commit(tmp_path)
    assert commit and not commit.endswith("-dirty")
    (tmp_path / "results.json").write_text("{}")  # untracked output: still that commit
    assert bench_environment._git_commit(tmp_path) == commit
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bench_environment._git_commit(tmp_path) == commit + "-dirty"
    monkeypatch.setenv("SRM_EXT_COMMIT", "0123abc")  # a tree copied without git
    assert bench_environment._git_commit(tmp_path) == "0123abc"
    assert bench_environment._git_commit(tmp_path.parent / "no-such-dir") == "0123abc"


def test_the_compiled_reference_is_compiled_for_every_shape_and_grad_mode(monkeypatch):
    # Past Dynamo's recompile limit an op silently runs eagerly: the eager
    # reference would be timed under the compiled one's name.
    import torch._dynamo

    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    real_compile = torch.compile

    def compile_counted(fn, **kwargs):
        return real_compile(fn, backend=counting_backend, **kwargs)

    monkeypatch.setattr(benchmark, "_COMPILED_REFERENCE", benchmark._CompiledReference())
    monkeypatch.setattr(benchmark.torch, "compile", compile_counted)
    shapes = [dataclasses.replace(TINY, name=f"w{w}", width=w) for w in range(1, 7)]
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    try:
        benchmark.run_benchmarks(shapes, ops=("stage1_step",), implementations=("compiled",),
                                 min_repeats=1, min_seconds=0.0, max_repeats=1)
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = limit
    assert len(compiled_graphs) == 2 * len(shapes)  # forward and forward+backward


VERIFY_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "verify_cuda.sh"


def run_verify_stage(tmp_path, stage, bench_body="", test_body="", **env):
    """tools/verify_cuda.sh's ``stage`` with a stand-in python that logs its
    arguments (one call a line) and succeeds, as on a machine with the backend;
    its benchmark runs then run ``bench_body`` and its pytest runs ``test_body``.
    The script's settings come from ``env`` alone: those of a run of the
    script that runs these tests must not reach it (its VERIFY_ARCHIVE would
    be overwritten)."""
    import re
    import subprocess

    calls = tmp_path / "calls"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                           f'case "$*" in *bench_ops.py*) {bench_body or ":"} ;; '
                           f'*pytest*) {test_body or ":"} ;; esac\n'
                           'cat > /dev/null\n')
    fake_python.chmod(0o755)
    settings = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", VERIFY_SCRIPT.read_text())) - {"PATH"}
    outer = {name: value for name, value in os.environ.items() if name not in settings}
    result = subprocess.run(
        ["bash", str(VERIFY_SCRIPT), str(tmp_path / "out"), stage],
        env={**outer, "PYTHON": str(fake_python), **env}, capture_output=True, text=True,
        timeout=60,
    )
    runs = [line for line in calls.read_text().splitlines() if "bench_ops.py" in line]
    return result.returncode, runs


def test_verify_script_bench_stage_runs_the_chosen_shape_sets_and_dtypes(tmp_path):
    # One GPU call cannot hold both shape sets in both dtypes: each pair must be
    # a run of its own.
    code, runs = run_verify_stage(tmp_path, "bench", BENCH_DTYPES="bfloat16", BENCH_SHAPES="cifar")
    assert code == 0 and len(runs) == 1
    assert "--shapes cifar" in runs[0] and "--batch 128" in runs[0] and "--dtype bfloat16" in runs[0]
    (tmp_path / "defaults").mkdir()
    code, runs = run_verify_stage(tmp_path / "defaults", "bench")  # all four
    assert code == 0 and len(runs) == 4
    assert [("imagenet" in r, "float32" in r) for r in runs] == [
        (True, True), (False, True), (True, False), (False, False)]
    (tmp_path / "typo").mkdir()
    code, runs = run_verify_stage(tmp_path / "typo", "bench", BENCH_SHAPES="imagent")
    assert code != 0 and runs == []


def test_verify_script_refuses_an_output_folder_it_cannot_create(tmp_path):
    import subprocess

    (tmp_path / "file").write_text("")
    script = Path(__file__).resolve().parent.parent / "tools" / "verify_cuda.sh"
    result = subprocess.run(["bash", str(script), str(tmp_path / "file" / "out"), "env"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.endswith(f"cannot create the output folder '{tmp_path / 'file' / 'out'}'\n")


def test_verify_script_archive_named_relative_to_the_callers_folder(tmp_path, monkeypatch):
    # The script changes to the repository's root before it packs the folder.
    monkeypatch.chdir(tmp_path)
    code, _ = run_verify_stage(tmp_path, "bench", BENCH_DTYPES="float32", BENCH_SHAPES="cifar",
                               VERIFY_ARCHIVE="results.tgz")
    assert code == 0
    with tarfile.open(tmp_path / "results.tgz") as archive:
        assert "out/bench.log" in archive.getnames()


def test_result_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    # A time limit may stop a run while it rewrites its partial results.
    path = tmp_path / "r.json"
    benchmark._write_atomically(path, '{"complete": true}')
    real_write = Path.write_text

    def stopped_halfway(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        benchmark._write_atomically(path, '{"complete": false, "results": []}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"complete": True}


def test_verify_script_names_a_missing_sanitizer(tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "sh", "cat", "mkdir", "dirname", "tail", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    code, _ = run_verify_stage(tmp_path, "sanitize", PATH=str(tools))
    assert code == 1
    log = (tmp_path / "out" / "sanitize.log").read_text()
    assert "compute-sanitizer is not on PATH" in log


def test_verify_script_racecheck_selection_holds_bfloat16_but_not_float16(tmp_path):
    """The racecheck stage's default -k expression, as compute-sanitizer is
    handed it, picks float32 and bfloat16 tests (a bare "float16" would match
    every bfloat16 id too) and no float16 one."""
    import subprocess

    tools = tmp_path / "bin"
    tools.mkdir()
    sanitizer = tools / "compute-sanitizer"
    sanitizer.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path / "args"}\n')
    sanitizer.chmod(0o755)
    code, _ = run_verify_stage(tmp_path, "racecheck", PATH=f"{tools}:{os.environ['PATH']}")
    assert code == 0
    args = (tmp_path / "args").read_text().splitlines()
    selection = args[args.index("-k") + 1]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_cuda_kernels.py", "-k", selection],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
    ).stdout.splitlines()
    ids = [line for line in collected if "::" in line]
    assert 60 <= len(ids) <= 100  # about 4 s each under racecheck on an H100
    large = ("holds_one_box", "rebuilds_its_residual", "beyond_the_sparse_kernel_limits")
    assert not any(name in i for i in ids for name in large)
    assert any("bfloat16" in i for i in ids) and any("float32" in i for i in ids)
    assert not any("float16" in i.replace("bfloat16", "") for i in ids)


def test_chart_draws_no_bar_for_a_pair_that_was_not_timed(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, heights, *args, label=None, **kwargs):
        drawn.append((self, label, list(heights)))
        return real_bar(self, x, heights, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    fb = "forward+backward"
    records = [
        dict(shape="tiny", op="stage1_step", mode=fb, implementation="native", median_ms=1.0),
        dict(shape="tiny", op="stage1_step", mode=fb, implementation="research", median_ms=3.0),
        dict(shape="tiny", op="predictor_loss", mode=fb, implementation="native", median_ms=1.0),
        dict(shape="tiny", op="predictor_loss", mode=fb, implementation="reference", median_ms=2.0),
        dict(shape="tiny2", op="predictor_loss", mode=fb, implementation="native", median_ms=1.0),
    ]
    env = dict(device="cpu", cpu="x", dtype="float32", torch="2", commit="abc")
    bench_report.speedup_chart(records, env, tmp_path / "c.png")
    bars = {(ax.get_title().split()[0], label): heights for ax, label, heights in drawn}
    assert set(bars) == {("stage1_step", "vs research"), ("predictor_loss", "vs reference")}
    assert bars["stage1_step", "vs research"] == [3.0, pytest.approx(float("nan"), nan_ok=True)]
    assert bars["predictor_loss", "vs reference"][0] == 2.0


@requires_native_cpu
def test_an_implementation_out_of_gpu_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY, dataclasses.replace(TINY, name="tiny2")])
    monkeypatch.setattr(benchmark.research_style, "dense_reconstruction_loss", out_of_memory)
    args = ["--quick", "--device", "cpu", "--ops", "stage1_step,dense_gemm", "--out", str(tmp_path), "--name", "t"]
    assert benchmark.main(args) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    failed = [r for r in data["results"] if r.get("error")]
    assert {(r["shape"], r["implementation"]) for r in failed} == {("tiny", "research"), ("tiny2", "research")}
    assert all(r["op"] == "stage1_step" and r["median_ms"] is None and r["peak_bytes"] is None for r in failed)
    timed = [r for r in data["results"] if not r.get("error")]
    assert len(timed) == 2 * (2 * 2 + 1) and all(r["median_ms"] > 0 and r["peak_bytes"] is not None for r in timed)
    assert len(data["stage1_floors"]) == 2
    assert "| tiny | stage1_step | forward+backward | " in (tmp_path / "t.md").read_text()
    assert "out of memory" in (tmp_path / "t.md").read_text() and (tmp_path / "t.png").exists()


@requires_native_cpu
def test_an_implementation_that_fails_is_recorded_and_the_run_goes_on_but_fails(tmp_path, monkeypatch, capsys):
    # As torch.compile reports a compiler's failure: a header line, then the error.
    def compiler_error(*args):
        raise RuntimeError("backend='inductor' raised:\nCompilationError: no kernel for this shape")

    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    monkeypatch.setattr(benchmark.research_style, "dense_reconstruction_loss", compiler_error)
    args = ["--quick", "--device", "cpu", "--ops", "stage1_step,sparse_labels", "--out", str(tmp_path),
            "--name", "t"]
    assert benchmark.main(args) == 1  # after writing every result
    data = json.loads((tmp_path / "t.json").read_text())
    message = "RuntimeError: CompilationError: no kernel for this shape"
    failed = [(r["op"], r["mode"], r["implementation"], r["error"]) for r in data["results"] if r.get("error")]
    assert failed == [("stage1_step", mode, "research", message) for mode in ("forward", "forward+backward")]
    assert all(r["median_ms"] > 0 and r["peak_bytes"] is not None for r in data["results"] if not r.get("error"))
    assert data["environment"]["complete"] and message in (tmp_path / "t.md").read_text()
    assert (f"srm-ext bench: research failed at tiny stage1_step forward+backward: {message}"
            in capsys.readouterr().err)


@requires_native_cpu
def test_a_run_with_no_timed_rounds_is_not_called_out_of_memory():
    records = benchmark.run_benchmarks([TINY], ops=("sparse_labels",),
                                       implementations=("native", "reference"),
                                       min_repeats=0, min_seconds=0.0, max_repeats=0)
    assert records and all(r["repeats"] == 0 and r["median_ms"] is None for r in records)
    assert not any("error" in r for r in records)


def test_first_calls_are_recorded_apart_from_the_timed_calls(monkeypatch):
    # torch.compile compiles in an implementation's first call: that call is
    # left out of the times and recorded on its own.
    clock = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    calls = {"compiled": 0, "native": 0}

    def run(name, first, later):
        def fn():
            clock[0] += first if calls[name] == 0 else later
            calls[name] += 1
        return fn

    fns = {"compiled": run("compiled", 30.0, 2.0), "native": run("native", 1.0, 1.0)}
    first_calls = {}
    times = benchmark._time_interleaved(fns, torch.device("cpu"), 3, 0.0, 3, first_calls)
    assert first_calls == {"compiled": 30.0, "native": 1.0}
    assert times == {"compiled": [2.0] * 3, "native": [1.0] * 3}


@requires_native_cpu
def test_records_carry_the_first_call_and_the_run_its_duration(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    args = ["--quick", "--device", "cpu", "--ops", "stage1_step", "--out", str(tmp_path), "--name", "t"]
    assert benchmark.main(args) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert all(r["first_call_ms"] > 0 for r in data["results"])
    assert data["environment"]["timing_seconds"] > 0


@requires_native_cpu
def test_a_run_without_a_known_commit_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(benchmark.SHAPE_SETS, "cifar", [TINY])
    monkeypatch.setattr(bench_environment, "_git_commit", lambda: None)
    assert benchmark.main(["--quick", "--device", "cpu", "--ops", "sparse_labels"]) == 0
    assert "set SRM_EXT_COMMIT" in capsys.readouterr().err


def test_verify_script_stops_a_test_run_at_stage_timeout_and_ignores_the_outer_settings(
    tmp_path, monkeypatch
):
    # The settings of a verify run that runs this test (its archive, its
    # benchmark choices) must not leak into the script run here.
    outer_archive = tmp_path / "outer.tgz"
    monkeypatch.setenv("VERIFY_ARCHIVE", str(outer_archive))
    monkeypatch.setenv("TEST_ARGS", "tests/test_nothing.py")
    code, _ = run_verify_stage(tmp_path, "test", test_body="exec sleep 90", STAGE_TIMEOUT="1")
    assert code != 0 and not outer_archive.exists()
    pytest_call = next(line for line in (tmp_path / "calls").read_text().splitlines() if "pytest" in line)
    assert "-o timeout=300" in pytest_call and pytest_call.endswith(
        "--ignore=tests/test_cuda_emulated.py --ignore=tests/test_cuda_glue_emulated.py tests"
    )


@pytest.mark.parametrize(
    "limits",
    [{"BENCH_TIMEOUT": "1"}, {"STAGE_TIMEOUT": "1"}, {"STAGE_TIMEOUT": "300", "BENCH_TIMEOUT": "1"}],
    ids=["bench", "stage", "bench before stage"],
)
def test_verify_script_stops_a_benchmark_run_at_its_time_limit_and_archives_the_stage(tmp_path, limits):
    # A run past the call's time limit would be killed with the script, and the
    # stage's archive never written.
    archive = tmp_path / "results.tgz"
    code, runs = run_verify_stage(tmp_path, "bench", bench_body="exec sleep 90",
                                  BENCH_DTYPES="float32", BENCH_SHAPES="imagenet cifar",
                                  VERIFY_ARCHIVE=str(archive), **limits)
    assert code != 0 and len(runs) == 2  # the second run started after the first was stopped
    assert archive.stat().st_size > 0
