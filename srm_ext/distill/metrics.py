"""Held-out evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler

from .hooks import eval_mode
from .losses import check_logits
from .placement import model_input, module_device, module_dtype
from .trainer import image_batch

if TYPE_CHECKING:
    from .distributed import DistributedContext
    from .trainer import Trainer

__all__ = ["accuracy", "check_held_out_loader"]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    loader: Iterable,
    trainer: "Trainer | None" = None,
    context: "DistributedContext | None" = None,
) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode; the previous mode is
    restored). ``trainer`` supplies the device, preprocessing and autocast; without
    one, batches go to the model's device. Floating images are cast to the
    model's dtype.

    With a distributed ``context`` the counts are summed over its processes, so
    each process can evaluate its own shard of the held-out set (``make_loaders``
    shards it); every process must then call this function. A shard drawn by
    torch's ``DistributedSampler`` counts its samples once: the repeats it pads
    the last shards with are left out."""
    correct = total = 0
    own_samples = _samples_before_padding(loader)
    if trainer is not None:
        trainer.follow(model.parameters())
        device = trainer.device
    else:
        device = module_device(model)
    dtype = module_dtype(model)
    with eval_mode(model):
        for batch in loader:
            images, targets = image_batch(batch)
            _check_class_indices(targets)
            if trainer is not None:
                images, targets = trainer.to_device(images, targets, train=False)
                with trainer.autocast():
                    logits = model(model_input(images, model, dtype))
            else:
                images, targets = images.to(device), targets.to(device)
                logits = model(model_input(images, model, dtype))
            predictions = check_logits(logits).argmax(dim=1)
            if own_samples is not None:
                kept = max(0, min(len(targets), own_samples - total))
                predictions, targets = predictions[:kept], targets[:kept]
            correct += (predictions == targets).sum().item()
            total += targets.numel()
    if context is not None and context.enabled:
        correct, total = context.sum([correct, total], device)
    return correct / max(total, 1)


def check_held_out_loader(loader: Iterable) -> None:
    """Refuses, before any training, a held-out loader whose first batch
    :func:`accuracy` could not count. A one-shot iterator is left untouched."""
    batches = iter(loader)
    if batches is loader:
        return
    batch = next(batches, None)
    if batch is not None:
        _check_class_indices(image_batch(batch)[1])


def _check_class_indices(targets: torch.Tensor) -> None:
    if targets.dim() != 1:
        raise ValueError(
            "accuracy needs class indices as the held-out targets, got class "
            f"probabilities of shape {tuple(targets.shape)}"
        )


def _samples_before_padding(loader: Iterable) -> int | None:
    """How many of the loader's samples come before the padding of its
    ``DistributedSampler``, or None where it has none. That sampler makes the
    shards equal by repeating the first samples at the end of the order, so a
    process's padded samples are the last ones it is given."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is BatchSampler:  # keeps its sampler's order
        sampler = batch_sampler.sampler
    # Only torch's own order is known (a subclass may shard otherwise), and
    # only where batches arrive in it.
    if (
        type(sampler) is not DistributedSampler
        or sampler.drop_last
        or getattr(loader, "in_order", True) is False
    ):
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
