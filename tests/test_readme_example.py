"""The README's Python example (examples/custom_models.py) runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_models.py"


def test_custom_models_example_runs(tmp_path):
    env = child_env()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    accuracies = re.findall(r"(teacher|student) accuracy: ([0-9.]+)", proc.stdout)
    assert [name for name, _ in accuracies] == ["teacher", "student"]
    assert all(0.0 <= float(value) <= 1.0 for _, value in accuracies)
    assert "stage-3 loss" in proc.stdout
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert state and all(key.startswith(("body.", "head.")) for key in state)
