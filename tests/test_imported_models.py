"""``srm-ext distill`` on a user's own models, named ``package.module:function``."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

from srm_ext.cli import main
from srm_ext.distill import ConfigError, load_trained_model
from srm_ext.distill.models import build_model
from test_cli import TINY_FLAGS

MODULE = "user_models_for_tests"

MODELS = textwrap.dedent(
    """
    from torch import nn


    class Small(nn.Module):
        def __init__(self, num_classes, in_channels, channels):
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU())
            self.layer2 = nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU()
            )
            self.head = nn.Linear(channels, num_classes)

        def forward(self, x):
            return self.head(self.layer2(self.layer1(x)).mean((2, 3)))


    class Staged(Small):
        feature_stages = ("layer1", "layer2")


    CALLS = []


    def teacher(num_classes, in_channels, width):
        CALLS.append((num_classes, in_channels, width))
        return Small(num_classes, in_channels, 16)


    def student(num_classes, in_channels, width):
        return Small(num_classes, in_channels, max(2, round(16 * width)))


    class factories:
        staged = staticmethod(lambda num_classes, in_channels, width: Staged(num_classes, in_channels, 8))


    class RaisesInForward(Small):
        def forward(self, x):
            return {"logits": super().forward(x)}["probabilities"]


    def raises_in_forward(num_classes, in_channels, width):
        return RaisesInForward(num_classes, in_channels, 8)


    class AuxiliaryLogits(Small):
        def forward(self, x):
            logits = super().forward(x)
            return (logits, logits) if self.training else logits


    def auxiliary_logits(num_classes, in_channels, width):
        return AuxiliaryLogits(num_classes, in_channels, 8)


    def double_precision(num_classes, in_channels, width):
        return Small(num_classes, in_channels, 8).double()


    def imagenet_head(num_classes, in_channels, width):
        return Small(1000, in_channels, 8)


    def no_module(num_classes, in_channels, width):
        return "a model"


    def raises(num_classes, in_channels, width):
        raise RuntimeError("no such variant\\nsecond line")


    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """The models' module in the working directory, which is not on sys.path
    (as under the srm-ext script); the module is forgotten afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(MODELS)
    (tmp_path / "broken_syntax_models.py").write_text("def teacher(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop(MODULE, None)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


def test_distill_trains_and_reloads_the_users_models(user_models):
    out = user_models / "run"
    code = main([
        "distill", "--preset", "quick", *TINY_FLAGS, "--methods", "kd,srm",
        "--teacher", f"{MODULE}:teacher", "--student", f"{MODULE}:student",
        "--layer-pairs", "layer1:layer1,layer2:layer2", "--output-dir", str(out),
    ])
    assert code == 0
    module = sys.modules[MODULE]
    # Called with the dataset's classes and channels and the width flag, for
    # the checks before training, the run, and nothing else.
    assert set(module.CALLS) == {(10, 1, 0.34)}
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"] == f"{MODULE}:teacher"
    assert config["resolved"]["layer_pairs"] == ["layer1:layer1", "layer2:layer2"]
    results = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["teacher", "kd", "srm"]

    student = load_trained_model(out, "srm-seed0")
    network = student[1]
    assert type(network) is module.Small and network.layer1[0].out_channels == 2  # max(2, round(16 * 0.05))
    images = torch.rand(3, 1, 8, 8)
    assert student(images).shape == (3, 10)


def test_default_layer_pairs_come_from_the_models_feature_stages(user_models):
    out = user_models / "run"
    spec = f"{MODULE}:factories.staged"
    code = main([
        "distill", "--preset", "quick", *TINY_FLAGS, "--methods", "srm", "--teacher", spec,
        "--student", spec, "--epochs-teacher", "1", "--epochs-student", "1",
        "--output-dir", str(out),
    ])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["layer_pairs"] == ["layer1:layer1", "layer2:layer2"]


def test_a_model_that_fails_on_small_images_for_another_reason_gets_no_size_hint(user_models, capsys):
    flags = ["distill", "--preset", "quick", *TINY_FLAGS, "--teacher", f"{MODULE}:double_precision"]
    assert main([*flags, "--output-dir", str(user_models / "run")]) == 2
    err = capsys.readouterr().err
    assert "should be the same" in err and "--image-size" not in err


def test_a_loaded_teacher_returning_more_in_train_mode_is_taken(user_models, monkeypatch):
    # It is only evaluated; a teacher to train is refused (see below).
    monkeypatch.syspath_prepend(os.fspath(user_models))
    teacher = build_model(f"{MODULE}:auxiliary_logits", 10, 1)
    torch.save(teacher.state_dict(), user_models / "teacher.pt")
    flags = ["distill", *TINY_FLAGS, "--teacher", f"{MODULE}:auxiliary_logits", "--student",
             f"{MODULE}:student", "--methods", "kd", "--seeds", "0", "--epochs-student", "1"]
    assert main([*flags, "--teacher-weights", str(user_models / "teacher.pt"),
                 "--output-dir", str(user_models / "run")]) == 0


def test_scratch_and_kd_need_no_layer_pairs(user_models, capsys):
    models = ["--teacher", f"{MODULE}:teacher", "--student", f"{MODULE}:student"]
    flags = ["distill", *TINY_FLAGS, *models, "--seeds", "0", "--epochs-teacher", "1",
             "--epochs-student", "1"]
    out = user_models / "run"
    assert main([*flags, "--methods", "scratch,kd", "--output-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["resolved"]["layer_pairs"] == []
    # A method that trains on layer pairs still needs them.
    assert main([*flags, "--methods", "kd,sp", "--output-dir", str(user_models / "sp")]) == 2
    assert "these models declare no feature_stages; pass --layer-pairs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_models_module:teacher",
         "model 'no_such_models_module:teacher': cannot import 'no_such_models_module' "
         "(ModuleNotFoundError: No module named 'no_such_models_module')"),
        ("broken_syntax_models:teacher", "cannot import 'broken_syntax_models' (SyntaxError: "),
        (f"{MODULE}:missing", f"model '{MODULE}:missing': '{MODULE}' has no 'missing'"),
        (f"{MODULE}:factories.missing", f"'{MODULE}' has no 'factories.missing'"),
        (f"{MODULE}:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        (f"{MODULE}:no_module", "no_module returned str, expected a torch.nn.Module"),
        (f"{MODULE}:raises", "raises(10, 1, 1.0) raised RuntimeError: no such variant"),
        (f"{MODULE}:imagenet_head",
         f"the teacher '{MODULE}:imagenet_head' maps a batch of 2 images to shape (2, 1000); "
         "expected logits of shape (2, 10) for the dataset's 10 classes"),
        (f"{MODULE}:auxiliary_logits",
         f"the teacher '{MODULE}:auxiliary_logits' maps a batch of 2 images to tuple in train "
         "mode; expected logits of shape (2, 10) for the dataset's 10 classes"),
        (f"{MODULE}:raises_in_forward",
         "the teacher failed on a dry-run batch of shape (2, 1, 8, 8) (is that the input it "
         "takes?): KeyError: 'probabilities'"),
        (":teacher", "model ':teacher' must look like package.module:function"),
        (f"{MODULE}:", f"model '{MODULE}:' must look like package.module:function"),
        ("resnet9", "unknown architecture 'resnet9' (did you mean resnet8"),
    ],
)
def test_a_model_that_cannot_be_used_is_one_line_naming_it(user_models, capsys, spec, message):
    code = main([
        "distill", *TINY_FLAGS, "--teacher", spec, "--teacher-width", "1",
        "--output-dir", str(user_models / "run"),
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("srm-ext: error: ") and err.count("\n") == 1
    assert message in err


def test_build_model_imports_only_from_sys_path(user_models, monkeypatch):
    # The CLI puts the working directory on sys.path; the Python API leaves
    # sys.path as the user set it.
    with pytest.raises(ConfigError, match="No module named"):
        build_model(f"{MODULE}:teacher", 10, 3)
    monkeypatch.syspath_prepend(os.fspath(user_models))
    model = build_model(f"{MODULE}:teacher", 10, 3, 2.0)
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 10)
    assert sys.modules[MODULE].CALLS == [(10, 3, 2.0)]
