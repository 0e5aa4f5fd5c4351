"""A teacher trained elsewhere: its weights found in another training script's
checkpoint (under the usual entries, without the prefixes wrappers add), and
its inputs normalised with the statistics it was trained with."""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from srm_ext.distill import (
    ConfigError,
    ExperimentConfig,
    ExperimentRunner,
    accuracy,
    load_trained_model,
)
from srm_ext.distill.data import InputNormalization, load_dataset
from srm_ext.distill.trained import find_state_dict
from test_cli import TINY_CONFIG


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def prefixed(state: dict, prefix: str) -> OrderedDict:
    """``state`` as a model wrapped with ``prefix`` gives it, module versions included."""
    out = OrderedDict((prefix + key, value) for key, value in state.items())
    if hasattr(state, "_metadata"):
        out._metadata = OrderedDict(
            (prefix + key if key else prefix[:-1], value) for key, value in state._metadata.items()
        )
    return out


def assert_same_weights(got: dict, want: dict) -> None:
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "wrap, found",
    [
        (lambda sd: sd, []),
        (lambda sd: {"epoch": 3, "state_dict": sd, "optimizer": {}}, ["its 'state_dict' entry"]),
        (lambda sd: {"model_state_dict": sd, "loss": 0.5}, ["its 'model_state_dict' entry"]),
        (lambda sd: {"model": sd}, ["its 'model' entry"]),
        (lambda sd: prefixed(sd, "module."), ["keys without 'module.'"]),
        (lambda sd: {"model": prefixed(prefixed(sd, "_orig_mod."), "module.")},
         ["its 'model' entry", "keys without 'module.'", "keys without '_orig_mod.'"]),
    ],
    ids=["plain", "state_dict", "model_state_dict", "model", "ddp", "ddp_compiled_entry"],
)
def test_the_weights_are_found_in_a_training_scripts_checkpoint(wrap, found):
    source = small_model()
    source[1].running_mean.fill_(0.5)
    checkpoint = wrap(source.state_dict())
    weights, how = find_state_dict(checkpoint, small_model())
    assert how == found
    assert_same_weights(weights, source.state_dict())
    assert list(weights._metadata) == list(source.state_dict()._metadata)  # versions kept
    target = small_model()
    target.load_state_dict(weights)
    assert torch.equal(target[1].running_mean, source[1].running_mean)


def test_a_prefix_the_model_has_itself_is_kept():
    model = nn.Sequential(OrderedDict(module=nn.Linear(2, 2)))  # every key starts "module."
    weights, how = find_state_dict(model.state_dict(), model)
    assert how == [] and list(weights) == ["module.weight", "module.bias"]


@pytest.mark.parametrize(
    "checkpoint",
    [torch.zeros(3), {"epoch": 3}, {}, {"model": {"w": 1.0}}, {"w": torch.zeros(1), "step": 2}],
    ids=["tensor", "no_weights", "empty", "model_not_weights", "mixed"],
)
def test_anything_else_is_left_for_load_state_dict_to_refuse(checkpoint):
    weights, how = find_state_dict(checkpoint, small_model())
    assert weights is checkpoint and how == []


def test_the_callers_checkpoint_is_not_changed():
    checkpoint = {"state_dict": prefixed(small_model().state_dict(), "module.")}
    keys = list(checkpoint["state_dict"])
    find_state_dict(checkpoint, small_model())
    assert list(checkpoint["state_dict"]) == keys


def test_a_run_loads_a_teacher_saved_by_a_ddp_training_script(tmp_path):
    # A teacher trained on inputs normalised with other statistics than this
    # data's, then saved the way a DDP training script saves it.
    statistics = dict(input_mean=[0.5], input_std=[0.25])
    elsewhere = tmp_path / "elsewhere"
    ExperimentRunner(
        ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(elsewhere),
                         **statistics),
        log=lambda *_: None,
    ).run()
    teacher = torch.load(elsewhere / "models" / "teacher.pt", weights_only=True)
    torch.save({"epoch": 30, "model": prefixed(teacher, "module.")}, tmp_path / "teacher.pth")

    logged = []
    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["kd"]}, output_dir=str(out),
                              teacher_weights=str(tmp_path / "teacher.pth"), **statistics)
    results = ExperimentRunner(config, log=logged.append).run()
    assert (
        f"--teacher-weights: the teacher's weights are {tmp_path / 'teacher.pth'}'s, "
        "its 'model' entry, keys without 'module.'"
    ) in logged
    assert_same_weights(torch.load(out / "models" / "teacher.pt", weights_only=True), teacher)

    # Evaluated on inputs normalised with the given statistics, and loaded
    # for inference with them.
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert (resolved["mean"], resolved["std"]) == ([0.5], [0.25])
    loaded = load_trained_model(out, "teacher")
    assert loaded[0].mean.flatten().tolist() == [0.5] and loaded[0].std.flatten().tolist() == [0.25]
    held_out = DataLoader(load_dataset(config).test, batch_size=32)
    measured = load_dataset(ExperimentConfig(**TINY_CONFIG))  # the data's own statistics
    with_given = accuracy(loaded, held_out)
    with_measured = accuracy(
        nn.Sequential(InputNormalization(measured.mean, measured.std), loaded[1]), held_out
    )
    assert with_given != with_measured  # the statistics matter to this teacher
    assert results["runs"][0]["run"] == "teacher" and results["runs"][0]["test_acc"] == with_given


def test_a_teacher_with_nan_weights_is_refused_before_any_student_trains(tmp_path):
    source = tmp_path / "source"
    ExperimentRunner(
        ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(source)),
        log=lambda *_: None,
    ).run()
    teacher = torch.load(source / "models" / "teacher.pt", weights_only=True)
    name = next(key for key, value in teacher.items() if value.is_floating_point())
    teacher[name][0] = float("nan")
    torch.save(teacher, tmp_path / "diverged.pt")
    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["scratch"]}, output_dir=str(out),
                              teacher_weights=str(tmp_path / "diverged.pt"))
    with pytest.raises(ConfigError, match=re.escape(
        f"--teacher-weights: {tmp_path / 'diverged.pt'} holds NaN or inf values ({name}, ...)"
    )):
        ExperimentRunner(config, log=lambda *_: None).run()
    assert not (out / "models" / "scratch-seed0.pt").exists()
