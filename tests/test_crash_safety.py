"""A training run killed with SIGKILL mid-run resumes to the same result,
losing at most the epoch in progress; SIGTERM stops it like Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import child_env
from test_cli import TINY_FLAGS, _final_numbers


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "srm_ext", "distill", *TINY_FLAGS, *args],
        cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _epochs_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _start_and_signal(out: Path, cwd: Path, epochs: int, signum: int) -> subprocess.Popen:
    """Starts a run into ``out`` and sends it ``signum`` once ``epochs`` epochs are logged."""
    run = _cli("--output-dir", str(out), cwd=cwd)
    deadline = time.monotonic() + 300
    while _epochs_logged(out) < epochs and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, "the run ended before the signal"
    run.send_signal(signum)
    return run


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    done = _cli("--output-dir", str(straight), cwd=tmp_path)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    killed = tmp_path / "killed"
    run = _start_and_signal(killed, tmp_path, 3, signal.SIGKILL)
    run.wait(timeout=60)
    logged = _epochs_logged(killed)
    assert not (killed / "results.json").exists()

    # The last checkpoint is intact and holds every epoch but the one in progress.
    saved = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert len(saved["history"]) >= logged - 1

    resumed = _cli("--resume", "--output-dir", str(killed), cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _final_numbers(killed) == _final_numbers(straight)


def test_sigterm_stops_cleanly_with_the_resume_hint(tmp_path):
    # How schedulers preempt a job: no traceback, no temporary file left over.
    out = tmp_path / "run"
    run = _start_and_signal(out, tmp_path, 1, signal.SIGTERM)
    assert run.wait(timeout=60) == 130
    err = run.stderr.read()
    # The hint repeats how the run was started (python -m srm_ext here).
    hint = f"interrupted; continue with: python -m srm_ext distill --resume --output-dir {out}"
    assert hint in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    "environment, started_as",
    [
        ({}, "python -m srm_ext"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, "torchrun --nproc_per_node=4 -m srm_ext"),
        ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, "torchrun (with this run's options) -m srm_ext"),
    ],
)
def test_the_resume_hint_repeats_how_the_run_was_started(monkeypatch, environment, started_as):
    # A resume on another process count would not give the uninterrupted run's numbers.
    from srm_ext import cli

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["/site-packages/srm_ext/__main__.py"])
    assert cli._invocation() == started_as

