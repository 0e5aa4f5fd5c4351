"""FeatureTap: each tapped map is the output of one call of its module, unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from srm_ext import SRMDistiller
from srm_ext.distill import FeatureTap
from srm_ext.distill.hooks import FeatureTapError
from srm_ext.distill.models import AllCNN, DenseNet, ResNet


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


class SharedActivation(nn.Module):
    """One ReLU module applied after both convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.down(self.act(self.stem(x)))))


class Residual(nn.Module):
    """The shape of torchvision's BasicBlock: in-place ops on ``bn``'s output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out)


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        Residual(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def conv_teacher() -> nn.Module:
    """A convolution whose ReLU ("1") is tapped, and a 3-class head."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_module_running_twice_in_one_forward_is_rejected():
    tap = FeatureTap(SharedActivation(), ["act"], role="student")
    with pytest.raises(RuntimeError, match="student module 'act' ran more than once in one forward"):
        with tap.capture():
            tap.model(torch.randn(2, 1, 8, 8))


def test_distiller_rejects_a_reused_student_module_before_training():
    teacher = conv_teacher()
    with pytest.raises(RuntimeError, match="'act' ran more than once"):
        SRMDistiller(teacher, SharedActivation(), {"1": "act"}, input_shape=(1, 8, 8))


def test_each_forward_pass_in_one_capture_starts_afresh():
    model = residual_net().eval()
    tap = FeatureTap(model, ["0", "1"])
    first, second = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 8, 8)
    with tap.capture() as maps:
        model(first)
        model(second)
    torch.testing.assert_close(maps["0"], model[0](second))
    assert maps["1"].shape[0] == 3


def test_map_modified_in_place_later_is_rejected_when_read():
    model = residual_net().eval()
    tap = FeatureTap(model, ["1.bn", "1"])
    x = torch.randn(2, 1, 8, 8)
    with tap.capture() as maps:
        model(x)
    assert set(maps) == {"1.bn", "1"} and len(maps) == 2
    with pytest.raises(RuntimeError, match="module '1.bn'.*modified in place.*tap the module after"):
        maps["1.bn"]
    # the block's own output (after the in-place ops) is fine
    torch.testing.assert_close(maps["1"], model[1](model[0](x)))


def test_distiller_rejects_a_map_modified_in_place_before_training():
    teacher = conv_teacher()
    with pytest.raises(RuntimeError, match="student module '1.bn'.*modified in place"):
        SRMDistiller(teacher, residual_net(), {"1": "1.bn"}, input_shape=(1, 8, 8))
    # tapping the in-place ReLU itself gives the block's output
    student = residual_net()
    distiller = SRMDistiller(teacher, student, {"1": "1.relu"}, input_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    block_output = student[1](student[0](x))  # train mode: batch statistics, as in the loss
    assert (block_output == 0).any() and (block_output > 0).any()  # the ReLU did something
    with distiller.student_tap.capture() as maps:
        student(x)
    torch.testing.assert_close(maps["1.relu"], block_output, rtol=0, atol=0)
    loss, _ = distiller.student_loss(x)
    expected = distiller.predictors[0](block_output, distiller.teacher_labels(x)[0])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student[1].conv.weight.grad is not None and student[1].conv.weight.grad.any()


class EvalOnlyBranch(nn.Module):
    """``extra`` runs in eval mode only, as in the dry run that sizes the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.extra = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x if self.training else self.extra(x))


def test_tapped_module_that_did_not_run_is_a_clear_error():
    model = EvalOnlyBranch().train()
    tap = FeatureTap(model, ["stem", "extra"], role="student")
    with tap.capture() as maps:
        model(torch.randn(2, 1, 8, 8))
    assert "extra" not in maps and set(maps) == {"stem"}
    message = r"student module 'extra' did not run in the last forward pass \(in training mode\)"
    with pytest.raises(FeatureTapError, match=message):
        maps["extra"]
    with pytest.raises(KeyError):
        maps["head"]  # not tapped: a plain missing key


def test_distiller_names_a_student_module_that_runs_in_eval_mode_only():
    torch.manual_seed(0)
    teacher = conv_teacher()
    distiller = SRMDistiller(teacher, EvalOnlyBranch(), {"1": "extra"}, input_shape=(1, 8, 8))
    loader = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    distiller.fit_dictionaries(loader, epochs=1, progress=False, log=None)
    with pytest.raises(FeatureTapError, match="student module 'extra' did not run"):
        distiller.fit_student(loader, epochs=1, progress=False, log=None)


@pytest.mark.parametrize("model", [
    DenseNet(3, 1, growth=4, block_layers=(1, 1, 1)),
    AllCNN(3, 1, channels=(4, 6, 6)),
    ResNet(3, 1, blocks_per_stage=1, base_width=4),
], ids=lambda model: type(model).__name__)
def test_feature_stages_of_the_bundled_models_are_tappable(model):
    tap = FeatureTap(model, list(model.feature_stages))
    x = torch.randn(2, 1, 8, 8)
    assert all(t.dim() == 4 for t in tap.probe(x).values())
    with tap.capture() as maps:  # train mode, with autograd
        model(x).sum().backward()
    assert [maps[path].shape[0] for path in model.feature_stages] == [2, 2, 2]


def test_capture_under_inference_mode():
    # inference tensors carry no version counter: captured, read unchecked
    model = residual_net().eval()
    tap = FeatureTap(model, ["1"])
    with torch.inference_mode(), tap.capture() as maps:
        model(torch.randn(2, 1, 8, 8))
    assert maps["1"].shape == (2, 4, 8, 8)


def test_capture_of_a_compiled_model():
    model = residual_net().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tap = FeatureTap(model, ["0", "1"])
    x = torch.randn(2, 1, 8, 8)
    with tap.capture() as maps:
        compiled(x)
    torch.testing.assert_close(maps["1"], model[1](model[0](x)))


def test_a_tapped_layer_without_a_feature_map_is_named():
    # Every method that taps layers (SRM, FitNet, SP, AT) needs (N, C, H, W) maps.
    tap = FeatureTap(conv_teacher(), ["4"], role="teacher")
    with pytest.raises(TypeError, match=r"teacher module '4' returned a tensor of shape \(2, 3\); "
                                        r"a tapped layer must give a 4-D \(N, C, H, W\) feature map"):
        tap.probe(torch.zeros(2, 1, 5, 5))
