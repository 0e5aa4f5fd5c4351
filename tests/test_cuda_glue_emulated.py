"""The CUDA operators' torch glue, run on the CPU over the emulated kernels.

``torch.ops.srm_emu.*`` are csrc/cuda's operator implementations as written,
with only the device guard, the stream and the device checks swapped for CPU
stand-ins (see cuda_emulation.py). Where test_cuda_emulated.py checks each
kernel launcher, these check what the glue adds: argument order and units,
layouts (channels_last and strided maps, codeword-major dictionaries), the
float32 intermediates of 16-bit inputs, output masks, the deterministic
variants, the box splitting of the reconstruction loss, and the argument
checks, which refuse what the CPU kernels refuse and take the empty inputs
they take. Every output is compared with the reference, computed in float64
from the same inputs (or with the CPU op's), and with the fake kernel that
torch.compile and opcheck rely on (shape, dtype and the strides of every
dimension longer than one, of a tensor that is not empty).

Inputs are multiples of 1/8, so pre-activations are exact in every dtype and
indices must match exactly. Tolerances per dtype (rtol = atol): float32 1e-4;
float16 2e-2 and bfloat16 6e-2 for values, four times that for gradients,
which sum many rounded terms.
"""

from __future__ import annotations

import contextlib
import itertools
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from srm_ext import reference

import cuda_emulation
from conftest import (
    MISRANKED_PIXEL,
    SUBNORMAL_PIXEL,
    assert_refused,
    calls_every_backend_refuses,
    codeword_major,
    documented_order_inputs,
    dyadic,
    empty_input_calls,
    make_layout,
    on_cpu_in_float32,
    requires_native_cpu,
    tf32_screening_inputs,
    warp_order_dots,
)

pytestmark = requires_native_cpu  # the fake kernels need the op schemas

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VALUE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
LAYOUTS = ["contiguous", "channels_last", "strided"]
DICTIONARIES = ["row_major", "codeword_major"]
# (N, D, H, W, K, k): tails of every tile, and k = K on one-pixel-wide maps.
SHAPES = [(2, 8, 5, 7, 20, 4), (2, 4, 3, 1, 6, 6)]
MASKS3 = list(itertools.product([False, True], repeat=3))


@pytest.fixture(scope="module")
def emu():
    return cuda_emulation.load()


@pytest.fixture
def ops(emu, request):
    # Each block's threads shuffled, or warp by warp in about half the cases.
    emu.set_schedule(cuda_emulation.schedule_of_case(request.node.nodeid), 5)
    yield torch.ops.srm_emu
    assert emu.take_failure() == "", "an emulated kernel failed"


@contextlib.contextmanager
def deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def dictionary_in(layout: str, C: torch.Tensor) -> torch.Tensor:
    return codeword_major(C) if layout == "codeword_major" else C


def as_outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def assert_like_fake(op: str, out, *args) -> None:
    """Each output has the shape, dtype and strides the fake kernel promises."""
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = as_outputs(getattr(torch.ops.srm_ext, op)(*fake_args))
    for i, (real, promised) in enumerate(zip(as_outputs(out), fake)):
        where = f"{op} output {i}"
        assert real.shape == promised.shape and real.dtype == promised.dtype, where
        if real.numel() == 0:
            continue  # an empty tensor's strides address nothing
        for size, stride, fake_stride in zip(real.shape, real.stride(), promised.stride()):
            assert size <= 1 or stride == fake_stride, f"{where}: strides {real.stride()} vs {promised.stride()}"


def close(actual, expected, dtype, scale=1.0) -> None:
    tol = VALUE_TOLERANCE[dtype] * scale
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def grads(fn, inputs, upstream):
    """Reference gradients in float64 with respect to each of ``inputs``."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, upstream.double())


def teacher_inputs(shape, dtype, layout, dictionary, seed):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    x = make_layout(dyadic(n, d, h, w, generator=g).to(dtype), layout)
    C = dictionary_in(dictionary, dyadic(d, K, generator=g, span=1).to(dtype))
    b = torch.tensor([0.25], dtype=dtype)
    return x, C, b, k


@pytest.fixture(params=["auto", "fused", "screened"])
def encode_path(request, monkeypatch):
    """Every encode path: "auto" runs the GEMM and the row-wise selection
    outside deterministic mode, "fused" the single kernel everywhere,
    "screened" the TF32 ranking with exact rescoring for float32 (the GEMM
    for 16-bit inputs)."""
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", request.param)
    return request.param


def check_unwanted(out, mask) -> None:
    for want, grad in zip(mask, out):
        if not want:
            assert grad.shape == (0,)


def check_masked_backward(ops, op: str, args, masks, want) -> None:
    """A backward op, op(*args, mask), for every output mask: the wanted
    gradients against `want` (the reference's, in float64), the unwanted ones
    empty, every output as the fake kernel promises. The dtype of args[0]
    picks the tolerance."""
    for mask in masks:
        out = getattr(ops, op)(*args, list(mask))
        assert_like_fake(op, out, *args, list(mask))
        check_unwanted(out, mask)
        for wanted, got, expected in zip(mask, out, want):
            if wanted:
                close(got, expected.reshape(got.shape), args[0].dtype, scale=4)


@pytest.mark.parametrize("dictionary", DICTIONARIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_and_decode_with_their_backward(ops, encode_path, dtype, layout, dictionary):
    # Deterministic mode changes the backward's reductions (and takes the
    # fused encode): one shape is enough.
    for seed, (shape, determinism) in enumerate([(SHAPES[0], False), (SHAPES[0], True), (SHAPES[1], False)]):
        x, C, b, k = teacher_inputs(shape, dtype, layout, dictionary, seed)
        with deterministic(determinism):
            values, indices = ops.sparse_encode(x, C, b, k)
            want_values, want_indices = reference.sparse_encode(x.double(), C.double(), b.double(), k)
            assert torch.equal(indices, want_indices)
            close(values, want_values, dtype)
            assert_like_fake("sparse_encode", (values, indices), x, C, b, k)

            g = torch.Generator().manual_seed(100 + seed)
            grad_values = dyadic(*values.shape, generator=g).to(dtype)
            want = grads(lambda *t: reference.sparse_encode(*t, k)[0], (x, C, b), grad_values)
            check_masked_backward(
                ops, "sparse_encode_backward", (grad_values, values, indices, x, C, b), MASKS3, want
            )

            x_hat = ops.sparse_decode(values, indices, C)
            close(x_hat, reference.sparse_decode(values.double(), indices, C.double()), dtype)
            assert_like_fake("sparse_decode", x_hat, values, indices, C)
            grad_x_hat = make_layout(dyadic(*x.shape, generator=g).to(dtype), layout)
            want = grads(lambda v, c: reference.sparse_decode(v, indices, c), (values, C), grad_x_hat)
            check_masked_backward(
                ops, "sparse_decode_backward", (grad_x_hat, values, indices, C),
                itertools.product([False, True], repeat=2), want,
            )


def test_decode_value_gradients_sum_in_the_documented_order(ops):
    """Through the glue, bitwise (the GPU twin is in test_cuda_kernels.py)."""
    values, indices, C, grad_x_hat = documented_order_inputs(seed=3)
    grad_values, _ = ops.sparse_decode_backward(grad_x_hat, values, indices, C, [True, False])
    expected = warp_order_dots(grad_x_hat, indices, C.t()).reshape(values.shape)
    assert torch.equal(grad_values, expected)
    plain = torch.einsum("ndhw,nhwkd->nhwk", grad_x_hat, C.t()[indices])
    assert not torch.equal(grad_values, plain)  # the order shows in these data


def check_loss_backward(ops, upstream, x, C, b, values, indices, k) -> None:
    """reconstruction_loss_backward for every output mask."""
    want = grads(lambda *t: reference.reconstruction_loss(*t, k), (x, C, b), upstream)
    check_masked_backward(
        ops, "reconstruction_loss_backward", (upstream, x, C, b, values, indices), MASKS3, want
    )


# None: the default split of the pixels into boxes (the whole batch); "1":
# one value per box, so that every box holds one pixel; "36": parts of a
# row, 3 and 1 pixels of each 4-pixel row in the encode (K = 12
# pre-activations per pixel), 2 and 2 in the backward (D + 3k = 14 values);
# "120": boxes of two rows and a short last one; "180": one whole image per
# box.
@pytest.mark.parametrize("box_values", [None, "1", "36", "120", "180"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruction_loss_and_its_backward(ops, monkeypatch, encode_path, dtype, box_values):
    if box_values is not None:
        monkeypatch.setenv("SRM_EXT_CUDA_BOX_VALUES", box_values)
    cases = [
        ("contiguous", "row_major", False),
        ("contiguous", "codeword_major", True),
        ("channels_last", "row_major", True),
        ("channels_last", "codeword_major", False),
    ]
    for seed, (layout, dictionary, determinism) in enumerate(cases):
        x, C, b, k = teacher_inputs((2, 5, 3, 4, 12, 3), dtype, layout, dictionary, seed)
        with deterministic(determinism):
            loss, values, indices = ops.reconstruction_loss(x, C, b, k)
            assert_like_fake("reconstruction_loss", (loss, values, indices), x, C, b, k)
            want_loss = reference.reconstruction_loss(x.double(), C.double(), b.double(), k)
            close(loss, want_loss, dtype)
            check_loss_backward(ops, torch.tensor(1.5, dtype=dtype), x, C, b, values, indices, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruction_backward_rebuilds_the_residual_as_stored(ops, dtype):
    """Outside deterministic mode and within one slice of codewords, the
    backward rebuilds the residual where each gradient needs it; deterministic
    mode stores it and sums the dictionary gradient in order. grad_x takes the
    same float32 terms in the same order either way, so it matches bitwise."""
    x, C, b, k = teacher_inputs((2, 37, 5, 7, 40, 6), dtype, "channels_last", "row_major", 11)
    values, indices = reference.sparse_encode(x, C, b, k)
    upstream = torch.tensor(0.75, dtype=dtype)
    rebuilt = ops.reconstruction_loss_backward(upstream, x, C, b, values, indices, [True, True, True])
    with deterministic(True):
        stored = ops.reconstruction_loss_backward(upstream, x, C, b, values, indices, [True, True, True])
    assert torch.equal(rebuilt[0], stored[0])
    close(rebuilt[1], stored[1], dtype)
    want = grads(lambda *t: reference.reconstruction_loss(*t, k), (x, C, b), upstream)
    for got, expected in zip(rebuilt, want):
        close(got, expected.reshape(got.shape), dtype, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reconstruction_backward_past_one_slice_of_codewords(ops, dtype):
    """Past one slice of codewords (K > 512) the residual is stored once and
    both gradients read it, outside deterministic mode too."""
    x, C, b, k = teacher_inputs((1, 6, 3, 4, 520, 4), dtype, "contiguous", "codeword_major", 12)
    values, indices = reference.sparse_encode(x, C, b, k)
    check_loss_backward(ops, torch.tensor(1.25, dtype=dtype), x, C, b, values, indices, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saturated_16_bit_codes_still_pass_gradient_to_the_encoder(ops, dtype):
    """Every kept pre-activation lies in [10, 11.5]: its 16-bit value rounds
    to exactly 1, whose s (1 - s) would be 0. The backward ops must take s
    from the pre-activation, as the reference's autograd does, so the
    intercept's gradient (the sum of the kept entries' pre-activation
    gradients, about 1e-4 of the residual's size) is neither 0 nor off."""
    n, d, h, w, K, k = 2, 8, 3, 4, 12, 3
    x = torch.ones(n, d, h, w, dtype=dtype)
    x[:, :, 1] = 1.0625  # x_hat - x differs from pixel to pixel
    C = (1.1875 + torch.arange(K) / 64).expand(d, K).to(dtype).contiguous()
    b = torch.full((1,), 0.5, dtype=dtype)
    values, indices = reference.sparse_encode(x, C, b, k)
    assert torch.all(values == 1)
    upstream = torch.tensor(1.0, dtype=dtype)

    def check(got, expected):
        assert expected.abs().item() > 1e-5
        torch.testing.assert_close(got.double().reshape(()), expected.reshape(()), rtol=1e-2, atol=0)

    for determinism in (False, True):  # the residual rebuilt, and stored
        with deterministic(determinism):
            got = ops.reconstruction_loss_backward(upstream, x, C, b, values, indices, [False, False, True])
        want = grads(lambda *t: reference.reconstruction_loss(*t, k), (x, C, b), upstream)
        check(got[2], want[2])
    grad_values = dyadic(n, h, w, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = ops.sparse_encode_backward(grad_values, values, indices, x, C, b, [False, False, True])
    want = grads(
        lambda *t: (reference.sparse_encode(*t, k)[0] * grad_values.double()).sum(), (x, C, b), upstream
    )
    check(got[2], want[2])


def test_unknown_encode_path_is_refused_by_name(ops, monkeypatch):
    x, C, b, k = teacher_inputs(SHAPES[0], torch.float32, "contiguous", "row_major", 0)
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", "dense")
    with pytest.raises(RuntimeError, match="must be 'auto', 'gemm', 'fused' or 'screened', got 'dense'"):
        ops.sparse_encode(x, C, b, k)


@pytest.mark.parametrize(
    "setting, dtype, num_codewords, k, tf32, expected",
    [
        ("auto", torch.float32, 256, 5, False, "gemm"),
        ("fused", torch.bfloat16, 256, 5, False, "fused"),
        ("screened", torch.float32, 256, 5, False, "screened"),
        ("screened", torch.float32, 256, 5, True, "gemm"),  # the GEMM uses TF32 anyway
        ("screened", torch.float16, 256, 5, False, "gemm"),
        ("screened", torch.float32, 13, 5, False, "gemm"),  # 13 candidates: every codeword
        ("screened", torch.float32, 14, 5, False, "screened"),
        ("screened", torch.float32, 8192, 64, False, "screened"),  # 128 candidates
        ("screened", torch.float32, 8192, 65, False, "screened"),
        ("screened", torch.float32, 8192, 128, False, "gemm"),  # none beyond k
    ],
)
def test_encode_path_for_names_the_path_an_encode_takes(
    emu, monkeypatch, setting, dtype, num_codewords, k, tf32, expected
):
    """What the benchmarks record as each shape's encode path."""
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", setting)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert emu.encode_path_for(dtype, num_codewords, k) == expected
        with deterministic(True):
            assert emu.encode_path_for(dtype, num_codewords, k) == "fused"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16 on CUDA"):
        emu.encode_path_for(torch.float64, num_codewords, k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_screened_encode_is_exact_where_tf32_misranks_or_flushes(ops, monkeypatch, layout):
    """The screened encode gives the exact top k, over several boxes, even
    for a pixel whose best codeword TF32 ranks below many others, and for
    one whose subnormal features the stand-in cuBLAS flushes to zero (as
    tensor cores may): that pixel scores 0 against every codeword under
    TF32, so its candidates are the lowest indices, not its best."""
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", "screened")
    monkeypatch.setenv("SRM_EXT_CUDA_BOX_VALUES", str(6 * 300))  # boxes of 6 pixels
    x, C = tf32_screening_inputs(seed=31)
    x = make_layout(x, layout)
    b = torch.tensor([0.0])  # a larger intercept would absorb the subnormal scores
    k = 5
    values, indices = ops.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert indices[MISRANKED_PIXEL][0] == 50 and indices[SUBNORMAL_PIXEL][0] == 299
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values)
    loss, values, indices = ops.reconstruction_loss(x, C, b, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(loss, reference.reconstruction_loss(x, C, b, k))


def test_pixel_boxes_hold_at_most_their_pixels_and_cover_the_map(emu):
    """Whole images where they fit, else whole rows of one image, else parts
    of one row: a row wider than a box (a long 1-D signal, say) is split too,
    so the box still bounds the encode's pre-activations."""
    def pixels(boxes):
        return [(n, h, w) for n0, nc, h0, hc, w0, wc in boxes
                for n in range(n0, n0 + nc) for h in range(h0, h0 + hc) for w in range(w0, w0 + wc)]

    x = torch.empty(3, 1, 4, 5)
    everything = [(n, h, w) for n in range(3) for h in range(4) for w in range(5)]
    for max_pixels, most in [(60, 60), (41, 40), (20, 20), (12, 10), (5, 5), (3, 3), (1, 1), (0, 1)]:
        boxes = emu.pixel_boxes(x, max_pixels)
        assert pixels(boxes) == everything, max_pixels  # in order, each pixel once
        assert max(nc * hc * wc for _, nc, _, hc, _, wc in boxes) == most, max_pixels
    assert emu.pixel_boxes(x, 3)[:3] == [[0, 1, 0, 1, 0, 3], [0, 1, 0, 1, 3, 2], [0, 1, 1, 1, 0, 3]]
    assert emu.pixel_boxes(torch.empty(2, 1, 0, 5), 4) == []


@pytest.mark.parametrize("path", ["gemm", "screened"])
def test_encode_reads_a_map_whose_channel_stride_passes_cublas_int(ops, monkeypatch, tmp_path, path):
    """The screened encode's TF32 GEMM reads an NCHW box in place with its
    channel stride (H*W) as leading dimension, an int for cuBLAS: past that
    the box is copied, not refused (the plain GEMM, through at::bmm, is the
    control). The map's two channels lie 2^31 floats apart in a sparse file,
    so only the pages they touch take memory."""
    monkeypatch.setenv("SRM_EXT_CUDA_ENCODE", path)
    dense, C, b, k = teacher_inputs((1, 2, 2, 3, 20, 2), torch.float32, "contiguous", "row_major", 8)
    strides = (6, 2**31, 3, 1)
    file = tmp_path / "map.bin"
    with open(file, "wb") as handle:
        handle.truncate(4 * (2**31 + 6))
    x = torch.from_file(str(file), shared=True, size=2**31 + 6).as_strided(dense.shape, strides)
    x.copy_(dense)
    values, indices = ops.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(dense, C, b, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values)


def test_student_ops_refuse_more_images_than_their_grids_hold(ops):
    """sparse_labels runs a block per image and predictor_loss one per chunk
    of an image's pixels, at most 2^31 - 1 of either: more is refused by
    name, not left to the launch. Expanded views stand in for the batch."""
    n = 2**31
    values = torch.ones(1, 1, 1, 1).expand(n, 1, 1, 1)
    indices = torch.zeros(1, 1, 1, 1, dtype=torch.long).expand(n, 1, 1, 1)
    with pytest.raises(RuntimeError, match=re.escape(
        "srm_ext CUDA: sparse_labels takes at most 2147483647 images, got values of shape [2147483648, 1, 1, 1]"
    )):
        ops.sparse_labels(values, indices, 4)
    y = torch.ones(1, 2, 1, 1).expand(n, 2, 1, 1)
    C, b = torch.ones(2, 4), torch.zeros(1)
    pixel = torch.zeros(1, 1, 1, dtype=torch.long).expand(n, 1, 1)
    image = torch.zeros(1, 4).expand(n, 4)
    with pytest.raises(RuntimeError, match=re.escape(
        "srm_ext CUDA: predictor_loss: y of shape [2147483648, 2, 1, 1] (K = 4) is too large for "
        "the kernels' grids (at most 2^31 - 1 blocks); split the batch"
    )):
        ops.predictor_loss(y, C, b, pixel, image, 1.0, 1.0, [True, True, True])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_labels(ops, dtype):
    x, C, b, k = teacher_inputs((3, 4, 3, 5, 6, 3), dtype, "contiguous", "row_major", 7)
    values, indices = reference.sparse_encode(x, C, b, k)
    # The code as reference.sparse_encode returns it, and in a (N, W, H, k) memory order.
    transposed = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (values, indices))
    for v, i in [(values, indices), transposed]:
        pixel, image = ops.sparse_labels(v, i, 6)
        assert_like_fake("sparse_labels", (pixel, image), v, i, 6)
        want_pixel, want_image = reference.sparse_labels(v.double(), i, 6)
        assert torch.equal(pixel, want_pixel)
        close(image, want_image, dtype)


def test_labels_out_of_range_are_refused_by_name(ops):
    """The kernels flag a label outside [0, K) (or an image label outside
    [0, 1]) and the glue raises the CPU ops' ValueError, for every output mask of the student loss
    (its check waits for the gradients to be queued)."""
    g = torch.Generator().manual_seed(4)
    values = torch.rand(2, 3, 3, 2, generator=g)
    indices = torch.randint(0, 6, (2, 3, 3, 2), generator=g)
    indices[1, 2, 0, 1] = 6
    with pytest.raises(ValueError, match=re.escape("srm_ext: sparse_labels: indices must lie in [0, 6)")):
        ops.sparse_labels(values, indices, 6)
    y, C = dyadic(2, 4, 3, 3, generator=g).float(), dyadic(4, 6, generator=g).float()
    b = torch.zeros(1)
    pixel = torch.randint(0, 6, (2, 3, 3), generator=g)
    image = torch.rand(2, 6, generator=g)
    for bad in (6, -1):
        labels = pixel.clone()
        labels[0, 1, 2] = bad
        for mask in MASKS3:
            with pytest.raises(ValueError, match=re.escape("srm_ext: predictor_loss: pixel_labels must lie in [0, 6)")):
                ops.predictor_loss(y, C, b, labels, image, 1.0, 1.0, list(mask))
    for bad in (1.5, float("nan")):
        targets = image.clone()
        targets[1, 3] = bad
        with pytest.raises(ValueError, match=re.escape("srm_ext: predictor_loss: image_labels must lie in [0, 1]")):
            ops.predictor_loss(y, C, b, pixel, targets, 1.0, 1.0, [True, True, True])


@pytest.mark.parametrize("bad", [9, -1])
def test_decode_indices_out_of_range_are_refused_by_name(ops, bad):
    """The decode kernels pass over an index outside [0, K): the glue refuses
    the code with a ValueError, as the CPU op does, instead of decoding what
    remains."""
    g = torch.Generator().manual_seed(5)
    values = dyadic(2, 3, 3, 2, generator=g).float()
    indices = torch.randint(0, 9, (2, 3, 3, 2), generator=g)
    C = dyadic(4, 9, generator=g).float()
    close(ops.sparse_decode(values, indices, C), reference.sparse_decode(values.double(), indices, C.double()), torch.float32)
    indices[1, 0, 2, 1] = bad
    with pytest.raises(ValueError, match=re.escape("srm_ext: sparse_decode: indices must lie in [0, 9)")):
        ops.sparse_decode(values, indices, C)
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 9)")):
        torch.ops.srm_ext.sparse_decode(values, indices, C)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_refuse_what_the_cpu_ops_refuse(ops, dtype):
    """A direct call of an op behaves alike on both devices: what the CPU
    kernels refuse (an intercept, image labels or gradient in another dtype
    than the tensor it must share one with, a code keeping more entries than
    there are codewords) the glue refuses too, naming the argument and the
    dtype expected and got, whatever the output mask. The CPU ops are called
    with the same float32 arguments and must refuse them naming the same
    argument. (The GPU twin is in test_cuda_kernels.py.)"""
    for label, op, args, message in calls_every_backend_refuses("cpu", dtype):
        assert_refused(getattr(ops, op), args, message, label)
        if dtype == torch.float32:  # the CPU kernels take no 16-bit inputs
            argument = message.split()[1]
            cpu_message = assert_refused(getattr(torch.ops.srm_ext, op), args, "", f"CPU {label}")
            assert argument in cpu_message, f"CPU {label}: {cpu_message}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs_give_what_the_cpu_ops_give(ops, dtype):
    """Inputs without pixels (N = 0, H = 0) or without channels (D = 0),
    which the CPU kernels take: every output as the CPU op gives it from
    float32 copies and as the fake kernel
    promises. Empty tensors have null data pointers, which the launchers
    must not refuse as missing outputs. (The GPU twin is in
    test_cuda_kernels.py.)"""
    for label, op, args in empty_input_calls("cpu", dtype):
        out = as_outputs(getattr(ops, op)(*args))
        assert_like_fake(op, out, *args)
        want = as_outputs(getattr(torch.ops.srm_ext, op)(*on_cpu_in_float32(args)))
        for i, (got, expected) in enumerate(zip(out, want)):
            assert got.shape == expected.shape, f"{label}: output {i}"
            tol = VALUE_TOLERANCE[dtype]
            torch.testing.assert_close(
                got.double(), expected.double(), rtol=tol, atol=tol, equal_nan=True,
                msg=lambda m: f"{label}: output {i}: {m}",
            )


@pytest.mark.parametrize("dictionary", DICTIONARIES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_predictor_loss_and_its_backward(ops, dtype, layout, dictionary):
    g = torch.Generator().manual_seed(3)
    n, d, h, w, K = 2, 7, 5, 3, 9
    y = make_layout(dyadic(n, d, h, w, generator=g).to(dtype), layout)
    C = dictionary_in(dictionary, dyadic(d, K, generator=g, span=1).to(dtype))
    b = torch.tensor([-0.5], dtype=dtype)
    pixel = torch.randint(0, K, (n, h, w), generator=g)
    image = (torch.randint(0, 9, (n, K), generator=g) / 8).to(dtype)
    weights = (0.75, 1.25)
    want = grads(
        lambda *t: reference.predictor_loss(*t, pixel, image.double(), *weights), (y, C, b),
        torch.tensor(1.0),
    )
    want_loss = reference.predictor_loss(y.double(), C.double(), b.double(), pixel, image.double(), *weights)
    for mask in MASKS3:
        out = ops.predictor_loss(y, C, b, pixel, image, *weights, list(mask))
        assert_like_fake("predictor_loss", out, y, C, b, pixel, image, *weights, list(mask))
        close(out[0], want_loss, dtype)
        check_unwanted(out[1:], mask)
        for wanted, got, expected in zip(mask, out[1:], want):
            if wanted:
                close(got, expected.reshape(got.shape), dtype, scale=4)
        upstream = torch.tensor(2.0, dtype=dtype)
        scaled = ops.predictor_loss_backward(upstream, *out[1:], y, C, list(mask))
        assert_like_fake("predictor_loss_backward", scaled, upstream, *out[1:], y, C, list(mask))
        for wanted, got, unit in zip(mask, scaled, out[1:]):
            if wanted:
                close(got, 2 * unit.double(), dtype)


def assert_unchanged_by_autocast(op, *args) -> None:
    """The op called directly under autocast (the public functions turn it
    off first; a direct call need not) must keep its float32 GEMMs, not run
    them in autocast's 16 bits: every output bitwise that of a call outside
    autocast, as the CPU kernels' are."""
    want = as_outputs(op(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = as_outputs(op(*args))
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"output {i}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_predictor_loss_called_under_autocast_computes_as_outside_it(ops, dtype):
    g = torch.Generator().manual_seed(8)
    n, d, h, w, K = 2, 6, 3, 5, 11
    y = dyadic(n, d, h, w, generator=g).to(dtype)
    C = (dyadic(d, K, generator=g, span=1) / 3).to(dtype)  # not exact in 16 bits
    b = torch.tensor([0.25], dtype=dtype)
    pixel = torch.randint(0, K, (n, h, w), generator=g)
    image = (torch.randint(0, 9, (n, K), generator=g) / 8).to(dtype)
    assert_unchanged_by_autocast(ops.predictor_loss, y, C, b, pixel, image, 0.75, 1.25, [True] * 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_ops_called_under_autocast_compute_as_outside_them(ops, dtype):
    g = torch.Generator().manual_seed(9)
    x = dyadic(2, 6, 3, 5, generator=g).to(dtype)
    C = (dyadic(6, 40, generator=g, span=1) / 3).to(dtype)
    b = torch.tensor([0.25], dtype=dtype)
    for op in (ops.sparse_encode, ops.reconstruction_loss):
        assert_unchanged_by_autocast(op, x, C, b, 4)
