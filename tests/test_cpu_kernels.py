"""Compiled CPU kernels against the PyTorch reference: values, indices, gradients."""

from __future__ import annotations

import pytest
import torch

import srm_ext
from srm_ext import _backend, reference

from conftest import TOLERANCES, codeword_major, dyadic, leaf_like, make_layout, requires_native_cpu

pytestmark = requires_native_cpu

# (N, D, H, W, K, k): k = 1, k = K, H = W = 1, odd sizes, pixel counts that are
# not a multiple of any tile size, several tiles, and k above the
# insertion-select limit (partial-sort path).
SHAPES = [
    (2, 8, 5, 7, 20, 4),
    (1, 3, 1, 1, 5, 1),
    (2, 4, 3, 3, 6, 6),
    (4, 16, 1, 1, 32, 5),
    (3, 17, 7, 5, 33, 7),
    (2, 16, 13, 11, 300, 9),
    # At least two encode tiles on any thread count: a tile is at most
    # 2^18 / K = 131 pixels, rounded up to whole 32-pixel pieces (160), and
    # the 338 pixels are no whole number of pieces, so the last is partial.
    (2, 8, 13, 13, 2000, 3),
    (1, 8, 4, 4, 100, 70),
    (2, 5, 3, 2, 8, 1),
]
DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed", "cropped"]


@pytest.fixture(autouse=True)
def _use_compiled(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)


def make_inputs(shape, dtype, seed, layout="contiguous"):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    x = make_layout(dyadic(n, d, h, w, dtype=dtype, generator=g), layout)
    dictionary = dyadic(d, K, dtype=dtype, generator=g)
    intercept = dyadic(1, dtype=dtype, generator=g)
    return x, dictionary, intercept, k


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def grads(fn, inputs, upstream=None):
    leaves = [leaf_like(t) for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    weight = upstream if upstream is not None else torch.ones_like(out)
    return torch.autograd.grad((out * weight).sum(), leaves)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_matches_reference(shape, dtype, layout):
    x, C, b, k = make_inputs(shape, dtype, seed=hash((shape, layout)) % 1000, layout=layout)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert values.shape == (shape[0], shape[2], shape[3], k)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    assert_close(values, ref_values, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_gradients_match_reference(shape, dtype):
    x, C, b, k = make_inputs(shape, dtype, seed=1)
    n, _, h, w, _, _ = shape
    upstream = torch.randn(n, h, w, k, dtype=dtype, generator=torch.Generator().manual_seed(2))
    got = grads(lambda *a: srm_ext.sparse_encode(*a, k), (x, C, b), upstream)
    want = grads(lambda *a: reference.sparse_encode(*a, k), (x, C, b), upstream)
    for g, r in zip(got, want):
        assert_close(g, r, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_decode_and_gradients_match_reference(shape, dtype, layout):
    x, C, b, k = make_inputs(shape, dtype, seed=3)
    values, indices = reference.sparse_encode(x, C, b, k)
    if layout == "strided":
        C = codeword_major(C)
    assert_close(srm_ext.sparse_decode(values, indices, C), reference.sparse_decode(values, indices, C), dtype)
    n, d, h, w, _, _ = shape
    upstream = make_layout(torch.randn(n, d, h, w, dtype=dtype), layout)
    got = grads(lambda v, c: srm_ext.sparse_decode(v, indices, c), (values, C), upstream)
    want = grads(lambda v, c: reference.sparse_decode(v, indices, c), (values, C), upstream)
    for g, r in zip(got, want):
        assert_close(g, r, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dictionary_layout", ["row-major", "codeword-major"])
def test_reconstruction_loss_and_gradients_match_reference(shape, dtype, layout, dictionary_layout):
    x, C, b, k = make_inputs(shape, dtype, seed=4, layout=layout)
    if dictionary_layout == "codeword-major":
        C = codeword_major(C)
    assert_close(srm_ext.reconstruction_loss(x, C, b, k), reference.reconstruction_loss(x, C, b, k), dtype)
    got = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
    want = grads(lambda *a: reference.reconstruction_loss(*a, k), (x, C, b))
    for g, r in zip(got, want):
        assert_close(g, r, dtype)


@pytest.mark.parametrize("op", ["sparse_encode", "sparse_decode", "reconstruction_loss"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7, 20, 4), (2, 70, 5, 7, 300, 4)])
def test_dictionary_gradient_is_laid_out_like_the_dictionary(op, shape):
    """Both layouts give the same gradient in the dictionary's own layout. The
    larger shape has D and K off the transposes' 8-wide blocks and 64-column
    bands; decode reads the same codeword rows either way, so its gradients
    agree bitwise."""
    x, C, b, k = make_inputs(shape, torch.float32, seed=12)
    values, indices = reference.sparse_encode(x, C, b, k)
    run = {
        "sparse_decode": lambda ops, c: ops.sparse_decode(values, indices, c),
        "sparse_encode": lambda ops, c: ops.sparse_encode(x, c, b, k)[0],
        "reconstruction_loss": lambda ops, c: ops.reconstruction_loss(x, c, b, k),
    }[op]
    found = []
    for dictionary in (C, codeword_major(C)):
        dictionary = dictionary.detach().requires_grad_(True)
        run(srm_ext, dictionary).sum().backward()
        assert dictionary.grad.stride() == dictionary.stride()
        want = grads(lambda c: run(reference, c), (dictionary,))
        assert_close(dictionary.grad, want[0], torch.float32, scale=10)
        found.append(dictionary.grad)
    if op == "sparse_decode":
        assert torch.equal(found[0], found[1])


def test_reconstruction_loss_equals_encode_decode_mse():
    x, C, b, k = make_inputs((2, 8, 5, 7, 20, 4), torch.float64, seed=5)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    composed = torch.mean((srm_ext.sparse_decode(values, indices, C) - x) ** 2)
    torch.testing.assert_close(srm_ext.reconstruction_loss(x, C, b, k), composed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_labels_match_reference(shape, dtype):
    x, C, b, k = make_inputs(shape, dtype, seed=6)
    values, indices = reference.sparse_encode(x, C, b, k)
    pixel, image = srm_ext.sparse_labels(values, indices, C.shape[1])
    ref_pixel, ref_image = reference.sparse_labels(values, indices, C.shape[1])
    torch.testing.assert_close(pixel, ref_pixel, rtol=0, atol=0)
    assert_close(image, ref_image, dtype)
    # image labels sum over codewords to the per-image mean of the kept values
    assert_close(image.sum(1), values.sum(-1).mean(dim=(1, 2)), dtype)


def make_predictor_inputs(shape, dtype, seed, layout="contiguous"):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    x, C, b, _ = make_inputs(shape, dtype, seed)
    values, indices = reference.sparse_encode(x, C, b, k)
    pixel, image = reference.sparse_labels(values, indices, K)
    student_channels = max(1, d - 2)
    y = make_layout(torch.randn(n, student_channels, h, w, dtype=dtype, generator=g), layout)
    Cs = torch.randn(student_channels, K, dtype=dtype, generator=g) * 0.5
    bs = torch.randn(1, dtype=dtype, generator=g)
    return y, Cs, bs, pixel, image


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.5)])
def test_predictor_loss_and_gradients_match_reference(shape, dtype, layout, weights):
    y, Cs, bs, pixel, image = make_predictor_inputs(shape, dtype, seed=7, layout=layout)
    loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image, *weights)
    ref = reference.predictor_loss(y, Cs, bs, pixel, image, *weights)
    assert_close(loss, ref, dtype)
    got = grads(lambda *a: srm_ext.predictor_loss(*a, pixel, image, *weights), (y, Cs, bs))
    want = grads(lambda *a: reference.predictor_loss(*a, pixel, image, *weights), (y, Cs, bs))
    for g, r in zip(got, want):
        assert_close(g, r, dtype)


def test_predictor_loss_saturated_means_stay_finite():
    # Logits of +-4e4 give sigmoids of exactly 1 and 0, so image means of
    # exactly 0 and 1 hit the BCE log clamp in both backends.
    _, _, _, pixel, image = make_predictor_inputs((2, 6, 3, 3, 10, 2), torch.float32, seed=8)
    y = torch.full((2, 4, 3, 3), 1e4)
    Cs = torch.tensor([1.0, -1.0]).repeat(5).expand(4, 10).contiguous()
    bs = torch.tensor([0.5])
    means = torch.sigmoid(torch.einsum("ndhw,dk->nhwk", y, Cs) + bs).mean(dim=(1, 2))
    assert (means == 0).any() and (means == 1).any()
    loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference.predictor_loss(y, Cs, bs, pixel, image))
    got = grads(lambda *a: srm_ext.predictor_loss(*a, pixel, image), (y, Cs, bs))
    want = grads(lambda *a: reference.predictor_loss(*a, pixel, image), (y, Cs, bs))
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        assert_close(g, r, torch.float32)


def test_sums_past_float32s_range_are_inf_as_in_the_reference():
    # The kernels sum in double; a float32 loss out of range rounds to inf
    # instead of failing the conversion.
    x = torch.full((1, 2, 2, 2), 1e20)
    C, b = torch.eye(2, 4), torch.zeros(1)
    loss = srm_ext.reconstruction_loss(x, C, b, 1)
    assert loss.isinf() and loss == reference.reconstruction_loss(x, C, b, 1)
    _, _, _, pixel, image = make_predictor_inputs((2, 6, 3, 3, 10, 2), torch.float32, seed=8)
    y, Cs, bs = torch.randn(2, 4, 3, 3), torch.randn(4, 10), torch.zeros(1)
    big = 3e38  # a loss weight float32 holds, times a cross-entropy above 1
    loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image, big, 1.0)
    assert loss.isinf() and loss == reference.predictor_loss(y, Cs, bs, pixel, image, big, 1.0)


def test_predictor_image_loss_matches_reference_across_the_range_of_means():
    # One pixel per image, so each image mean is one sigmoid: from 0 (float32
    # sigmoids underflow below about -88.7) through 1e-35 to within 1e-7 of 1,
    # the whole range of the BCE logs (vectorized in float32). Targets mix
    # soft labels with exact 0 and 1.
    g = torch.Generator().manual_seed(11)
    n, K = 256, 24
    y = torch.linspace(-120.0, 17.0, n).view(n, 1, 1, 1)
    Cs = torch.linspace(0.5, 1.0, K).view(1, K)
    bs = torch.zeros(1)
    pixel = torch.randint(0, K, (n, 1, 1), generator=g)
    image = torch.rand(n, K, generator=g)
    image[::3] = image[::3].round()
    for weights in [(0.0, 1.0), (1.0, 1.0)]:
        loss = srm_ext.predictor_loss(y, Cs, bs, pixel, image, *weights)
        ref = reference.predictor_loss(y, Cs, bs, pixel, image, *weights)
        assert_close(loss, ref, torch.float32)


# --- ties --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_codewords_tie_to_lower_index(dtype):
    x = torch.randn(2, 6, 4, 3, dtype=dtype)
    C = torch.randn(6, 1, dtype=dtype).repeat(1, 12)  # twelve identical codewords
    values, indices = srm_ext.sparse_encode(x, C, torch.zeros(1, dtype=dtype), 5)
    expected = torch.arange(5).expand(2, 4, 3, 5)
    torch.testing.assert_close(indices, expected, rtol=0, atol=0)
    assert (values == values[..., :1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_ties_keep_exactly_k(dtype):
    # Codewords 1, 3, 4 and 6 are copies: pre-activations tie in groups.
    g = torch.Generator().manual_seed(9)
    base = dyadic(5, 4, dtype=dtype, generator=g)
    C = base[:, [0, 1, 2, 1, 1, 3, 1]]
    x = dyadic(3, 5, 4, 4, dtype=dtype, generator=g)
    for k in range(1, 8):
        values, indices = srm_ext.sparse_encode(x, C, torch.zeros(1, dtype=dtype), k)
        ref_values, ref_indices = reference.sparse_encode(x, C, torch.zeros(1, dtype=dtype), k)
        assert indices.shape[-1] == k
        torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "indices must be distinct"


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_sigmoid_selects_on_pre_activations(dtype):
    # Pre-activations 40, 50, 60 ... all give sigmoid == 1.0 in float32, yet
    # the order must follow the pre-activations, not the tied similarities.
    x = torch.ones(1, 1, 1, 1, dtype=dtype)
    C = torch.tensor([[40.0, 60.0, 50.0, -70.0, 45.0]], dtype=dtype)
    values, indices = srm_ext.sparse_encode(x, C, torch.zeros(1, dtype=dtype), 3)
    assert indices.flatten().tolist() == [1, 2, 4]
    ref_values, ref_indices = reference.sparse_encode(x, C, torch.zeros(1, dtype=dtype), 3)
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, ref_values)


# Rows long enough for the screened top-k (K >= 32 k): candidates ranked by
# counting, many tied candidates (ranked by insertion), more block maxima
# than are counted, K not a multiple of the 16-entry block, and NaN.
SCREENED = [
    ("random", 2048, 40),
    ("ties", 2048, 40),
    ("ties", 520, 10),
    ("random", 8192, 64),
    ("random", 1000, 3),
    ("nan", 512, 5),
    ("nan in the tail", 520, 10),  # past the last whole 16-entry block
    ("nan intercept", 512, 5),
    ("infinite intercept", 512, 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values,K,k", SCREENED)
def test_screened_selection_matches_reference(values, K, k, dtype):
    g = torch.Generator().manual_seed(K + k)
    if values == "ties":  # small integers: each row holds a few values, many times over
        x = torch.randint(-2, 3, (2, 6, 3, 3), generator=g).to(dtype)
        C = torch.randint(-1, 2, (6, K), generator=g).to(dtype)
    else:
        x = dyadic(2, 6, 3, 3, dtype=dtype, generator=g)
        C = dyadic(6, K, dtype=dtype, generator=g)
    if values == "nan":
        x[1, 2, 0, 1] = float("nan")
    if values == "nan in the tail":
        C[2, K - 3] = float("nan")
    b = torch.zeros(1, dtype=dtype)
    if values == "nan intercept":
        b.fill_(float("nan"))
    if values == "infinite intercept":  # -inf plus an infinite similarity is NaN
        b.fill_(float("-inf"))
        x[0, 0, 1, 1] = float("inf")
    got_values, got_indices = srm_ext.sparse_encode(x, C, b, k)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    torch.testing.assert_close(got_indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(got_values, ref_values, equal_nan=True)


def test_nan_pre_activations_rank_first_and_indices_stay_in_range():
    x = torch.randn(2, 4, 3, 3)
    x[0, 1, 1, 1] = float("nan")
    C = torch.randn(4, 9)
    C[2, 5] = float("inf")
    values, indices = srm_ext.sparse_encode(x, C, torch.zeros(1), 4)
    ref_values, ref_indices = reference.sparse_encode(x, C, torch.zeros(1), 4)
    assert indices.min() >= 0 and indices.max() < 9
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, ref_values, equal_nan=True)
    assert torch.isnan(srm_ext.reconstruction_loss(x, C, torch.zeros(1), 4))


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3)
    values, indices = srm_ext.sparse_encode(x, torch.randn(4, 6), torch.zeros(1), 2)
    assert values.shape == (0, 3, 3, 2) and indices.shape == (0, 3, 3, 2)
    assert srm_ext.sparse_decode(values, indices, torch.randn(4, 6)).shape == (0, 4, 3, 3)


def _all_outputs_and_gradients(x, C, b, k):
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    return (
        values,
        indices,
        grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b)),
        grads(lambda *a: srm_ext.sparse_encode(*a, k)[0], (x, C, b)),
        grads(lambda v, c: srm_ext.sparse_decode(v, indices, c), (values, C)),
    )


def _student_loss_terms(y, Cs, bs, pixel, image):
    # The loss and the intercept's gradient, and the y gradient where the
    # project's product kernel forms it (one call per tile, on one thread).
    # The dictionary gradient is summed per worker thread, and BLAS may
    # split a long reduction differently for another thread count.
    with_y = _backend.native_module.build_info()["float32_matmul"] == "avx512"
    loss, grad_y, _, grad_bias = torch.ops.srm_ext.predictor_loss(
        y, Cs, bs, pixel, image, 1.0, 1.0, [with_y, False, True]
    )
    return loss, grad_y, grad_bias


def test_results_do_not_depend_on_thread_count():
    # Every partial sum the kernels form has a fixed order (per tile, per piece
    # of pixels, per image or slice of one, per codeword row), so even the
    # gradients are bitwise equal.
    x, C, b, k = make_inputs((4, 16, 9, 9, 64, 5), torch.float32, seed=10)
    # The student loss in both its layouts of work: images large enough to be
    # split into slices, and small images grouped into tiles (one tile, and
    # four of four images each).
    students = [
        make_predictor_inputs((4, 8, 31, 31, 512, 3), torch.float32, seed=10),
        make_predictor_inputs((7, 8, 2, 2, 64, 3), torch.float32, seed=10),
        make_predictor_inputs((16, 8, 4, 4, 64, 3), torch.float32, seed=10),
    ]
    threads = torch.get_num_threads()
    try:
        results = []
        # Tiles and blocks are sized by the thread count: three threads split
        # the pixels unlike one or two.
        for n in sorted({1, 2, 3, threads}):
            torch.set_num_threads(n)
            results.append(
                (
                    _all_outputs_and_gradients(x, C, b, k),
                    [_student_loss_terms(*student) for student in students],
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_over_several_pixel_blocks(dtype, two_threads):
    # The backward kernels walk the pixels in blocks of about 2^16 values, in
    # whole 32-pixel pieces per thread (block_pixels). With 700-odd values per
    # pixel that is 2 pieces, 64 pixels, on 1 or 2 threads: the 429 pixels
    # take 7 blocks, the last a partial one of 45. From 3 threads on a block
    # is one piece per thread, and from 14 one block holds every pixel.
    x, C, b, k = make_inputs((3, 700, 11, 13, 24, 3), dtype, seed=12)
    native = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
    expected = grads(lambda *a: reference.reconstruction_loss(*a, k), (x, C, b))
    for actual, want in zip(native, expected):
        assert_close(actual, want, dtype)
    values, indices = reference.sparse_encode(x, C, b, k)
    native = grads(lambda v, c: srm_ext.sparse_decode(v, indices, c), (values, C))
    expected = grads(lambda v, c: reference.sparse_decode(v, indices, c), (values, C))
    for actual, want in zip(native, expected):
        assert_close(actual, want, dtype)


def test_repeated_runs_are_bitwise_identical():
    x, C, b, k = make_inputs((4, 16, 9, 9, 64, 5), torch.float32, seed=11)
    first = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
    second = grads(lambda *a: srm_ext.reconstruction_loss(*a, k), (x, C, b))
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize(
    "grad_loss, message",
    [
        (torch.tensor(1.0, device="meta"), "its tensors are on meta and cpu; expected them all on one device"),
        (torch.tensor(1), "grad_loss must be float32 or float64 for the CPU kernels, got Long"),
    ],
    ids=["meta", "int64"],
)
def test_the_loss_backward_op_refuses_a_grad_loss_it_cannot_read(grad_loss, message):
    # Meta dispatch returned unwritten CPU gradients; an integer is refused as
    # the other backward ops refuse theirs.
    x, C, b, k = make_inputs((2, 4, 3, 3, 6, 2), torch.float32, seed=5)
    _, values, indices = torch.ops.srm_ext.reconstruction_loss(x, C, b, k)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.srm_ext.reconstruction_loss_backward(grad_loss, x, C, b, values, indices, [True] * 3)


def test_ops_refuse_meta_tensors_beside_others():
    # Such a call goes to the meta kernel, whose outputs would be unwritten.
    x, C, b, k = make_inputs((2, 4, 3, 3, 6, 2), torch.float32, seed=5)
    with pytest.raises(RuntimeError, match="sparse_encode: its tensors are on meta and cpu"):
        torch.ops.srm_ext.sparse_encode(x, C.to("meta"), b, k)
    values, indices = torch.ops.srm_ext.sparse_encode(*(t.to("meta") for t in (x, C, b)), k)
    assert values.is_meta and values.shape == (2, 3, 3, k)  # all on meta: shapes only


def test_backward_ops_name_a_tensor_of_another_dtype():
    # The backward ops are public operators too: a gradient or a code of
    # another dtype than x must be refused by name, not read as x's dtype.
    x, C, b, k = make_inputs((2, 8, 3, 3, 10, 3), torch.float32, seed=13)
    values, indices = srm_ext.sparse_encode(x, C, b, k)
    ops = torch.ops.srm_ext
    mask = [True, True, True]
    with pytest.raises(RuntimeError, match="grad_values has dtype Double but values has Float"):
        ops.sparse_encode_backward(values.double(), values, indices, x, C, b, mask)
    with pytest.raises(RuntimeError, match="values has dtype Double but x has Float"):
        ops.sparse_encode_backward(values.double(), values.double(), indices, x, C, b, mask)
    with pytest.raises(RuntimeError, match="values has dtype Double but x has Float"):
        ops.reconstruction_loss_backward(torch.tensor(1.0), x, C, b, values.double(), indices, mask)
    with pytest.raises(RuntimeError, match="grad_output has dtype Double but values has Float"):
        ops.sparse_decode_backward(x.double(), values, indices, C, [True, True])
