"""The compiled ops as torch operators: opcheck, gradcheck, torch.compile."""

from __future__ import annotations

import itertools
import warnings
import re

import pytest
import torch
from torch.library import opcheck

import srm_ext
from srm_ext import reference

from conftest import codeword_major, requires_native_cpu

pytestmark = requires_native_cpu

ops = torch.ops.srm_ext


def encode_inputs(dtype=torch.float64, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 3, 4, dtype=dtype, generator=g)
    C = torch.randn(5, 9, dtype=dtype, generator=g)
    b = torch.randn(1, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (x, C, b)]


def predictor_inputs(dtype=torch.float64, requires_grad=False):
    x, C, b = encode_inputs(dtype)
    values, indices = reference.sparse_encode(x, C, b, 3)
    pixel, image = reference.sparse_labels(values, indices, 9)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 4, 3, 4, dtype=dtype, generator=g)
    Cs = torch.randn(4, 9, dtype=dtype, generator=g)
    bs = torch.randn(1, dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (y, Cs, bs)], pixel, image


def op_cases():
    x, C, b = encode_inputs()
    xg, Cg, bg = encode_inputs(requires_grad=True)
    values, indices = reference.sparse_encode(x, C, b, 3)
    (y, Cs, bs), pixel, image = predictor_inputs()
    (yg, Csg, bsg), _, _ = predictor_inputs(requires_grad=True)
    _, *unit_grads = ops.predictor_loss(y, Cs, bs, pixel, image, 1.0, 1.0, [True, True, True])
    grad_values = torch.randn_like(values)
    one = torch.tensor(1.0, dtype=torch.float64)
    return {
        "sparse_encode": (ops.sparse_encode.default, (xg, Cg, bg, 3)),
        "sparse_encode_backward": (
            ops.sparse_encode_backward.default,
            (grad_values, values, indices, x, C, b, [True, True, True]),
        ),
        "sparse_encode_backward_masked": (
            ops.sparse_encode_backward.default,
            (grad_values, values, indices, x, C, b, [False, True, False]),
        ),
        "sparse_decode": (
            ops.sparse_decode.default,
            (values.clone().requires_grad_(True), indices, Cg),
        ),
        "sparse_decode_backward": (
            ops.sparse_decode_backward.default,
            (torch.randn_like(x), values, indices, C, [True, True]),
        ),
        "reconstruction_loss": (ops.reconstruction_loss.default, (xg, Cg, bg, 3)),
        "reconstruction_loss_codeword_major": (
            ops.reconstruction_loss.default,
            (xg, codeword_major(Cg.detach()).requires_grad_(True), bg, 3),
        ),
        "sparse_encode_backward_channels_last": (
            ops.sparse_encode_backward.default,
            (grad_values, values, indices, x.contiguous(memory_format=torch.channels_last),
             codeword_major(C), b, [True, True, True]),
        ),
        "reconstruction_loss_backward": (
            ops.reconstruction_loss_backward.default,
            (one, x, C, b, values, indices, [True, True, True]),
        ),
        "sparse_labels": (ops.sparse_labels.default, (values, indices, 9)),
        # k = 1: the pixel labels are the indices' only column, yet a new tensor.
        "sparse_labels_k1": (
            ops.sparse_labels.default, (values[..., :1].contiguous(), indices[..., :1].contiguous(), 9)
        ),
        "predictor_loss": (
            ops.predictor_loss.default,
            (yg, Csg, bsg, pixel, image, 0.5, 2.0, [True, True, True]),
        ),
        # Only the dictionary's gradient formed: the others are (0,)-shaped.
        "predictor_loss_masked": (
            ops.predictor_loss.default,
            (y, Csg, bs, pixel, image, 0.5, 2.0, [False, True, False]),
        ),
        "predictor_loss_backward": (
            ops.predictor_loss_backward.default,
            (one, *unit_grads, y, Cs, [True, True, True]),
        ),
    }


CASES = op_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    opcheck(op, args)


def test_every_schema_is_covered_by_opcheck():
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("srm_ext::")}
    covered = {op._schema.name.split("::")[1] for op, _ in CASES.values()}
    assert schemas == covered


def test_gradcheck_sparse_encode():
    x, C, b = encode_inputs(requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: srm_ext.sparse_encode(*a, 3)[0], (x, C, b))


def test_gradcheck_sparse_decode():
    x, C, b = encode_inputs()
    values, indices = reference.sparse_encode(x, C, b, 3)
    values.requires_grad_(True)
    C.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, c: srm_ext.sparse_decode(v, indices, c), (values, C))


def test_gradcheck_reconstruction_loss():
    x, C, b = encode_inputs(requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: srm_ext.reconstruction_loss(*a, 3), (x, C, b))


@pytest.mark.parametrize("op", ["sparse_encode", "reconstruction_loss"])
def test_intercept_updated_in_place_before_backward(op):
    # As with the reference, whose autograd keeps no intercept: an optimizer
    # step on it between forward and backward does not break the backward.
    x, C, b = encode_inputs(requires_grad=True)
    out = getattr(srm_ext, op)(x, C, b, 3)
    loss = out[0].sum() if isinstance(out, tuple) else out
    want = torch.autograd.grad(loss, (x, C, b), retain_graph=True)
    with torch.no_grad():
        b.add_(1.0)
    got = torch.autograd.grad(loss, (x, C, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_gradcheck_predictor_loss():
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: srm_ext.predictor_loss(*a, pixel, image, 0.7, 1.3), (y, Cs, bs)
    )


def test_predictor_loss_keeps_only_input_sized_gradients_for_backward():
    # The gradients are formed in forward: backward holds tensors the size of
    # y, the dictionary and the intercept, no (N, H, W, K) one.
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image)
    saved = loss.grad_fn.saved_tensors
    # The formed gradients, and y and the dictionary themselves (not copies).
    shapes = [tuple(y.shape), tuple(Cs.shape), ()] + [tuple(y.shape), tuple(Cs.shape)]
    assert sorted(tuple(t.shape) for t in saved) == sorted(shapes)
    assert any(t is y for t in saved) or any(t.data_ptr() == y.data_ptr() for t in saved)


def test_backward_is_not_handed_zeros_for_the_formed_gradients():
    # predictor_loss's gradient outputs are non-differentiable; if autograd
    # materialised zero gradients for them, backward would allocate and fill
    # tensors as large as the inputs for nothing.
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    fills = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")]
    assert not [e for e in fills if [list(y.shape)] == e.input_shapes[:1]]
    assert not [e for e in fills if [list(Cs.shape)] == e.input_shapes[:1]]
    assert y.grad is not None and Cs.grad is not None and bs.grad is not None


def test_predictor_loss_gradients_follow_the_output_mask():
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    want = torch.autograd.grad(srm_ext.predictor_loss(y, Cs, bs, pixel, image), (y, Cs, bs))
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        loss, *grads = ops.predictor_loss(y, Cs, bs, pixel, image, 1.0, 1.0, mask)
        for grad, expected, formed in zip(grads, want, mask):
            if formed:
                torch.testing.assert_close(grad.reshape(expected.shape), expected, rtol=0, atol=0)
            else:
                assert grad.shape == (0,)


@pytest.mark.parametrize("mask", [list(m) for m in itertools.product([False, True], repeat=3)])
def test_reconstruction_loss_backward_follows_the_output_mask(mask):
    x, C, b = encode_inputs()
    _, values, indices = ops.reconstruction_loss(x, C, b, 3)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    want = ops.reconstruction_loss_backward(upstream, x, C, b, values, indices, [True] * 3)
    grads = ops.reconstruction_loss_backward(upstream, x, C, b, values, indices, mask)
    for grad, expected, formed in zip(grads, want, mask):
        if formed:
            assert torch.equal(grad, expected)
        else:
            assert grad.shape == (0,)


def test_backward_through_an_unformed_gradient_names_it():
    # Called directly with the mask off for an input that requires grad, the
    # op has no gradient to give it: backward says so rather than inventing one.
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    loss = ops.predictor_loss(y, Cs, bs, pixel, image, 1.0, 1.0, [True, False, True])[0]
    with pytest.raises(RuntimeError, match="no gradient for dictionary.*output_mask"):
        loss.backward()


def _first_order_losses():
    x, C, b = encode_inputs(requires_grad=True)
    (y, Cs, bs), pixel, image = predictor_inputs(requires_grad=True)
    values, indices = srm_ext.sparse_encode(x, C, b, 3)
    return {
        "sparse_encode": (values.square().sum(), (x, C, b)),
        "sparse_decode": (srm_ext.sparse_decode(values, indices, C).square().sum(), (x, C, b)),
        "reconstruction_loss": (srm_ext.reconstruction_loss(x, C, b, 3), (x, C, b)),
        "predictor_loss": (srm_ext.predictor_loss(y, Cs, bs, pixel, image), (y, Cs, bs)),
    }


@pytest.mark.parametrize("op", ["sparse_encode", "sparse_decode", "reconstruction_loss", "predictor_loss"])
def test_create_graph_gives_exact_first_order_gradients(op):
    loss, inputs = _first_order_losses()[op]
    want = torch.autograd.grad(loss, inputs, retain_graph=True)
    got = torch.autograd.grad(loss, inputs, create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["sparse_encode", "sparse_decode", "reconstruction_loss", "predictor_loss"])
def test_second_order_gradients_raise_instead_of_dropping_terms(op):
    # A gradient penalty differentiates the gradients: the compiled backward
    # ops are differentiable once only, so this must raise, not silently
    # return a gradient without the second-order terms.
    loss, inputs = _first_order_losses()[op]
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match="differentiable once only.*srm_ext.reference"):
        penalty.backward()


def test_sparse_labels_carry_no_gradient():
    x, C, b = encode_inputs(requires_grad=True)
    values, indices = srm_ext.sparse_encode(x, C, b, 3)
    pixel, image = srm_ext.sparse_labels(values, indices, 9)
    assert not image.requires_grad and not pixel.requires_grad


def test_intercept_gradient_keeps_its_shape():
    x, C, _ = encode_inputs(requires_grad=True)
    for b in (torch.zeros((), dtype=torch.float64, requires_grad=True), torch.zeros(1, dtype=torch.float64, requires_grad=True)):
        srm_ext.reconstruction_loss(x, C, b, 3).backward()
        assert b.grad.shape == b.shape


def test_torch_compile_traces_without_graph_breaks():
    x, C, b = encode_inputs(dtype=torch.float32, requires_grad=True)
    (y, Cs, bs), pixel, image = predictor_inputs(dtype=torch.float32, requires_grad=True)

    def stage_losses(x, C, b, y, Cs, bs):
        values, indices = srm_ext.sparse_encode(x, C, b, 3)
        recon = srm_ext.reconstruction_loss(x, C, b, 3)
        decoded = srm_ext.sparse_decode(values, indices, C).square().mean()
        pixel_labels, image_labels = srm_ext.sparse_labels(values, indices, 9)
        student = srm_ext.predictor_loss(y, Cs, bs, pixel_labels, image_labels)
        return recon + decoded + student

    torch._dynamo.reset()
    compiled = torch.compile(stage_losses, backend="aot_eager", fullgraph=True)
    got = compiled(x, C, b, y, Cs, bs)
    want = stage_losses(x, C, b, y, Cs, bs)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, (C, b, Cs, bs))
    want_grads = torch.autograd.grad(want, (C, b, Cs, bs))
    torch.testing.assert_close(got_grads, want_grads)


def _differentiable_calls():
    """Each public op as a function of its differentiable inputs, with those inputs."""
    x, C, b = encode_inputs()
    values, indices = reference.sparse_encode(x, C, b, 3)
    (y, Cs, bs), pixel, image = predictor_inputs()
    return {
        "sparse_encode": (lambda mod, *a: mod.sparse_encode(*a, 3)[0], (x, C, b)),
        "sparse_decode": (lambda mod, v, c: mod.sparse_decode(v, indices, c), (values, C)),
        "reconstruction_loss": (lambda mod, *a: mod.reconstruction_loss(*a, 3), (x, C, b)),
        "predictor_loss": (
            lambda mod, *a: mod.predictor_loss(*a, pixel, image, 0.7, 1.3), (y, Cs, bs)
        ),
    }


DIFFERENTIABLE_OPS = ["sparse_encode", "sparse_decode", "reconstruction_loss", "predictor_loss"]


@pytest.mark.parametrize("op", DIFFERENTIABLE_OPS)
def test_forward_mode_derivatives_match_the_reference(op):
    # The compiled ops register a backward only: forward-mode AD must not
    # pass them by with zero (jvp) or missing (forward_ad) tangents.
    fn, primals = _differentiable_calls()[op]
    g = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=g) for p in primals)
    _, want = torch.func.jvp(lambda *a: fn(reference, *a), primals, tangents)
    assert want.abs().sum() > 0
    _, got = torch.func.jvp(lambda *a: fn(srm_ext, *a), primals, tangents)
    torch.testing.assert_close(got, want)

    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(fn(srm_ext, *duals)).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, want)


@pytest.mark.parametrize("op", DIFFERENTIABLE_OPS)
def test_func_grad_and_jacrev_match_the_reference(op):
    # torch.func refuses the compiled ops' backward (registered without the
    # setup_context of an autograd.Function it can transform).
    fn, primals = _differentiable_calls()[op]
    argnums = tuple(range(len(primals)))

    def total(mod):
        return lambda *a: fn(mod, *a).sum()

    for transform in (torch.func.grad, torch.func.jacrev):
        want = transform(total(reference), argnums=argnums)(*primals)
        got = transform(total(srm_ext), argnums=argnums)(*primals)
        torch.testing.assert_close(got, want)


def test_forward_mode_under_torch_compile_matches_the_reference():
    fn, (x, C, b) = _differentiable_calls()["reconstruction_loss"]
    tangent = torch.randn_like(C)

    def directional(mod):
        return lambda C, t: torch.func.jvp(lambda c: fn(mod, x, c, b), (C,), (t,))[1]

    torch._dynamo.reset()
    compiled = torch.compile(directional(srm_ext), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(C, tangent), directional(reference)(C, tangent))


def test_vmap_alone_keeps_the_compiled_ops(monkeypatch):
    # vmap needs no derivative: the compiled op serves every sample.
    called = []
    real = ops.reconstruction_loss
    monkeypatch.setattr(ops, "reconstruction_loss", lambda *a: called.append(1) or real(*a))
    x, C, b = encode_inputs()
    batch = torch.stack([x, x.flip(0)])
    got = torch.func.vmap(lambda x: srm_ext.reconstruction_loss(x, C, b, 3))(batch)
    assert called
    want = torch.stack([reference.reconstruction_loss(s, C, b, 3) for s in batch])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch_compile"])
@pytest.mark.parametrize("batched", ["y", "dictionary"])
def test_backward_through_vmap_of_the_stage2_loss_matches_the_reference(batched, compiled):
    # The compiled op forms its gradients in forward; under vmap's wrappers,
    # whose requires_grad is False, it must still form those autograd asks for.
    # Under torch.compile the traced tensors do not show vmap's wrappers.
    (y, Cs, bs), pixel, image = predictor_inputs()
    ys = torch.stack([y, y.flip(0)]) if batched == "y" else y
    Css = torch.stack([Cs, -Cs]) if batched == "dictionary" else Cs
    in_dims = (0, None) if batched == "y" else (None, 0)

    def gradients(mod, wrap=lambda f: f):
        leaves = [t.detach().clone().requires_grad_() for t in (ys, Css, bs)]
        batched_loss = wrap(
            lambda y_, C_, b_: torch.func.vmap(
                lambda yy, CC: mod.predictor_loss(yy, CC, b_, pixel, image), in_dims
            )(y_, C_)
        )
        loss = batched_loss(*leaves)
        return torch.autograd.grad((loss * torch.tensor([1.0, 2.0], dtype=loss.dtype)).sum(), leaves)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule")  # per-sample fallback
        if compiled:
            got = gradients(srm_ext, lambda f: torch.compile(f, backend="aot_eager"))
        else:
            got = gradients(srm_ext)
    for g, w in zip(got, gradients(reference)):
        torch.testing.assert_close(g, w)


def test_vmap_checks_the_indices_of_every_sample():
    # The range checks read the values under vmap's wrapper: all samples.
    x, C, b = encode_inputs()
    values, indices = reference.sparse_encode(x, C, b, 3)
    decode = torch.func.vmap(lambda v, i: srm_ext.sparse_decode(v, i, C))
    got = decode(torch.stack([values, values / 2]), torch.stack([indices, indices]))
    torch.testing.assert_close(got[1], reference.sparse_decode(values / 2, indices, C))
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 9)")):
        decode(torch.stack([values, values]), torch.stack([indices, indices + 9]))


def test_jacfwd_of_the_stage2_loss_matches_the_reference():
    # jacfwd is vmap over jvp: the reference serves it, range checks included.
    (y, Cs, bs), pixel, image = predictor_inputs()
    got = torch.func.jacfwd(lambda c: srm_ext.predictor_loss(y, c, bs, pixel, image))(Cs)
    want = torch.func.jacfwd(lambda c: reference.predictor_loss(y, c, bs, pixel, image))(Cs)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", ["sparse_encode", "sparse_decode", "reconstruction_loss", "predictor_loss"])
def test_features_made_under_inference_mode_train_the_dictionary(op):
    # A frozen teacher is often run under torch.inference_mode; autograd will
    # not save its outputs, so the ops keep a copy where they need one.
    x, C, b = encode_inputs()
    values, indices = reference.sparse_encode(x, C, b, 3)
    (y, Cs, bs), pixel, image = predictor_inputs()
    with torch.inference_mode():
        x, values, y = x.clone(), values.clone(), y.clone()
        pixel, image = pixel.clone(), image.clone()  # the teacher's labels, too
    calls = {
        "sparse_encode": lambda mod, C, b: mod.sparse_encode(x, C, b, 3)[0],
        "sparse_decode": lambda mod, C, b: mod.sparse_decode(values, indices, C),
        "reconstruction_loss": lambda mod, C, b: mod.reconstruction_loss(x, C, b, 3),
        "predictor_loss": lambda mod, C, b: mod.predictor_loss(y, C, b, pixel, image),
    }
    dictionary, intercept = (Cs, bs) if op == "predictor_loss" else (C, b)

    def gradients(mod):
        leaves = [t.detach().clone().requires_grad_() for t in (dictionary, intercept)]
        out = calls[op](mod, *leaves)
        return torch.autograd.grad(out.sum(), leaves, allow_unused=True)

    assert all(t.is_inference() for t in (x, values, y, pixel, image))
    for g, w in zip(gradients(srm_ext), gradients(reference)):
        torch.testing.assert_close(g, w)
