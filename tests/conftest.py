"""Shared helpers for the op tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI replays the same examples on every run, so a landing never depends on a
# lucky draw; elsewhere hypothesis explores new ones. Either way a failure
# prints a @reproduce_failure blob that replays it.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# torch refuses a cuBLAS product on a GPU in deterministic mode unless cuBLAS
# has a fixed workspace: set here, a test run by hand works as one run by
# tools/verify_cuda.sh does.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import srm_ext
from srm_ext import _backend, reference
from srm_ext.distill import DistributedContext

def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids (float16, 2x8x5x7x20x4), so that -k can pick cases by
    dtype or shape, as the sanitizer runs do."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if isinstance(val, tuple) and val and all(isinstance(v, int) for v in val):
        return "x".join(map(str, val))
    return None


# Where the srm_ext under test was imported from: the source tree after an
# in-place build, site-packages after `pip install .`. Child processes are
# pointed at the same one, not at whatever their working folder would give.
PACKAGE_ROOT = Path(srm_ext.__file__).resolve().parent.parent


def child_env(**variables: str) -> dict[str, str]:
    """The environment for a child Python process that imports srm_ext: the
    package under test first on its path, one OpenMP thread, ``variables``."""
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **variables}


requires_native_cpu = pytest.mark.skipif(
    _backend.native_module is None, reason="compiled CPU backend not built"
)
requires_cuda = pytest.mark.skipif(
    _backend.cuda_module is None or not torch.cuda.is_available(),
    reason="needs the compiled CUDA backend and a GPU",
)

# Tolerances per dtype for native-vs-reference comparisons. float32 results
# differ by summation order (BLAS blocking, per-pixel vs batched sums).
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}


def dyadic(*shape: int, dtype=torch.float64, generator=None, scale: int = 8, span: int = 2):
    """Multiples of 1/scale in [-span, span].

    Products and sums of these are exact in float32 for the sizes the tests
    use, so every backend computes bit-identical pre-activations and the
    top-k selection (ties included) must agree exactly.
    """
    ints = torch.randint(-span * scale, span * scale + 1, shape, generator=generator)
    return (ints.to(dtype) / scale)


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # Every other element of a twice-as-wide buffer: no dimension is dense.
        n, c, h, w = x.shape
        big = x.new_zeros(n, c, h, 2 * w)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "cropped":
        # A crop of a larger map: pixels adjacent within a row only.
        n, c, h, w = x.shape
        big = x.new_zeros(n, c + 1, h, w + 3)
        big[:, :c, :, :w] = x
        return big[:, :c, :, :w]
    raise ValueError(layout)


def leaf_like(t: torch.Tensor) -> torch.Tensor:
    """A new leaf requiring grad with ``t``'s values and strides (``clone``
    would make a non-dense layout contiguous and so hide it from backward)."""
    leaf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t.detach()).requires_grad_(True)


@pytest.fixture
def two_threads():
    """Two intra-op threads, restored afterwards: block and tile sizes scale
    with the thread count, so a test of several blocks fixes it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def codeword_major(C):
    """The (D, K) dictionary stored with each codeword contiguous, as
    SparseRepresentation stores it."""
    return C.t().contiguous().t()


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny models: as fast, and a busy CPU
    cannot stall them at thread barriers; the thread count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def native():
    """Calls go to the compiled ops; skipped where they are not built."""
    if _backend.native_module is None:
        pytest.skip("compiled CPU backend not built")
    return srm_ext


def beyond_float16(dtype, n, h, w, num_codewords, k, seed):
    """Half-precision inputs whose similarities |C^T x| (typically 8 * 120 * 120
    = 1.2e5) pass float16's largest finite value, where float16 similarities
    would be inf (and tie) and bfloat16 ones rounded to 8 bits (and tie).
    Returns x, dictionary, intercept and the exact (float64) top-k indices."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 64, h, w, generator=g) * 120).to(dtype)
    dictionary = (torch.randn(64, num_codewords, generator=g) * 120).to(dtype)
    intercept = torch.tensor([0.5], dtype=dtype)
    exact = x.double().permute(0, 2, 3, 1) @ dictionary.double() + 0.5
    assert exact.abs().max() > torch.finfo(torch.float16).max
    top_k = torch.sort(exact, dim=-1, descending=True, stable=True).indices[..., :k]
    return x, dictionary, intercept, top_k


def tf32_misranked_inputs(num_candidates):
    """One pixel (1, 2, 1, 1) whose exact best codeword (the last of
    num_candidates + 1) ties under truncating TF32 with the num_candidates
    codewords of lower index that score 0.5 less exactly, so TF32 leaves it
    out of the candidates."""
    x = torch.tensor([4095.0, 2.0]).reshape(1, 2, 1, 1)  # TF32: (4094, 2)
    C = torch.zeros(2, num_candidates + 1)
    C[1, :num_candidates] = 2047.25  # exact 4094.5; TF32: 2047, so 4094
    C[0, num_candidates] = 1.0  # exact 4095; TF32: 4094
    return x, C


def warp_order_dots(features, indices, dictionary_t):
    """float32 <f_p, C_j> of every entry in range, summed as the CUDA
    entry-dot kernels document: rounded products, in chunks of 32 channels
    taken in order, each chunk summed by a warp's xor butterfly (offsets 16,
    8, 4, 2, 1). features (N, D, H, W), indices (N, H, W, k), dictionary_t
    (K, D); (P, k), 0 where an index is out of range."""
    d, k, K = features.shape[1], indices.shape[-1], dictionary_t.shape[0]
    rows = indices.reshape(-1, k)
    valid = (rows >= 0) & (rows < K)
    codewords = dictionary_t.float()[rows.clamp(0, K - 1)] * valid.unsqueeze(-1)  # (P, k, D)
    f = features.float().permute(0, 2, 3, 1).reshape(-1, 1, d)
    chunks = -(-d // 32)
    lanes = torch.zeros(f.shape[0], k, chunks * 32)
    lanes[..., :d] = f * codewords
    lanes = lanes.reshape(-1, k, chunks, 32)
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[..., torch.arange(32) ^ offset]
    dots = torch.zeros(f.shape[0], k)
    for c in range(chunks):
        dots = dots + lanes[..., c, 0]
    return dots


def documented_order_inputs(seed):
    """(values, indices, C, grad_x_hat) of N, D, H, W, K, k = 2, 100, 5, 7,
    150, 13 with random (not dyadic) float32 data, so that the order of a
    sum shows in its result."""
    n, d, h, w, K, k = 2, 100, 5, 7, 150, 13
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, h, w, k, generator=g)
    indices = torch.stack([torch.randperm(K, generator=g)[:k] for _ in range(n * h * w)])
    C = torch.randn(d, K, generator=g)
    grad_x_hat = torch.randn(n, d, h, w, generator=g)
    return values, indices.reshape(n, h, w, k), C, grad_x_hat


# The two pixels of tf32_screening_inputs that TF32 cannot rank.
MISRANKED_PIXEL, SUBNORMAL_PIXEL = (1, 3, 2), (0, 0, 0)


def tf32_screening_inputs(seed):
    """(x (2, 24, 4, 3), C (24, 300)) for the screened encode: integer
    features, whose dots with C (multiples of 1/16) are exact in float32
    while TF32 drops their low bits. MISRANKED_PIXEL is
    tf32_misranked_inputs(50) in channels 0 and 1 and codewords 0 to 50, so
    TF32 leaves its best codeword, 50, out of the candidates.
    SUBNORMAL_PIXEL holds subnormal features
    (multiples of 2^-140), which tensor cores may flush to zero; its exact
    best is codeword 299."""
    g = torch.Generator().manual_seed(seed)
    n, d, h, w, K = 2, 24, 4, 3, 300
    x = torch.randint(-4095, 4096, (n, d, h, w), generator=g).float()
    C = torch.randint(-15, 16, (d, K), generator=g).float() / 16
    n0, h0, w0 = MISRANKED_PIXEL
    pixel, codewords = tf32_misranked_inputs(50)
    x[n0, :, h0, w0] = 0.0
    x[n0, :2, h0, w0] = pixel.flatten()
    C[:2, :51] = codewords
    n1, h1, w1 = SUBNORMAL_PIXEL
    x[n1, 2:, h1, w1] = torch.randint(1, 16, (d - 2,), generator=g).float() * 2.0**-140
    x[n1, :2, h1, w1] = 0.0  # clear of the misranked pixel's codewords
    C[2:, K - 1] = 15 / 16
    return x, C


# The names c10 gives the floating dtypes in its messages.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def _op_inputs(device, dtype, seed):
    """x (2, 4, 3, 3), C (4, 6), b, its code (k = 2) and labels, and a
    student map y (2, 5, 3, 3) with its dictionary Cs, on device in dtype."""
    g = torch.Generator().manual_seed(seed)
    x, C = dyadic(2, 4, 3, 3, generator=g), dyadic(4, 6, generator=g, span=1)
    b = torch.tensor([0.25], dtype=torch.float64)
    values, indices = reference.sparse_encode(x, C, b, 2)
    pixel, image = reference.sparse_labels(values, indices, 6)
    y, Cs = dyadic(2, 5, 3, 3, generator=g), dyadic(5, 6, generator=g, span=1)
    floating = dict(x=x, C=C, b=b, values=values, image=image, y=y, Cs=Cs)
    out = {name: t.to(device, dtype) for name, t in floating.items()}
    return dict(out, indices=indices.to(device), pixel=pixel.to(device))


def calls_every_backend_refuses(device, dtype):
    """Direct calls of the compiled ops on device with dtype inputs that the
    CPU kernels refuse and the CUDA kernels must refuse as well, each as
    (id, op name, args, the CUDA kernels' message): a tensor in another
    dtype than the one it must share (float32 beside 16-bit inputs, float64
    beside float32), a code that keeps more entries per pixel than there
    are codewords, a code without pixels to label (H = 0), and loss weights
    that are NaN, inf, negative or past float32's range. Each backward op is
    called with every output wanted and with none, since its checks must not
    depend on the mask."""
    a = _op_inputs(device, dtype, seed=40)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    names = _SCALAR_TYPE_NAMES

    def mismatch(name, ref_name):
        return f"srm_ext: {name} must have the dtype of {ref_name} ({names[dtype]}), got {names[other]}"

    x, C, b, values, indices = a["x"], a["C"], a["b"], a["values"], a["indices"]
    one = torch.ones((), device=device, dtype=dtype)
    g = torch.Generator().manual_seed(41)
    wide_values = torch.rand(2, 3, 3, 7, generator=g).to(device, dtype)  # k = 7 > K = 6
    wide_indices = torch.randint(0, 6, (2, 3, 3, 7), generator=g).to(device)
    too_many = "srm_ext: values keeps k = 7 entries per pixel but there are only K = 6 codewords"
    calls = [
        ("encode intercept", "sparse_encode", (x, C, b.to(other), 2), mismatch("intercept", "x")),
        ("loss intercept", "reconstruction_loss", (x, C, b.to(other), 2), mismatch("intercept", "x")),
        (
            "student intercept", "predictor_loss",
            (a["y"], a["Cs"], b.to(other), a["pixel"], a["image"], 1.0, 1.0, [True] * 3),
            mismatch("intercept", "y"),
        ),
        (
            "student image_labels", "predictor_loss",
            (a["y"], a["Cs"], b, a["pixel"], a["image"].to(other), 1.0, 1.0, [True] * 3),
            mismatch("image_labels", "y"),
        ),
        ("labels k > K", "sparse_labels", (wide_values, wide_indices, 6), too_many),
        (
            "labels H = 0", "sparse_labels", (values[:, :0], indices[:, :0], 6),
            "srm_ext: values must have at least one pixel per image (H*W > 0), got H = 0, W = 3",
        ),
        ("decode k > K", "sparse_decode", (wide_values, wide_indices, C), too_many),
    ]
    for name, weight in [("local_weight", float("nan")), ("global_weight", -0.5),
                         ("local_weight", float("inf")), ("global_weight", 1e39)]:
        weights = (weight, 1.0) if name == "local_weight" else (1.0, weight)
        calls.append((
            f"student {name} = {weight}", "predictor_loss",
            (a["y"], a["Cs"], b, a["pixel"], a["image"], *weights, [True] * 3),
            f"srm_ext: {name} must be finite, >= 0 and at most float32's largest, got ",
        ))
    for wanted in (True, False):
        mask2, mask3 = [wanted] * 2, [wanted] * 3
        suffix = "" if wanted else " (no output wanted)"
        calls += [
            (
                "encode backward intercept" + suffix, "sparse_encode_backward",
                (torch.ones_like(values), values, indices, x, C, b.to(other), mask3),
                mismatch("intercept", "x"),
            ),
            (
                "encode backward grad_values" + suffix, "sparse_encode_backward",
                (torch.ones_like(values, dtype=other), values, indices, x, C, b, mask3),
                mismatch("grad_values", "values"),
            ),
            (
                "encode backward k > K" + suffix, "sparse_encode_backward",
                (torch.ones_like(wide_values), wide_values, wide_indices, x, C, b, mask3),
                too_many,
            ),
            (
                "loss backward intercept" + suffix, "reconstruction_loss_backward",
                (one, x, C, b.to(other), values, indices, mask3),
                mismatch("intercept", "x"),
            ),
            (
                "loss backward k > K" + suffix, "reconstruction_loss_backward",
                (one, x, C, b, wide_values, wide_indices, mask3),
                too_many,
            ),
            (
                "decode backward grad_output" + suffix, "sparse_decode_backward",
                (torch.ones_like(x, dtype=other), values, indices, C, mask2),
                mismatch("grad_output", "values"),
            ),
            (
                "decode backward k > K" + suffix, "sparse_decode_backward",
                (torch.ones_like(x), wide_values, wide_indices, C, mask2),
                too_many,
            ),
        ]
    return calls


def empty_input_calls(device, dtype):
    """Direct calls of the compiled ops on device with dtype inputs without
    pixels (N = 0, or H = 0) or without channels (D = 0), which the CPU
    kernels take, each as (id, op name, args). sparse_encode and
    reconstruction_loss are called with channels only: the CUDA kernels
    refuse D = 0 by name (the public functions refuse it on every device).
    sparse_labels is called with N = 0 only: every backend refuses images
    without pixels, whose labels would be means over nothing."""
    a = _op_inputs(device, dtype, seed=42)
    x, C, b, values, indices = a["x"], a["C"], a["b"], a["values"], a["indices"]
    one = torch.ones((), device=device, dtype=dtype)
    mask2, mask3 = [True] * 2, [True] * 3
    calls = []
    for where, x_part, code_part in [
        ("N = 0", x[:0], (slice(0, 0),)),
        ("H = 0", x[:, :, :0], (slice(None), slice(0, 0))),
        ("D = 0", x[:, :0], None),
    ]:
        C_part = C[: x_part.shape[1]]
        if code_part is not None:
            v, i = values[code_part], indices[code_part]
        else:
            # The code of x without channels: every pre-activation is b, and
            # the tie keeps the lowest codewords.
            v = torch.sigmoid(b.double()).expand(values.shape).to(dtype)
            i = torch.arange(2, device=device).expand(indices.shape)
        if where != "D = 0":
            calls += [
                (f"encode {where}", "sparse_encode", (x_part, C, b, 2)),
                (f"loss {where}", "reconstruction_loss", (x_part, C, b, 2)),
            ]
        if where == "N = 0":
            calls.append((f"labels {where}", "sparse_labels", (v, i, 6)))
        calls += [
            (f"encode backward {where}", "sparse_encode_backward",
             (torch.ones_like(v), v, i, x_part, C_part, b, mask3)),
            (f"loss backward {where}", "reconstruction_loss_backward",
             (one, x_part, C_part, b, v, i, mask3)),
            (f"decode {where}", "sparse_decode", (v, i, C_part)),
            (f"decode backward {where}", "sparse_decode_backward",
             (torch.ones_like(x_part), v, i, C_part, mask2)),
        ]
    y = a["y"][:, :0]  # the student loss needs pixels, not channels
    calls.append(
        ("student D = 0", "predictor_loss",
         (y, a["Cs"][:0], b, a["pixel"], a["image"], 0.75, 1.25, mask3))
    )
    return calls


def on_cpu_in_float32(args):
    """args for the CPU kernels: floating tensors as float32 CPU copies,
    integer ones on the CPU, other arguments as they are."""
    def copy(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.to("cpu", torch.float32 if a.is_floating_point() else a.dtype)

    return [copy(a) for a in args]


def assert_refused(op, args, message: str, label: str) -> str:
    """op(*args) raises a RuntimeError containing message; returns its text."""
    try:
        op(*args)
    except RuntimeError as error:
        assert message in str(error), f"{label}: refused, but with another message: {error}"
        return str(error)
    pytest.fail(f"{label}: not refused")


class SimulatedRankZero(DistributedContext):
    """Rank 0 of ``world_size`` processes simulated in one: a subclass says
    what the gradient all-reduce brings back; the other collectives keep this
    process's tensors, and sums count every process as this one."""

    def broadcast_from_main(self, tensors):
        pass

    def average_buffers(self, module):
        pass

    def sum(self, values, device="cpu"):
        return [v * self.world_size for v in values]
