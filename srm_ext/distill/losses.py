"""Distillation losses of the baselines: Hinton KD, FitNet hints, similarity-
preserving KD (SP) and attention transfer (AT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "check_logits",
    "check_same_classes",
    "classification_loss",
    "kd_loss",
    "HintRegressor",
    "similarity_preserving_loss",
    "attention_map",
    "attention_transfer_loss",
]


def check_logits(output: object, role: str = "model", batch_size: int | None = None) -> Tensor:
    """``output`` if it is a tensor of logits, of shape ``(batch_size, classes)``
    where ``batch_size`` is given; else an error saying what the ``role`` model
    returned instead."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"the {role} must return a logits tensor (N, classes), got a "
            f"{type(output).__name__}; wrap it in a module whose forward returns only the logits"
        )
    if batch_size is not None and (output.dim() != 2 or output.shape[0] != batch_size):
        raise ValueError(
            f"the {role} maps a batch of {batch_size} inputs to shape {tuple(output.shape)}; "
            f"expected logits of shape ({batch_size}, classes)"
        )
    return output


def check_same_classes(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """KD compares the two models' logits class by class: refuse logits that
    broadcast against each other instead."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"the student's logits have shape {tuple(student_logits.shape)} but the "
            f"teacher's {tuple(teacher_logits.shape)}; KD needs both models to give "
            "(N, classes) logits over the same classes"
        )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)``
    with ``p = softmax(logits / T)`` and the KL averaged over the batch."""
    student_logits = check_logits(student_logits, "student").float()
    teacher_logits = check_logits(teacher_logits, "teacher").float()
    check_same_classes(student_logits, teacher_logits)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = classification_loss(student_logits, targets)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


# cross_entropy's ignore_index set to an index no valid target holds.
_NO_IGNORED_INDEX = torch.iinfo(torch.int64).min


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against class indices or class probabilities. No index is
    ignored: with torch's default ignore_index a target of -100 would drop its
    sample silently, where any other index outside the classes is an error
    (on a GPU, a device-side assert)."""
    return F.cross_entropy(logits, targets, ignore_index=_NO_IGNORED_INDEX)


class HintRegressor(nn.Module):
    """FitNet (Romero et al. 2015) regressor: a 1x1 convolution mapping the
    student's guided layer to the teacher's hint layer, trained with an MSE.
    The student map is resized (bilinear) when the grids differ."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        hint = self.bn(self.proj(student_features))
        if hint.shape[-2:] != teacher_features.shape[-2:]:
            hint = F.interpolate(hint, size=teacher_features.shape[-2:], mode="bilinear")
        return F.mse_loss(hint.float(), teacher_features.float())


def similarity_preserving_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Tung & Mori (2019): squared Frobenius distance between the row-normalised
    batch Gram matrices of the two maps, divided by ``batch_size ** 2``."""
    n = student_features.shape[0]

    def gram(features: Tensor) -> Tensor:
        flat = features.float().reshape(n, -1)
        return F.normalize(flat @ flat.t(), p=2, dim=1)

    # In float32 under autocast too, which would run the products in half
    # precision: a Gram entry sums C*H*W products, soon past float16's range.
    with torch.autocast(student_features.device.type, enabled=False):
        return (gram(student_features) - gram(teacher_features)).pow(2).sum() / (n * n)


def attention_map(features: Tensor, p: int = 2) -> Tensor:
    """Zagoruyko & Komodakis (2017): the spatial map ``mean_c |A_c|^p`` (their
    channel sum up to a constant, which the L2 normalisation removes), (N, H*W)."""
    return F.normalize(features.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared distance between the attention maps. Where the grids
    differ, the finer map is average-pooled to the coarser grid, as in the SRM
    authors' AT baseline (per dimension: pooling never upsamples)."""
    grid = [min(s, t) for s, t in zip(student_features.shape[-2:], teacher_features.shape[-2:])]
    if list(student_features.shape[-2:]) != grid:
        student_features = F.adaptive_avg_pool2d(student_features, grid)
    if list(teacher_features.shape[-2:]) != grid:
        teacher_features = F.adaptive_avg_pool2d(teacher_features, grid)
    diff = attention_map(student_features) - attention_map(teacher_features)
    return diff.pow(2).mean()
