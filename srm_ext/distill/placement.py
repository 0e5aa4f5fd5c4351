"""Where a model's parameters live, and its inputs in the form it takes them."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

__all__ = ["model_input", "module_device", "module_dtype"]


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (the CPU if it has none)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of most of the module's parameter elements (float32
    if it has none): a frozen float16 scale in a float32 model leaves it a
    float32 model."""
    elements: dict[torch.dtype, float] = {}
    for tensor in module.parameters():
        if tensor.is_floating_point():
            # Unsized until its first batch, a lazy layer counts as the largest.
            size = math.inf if is_lazy(tensor) else tensor.numel()
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + size
    return max(elements, key=elements.__getitem__, default=torch.float32)


def model_input(images: Tensor, model: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """``images`` in ``model``'s floating dtype (``dtype``, where the caller
    has looked it up already: module_dtype walks every parameter, too slow
    for each batch): a loader of float64 images (numpy's default) feeds
    float32 models. Integer inputs (token or class ids) stay as they are;
    autocast still casts inside the model."""
    if images.is_floating_point():
        return images.to(dtype or module_dtype(model))
    return images
