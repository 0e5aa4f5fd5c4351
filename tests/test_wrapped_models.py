"""Compiled and DDP-wrapped teachers and students: paths of the plain model,
hooks that compiled code notices, and the same training as unwrapped models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo.config as dynamo_config
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from srm_ext import SRMDistiller
from srm_ext.distill import FeatureTap
from srm_ext.distill.hooks import FeatureTapError, resolve_module, unwrap
from srm_ext.distill.models import AllCNN, DenseNet

QUIET = {"progress": False, "log": None}
PAIRS = {"block2": "stage2"}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


@pytest.fixture
def fresh_dynamo():
    """torch.compile as a user's process starts it: hook guards off (torch's
    default, which the taps turn on) and no compiled code; both restored after.
    patch, not monkeypatch: pytest 9.2's monkeypatch undo deletes the setting."""
    torch.compiler.reset()
    with dynamo_config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch.compiler.reset()


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = DenseNet(num_classes=4, in_channels=1, growth=4, block_layers=(1, 1, 1))
    student = AllCNN(num_classes=4, in_channels=1, channels=(4, 6, 6))
    return teacher, student


def batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
        for _ in range(count)
    ]


def compiled(model: nn.Module, style: str) -> nn.Module:
    if style == "wrapper":
        return torch.compile(model, backend="eager")
    model.compile(backend="eager")
    return model


def train_all_stages(teacher: nn.Module, student: nn.Module) -> SRMDistiller:
    distiller = SRMDistiller(teacher, student, PAIRS, input_shape=(1, 8, 8))
    distiller.fit(batches(), 1, 1, 1, **QUIET)
    return distiller


def test_paths_of_the_plain_model_resolve_through_wrappers():
    teacher, _ = models()
    target = teacher.block2
    assert resolve_module(torch.compile(teacher), "block2") is target
    assert resolve_module(torch.compile(teacher), "_orig_mod.block2") is target
    assert resolve_module(nn.DataParallel(torch.compile(teacher)), "block2") is target
    assert unwrap(nn.DataParallel(torch.compile(teacher))) is teacher
    with pytest.raises(ValueError, match=r"no module 'block9'; closest: block3, block2") as error:
        resolve_module(torch.compile(teacher), "block9")
    assert "_orig_mod" not in str(error.value)  # the hint names the plain paths


@pytest.mark.parametrize("style", ["wrapper", "method"])
def test_capture_of_a_compiled_model_that_ran_without_hooks(fresh_dynamo, style):
    # The usual order: the teacher is evaluated, then distilled. Code compiled
    # for the hook-free call must not serve the tapped one.
    teacher, _ = models()
    plain = copy.deepcopy(teacher).eval()
    model = compiled(teacher, style).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
    tap = FeatureTap(model, ["block1"])
    with pytest.warns(UserWarning, match="skip_nnmodule_hook_guards = False") as record:
        with torch.no_grad(), tap.capture() as maps:
            model(x)
    # Attributed to the line that entered the capture, not to contextlib.
    assert [w.filename for w in record] == [__file__]
    torch.testing.assert_close(maps["block1"], plain.block1(plain.stem(x)))
    assert not dynamo_config.skip_nnmodule_hook_guards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guards are on: no second warning
        with torch.no_grad(), tap.capture() as maps:
            model(2 * x)
    torch.testing.assert_close(maps["block1"], plain.block1(plain.stem(2 * x)))


@pytest.mark.parametrize("style", ["wrapper", "method"])
def test_compiled_models_train_as_the_plain_ones(fresh_dynamo, style):
    plain = train_all_stages(*models())
    teacher, student = (compiled(model, style) for model in models())
    with torch.no_grad():  # both evaluated first, as users do
        teacher.eval()(batches()[0][0])
        student.eval()(batches()[0][0])
    with pytest.warns(UserWarning, match="compiled"):
        distiller = train_all_stages(teacher, student)
    trained = {
        name.replace("._orig_mod", ""): value for name, value in distiller.state_dict().items()
    }
    assert trained.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, msg=name)
    exported = distiller.export_student()
    assert type(exported) is AllCNN
    assert exported.state_dict().keys() == plain.export_student().state_dict().keys()


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_ddp_wrapper_is_dropped(process_group):
    # DDP's own reduction would fail at stage 2's second step, on the student
    # layers past the tapped one, which get no gradient there.
    teacher, student = models()
    distiller = SRMDistiller(
        DistributedDataParallel(teacher), DistributedDataParallel(student), PAIRS,
        input_shape=(1, 8, 8),
    )
    assert distiller.teacher is teacher and distiller.student is student
    before = [p.detach().clone() for p in student.parameters()]
    distiller.fit_dictionaries(batches(), epochs=1, **QUIET)
    distiller.fit_student(batches(), epochs=2, **QUIET)
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))


def test_data_parallel_is_refused_with_the_way_out():
    teacher, student = models()
    with pytest.raises(ValueError, match="student is wrapped in nn.DataParallel.*torchrun"):
        SRMDistiller(teacher, nn.DataParallel(student), PAIRS, input_shape=(1, 8, 8))


class _AddsInPlaceAfterItsBatchNorm(nn.Module):
    """ResNet's pattern: ``out = bn(conv(x)); out += identity``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x
        return self.fc(out.relu().mean((2, 3)))


@pytest.mark.parametrize("style", ["wrapper", "method"])
def test_a_compiled_map_modified_in_place_later_is_refused_as_a_plain_one(fresh_dynamo, style):
    # Maps captured while compiling carry no version counter: the dry run
    # runs the models eagerly so that the check still sees the in-place add.
    torch.manual_seed(0)
    teacher = compiled(_AddsInPlaceAfterItsBatchNorm(8), style)
    student = compiled(_AddsInPlaceAfterItsBatchNorm(4), style)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-guard note
        with pytest.raises(FeatureTapError, match="teacher module 'bn'.*modified in place"):
            SRMDistiller(teacher, student, {"bn": "conv"}, input_shape=(1, 8, 8))


@pytest.mark.parametrize("compiled_role", ["teacher", "student"])
def test_a_checkpoint_resumes_with_or_without_a_compile_wrapper(fresh_dynamo, tmp_path, compiled_role):
    # The file keys the plain models, so adding the wrapper (or dropping it)
    # between one run and its resumption changes nothing.
    path = tmp_path / "srm.pt"
    first = SRMDistiller(*models(), PAIRS, input_shape=(1, 8, 8))
    stage1 = first.fit_dictionaries(batches(), 1, checkpoint=path, **QUIET)
    teacher, student = models()
    wrapped = {"teacher": teacher, "student": student}
    wrapped[compiled_role] = torch.compile(wrapped[compiled_role], backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-guard note
        second = SRMDistiller(wrapped["teacher"], wrapped["student"], PAIRS, input_shape=(1, 8, 8))
        assert second.fit_dictionaries(batches(), 1, checkpoint=path, **QUIET) == stage1
        stage2 = second.fit_student(batches(), 1, checkpoint=path, **QUIET)
    assert not [name for name in torch.load(path, weights_only=False)["model"] if "_orig_mod" in name]
    third_teacher, third_student = models()
    third = SRMDistiller(third_teacher, third_student, PAIRS, input_shape=(1, 8, 8))
    assert third.fit_dictionaries(batches(), 1, checkpoint=path, **QUIET) == stage1
    assert third.fit_student(batches(), 1, checkpoint=path, **QUIET) == stage2
    for name, value in student.state_dict().items():
        torch.testing.assert_close(third_student.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_student_compiled_through_aot_autograd_keeps_its_head_in_stage_2(fresh_dynamo):
    # Compiled code gives the layers past the tapped map zero gradients where
    # eager autograd gives None: with weight decay they would move in stage 2.
    teacher, student = models()
    distiller = SRMDistiller(
        teacher, torch.compile(student, backend="aot_eager"), PAIRS, input_shape=(1, 8, 8)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-guard note
        distiller.fit_dictionaries(batches(), 1, **QUIET)
        before = {name: p.detach().clone() for name, p in student.named_parameters()}
        distiller.fit_student(batches(), 2, config={"weight_decay": 0.1}, **QUIET)
    moved = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    past_the_tap = {name for name in before if name.startswith(("stage3.", "head."))}
    assert past_the_tap and not moved & past_the_tap
    assert moved == set(before) - past_the_tap
