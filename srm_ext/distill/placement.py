"""Where a model's parameters live, and its inputs in the form it takes them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["model_input", "module_device", "module_dtype"]


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (the CPU if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (float32 if none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_input(images: Tensor, model: nn.Module) -> Tensor:
    """``images`` in ``model``'s floating dtype: a loader of float64 images
    (numpy's default) feeds float32 models. Integer inputs (token or class
    ids) stay as they are; autocast still casts inside the model."""
    if images.is_floating_point():
        return images.to(module_dtype(model))
    return images
