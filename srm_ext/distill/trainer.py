"""The epoch loop shared by every stage and baseline.

A :class:`Stage` says what to optimise (an objective over a batch, the
parameters, which modules train and which stay frozen, the optimiser settings);
:class:`Trainer` runs it for ``config.epochs`` epochs with progress bars, mixed
precision, gradient accumulation and clipping, gradient averaging across
processes and a per-epoch callback that the experiment runner uses to
checkpoint. Resuming continues from the saved optimiser/scheduler state at the
next epoch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
# tqdm.auto may pick the asyncio class, whose constructor calls iter(loader): a
# second DataLoader iterator per epoch, drawing a seed and starting workers.
from tqdm import tqdm

from .config import AMP_MODES, StageConfig
from .distributed import DistributedContext

__all__ = [
    "Objective",
    "Stage",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
]

#: Maps a preprocessed batch ``(images, targets)`` to the loss, optionally with
#: named parts to log: ``loss`` or ``(loss, {"local": ..., ...})``.
Objective = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, dict[str, Tensor]]"]
#: ``preprocess(images, train)``: normalisation/augmentation on the device.
Preprocess = Callable[[Tensor, bool], Tensor]


@dataclass
class Stage:
    """One training stage: minimise ``objective`` over ``parameters``."""

    name: str
    objective: Objective
    parameters: list[nn.Parameter]
    train_modules: Sequence[nn.Module]
    config: StageConfig
    frozen_modules: Sequence[nn.Module] = ()
    #: called after every epoch (on every process: the models are identical);
    #: returns metrics to log, e.g. held-out accuracy
    evaluate: Callable[[], dict[str, float]] | None = None
    #: False for stages that train features but not the classifier (SRM stage 2,
    #: FitNet hints), whose held-out accuracy means nothing
    trains_classifier: bool = True
    #: called with each batch's targets before they move to the device, to
    #: refuse what the objective cannot take: on a GPU an out-of-range class
    #: index is a device-side assert, not an error
    check_targets: Callable[[Tensor], None] | None = None


def build_optimizer(parameters: Iterable[nn.Parameter], config: StageConfig) -> torch.optim.Optimizer:
    params = list(parameters)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Nesterov needs momentum: torch refuses it at momentum 0, which means plain SGD.
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: StageConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: constant, step (milestones as fractions of the epochs)
    or cosine annealing to zero."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    if config.schedule == "step":
        milestones = sorted(
            {max(1, round(f * config.epochs)) for f in config.milestones}
            - {config.epochs}
        )
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


class Trainer:
    """Runs :class:`Stage` objects.

    Args:
        device: where batches go; ``None``: wherever the parameters of the stage
            being trained (or the model being evaluated) live.
        preprocess: ``preprocess(images, train)`` applied to each batch on the device.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast (fp16 with a GradScaler
            on the CPU and CUDA).
        progress: show tqdm bars (main process only; off when stderr is not a TTY).
        context: the distributed context; gradients are averaged across its processes
            (once per optimiser step).
        log: receives one summary line per epoch (main process only); ``None`` mutes it.
        accumulate_steps: batches whose gradients are summed into one optimiser
            step, each loss divided by the group's size: the step follows the mean
            of their losses, as it would for one batch of them all (BatchNorm still
            normalises each batch by its own statistics). An epoch's last group may
            be shorter and is stepped on the mean over its batches, so no gradient
            carries over into the next epoch or a checkpoint. Its size comes from
            ``len(loader)``; a loader without one has the last group's gradients
            rescaled to that mean before the step.
        max_grad_norm: clip the total norm of the (averaged, unscaled) gradients
            to this before each step; ``None``: no clipping.

    Each epoch's metrics include ``grad_norm``: the mean, over its optimiser
    steps, of that total norm before clipping (steps whose gradients overflowed
    under fp16, which the GradScaler skips, are left out; ``None`` if all were).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        preprocess: Preprocess | None = None,
        amp: str = "none",
        progress: bool = True,
        context: DistributedContext | None = None,
        log: Callable[[str], None] | None = print,
        accumulate_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        if (
            isinstance(accumulate_steps, bool)
            or not isinstance(accumulate_steps, numbers.Integral)
            or accumulate_steps < 1
        ):
            raise ValueError(f"accumulate_steps must be an integer >= 1, got {accumulate_steps!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, numbers.Real)
            or not 0 < max_grad_norm < math.inf  # also refuses NaN
        ):
            raise ValueError(
                f"max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}"
            )
        if not isinstance(amp, str) or amp not in AMP_MODES:
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        self._follows_parameters = device is None
        self.device = torch.device("cpu" if device is None else device)
        self.preprocess = preprocess
        self.amp = amp
        self.context = context or DistributedContext.current()
        self.progress = progress and self.context.is_main and sys.stderr.isatty()
        self.log = log if self.context.is_main else None
        self.accumulate_steps = int(accumulate_steps)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)

    # ------------------------------------------------------------------ public

    @property
    def settings(self) -> dict[str, Any]:
        """The settings that change what training computes (a resumed run must
        keep them), beside the stage's own."""
        return {
            "amp": self.amp,
            "accumulate_steps": self.accumulate_steps,
            "max_grad_norm": self.max_grad_norm,
        }

    def fit(
        self,
        stage: Stage,
        loader: Iterable,
        *,
        resume: dict[str, Any] | None = None,
        on_epoch_end: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train ``stage`` on ``loader`` and return the per-epoch metrics.

        ``resume`` is a training state previously handed to ``on_epoch_end``
        (epoch counter, optimiser, scheduler and scaler states); training then
        continues at the following epoch. ``on_epoch_end(metrics, state)`` runs
        after every epoch on every process.
        """
        if not stage.parameters:
            raise ValueError(f"stage {stage.name!r} has no parameters to train")
        if not any(p.requires_grad for p in stage.parameters):
            raise ValueError(
                f"stage {stage.name!r} has nothing to train: every parameter has "
                "requires_grad=False"
            )
        self.follow(stage.parameters)
        # Replicas initialised differently (a seed per rank) would otherwise
        # train apart for good, each on the averaged gradients.
        self.context.broadcast_from_main(
            [*stage.parameters, *(b for m in stage.train_modules for b in m.buffers())]
        )
        optimizer = build_optimizer(stage.parameters, stage.config)
        scheduler = build_scheduler(optimizer, stage.config)
        scaler = self._grad_scaler()
        start_epoch = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            elif scaler is not None and int(resume["epoch"]) > 0:
                # Saved before fp16 on the CPU had a scaler.
                warnings.warn(
                    f"stage {stage.name!r} resumes under fp16 with a loss scaler its "
                    "checkpoint did not have: the result will differ from an "
                    "uninterrupted run",
                    stacklevel=2,
                )
            start_epoch = int(resume["epoch"])
        history = []
        for epoch in range(start_epoch, stage.config.epochs):
            # Training needs autograd, also when called under no_grad or inference_mode.
            with torch.inference_mode(False), torch.enable_grad():
                metrics = self._train_epoch(stage, loader, optimizer, scaler, epoch)
            scheduler.step()
            if stage.evaluate is not None:
                metrics.update(stage.evaluate())
            history.append(metrics)
            if self.log is not None:
                self.log(_format_metrics(metrics, stage.config.epochs))
            if on_epoch_end is not None:
                state = {
                    "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                }
                on_epoch_end(metrics, state)
        return history

    def follow(self, parameters: Iterable[Tensor]) -> None:
        """Without an explicit ``device``, send batches to where ``parameters`` live."""
        if self._follows_parameters:
            first = next(iter(parameters), None)
            if first is not None:
                self.device = first.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, images: Tensor, targets: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.preprocess is not None:
            images = self.preprocess(images, train)
        return images, targets

    # ------------------------------------------------------------------ internals

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow on any device; the scaler runs on these.
        if self.amp == "fp16" and self.device.type in ("cpu", "cuda"):
            return torch.amp.GradScaler(self.device.type)
        return None

    def _train_epoch(
        self,
        stage: Stage,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        epoch: int,
    ) -> dict[str, Any]:
        for module in stage.train_modules:
            module.train()
        for module in stage.frozen_modules:
            module.eval()
        for sampler in loader_samplers(loader):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)  # a fresh, reproducible order every epoch

        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        totals: dict[str, Tensor] = {}
        count = 0
        batches = _length(loader)
        group = accumulated = 0  # size of the group being accumulated, batches in it so far
        # Kept on the device until the epoch ends: reading each step's norm
        # would wait for the step.
        step_norms: list[Tensor] = []
        optimizer.zero_grad(set_to_none=True)  # gradients left by earlier work join no step
        bar = tqdm(
            loader,
            desc=f"{stage.name} {epoch + 1}/{stage.config.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for index, batch in enumerate(bar):
            if accumulated == 0:
                # The epoch's last group may be shorter. Where len(loader) cannot
                # tell (no len, or a loader yielding more), the group is taken
                # as full and the end of the epoch corrects it.
                group = self.accumulate_steps
                if batches is not None and index < batches:
                    group = min(group, batches - index)
            images, targets = image_batch(batch)
            if stage.check_targets is not None:
                stage.check_targets(targets)
            images, targets = self.to_device(images, targets, train=True)
            with self.autocast():
                loss, parts = _split_objective(stage.objective(images, targets))
            # Dividing by 1 is exact: without accumulation the gradients are the loss's own.
            share = loss / group
            if scaler is not None:
                share = scaler.scale(share)
            share.backward()
            accumulated += 1
            if accumulated == group:
                step_norms.append(self._step(stage, optimizer, scaler))
                accumulated = 0
            n = images.shape[0]
            count += n
            for key, value in {"loss": loss, **parts}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() * n
            if self.progress and index % 5 == 0:
                bar.set_postfix(loss=f"{(totals['loss'] / count).item():.4f}")
        if accumulated:
            # The loader ended inside a group: its gradients are sums over
            # `accumulated` batches divided by `group`; make them their mean.
            for p in stage.parameters:
                if p.grad is not None:
                    p.grad.mul_(group / accumulated)
            step_norms.append(self._step(stage, optimizer, scaler))
        bar.close()
        if count == 0:
            raise ValueError(f"stage {stage.name!r}: the loader yielded no batches")
        for module in stage.train_modules:
            self.context.average_buffers(module)

        metrics: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1, "lr": lr}
        for key, total in totals.items():
            metrics[key] = self.context.mean(total.item() / max(count, 1), self.device)
        # The gradients were all-reduced before their norm: it is every process's.
        # Non-finite norms are the steps the GradScaler skipped.
        norms = torch.stack([n.to(self.device, torch.float32) for n in step_norms])
        norms = norms[torch.isfinite(norms)]
        metrics["grad_norm"] = norms.mean().item() if norms.numel() else None
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise FloatingPointError(
                f"stage {stage.name!r}: the loss became {metrics['loss']} in epoch {epoch + 1}; "
                "lower the learning rate or check the inputs"
            )
        metrics["time"] = time.perf_counter() - started
        return metrics

    def _step(
        self,
        stage: Stage,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
    ) -> Tensor:
        """One optimiser step on the accumulated gradients, which it then
        clears; returns their total norm before clipping."""
        self.context.all_reduce_gradients(stage.parameters)
        if scaler is not None:
            # Unscale only after the reduce: unscale_ records this process's
            # inf check, which must see an overflow of any process's gradients,
            # or the processes disagree on skipping the step.
            scaler.unscale_(optimizer)
        if self.max_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(stage.parameters, self.max_grad_norm)
        else:
            norm = _total_norm(stage.parameters)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()


def _total_norm(parameters: Iterable[Tensor]) -> Tensor:
    """The 2-norm of all the gradients of ``parameters`` together, as
    ``clip_grad_norm_`` measures it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    device = grads[0].device
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads])
    )


def _length(loader: Iterable) -> int | None:
    """How many batches ``loader`` yields, or None when it cannot say (a
    generator, a DataLoader over an IterableDataset without ``__len__``)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _split_objective(out: Any) -> tuple[Tensor, dict[str, Tensor]]:
    if isinstance(out, tuple):
        loss, parts = out
        return loss, dict(parts)
    return out, {}


def _format_metrics(metrics: dict[str, Any], total_epochs: int) -> str:
    fields = [f"[{metrics['stage']}] epoch {metrics['epoch']}/{total_epochs}"]
    for key, value in metrics.items():
        if key in ("stage", "epoch"):
            continue
        if isinstance(value, float):
            fields.append(f"{key}={value:.4g}" if key != "time" else f"time={value:.1f}s")
    return "  ".join(fields)


def loader_samplers(loader: Iterable) -> list[Any]:
    """The samplers that order a DataLoader's data: its ``sampler``, and a
    ``batch_sampler`` given in its place with the sampler that one wraps (where a
    DistributedSampler sits when batches are formed by a custom batch sampler)."""
    found: list[Any] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        if sampler is not None and all(sampler is not seen for seen in found):
            found.append(sampler)
    return found


def image_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """The (images, targets) of a loader's batch, with the targets as the losses
    take them (:func:`class_targets`), or an error saying what the loader must
    yield instead."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
        isinstance(t, Tensor) for t in batch
    ):
        images, targets = batch
        if images.dim() == 0:
            raise TypeError("the loader's images must be a batch (N, ...), got a 0-d tensor")
        return images, class_targets(targets, images.shape[0])
    shape = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise TypeError(
        f"each batch of the loader must be a pair (images, targets) of tensors, got a {shape}; "
        "wrap the loader or its dataset to yield that pair"
    )


def class_targets(targets: Tensor, batch_size: int) -> Tensor:
    """``targets`` as class indices of shape ``(batch_size,)`` in int64 (any
    integer dtype is taken: numpy's int32, uint8), or as class probabilities of
    shape ``(batch_size, classes)``, which cross-entropy also takes. Anything
    else is refused on the first batch: an ``(N, 1)`` column would fail only
    in the stage that reads the targets, and broadcast in the accuracy."""
    is_integer = not (targets.is_floating_point() or targets.is_complex()) and (
        targets.dtype != torch.bool
    )
    if is_integer and targets.shape == (batch_size,):
        return targets.long()
    if targets.is_floating_point() and targets.dim() == 2 and targets.shape[0] == batch_size:
        return targets
    hint = (
        "; flatten that column (targets.view(-1))"
        if is_integer and targets.shape == (batch_size, 1)
        else ""
    )
    raise ValueError(
        f"the loader's targets must be class indices of shape ({batch_size},) (an integer "
        f"tensor) or class probabilities of shape ({batch_size}, classes) for a batch of "
        f"{batch_size} images, got a {targets.dtype} tensor of shape {tuple(targets.shape)}{hint}"
    )
