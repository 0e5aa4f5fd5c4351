"""A teacher's weights from a checkpoint that another training script wrote:
found under the usual entries and without the prefixes wrappers add."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from srm_ext.distill import ExperimentConfig, ExperimentRunner
from srm_ext.distill.models import build_model
from srm_ext.distill.trained import find_state_dict
from test_cli import TINY_CONFIG


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def prefixed(state: OrderedDict, prefix: str) -> OrderedDict:
    """``state`` as a model wrapped with ``prefix`` gives it, module versions included."""
    out = OrderedDict((prefix + key, value) for key, value in state.items())
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
    torch.manual_seed(5)
    teacher = build_model("densenet", 10, 1, TINY_CONFIG["teacher_width"])
    torch.save({"epoch": 30, "model": prefixed(teacher.state_dict(), "module.")},
               tmp_path / "teacher.pth")
    logged = []
    out = tmp_path / "run"
    config = ExperimentConfig(**{**TINY_CONFIG, "methods": ["kd"]}, output_dir=str(out),
                              teacher_weights=str(tmp_path / "teacher.pth"))
    ExperimentRunner(config, log=logged.append).run()
    assert (
        f"--teacher-weights: the teacher's weights are {tmp_path / 'teacher.pth'}'s, "
        "its 'model' entry, keys without 'module.'"
    ) in logged
    saved = torch.load(out / "models" / "teacher.pt", weights_only=True)
    assert_same_weights(saved, teacher.state_dict())
