"""Pure-PyTorch SRM ops: the fallback backend and the oracle for the kernels.

Each function computes exactly what ``../shared/srm-spec.md`` states, with
plain vectorised PyTorch and ordinary autograd. Selection is done on the
pre-activations with a stable descending sort, so exactly ``k`` codewords are
kept per pixel, NaN counts as larger than +inf, and ties go to the lower index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation

__all__ = [
    "sparse_encode",
    "sparse_decode",
    "reconstruction_loss",
    "sparse_labels",
    "predictor_loss",
]

# cross_entropy's ignore_index set to a label no valid code holds.
_NO_IGNORED_LABEL = torch.iinfo(torch.int64).min


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (their range would overflow to inf in
    a similarity or a sum of squares), else the input's own dtype."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _pre_activations(x: Tensor, dictionary: Tensor, intercept: Tensor) -> Tensor:
    """``C^T x_p + b`` for every pixel, shaped (N, H, W, K), in the
    accumulation dtype."""
    acc = _accumulation_dtype(x)
    pixels = _saveable(x).permute(0, 2, 3, 1).to(acc)
    return pixels @ _saveable(dictionary).to(acc) + intercept.reshape(()).to(acc)


def sparse_encode(
    x: Tensor, dictionary: Tensor, intercept: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k sparse code of every pixel: ``(values, indices)``, each (N, H, W, k)."""
    k = _validation.validate_encode(x, dictionary, intercept, k)
    pre = _pre_activations(x, dictionary, intercept)
    order = torch.sort(pre.detach(), dim=-1, descending=True, stable=True).indices
    indices = order[..., :k].contiguous()
    values = torch.sigmoid(torch.gather(pre, -1, indices)).to(x.dtype)
    return values, indices


def sparse_decode(values: Tensor, indices: Tensor, dictionary: Tensor) -> Tensor:
    """Reconstruction ``x_hat_p = sum_j values_pj * C[:, indices_pj]``, (N, D, H, W)."""
    _validation.validate_decode(values, indices, dictionary)
    acc = _accumulation_dtype(values)
    num_codewords = dictionary.shape[1]
    codes = values.new_zeros(*values.shape[:-1], num_codewords, dtype=acc)
    codes = codes.scatter_add(-1, _saveable(indices), values.to(acc))
    return (codes @ _saveable(dictionary).to(acc).t()).to(values.dtype).permute(0, 3, 1, 2)


def reconstruction_loss(
    x: Tensor, dictionary: Tensor, intercept: Tensor, k: int
) -> Tensor:
    """Stage-1 loss ``mean((decode(encode(x)) - x) ** 2)``."""
    values, indices = sparse_encode(x, dictionary, intercept, k)
    acc = _accumulation_dtype(x)
    x_hat = sparse_decode(values, indices, dictionary)
    return torch.mean((x_hat.to(acc) - x.to(acc)) ** 2).to(x.dtype)


def sparse_labels(
    values: Tensor, indices: Tensor, num_codewords: int
) -> tuple[Tensor, Tensor]:
    """Stage-2 targets: pixel labels (N, H, W) int64 and image labels (N, K)."""
    num_codewords = _validation.validate_labels(values, indices, num_codewords)
    values, indices = values.detach(), indices.detach()
    n, h, w, k = values.shape
    # A copy, never a view of indices (which it would be for k = 1): writing
    # to the labels must not change the code.
    pixel_labels = indices[..., 0].clone(memory_format=torch.contiguous_format)
    image_labels = values.new_zeros(n, num_codewords, dtype=_accumulation_dtype(values))
    image_labels.scatter_add_(
        1, indices.reshape(n, h * w * k), values.reshape(n, h * w * k).to(image_labels.dtype)
    )
    return pixel_labels, (image_labels / (h * w)).to(values.dtype)


def predictor_loss(
    y: Tensor,
    dictionary: Tensor,
    intercept: Tensor,
    pixel_labels: Tensor,
    image_labels: Tensor,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
) -> Tensor:
    """Stage-2 loss of a student feature map against the teacher's labels."""
    local_weight, global_weight = _validation.validate_predictor(
        y, dictionary, intercept, pixel_labels, image_labels, local_weight, global_weight
    )
    q = torch.sigmoid(_pre_activations(y, dictionary, intercept))  # (N, H, W, K)
    # The labels are targets: no gradient flows into them.
    targets = _saveable(image_labels.detach().to(q.dtype))
    labels = _saveable(pixel_labels)
    if torch.compiler.is_compiling() and targets.device.type == "cpu":
        # Tracing skips validate_predictor's range checks; on the CPU asserts
        # in the graph take their place (on a GPU they would be fatal). The
        # clamped labels keep the cross-entropy's own index check, which may
        # run first, from reporting a bad label instead.
        num_codewords = q.shape[-1]
        labels_in_range = ((labels >= 0) & (labels < num_codewords)).all()
        torch._assert_async(labels_in_range, "pixel_labels must lie in [0, K)")
        labels = labels.clamp(0, num_codewords - 1)
        in_range = ((targets >= 0) & (targets <= 1)).all()
        torch._assert_async(in_range, "image_labels must lie in [0, 1]")
    # The authors feed the sigmoid outputs to a cross-entropy as logits. No
    # label is to be ignored: the default ignore_index, -100, would drop
    # such an out-of-range label where no check has refused it.
    local = F.cross_entropy(
        q.reshape(-1, q.shape[-1]), labels.reshape(-1), ignore_index=_NO_IGNORED_LABEL
    )
    image_means = q.mean(dim=(1, 2))
    # binary_cross_entropy refuses a NaN mean (from NaN features or
    # parameters): it gets a stand-in, and its term is the NaN itself, so the
    # loss is NaN as from the kernels.
    is_nan = image_means.isnan()
    terms = F.binary_cross_entropy(image_means.masked_fill(is_nan, 0.5), targets, reduction="none")
    global_ = torch.where(is_nan, image_means, terms).mean()
    return (local_weight * local + global_weight * global_).to(y.dtype)


def _saveable(t: Tensor) -> Tensor:
    """``t`` as autograd can save it for backward: a tensor made under
    torch.inference_mode (a frozen teacher's features or labels) cannot be
    where an op keeps it or a view of it, so it is copied. torch.compile cannot
    trace that check: there tensors are taken as they are."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not t.is_inference():
        return t
    return t.clone()
