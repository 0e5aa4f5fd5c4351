"""The CUDA kernels, run on the CPU by the emulator, against plain PyTorch.

These run everywhere, GPU or not: they check the kernels' indexing, tails,
tie-breaks, shared-memory staging and barriers (see tools/cuda_emulator), one
launcher at a time. What only a GPU can show (timing, real warp scheduling,
the torch glue, compute-sanitizer) stays in test_cuda_kernels.py.

Inputs are multiples of 1/8 (conftest.dyadic), so products and sums are exact
in float32 and in the float32 accumulators of every dtype: indices must match
exactly and values agree to the rounding of the output dtype.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from srm_ext import reference

import cuda_emulation
from conftest import dyadic, make_layout, tf32_misranked_inputs, warp_order_dots

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Results in each dtype against a float64 computation, compared in float32:
# one rounding to the dtype plus float32 summation.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
LAYOUTS = ["contiguous", "channels_last", "strided"]
# (N, D, H, W, K, k): tails of every tile size, k = K, k = 1, one pixel,
# and k past the 64 that fits the default shared memory.
SHAPES = [
    (2, 8, 5, 7, 20, 4),
    (1, 3, 1, 1, 5, 1),
    (2, 4, 3, 3, 6, 6),
    (3, 17, 7, 5, 33, 7),
    (1, 40, 3, 3, 130, 64),
    (1, 24, 2, 3, 150, 81),
    (1, 8, 2, 2, 128, 128),
    (1, 64, 2, 3, 1000, 40),  # many tiles: the top-k lists merge again and again
]
SCHEDULES = cuda_emulation.SCHEDULES


@pytest.fixture
def emu(request):
    """The emulated kernels, with the blocks of a grid run in a shuffled
    order, and the threads of a block between barriers either shuffled or
    warp by warp (each case takes one of the two by a hash of its id, so
    about half the cases of a parametrised test take each; `scheduled` runs
    a test under all of them): a missing barrier or a block that reads
    another's output then gives a wrong result."""
    module = cuda_emulation.load()
    module.set_schedule(cuda_emulation.schedule_of_case(request.node.nodeid), 7)
    return module


@pytest.fixture(params=list(SCHEDULES))
def scheduled(emu, request):
    """The emulated kernels under each thread order."""
    emu.set_schedule(SCHEDULES[request.param], 11)
    return emu


GUARD = 64  # elements on each side of an output


def guarded(*shape, dtype=torch.float32, fill=float("nan")):
    """An output tensor (filled with `fill`) inside a larger buffer whose
    other elements hold a sentinel, for writes_only_inside()."""
    numel = torch.Size(shape).numel()
    buffer = torch.full((numel + 2 * GUARD,), -3, dtype=dtype)
    return buffer[GUARD : GUARD + numel].view(shape).fill_(fill)


def storage_of(view):
    """All elements of view's storage, as a flat tensor."""
    return torch.empty(0, dtype=view.dtype).set_(view.untyped_storage())


@contextlib.contextmanager
def writes_only_inside(*views):
    """Asserts that the code in the block changes no element of the views'
    storage outside the views: the kernel wrote nothing out of bounds."""
    before = [storage_of(view).clone() for view in views if view is not None]
    yield
    for view, snapshot in zip([v for v in views if v is not None], before):
        storage = storage_of(view)
        inside = torch.zeros(storage.numel(), dtype=torch.bool)
        positions = torch.arange(storage.numel())
        inside[positions.as_strided(view.shape, view.stride(), view.storage_offset())] = True
        assert torch.equal(storage[~inside], snapshot[~inside]), "written out of bounds"


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


def encode_inputs(shape, dtype, seed=0, layout="contiguous"):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    x = dyadic(n, d, h, w, dtype=torch.float32, generator=g)
    C = dyadic(d, K, dtype=torch.float32, generator=g, span=1) / 4
    b = dyadic(1, dtype=torch.float32, generator=g)
    return make_layout(x.to(dtype), layout), C.to(dtype), b, k


def run_encode(emu, x, C, b, k, tensor_cores, with_loss=False):
    n, _, h, w = x.shape
    values = guarded(n, h, w, k, dtype=x.dtype)
    indices = guarded(n, h, w, k, dtype=torch.long, fill=-5)
    partials = guarded(emu.sparse_encode_num_blocks(n * h * w)) if with_loss else None
    with writes_only_inside(values, indices, partials):
        emu.sparse_encode(x, C.contiguous(), b.float(), k, tensor_cores, values, indices, partials)
    return values, indices, partials


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fma", "mma"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encode(emu, shape, dtype, layout, tensor_cores):
    x, C, b, k = encode_inputs(shape, dtype, layout=layout)
    values, indices, partials = run_encode(emu, x, C, b, k, tensor_cores, with_loss=True)
    ref_values, ref_indices = reference.sparse_encode(x.float(), C.float(), b, k)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values, dtype)
    # The fused loss rebuilds x_hat from the values as rounded to the dtype.
    x_hat = reference.sparse_decode(values.float(), indices, C.float())
    expected = ((x_hat.double() - x.double()) ** 2).sum()
    torch.testing.assert_close(partials.double().sum(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fma", "mma"])
def test_encode_schedules(scheduled, tensor_cores):
    x, C, b, k = encode_inputs((2, 40, 3, 7, 200, 20), torch.float32, seed=3)
    values, indices, _ = run_encode(scheduled, x, C, b, k, tensor_cores)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert torch.equal(indices, ref_indices)
    close(values, ref_values, torch.float32)


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fma", "mma"])
def test_encode_ties_and_nan(emu, tensor_cores):
    """Equal codewords tie to the lower index, NaN ranks above +inf and
    saturated sigmoids do not change the order of the pre-activations."""
    x, C, b, k = encode_inputs((2, 8, 4, 5, 70, 9), torch.float32, seed=5)
    C[:, 40:60] = C[:, 10:11]  # 21 equal codewords, 10 and 40..59
    C[:, 3] *= 64  # saturated: sigmoid rounds to 1 or 0
    x[0, :, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    values, indices, _ = run_encode(emu, x, C, b, k, tensor_cores)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, equal_nan=True)


def test_encode_beyond_default_shared_memory_needs_the_attribute(emu):
    """k = 128 lists take more than 48 KiB of dynamic shared memory, which a
    launch only gets after raising the kernel's attribute (done once)."""
    x, C, b, k = encode_inputs((1, 8, 2, 2, 300, 128), torch.float32)
    for _ in range(2):
        values, indices, _ = run_encode(emu, x, C, b, k, False)
        assert torch.equal(indices, reference.sparse_encode(x, C, b, k)[1])


def run_select(emu, pre, b, k, dtype):
    """The row-wise selection of the GEMM encode path over float32 rows."""
    values = guarded(pre.shape[0], k, dtype=dtype)
    indices = guarded(pre.shape[0], k, dtype=torch.long, fill=-5)
    with writes_only_inside(values, indices):
        emu.select_top_k(pre, b.float(), k, values, indices)
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_select_top_k_matches_the_reference_encode(emu, shape, dtype):
    """The GEMM path's second half: given the pre-activations (as cuBLAS
    writes them, intercept not added), the same values and indices as the
    reference's encode."""
    x, C, b, k = encode_inputs(shape, dtype)
    pre = x.float().permute(0, 2, 3, 1).reshape(-1, C.shape[0]) @ C.float()
    values, indices = run_select(emu, pre, b, k, dtype)
    ref_values, ref_indices = reference.sparse_encode(x.float(), C.float(), b, k)
    assert torch.equal(indices, ref_indices.reshape(-1, k))
    close(values, ref_values.reshape(-1, k), dtype)


def test_select_top_k_reads_rows_through_their_stride(scheduled):
    """Rows spaced wider than K (a view of a larger buffer): entries between
    them are never candidates, here made larger than any real one."""
    g = torch.Generator().manual_seed(8)
    rows, K, k = 37, 300, 20
    buffer = torch.full((rows, K + 13), 1e30)
    buffer[:, :K] = dyadic(rows, K, dtype=torch.float32, generator=g)
    pre = buffer[:, :K]
    b = torch.tensor([0.25])
    values, indices = run_select(scheduled, pre, b, k, torch.float32)
    order = torch.sort(pre + b, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices, order)
    torch.testing.assert_close(values, torch.sigmoid(torch.gather(pre, 1, order) + b))


def test_select_top_k_ties_and_nan(emu):
    """Ties go to the lower index, NaN ranks above +inf, -0 ties with +0, as
    in the fused kernel and the reference."""
    g = torch.Generator().manual_seed(9)
    pre = dyadic(6, 150, dtype=torch.float32, generator=g)
    pre[0, 70:140] = pre[0, 5]  # 71 equal pre-activations across three tiles
    pre[1, 100] = float("nan")
    pre[1, 3] = float("inf")
    pre[2, :] = 0.0
    pre[2, ::3] = -0.0
    pre[3, :] = float("-inf")
    b = torch.tensor([0.0])
    for k in (1, 9, 64, 128):
        values, indices = run_select(emu, pre, b, k, torch.float32)
        order = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(indices, order), k
        torch.testing.assert_close(values, torch.sigmoid(torch.gather(pre, 1, order)), equal_nan=True)


def tf32_truncated(t):
    """t with the 13 low mantissa bits of every float32 cleared: the least
    precise rounding TF32 tensor cores apply to their operands."""
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def integer_features(shape, generator, bits=12):
    """Integers of up to `bits` bits: truncated to TF32 they lose their low
    bits, yet every dot product with small dyadic codewords is exact in
    float32, so the exact top k (ties included) is known."""
    return torch.randint(-(2**bits) + 1, 2**bits, shape, generator=generator).float()


def screened_encode(emu, x, C, b, k, num_candidates):
    """The screened encode's kernels in a row, as the glue runs them over one
    box: TF32-ranked candidates, their exact dots, the certified top k, then
    the exact encode of the uncertified pixels. Returns values, indices and
    how many pixels fell back."""
    n, d, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, d)
    pre = tf32_truncated(rows) @ tf32_truncated(C)
    candidates = torch.empty(rows.shape[0], num_candidates, dtype=torch.long)
    cutoff = torch.empty(rows.shape[0])
    emu.select_candidates(pre, b, num_candidates, candidates, cutoff)
    dictionary_t = C.t().contiguous()
    dots = torch.empty(rows.shape[0], num_candidates)
    norms = torch.empty(rows.shape[0])
    emu.codeword_dots(x, candidates, num_candidates, dictionary_t, None, dots, norms)
    norm_max = torch.linalg.vector_norm(C, dim=0).max().reshape(1)
    values = guarded(rows.shape[0], k)
    indices = guarded(rows.shape[0], k, dtype=torch.long, fill=-5)
    fallback_rows = torch.full((rows.shape[0],), -1, dtype=torch.long)
    fallback_count = torch.zeros(1, dtype=torch.long)
    with writes_only_inside(values, indices, fallback_rows):
        emu.certify_top_k(dots, candidates, cutoff, norms, norm_max, *emu.tf32_error_bound(d), b,
                          k, values, indices, 0, fallback_rows, fallback_count)
        emu.exact_rows_top_k(x, dictionary_t, fallback_rows, fallback_count, rows.shape[0], b, k,
                             values, indices)
    return values, indices, int(fallback_count)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 40, 3, 5, 300, 5), (1, 24, 4, 4, 130, 40), (1, 8, 2, 3, 70, 1)])
def test_screened_encode_kernels_give_the_exact_top_k(scheduled, shape, layout):
    """TF32 ranks, the exact dots decide: the indices are the exact top k
    (ties to the lower index), certified or re-encoded in full."""
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(21)
    x = integer_features((n, d, h, w), g)
    C = torch.randint(-15, 16, (d, K), generator=g).float() / 16
    C[:, 7] = C[:, 3]  # equal codewords: their exact dots tie
    x[0, :, 0, 1] = x[0, :, 0, 0]
    x[0, :, 1, 0] = 0.0  # every score ties: only the full exact encode can tell
    x[n - 1, 2, h - 1, w - 1] = float("nan")
    x = make_layout(x, layout)
    b = torch.tensor([0.375])
    values, indices, fallen = screened_encode(scheduled, x, C, b, k, min(k + max(k, 8), 128))
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    assert torch.equal(indices, ref_indices.reshape(-1, k))
    torch.testing.assert_close(values, ref_values.reshape(-1, k), equal_nan=True)
    # The all-zero pixel and the NaN pixel fell back; most others did not.
    assert 2 <= fallen < n * h * w // 2


def test_screened_encode_falls_back_where_tf32_misranks(emu):
    num_candidates = 17
    x, C = tf32_misranked_inputs(num_candidates)
    values, indices, fallen = screened_encode(emu, x, C, torch.tensor([0.0]), 1, num_candidates)
    assert indices.tolist() == [[num_candidates]] and fallen == 1


def test_certify_top_k_refuses_to_certify_near_ties(emu):
    """A k-th best within the error bound of the cutoff is not certified,
    one clear of it is; NaN and an infinite bound never are."""
    rows, c, k = 4, 6, 2
    dots = torch.tensor([[9.0, 8.0, 5.0, 4.0, 3.0, 2.0]]).repeat(rows, 1)
    candidates = torch.arange(c).repeat(rows, 1)
    cutoff = torch.tensor([7.0, 7.9, 7.0, 7.0])  # row 1: the k-th (8) is 0.1 above
    norms = torch.tensor([1.0, 1.0, float("inf"), float("nan")])
    norm_max = torch.tensor([1.0])
    values, indices = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.long)
    fallback_rows = torch.full((rows,), -1, dtype=torch.long)
    fallback_count = torch.zeros(1, dtype=torch.long)
    emu.certify_top_k(dots, candidates, cutoff, norms, norm_max, 0.5, 0.0, 0.0, torch.tensor([0.0]), k,
                      values, indices, 10, fallback_rows, fallback_count)
    assert int(fallback_count) == 3
    assert sorted(fallback_rows[:3].tolist()) == [11, 12, 13]
    assert indices.tolist() == [[0, 1]] * rows
    torch.testing.assert_close(values, torch.sigmoid(dots[:, :k]))


def test_certify_top_k_allows_for_subnormals_flushed_to_zero(emu):
    """Tensor cores may flush subnormal operands to zero: a pixel of
    subnormal features then scores 0 against every codeword under TF32, and
    candidates chosen among those ties prove nothing. Only the bound's
    underflow term, not its relative one, refuses such a pixel."""
    k, depth = 2, 64
    dots = torch.tensor([[3e-40, 2e-40, 1e-40]])  # exact, and subnormal
    candidates = torch.arange(3).reshape(1, 3)
    cutoff = torch.zeros(1)  # every TF32 score, flushed
    norms, norm_max = torch.tensor([1e-38]), torch.tensor([1.0])
    relative, underflow, _ = emu.tf32_error_bound(depth)
    for underflow_error, expected_fallbacks in ((0.0, 0), (underflow, 1)):
        count = torch.zeros(1, dtype=torch.long)
        emu.certify_top_k(dots, candidates, cutoff, norms, norm_max, relative, underflow_error, 0.0,
                          torch.tensor([0.0]), k, torch.empty(1, k), torch.empty(1, k, dtype=torch.long),
                          0, torch.full((1,), -1, dtype=torch.long), count)
        assert int(count) == expected_fallbacks


@pytest.mark.parametrize("tiny", ["pixels", "codewords"])
def test_screened_encode_falls_back_where_the_norms_underflow(emu, tiny):
    """Features (or codewords) of 2^-76 are normal floats that TF32 rounds,
    yet their squares underflow, so the float32 norms come out 0: without
    the norm floor the bound would be 0 too and certify TF32's ties."""
    num_codewords, depth, k = 300, 8, 4
    # TF32 rounds every codeword to all ones: every TF32 score ties, and the
    # exact scores rise with the codeword index.
    C = 1.0 + torch.arange(num_codewords).float().mul(2.0**-20).repeat(depth, 1)
    x = torch.ones(1, depth, 1, 1)
    if tiny == "pixels":
        x = x * 2.0**-76
    else:
        C = C * 2.0**-76
    values, indices, fallen = screened_encode(emu, x, C, torch.tensor([0.0]), k, k + 8)
    ref_values, ref_indices = reference.sparse_encode(x, C, torch.tensor([0.0]), k)
    assert fallen == 1
    assert torch.equal(indices, ref_indices.reshape(-1, k))
    assert indices.tolist() == [[299, 298, 297, 296]]


def test_exact_rows_top_k_writes_only_the_listed_pixels(scheduled):
    g = torch.Generator().manual_seed(22)
    n, d, h, w, K, k = 2, 50, 3, 4, 200, 9
    x = make_layout(integer_features((n, d, h, w), g), "channels_last")
    C = torch.randint(-15, 16, (d, K), generator=g).float() / 16
    b = torch.tensor([-0.5])
    listed = torch.tensor([17, 0, 23, 5, 9])
    fallback_rows = torch.cat([listed, torch.full((3,), 1000)])  # past the count: never read
    values = torch.full((n * h * w, k), -3.0)
    indices = torch.full((n * h * w, k), -3, dtype=torch.long)
    scheduled.exact_rows_top_k(x, C.t().contiguous(), fallback_rows,
                               torch.tensor([len(listed)]), n * h * w, b, k,
                               values, indices)
    ref_values, ref_indices = reference.sparse_encode(x, C, b, k)
    unlisted = torch.ones(n * h * w, dtype=torch.bool)
    unlisted[listed] = False
    assert torch.equal(indices[listed], ref_indices.reshape(-1, k)[listed])
    torch.testing.assert_close(values[listed], ref_values.reshape(-1, k)[listed])
    assert (indices[unlisted] == -3).all() and (values[unlisted] == -3).all()


def test_screened_encode_kernels_refuse_bad_arguments(emu):
    dots, candidates = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long)
    one, count = torch.ones(2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="invalid argument"):  # k > candidates
        emu.certify_top_k(dots, candidates, one, one, one, 0.1, 0.0, 0.0, one, 5, torch.zeros(2, 5),
                          torch.zeros(2, 5, dtype=torch.long), 0, torch.zeros(2, dtype=torch.long), count)
    x16 = torch.zeros(1, 4, 1, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="invalid argument"):  # float32 only
        emu.exact_rows_top_k(x16, torch.zeros(8, 4), torch.zeros(2, dtype=torch.long), count, 2,
                             one, 2, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_square_sums(emu, dtype, layout):
    n, d, h, w, K, k = 2, 37, 5, 7, 50, 6
    g = torch.Generator().manual_seed(6)
    coef, indices = sparse_code(n, h, w, K, k, seed=7, out_of_range=True)
    dictionary_t = dyadic(K, d, generator=g, dtype=torch.float32).to(dtype)
    x = make_layout(dyadic(n, d, h, w, generator=g, dtype=torch.float32).to(dtype), layout)
    partials = guarded(emu.residual_square_sums_num_blocks(n * h * w))
    with writes_only_inside(partials):
        emu.residual_square_sums(coef, indices, k, dictionary_t, x, partials)
    residual = decode_expected(coef, indices, dictionary_t) - x.double()
    # One partial per 32 pixels, each the sum over its own pixels.
    per_pixel = (residual**2).sum(1).reshape(-1)
    expected = torch.stack([part.sum() for part in per_pixel.split(32)])
    torch.testing.assert_close(partials.double(), expected, rtol=1e-5, atol=1e-5)


def sparse_code(n, h, w, K, k, seed, dtype=torch.float32, out_of_range=False):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack(
        [torch.randperm(K, generator=g)[:k] for _ in range(n * h * w)]
    ).reshape(n, h, w, k)
    if out_of_range:
        indices.view(-1)[::5] = K
        indices.view(-1)[1::7] = -1
    coef = dyadic(n, h, w, k, dtype=torch.float32, generator=g)
    return coef.to(dtype).float(), indices


def gathered(indices, K):
    """(mask of in-range entries, indices clamped into range)."""
    valid = (indices >= 0) & (indices < K)
    return valid, indices.clamp(0, K - 1)


def decode_expected(coef, indices, dictionary_t):
    """sum_j coef_pj * C[:, idx_pj] over in-range entries, (N, D, H, W) float64."""
    valid, safe = gathered(indices, dictionary_t.shape[0])
    rows = dictionary_t.double()[safe]  # (N, H, W, k, D)
    weights = (coef.double() * valid).unsqueeze(-1)
    return (weights * rows).sum(dim=3).permute(0, 3, 1, 2)


@pytest.mark.parametrize("k", [6, 45], ids=["k6", "k45"])  # one and two chunks of entries
@pytest.mark.parametrize("out_float", [False, True], ids=["out_dtype", "out_float32"])
@pytest.mark.parametrize("addend", [None, "dtype", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_codewords(emu, dtype, layout, addend, out_float, k):
    n, d, h, w, K = 2, 37, 5, 7, 50
    g = torch.Generator().manual_seed(1)
    coef, indices = sparse_code(n, h, w, K, k, seed=2, out_of_range=True)
    dictionary_t = dyadic(K, d, generator=g, dtype=torch.float32).to(dtype)
    out_dtype = torch.float32 if out_float else dtype
    out = make_layout(guarded(n, d, h, w, dtype=out_dtype, fill=0), layout)
    add = None
    if addend is not None:
        add = dyadic(n, d, h, w, generator=g, dtype=torch.float32)
        add = make_layout(add.to(dtype if addend == "dtype" else torch.float32), layout)
    device_scale = torch.tensor([0.5])
    with writes_only_inside(out):
        emu.combine_codewords(coef, indices, k, dictionary_t, add, -1.0, device_scale, 0.25, out)
    expected = decode_expected(coef, indices, dictionary_t)
    if add is not None:
        expected = expected - add.double()
    close(out, 0.125 * expected, torch.float32 if out_float else dtype)


# Every layout and addend dtype at k = 6; two chunks of entries (k = 45),
# which the emulator runs slowly, once per dtype.
COMBINE_AND_DOTS_CASES = [
    (layout, addend, sigmoid, 6)
    for layout in LAYOUTS
    for addend in ("dtype", "float32")
    for sigmoid in ("none", "given", "of_addend")
] + [("channels_last", "float32", "given", 45), ("strided", "dtype", "of_addend", 45)]


@pytest.mark.parametrize("layout, addend, sigmoid_source, k", COMBINE_AND_DOTS_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_codewords_and_dots(emu, dtype, layout, addend, sigmoid_source, k):
    """The stage-1 backward's residual and its entry dots from one pass: the
    residual as combine_codewords writes it, the dots as codeword_dots gives
    them from that residual (bitwise: both sum the same float32 terms in the
    same order). The entries' sigmoid is given, or recomputed from the
    addend's pre-activations <x_p, C_j> + b (what 16-bit codes need)."""
    n, d, h, w, K = 2, 37, 5, 7, 50
    g = torch.Generator().manual_seed(12)
    coef, indices = sparse_code(n, h, w, K, k, seed=13, out_of_range=True)
    dictionary_t = dyadic(K, d, generator=g, dtype=torch.float32).to(dtype)
    x = dyadic(n, d, h, w, generator=g, dtype=torch.float32)
    x = make_layout(x.to(dtype if addend == "dtype" else torch.float32), layout)
    valid, safe = gathered(indices, K)
    rows = dictionary_t.double()[safe]  # (N, H, W, k, D)
    pre_exact = ((rows * x.double().permute(0, 2, 3, 1).unsqueeze(3)).sum(-1) * valid).reshape(-1, k)
    intercept = torch.tensor([-0.375])
    sigmoid = addend_intercept = None
    if sigmoid_source == "given":
        sigmoid = torch.rand(n * h * w, k, generator=g)
    elif sigmoid_source == "of_addend":
        addend_intercept = intercept
        pre = torch.empty(n * h * w, k)
        emu.codeword_dots(x, indices, k, dictionary_t, None, pre, None)
        assert torch.equal(pre.double(), pre_exact)  # dyadic: exact in float32
        sigmoid = torch.sigmoid(pre + intercept)
    device_scale = torch.tensor([0.5])
    out = make_layout(guarded(n, d, h, w, fill=0), layout)
    dots = guarded(n * h * w, k)
    with writes_only_inside(out, dots):
        emu.combine_codewords_and_dots(
            coef, indices, k, dictionary_t, x, -1.0, device_scale, 0.25, out,
            sigmoid if addend_intercept is None else None, addend_intercept, dots,
        )
    expected_out = make_layout(guarded(n, d, h, w, fill=0), layout)
    emu.combine_codewords(coef, indices, k, dictionary_t, x, -1.0, device_scale, 0.25, expected_out)
    assert torch.equal(out, expected_out)
    expected_dots = torch.empty(n * h * w, k)
    emu.codeword_dots(out, indices, k, dictionary_t, sigmoid, expected_dots, None)
    if addend_intercept is None:
        assert torch.equal(dots, expected_dots)
    else:  # the kernel's sigmoid against torch's: a few ulp
        torch.testing.assert_close(dots, expected_dots, rtol=1e-6, atol=1e-7)
    # And against float64 arithmetic, so that the two kernels cannot agree on
    # a wrong answer.
    residual = 0.125 * (decode_expected(coef, indices, dictionary_t) - x.double())
    exact = ((rows * residual.permute(0, 2, 3, 1).unsqueeze(3)).sum(-1) * valid).reshape(-1, k)
    if sigmoid_source == "given":
        exact = exact * sigmoid.double() * (1 - sigmoid.double())
    elif sigmoid_source == "of_addend":
        s = torch.sigmoid(pre_exact + intercept.double())
        exact = exact * s * (1 - s)
    torch.testing.assert_close(dots.double(), exact, rtol=1e-5, atol=1e-5)


def test_combine_codewords_and_dots_refuses_what_it_cannot_do(emu):
    refused = r"launch_combine_codewords \(with entry dots\) returned invalid argument"
    coef, indices = sparse_code(1, 2, 2, 200, 129, seed=14)
    dictionary_t = torch.zeros(200, 3)
    dots = torch.empty(4, 129)
    with pytest.raises(RuntimeError, match=refused):
        emu.combine_codewords_and_dots(
            coef, indices, 129, dictionary_t, None, 0.0, None, 1.0,
            torch.empty(1, 3, 2, 2), None, None, dots,
        )  # k past kMaxTopK
    coef, indices = sparse_code(1, 2, 2, 20, 3, seed=15)
    dictionary_t = torch.zeros(20, 3)
    x = torch.zeros(1, 3, 2, 2)
    intercept = torch.zeros(1)
    with pytest.raises(RuntimeError, match=refused):
        emu.combine_codewords_and_dots(
            coef, indices, 3, dictionary_t.bfloat16(), None, 0.0, None, 1.0,
            torch.empty(1, 3, 2, 2, dtype=torch.bfloat16), None, None, torch.empty(4, 3),
        )  # a 16-bit output
    with pytest.raises(RuntimeError, match=refused):
        emu.combine_codewords_and_dots(
            coef, indices, 3, dictionary_t, None, 0.0, None, 1.0,
            torch.empty(1, 3, 2, 2), None, intercept, torch.empty(4, 3),
        )  # a sigmoid from the addend without one
    with pytest.raises(RuntimeError, match=refused):
        emu.combine_codewords_and_dots(
            coef, indices, 3, dictionary_t, x, -1.0, None, 1.0,
            torch.empty(1, 3, 2, 2), torch.rand(4, 3), intercept, torch.empty(4, 3),
        )  # the sigmoid both given and recomputed


def entry_dot_inputs(dtype, layout, features_float, k, seed):
    """(indices with out-of-range entries, (K, D) dictionary in dtype, a
    feature map in dtype or float32, generator, float64 <f_p, C_j> of every
    in-range entry as (P, k)), N, D, H, W, K = 2, 45, 3, 5, 40."""
    n, d, h, w, K = 2, 45, 3, 5, 40
    g = torch.Generator().manual_seed(seed)
    _, indices = sparse_code(n, h, w, K, k, seed=seed + 1, out_of_range=True)
    dictionary_t = dyadic(K, d, generator=g, dtype=torch.float32).to(dtype)
    features = dyadic(n, d, h, w, generator=g, dtype=torch.float32)
    features = make_layout(features.to(torch.float32 if features_float else dtype), layout)
    valid, safe = gathered(indices, K)
    rows = dictionary_t.double()[safe]  # (N, H, W, k, D)
    f = features.double().permute(0, 2, 3, 1).unsqueeze(3)
    exact = ((rows * f).sum(-1) * valid).reshape(-1, k)
    return indices, dictionary_t, features, g, exact


@pytest.mark.parametrize("k", [7, 37], ids=["k7", "k37"])  # one and two chunks of entries
@pytest.mark.parametrize("with_sigmoid", [False, True])
@pytest.mark.parametrize("features_float", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codeword_dots(emu, dtype, layout, features_float, with_sigmoid, k):
    """The entries' dots; the pixels' norms too where asked (here: without
    the sigmoid, so that both kinds of launch run)."""
    indices, dictionary_t, features, g, expected = entry_dot_inputs(dtype, layout, features_float, k, 4)
    sigmoid = torch.rand(indices[..., 0].numel(), k, generator=g) if with_sigmoid else None
    out = guarded(*expected.shape)
    norms = None if with_sigmoid else guarded(expected.shape[0])
    with writes_only_inside(*(t for t in (out, norms) if t is not None)):
        emu.codeword_dots(features, indices, k, dictionary_t, sigmoid, out, norms)
    if with_sigmoid:
        expected = expected * sigmoid.double() * (1 - sigmoid.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if norms is not None:
        exact_norms = features.double().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).norm(dim=1)
        torch.testing.assert_close(norms.double(), exact_norms, rtol=1e-6, atol=0)


def test_codeword_dots_gives_norms_without_entries(emu):
    features = dyadic(2, 40, 3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    norms = guarded(42)
    with writes_only_inside(norms):
        emu.codeword_dots(features, torch.empty(2, 3, 7, 0, dtype=torch.long), 0,
                          torch.rand(5, 40), None, torch.empty(42, 0), norms)
    exact = features.double().permute(0, 2, 3, 1).reshape(-1, 40).norm(dim=1)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("d, k", [(100, 13), (64, 40), (37, 5), (33, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_entry_dots_are_summed_in_a_fixed_order(emu, dtype, d, k):
    """Bitwise, on data whose sums round (unlike the dyadic inputs above):
    the entry dots of codeword_dots and of combine_codewords_and_dots follow
    the documented order, whatever the grouping of entries per butterfly.
    Sums over fewer or more entries than a group, and over several chunks of
    entries and channels, are covered."""
    n, h, w, K = 2, 3, 5, 150
    g = torch.Generator().manual_seed(d + k)
    x = make_layout(torch.randn(n, d, h, w, generator=g).to(dtype), "channels_last")
    indices = torch.randint(-1, K + 2, (n, h, w, k), generator=g)  # some out of range
    dictionary_t = torch.randn(K, d, generator=g).to(dtype)
    expected = warp_order_dots(x, indices, dictionary_t)
    dots = torch.empty(n * h * w, k)
    emu.codeword_dots(x, indices, k, dictionary_t, None, dots, None)
    assert torch.equal(dots, expected)
    # The backward pass's residual: the dots are taken of what it writes.
    coef = torch.randn(n, h, w, k, generator=g)
    residual = torch.zeros(n, d, h, w)
    emu.combine_codewords_and_dots(coef, indices, k, dictionary_t, None, 0.0, None, 1.0,
                                   residual, None, None, dots)
    assert torch.equal(dots, warp_order_dots(residual, indices, dictionary_t))
    valid, safe = gathered(indices, K)
    naive = (residual.permute(0, 2, 3, 1).reshape(-1, 1, d)
             * dictionary_t.float()[safe].reshape(-1, k, d)
             * valid.reshape(-1, k, 1)).sum(-1)
    assert not torch.equal(dots, naive)  # the order is visible in these data


@pytest.mark.parametrize("k", [7, 37], ids=["k7", "k37"])
@pytest.mark.parametrize("features_float", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_recomputed_sigmoid_backward(emu, dtype, layout, features_float, k):
    """grad * s (1 - s) with s from the entry's pre-activation <x_p, C_j> + b,
    its dot bitwise as codeword_dots sums it."""
    indices, dictionary_t, features, g, exact_pre = entry_dot_inputs(dtype, layout, features_float, k, 6)
    grad_values = dyadic(*exact_pre.shape, generator=g, dtype=torch.float32).to(dtype)
    intercept = torch.tensor([0.625])
    out = guarded(*exact_pre.shape)
    with writes_only_inside(out):
        emu.recomputed_sigmoid_backward(grad_values, features, indices, k, dictionary_t, intercept, out)
    pre = torch.empty(*exact_pre.shape)
    emu.codeword_dots(features, indices, k, dictionary_t, None, pre, None)
    s = torch.sigmoid(pre + intercept)
    torch.testing.assert_close(out, grad_values.float() * s * (1 - s), rtol=1e-6, atol=1e-7)
    s = torch.sigmoid(exact_pre + 0.625)
    torch.testing.assert_close(out.double(), grad_values.double() * s * (1 - s), rtol=1e-5, atol=1e-6)


def test_recomputed_sigmoid_backward_refuses_what_it_cannot_do(emu):
    refused = r"launch_recomputed_sigmoid_backward returned invalid argument"
    _, indices = sparse_code(1, 2, 2, 200, 129, seed=8)
    features, dictionary_t = torch.zeros(1, 3, 2, 2), torch.zeros(200, 3)
    with pytest.raises(RuntimeError, match=refused):
        emu.recomputed_sigmoid_backward(
            torch.zeros(4, 129), features, indices, 129, dictionary_t, torch.zeros(1), torch.empty(4, 129)
        )  # k past kMaxTopK
    with pytest.raises(RuntimeError, match=refused):
        emu.recomputed_sigmoid_backward(
            torch.zeros(4, 3), features, indices[..., :3].contiguous(), 3, dictionary_t, None, torch.empty(4, 3)
        )  # no intercept


@pytest.mark.parametrize("n, d, h", [(0, 3, 2), (1, 3, 0), (1, 0, 2)], ids=["N0", "H0", "D0"])
def test_empty_outputs_and_gradients_may_have_null_data(emu, n, d, h):
    """torch gives an empty tensor a null data pointer: a combine into an
    output without pixels or channels stores nothing, and the recomputed
    sigmoid's gradient of no entries reads none, so neither launcher may
    refuse the null pointer as a missing argument."""
    K, k, w = 5, 2, 3
    g = torch.Generator().manual_seed(16)
    coef = torch.rand(n * h * w, k, generator=g)
    indices = torch.randint(0, K, (n * h * w, k), generator=g)
    dictionary_t = torch.rand(K, d, generator=g).bfloat16()
    out = torch.empty(n, d, h, w, dtype=torch.bfloat16)
    emu.combine_codewords(coef, indices, k, dictionary_t, None, 0.0, None, 1.0, out)
    grad = torch.empty(n * h * w, k)
    emu.recomputed_sigmoid_backward(
        torch.ones(n * h * w, k, dtype=torch.bfloat16), out, indices, k, dictionary_t,
        torch.zeros(1), grad,
    )
    # Without channels every pre-activation is the intercept, 0: s (1 - s) = 1/4.
    assert torch.all(grad == 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_backward(emu, dtype):
    g = torch.Generator().manual_seed(6)
    grad = dyadic(3001, generator=g, dtype=torch.float32).to(dtype)
    sigmoid = torch.rand(3001, generator=g)
    out = torch.empty(3001)
    emu.sigmoid_backward(grad, sigmoid, out)
    torch.testing.assert_close(out, grad.float() * sigmoid * (1 - sigmoid))


def dictionary_grad_inputs(dtype, layout, with_b, shape=(2, 41, 4, 5, 30, 5), seed=8):
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(seed)
    coef_a, indices = sparse_code(n, h, w, K, k, seed=seed + 1, out_of_range=True)
    coef_b = dyadic(n, h, w, k, generator=g, dtype=torch.float32) if with_b else None
    features_a = make_layout(dyadic(n, d, h, w, generator=g, dtype=torch.float32).to(dtype), layout)
    features_b = None
    if with_b:
        features_b = make_layout(dyadic(n, d, h, w, generator=g, dtype=torch.float32), layout)
    expected = torch.zeros(K, d, dtype=torch.float64)
    valid, safe = gathered(indices, K)
    terms = coef_a.double().unsqueeze(-1) * features_a.double().permute(0, 2, 3, 1).unsqueeze(3)
    if with_b:
        terms = terms + coef_b.double().unsqueeze(-1) * features_b.double().permute(
            0, 2, 3, 1
        ).unsqueeze(3)
    terms = terms * valid.unsqueeze(-1)
    expected.index_add_(0, safe.reshape(-1), terms.reshape(-1, d))
    return (features_a, coef_a, features_b, coef_b, indices, k, K), expected


# One range of codewords per block; then ranges of 512 codewords (a short
# last one), two slices of channels (a short last one) and k past one chunk.
ATOMIC_GRAD_SHAPES = [(2, 41, 4, 5, 30, 5), (2, 33, 3, 4, 1100, 40)]


@pytest.mark.parametrize("shape", ATOMIC_GRAD_SHAPES, ids=["one_range", "three_ranges"])
@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_codewords_atomic(emu, dtype, layout, with_b, shape):
    args, expected = dictionary_grad_inputs(dtype, layout, with_b, shape)
    grad_t = guarded(*expected.shape, fill=0)
    with writes_only_inside(grad_t):
        emu.scatter_codewords_atomic(*args, grad_t)
    torch.testing.assert_close(grad_t.double(), expected, rtol=1e-5, atol=1e-5)


# (x layout, grad_x layout or None, with the dictionary gradient). Without
# the dictionary's warp barriers after the residual, only a pixel-major store
# of grad_x (NCHW or strided) reads other warps' rows of the tile.
RESIDUAL_GRAD_CASES = [
    ("contiguous", "contiguous", True),
    ("channels_last", "strided", False),
    ("strided", "channels_last", True),
    ("contiguous", None, True),
]


@pytest.mark.parametrize("shape", ATOMIC_GRAD_SHAPES, ids=["one_range", "three_ranges"])
@pytest.mark.parametrize("x_layout, grad_x_layout, with_dictionary", RESIDUAL_GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_gradients(emu, dtype, x_layout, grad_x_layout, with_dictionary, shape):
    """grad_x and the dictionary gradient with the residual rebuilt in place:
    grad_x bitwise as the stored-residual path's two combines give it, the
    dictionary gradient as its atomic scatter does (exact on these dyadic
    inputs), both against float64 arithmetic too."""
    n, d, h, w, K, k = shape
    g = torch.Generator().manual_seed(21)
    coef, indices = sparse_code(n, h, w, K, k, seed=22, out_of_range=True)
    grad_pre = dyadic(n, h, w, k, generator=g, dtype=torch.float32)
    dictionary_t = dyadic(K, d, generator=g, dtype=torch.float32).to(dtype)
    x = make_layout(dyadic(n, d, h, w, generator=g, dtype=torch.float32).to(dtype), x_layout)
    device_scale = torch.tensor([0.5])
    grad_x = None
    if grad_x_layout is not None:
        grad_x = make_layout(guarded(n, d, h, w, dtype=dtype, fill=0), grad_x_layout)
    grad_t = guarded(K, d, fill=0) if with_dictionary else None
    with writes_only_inside(grad_x, grad_t):
        emu.residual_gradients(
            x, coef, grad_pre, indices, k, dictionary_t, device_scale, 0.25, grad_x, grad_t
        )

    residual = torch.empty(n, h, w, d).permute(0, 3, 1, 2)  # pixel-major, as the glue stores it
    emu.combine_codewords(coef, indices, k, dictionary_t, x, -1.0, device_scale, 0.25, residual)
    exact_residual = 0.125 * (decode_expected(coef, indices, dictionary_t) - x.double())
    torch.testing.assert_close(residual.double(), exact_residual, rtol=1e-6, atol=1e-6)
    if grad_x is not None:
        expected = make_layout(torch.zeros(n, d, h, w, dtype=dtype), grad_x_layout)
        emu.combine_codewords(grad_pre, indices, k, dictionary_t, residual, -1.0, None, 1.0, expected)
        assert torch.equal(grad_x, expected)
        exact = decode_expected(grad_pre, indices, dictionary_t) - exact_residual
        close(grad_x, exact, dtype)
    if grad_t is not None:
        expected = guarded(K, d, fill=0)
        emu.scatter_codewords_atomic(x, grad_pre, residual, coef, indices, k, K, expected)
        torch.testing.assert_close(grad_t, expected, rtol=1e-6, atol=1e-6)
        valid, safe = gathered(indices, K)
        terms = grad_pre.double().unsqueeze(-1) * x.double().permute(0, 2, 3, 1).unsqueeze(3)
        terms = terms + coef.double().unsqueeze(-1) * exact_residual.permute(0, 2, 3, 1).unsqueeze(3)
        exact = torch.zeros(K, d, dtype=torch.float64)
        exact.index_add_(0, safe.reshape(-1), (terms * valid.unsqueeze(-1)).reshape(-1, d))
        torch.testing.assert_close(grad_t.double(), exact, rtol=1e-5, atol=1e-5)


def test_residual_gradients_refuses_what_it_cannot_do(emu):
    refused = "launch_residual_gradients returned invalid argument"
    coef, indices = sparse_code(1, 2, 2, 20, 3, seed=23)
    x = torch.zeros(1, 4, 2, 2)
    dictionary_t = torch.zeros(20, 4)
    grad_t = torch.zeros(20, 4)
    for bad_grad_x in (torch.zeros(1, 4, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 4, 2, 3)):
        with pytest.raises(RuntimeError, match=refused):
            emu.residual_gradients(x, coef, coef, indices, 3, dictionary_t, None, 1.0, bad_grad_x, grad_t)
    coef, indices = sparse_code(1, 2, 2, 200, 129, seed=24)
    with pytest.raises(RuntimeError, match=refused):  # k past kMaxTopK
        emu.residual_gradients(
            x, coef, coef, indices, 129, torch.zeros(200, 4), None, 1.0, None, torch.zeros(200, 4)
        )


# Short runs of entries per codeword, and runs longer than a block's batch.
GRAD_SHAPES = [(2, 41, 4, 5, 30, 5), (2, 9, 15, 20, 3, 2)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=["short_runs", "long_runs"])
@pytest.mark.parametrize("num_segments", [1, 3])
@pytest.mark.parametrize("with_b", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_codewords_sorted(emu, dtype, layout, with_b, num_segments, shape):
    """The deterministic path: stable sort, run offsets, per-segment sums and
    their reduction into the (D, K) dictionary layout in `dtype`."""
    (fa, ca, fb, cb, indices, k, K), expected = dictionary_grad_inputs(
        dtype, layout, with_b, shape
    )
    flat = indices.reshape(-1)
    sorted_codes, entry_order = torch.sort(flat, stable=True)
    run_offsets = torch.empty(K + 1, dtype=torch.long)
    emu.codeword_run_offsets(sorted_codes, K, run_offsets)
    assert torch.equal(run_offsets, torch.searchsorted(sorted_codes, torch.arange(K + 1)))
    d = fa.shape[1]
    partials = guarded(num_segments, K, d)
    with writes_only_inside(partials):
        emu.scatter_codewords_sorted(
            fa, ca, fb, cb, entry_order, run_offsets, k, K, num_segments, partials
        )
    torch.testing.assert_close(partials.double().sum(0), expected, rtol=1e-5, atol=1e-5)
    grad = guarded(d, K, dtype=dtype)
    with writes_only_inside(grad):
        emu.reduce_dictionary_partials(partials, num_segments, grad)
    close(grad, expected.t(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_segments", [1, 4])
@pytest.mark.parametrize("d, K", [(1, 1), (33, 70), (64, 32), (5, 300), (100, 3)])
@pytest.mark.parametrize("codeword_major", [False, True])
def test_reduce_dictionary_partials(emu, dtype, num_segments, d, K, codeword_major):
    """The (S, K, D) partials summed over S in order into a (D, K) gradient,
    row-major or codeword-major: tiles with tails on both sides, and exactly
    the in-order float32 sum."""
    g = torch.Generator().manual_seed(d * K + num_segments)
    partials = torch.randn(num_segments, K, d, generator=g)
    expected = partials[0].clone()
    for s in range(1, num_segments):
        expected += partials[s]
    grad = guarded(K, d, dtype=dtype).t() if codeword_major else guarded(d, K, dtype=dtype)
    with writes_only_inside(grad):
        emu.reduce_dictionary_partials(partials, num_segments, grad)
    assert torch.equal(grad, expected.t().to(dtype))


@pytest.mark.parametrize("count", [0, 1, 255, 2049, 70001])
def test_deterministic_sum(emu, count):
    g = torch.Generator().manual_seed(count)
    values = torch.randn(count, generator=g)
    out = torch.full((1,), float("nan"))
    emu.deterministic_sum(values, 0.5, out)
    torch.testing.assert_close(out.double()[0], 0.5 * values.double().sum(), rtol=1e-6, atol=1e-6)


# (N, H, W, K, k): few entries; every codeword in every pixel (lanes of a
# group share codewords); many groups per warp; K that leaves room for six
# histograms, for five where six histograms alone would fill 48 KiB exactly
# (the paper's K = 2048), and for one.
LABEL_SHAPES = [
    (2, 3, 5, 40, 4),
    (1, 1, 1, 9, 9),
    (2, 6, 7, 3, 3),
    (3, 17, 19, 300, 7),
    (2, 5, 9, 2000, 4),
    (2, 3, 4, 2048, 40),
    (1, 4, 4, 8192, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LABEL_SHAPES)
def test_sparse_labels(emu, dtype, shape):
    n, h, w, K, k = shape
    g = torch.Generator().manual_seed(9)
    _, indices = sparse_code(n, h, w, K, k, seed=10)
    values = torch.rand(n, h, w, k, generator=g).to(dtype)
    pixel_labels = guarded(n, h, w, dtype=torch.long, fill=-5)
    image_labels = guarded(n, K, dtype=dtype)
    flag = torch.zeros(1, dtype=torch.int32)
    with writes_only_inside(pixel_labels, image_labels):
        emu.sparse_labels(values, indices, K, pixel_labels, image_labels, flag)
    ref_pixel, ref_image = reference.sparse_labels(values.float(), indices, K)
    assert flag.item() == 0
    assert torch.equal(pixel_labels, ref_pixel)
    close(image_labels, ref_image, dtype)


def test_sparse_labels_flags_out_of_range_indices(emu):
    _, indices = sparse_code(2, 3, 3, 20, 3, seed=11)
    indices[1, 2, 0, 1] = 20
    values = torch.rand(2, 3, 3, 3)
    pixel_labels = torch.empty(2, 3, 3, dtype=torch.long)
    image_labels = torch.empty(2, 20)
    flag = torch.zeros(1, dtype=torch.int32)
    emu.sparse_labels(values, indices, 20, pixel_labels, image_labels, flag)
    assert flag.item() == 1


# (N, H, W, K): small images; 323 pixels per image (two chunks of 256, the
# second short); K that leaves room for four warps' column sums; K past what
# one warp's sums take in shared memory, summed in global memory instead.
PREDICTOR_SHAPES = [(2, 3, 4, 30), (1, 1, 1, 5), (3, 5, 7, 300), (2, 17, 19, 40), (2, 1, 3, 3000),
                    (1, 1, 3, 12289)]


@pytest.mark.parametrize("shape", PREDICTOR_SHAPES)
def test_predictor_loss(emu, shape):
    """Loss and dloss/dz against the reference's autograd, through a student
    map y = z and an identity dictionary (so that C^T y_p = z_p). The kernel
    works in float32 for every student dtype (the glue forms float32 logits)."""
    n, h, w, K = shape
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(n, h, w, K, generator=g) * 3
    intercept = torch.tensor([0.25])
    pixel_labels = torch.randint(0, K, (n, h, w), generator=g)
    image_labels = torch.rand(n, K, generator=g)

    y = logits.permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    ref_loss = reference.predictor_loss(
        y, torch.eye(K), intercept, pixel_labels, image_labels, 0.75, 1.5
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, y)

    z = guarded(n, h, w, K)
    z.copy_(logits)
    loss = guarded(1)
    flags = torch.zeros(2, dtype=torch.int32)
    with writes_only_inside(z, loss):
        emu.predictor_loss(z, intercept, pixel_labels, image_labels, n, h * w, 0.75, 1.5, loss, flags)
    assert flags.tolist() == [0, 0]
    torch.testing.assert_close(loss[0], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    expected = ref_grad.permute(0, 2, 3, 1)
    scale = expected.abs().max()
    close(z / scale, expected / scale, torch.float32)


def test_predictor_loss_flags_out_of_range_labels(emu):
    logits = torch.randn(1, 2, 2, 6)
    labels = torch.tensor([[[0, 6], [1, -1]]])
    loss = torch.empty(1)
    flags = torch.zeros(2, dtype=torch.int32)
    emu.predictor_loss(logits, torch.zeros(1), labels, torch.rand(1, 6), 1, 4, 1.0, 1.0, loss, flags)
    assert flags.tolist() == [1, 0]


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_predictor_loss_flags_image_labels_outside_the_unit_interval(emu, bad):
    logits = torch.randn(2, 2, 2, 6)
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    image_labels = torch.rand(2, 6)
    image_labels[1, 4] = bad
    flags = torch.zeros(2, dtype=torch.int32)
    emu.predictor_loss(logits, torch.zeros(1), labels, image_labels, 2, 4, 1.0, 1.0, torch.empty(1), flags)
    assert flags.tolist() == [0, 1]


def test_launch_errors_are_reported(emu):
    """Arguments a launcher rejects come back as errors, not as results."""
    x, C, b, _ = encode_inputs((1, 4, 2, 2, 10, 3), torch.float32)
    with pytest.raises(RuntimeError, match="invalid argument"):
        run_encode(emu, x, C, b, 11, False)  # k > K


# The emulator's own checks, on probe kernels with known defects
# (cuda_emulation_probes.cu): each must be reported, and its correct twin pass.

PROBE_THREADS = 64


def probe(emu, name, arg=0, flag=False, extra=None):
    out = torch.full((2 * PROBE_THREADS,), -7.0)
    emu.probe(name, out, extra, arg, flag)
    return out


def test_emulator_exposes_a_missing_barrier(emu):
    expected = (torch.arange(2 * PROBE_THREADS) + 1) % PROBE_THREADS
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        assert torch.equal(probe(emu, "neighbour", 2, True), expected.float())
    wrong = 0
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        wrong += not torch.equal(probe(emu, "neighbour", 2, False), expected.float())
    assert wrong == len(SCHEDULES)


def test_emulator_exposes_a_warp_reading_another_warps_write_after_collectives(emu):
    # Between synchronisation points the round-robin schedules run every
    # thread once, so warp 1 stores while warp 0 is still at its shuffles;
    # a warp run far ahead of the other, as a GPU may, reads too early.
    expected = (torch.arange(32) + 1).float()
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        assert torch.equal(probe(emu, "warp_handoff", flag=True)[:32], expected)

    def serial_is_right(seed):
        emu.set_schedule(SCHEDULES["warp_serial"], seed)
        return torch.equal(probe(emu, "warp_handoff")[:32], expected)

    assert not all(serial_is_right(seed) for seed in range(8))


def test_emulator_exposes_a_block_reading_another_blocks_output(emu):
    expected = (torch.arange(2 * PROBE_THREADS) // PROBE_THREADS + 1).float()

    def chained_is_right(schedule, seed):
        emu.set_schedule(schedule, seed)
        assert torch.equal(probe(emu, "block_count", 2, False), expected)
        return torch.equal(probe(emu, "block_count", 2, True), expected)

    # Forward order runs block 0 first, as the chained kernel assumes.
    assert chained_is_right(SCHEDULES["forward"], 0)
    assert not chained_is_right(SCHEDULES["reverse"], 0)
    assert not all(chained_is_right(SCHEDULES["shuffled"], seed) for seed in range(8))


def test_emulator_reports_a_divergent_barrier(emu):
    emu.set_schedule(SCHEDULES["forward"], 0)
    with pytest.raises(RuntimeError, match="deadlock: 32 threads wait at __syncthreads"):
        probe(emu, "divergent_barrier")
    # In another order a thread can reach the barrier after others left.
    emu.set_schedule(SCHEDULES["reverse"], 0)
    with pytest.raises(RuntimeError, match="__syncthreads reached after 32 threads"):
        probe(emu, "divergent_barrier")


def test_emulator_reports_a_barrier_after_an_exit(emu):
    with pytest.raises(RuntimeError, match="__syncthreads reached after 1 threads"):
        probe(emu, "barrier_after_exit")


def test_emulator_reports_threads_waiting_at_different_barriers(emu):
    expected = ((torch.arange(PROBE_THREADS) + 1) % PROBE_THREADS).float()
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        assert torch.equal(probe(emu, "split_barrier")[:PROBE_THREADS], expected)
        with pytest.raises(RuntimeError, match=r"__syncthreads at \S+ reached while other threads of the block wait at"):
            probe(emu, "split_barrier", flag=True)


def test_emulator_reports_lanes_meeting_at_different_warp_collectives(emu):
    expected = (torch.arange(PROBE_THREADS) ^ 1).float()
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        assert torch.equal(probe(emu, "warp_collectives")[:PROBE_THREADS], expected)
        with pytest.raises(RuntimeError, match="_sync reached while other lanes of the warp wait at __"):
            probe(emu, "warp_collectives", flag=True)


def test_emulator_poisons_shared_memory_before_every_block(emu):
    huge = torch.tensor([0x7F7F7F7F], dtype=torch.int32).view(torch.float32)
    emu.set_schedule(SCHEDULES["forward"], 0)
    assert probe(emu, "uninitialised_shared").isnan().all()
    emu.set_schedule(SCHEDULES["reverse"], 0)
    assert (probe(emu, "uninitialised_shared") == huge).all()
    # Shuffled, the two blocks get one fill each.
    emu.set_schedule(SCHEDULES["shuffled"], 0)
    blocks = probe(emu, "uninitialised_shared").reshape(2, PROBE_THREADS)
    assert sorted([blocks[b].isnan().all().item() for b in range(2)]) == [False, True]
    assert ((blocks == huge).all(1) | blocks.isnan().all(1)).all()


@pytest.mark.skipif(not cuda_emulation.poisons_locals(), reason="the compiler cannot poison locals")
def test_emulator_poisons_uninitialised_locals(emu):
    # An accumulator without its `= 0` sums onto the pattern (GCC's -1.7e38,
    # clang's NaN), not onto 0 or what an earlier thread left on the reused
    # fiber stack.
    values = probe(emu, "uninitialised_local", 3)[:PROBE_THREADS]
    assert values.isnan().all() or (values.abs() > 1e30).all()


def test_emulated_build_caps_grid_stride_launches_at_two_blocks(emu):
    # Else the tests' small inputs would never reach the later strides.
    assert emu.grid_stride_blocks(10**9, 1 << 16) == 2
    assert emu.grid_stride_blocks(1, 1 << 16) == 1


def test_emulator_warp_primitives(emu):
    ballot = torch.zeros(4, dtype=torch.int32)
    out = probe(emu, "warp_primitives", extra=ballot)
    lanes = torch.arange(PROBE_THREADS).reshape(2, 32)
    assert torch.equal(out[:PROBE_THREADS], lanes.sum(1, keepdim=True).expand(2, 32).reshape(-1).float())
    assert ballot[:2].tolist() == [0x55555555 * 2 - (1 << 32), 0x55555555 * 2 - (1 << 32)]
    assert ballot[2:].tolist() == ((37 * lanes) % 61).amax(1).tolist()


def test_emulator_reports_a_read_outside_a_tensor(emu):
    inputs = torch.arange(PROBE_THREADS, dtype=torch.float32)
    for schedule in SCHEDULES.values():
        emu.set_schedule(schedule, 3)
        assert torch.equal(probe(emu, "shifted_read", 0, extra=inputs)[:PROBE_THREADS], inputs)
    # The copy a kernel reads ends at an inaccessible page (forward), or
    # starts at one (reverse); on the other side the bytes read as NaN.
    emu.set_schedule(SCHEDULES["forward"], 0)
    with pytest.raises(RuntimeError, match="illegal address 0x[0-9a-f]+, 0 bytes past the end of a 256-byte tensor"):
        probe(emu, "shifted_read", 1, extra=inputs)
    assert probe(emu, "shifted_read", -1, extra=inputs)[0].isnan()
    emu.set_schedule(SCHEDULES["reverse"], 0)
    with pytest.raises(RuntimeError, match="illegal address 0x[0-9a-f]+, 4 bytes before the start of a 256-byte tensor"):
        probe(emu, "shifted_read", -1, extra=inputs)
    assert probe(emu, "shifted_read", 1, extra=inputs)[PROBE_THREADS - 1].isnan()


def test_emulator_refuses_a_block_past_the_launch_bounds(emu):
    out = probe(emu, "bounded", PROBE_THREADS // 2)
    assert torch.equal(out[: PROBE_THREADS // 2], torch.arange(PROBE_THREADS // 2).float())
    out = torch.full((2 * PROBE_THREADS,), -7.0)
    with pytest.raises(RuntimeError, match="64 threads per block, past the kernel.s __launch_bounds__ of 32"):
        emu.probe("bounded", out, None, PROBE_THREADS, False)
    assert (out == -7).all()  # refused before any thread ran


def test_emulator_refuses_a_misaligned_vector_access(emu):
    out = probe(emu, "vector_load", 4)
    assert out[:4].tolist() == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(RuntimeError, match="misaligned address: a 16-byte vector access 4 bytes past"):
        probe(emu, "vector_load", 1)


def test_emulator_tensor_cores_ignore_the_low_bits_of_tf32_operands(emu):
    # Eight products of 1 + 3 * 2^-12 (rounded to 1 + 2^-10, or not: 1) by 1.
    assert probe(emu, "tf32_mma", flag=True)[0].item() == 8 * (1 + 2**-10)
    assert probe(emu, "tf32_mma", flag=False)[0].item() == 8.0


def test_translation_checks_casts_to_vector_types_only():
    source = (
        "const float4 v = *reinterpret_cast<const float4*>(&a[j]);\n"
        "*reinterpret_cast<float2 *>(&b[i]) = w;\n"
        "f(reinterpret_cast<const void*>(kernel), reinterpret_cast<float4x*>(p));\n"
    )
    lines = cuda_emulation.translator().rewrite_vector_casts(source).splitlines()
    assert lines[0] == "const float4 v = *::cuda_emulator::vector_cast<const float4*>(&a[j]);"
    assert lines[1] == "*::cuda_emulator::vector_cast<float2 *>(&b[i]) = w;"
    assert lines[2] == "f(reinterpret_cast<const void*>(kernel), reinterpret_cast<float4x*>(p));"


def test_translation_checks_the_launch_bounds_of_kernel_definitions_only():
    source = (
        "__global__ void __launch_bounds__(std::max<int>(32, 64), 2)\n"
        "    kernel(float* out) {\n  out[0] = 1;\n}\n"
        "__global__ void __launch_bounds__(64) declared(float* out);\n"
    )
    lines = cuda_emulation.translator().rewrite_launch_bounds(source).splitlines()
    # The bound becomes the body's first statement, on the same line, so
    # that line numbers in compiler errors still match the source.
    assert lines[1] == "    kernel(float* out) { ::cuda_emulator::check_launch_bounds(std::max<int>(32, 64));"
    assert "__launch_bounds__" not in lines[0] and lines[2:4] == ["  out[0] = 1;", "}"]
    assert lines[4] == "__global__ void __launch_bounds__(64) declared(float* out);"  # the macro drops it


def test_emulator_dynamic_shared_memory_limit(emu):
    expected = torch.arange(PROBE_THREADS).float()
    assert torch.equal(probe(emu, "dynamic_shared", 48 * 1024)[:PROBE_THREADS], expected)
    with pytest.raises(RuntimeError, match="without raising"):
        probe(emu, "dynamic_shared", 64 * 1024)
    assert torch.equal(probe(emu, "dynamic_shared", 64 * 1024, True)[:PROBE_THREADS], expected)


def test_emulator_reports_an_access_past_the_dynamic_shared_memory(emu):
    # Each of the 64 threads writes and reads its own float; in forward
    # order thread 32 is the first past 128 bytes.
    emu.set_schedule(SCHEDULES["forward"], 0)
    expected = torch.arange(PROBE_THREADS).float()
    assert torch.equal(probe(emu, "dynamic_shared", 4 * PROBE_THREADS)[:PROBE_THREADS], expected)
    with pytest.raises(RuntimeError, match="illegal address 0x[0-9a-f]+, 0 bytes past the end of a 128-byte dynamic shared memory"):
        probe(emu, "dynamic_shared", 128)
    # Short of the next 16 bytes the page is not reached; the write still is.
    with pytest.raises(RuntimeError, match=r"wrote past the end of 250 bytes of dynamic shared memory \(its byte 250\)"):
        probe(emu, "dynamic_shared", 250)


def test_emulator_counts_static_shared_memory_against_the_limit(emu):
    expected = torch.arange(PROBE_THREADS).float()
    fits = probe(emu, "static_and_dynamic_shared", 47 * 1024)
    assert torch.equal(fits[:PROBE_THREADS], expected)
    with pytest.raises(RuntimeError, match="static shared memory"):
        probe(emu, "static_and_dynamic_shared", 48 * 1024)
    raised = probe(emu, "static_and_dynamic_shared", 48 * 1024, True)
    assert torch.equal(raised[:PROBE_THREADS], expected)
