"""``nn.Module`` blocks around the SRM ops: the teacher-side sparse representation
and the student-side sparse-code predictor.

Both blocks own their dictionary and intercept as parameters and call the ops of
:mod:`srm_ext.functional`, so they run the compiled kernels when available. Under
autocast the feature maps arrive in half precision while the parameters stay in
float32; the blocks cast the features to the parameter dtype and run the ops with
autocast disabled, since the ops require one dtype for all their tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import functional as srm_f
from ._validation import as_float, as_int, check_feature_map, check_loss_weight

__all__ = [
    "SparseCode",
    "SparseLabels",
    "SparseRepresentation",
    "SparseCodePredictor",
    "resize_pixel_labels",
    "srm_sizes",
    "check_multipliers",
]


class SparseCode(NamedTuple):
    """Output of :class:`SparseRepresentation`: the reconstruction (N, D, H, W) and
    the sparse code, ``values`` and ``indices`` (N, H, W, k)."""

    reconstruction: Tensor
    values: Tensor
    indices: Tensor


class SparseLabels(NamedTuple):
    """Stage-2 targets: ``pixel`` (N, H, W) int64 and ``image`` (N, K) float."""

    pixel: Tensor
    image: Tensor


def check_multipliers(codeword_multiplier: float, sparsity_multiplier: float) -> None:
    """Both paper multipliers must be finite and > 0: int() fails on NaN and inf
    without naming them, and max(1, ...) would turn a sparsity multiplier <= 0
    into k = 1 quietly."""
    for name, value in (
        ("codeword_multiplier", codeword_multiplier),
        ("sparsity_multiplier", sparsity_multiplier),
    ):
        if not 0.0 < as_float(name, value) < math.inf:  # also refuses NaN
            raise ValueError(f"{name} must be finite and > 0, got {value}")


def srm_sizes(
    channels: int, codeword_multiplier: float, sparsity_multiplier: float
) -> tuple[int, int]:
    """``(K, k)`` from the paper's multipliers: ``K = int(D * cm)``,
    ``k = max(1, int(D * sm * cm))``. Raises ``ValueError`` when they are unusable."""
    check_multipliers(codeword_multiplier, sparsity_multiplier)
    num_codewords = int(channels * codeword_multiplier)
    sparsity = max(1, int(channels * sparsity_multiplier * codeword_multiplier))
    if num_codewords < 1:
        raise ValueError(
            f"codeword_multiplier={codeword_multiplier} gives K={num_codewords} codewords "
            f"for D={channels} channels; it must give at least one"
        )
    if sparsity > num_codewords:
        raise ValueError(
            f"sparsity_multiplier={sparsity_multiplier} gives k={sparsity} kept codewords "
            f"but there are only K={num_codewords} (D={channels}); use a sparsity "
            "multiplier of at most 1"
        )
    return num_codewords, sparsity


def resize_pixel_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of integer labels (N, H, W) to ``size`` = (H', W').

    Source index ``floor(dst * H / H')``: the rule of
    ``F.interpolate(mode="nearest")``, but in exact integer arithmetic (interpolate
    forms the scale ``H / H'`` in floating point and picks the next source
    row for some sizes, e.g. 62 -> 28). Labels are gathered directly, so they
    never pass through floating point either.
    """
    height, width = labels.shape[-2:]
    out_h, out_w = size
    if (height, width) == (out_h, out_w):
        return labels
    rows = (torch.arange(out_h, device=labels.device) * height) // out_h
    cols = (torch.arange(out_w, device=labels.device) * width) // out_w
    return labels.index_select(-2, rows).index_select(-1, cols)


def _label_pair(labels: object) -> tuple[Tensor, Tensor]:
    """The teacher's ``(pixel, image)`` labels; pixel labels on a grid that can
    be resized to the student's (no side of it empty)."""
    if (
        not isinstance(labels, (tuple, list))
        or len(labels) != 2
        or not all(isinstance(t, Tensor) for t in labels)
    ):
        raise TypeError(
            "labels must be the teacher's (pixel, image) label tensors, as "
            f"SparseRepresentation.labels gives them, got {type(labels).__name__}"
        )
    pixel, image = labels
    if pixel.dim() != 3 or 0 in pixel.shape[1:]:
        raise ValueError(
            f"pixel labels must have shape (N, H, W) with H, W >= 1, got {tuple(pixel.shape)}"
        )
    return pixel, image


def _block_sizes(**sizes: object) -> list[int]:
    """The sizes as Python ints (a NumPy integer too), which the ops' schemas take."""
    sizes = {name: as_int(name, size) for name, size in sizes.items()}
    for name in ("in_channels", "num_codewords"):
        if sizes[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {sizes[name]}")
    return list(sizes.values())


def _block_input(block: nn.Module, name: str, features: Tensor) -> Tensor:
    """``features`` as ``block`` takes them: a (N, in_channels, H, W) feature
    map, in its dictionary's dtype. The error names the block's in_channels,
    which the ops would report as the dictionary's rows."""
    if check_feature_map(name, features).shape[1] != block.in_channels:
        raise ValueError(
            f"{name} must be a (N, {block.in_channels}, H, W) feature map for in_channels="
            f"{block.in_channels}, got shape {tuple(features.shape)}"
        )
    return features.to(block.dictionary.dtype)


def _init_dictionary(dictionary: Tensor, intercept: Tensor) -> None:
    # The authors' init: kaiming-uniform (default gain) on the (D, K) tensor as
    # stored, so the fan is K; intercept uniform(-1, 1).
    nn.init.kaiming_uniform_(dictionary)
    nn.init.uniform_(intercept, -1.0, 1.0)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    # A device type without autocast (meta) has nothing to turn off.
    if srm_f._has_autocast(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class SparseRepresentation(nn.Module):
    """Teacher-side SRM block: a dictionary of ``num_codewords`` codewords over
    ``in_channels`` channels and a top-``sparsity`` sparse code of every pixel.

    ``forward(x)`` returns a :class:`SparseCode` (reconstruction, values, indices);
    :meth:`loss` is the fused stage-1 reconstruction loss and :meth:`labels` the
    stage-2 targets (no gradient).

    Example::

        block = SparseRepresentation(in_channels=64, num_codewords=128, sparsity=2)
        loss = block.loss(teacher_features)        # stage 1
        targets = block.labels(teacher_features)   # stage 2: .pixel, .image
    """

    def __init__(self, in_channels: int, num_codewords: int, sparsity: int) -> None:
        super().__init__()
        in_channels, num_codewords, sparsity = _block_sizes(
            in_channels=in_channels, num_codewords=num_codewords, sparsity=sparsity
        )
        if not 1 <= sparsity <= num_codewords:
            raise ValueError(
                f"sparsity must satisfy 1 <= k <= K={num_codewords}, got k={sparsity}"
            )
        self.in_channels = in_channels
        self.num_codewords = num_codewords
        self.sparsity = sparsity
        # (D, K) stored codeword-major: each codeword is contiguous, so the
        # sparse kernels read codewords and write their gradients in place.
        self.dictionary = nn.Parameter(torch.empty(num_codewords, in_channels).t())
        self.intercept = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_dictionary(self.dictionary, self.intercept)

    def _prepare(self, x: Tensor) -> Tensor:
        return _block_input(self, "x", x)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse code ``(values, indices)``, each (N, H, W, k)."""
        x = self._prepare(x)
        with _no_autocast(x.device.type):
            return srm_f.sparse_encode(x, self.dictionary, self.intercept, self.sparsity)

    def forward(self, x: Tensor) -> SparseCode:
        x = self._prepare(x)
        with _no_autocast(x.device.type):
            values, indices = srm_f.sparse_encode(
                x, self.dictionary, self.intercept, self.sparsity
            )
            reconstruction = srm_f.sparse_decode(values, indices, self.dictionary)
        return SparseCode(reconstruction, values, indices)

    def loss(self, x: Tensor) -> Tensor:
        """Stage-1 loss ``mean((x_hat - x) ** 2)`` (fused encode, decode and error)."""
        x = self._prepare(x)
        with _no_autocast(x.device.type):
            return srm_f.reconstruction_loss(x, self.dictionary, self.intercept, self.sparsity)

    @torch.no_grad()
    def labels(self, x: Tensor) -> SparseLabels:
        """Stage-2 targets of ``x``: argmax codeword per pixel and per-image code means."""
        values, indices = self.encode(x)
        with _no_autocast(values.device.type):
            pixel, image = srm_f.sparse_labels(values, indices, self.num_codewords)
        return SparseLabels(pixel, image)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_codewords={self.num_codewords}, sparsity={self.sparsity}"


class SparseCodePredictor(nn.Module):
    """Student-side SRM block: predicts the teacher's sparse code from a student
    feature map with its own dictionary (``in_channels`` x ``num_codewords``).

    ``forward(y, labels)`` returns the stage-2 loss
    ``local_weight * local + global_weight * global``; pixel labels on another grid
    than ``y`` are resized with nearest-neighbour sampling.
    """

    def __init__(
        self,
        in_channels: int,
        num_codewords: int,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
    ) -> None:
        super().__init__()
        in_channels, num_codewords = _block_sizes(
            in_channels=in_channels, num_codewords=num_codewords
        )
        self.in_channels = in_channels
        self.num_codewords = num_codewords
        self.local_weight = check_loss_weight("local_weight", local_weight)
        self.global_weight = check_loss_weight("global_weight", global_weight)
        self.dictionary = nn.Parameter(torch.empty(in_channels, num_codewords))
        self.intercept = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_dictionary(self.dictionary, self.intercept)

    def forward(self, y: Tensor, labels: SparseLabels | tuple[Tensor, Tensor]) -> Tensor:
        pixel, image = _label_pair(labels)
        y = _block_input(self, "y", y)
        pixel = resize_pixel_labels(pixel, (y.shape[-2], y.shape[-1]))
        image = image.to(self.dictionary.dtype)
        with _no_autocast(y.device.type):
            return srm_f.predictor_loss(
                y,
                self.dictionary,
                self.intercept,
                pixel,
                image,
                self.local_weight,
                self.global_weight,
            )

    @torch.no_grad()
    def predict(self, y: Tensor) -> Tensor:
        """Predicted codeword similarities ``sigmoid(C_s^T y_p + b_s)``, (N, H, W, K)."""
        y = _block_input(self, "y", y)
        return torch.sigmoid(y.permute(0, 2, 3, 1) @ self.dictionary + self.intercept)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_codewords={self.num_codewords}, "
            f"local_weight={self.local_weight}, global_weight={self.global_weight}"
        )
