"""The public ops under autocast: a layer's half-precision output meets the
float32 dictionary, and the ops run in float32 on both, with autocast off
inside. So under autocast every op must give exactly what it gives outside
autocast on the float32 copies, and the float32 parameters get float32
gradients. CUDA cases (float16 and bfloat16) skip without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import srm_ext

N, D, H, W, K, KEEP = 2, 8, 5, 3, 16, 3

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    *[
        pytest.param(
            "cuda", dtype, id=f"cuda-{str(dtype)[6:]}",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
        )
        for dtype in (torch.float16, torch.bfloat16)
    ],
]


def layer_output(x: torch.Tensor) -> torch.Tensor:
    """x through a 1x1 identity convolution: under autocast, x rounded to the
    autocast dtype, as a real layer's output would be."""
    eye = torch.eye(x.shape[1], device=x.device).view(x.shape[1], x.shape[1], 1, 1)
    return F.conv2d(x, eye)


def inputs(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, H, W, generator=g).to(device)
    C = torch.randn(D, K, generator=g).to(device).requires_grad_()
    b = torch.zeros(1, device=device, requires_grad=True)
    return x, C, b


@pytest.mark.parametrize("device, dtype", CASES)
def test_ops_promote_to_float32_under_autocast(device, dtype):
    x, C, b = inputs(device)
    with torch.no_grad():
        pixel, image = srm_ext.sparse_labels(*srm_ext.sparse_encode(x, C, b, KEEP), K)
    with torch.autocast(device, dtype=dtype):
        features = layer_output(x)
        assert features.dtype == dtype
        values, indices = srm_ext.sparse_encode(features, C, b, KEEP)
        x_hat = srm_ext.sparse_decode(values.to(dtype), indices, C)
        loss = srm_ext.reconstruction_loss(features, C, b, KEEP)
        labels = srm_ext.sparse_labels(values.to(dtype), indices, K)  # no float32 input here
        student = srm_ext.predictor_loss(features, C, b, pixel, image.to(dtype))
    promoted = features.float()
    want_values, want_indices = srm_ext.sparse_encode(promoted, C, b, KEEP)
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(values, want_values, **exact)
    torch.testing.assert_close(indices, want_indices, **exact)
    torch.testing.assert_close(
        x_hat, srm_ext.sparse_decode(values.to(dtype).float(), indices, C), **exact
    )
    torch.testing.assert_close(loss, srm_ext.reconstruction_loss(promoted, C, b, KEEP), **exact)
    torch.testing.assert_close(labels, srm_ext.sparse_labels(values.to(dtype), indices, K), **exact)
    want_student = srm_ext.predictor_loss(promoted, C, b, pixel, image.to(dtype).float())
    torch.testing.assert_close(student, want_student, **exact)
    # Gradients: the same graph on float32 copies outside autocast, with the
    # explicit casts autocast's promotion stands for (values round-trip
    # through dtype). Compared term by term, since autograd may add the terms
    # in another order. CUDA adds the dictionary gradient with atomics.
    C32, b32 = C.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    values32, indices32 = srm_ext.sparse_encode(promoted, C32, b32, KEEP)
    terms = {
        "reconstruction_loss": (loss, srm_ext.reconstruction_loss(promoted, C32, b32, KEEP)),
        "predictor_loss": (
            student, srm_ext.predictor_loss(promoted, C32, b32, pixel, image.to(dtype).float())
        ),
        "sparse_decode": (
            x_hat.sum(), srm_ext.sparse_decode(values32.to(dtype).float(), indices32, C32).sum()
        ),
    }
    same = exact if device == "cpu" else {}
    for name, (term, want) in terms.items():
        got = torch.autograd.grad(term, (C, b), retain_graph=True)
        expected = torch.autograd.grad(want, (C32, b32), retain_graph=True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **same, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device, dtype", CASES)
def test_stage1_loss_under_autocast_and_torch_compile(device, dtype, monkeypatch):
    x, C, b = inputs(device)
    # Dynamo of torch 2.11 cannot trace is_autocast_available (fullgraph
    # fails): the ops must not call it while being traced.
    eager_only = torch.amp.is_autocast_available

    def untraceable(device_type):
        if torch.compiler.is_compiling():
            raise AssertionError("is_autocast_available called while tracing")
        return eager_only(device_type)

    monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=dtype):
            return srm_ext.reconstruction_loss(layer_output(x), C, b, KEEP)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))
    compiled(x).backward()
    C32, b32 = C.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        promoted = layer_output(x).float()
    srm_ext.reconstruction_loss(promoted, C32, b32, KEEP).backward()
    same = dict(rtol=0, atol=0) if device == "cpu" else {}
    torch.testing.assert_close(C.grad, C32.grad, **same)
    torch.testing.assert_close(b.grad, b32.grad, **same)


def test_keyword_arguments_are_promoted_too():
    x, C, b = inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = srm_ext.reconstruction_loss(x=layer_output(x), dictionary=C, intercept=b, k=KEEP)
    assert loss.dtype == torch.float32


def test_without_autocast_mixed_dtypes_still_raise():
    x, C, b = inputs("cpu")
    with pytest.raises(TypeError, match="dictionary has dtype torch.float32 but x has"):
        srm_ext.sparse_encode(x.bfloat16(), C, b, KEEP)
