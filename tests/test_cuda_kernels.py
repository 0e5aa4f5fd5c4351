"""CUDA kernels against the reference (skipped without a GPU).

Inputs are multiples of 1/8 (see conftest.dyadic): exact in float16 and
bfloat16, and their products and sums are exact in the float32 accumulators,
so every backend selects the same codewords and indices must match exactly.
Values and gradients are compared in float32 with per-dtype tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import srm_ext
from srm_ext import _backend, reference

from conftest import (
    MISRANKED_PIXEL,
    SUBNORMAL_PIXEL,
    assert_refused,
    beyond_float16,
    calls_every_backend_refuses,
    codeword_major,
    documented_order_inputs,
    dyadic,
    empty_input_calls,
    leaf_like,
    make_layout,
    on_cpu_in_float32,
    requires_cuda,
    tf32_screening_inputs,
    warp_order_dots,
)

pytestmark = requires_cuda

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for results in each input dtype, compared in float32.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=1e-2),
}
# Gradients are also compared by relative norm, which a zero or badly scaled
# gradient cannot pass (unlike an atol above the gradient's own size).
GRAD_RELATIVE_ERROR = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SHAPES = [
    (2, 8, 5, 7, 20, 4),
    (1, 3, 1, 1, 5, 1),
    (2, 4, 3, 3, 6, 6),
    (3, 17, 7, 5, 33, 7),
    (2, 64, 13, 11, 300, 9),
    (1, 16, 4, 4, 200, 128),
    (2, 256, 7, 7, 1024, 20),
    (2, 48, 3, 5, 700, 64),  # k = 64: top-k lists without slack between merges
    (2, 32, 3, 4, 150, 81),  # 64 < k: the larger lists, past 48 KiB of shared memory
    (1, 4096, 2, 3, 8192, 40),  # the largest D and K the encode and decode kernels take
]


@pytest.fixture(autouse=True)
def _compiled_and_exact(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the exact float32 path
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(params=["auto", "fused", "screened"])
def encode_path(request, monkeypatch):
    """Every encode path: "auto" runs a cuBLAS GEMM per box of pixels and the
    row-wise selection outside deterministic mode, "fused" the single kernel,
    "screened" a TF32 GEMM with exact rescoring for float32 (the GEMM for
    16-bit inputs)."""
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", request.param)
    return request.param


def inputs(shape, dtype, seed, layout="contiguous"):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    x = dyadic(n, d, h, w, dtype=torch.float32, generator=g)
    # Scaled by a power of two near 1/sqrt(D / 16), so that pre-activations
    # stay about as spread at every D: at D = 4096 the unscaled kept ones lie
    # past 15, where the float32 sigmoid is 1 and every gradient through it 0.
    shrink = 2 ** max(0, round(math.log2(d) / 2) - 2)
    C = dyadic(d, K, dtype=torch.float32, generator=g, span=1) / (4 * shrink)
    b = dyadic(1, dtype=torch.float32, generator=g)
    on_device = [make_layout(x.to(DEVICE, dtype), layout), C.to(DEVICE, dtype), b.to(DEVICE, dtype)]
    return on_device, [x, C, b], k


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOLERANCES[dtype])


def relative_error(actual, expected):
    expected = expected.float().cpu()
    return float((actual.float().cpu() - expected).norm() / expected.norm())


def close_grads(got, want, dtype, names=("x", "dictionary", "intercept")):
    """Each gradient elementwise within the dtype's tolerances and within its
    relative-norm bound; the expected gradients must not vanish."""
    for name, g, w in zip(names, got, want):
        assert float(w.abs().max()) > 0, f"the {name} gradient of the reference is zero"
        close(g, w, dtype)
        assert relative_error(g, w) < GRAD_RELATIVE_ERROR[dtype], name


def grads(fn, leaves_in, upstream=None):
    leaves = [leaf_like(t) for t in leaves_in]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    weight = torch.ones_like(out) if upstream is None else upstream.to(out)
    return torch.autograd.grad((out * weight).sum(), leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_encode(shape, dtype, layout, encode_path):
    (x, C, b), ref_in, k = inputs(shape, dtype, seed=0, layout=layout)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(*ref_in, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, dtype)
    # Representable in dtype, so that both sides weight by the same numbers.
    upstream = torch.randn(ref_values.shape).to(dtype).float()
    close_grads(
        grads(lambda *a: srm_ext.sparse_encode(*a, k), (x, C, b), upstream.to(DEVICE)),
        grads(lambda *a: reference.sparse_encode(*a, k), ref_in, upstream),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode(shape, dtype):
    (x, C, b), ref_in, k = inputs(shape, dtype, seed=1)
    ref_values, indices = reference.sparse_encode(*ref_in, k)
    values = ref_values.to(DEVICE).to(dtype)
    close(srm_ext.sparse_decode(values, indices.to(DEVICE), C), reference.sparse_decode(values.float().cpu(), indices, ref_in[1]), dtype)
    close_grads(
        grads(lambda v, c: srm_ext.sparse_decode(v, indices.to(DEVICE), c), (values, C)),
        grads(lambda v, c: reference.sparse_decode(v, indices, c), (values.float().cpu(), ref_in[1])),
        dtype,
        names=("values", "dictionary"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_reconstruction_loss(shape, dtype, deterministic, encode_path):
    (x, C, b), ref_in, k = inputs(shape, dtype, seed=2)
    torch.use_deterministic_algorithms(deterministic)
    try:
        close(srm_ext.reconstruction_loss(x, C, b, k), reference.reconstruction_loss(*ref_in, k), dtype)
        close_grads(
            grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b)),
            grads(lambda *a: reference.reconstruction_loss(*a, k), ref_in),
            dtype,
        )
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_backward_uses_the_unrounded_sigmoid(dtype):
    # Pre-activations near 10: every kept value rounds to exactly 1 in float16
    # and bfloat16, yet s (1 - s) is about 5e-5, so the gradients through the
    # sigmoid are small but not zero. Compared by relative norm, since the
    # per-dtype atol would pass a zero gradient. In the stage-1 loss the x and
    # dictionary gradients are dominated by the residual's direct terms; there
    # the intercept's gradient is the one that flows only through s (1 - s).
    (x, C, b), (rx, rC, rb), k = inputs((2, 16, 5, 6, 40, 5), dtype, seed=12)
    b, rb = torch.full_like(b, 10.0), torch.full_like(rb, 10.0)
    values, _ = srm_ext.sparse_encode(x, C, b, k)
    assert (values == 1).all()
    upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(13))
    loss_scale = torch.tensor(1024.0)  # lifts the loss gradients out of float16's subnormals
    cases = [
        (lambda *a: srm_ext.sparse_encode(*a, k), lambda *a: reference.sparse_encode(*a, k), upstream),
        (lambda *a: srm_ext.reconstruction_loss(*a, k), lambda *a: reference.reconstruction_loss(*a, k), loss_scale),
    ]
    for native, ref, weight in cases:
        got = grads(native, (x, C, b), weight.to(DEVICE))
        want = grads(ref, (rx, rC, rb), weight)
        for name, g, w in zip(("x", "dictionary", "intercept"), got, want):
            assert float(w.abs().max()) > 0
            assert relative_error(g, w) < 2e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_loss_backward_over_many_pixel_boxes_matches_reference(dtype, layout, deterministic, monkeypatch):
    # The backward walks the pixels in boxes of a bounded workspace (D + 3k
    # values per pixel). A budget of 64 pixels splits the first map into
    # three boxes of one image, the second into eight boxes of rows.
    monkeypatch.setenv("SRM_EXT_CUDA_BOX_VALUES", str(64 * (16 + 3 * 3)))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for shape in [(3, 16, 9, 7, 12, 3), (2, 16, 20, 10, 12, 3)]:
        (x, C, b), ref_in, k = inputs(shape, dtype, seed=14, layout=layout)
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
        finally:
            torch.use_deterministic_algorithms(False)
        want = grads(lambda *a: reference.reconstruction_loss(*a, k), ref_in)
        for name, g, w in zip(("x", "dictionary", "intercept"), got, want):
            assert relative_error(g, w) < tolerance, (shape, name)


def test_gemm_encode_holds_one_box_of_pre_activations(monkeypatch):
    # 65536 pixels x K = 1024: the whole float32 pre-activation matrix would
    # take 256 MiB; the GEMM path holds one 16 MiB box of it at a time. The
    # slack covers cuBLAS's workspace, which torch's allocator may hand out
    # on the first GEMM of a stream.
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", "auto")
    box_values = 1 << 22
    monkeypatch.setenv("SRM_EXT_CUDA_BOX_VALUES", str(box_values))
    (x, C, b), ref_in, k = inputs((64, 32, 32, 32, 1024, 8), torch.float32, seed=15)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    outputs = values.numel() * values.element_size() + indices.numel() * indices.element_size()
    assert peak <= outputs + 4 * box_values + (64 << 20), peak
    ref_values, ref_indices = reference.sparse_encode(*ref_in, k)
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stage1_backward_rebuilds_its_residual_within_one_slice_of_codewords(dtype):
    """With K <= 512 outside deterministic mode the backward rebuilds the
    float32 residual where each gradient needs it: it allocates no
    N*H*W x D float32 buffer, and x's gradient is bitwise the one that
    deterministic mode computes from the stored residual."""
    (x, C, b), _, k = inputs((16, 128, 32, 32, 256, 5), dtype, seed=16, layout="channels_last")
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    upstream = torch.tensor(0.5, device=DEVICE, dtype=dtype)
    backward = torch.ops.srm_ext.reconstruction_loss_backward
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rebuilt = backward(upstream, x, C, b, values, indices, [True, True, True])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    residual_bytes = x.numel() * 4
    outputs = sum(t.numel() * t.element_size() for t in rebuilt)
    assert peak < outputs + residual_bytes // 2, (peak, outputs, residual_bytes)
    torch.use_deterministic_algorithms(True)
    try:
        stored = backward(upstream, x, C, b, values, indices, [True, True, True])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(rebuilt[0], stored[0])
    for got, want in zip(rebuilt[1:], stored[1:]):
        assert relative_error(got, want) < GRAD_RELATIVE_ERROR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_mode_is_bitwise_reproducible(dtype):
    (x, C, b), _, k = inputs((4, 128, 16, 16, 256, 5), dtype, seed=3)
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
        second = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_labels_and_student_loss_sum_in_a_fixed_order():
    """The image labels and the student loss reduce in a fixed order whether
    or not deterministic mode is on, so repeated calls agree bitwise (cuBLAS
    repeats its products bitwise on one GPU). 400 pixels per image: two
    chunks of the student loss's statistics; K = 300: several warps'
    histograms and column sums."""
    (x, C, b), _, k = inputs((3, 16, 20, 20, 300, 5), torch.float32, seed=24)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    labels = srm_ext.sparse_labels(values, indices, 300)
    again = srm_ext.sparse_labels(values, indices, 300)
    assert all(torch.equal(a, b_) for a, b_ in zip(labels, again))

    y, Cs, bs, _, _ = student_inputs(3, 24, 20, 20, 300, seed=25)
    on_device = [t.to(DEVICE) for t in (y, Cs, bs)]

    def loss(*args):
        return srm_ext.predictor_loss(*args, *labels)

    first = [loss(*on_device).detach(), *grads(loss, on_device)]
    second = [loss(*on_device).detach(), *grads(loss, on_device)]
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_labels_and_predictor_loss(shape, dtype):
    (x, C, b), ref_in, k = inputs(shape, dtype, seed=4)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    pixel, image = srm_ext.sparse_labels(values, indices, C.shape[1])
    ref_pixel, ref_image = reference.sparse_labels(*reference.sparse_encode(*ref_in, k), C.shape[1])
    torch.testing.assert_close(pixel.cpu(), ref_pixel, rtol=0, atol=0)
    close(image, ref_image, dtype)

    g = torch.Generator().manual_seed(5)
    n, d, h, w, K, _ = shape
    y = torch.randn(n, max(1, d // 2), h, w, generator=g)
    Cs = torch.randn(y.shape[1], K, generator=g) * 0.3
    bs = torch.randn(1, generator=g)
    cuda_in = [t.to(DEVICE).to(dtype) for t in (y, Cs, bs)]
    ref_in = [t.to(dtype).float() for t in (y, Cs, bs)]
    image_c = image.detach()
    close(
        srm_ext.predictor_loss(*cuda_in, pixel, image_c, 0.5, 2.0),
        reference.predictor_loss(*ref_in, ref_pixel, image_c.float().cpu(), 0.5, 2.0),
        dtype,
    )
    close_grads(
        grads(lambda *a: srm_ext.predictor_loss(*a, pixel, image_c, 0.5, 2.0), cuda_in),
        grads(lambda *a: reference.predictor_loss(*a, ref_pixel, image_c.float().cpu(), 0.5, 2.0), ref_in),
        dtype,
        names=("y", "dictionary", "intercept"),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_on_cuda(dtype):
    (x, C, b), ref_in, k = inputs((2, 8, 3, 4, 12, 3), dtype, seed=6)
    ops = torch.ops.srm_ext
    values, indices = ops.sparse_encode(x, C, b, k)
    pixel, image = ops.sparse_labels(values, indices, 12)
    leaf = lambda t: t.detach().clone().requires_grad_(True)
    one = torch.ones((), device=DEVICE, dtype=dtype)
    y = torch.randn(2, 5, 3, 4, device=DEVICE, dtype=dtype)
    Cs = torch.randn(5, 12, device=DEVICE, dtype=dtype)
    _, *unit_grads = ops.predictor_loss(y, Cs, b, pixel, image, 1.0, 1.0, [True, True, True])
    cases = [
        (ops.sparse_encode.default, (leaf(x), leaf(C), leaf(b), k)),
        (ops.sparse_encode_backward.default, (torch.randn_like(values), values, indices, x, C, b, [True, True, True])),
        (ops.sparse_decode.default, (leaf(values), indices, leaf(C))),
        (ops.sparse_decode_backward.default, (torch.randn_like(x), values, indices, C, [True, True])),
        (ops.reconstruction_loss.default, (leaf(x), leaf(C), leaf(b), k)),
        (ops.reconstruction_loss_backward.default, (one, x, C, b, values, indices, [True, True, True])),
        (ops.sparse_labels.default, (values, indices, 12)),
        (ops.predictor_loss.default, (leaf(y), leaf(Cs), leaf(b), pixel, image, 0.5, 2.0, [True, True, True])),
        (ops.predictor_loss_backward.default, (one, *unit_grads, y, Cs, [True, True, True])),
    ]
    for op, args in cases:
        opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_large_magnitudes_accumulate_in_float32(dtype):
    # The selection must be the exact one, on float32 pre-activations.
    x, C, b, want = beyond_float16(dtype, 2, 5, 5, num_codewords=48, k=4, seed=7)
    values, indices = srm_ext.sparse_encode(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 4)
    torch.testing.assert_close(indices.cpu(), want, rtol=0, atol=0)
    assert torch.isfinite(values).all()
    loss = srm_ext.reconstruction_loss(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 4)
    want_loss = reference.reconstruction_loss(x.float(), C.float(), b.float(), 4)
    torch.testing.assert_close(loss.float().cpu(), want_loss, rtol=1e-2, atol=0)


def test_element_counts_past_2_31_use_64_bit_offsets_and_a_bounded_workspace():
    # 72M pixels: x has 2.3e9 elements and there are 4.6e9 pixel-codeword
    # pairs, past 32-bit offsets; a dense similarity would take 9 GiB.
    n, d, h, w, K, k = 2, 32, 6000, 6000, 64, 2
    g = torch.Generator(device=DEVICE).manual_seed(8)
    x = torch.randint(-16, 17, (n, d, h, w), device=DEVICE, generator=g, dtype=torch.int8)
    x = x.to(torch.bfloat16) / 8
    C = (torch.randint(-8, 9, (d, K), device=DEVICE, generator=g).float() / 32).to(torch.bfloat16)
    b = torch.zeros(1, device=DEVICE, dtype=torch.bfloat16)
    assert x.numel() > 2**31 and n * h * w * K > 2**32
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    torch.cuda.synchronize()
    outputs = values.nbytes + indices.nbytes
    assert torch.cuda.max_memory_allocated() - base < outputs + 2**30
    assert int(indices.min()) >= 0 and int(indices.max()) < K
    # The last rows of the last image lie past every 32-bit offset.
    tail = x[-1:, :, -2:, :].float().cpu()
    want_v, want_i = reference.sparse_encode(tail, C.float().cpu(), b.float().cpu(), k)
    torch.testing.assert_close(indices[-1:, -2:].cpu(), want_i, rtol=0, atol=0)
    close(values[-1:, -2:], want_v, torch.bfloat16)
    del values, indices

    leaves = [C.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    torch.cuda.reset_peak_memory_stats()
    loss = srm_ext.reconstruction_loss(x, *leaves, k)
    grad_c, grad_b = torch.autograd.grad(loss, leaves)
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(grad_c).all() and torch.isfinite(grad_b).all()
    assert torch.cuda.max_memory_allocated() - base < outputs + 2**30


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 8, 5, 7, 20, 4), (3, 17, 7, 5, 33, 7), (1, 64, 4, 4, 256, 128)])
def test_deterministic_encode_and_decode_gradients(shape, dtype):
    # Their dictionary gradients take the sorted kernel with one term (the
    # stage-1 loss passes two); the last shape has k = 128 over D = 64.
    (x, C, b), ref_in, k = inputs(shape, dtype, seed=15)
    ref_values, indices = reference.sparse_encode(*ref_in, k)
    values = ref_values.to(DEVICE, dtype)
    upstream = torch.randn(ref_values.shape, generator=torch.Generator().manual_seed(16)).to(dtype).float()
    cases = [
        (lambda *a: srm_ext.sparse_encode(*a, k), (x, C, b),
         lambda *a: reference.sparse_encode(*a, k), ref_in, upstream),
        (lambda v, c: srm_ext.sparse_decode(v, indices.to(DEVICE), c), (values, C),
         lambda v, c: reference.sparse_decode(v, indices, c), (values.float().cpu(), ref_in[1]), None),
    ]
    for (native, native_in, ref, ref_args, weight), names in zip(
        cases, [("x", "dictionary", "intercept"), ("values", "dictionary")]
    ):
        torch.use_deterministic_algorithms(True)
        try:
            on_device = None if weight is None else weight.to(DEVICE)
            first = grads(native, native_in, on_device)
            second = grads(native, native_in, on_device)
        finally:
            torch.use_deterministic_algorithms(False)
        for got, again in zip(first, second):
            assert torch.equal(got, again)
        close_grads(first, grads(ref, ref_args, weight), dtype, names)


def test_decode_backward_takes_an_expanded_gradient():
    # sum() hands backward a stride-0 gradient of the output's shape.
    (x, C, b), ref_in, k = inputs((2, 16, 5, 6, 40, 5), torch.float32, seed=17)
    ref_values, indices = reference.sparse_encode(*ref_in, k)
    got = [leaf_like(t) for t in (ref_values.to(DEVICE), C)]
    want = [leaf_like(t) for t in (ref_values, ref_in[1])]
    srm_ext.sparse_decode(got[0], indices.to(DEVICE), got[1]).sum().backward()
    reference.sparse_decode(want[0], indices, want[1]).sum().backward()
    for g, w in zip(got, want):
        close(g.grad, w.grad, torch.float32)


def test_decode_value_gradients_sum_in_the_documented_order():
    """The values' gradient is every entry's <grad_p, C_j>, summed on the GPU
    as warp_order_dots documents: bitwise, on data where the order shows."""
    values, indices, C, grad_x_hat = documented_order_inputs(seed=3)
    v = values.to(DEVICE).requires_grad_()
    srm_ext.sparse_decode(v, indices.to(DEVICE), C.to(DEVICE)).backward(grad_x_hat.to(DEVICE))
    expected = warp_order_dots(grad_x_hat, indices, C.t()).reshape(values.shape)
    assert torch.equal(v.grad.cpu(), expected)


def student_inputs(n, d, h, w, K, seed, dictionary_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, h, w, generator=g)
    dictionary = torch.randn(d, K, generator=g) * dictionary_scale
    intercept = torch.randn(1, generator=g)
    pixel = torch.randint(0, K, (n, h, w), generator=g)
    image = torch.rand(n, K, generator=g)
    return y, dictionary, intercept, pixel, image


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_student_loss_reads_any_layout_of_y(layout):
    y, Cs, bs, pixel, image = student_inputs(2, 24, 7, 9, 40, seed=18)
    on_device = [make_layout(y.to(DEVICE), layout), Cs.to(DEVICE), bs.to(DEVICE)]
    labels = (pixel.to(DEVICE), image.to(DEVICE))
    close(srm_ext.predictor_loss(*on_device, *labels), reference.predictor_loss(y, Cs, bs, pixel, image), torch.float32)
    close_grads(
        grads(lambda *a: srm_ext.predictor_loss(*a, *labels), on_device),
        grads(lambda *a: reference.predictor_loss(*a, pixel, image), (y, Cs, bs)),
        torch.float32,
        names=("y", "dictionary", "intercept"),
    )


def test_float16_student_gradients_keep_their_precision_under_a_loss_scale():
    # At P = 32768 pixels dloss/dy is about 1e-6, in float16's subnormals,
    # where a loss scale (GradScaler's) is what keeps its digits: the scale
    # must reach the product before it is rounded to float16. Rounding first
    # loses about 1% here; compared by relative norm, since the per-dtype
    # atol would pass a zero gradient.
    y, Cs, bs, pixel, image = student_inputs(8, 16, 64, 64, 256, seed=19, dictionary_scale=0.2)
    half = [t.half() for t in (y, Cs, bs)]
    image = image.half()
    scale = torch.tensor(32768.0)  # a power of two float16 can hold
    got = grads(
        lambda *a: srm_ext.predictor_loss(*a, pixel.to(DEVICE), image.to(DEVICE)),
        [t.to(DEVICE) for t in half], scale.to(DEVICE),
    )
    want = grads(lambda *a: reference.predictor_loss(*a, pixel, image.float()), [t.float() for t in half], scale)
    for name, g, w in zip(("y", "dictionary", "intercept"), got, want):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, w) < 3e-3, name


def test_labels_and_student_loss_take_sizes_beyond_the_sparse_kernel_limits():
    # Only the encode and decode kernels cap D, K and k: sparse_labels takes
    # any k, the student loss (cuBLAS and elementwise kernels) any D and K.
    g = torch.Generator().manual_seed(20)
    indices = torch.argsort(torch.rand(2, 3, 3, 300, generator=g), dim=-1)[..., :200]
    values = torch.rand(2, 3, 3, 200, generator=g).sort(dim=-1, descending=True).values
    pixel, image = srm_ext.sparse_labels(values.to(DEVICE), indices.to(DEVICE), 300)
    ref_pixel, ref_image = reference.sparse_labels(values, indices, 300)
    torch.testing.assert_close(pixel.cpu(), ref_pixel, rtol=0, atol=0)
    close(image, ref_image, torch.float32)

    y, Cs, bs, pixel, image = student_inputs(1, 4100, 2, 2, 9000, seed=21, dictionary_scale=0.01)
    on_device = [t.to(DEVICE) for t in (y, Cs, bs)]
    labels = (pixel.to(DEVICE), image.to(DEVICE))
    close_grads(
        grads(lambda *a: srm_ext.predictor_loss(*a, *labels), on_device),
        grads(lambda *a: reference.predictor_loss(*a, pixel, image), (y, Cs, bs)),
        torch.float32,
        names=("y", "dictionary", "intercept"),
    )


def test_empty_batch_on_cuda_matches_the_cpu():
    x, C, b = torch.randn(0, 4, 3, 3), torch.randn(4, 6), torch.zeros(1)
    values, indices = srm_ext.sparse_encode(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 2)
    assert values.shape == (0, 3, 3, 2) and indices.shape == (0, 3, 3, 2)
    assert srm_ext.sparse_decode(values, indices, C.to(DEVICE)).shape == (0, 4, 3, 3)
    pixel, image = srm_ext.sparse_labels(values, indices, 6)
    assert pixel.shape == (0, 3, 3) and image.shape == (0, 6)
    want = srm_ext.reconstruction_loss(x, C, b, 2)
    got = srm_ext.reconstruction_loss(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 2)
    torch.testing.assert_close(got.cpu(), want, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs_give_what_the_cpu_ops_give(dtype):
    """The ops called directly on inputs without pixels or channels, which
    the CPU kernels take: every output as the CPU op gives it from float32
    copies. (The emulated twin is in test_cuda_glue_emulated.py.)"""
    for label, op, args in empty_input_calls(DEVICE, dtype):
        out = getattr(torch.ops.srm_ext, op)(*args)
        want = getattr(torch.ops.srm_ext, op)(*on_cpu_in_float32(args))
        out, want = [o if isinstance(o, (tuple, list)) else (o,) for o in (out, want)]
        for i, (got, expected) in enumerate(zip(out, want)):
            assert got.shape == expected.shape, f"{label}: output {i}"
            torch.testing.assert_close(
                got.double().cpu(), expected.double(), **TOLERANCES[dtype], equal_nan=True,
                msg=lambda m: f"{label}: output {i}: {m}",
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_refuse_what_the_cpu_ops_refuse(dtype):
    """What the CPU kernels refuse (a tensor in another dtype than the one
    it must share, a code keeping more entries than there are codewords),
    the CUDA ops refuse by name, whatever the output mask. (The emulated
    twin is in test_cuda_glue_emulated.py.)"""
    for label, op, args, message in calls_every_backend_refuses(DEVICE, dtype):
        assert_refused(getattr(torch.ops.srm_ext, op), args, message, label)


def test_ops_run_on_the_current_stream():
    # The side stream writes x only after a long sleep: an op that ran on
    # another stream would read the zeros that were there before.
    (x, C, b), ref_in, k = inputs((2, 64, 13, 11, 300, 9), torch.float32, seed=22)
    staged = torch.zeros_like(x)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
        staged.copy_(x)
        values, indices = srm_ext.sparse_encode(staged, C, b, k)
        loss = srm_ext.reconstruction_loss(staged, C, b, k)
    torch.cuda.synchronize()
    ref_values, ref_indices = reference.sparse_encode(*ref_in, k)
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, torch.float32)
    close(loss, reference.reconstruction_loss(*ref_in, k), torch.float32)


@pytest.mark.parametrize(
    "depth, num_codewords, k, message",
    [(4097, 16, 2, "D = 4097"), (8, 8193, 2, "K = 8193"), (8, 300, 129, "k = 129")],
)
def test_sizes_beyond_the_sparse_kernels_raise_naming_the_size(depth, num_codewords, k, message):
    x = torch.randn(1, depth, 2, 2, device=DEVICE)
    C = torch.randn(depth, num_codewords, device=DEVICE)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.srm_ext.sparse_encode(x, C, torch.zeros(1, device=DEVICE), k)


def test_public_functions_fall_back_to_the_reference_beyond_the_kernel_limits(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    (x, C, b), ref_in, _ = inputs((2, 8, 3, 4, 300, 4), torch.float32, seed=29)
    k = _backend._cuda_code_limits["k"] + 1
    with pytest.warns(UserWarning, match=f"take k <= {k - 1}, got k = {k}"):
        values, indices = srm_ext.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(*ref_in, k)
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, torch.float32)
    x_hat = srm_ext.sparse_decode(values, indices, C)
    close(x_hat, reference.sparse_decode(ref_values, ref_indices, ref_in[1]), torch.float32)
    close(srm_ext.reconstruction_loss(x, C, b, k), reference.reconstruction_loss(*ref_in, k), torch.float32)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7, 20, 4), (2, 64, 13, 11, 300, 9), (2, 32, 3, 4, 150, 81)])
def test_tf32_encode_selects_exactly_on_inputs_tf32_represents(shape, encode_path):
    # With TF32 allowed, float32 encodes on tensor cores (cuBLAS's GEMM, or the
    # fused kernel's TF32 MMA). The dyadic inputs have fewer significant bits
    # than TF32 keeps, so every product and sum is still exact and the
    # selection must match the reference's.
    (x, C, b), ref_in, k = inputs(shape, torch.float32, seed=23)
    torch.backends.cuda.matmul.allow_tf32 = True  # the autouse fixture restores it
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(*ref_in, k)
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, torch.float32)
    close(srm_ext.reconstruction_loss(x, C, b, k), reference.reconstruction_loss(*ref_in, k), torch.float32)


def test_screened_encode_is_exact_where_tf32_misranks_or_flushes(monkeypatch):
    # conftest.tf32_screening_inputs: a pixel whose best codeword TF32 ranks
    # below 50 others where it truncates, and one of subnormal features.
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", "screened")
    x, C = tf32_screening_inputs(seed=26)
    b, k = torch.tensor([0.0]), 5
    values, indices = srm_ext.sparse_encode(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), k)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert ref_indices[MISRANKED_PIXEL][0] == 50 and ref_indices[SUBNORMAL_PIXEL][0] == 299
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    close(values, ref_values, torch.float32)


def test_a_codeword_major_dictionary_gives_the_same_code_and_gradients():
    # (K, D) storage seen as (D, K), as the SRM modules keep their dictionary.
    (x, C, b), ref_in, k = inputs((2, 64, 13, 11, 300, 9), torch.float32, seed=24)
    stored = codeword_major(C)
    for got, want in zip(srm_ext.sparse_encode(x, stored, b, k), srm_ext.sparse_encode(x, C, b, k)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, stored, b))
    assert got[1].stride() == stored.stride()
    for g, w in zip(got, grads(lambda *a: reference.reconstruction_loss(*a, k), ref_in)):
        close(g, w, torch.float32)


@pytest.mark.parametrize("case", ["nan", "infinite codeword", "nan intercept", "infinite intercept"])
def test_non_finite_inputs_select_like_the_reference(case):
    # NaN ranks above everything and NaNs tie toward the lower index; the
    # indices stay in range and the loss is not finite. (It may be inf where
    # the reference says NaN: the reference decodes with a dense product,
    # which multiplies the zeros of unselected codewords by the infinity.)
    g = torch.Generator().manual_seed(25)
    x = dyadic(2, 6, 3, 3, dtype=torch.float32, generator=g)
    C = dyadic(6, 512, dtype=torch.float32, generator=g)
    b = torch.zeros(1)
    if case == "nan":
        x[1, 2, 0, 1] = float("nan")
    if case == "infinite codeword":
        C[2, 5] = float("inf")
    if case == "nan intercept":
        b.fill_(float("nan"))
    if case == "infinite intercept":  # -inf plus an infinite similarity is NaN
        b.fill_(float("-inf"))
        x[0, 0, 1, 1] = float("inf")
    values, indices = srm_ext.sparse_encode(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 5)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, 5)
    assert int(indices.min()) >= 0 and int(indices.max()) < 512
    torch.testing.assert_close(indices.cpu(), ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values.cpu(), ref_values, equal_nan=True)
    assert not torch.isfinite(srm_ext.reconstruction_loss(x.to(DEVICE), C.to(DEVICE), b.to(DEVICE), 5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_functions_refuse_values_out_of_range_with_a_value_error(dtype):
    """srm_ext's functions leave the index and label ranges to the CUDA ops
    (one read of the kernels' flags): a bad value raises the ValueError that
    the CPU ops and the reference raise, naming the argument."""
    g = torch.Generator().manual_seed(6)
    values = torch.rand(2, 3, 3, 2, generator=g).to(DEVICE, dtype)
    indices = torch.randint(0, 6, (2, 3, 3, 2), generator=g).to(DEVICE)
    C = dyadic(4, 6, generator=g).to(DEVICE, dtype)
    y, b = dyadic(2, 4, 3, 3, generator=g).to(DEVICE, dtype), torch.zeros(1, device=DEVICE, dtype=dtype)
    pixel, image = srm_ext.sparse_labels(values, indices, 6)
    srm_ext.predictor_loss(y, C, b, pixel, image)  # in range: accepted
    bad = indices.clone()
    bad[1, 2, 0, 1] = 6
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        srm_ext.sparse_decode(values, bad, C)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        srm_ext.sparse_labels(values, bad - 7, 6)
    with pytest.raises(ValueError, match=r"pixel_labels must lie in \[0, 6\)"):
        srm_ext.predictor_loss(y, C, b, pixel + 6, image)
    with pytest.raises(ValueError, match=r"image_labels must lie in \[0, 1\]"):
        srm_ext.predictor_loss(y, C, b, pixel, image * float("nan"))
