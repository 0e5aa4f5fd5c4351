"""The Trainer's optimiser step: gradient accumulation, gradient-norm clipping
and the gradient-norm metric.

The models are float64 and free of BatchNorm, so that accumulating the
gradients of small batches and taking one large batch differ only by
summation order (rtol 1e-10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from conftest import SimulatedRankZero
from srm_ext.distill import DistributedContext, StageConfig, Trainer
from srm_ext.distill.methods import cross_entropy_stage
from srm_ext.distill.trainer import build_optimizer, build_scheduler

QUIET = {"progress": False, "log": None}
CLOSE = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: one intra-op thread is as fast and cannot stall."""


def samples(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    )


def model(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(4)] if batch_norm else []
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), *norm, nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).double()


class Unsized:
    """A loader without ``__len__``, as a generator or an IterableDataset gives."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        yield from self.loader


def train(
    loader, config: StageConfig, trainer: Trainer | None = None, batch_norm: bool = False
) -> nn.Module:
    net = model(batch_norm)
    (trainer or Trainer(**QUIET)).fit(cross_entropy_stage("ce", net, config), loader)
    return net


def assert_same(actual: nn.Module, expected: nn.Module, **tolerance) -> None:
    for (name, a), b in zip(actual.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(a, b, **tolerance, msg=name)


@dataclass(frozen=True)
class FirstOfTwo(SimulatedRankZero):
    """Rank 0 of two processes, simulated: each gradient all-reduce is
    recorded and brings back ``factor`` times this process's gradients."""

    rank: int = 0
    world_size: int = 2
    factor: float = 1.0
    reduces: list = field(default_factory=list)

    def all_reduce_gradients(self, parameters):
        grads = [p.grad for p in parameters if p.grad is not None]
        self.reduces.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
        for g in grads:
            g.mul_(self.factor)


# ----------------------------------------------------------------------------- accumulation


def test_default_step_is_the_plain_loop_bitwise():
    # accumulate_steps=1 and no clipping: zero_grad, backward, step per batch,
    # as the loop has always been; BatchNorm, Adam and a schedule included.
    config = StageConfig(epochs=3, lr=1e-2, schedule="step", milestones=(0.5,))
    data = samples(40)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, seed=1)  # as make_loaders shuffles
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    trained = train(loader, config, batch_norm=True)

    expected = model(batch_norm=True)
    optimizer = build_optimizer(expected.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        for images, targets in loader:
            loss = F.cross_entropy(expected(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    assert_same(trained, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sized", [True, False], ids=["len", "no-len"])
@pytest.mark.parametrize("steps, n", [(2, 32), (2, 20), (3, 20)])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulated_batches_step_as_one_batch_of_them_all(optimizer, steps, n, sized):
    # 20 samples in batches of 4 are 5 batches: with 2 steps the groups are
    # [b1 b2] [b3 b4] [b5], with 3 steps [b1 b2 b3] [b4 b5]; the last, shorter
    # group is stepped on its own mean, as the last of the large batches is.
    config = StageConfig(epochs=3, optimizer=optimizer, lr=0.1, momentum=0.0, schedule="none")
    small = DataLoader(samples(n), batch_size=4)
    trainer = Trainer(**QUIET, accumulate_steps=steps)
    accumulated = train(small if sized else Unsized(small), config, trainer)
    whole = train(DataLoader(samples(n), batch_size=4 * steps), config)
    assert_same(accumulated, whole, **CLOSE)
    # Every group stepped: nothing is left over for the next epoch or a checkpoint.
    assert all(p.grad is None for p in accumulated.parameters())


def test_a_short_last_group_is_divided_by_its_own_size():
    # 5 batches, 3 a step: [b1 b2 b3] [b4 b5], each loss divided by the size
    # of its group, which len(loader) gives before the group's first backward.
    config = StageConfig(epochs=2, optimizer="sgd", lr=0.1, schedule="none")
    loader = DataLoader(samples(20), batch_size=4)
    trained = train(loader, config, Trainer(**QUIET, accumulate_steps=3))

    expected = model()
    optimizer = build_optimizer(expected.parameters(), config)
    for _ in range(config.epochs):
        batches = list(loader)
        for group in (batches[:3], batches[3:]):
            for images, targets in group:
                (F.cross_entropy(expected(images), targets) / len(group)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert_same(trained, expected, rtol=0, atol=0)


def test_a_stage_with_every_parameter_frozen_is_refused_by_name():
    net = model().requires_grad_(False)
    loader = DataLoader(samples(8), batch_size=4)
    with pytest.raises(ValueError, match="stage 'ce' has nothing to train: every parameter has requires_grad=False"):
        Trainer(**QUIET).fit(cross_entropy_stage("ce", net, StageConfig()), loader)
    net[0].requires_grad_(True)  # partly frozen trains the rest
    frozen, trained = net[-1].weight.clone(), net[0].weight.clone()
    Trainer(**QUIET).fit(cross_entropy_stage("ce", net, StageConfig()), loader)
    assert torch.equal(net[-1].weight, frozen) and not torch.equal(net[0].weight, trained)


def test_gradients_are_all_reduced_once_per_step():
    context = FirstOfTwo()
    trainer = Trainer(**QUIET, context=context, accumulate_steps=2)
    train(DataLoader(samples(20), batch_size=4), StageConfig(epochs=2, schedule="none"), trainer)
    assert len(context.reduces) == 2 * 3  # 5 batches an epoch: groups of 2, 2 and 1


def test_gradients_left_on_the_parameters_join_no_step():
    config = StageConfig(epochs=1, optimizer="sgd", lr=0.1, schedule="none")
    loader = DataLoader(samples(16), batch_size=4)
    net = model()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    Trainer(**QUIET, accumulate_steps=2).fit(cross_entropy_stage("ce", net, config), loader)
    assert_same(net, train(loader, config, Trainer(**QUIET, accumulate_steps=2)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- clipping


def first_gradient(loader: DataLoader) -> torch.Tensor:
    net = model()
    images, targets = next(iter(loader))
    F.cross_entropy(net(images), targets).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def clipped(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``g`` clipped as clip_grad_norm_ does when its norm exceeds ``max_norm``
    (dividing by the norm + 1e-6)."""
    return g * max_norm / (g.norm() + 1e-6)


def first_update(trainer: Trainer, loader: DataLoader, lr: float) -> torch.Tensor:
    """The change of the flat parameters after one SGD step of ``lr``."""
    before = torch.cat([p.reshape(-1) for p in model().parameters()])
    config = StageConfig(epochs=1, optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0)
    after = torch.cat([p.detach().reshape(-1) for p in train(loader, config, trainer).parameters()])
    return after - before


@pytest.mark.parametrize("max_norm", [1e-3, None])
def test_clipping_scales_the_gradient_to_the_norm(max_norm):
    loader = DataLoader(samples(4), batch_size=4)
    g = first_gradient(loader)
    assert g.norm() > 1e-3  # so that the clipped case clips
    lr = 1e3
    update = first_update(Trainer(**QUIET, max_grad_norm=max_norm), loader, lr)
    expected = -lr * (g if max_norm is None else clipped(g, max_norm))
    torch.testing.assert_close(update, expected, **CLOSE)


def test_clipping_sees_the_all_reduced_gradients():
    # Averaged over processes, the gradient is 10 times this process's: the
    # clipped step must have the norm limit, and this process's direction.
    loader = DataLoader(samples(4), batch_size=4)
    g = first_gradient(loader)
    trainer = Trainer(**QUIET, context=FirstOfTwo(factor=10.0), max_grad_norm=1e-3)
    update = first_update(trainer, loader, lr=1.0)
    torch.testing.assert_close(update, -clipped(10 * g, 1e-3), **CLOSE)


@pytest.mark.parametrize("max_norm", [0.05, None])
def test_grad_scaler_path_unscales_before_clipping(monkeypatch, max_norm):
    # The fp16 path runs with a GradScaler on CUDA; a CPU GradScaler takes the
    # same path here. Its power-of-two scale leaves the float64 gradients exact,
    # so the steps must equal those without a scaler.
    config = StageConfig(epochs=2, optimizer="sgd", lr=0.1, schedule="none")
    loader = DataLoader(samples(20), batch_size=4)
    plain, scaled = FirstOfTwo(), FirstOfTwo()
    without = train(loader, config, Trainer(**QUIET, context=plain, accumulate_steps=2,
                                            max_grad_norm=max_norm))
    monkeypatch.setattr(Trainer, "_grad_scaler", lambda self: torch.amp.GradScaler("cpu"))
    trainer = Trainer(**QUIET, context=scaled, accumulate_steps=2, max_grad_norm=max_norm)
    assert_same(train(loader, config, trainer), without, **CLOSE)
    assert len(scaled.reduces) == len(plain.reduces) == 2 * 3
    if max_norm is not None:
        assert min(plain.reduces) > max_norm  # every step was clipped


def test_fp16_on_the_cpu_scales_the_loss_so_small_gradients_survive():
    # A gradient of 1e-8 is below float16's smallest number: unscaled, the
    # fp16 backward of the linear layer rounds it to zero and nothing trains.
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    before = net.weight.detach().clone()
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
                        batch_size=8)
    stage = cross_entropy_stage("tiny", net, StageConfig(epochs=1, weight_decay=0.0))
    stage.objective = lambda images, _targets: 1e-8 * net(images).float().sum()
    states = []
    [metrics] = Trainer(**QUIET, amp="fp16").fit(
        stage, loader, on_epoch_end=lambda _metrics, state: states.append(state)
    )
    assert metrics["grad_norm"] > 0
    assert not torch.equal(net.weight, before)
    assert states[0]["scaler"]["scale"] > 1  # saved, so a resumed run keeps it
    # A checkpoint saved before the CPU had a scaler resumes, with a warning.
    stage.config = StageConfig(epochs=2, weight_decay=0.0)
    with pytest.warns(UserWarning, match="resumes under fp16 with a loss scaler its checkpoint"):
        Trainer(**QUIET, amp="fp16").fit(stage, loader, resume={**states[0], "scaler": {}})


# ----------------------------------------------------------------------------- gradient norm


@pytest.mark.parametrize("max_norm, torch_before_2_6", [(1e-3, False), (None, False), (None, True)])
def test_grad_norm_is_the_norm_before_clipping(monkeypatch, max_norm, torch_before_2_6):
    if torch_before_2_6:
        monkeypatch.delattr(nn.utils, "get_total_norm", raising=False)
    loader = DataLoader(samples(4), batch_size=4)
    g = first_gradient(loader)
    config = StageConfig(epochs=1, optimizer="sgd", lr=0.1, schedule="none")
    net = model()
    [metrics] = Trainer(**QUIET, max_grad_norm=max_norm).fit(
        cross_entropy_stage("ce", net, config), loader
    )
    # Summed in float32 on the device.
    assert metrics["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_grad_norm_is_the_mean_over_the_epochs_steps(steps):
    # The simulated all-reduce records the norm of every step's gradients,
    # the short last group's rescaled to its mean included.
    context = FirstOfTwo()
    trainer = Trainer(**QUIET, context=context, accumulate_steps=steps)
    config = StageConfig(epochs=2, lr=1e-2, schedule="none")
    history = trainer.fit(cross_entropy_stage("ce", model(), config), DataLoader(samples(20), batch_size=4))
    per_epoch = len(context.reduces) // 2
    assert per_epoch == math.ceil(5 / steps)
    for epoch, metrics in enumerate(history):
        norms = context.reduces[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert metrics["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    assert history[0]["grad_norm"] != pytest.approx(history[1]["grad_norm"], rel=1e-6)


@dataclass(frozen=True)
class OverflowsOnce(SimulatedRankZero):
    """Rank 0 of two whose peer's gradients overflow at the first step only."""

    world_size: int = 2
    steps: list = field(default_factory=list)

    def all_reduce_gradients(self, parameters):
        self.steps.append(None)
        if len(self.steps) == 1:
            for p in parameters:
                if p.grad is not None:
                    p.grad.add_(float("inf"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # the skipped step
def test_grad_norm_leaves_out_the_steps_the_scaler_skips(monkeypatch):
    loader = DataLoader(samples(8), batch_size=4)
    images, targets = list(loader)[1]
    net = model()
    F.cross_entropy(net(images), targets).backward()  # the second step's gradient: the first was skipped
    expected = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm().item()
    monkeypatch.setattr(Trainer, "_grad_scaler", lambda self: torch.amp.GradScaler("cpu"))
    config = StageConfig(epochs=1, optimizer="sgd", lr=0.1, schedule="none")
    [metrics] = Trainer(**QUIET, context=OverflowsOnce()).fit(
        cross_entropy_stage("ce", model(), config), loader
    )
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"accumulate_steps": 0}, "accumulate_steps must be an integer >= 1, got 0"),
        ({"accumulate_steps": 2.0}, "accumulate_steps must be an integer >= 1, got 2.0"),
        ({"accumulate_steps": True}, "accumulate_steps must be an integer >= 1, got True"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be None or a finite number > 0, got 0.0"),
        ({"max_grad_norm": -1}, "max_grad_norm must be None or a finite number > 0, got -1"),
        ({"max_grad_norm": math.nan}, "max_grad_norm must be None or a finite number > 0, got nan"),
        ({"max_grad_norm": math.inf}, "max_grad_norm must be None or a finite number > 0, got inf"),
        ({"max_grad_norm": "1"}, "max_grad_norm must be None or a finite number > 0, got '1'"),
        # Anything but these three used to run float16 autocast.
        ({"amp": "bfloat16"}, "amp must be 'none', 'bf16' or 'fp16', got 'bfloat16'"),
        ({"amp": False}, "amp must be 'none', 'bf16' or 'fp16', got False"),
        ({"amp": None}, "amp must be 'none', 'bf16' or 'fp16', got None"),
    ],
)
def test_invalid_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(**QUIET, **kwargs)


class CountingLoader:
    """Counts the iterators asked of a loader."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.iterators = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.iterators += 1
        return iter(self.loader)


@pytest.mark.parametrize("progress", [False, True])
def test_one_iterator_per_epoch(monkeypatch, progress):
    # A DataLoader iterator draws a seed from the loader's generator and starts
    # its worker processes: a second one per epoch would waste both.
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    loader = CountingLoader(DataLoader(samples(12), batch_size=4))
    trainer = Trainer(progress=progress, log=None)
    train(loader, StageConfig(epochs=3, schedule="none"), trainer)
    assert loader.iterators == 3
