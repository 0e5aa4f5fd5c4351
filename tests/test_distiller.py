"""SRMDistiller on tiny CNNs, the shared Trainer, and the baseline losses."""

from __future__ import annotations

import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from srm_ext import SparseCodePredictor, SparseRepresentation, SRMDistiller
from srm_ext.distill import (
    DEFAULT_STAGE_CONFIGS,
    ConfigError,
    ExperimentConfig,
    Stage,
    StageConfig,
    Trainer,
)
from srm_ext.distill.hooks import FeatureTap
from srm_ext.distill.trainer import build_optimizer, build_scheduler
from srm_ext.distill.losses import (
    HintRegressor,
    attention_map,
    classification_loss,
    attention_transfer_loss,
    kd_loss,
    similarity_preserving_loss,
)
from srm_ext.distill.methods import build_plan, cross_entropy_stage
from srm_ext.distill.metrics import accuracy
from srm_ext.distill.models import AllCNN, DenseNet

QUIET = {"progress": False, "log": None}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """The runner also sets the thread count; the fixture restores it."""


def tiny_teacher() -> nn.Module:
    return DenseNet(num_classes=4, in_channels=1, growth=4, block_layers=(1, 1, 1))


def tiny_student() -> nn.Module:
    return AllCNN(num_classes=4, in_channels=1, channels=(4, 6, 6))


def toy_loader(n: int = 64, seed: int = 0) -> DataLoader:
    """Four classes told apart by which image quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return DataLoader(
        TensorDataset(images, labels),
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def make_distiller(**kwargs) -> SRMDistiller:
    torch.manual_seed(0)
    pairs = kwargs.pop("pairs", {"block1": "stage1", "block2.layer1": "stage2.1"})
    return SRMDistiller(tiny_teacher(), tiny_student(), pairs, input_shape=(1, 8, 8), **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ----------------------------------------------------------------------------- setup


def test_blocks_sized_from_teacher_channels_with_dotted_paths():
    distiller = make_distiller(codeword_multiplier=2.0, sparsity_multiplier=0.2)
    t_channels = [8 + 4, 6 + 4]  # DenseNet: stem 2g=8 (+g per layer), transition halves
    s_channels = [4, 6]
    for rep, pred, d, ds in zip(distiller.representations, distiller.predictors, t_channels, s_channels):
        assert isinstance(rep, SparseRepresentation) and isinstance(pred, SparseCodePredictor)
        assert rep.dictionary.shape == (d, int(d * 2.0))
        assert rep.sparsity == max(1, int(d * 0.2 * 2.0))
        assert pred.dictionary.shape == (ds, int(d * 2.0))


def test_missing_path_lists_closest_names():
    with pytest.raises(ValueError) as info:
        make_distiller(pairs={"blok2": "stage2"})
    message = str(info.value)
    assert "teacher has no module 'blok2'" in message and "block2" in message
    with pytest.raises(ValueError, match="student has no module 'stage4'.*stage"):
        make_distiller(pairs={"block2": "stage4"})
    # Nothing alike: the top-level modules show where the paths start.
    with pytest.raises(ValueError) as info:
        make_distiller(pairs={"block2": "features.7"})
    assert str(info.value) == (
        "student has no module 'features.7'; its top-level modules: stage1, stage2, stage3, head"
    )


def test_a_module_reached_through_an_alias_attribute_is_found_by_either_path():
    teacher = tiny_teacher()
    teacher.first_block = teacher.block1  # a convenience alias, as model zoos keep
    distiller = SRMDistiller(teacher, tiny_student(), {"first_block": "stage1"}, input_shape=(1, 8, 8))
    reference = make_distiller(pairs={"block1": "stage1"})
    assert [r.dictionary.shape for r in distiller.representations] == [
        r.dictionary.shape for r in reference.representations
    ]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_model_is_refused_by_role():
    with pytest.raises(TypeError, match="teacher is a TorchScript module, which runs no forward hooks"):
        SRMDistiller(torch.jit.script(tiny_teacher()), tiny_student(), {"block1": "stage1"})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_tapped_torchscript_submodule_is_refused_by_path():
    # Its hooks would fail in the dry run, which would blame the input.
    student = tiny_student()
    student.stage1 = torch.jit.script(student.stage1)
    with pytest.raises(TypeError, match="student module 'stage1' is a TorchScript module"):
        SRMDistiller(tiny_teacher(), student, {"block1": "stage1"}, input_shape=(1, 8, 8))


def test_the_dry_run_takes_the_batches_as_the_trainer_preprocesses_them():
    # uint8 images that only the trainer's preprocess makes floats, which the
    # blocks are sized from when no input_shape is given.
    images, labels = next(iter(toy_loader(n=16)))
    raw = [((images.clamp(-1, 2) + 1) * 80).to(torch.uint8), labels]
    seen = []

    def preprocess(batch, train):
        seen.append(train)
        return batch.float() / 80 - 1

    distiller = SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"})
    history = distiller.fit_dictionaries([raw], epochs=1, preprocess=preprocess, **QUIET)
    assert distiller.is_built and math.isfinite(history[0]["loss"])
    assert seen == [False, True]  # the dry run draws no augmentation


def test_fit_takes_one_epoch_count_for_every_stage():
    distiller = make_distiller()
    history = distiller.fit(toy_loader(16), epochs=2, kd_epochs=1, **QUIET)
    assert [len(history[key]) for key in ("dictionary", "init", "kd")] == [2, 2, 1]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_stages_train_when_called_without_autograd(mode):
    distiller = make_distiller()
    before = snapshot(distiller.student)
    with mode():
        history = distiller.fit_kd(toy_loader(16), epochs=1, **QUIET)
    assert math.isfinite(history[0]["loss"]) and changed(before, distiller.student)


def test_a_refused_layer_pair_leaves_the_distiller_unbuilt():
    # 12 teacher channels at block1 give K = 1, 10 at block2.layer1 give
    # K = 0: the error comes after the first pair has been sized.
    distiller = SRMDistiller(
        tiny_teacher(), tiny_student(), {"block1": "stage1", "block2.layer1": "stage2.1"},
        codeword_multiplier=0.09,
    )
    with pytest.raises(ValueError, match="layer pair 'block2.layer1' -> 'stage2.1'"):
        distiller.build(torch.zeros(2, 1, 8, 8))
    assert not distiller.is_built
    assert len(distiller.representations) == len(distiller.predictors) == 0


class _EmbeddingNet(nn.Module):
    """Takes (N, H, W) integer ids, as a model over tokens or cell types does."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, ids):
        features = self.conv(self.embed(ids).permute(0, 3, 1, 2))
        return self.head(features.mean(dim=(2, 3)))


def test_models_taking_integer_inputs_build_and_train():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (16, 6, 6))
    loader = DataLoader(TensorDataset(ids, torch.randint(0, 4, (16,))), batch_size=8)
    distiller = SRMDistiller(_EmbeddingNet(16), _EmbeddingNet(8), {"conv": "conv"}, example_input=ids)
    assert distiller.representations[0].dictionary.shape == (16, 32)
    history = distiller.fit_dictionaries(loader, 1, **QUIET)
    assert history and all(math.isfinite(record["loss"]) for record in history)


def test_non_4d_output_is_rejected():
    with pytest.raises(TypeError, match="4-D"):
        make_distiller(pairs={"head.4": "stage1"})  # the teacher's Linear layer


def test_k_larger_than_K_is_rejected():
    with pytest.raises(ValueError, match="only K="):
        make_distiller(sparsity_multiplier=1.5)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("codeword_multiplier", float("nan"), "codeword_multiplier must be finite and > 0, got nan"),
        ("sparsity_multiplier", 0.0, "sparsity_multiplier must be finite and > 0"),
        ("kd_temperature", 0.0, "kd_temperature must be finite and > 0"),
        ("kd_temperature", float("inf"), "kd_temperature must be finite and > 0, got inf"),
        ("kd_alpha", 1.5, r"kd_alpha must lie in \[0, 1\], got 1.5"),
        ("kd_alpha", float("nan"), "kd_alpha must lie"),
        ("local_weight", -1.0, "local_weight must be finite and >= 0, got -1.0"),
        ("global_weight", float("nan"), "global_weight must be finite and >= 0, got nan"),
    ],
)
def test_bad_hyperparameters_are_named_before_any_model_runs(setting, value, message):
    with pytest.raises(ValueError, match=message):
        SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"}, **{setting: value})


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"teacher": lambda x: x}, "teacher must be an nn.Module, got function"),
        ({"student": None}, "student must be an nn.Module, got NoneType"),
        ({"layer_pairs": None}, r"a dict or \(teacher_path, student_path\) pairs, got NoneType"),
        ({"layer_pairs": "block1:stage1"}, r"pairs, got str"),
        ({"codeword_multiplier": "2"}, "codeword_multiplier must be a float, got str"),
        ({"kd_alpha": None}, "kd_alpha must be a float, got NoneType"),
        ({"kd_temperature": "4"}, "kd_temperature must be a float, got str"),
        ({"local_weight": "2.5"}, "local_weight must be a float, got str"),
        ({"input_shape": 3}, r"input_shape must be the \(C, H, W\) of one input, got int"),
        ({"input_shape": (3, 8.0, 8)}, "input_shape must be an int, got float"),
        ({"example_input": np.zeros((2, 1, 8, 8), np.float32)}, "example_input must be a batch of inputs \\(a Tensor\\), got ndarray"),
    ],
)
def test_arguments_of_the_wrong_type_are_named(arguments, message):
    settings = {"teacher": tiny_teacher(), "student": tiny_student(), "layer_pairs": {"block1": "stage1"}}
    with pytest.raises(TypeError, match=message):
        SRMDistiller(**{**settings, **arguments})


def test_a_student_that_is_or_shares_the_teacher_is_refused():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match=r"teacher and student are the same model: training the student would change the teacher"):
        SRMDistiller(teacher, teacher, {"block1": "block2"})
    student = tiny_student()
    student.stage1 = teacher.block1  # a layer taken over from the teacher
    with pytest.raises(ValueError, match=r"teacher and student share parameters \(stage1\.layer1\.body\.0\.weight, \.\.\.\)"):
        SRMDistiller(teacher, student, {"block1": "stage2"})
    SRMDistiller(teacher, copy.deepcopy(teacher), {"block1": "block2"})  # a copy is its own model


class _ReshapedLogits(nn.Module):
    """A classifier whose output is reshaped, e.g. (N, 1, classes)."""

    def __init__(self, model: nn.Module, *shape: int) -> None:
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, x):
        return self.model(x).reshape(len(x), *self.shape)


def test_outputs_that_are_not_logits_of_the_same_classes_are_refused_before_training():
    teacher, student = tiny_teacher(), tiny_student()
    classes = teacher(torch.zeros(2, 1, 8, 8)).shape[1]
    with pytest.raises(ValueError, match=re.escape(f"the teacher maps a batch of 2 inputs to shape (2, 1, {classes}); expected logits of shape (2, classes)")):
        SRMDistiller(_ReshapedLogits(teacher, 1, classes), student, {"model.block1": "stage1"}, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=re.escape(f"the student maps a batch of 2 inputs to shape (2, {classes}, 1)")):
        SRMDistiller(teacher, _ReshapedLogits(student, classes, 1), {"block1": "model.stage1"}, input_shape=(1, 8, 8))
    # Fewer classes would broadcast in no way KD could use.
    fewer = nn.Sequential(student, nn.Linear(classes, classes - 1))
    with pytest.raises(ValueError, match=re.escape(f"the student's logits have shape (2, {classes - 1}) but the teacher's (2, {classes}); KD needs both models")):
        SRMDistiller(teacher, fewer, {"block1": "0.stage1"}, input_shape=(1, 8, 8))


def test_kd_loss_refuses_logits_that_would_broadcast():
    targets = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=re.escape("the student's logits have shape (2, 3) but the teacher's (2, 1, 3)")):
        kd_loss(torch.randn(2, 3), torch.randn(2, 1, 3), targets)
    with pytest.raises(ValueError, match=re.escape("the student's logits have shape (2, 3) but the teacher's (2, 1)")):
        kd_loss(torch.randn(2, 3), torch.randn(2, 1), targets)


def test_epoch_counts_must_be_ints():
    distiller = make_distiller()
    with pytest.raises(TypeError, match="epochs must be an int, got float"):
        distiller.fit_dictionaries(toy_loader(), epochs=1.5, **QUIET)
    with pytest.raises(TypeError, match="lr must be a float, got str"):
        StageConfig(lr="1e-3")


def test_repeated_layer_pair_is_rejected():
    with pytest.raises(ValueError, match="'block1' -> 'stage1' is given more than once"):
        make_distiller(pairs=[("block1", "stage1"), ("block2", "stage2"), ("block1", "stage1")])


def test_layer_pairs_in_the_command_line_form_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"a dict or \(teacher_path, student_path\) pairs, got the entry 'block1:stage1'"):
        make_distiller(pairs=["block1:stage1"])


def test_an_input_shape_the_models_cannot_take_is_named():
    with pytest.raises(RuntimeError, match=r"the teacher failed on a dry-run batch of shape \(2, 3, 8, 8\)"):
        SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"}, input_shape=(3, 8, 8))


def test_a_one_shot_loader_is_refused_where_its_first_batch_would_size_the_blocks():
    torch.manual_seed(0)
    batches = list(toy_loader())
    lazy = SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"})
    with pytest.raises(ValueError, match=re.escape(
        "the loader is a one-shot iterator and the SRM blocks are sized from its first batch"
    )):
        lazy.fit_dictionaries(iter(batches), epochs=1, **QUIET)
    assert not lazy.is_built
    seen = []

    def count_training_batches(x, train):
        if train:  # the dry run's batch goes through it too, in its eval form
            seen.append(x)
        return x

    lazy.fit_dictionaries(batches, epochs=1, preprocess=count_training_batches, **QUIET)
    assert len(seen) == len(batches)  # a list: sized from its first batch, trained on all
    sized = make_distiller()
    seen.clear()
    sized.fit_dictionaries(iter(batches), epochs=1, preprocess=count_training_batches,
                           **QUIET)
    assert len(seen) == len(batches)


def test_float64_models_build_and_train():
    # The dry run feeds each model its own dtype (float32 input would fail the conv).
    torch.manual_seed(0)
    teacher, student = tiny_teacher().double(), tiny_student().double()
    distiller = SRMDistiller(teacher, student, {"block1": "stage1"}, input_shape=(1, 8, 8))
    loader = DataLoader(
        TensorDataset(*(t.double() if t.is_floating_point() else t for t in toy_loader().dataset.tensors)),
        batch_size=16,
    )
    # The blocks take the models' dtype: float32 blocks would round the maps.
    blocks = [*distiller.representations.parameters(), *distiller.predictors.parameters()]
    assert {p.dtype for p in blocks} == {torch.float64}
    history = distiller.fit_dictionaries(loader, epochs=1, **QUIET)
    assert history and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    loss, _ = distiller.student_loss(next(iter(loader))[0])
    assert loss.dtype == torch.float64


class HalfScaled(nn.Module):
    """A float32 model whose first parameter is a frozen float16 scale."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float16), requires_grad=False)
        self.model = model

    def forward(self, x):
        return self.model(x * self.scale.float())


def test_a_float32_model_with_a_float16_parameter_first_takes_float32_inputs():
    torch.manual_seed(0)
    teacher, student = HalfScaled(tiny_teacher()), HalfScaled(tiny_student())
    distiller = SRMDistiller(teacher, student, {"model.block1": "model.stage1"},
                             input_shape=(1, 8, 8))
    blocks = [*distiller.representations.parameters(), *distiller.predictors.parameters()]
    assert {p.dtype for p in blocks} == {torch.float32}
    history = distiller.fit(toy_loader(16), 1, 1, 1, **QUIET)
    assert all(math.isfinite(row["loss"]) for rows in history.values() for row in rows)


def test_a_lazy_float32_model_with_a_small_float16_parameter_takes_float32_inputs():
    from srm_ext.distill.placement import module_dtype

    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2).half())
    assert module_dtype(model) == torch.float32
    assert module_dtype(nn.Sequential(nn.Linear(4, 2).half(), nn.LazyLinear(4))) == torch.float32


def test_the_models_dtype_is_looked_up_once_per_stage_not_per_batch(monkeypatch):
    # module_dtype walks every parameter: per batch it would slow each step.
    import srm_ext.distill.distiller as distiller_module
    import srm_ext.distill.metrics as metrics
    import srm_ext.distill.placement as placement

    calls = []
    lookup = placement.module_dtype

    def counted(model):
        calls.append(model)
        return lookup(model)

    for module in (placement, metrics, distiller_module):
        monkeypatch.setattr(module, "module_dtype", counted)
    counts = {}
    for n in (16, 64):  # 1 and 4 batches of 16
        distiller = make_distiller()
        loader = toy_loader(n)
        calls.clear()
        for fit in (distiller.fit_dictionaries, distiller.fit_student, distiller.fit_kd):
            fit(loader, epochs=2, eval_loader=loader, **QUIET)
        counts[n] = len(calls)
    assert counts[64] == counts[16]


def test_a_loader_of_float64_images_trains_float32_models_as_the_dry_run_feeds_them():
    # numpy arrays give float64 images: every stage and the held-out accuracy
    # take them as the dry run does, in the models' dtype, with the result of
    # a float32 loader.
    single = toy_loader()
    images, labels = single.dataset.tensors
    double = DataLoader(TensorDataset(images.double(), labels), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    results = []
    for loader in (single, double):
        distiller = make_distiller()
        history = distiller.fit(loader, 1, 1, 1, eval_loader=loader, **QUIET)
        untimed = {key: [{k: v for k, v in row.items() if k != "time"} for row in rows]
                   for key, rows in history.items()}
        results.append((untimed, snapshot(distiller)))
    (single_history, single_state), (double_history, double_state) = results
    assert double_history == single_history
    assert all(torch.equal(single_state[n], double_state[n]) for n in single_state)
    student = make_distiller().student  # also without a trainer
    assert accuracy(student, double) == accuracy(student, single)


class ExtraOutputs(nn.Module):
    """A classifier returning its logits with something else, always (``always``)
    or, like torchvision's Inception, in training mode only."""

    def __init__(self, model: nn.Module, kind: str = "tuple", always: bool = True) -> None:
        super().__init__()
        self.model, self.kind, self.always = model, kind, always

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        if not (self.always or self.training):
            return logits
        return (logits, x.mean()) if self.kind == "tuple" else {"logits": logits}


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_models_must_return_logits_before_any_stage_trains(role, kind):
    teacher, student = tiny_teacher(), tiny_student()
    t_path, s_path = "block1", "stage1"
    if role == "teacher":
        teacher, t_path = ExtraOutputs(teacher, kind), "model.block1"
    else:
        student, s_path = ExtraOutputs(student, kind), "model.stage1"
    with pytest.raises(TypeError, match=f"the {role} must return a logits tensor .*, got a {kind}"):
        SRMDistiller(teacher, student, {t_path: s_path}, input_shape=(1, 8, 8))


def test_a_student_returning_more_in_training_is_refused_before_any_stage_trains():
    student = ExtraOutputs(tiny_student(), always=False)
    with pytest.raises(TypeError, match="the student in train mode must return a logits tensor .*, got a tuple"):
        SRMDistiller(tiny_teacher(), student, {"block1": "model.stage1"}, input_shape=(1, 8, 8))
    with pytest.raises(TypeError, match="the model must return a logits tensor"):
        accuracy(ExtraOutputs(tiny_student(), "dict"), toy_loader(n=16))


def test_the_train_mode_dry_run_leaves_the_student_and_the_random_draws_as_they_were():
    # BatchNorm statistics and dropout's draws, in a compiled student half in eval mode.
    torch.manual_seed(0)
    student = nn.Sequential(tiny_student(), nn.Dropout(0.5))
    student[0].stage2.eval()
    before = snapshot(student)
    modes = [m.training for m in student.modules()]
    SRMDistiller(tiny_teacher(), torch.compile(student), {"block1": "0.stage1"}, input_shape=(1, 8, 8))
    assert not changed(before, student) and [m.training for m in student.modules()] == modes
    # The output checked is the train-mode one (dropout zeroed some logits),
    # and it draws nothing from the generator the training draws from.
    batch = torch.randn(4, 1, 8, 8)
    rng = torch.get_rng_state()
    out = FeatureTap(torch.compile(student), [], "student").train_mode_output(batch)
    assert torch.equal(torch.get_rng_state(), rng) and (out == 0).any()
    assert not changed(before, student) and [m.training for m in student.modules()] == modes


def test_the_train_mode_dry_run_takes_a_single_example_and_checks_its_classes():
    # BatchNorm1d in train mode needs two samples; the example may hold one.
    head = nn.Sequential(nn.Flatten(), nn.LazyLinear(4), nn.BatchNorm1d(4))
    student = nn.Sequential(tiny_student().stage1, nn.AdaptiveAvgPool2d(1), head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SRMDistiller(tiny_teacher(), student, {"block1": "0"}, example_input=torch.randn(1, 1, 8, 8))
    # In train mode, a student with other classes than the teacher's is refused too.
    class OtherClassesInTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = tiny_student()

        def forward(self, x):
            logits = self.model(x)
            return torch.cat([logits, logits], dim=1) if self.training else logits

    with pytest.raises(ValueError, match=re.escape("the student's logits have shape (2, 8) but the teacher's (2, 4)")):
        SRMDistiller(tiny_teacher(), OtherClassesInTraining(), {"block1": "model.stage1"},
                     input_shape=(1, 8, 8))


def test_class_probabilities_over_other_classes_are_refused_on_the_first_batch():
    distiller = make_distiller()  # four classes
    images, labels = next(iter(toy_loader(n=16)))
    loader = [(images, torch.softmax(torch.randn(16, 5), dim=1))]
    for fit in (distiller.fit_dictionaries, distiller.fit_student, distiller.fit_kd):
        with pytest.raises(ValueError, match=re.escape(
            "the loader's targets are class probabilities over 5 classes, but the models give "
            "logits over 4"
        )):
            fit(loader, epochs=1, **QUIET)
    distiller.fit_kd([(images, torch.nn.functional.one_hot(labels, 4).float())], epochs=1, **QUIET)


@pytest.mark.filterwarnings("ignore:fit_student before fit_dictionaries")
@pytest.mark.parametrize("bad", [4, -1, -100], ids=["past the last", "negative", "ignore index"])
def test_class_indices_outside_the_models_classes_are_refused_on_the_first_batch(bad):
    # On a GPU, cross-entropy would meet them as a device-side assert in stage 3.
    distiller = make_distiller()  # four classes
    images, labels = next(iter(toy_loader(n=16)))
    labels = labels.clone()
    labels[5] = bad
    before = snapshot(distiller)
    for fit in (distiller.fit_dictionaries, distiller.fit_student, distiller.fit_kd):
        with pytest.raises(ValueError, match=re.escape(
            f"the loader's targets hold class index {bad}, but the models give logits over "
            "4 classes (indices 0 to 3)"
        )):
            fit([(images, labels)], epochs=1, **QUIET)
    after = snapshot(distiller)
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="class index 4"):
        distiller.kd_loss(images, torch.full((16,), 4))


@pytest.mark.parametrize("fit", ["fit_dictionaries", "fit_kd"])
def test_class_indices_are_checked_where_no_dry_run_has_shown_the_logits(fit):
    # Blocks sized from a state dict, or none for stage 3: the teacher's
    # logits on the first batch give the classes, before it trains.
    pairs = {"block1": "stage1", "block2.layer1": "stage2.1"}
    state = make_distiller().state_dict()
    loaded = SRMDistiller(tiny_teacher(), tiny_student(), pairs)
    loaded.load_state_dict(state)
    unbuilt = SRMDistiller(tiny_teacher(), tiny_student(), pairs)
    images, labels = next(iter(toy_loader(n=16)))
    good, bad = (images[:8], labels[:8]), (images[8:], torch.full((8,), 7))
    for distiller in (loaded, unbuilt):
        if fit == "fit_dictionaries" and distiller is unbuilt:
            continue  # stage 1 builds the blocks, and the dry run shows the logits
        before = snapshot(distiller)
        with pytest.raises(ValueError, match="class index 7"):
            getattr(distiller, fit)([bad, good], epochs=1, **QUIET)
        after = snapshot(distiller)
        assert all(torch.equal(before[name], after[name]) for name in before)
    # A one-shot iterator keeps its first batch for training: stage 3 takes
    # the classes from it and checks the batches after it.
    one_shot = SRMDistiller(tiny_teacher(), tiny_student(), pairs)
    with pytest.raises(ValueError, match="class index 7"):
        one_shot.fit_kd(iter([good, bad]), epochs=1, **QUIET)


@pytest.mark.parametrize(
    "move_teacher, move_student, placement",
    [
        (lambda m: m, lambda m: m.double(), "torch.float32 teacher on cpu and a torch.float64 student on cpu"),
        (lambda m: m.double(), lambda m: m, "torch.float64 teacher on cpu and a torch.float32 student on cpu"),
        (lambda m: m, lambda m: m.to("meta"), "torch.float32 teacher on cpu and a torch.float32 student on meta"),
    ],
    ids=["float64 student", "float64 teacher", "meta student"],
)
def test_teacher_and_student_of_another_dtype_or_device_are_refused(move_teacher, move_student, placement):
    with pytest.raises(ValueError, match=f"must share a dtype and device, got a {placement};"):
        SRMDistiller(move_teacher(tiny_teacher()), move_student(tiny_student()), {"block1": "stage1"},
                     input_shape=(1, 8, 8))
    # moved after construction: refused when a stage starts
    distiller = make_distiller()
    distiller.student.double()
    with pytest.raises(ValueError, match="must share a dtype and device"):
        distiller.fit_kd(toy_loader(n=16), epochs=1, **QUIET)


def grads_of(blocks: nn.ModuleList) -> list[bool]:
    return [block.dictionary.grad is not None and bool(block.dictionary.grad.any()) for block in blocks]


def test_pairs_sharing_a_student_path_each_add_their_loss():
    # one student layer learns from two teacher layers
    distiller = make_distiller(pairs={"block1": "stage2", "block2": "stage2"})
    images = next(iter(toy_loader()))[0]
    loss, parts = distiller.student_loss(images)
    assert list(parts) == ["srm/block1->stage2", "srm/block2->stage2"]
    torch.testing.assert_close(loss, parts["srm/block1->stage2"] + parts["srm/block2->stage2"])
    loss.backward()
    assert grads_of(distiller.predictors) == [True, True]
    _, parts = distiller.dictionary_loss(images)
    assert list(parts) == ["recon/block1", "recon/block2"]  # unique paths keep their names


def test_pairs_sharing_a_teacher_path_each_add_their_loss():
    # one teacher layer supervises two student layers
    distiller = make_distiller(pairs=[("block2", "stage1"), ("block2", "stage2"), ("block3", "stage3")])
    images = next(iter(toy_loader()))[0]
    loss, parts = distiller.dictionary_loss(images)
    assert list(parts) == ["recon/block2->stage1", "recon/block2->stage2", "recon/block3"]
    torch.testing.assert_close(loss, sum(parts.values()))
    loss.backward()
    assert grads_of(distiller.representations) == [True, True, True]
    _, parts = distiller.student_loss(images)
    assert list(parts) == ["srm/stage1", "srm/stage2", "srm/stage3"]


def test_stages_train_every_block_of_pairs_sharing_paths():
    distiller = make_distiller(pairs=[("block2", "stage2"), ("block2", "stage3"), ("block3", "stage3")])
    dicts_before = [snapshot(block) for block in distiller.representations]
    preds_before = [snapshot(block) for block in distiller.predictors]
    history = distiller.fit_dictionaries(toy_loader(n=32), epochs=1, **QUIET)
    assert {"recon/block2->stage2", "recon/block2->stage3", "recon/block3"} <= set(history[0])
    history = distiller.fit_student(toy_loader(n=32), epochs=1, **QUIET)
    assert {"srm/stage2", "srm/block2->stage3", "srm/block3->stage3"} <= set(history[0])
    assert all(map(changed, dicts_before, distiller.representations))
    assert all(map(changed, preds_before, distiller.predictors))


def test_stage2_warns_when_the_dictionaries_were_never_fitted_or_loaded():
    distiller = make_distiller()
    with pytest.warns(UserWarning, match="fit_student before fit_dictionaries"):
        distiller.fit_student(toy_loader(n=16), epochs=1, **QUIET)
    distiller.fit_dictionaries(toy_loader(n=16), epochs=1, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.fit_student(toy_loader(n=16), epochs=1, **QUIET)
        # fitted dictionaries loaded into a new distiller count as fitted
        fresh = make_distiller()
        fresh.load_state_dict(distiller.state_dict())
        fresh.fit_student(toy_loader(n=16), epochs=1, **QUIET)


@pytest.mark.parametrize(
    "loader, error, message",
    [
        ([{"x": torch.zeros(4, 1, 8, 8), "y": torch.zeros(4, dtype=torch.long)}], TypeError,
         r"pair \(images, targets\) of tensors, got a dict"),
        ([(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4))], TypeError,
         r"pair \(images, targets\) of tensors, got a tuple of 3"),
        ([], ValueError, "the loader yielded no batches"),
    ],
    ids=["dict", "triple", "empty"],
)
def test_lazy_build_checks_the_first_batch(loader, error, message):
    distiller = SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"})
    with pytest.raises(error, match=message):
        distiller.fit_dictionaries(loader, epochs=1, **QUIET)


def test_an_empty_loader_is_an_error_not_an_epoch():
    with pytest.raises(ValueError, match="stage 'srm-dictionary': the loader yielded no batches"):
        make_distiller().fit_dictionaries([], epochs=1, **QUIET)


def test_lazy_build_from_first_batch():
    torch.manual_seed(0)
    distiller = SRMDistiller(tiny_teacher(), tiny_student(), {"block3": "stage3"})
    assert not distiller.is_built
    distiller.fit_dictionaries(toy_loader(), epochs=1, **QUIET)
    assert distiller.is_built and len(distiller.representations) == 1


def test_a_saved_distiller_loads_into_one_that_builds_lazily():
    # No input_shape, so no blocks yet: the saved dictionaries size them.
    saved = make_distiller()
    saved.fit_dictionaries(toy_loader(n=16), epochs=1, **QUIET)
    state = saved.state_dict()
    lazy = SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1", "block2.layer1": "stage2.1"})
    lazy.load_state_dict(state)
    assert lazy.is_built
    for name, value in lazy.state_dict().items():
        assert torch.equal(value, state[name]), name
    for rep, saved_rep in zip(lazy.representations, saved.representations):
        assert rep.sparsity == saved_rep.sparsity
        assert rep.dictionary.stride() == saved_rep.dictionary.stride()  # codeword-major
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded dictionaries count as fitted
        lazy.fit_student(toy_loader(n=16), epochs=1, **QUIET)


def _stage2_student_parameters(distiller: SRMDistiller) -> set[str]:
    trained = {id(p) for p in distiller.student_stage(StageConfig()).parameters}
    return {name for name, p in distiller.student.named_parameters() if id(p) in trained}


def test_stage2_trains_the_student_up_to_its_tapped_maps_only():
    # The layers past them get no gradient from the stage-2 loss: left out of
    # the optimiser, which would otherwise move them by weight decay alone
    # where compiled code fills their gradients with zeros.
    distiller = make_distiller(pairs={"block1": "stage1", "block2.layer1": "stage2.1"})
    names = [name for name, _ in distiller.student.named_parameters()]
    up_to_the_taps = {n for n in names if n.startswith(("stage1.", "stage2.0.", "stage2.1."))}
    assert _stage2_student_parameters(distiller) == up_to_the_taps
    # A distiller sized from a state dict finds them on its first batch.
    lazy = SRMDistiller(tiny_teacher(), tiny_student(), distiller.layer_pairs)
    lazy.load_state_dict(distiller.state_dict())
    assert _stage2_student_parameters(lazy) == set(names)  # not known yet: all of them
    passes = []

    class CountedPasses(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    lazy.fit_student(CountedPasses(toy_loader(n=16)), epochs=1, **QUIET)
    assert _stage2_student_parameters(lazy) == up_to_the_taps
    # One dry run shows the trained layers and the class count, then one epoch.
    assert len(passes) == 2


def test_a_distiller_built_on_the_meta_device_trains_once_materialised():
    # Deferred initialisation: build on meta, then to_empty and load weights.
    torch.manual_seed(0)
    teacher, student = tiny_teacher(), tiny_student()
    with torch.device("meta"):
        meta = SRMDistiller(
            tiny_teacher(), tiny_student(), {"block1": "stage1"}, input_shape=(1, 8, 8)
        )
    assert meta.is_built and meta.representations[0].dictionary.is_meta
    fitted = SRMDistiller(teacher, student, {"block1": "stage1"}, input_shape=(1, 8, 8))
    fitted.fit_dictionaries(toy_loader(n=16), epochs=1, **QUIET)
    meta.to_empty(device="cpu")
    meta.load_state_dict(fitted.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded dictionaries count as fitted
        history = meta.fit_student(toy_loader(n=16), epochs=1, **QUIET)
    assert math.isfinite(history[0]["loss"])


def test_a_distiller_built_on_the_meta_device_warns_of_dictionaries_neither_fitted_nor_loaded():
    # No initial values to compare with on meta: materialised and initialised
    # afresh, its dictionaries are untrained until stage 1 runs.
    def materialised():
        with torch.device("meta"):
            distiller = SRMDistiller(
                tiny_teacher(), tiny_student(), {"block1": "stage1"}, input_shape=(1, 8, 8)
            )
        distiller.to_empty(device="cpu")
        for module in distiller.modules():
            if hasattr(module, "reset_parameters"):  # the layers, BatchNorm's statistics and the blocks
                module.reset_parameters()
        return distiller

    with pytest.warns(UserWarning, match="fit_student before fit_dictionaries"):
        materialised().fit_student(toy_loader(n=16), epochs=1, **QUIET)
    distiller = materialised()
    distiller.fit_dictionaries(toy_loader(n=16), epochs=1, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller.fit_student(toy_loader(n=16), epochs=1, **QUIET)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_integer_labels_of_any_dtype_train_every_stage(dtype):
    images, labels = toy_loader(n=16).dataset.tensors
    int64 = DataLoader(TensorDataset(images, labels), batch_size=8)
    other = DataLoader(TensorDataset(images, labels.to(dtype)), batch_size=8)
    expected = make_distiller().fit(int64, 1, 1, 1, eval_loader=int64, **QUIET)["kd"]
    history = make_distiller().fit(other, 1, 1, 1, eval_loader=other, **QUIET)["kd"]
    for metric in ("loss", "test_acc"):
        assert history[0][metric] == expected[0][metric]


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.zeros(16, 1, dtype=torch.long), r"got a torch.int64 tensor of shape \(8, 1\); flatten"),
        (torch.zeros(16), r"class indices of shape \(8,\) \(an integer tensor\).*torch.float32"),
        (torch.zeros(16, dtype=torch.bool), "got a torch.bool tensor"),
        (torch.zeros(16, 2, 2, dtype=torch.long), r"shape \(8, 2, 2\)"),
    ],
    ids=["column", "float indices", "bool", "3-d"],
)
def test_targets_the_losses_cannot_take_are_refused_on_the_first_batch_of_stage_1(labels, message):
    images = toy_loader(n=16).dataset.tensors[0]
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    distiller = make_distiller()
    with pytest.raises(ValueError, match="the loader's targets must be " + ".*" + message):
        distiller.fit_dictionaries(loader, epochs=1, **QUIET)


class _AlwaysClassZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 2)


@pytest.mark.parametrize("batched_by", ["sampler", "batch_sampler"])
def test_accuracy_over_distributed_sampler_shards_counts_each_sample_once(batched_by):
    # 10 samples over 3 shards: DistributedSampler pads shards 1 and 2 with
    # samples 0 and 1. Only sample 0 is of class 0, which the model predicts.
    data = TensorDataset(torch.zeros(10, 1), torch.tensor([0] + [1] * 9))
    counts = []
    for rank in range(3):
        sampler = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        loader = (
            DataLoader(data, batch_size=2, sampler=sampler)
            if batched_by == "sampler"
            else DataLoader(data, batch_sampler=BatchSampler(sampler, 2, drop_last=False))
        )
        total = len(range(rank, 10, 3))
        counts.append((round(accuracy(_AlwaysClassZero(), loader) * total), total))
    # Shard 1 is 1, 4, 7 and then sample 0 again, which counted as a hit before.
    assert counts == [(1, 4), (0, 3), (0, 3)]
    assert sum(c for c, _ in counts) / sum(t for _, t in counts) == 0.1


def test_accuracy_counts_every_sample_of_a_sampler_whose_order_it_does_not_know():
    # A subclass may shard otherwise: its last samples need not be the padding.
    class Contiguous(DistributedSampler):
        def __iter__(self):
            per = self.num_samples
            return iter(([*range(len(self.dataset))] * 2)[self.rank * per: (self.rank + 1) * per])

    data = TensorDataset(torch.zeros(10, 1), torch.tensor([1] * 7 + [0] + [1] * 2))
    loader = DataLoader(data, batch_size=2, sampler=Contiguous(data, num_replicas=3, rank=1))
    assert accuracy(_AlwaysClassZero(), loader) == 0.25  # samples 4..7, of which 7 is a hit


def test_class_probabilities_train_kd_and_accuracy_refuses_them():
    images, labels = toy_loader(n=16).dataset.tensors
    soft = DataLoader(TensorDataset(images, F.one_hot(labels, 4).float()), batch_size=8)
    hard = DataLoader(TensorDataset(images, labels), batch_size=8)
    config = StageConfig(epochs=1, schedule="none")
    from_soft = make_distiller().fit_kd(soft, config=config, **QUIET)
    from_hard = make_distiller().fit_kd(hard, config=config, **QUIET)
    assert from_soft[0]["loss"] == pytest.approx(from_hard[0]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="accuracy needs class indices"):
        accuracy(tiny_student(), soft)
    # A column of labels would broadcast against the predictions.
    with pytest.raises(ValueError, match=r"shape \(8, 1\)"):
        accuracy(tiny_student(), DataLoader(TensorDataset(images, labels[:, None]), batch_size=8))
    # As a stage's held-out loader, before the stage trains.
    distiller = make_distiller()
    before = snapshot(distiller.student)
    with pytest.raises(ValueError, match="accuracy needs class indices"):
        distiller.fit_kd(hard, epochs=1, eval_loader=soft, **QUIET)
    assert not changed(before, distiller.student)


# ----------------------------------------------------------------------------- stages


def test_stage1_trains_only_dictionaries_and_reduces_the_loss():
    distiller = make_distiller()
    teacher_before, student_before = snapshot(distiller.teacher), snapshot(distiller.student)
    dicts_before = snapshot(distiller.representations)
    history = distiller.fit_dictionaries(
        toy_loader(), config=StageConfig(epochs=6, lr=1e-2, schedule="none"), **QUIET
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert not changed(teacher_before, distiller.teacher)  # frozen, BN stats included
    assert not changed(student_before, distiller.student)
    assert changed(dicts_before, distiller.representations)
    assert {"recon/block1", "recon/block2.layer1"} <= set(history[0])


def test_stage2_trains_student_and_predictors_and_reduces_the_loss():
    distiller = make_distiller()
    distiller.fit_dictionaries(toy_loader(), epochs=1, **QUIET)
    teacher_before, dicts_before = snapshot(distiller.teacher), snapshot(distiller.representations)
    student_before, preds_before = snapshot(distiller.student), snapshot(distiller.predictors)
    history = distiller.fit_student(
        toy_loader(), config=StageConfig(epochs=5, lr=1e-2, schedule="none"), **QUIET
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert not changed(teacher_before, distiller.teacher)
    assert not changed(dicts_before, distiller.representations)
    assert changed(student_before, distiller.student) and changed(preds_before, distiller.predictors)


@pytest.mark.parametrize("reentrant", [False, True])
def test_stage2_warns_once_when_a_student_map_carries_no_gradient(reentrant):
    # A reentrant checkpoint runs its segment without autograd: the student
    # would not train, while the predictors' loss still falls.
    torch.manual_seed(0)
    student = tiny_student()
    student.stage1 = _Checkpointed(student.stage1, reentrant)
    distiller = SRMDistiller(tiny_teacher(), student, {"block1": "stage1.inner"}, input_shape=(1, 8, 8))
    distiller.fit_dictionaries(toy_loader(), epochs=1, **QUIET)
    before = [p.detach().clone() for p in distiller.student.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        distiller.fit_student(toy_loader(), epochs=2, **QUIET)
    mine = [w for w in caught if "carries no gradient" in str(w.message)]
    assert len(mine) == (1 if reentrant else 0)
    trained = any(not torch.equal(a, p) for a, p in zip(before, distiller.student.parameters()))
    assert trained != reentrant


def test_a_student_with_a_reentrant_checkpoint_past_its_first_layer_trains_in_stage2():
    # Its segment's input carries a gradient, so the checkpoint passes it on;
    # but it refuses the torch.autograd.grad of the search for parameters off
    # the maps, which then takes every parameter to be on them.
    def distiller(reentrant):
        torch.manual_seed(0)
        student = tiny_student()
        if reentrant:
            student.stage2 = _Checkpointed(student.stage2, True)
        pairs = {"block1": "stage1", "block2": "stage2.inner" if reentrant else "stage2"}
        with warnings.catch_warnings():
            # Nor torch's that the dry runs (without gradient) give the checkpoint no
            # input that requires grad.
            warnings.simplefilter("error")
            made = SRMDistiller(tiny_teacher(), student, pairs, input_shape=(1, 8, 8))
        made.fit_dictionaries(toy_loader(), epochs=1, **QUIET)
        return made

    plain, checkpointed = distiller(False), distiller(True)
    before = snapshot(checkpointed.student)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every map carries a gradient: no warning
        for made in (plain, checkpointed):
            made.fit_student(toy_loader(), epochs=2, **QUIET)
    assert changed(before, checkpointed.student)
    # The same weights as without the checkpoint (its recomputation updates
    # BatchNorm's running statistics a second time, so not those).
    weights = dict(checkpointed.student.named_parameters())
    for name, weight in plain.student.named_parameters():
        torch.testing.assert_close(weights[name.replace("stage2.", "stage2.inner.")], weight)


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


def test_stage3_kd_reduces_the_loss_and_reports_accuracy():
    distiller = make_distiller()
    loader = toy_loader()
    history = distiller.fit_kd(
        loader, config=StageConfig(epochs=5, lr=1e-2, schedule="none"), eval_loader=loader, **QUIET
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= history[-1]["test_acc"] <= 1.0


def test_fit_runs_all_stages_with_different_grids():
    # teacher block1 (8x8) taught to student stage2 (4x4): labels are resized
    distiller = make_distiller(pairs={"block1": "stage2", "block3": "stage3"})
    out = distiller.fit(toy_loader(), 1, 1, 1, **QUIET)
    assert set(out) == {"dictionary", "init", "kd"}
    assert all(len(history) == 1 for history in out.values())


def test_bf16_autocast_stages_run():
    distiller = make_distiller()
    out = distiller.fit(toy_loader(), 1, 1, 1, amp="bf16", **QUIET)
    assert all(torch.isfinite(torch.tensor(h[-1]["loss"])) for h in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_stages_run_on_cuda(amp):
    torch.manual_seed(0)
    pairs = {"block1": "stage1", "block2.layer1": "stage2.1"}
    distiller = SRMDistiller(
        tiny_teacher().cuda(), tiny_student().cuda(), pairs, input_shape=(1, 8, 8)
    )
    blocks = [*distiller.representations.parameters(), *distiller.predictors.parameters()]
    assert all(p.is_cuda for p in blocks)
    before = snapshot(distiller.representations)
    out = distiller.fit(toy_loader(), 1, 1, 1, amp=amp, **QUIET)
    assert all(torch.isfinite(torch.tensor(h[-1]["loss"])) for h in out.values())
    assert changed(before, distiller.representations)
    assert all(torch.isfinite(p).all() for p in blocks)


def test_export_student_has_no_srm_blocks_or_hooks():
    distiller = make_distiller()
    distiller.fit(toy_loader(), 1, 1, 1, **QUIET)
    student = distiller.export_student()
    assert type(student) is AllCNN and not student.training
    assert not any(isinstance(m, (SparseRepresentation, SparseCodePredictor)) for m in student.modules())
    assert all(not m._forward_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in distiller.student.modules())
    assert student.state_dict().keys() == tiny_student().state_dict().keys()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(student(x), distiller.student.eval()(x))


@pytest.mark.parametrize("method", ["fit_dictionaries", "fit_student", "fit_kd", "fit"])
def test_trainer_keywords_next_to_a_trainer_are_rejected(method):
    torch.manual_seed(0)
    distiller = SRMDistiller(tiny_teacher(), tiny_student(), {"block1": "stage1"})
    student_before = snapshot(distiller.student)
    with pytest.raises(TypeError, match=r"trainer=.*\(amp, device\)"):
        getattr(distiller, method)(
            toy_loader(), 1, trainer=Trainer(**QUIET), amp="bf16", device="cpu"
        )
    assert not distiller.is_built and not changed(student_before, distiller.student)


def test_trainer_keywords_accumulate_the_stage_steps():
    # Stage 1 on batches of 8, two a step, takes the steps of batches of 16:
    # the teacher is frozen in eval mode, so its BatchNorm sees no batch.
    data = toy_loader().dataset
    small, large = make_distiller(), make_distiller()
    small.fit_dictionaries(DataLoader(data, batch_size=8), 2, accumulate_steps=2, **QUIET)
    large.fit_dictionaries(DataLoader(data, batch_size=16), 2, **QUIET)
    assert changed(snapshot(make_distiller().representations), small.representations)
    for key, value in large.representations.state_dict().items():
        torch.testing.assert_close(small.representations.state_dict()[key], value, msg=key)


# ----------------------------------------------------------------------------- trainer


def test_trainer_resume_matches_uninterrupted_training():
    # one run of 2 epochs vs two calls of 1 epoch each, resuming optimiser state
    torch.manual_seed(0)
    straight_model = tiny_student()
    config = StageConfig(epochs=2, lr=1e-2, schedule="none")
    states: list[dict] = []
    torch.manual_seed(1)
    Trainer(**QUIET).fit(
        cross_entropy_stage("ce", straight_model, config),
        toy_loader(),
        on_epoch_end=lambda m, s: states.append(s),
    )
    assert [s["epoch"] for s in states] == [1, 2]
    assert states[0]["optimizer"]["state"]  # Adam moments are saved

    torch.manual_seed(0)
    resumed_model = tiny_student()
    torch.manual_seed(1)
    first: list[dict] = []
    loader = toy_loader()
    Trainer(**QUIET).fit(
        cross_entropy_stage("ce", resumed_model, config.replace(epochs=1)),
        loader,
        on_epoch_end=lambda m, s: first.append(s),
    )
    Trainer(**QUIET).fit(
        cross_entropy_stage("ce", resumed_model, config), loader, resume=first[-1]
    )
    for key, value in straight_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)


def test_trainer_without_a_device_sends_batches_where_the_model_lives():
    # A model on another device (meta stands in for a GPU here) pulls the
    # batches there; an explicit device is kept.
    trainer, pinned = Trainer(**QUIET), Trainer("cpu", **QUIET)
    for t in (trainer, pinned):
        t.follow(nn.Linear(2, 2, device="meta").parameters())
    images, _ = trainer.to_device(torch.zeros(1, 2), torch.zeros(1), train=False)
    assert images.device.type == "meta" and pinned.device.type == "cpu"


def test_loader_batches_other_than_image_target_pairs_are_a_clear_error():
    stage = cross_entropy_stage("ce", tiny_student(), StageConfig(epochs=1))
    triples = DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.zeros(4)))
    with pytest.raises(TypeError, match=r"pair \(images, targets\) of tensors, got a list of 3"):
        Trainer(**QUIET).fit(stage, triples)


def test_a_distributed_sampler_inside_a_batch_sampler_gets_each_epoch():
    # Batches formed by a custom batch sampler over a DistributedSampler: that
    # sampler must hear set_epoch too, or every epoch repeats the first's order.
    data = TensorDataset(torch.arange(16.0).view(16, 1), torch.zeros(16, dtype=torch.long))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, seed=0)
    loader = DataLoader(data, batch_sampler=BatchSampler(sampler, 4, drop_last=False))
    weight = nn.Parameter(torch.zeros(1))
    seen: list[float] = []

    def objective(images, _targets):
        seen.extend(images.view(-1).tolist())
        return (weight * images).sum()

    Trainer(**QUIET).fit(Stage("order", objective, [weight], [], StageConfig(epochs=2)), loader)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [float(i) for i in sampler]
    assert seen == expected and seen[:16] != seen[16:]


def test_trainer_rejects_empty_parameter_list():
    stage = cross_entropy_stage("ce", nn.Sequential(nn.Flatten()), StageConfig(epochs=1))
    with pytest.raises(ValueError, match="no parameters"):
        Trainer(**QUIET).fit(stage, toy_loader())


# ----------------------------------------------------------------------------- baselines


def test_the_fitnet_hint_stage_trains_the_student_up_to_its_guided_layers():
    student = tiny_student()
    plan = build_plan(
        "fitnet", tiny_teacher(), student, [("block1", "stage1")], torch.zeros(2, 1, 8, 8),
        ExperimentConfig(),
    )
    hint = plan.stages[0]
    assert hint.name == "fitnet-hint"
    trained = {id(p) for p in hint.parameters}
    assert {n for n, p in student.named_parameters() if id(p) in trained} == {
        n for n, _ in student.named_parameters() if n.startswith("stage1.")
    }
    assert all(id(p) in trained for p in plan.modules["regressors"].parameters())


@pytest.mark.parametrize("image_size", [8, 32])
@pytest.mark.parametrize("at_weight", [None, 5.0])
def test_the_at_baseline_weighs_its_loss_as_the_paper_at_every_input_size(image_size, at_weight):
    """The AT authors (and the SRM authors' baselines) use beta = 1000 for 32x32
    and 224x224 inputs alike; ``at_weight`` replaces it."""
    teacher, student = tiny_teacher(), tiny_student()
    images = torch.randn(4, 1, image_size, image_size)
    plan = build_plan("at", teacher, student, [("block1", "stage1")], images[:2],
                      ExperimentConfig(at_weight=at_weight))
    loss, parts = plan.stages[0].objective(images, torch.tensor([0, 1, 2, 3]))
    weight = 1000.0 if at_weight is None else at_weight
    assert parts["at"] > 0
    torch.testing.assert_close(loss, parts["ce"] + weight * parts["at"])


def test_no_class_index_is_ignored_by_the_hard_label_losses():
    # cross_entropy's default ignore_index would drop a -100 silently.
    logits = torch.randn(2, 3)
    for targets in (torch.tensor([-100, 1]), torch.tensor([3, 1])):
        with pytest.raises(IndexError, match="out of bounds"):
            kd_loss(logits, logits, targets, 4.0, 0.5)
        with pytest.raises(IndexError, match="out of bounds"):
            classification_loss(logits, targets)


def test_kd_loss_matches_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    T, alpha = 3.0, 0.7
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(dim=1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, T, alpha), expected)


def test_feature_losses_vanish_on_identical_maps_and_have_gradients():
    torch.manual_seed(0)
    f = torch.randn(4, 6, 5, 5)
    assert similarity_preserving_loss(f, f).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_transfer_loss(f, f).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.randn(4, 3, 10, 10, requires_grad=True)  # other width and grid
    (similarity_preserving_loss(s, f) + attention_transfer_loss(s, f)).backward()
    assert s.grad is not None
    hint = HintRegressor(3, 6)
    hint(s, f).backward()
    assert hint.proj.weight.grad is not None


def test_similarity_preserving_loss_closed_form():
    # Student rows orthonormal: normalised Gram I. Teacher rows equal: every
    # Gram row (3, 3, 3, 3), normalised to 0.5 each. Each of the 16 entries
    # differs by 0.5, so the loss is 16 * 0.25 / 4**2.
    s = torch.zeros(4, 4, 1, 1)
    s[range(4), range(4)] = 1.0
    t = torch.ones(4, 3, 1, 1)
    assert similarity_preserving_loss(s, t).item() == pytest.approx(0.25, rel=1e-6)
    # scaling a map leaves its normalised Gram matrix unchanged
    assert similarity_preserving_loss(3.0 * s, t).item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_preserving_loss_keeps_float32_under_autocast(dtype):
    """CIFAR block-1 maps (128x16x16, after a ReLU): Gram entries pass float16's
    largest value, and bfloat16 rounding would swamp a small difference."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 128, 16, 16, generator=g).relu()
    student = teacher + 0.02 * torch.randn(teacher.shape, generator=g)
    want = similarity_preserving_loss(student, teacher)
    with torch.autocast("cpu", dtype=dtype):
        got = similarity_preserving_loss(student, teacher)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_attention_transfer_loss_closed_form():
    # Attention maps mean_c |A_c|^2 peak at one pixel each, (0, 0) vs (0, 1):
    # normalised they are unit vectors e_0 and e_1, whose squared difference
    # (two entries of 1) is averaged over the 25 pixels.
    a, b = torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 5, 5)
    a[:, :, 0, 0] = 1.0
    b[:, :, 0, 1] = 2.0
    assert attention_transfer_loss(a, b).item() == pytest.approx(2 / 25, rel=1e-6)
    # the sign of the activations does not matter (|A|^2)
    assert attention_transfer_loss(-a, b).item() == pytest.approx(2 / 25, rel=1e-6)
    assert attention_transfer_loss(a, 2.0 * a).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("student_grid, teacher_grid", [((2, 2), (4, 4)), ((4, 4), (2, 2)), ((2, 4), (4, 2))])
def test_attention_transfer_pools_the_larger_map_down_to_the_smaller_grid(student_grid, teacher_grid):
    # As the authors' AT baseline does: the finer map is average-pooled, the
    # coarser one is never upsampled.
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, *student_grid), torch.randn(2, 5, *teacher_grid)
    grid = tuple(min(s, t) for s, t in zip(student_grid, teacher_grid))
    expected = (
        attention_map(F.adaptive_avg_pool2d(student, grid))
        - attention_map(F.adaptive_avg_pool2d(teacher, grid))
    ).pow(2).mean()
    torch.testing.assert_close(attention_transfer_loss(student, teacher), expected)


def test_attention_map_takes_absolute_values_for_any_power():
    # Channel 0 holds (-2, 1) over the two pixels, channel 1 holds (1, -1).
    features = torch.tensor([[-2.0, 1.0], [1.0, -1.0]]).reshape(1, 2, 1, 2)  # (N, C, H, W)
    for p in (1, 2, 3):
        want = torch.tensor([[(2.0**p + 1.0) / 2, 1.0]])  # mean_c |A_c|^p per pixel
        want = torch.nn.functional.normalize(want, dim=1)
        torch.testing.assert_close(attention_map(features, p=p), want)


def test_hint_loss_is_the_mse_of_the_regressed_student_map():
    torch.manual_seed(0)
    s, f = torch.randn(4, 3, 5, 5), torch.randn(4, 6, 5, 5)
    hint = HintRegressor(3, 6)
    with torch.no_grad():
        hint.proj.weight.zero_()  # regressed map 0 (BatchNorm of zeros is its bias, 0)
    assert hint(s, f).item() == pytest.approx(f.pow(2).mean().item(), rel=1e-6)
    hint = HintRegressor(3, 6).eval()  # BatchNorm with its initial running stats: ~identity
    scale = (1 + hint.bn.eps) ** -0.5
    expected = F.mse_loss(scale * F.conv2d(s, hint.proj.weight), f)
    torch.testing.assert_close(hint(s, f), expected)
    # a finer student grid is resized to the teacher's (bilinear)
    fine = torch.randn(4, 3, 10, 10)
    hinted = F.interpolate(scale * F.conv2d(fine, hint.proj.weight), size=(5, 5), mode="bilinear")
    torch.testing.assert_close(hint(fine, f), F.mse_loss(hinted, f))


# ----------------------------------------------------------------------------- optimisers


def lrs_per_epoch(config: StageConfig) -> list[float]:
    """The lr each epoch trains with (the trainer steps the scheduler after an epoch)."""
    optimizer = build_optimizer([nn.Parameter(torch.zeros(1))], config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(config.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_default_stage_is_adam_with_the_papers_step_schedule():
    # Adam, lr 1e-3, weight decay 1e-4; lr / 10 after round(0.15 * epochs) and
    # round(0.65 * epochs) epochs: 3 and 13 of 20.
    config = StageConfig(epochs=20)
    optimizer = build_optimizer([nn.Parameter(torch.zeros(1))], config)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-4
    want = [1e-3] * 3 + [1e-4] * 10 + [1e-5] * 7
    assert lrs_per_epoch(config) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "stage, epochs, phases, weight_decay",
    [("dictionary", 100, (10, 60, 30), 0.0), ("init", 160, (30, 100, 30), 1e-4),
     ("kd", 200, (30, 100, 70), 1e-4)],
)
def test_the_distillers_stage_defaults_follow_the_authors_phases(stage, epochs, phases, weight_decay):
    # The SRM authors' CIFAR runs: Adam at 1e-3, 1e-4 and 1e-5 for these
    # epoch counts per stage; the defaults give the same split at any length.
    config = DEFAULT_STAGE_CONFIGS[stage].replace(epochs=epochs)
    want = [1e-3] * phases[0] + [1e-4] * phases[1] + [1e-5] * phases[2]
    assert lrs_per_epoch(config) == pytest.approx(want, rel=1e-9)
    assert config.optimizer == "adam" and config.weight_decay == weight_decay


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", 0.0, "lr must be > 0"),
        ("lr", float("nan"), "lr must be > 0, got nan"),
        ("weight_decay", -1e-4, "weight decay must be >= 0"),
        ("weight_decay", float("nan"), "weight decay must be >= 0, got nan"),
        ("gamma", float("nan"), "gamma must be > 0, got nan"),
        ("momentum", 1.0, r"momentum must lie in \[0, 1\)"),
        ("momentum", float("nan"), "momentum must lie"),
        ("lr", float("inf"), "lr must be finite, got inf"),
        ("weight_decay", float("inf"), "weight decay must be finite, got inf"),
        ("gamma", float("inf"), "gamma must be finite, got inf"),
        ("epochs", -1, "epochs must be >= 0"),
        ("milestones", (0.5, 0.0), r"milestones are fractions of the epochs in \(0, 1\]"),
    ],
)
def test_stage_config_refuses_bad_values_by_name(field, value, message):
    # NaN passes a `<= 0` test, and an optimiser built from it trains on NaN.
    with pytest.raises(ConfigError, match=message):
        StageConfig(**{field: value})


def test_changing_a_stage_config_leaves_the_defaults_as_they_were():
    defaults = {key: copy.deepcopy(config) for key, config in DEFAULT_STAGE_CONFIGS.items()}
    for stage in make_distiller().stages():
        stage.config.lr, stage.config.epochs = 0.5, 1
    assert DEFAULT_STAGE_CONFIGS == defaults
    assert [stage.config for stage in make_distiller().stages()] == list(defaults.values())


def test_a_stage_setting_passed_as_a_trainer_argument_names_config():
    with pytest.raises(TypeError, match=re.escape(
        "lr is a stage setting, not a Trainer argument: pass config={'lr': 0.1}"
    )):
        make_distiller().fit_dictionaries(toy_loader(), 1, lr=0.1, **QUIET)
    with pytest.raises(TypeError, match=re.escape(
        "lr, optimizer are stage settings, not a Trainer argument: pass "
        "config={'lr': 0.1, 'optimizer': 'sgd'}"
    )):
        make_distiller().fit_kd(toy_loader(), 1, optimizer="sgd", lr=0.1, **QUIET)


def test_the_objectives_run_the_teacher_in_eval_mode_and_restore_its_modes():
    """Called on their own, outside fit_*, as the stages run them: the teacher's
    BatchNorm statistics stay as they are, and each module keeps its mode."""
    distiller = make_distiller()
    teacher = distiller.teacher
    teacher.train()
    frozen = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)][0]
    frozen.eval()  # one module of the user's own choosing stays in eval
    modes = [m.training for m in teacher.modules()]
    buffers = snapshot(teacher)
    images, targets = next(iter(toy_loader()))
    images = 3.0 * images + 1.0  # statistics unlike the running ones
    losses = [
        distiller.dictionary_loss(images)[0],
        distiller.teacher_labels(images)[0][1],
        distiller.kd_loss(images, targets),
    ]
    assert not changed(buffers, teacher)
    assert [m.training for m in teacher.modules()] == modes
    teacher.eval()
    torch.testing.assert_close(losses[0], distiller.dictionary_loss(images)[0])
    torch.testing.assert_close(losses[1], distiller.teacher_labels(images)[0][1])


def test_the_dry_run_and_accuracy_restore_each_modules_own_mode():
    # A model in training with a frozen part in eval keeps that part in eval.
    teacher, student = tiny_teacher(), tiny_student()
    for model in (teacher, student):
        model.train()
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    modes = {model: [m.training for m in model.modules()] for model in (teacher, student)}
    SRMDistiller(teacher, student, {"block1": "stage1"}, input_shape=(1, 8, 8))
    accuracy(student, toy_loader(n=16))
    for model, before in modes.items():
        assert [m.training for m in model.modules()] == before


class RecordingTrainer(Trainer):
    """Records the stages it is given instead of training them."""

    def __init__(self) -> None:
        super().__init__(**QUIET)
        self.stages: list[Stage] = []

    def fit(self, stage, loader, **kwargs):
        self.stages.append(stage)
        return []


def test_a_mapping_changes_only_the_settings_it_names():
    distiller, trainer = make_distiller(), RecordingTrainer()
    distiller.fit_dictionaries(toy_loader(), config={"lr": 3e-4}, trainer=trainer)
    distiller.fit_kd(toy_loader(), epochs=2, config={"schedule": "cosine"}, trainer=trainer)
    dictionary, kd = (stage.config for stage in trainer.stages)
    # A StageConfig(lr=3e-4) would also have reset the epochs to 1 and put
    # weight decay on the dictionaries.
    assert dictionary == DEFAULT_STAGE_CONFIGS["dictionary"].replace(lr=3e-4)
    assert dictionary.epochs == 10 and dictionary.weight_decay == 0.0
    assert kd == DEFAULT_STAGE_CONFIGS["kd"].replace(epochs=2, schedule="cosine")
    stages = distiller.stages({"init": {"optimizer": "sgd"}, "kd": StageConfig(epochs=3)})
    assert [stage.config for stage in stages] == [
        DEFAULT_STAGE_CONFIGS["dictionary"],
        DEFAULT_STAGE_CONFIGS["init"].replace(optimizer="sgd"),
        StageConfig(epochs=3),
    ]


def test_unknown_stages_and_settings_are_named():
    distiller = make_distiller()
    unknown_setting = r"unknown stage setting\(s\) 'learning_rate'; a stage has epochs, optimizer, lr"
    with pytest.raises(ConfigError, match=unknown_setting):
        distiller.fit_dictionaries(toy_loader(), config={"learning_rate": 1e-2}, **QUIET)
    unknown_stage = r"unknown stage\(s\) 'dictionaries'; the stages are dictionary, init, kd"
    with pytest.raises(ValueError, match=unknown_stage):
        distiller.stages({"dictionaries": {"lr": 1e-2}})
    with pytest.raises(TypeError, match="StageConfig or a mapping of settings to change, got float"):
        distiller.fit_kd(toy_loader(), config=1e-2, **QUIET)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        distiller.fit_kd(toy_loader(), config={"lr": -1.0}, **QUIET)


def test_adamw_sgd_and_cosine_options():
    param = [nn.Parameter(torch.zeros(1))]
    adamw = build_optimizer(param, StageConfig(optimizer="adamw", lr=0.01, weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["lr"] == 0.01 and adamw.defaults["weight_decay"] == 0.05
    config = StageConfig(
        epochs=8, optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=5e-4, schedule="cosine"
    )
    sgd = build_optimizer(param, config)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["weight_decay"] == 5e-4
    assert sgd.defaults["lr"] == 0.1
    # cosine annealing to zero over the epochs: lr_e = lr * (1 + cos(pi * e / epochs)) / 2
    lrs = lrs_per_epoch(config)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1 * (1 + math.cos(math.pi * 2 / 8)) / 2)
    assert lrs[4] == pytest.approx(0.05)
    assert lrs[7] == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    assert lrs_per_epoch(config.replace(schedule="none")) == [0.1] * 8


def test_sgd_without_momentum_is_plain_sgd():
    # momentum 0 is a valid setting; Nesterov, which torch refuses without
    # momentum, applies only with it.
    param = [nn.Parameter(torch.zeros(1))]
    plain = build_optimizer(param, StageConfig(optimizer="sgd", momentum=0.0))
    assert plain.defaults["momentum"] == 0.0 and plain.defaults["nesterov"] is False
    assert build_optimizer(param, StageConfig(optimizer="sgd")).defaults["nesterov"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_blocks_follow_models_moved_one_by_one():
    """The teacher and the student moved to the GPU after the blocks were
    built, not the distiller: each stage takes the blocks along."""
    distiller = make_distiller()
    distiller.teacher.cuda(), distiller.student.cuda()
    out = distiller.fit(toy_loader(), 1, 1, 1, **QUIET)
    assert all(torch.isfinite(torch.tensor(h[-1]["loss"])) for h in out.values())
    blocks = [*distiller.representations.parameters(), *distiller.predictors.parameters()]
    assert blocks and all(p.is_cuda for p in blocks)
