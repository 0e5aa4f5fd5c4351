"""The results table (mean and sample std of accuracy over seeds, per method)
and the plots."""

from __future__ import annotations

import pytest

from srm_ext.distill.plots import plot_loss_curves
from srm_ext.distill.report import markdown_table, summarise


def test_summary_over_several_seeds():
    runs = [
        {"method": "kd", "seed": 0, "test_acc": 0.90, "stage_times": {"kd": 2.0}},
        {"method": "srm", "seed": 0, "test_acc": 0.95, "stage_times": {"srm-dictionary": 1.0, "srm-kd": 3.0}},
        {"method": "kd", "seed": 1, "test_acc": 0.94, "stage_times": {"kd": 4.0}},
        {"method": "kd", "seed": 2, "test_acc": 0.92, "stage_times": {"kd": 3.0}},
    ]
    kd, srm = summarise(runs)
    assert (kd["method"], kd["runs"], kd["seeds"]) == ("kd", 3, [0, 1, 2])
    assert kd["acc_mean"] == pytest.approx(0.92)
    assert kd["acc_std"] == pytest.approx(0.02)  # sample std of 0.90, 0.94, 0.92
    assert kd["stage_time_mean"] == {"kd": pytest.approx(3.0)}
    assert srm["runs"] == 1 and srm["acc_std"] == 0.0
    table = markdown_table([kd, srm])
    assert "| kd | 92.00 ± 2.00 | 3 | kd 3.0 |" in table
    assert "| srm | 95.00 | 1 | srm-dictionary 1.0, srm-kd 3.0 |" in table  # one run: no spread


def test_loss_curves_are_written_when_no_epochs_ran(tmp_path):
    path = tmp_path / "loss_curves.png"
    plot_loss_curves([], path)
    assert path.read_bytes()[:4] == b"\x89PNG"
