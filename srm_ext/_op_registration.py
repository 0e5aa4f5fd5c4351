"""Fake kernels and autograd for the compiled ``torch.ops.srm_ext`` operators.

The schemas live in ``csrc/registration.cpp``; the kernels in ``csrc/cpu`` and
``csrc/cuda``. Fake kernels give output metadata so the ops trace under
``torch.compile``; autograd routes every forward op to its backward op.

That autograd is reverse mode only: torch.library has no forward-mode
formula for a C++ op, and torch.func's transforms refuse its backward. The
public functions send calls under forward-mode AD or ``torch.func.grad`` and
its kin to :mod:`srm_ext.reference` instead (``_backend.needs_reference_autograd``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_LIB = "srm_ext"


def _masked(t: Tensor, wanted: bool, *shape: int) -> Tensor:
    """The shape a backward op returns for one gradient (``(0,)`` when not wanted)."""
    return t.new_empty(shape if wanted else (0,))


def _masked_like(t: Tensor, wanted: bool) -> Tensor:
    """A gradient laid out like ``t`` (the kernels use ``empty_like``)."""
    return torch.empty_like(t) if wanted else t.new_empty((0,))


def _grad_or_none(grad: Tensor, wanted: bool) -> Tensor | None:
    return grad if wanted else None


# --- fake kernels ----------------------------------------------------------


def _fake(op: str):
    """Register a fake kernel for ``op``. It also serves as the op's Meta
    kernel, which the dispatcher picks when any tensor argument is on the meta
    device: with the others elsewhere, it would return empty (unwritten)
    tensors there, so that mix is refused as the real kernels refuse it."""

    def register(fake):
        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            devices = {t.device.type for t in tensors}
            if "meta" in devices and len(devices) > 1:
                others = ", ".join(sorted(devices - {"meta"}))
                raise RuntimeError(
                    f"{_LIB}::{op}: its tensors are on meta and {others}; expected them all "
                    "on one device"
                )
            return fake(*args, **kwargs)

        return torch.library.register_fake(f"{_LIB}::{op}")(checked)

    return register


@_fake("sparse_encode")
def _(x, dictionary, intercept, k):
    n, _, h, w = x.shape
    return x.new_empty(n, h, w, k), x.new_empty(n, h, w, k, dtype=torch.int64)


@_fake("sparse_encode_backward")
def _(grad_values, values, indices, x, dictionary, intercept, output_mask):
    return (
        _masked_like(x, output_mask[0]),
        _masked_like(dictionary, output_mask[1]),
        _masked(x, output_mask[2]),
    )


@_fake("sparse_decode")
def _(values, indices, dictionary):
    n, h, w, _ = values.shape
    return values.new_empty(n, dictionary.shape[0], h, w)


@_fake("sparse_decode_backward")
def _(grad_output, values, indices, dictionary, output_mask):
    return (
        _masked(values, output_mask[0], *values.shape),
        _masked_like(dictionary, output_mask[1]),
    )


@_fake("reconstruction_loss")
def _(x, dictionary, intercept, k):
    n, _, h, w = x.shape
    return (
        x.new_empty(()),
        x.new_empty(n, h, w, k),
        x.new_empty(n, h, w, k, dtype=torch.int64),
    )


@_fake("reconstruction_loss_backward")
def _(grad_loss, x, dictionary, intercept, values, indices, output_mask):
    return (
        _masked_like(x, output_mask[0]),
        _masked_like(dictionary, output_mask[1]),
        _masked(x, output_mask[2]),
    )


@_fake("sparse_labels")
def _(values, indices, num_codewords):
    n, h, w, _ = values.shape
    return (
        indices.new_empty(n, h, w),
        values.new_empty(n, num_codewords),
    )


@_fake("predictor_loss")
def _(y, dictionary, intercept, pixel_labels, image_labels, local_weight, global_weight,
      output_mask):
    n, d, h, w = y.shape
    # Gradients for a unit upstream gradient; float16's are kept in float32.
    grad_dtype = torch.float32 if y.dtype == torch.float16 else y.dtype

    def formed(wanted, make):
        return make() if wanted else y.new_empty(0, dtype=grad_dtype)

    return (
        y.new_empty(()),
        # (dz @ C_s^T) viewed as NCHW: channels-last strides.
        formed(
            output_mask[0],
            lambda: y.new_empty(n, h, w, d, dtype=grad_dtype).permute(0, 3, 1, 2),
        ),
        formed(output_mask[1], lambda: torch.empty_like(dictionary, dtype=grad_dtype)),
        formed(output_mask[2], lambda: y.new_empty((), dtype=grad_dtype)),
    )


@_fake("predictor_loss_backward")
def _(grad_loss, grad_y, grad_dictionary, grad_intercept, y, dictionary, output_mask):
    def scaled(unit, wanted):
        if not wanted:
            return grad_loss.new_empty(0)
        return torch.empty_like(unit, dtype=grad_loss.dtype)

    return (
        scaled(grad_y, output_mask[0]),
        scaled(grad_dictionary, output_mask[1]),
        scaled(grad_intercept, output_mask[2]),
    )


# --- autograd --------------------------------------------------------------


def _saveable(t: Tensor) -> Tensor:
    """``t``, or a copy of it where autograd refuses to save it: a tensor made
    under torch.inference_mode, such as features of a teacher run in it."""
    return t.detach().clone() if t.is_inference() else t


def _save_encoder_state(ctx, x, dictionary, intercept, values, indices):
    """What the encoder's backward ops need, saved by both encoder ops."""
    # A copy of the intercept (16-bit backward recomputes the pre-activations
    # with it): the reference's autograd keeps none, so updating it in place
    # before backward must not fail here either.
    ctx.save_for_backward(
        _saveable(x), _saveable(dictionary), intercept.detach().clone(), values, indices
    )
    ctx.intercept_shape = intercept.shape
    ctx.wanted = tuple(ctx.needs_input_grad[:3])


def _encode_setup(ctx, inputs, output):
    x, dictionary, intercept, _ = inputs
    values, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # see _predictor_setup
    _save_encoder_state(ctx, x, dictionary, intercept, values, indices)


def _encode_backward(ctx, grad_values, _grad_indices):
    x, dictionary, intercept, values, indices = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None
    gx, gc, gb = torch.ops.srm_ext.sparse_encode_backward(
        grad_values.contiguous(), values, indices, x, dictionary, intercept, list(ctx.wanted)
    )
    gb = gb.reshape(ctx.intercept_shape) if ctx.wanted[2] else None
    return _grad_or_none(gx, ctx.wanted[0]), _grad_or_none(gc, ctx.wanted[1]), gb, None


def _decode_setup(ctx, inputs, output):
    values, indices, dictionary = inputs
    ctx.save_for_backward(*map(_saveable, (values, indices, dictionary)))
    ctx.wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])


def _decode_backward(ctx, grad_output):
    values, indices, dictionary = ctx.saved_tensors
    gv, gc = torch.ops.srm_ext.sparse_decode_backward(
        grad_output, values, indices, dictionary, list(ctx.wanted)
    )
    return _grad_or_none(gv, ctx.wanted[0]), None, _grad_or_none(gc, ctx.wanted[1])


def _reconstruction_setup(ctx, inputs, output):
    x, dictionary, intercept, _ = inputs
    _, values, indices = output
    ctx.mark_non_differentiable(values, indices)
    ctx.set_materialize_grads(False)  # see _predictor_setup
    _save_encoder_state(ctx, x, dictionary, intercept, values, indices)


def _reconstruction_backward(ctx, grad_loss, _grad_values, _grad_indices):
    if grad_loss is None:
        return None, None, None, None
    x, dictionary, intercept, values, indices = ctx.saved_tensors
    gx, gc, gb = torch.ops.srm_ext.reconstruction_loss_backward(
        grad_loss, x, dictionary, intercept, values, indices, list(ctx.wanted)
    )
    gb = gb.reshape(ctx.intercept_shape) if ctx.wanted[2] else None
    return _grad_or_none(gx, ctx.wanted[0]), _grad_or_none(gc, ctx.wanted[1]), gb, None


def _predictor_setup(ctx, inputs, output):
    _, grad_y, grad_dictionary, grad_intercept = output
    ctx.mark_non_differentiable(grad_y, grad_dictionary, grad_intercept)
    # Otherwise autograd hands the backward zero-filled tensors for the
    # non-differentiable outputs, each a pass over memory for nothing.
    ctx.set_materialize_grads(False)
    # The op formed the gradients in forward (for a unit upstream gradient):
    # the backward only scales them. y and the dictionary go to the backward
    # op too, so that the gradients it returns have them in their history.
    y, dictionary = inputs[:2]
    ctx.save_for_backward(
        grad_y, grad_dictionary, grad_intercept, _saveable(y), _saveable(dictionary)
    )
    ctx.intercept_shape = inputs[2].shape
    ctx.formed = tuple(inputs[7])
    ctx.wanted = tuple(ctx.needs_input_grad[:3])


def _predictor_backward(ctx, grad_loss, *_grad_unit_grads):
    if grad_loss is None:
        return (None,) * 8
    missing = [
        name
        for name, wanted, formed in zip(("y", "dictionary", "intercept"), ctx.wanted, ctx.formed)
        if wanted and not formed
    ]
    if missing:
        raise RuntimeError(
            f"srm_ext: predictor_loss formed no gradient for {', '.join(missing)}: its "
            "output_mask was off there when the op ran; srm_ext.predictor_loss sets it from "
            "requires_grad"
        )
    gy, gc, gb = torch.ops.srm_ext.predictor_loss_backward(
        grad_loss, *ctx.saved_tensors, list(ctx.wanted)
    )
    gb = gb.reshape(ctx.intercept_shape) if ctx.wanted[2] else None
    return (
        _grad_or_none(gy, ctx.wanted[0]),
        _grad_or_none(gc, ctx.wanted[1]),
        gb,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    f"{_LIB}::sparse_encode", _encode_backward, setup_context=_encode_setup
)
torch.library.register_autograd(
    f"{_LIB}::sparse_decode", _decode_backward, setup_context=_decode_setup
)
torch.library.register_autograd(
    f"{_LIB}::reconstruction_loss",
    _reconstruction_backward,
    setup_context=_reconstruction_setup,
)
torch.library.register_autograd(
    f"{_LIB}::predictor_loss", _predictor_backward, setup_context=_predictor_setup
)


# The backward ops are differentiable only once. Without an autograd kernel,
# create_graph=True would give gradients detached from their inputs (a
# warning, then silently missing second-order terms); with this one, the
# first-order gradients are exact and differentiating them raises.
def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"srm_ext: the compiled {op} is differentiable once only; for higher-order "
            "gradients use srm_ext.reference or set SRM_EXT_BACKEND=reference"
        )

    return backward


for _op in ("sparse_encode", "sparse_decode", "reconstruction_loss", "predictor_loss"):
    torch.library.register_autograd(
        f"{_LIB}::{_op}_backward",
        _no_double_backward(_op),
        setup_context=lambda ctx, inputs, output: None,
    )
