"""The public SRM ops: compiled kernels where present, the reference elsewhere.

Shapes and math: ``../shared/srm-spec.md``. Every function validates its
arguments' shapes and dtypes, then calls ``torch.ops.srm_ext.*`` when a compiled
kernel covers the input's device and dtype, else :mod:`srm_ext.reference` (with
a one-time warning). Whichever runs checks the index and label ranges, so they
are read once (a device sync on a GPU) and raise the same ``ValueError``.
``SRM_EXT_BACKEND=reference`` forces the reference. The compiled ops define a
backward only: calls under forward-mode AD (``torch.func.jvp``,
``torch.autograd.forward_ad``) or ``torch.func.grad``/``vjp``/``jacrev`` run
the reference, which supports them.

Under autocast the functions cast their floating tensors to the widest dtype
among them and run with autocast off: the ops need one dtype for all their
tensors, and autocast hands over a layer's output in half precision while the
dictionary stays in float32, so a layer's features meet the float32 parameters
in float32, as in :mod:`srm_ext.modules`. Tensors that all have one half
dtype run the half-precision kernels, with autocast on or off.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from . import _validation, reference
from ._backend import needs_reference_autograd, transform_depth, use_native

__all__ = [
    "sparse_encode",
    "sparse_decode",
    "reconstruction_loss",
    "sparse_labels",
    "predictor_loss",
]


def _has_autocast(device_type: str) -> bool:
    """Whether autocast knows ``device_type``: torch.autocast and
    is_autocast_enabled raise for one it does not (meta)."""
    # Traced tensors live on devices autocast knows, and torch 2.11's Dynamo
    # cannot trace is_autocast_available (a graph break).
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def _autocast_enabled(device_type: str) -> bool:
    return _has_autocast(device_type) and torch.is_autocast_enabled(device_type)


def _promote_under_autocast(fn):
    """Under autocast, runs ``fn`` on its floating tensors cast to the widest of
    their dtypes, with autocast off (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if not tensors or not _autocast_enabled(tensors[0].device.type):
            return fn(*args, **kwargs)
        device_type = tensors[0].device.type
        dtypes = [t.dtype for t in tensors if t.is_floating_point()]
        widest = functools.reduce(torch.promote_types, dtypes) if dtypes else None

        def cast(a):
            floating = isinstance(a, Tensor) and a.is_floating_point()
            return a.to(widest) if floating else a

        with torch.autocast(device_type, enabled=False):
            return fn(*map(cast, args), **{name: cast(a) for name, a in kwargs.items()})

    return wrapper


def _gradients_wanted(*tensors: Tensor) -> list[bool]:
    """Which of ``tensors`` autograd may ask gradients for. Under torch.func's
    transforms a wrapper's requires_grad need not be that of the tensor autograd
    records beneath it (vmap's wrappers report False), so there all are."""
    if not torch.is_grad_enabled():
        return [False] * len(tensors)
    if torch.compiler.is_compiling():
        # Traced tensors do not show their wrappers; the transform stack does.
        under_transform = transform_depth() > 0
    else:
        under_transform = any(map(is_functorch_wrapped_tensor, tensors))
    if under_transform:
        return [True] * len(tensors)
    return [t.requires_grad for t in tensors]


def _code_sizes(dictionary: Tensor, k: int) -> dict[str, int]:
    return {"D": dictionary.shape[0], "K": dictionary.shape[1], "k": k}


def _native(
    t: Tensor, inputs: tuple[Tensor, ...], code_sizes: dict[str, int] | None = None
) -> bool:
    """Whether the compiled op serves a call on ``inputs`` with main input ``t``."""
    return not needs_reference_autograd(*inputs) and use_native(t, code_sizes)


@_promote_under_autocast
def sparse_encode(
    x: Tensor, dictionary: Tensor, intercept: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k sparse code of each pixel of ``x`` (N, D, H, W) over ``dictionary`` (D, K).

    Returns ``values`` (N, H, W, k), the sigmoid similarities sorted descending,
    and ``indices`` (N, H, W, k) int64; ties go to the lower codeword index.
    Differentiable with respect to ``x``, ``dictionary`` and ``intercept``.
    """
    k = _validation.validate_encode(x, dictionary, intercept, k)
    if _native(x, (x, dictionary, intercept), _code_sizes(dictionary, k)):
        return tuple(torch.ops.srm_ext.sparse_encode(x, dictionary, intercept, k))
    return reference.sparse_encode(x, dictionary, intercept, k)


@_promote_under_autocast
def sparse_decode(values: Tensor, indices: Tensor, dictionary: Tensor) -> Tensor:
    """Reconstruction (N, D, H, W) from a sparse code; differentiable w.r.t.
    ``values`` and ``dictionary``."""
    _validation.validate_decode(values, indices, dictionary, check_ranges=False)
    if _native(values, (values, dictionary), _code_sizes(dictionary, values.shape[-1])):
        return torch.ops.srm_ext.sparse_decode(values, indices, dictionary)
    return reference.sparse_decode(values, indices, dictionary)


@_promote_under_autocast
def reconstruction_loss(x: Tensor, dictionary: Tensor, intercept: Tensor, k: int) -> Tensor:
    """Fused stage-1 loss, equal to
    ``mean((sparse_decode(*sparse_encode(x, C, b, k), C) - x) ** 2)``."""
    k = _validation.validate_encode(x, dictionary, intercept, k)
    if _native(x, (x, dictionary, intercept), _code_sizes(dictionary, k)):
        return torch.ops.srm_ext.reconstruction_loss(x, dictionary, intercept, k)[0]
    return reference.reconstruction_loss(x, dictionary, intercept, k)


@_promote_under_autocast
def sparse_labels(values: Tensor, indices: Tensor, num_codewords: int) -> tuple[Tensor, Tensor]:
    """Stage-2 targets: ``pixel_labels`` (N, H, W) int64, the argmax codeword of
    each pixel, and ``image_labels`` (N, K), the per-image mean of the kept values.
    Carries no gradient."""
    num_codewords = _validation.validate_labels(
        values, indices, num_codewords, check_ranges=False
    )
    # Labels carry no gradient: the compiled op serves calls under jvp or grad too.
    if use_native(values, {"K": num_codewords}):
        return tuple(torch.ops.srm_ext.sparse_labels(values.detach(), indices, num_codewords))
    return reference.sparse_labels(values, indices, num_codewords)


@_promote_under_autocast
def predictor_loss(
    y: Tensor,
    dictionary: Tensor,
    intercept: Tensor,
    pixel_labels: Tensor,
    image_labels: Tensor,
    local_weight: float = 1.0,
    global_weight: float = 1.0,
) -> Tensor:
    """Stage-2 loss of a student feature map ``y`` (N, D_s, H, W) against the
    teacher's labels; differentiable w.r.t. ``y``, ``dictionary`` and ``intercept``."""
    local_weight, global_weight = _validation.validate_predictor(
        y,
        dictionary,
        intercept,
        pixel_labels,
        image_labels,
        local_weight,
        global_weight,
        check_ranges=False,
    )
    if _native(y, (y, dictionary, intercept)):
        # The op forms the gradients in forward, so it is told which are wanted.
        wanted = _gradients_wanted(y, dictionary, intercept)
        return torch.ops.srm_ext.predictor_loss(
            y,
            dictionary,
            intercept,
            pixel_labels,
            image_labels.detach(),
            local_weight,
            global_weight,
            wanted,
        )[0]
    return reference.predictor_loss(
        y, dictionary, intercept, pixel_labels, image_labels, local_weight, global_weight
    )

