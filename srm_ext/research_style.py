"""The dense, masked SRM computation as research code writes it.

Used as an independent cross-check of :mod:`srm_ext.reference` on inputs
without ties, and as the baseline in the benchmarks. It materialises the full
(N, H, W, K) similarity, thresholds it at each pixel's k-th largest value and
reconstructs with a dense matrix product, so on ties it keeps every entry equal
to the threshold (more than ``k``), unlike the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dense_sparse_code", "dense_reconstruction_loss", "dense_labels"]


def dense_sparse_code(x: Tensor, dictionary: Tensor, intercept: Tensor, k: int) -> Tensor:
    """Masked similarity (N, H, W, K): zero outside each pixel's top-k."""
    similarity = torch.sigmoid(x.permute(0, 2, 3, 1) @ dictionary + intercept.reshape(()))
    kth_value = torch.topk(similarity, k, dim=-1).values[..., -1:]
    return similarity * (similarity >= kth_value).to(similarity.dtype)


def dense_reconstruction_loss(
    x: Tensor, dictionary: Tensor, intercept: Tensor, k: int
) -> Tensor:
    code = dense_sparse_code(x, dictionary, intercept, k)
    x_hat = F.linear(code, dictionary).permute(0, 3, 1, 2)
    return torch.mean((x_hat - x) ** 2)


def dense_labels(
    x: Tensor, dictionary: Tensor, intercept: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """(pixel_labels (N, H, W), image_labels (N, K)) from the masked similarity."""
    with torch.no_grad():
        code = dense_sparse_code(x, dictionary, intercept, k)
        return code.argmax(dim=-1), code.mean(dim=(1, 2))
