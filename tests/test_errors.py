"""Bad input raises an error that names the argument, on every backend."""

from __future__ import annotations

import re

import pytest
import torch

import srm_ext
from srm_ext import _validation, reference
from srm_ext._validation import check_labels

from conftest import requires_native_cpu

BACKENDS = {"dispatch": srm_ext, "reference": reference}


def good():
    x = torch.randn(2, 4, 3, 3)
    C = torch.randn(4, 6)
    b = torch.zeros(1)
    values, indices = reference.sparse_encode(x, C, b, 2)
    pixel, image = reference.sparse_labels(values, indices, 6)
    return dict(x=x, C=C, b=b, values=values, indices=indices, pixel=pixel, image=image)


ENCODE_CASES = [
    ("x", lambda g: dict(g, x=g["x"][0]), ValueError, "x must be a 4-D"),
    ("x", lambda g: dict(g, x=g["x"].to(torch.int32)), TypeError, "x must have a floating-point dtype"),
    ("x", lambda g: dict(g, x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("dictionary", lambda g: dict(g, C=torch.randn(5, 6)), ValueError, "dictionary has D=5 rows but x has 4 channels"),
    ("dictionary", lambda g: dict(g, C=torch.randn(4, 6, 1)), ValueError, "dictionary must be a 2-D"),
    ("x", lambda g: dict(g, x=g["x"][:, :0], C=g["C"][:0]), ValueError, "dictionary must have at least one row (D >= 1), got shape (0, K): x has no channels"),
    ("dictionary", lambda g: dict(g, C=g["C"].double()), TypeError, "dictionary has dtype torch.float64 but x has torch.float32"),
    ("dictionary", lambda g: dict(g, C=g["C"].to("meta")), ValueError, "dictionary is on meta but x is on cpu"),
    ("intercept", lambda g: dict(g, b=torch.zeros(2)), ValueError, "intercept must have exactly one element"),
    ("intercept", lambda g: dict(g, b=torch.zeros(1, dtype=torch.int64)), TypeError, "intercept must have a floating-point dtype"),
    ("k", lambda g: dict(g, k=0), ValueError, "k must satisfy 1 <= k <= K=6"),
    ("k", lambda g: dict(g, k=7), ValueError, "k must satisfy 1 <= k <= K=6"),
    ("k", lambda g: dict(g, k=2.0), TypeError, "k must be an int"),
    ("k", lambda g: dict(g, k=True), TypeError, "k must be an int, got bool"),
    ("k", lambda g: dict(g, k=torch.tensor(2)), TypeError, "k must be an int, got Tensor"),
    ("x", lambda g: dict(g, x=g["x"].to_sparse()), TypeError, "x must be a dense (strided) tensor, got a sparse_coo tensor"),
    ("dictionary", lambda g: dict(g, C=g["C"].to_sparse_csr()), TypeError, "dictionary must be a dense (strided) tensor, got a sparse_csr tensor"),
    ("x", lambda g: dict(g, x=torch.nested.nested_tensor(list(g["x"]))), TypeError, "x must be a dense (strided) tensor, got a nested tensor"),
    (
        "x",
        lambda g: dict(g, **{n: g[n].to(torch.float8_e4m3fn) for n in ("x", "C", "b")}),
        TypeError,
        "x must have a floating-point dtype (float16, bfloat16, float32 or float64), got torch.float8_e4m3fn",
    ),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("fn", ["sparse_encode", "reconstruction_loss"])
@pytest.mark.parametrize("arg,mutate,exc,message", ENCODE_CASES)
def test_encode_arguments(backend, fn, arg, mutate, exc, message):
    a = mutate(dict(good(), k=2))
    with pytest.raises(exc, match=re.escape(message)):
        getattr(BACKENDS[backend], fn)(a["x"], a["C"], a["b"], a["k"])


DECODE_CASES = [
    (lambda g: dict(g, indices=g["indices"].int()), TypeError, "indices must have dtype torch.int64"),
    (lambda g: dict(g, indices=g["indices"][..., :1]), ValueError, "indices has shape"),
    (lambda g: dict(g, values=g["values"][0]), ValueError, "values must be a 4-D"),
    (lambda g: dict(g, indices=g["indices"] + 6), ValueError, "indices must lie in [0, 6)"),
    (lambda g: dict(g, indices=g["indices"] - 3), ValueError, "indices must lie in [0, 6)"),
    (lambda g: dict(g, C=g["C"].double()), TypeError, "dictionary has dtype torch.float64 but values has torch.float32"),
    (lambda g: dict(g, C=g["C"][:, :1]), ValueError, "values keeps k=2 entries per pixel but there are only K=1"),
    (lambda g: dict(g, C=g["C"][:0]), ValueError, "dictionary must have at least one row (D >= 1)"),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mutate,exc,message", DECODE_CASES)
def test_decode_arguments(backend, mutate, exc, message):
    a = mutate(good())
    with pytest.raises(exc, match=re.escape(message)):
        BACKENDS[backend].sparse_decode(a["values"], a["indices"], a["C"])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_labels_arguments(backend):
    a = good()
    fn = BACKENDS[backend].sparse_labels
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 3)")):
        fn(a["values"], a["indices"], 3)
    with pytest.raises(TypeError, match="num_codewords must be an int"):
        fn(a["values"], a["indices"], 6.0)
    with pytest.raises(ValueError, match="num_codewords must be >= 1"):
        fn(a["values"], a["indices"], 0)
    n = a["values"].shape[0]
    with pytest.raises(ValueError, match=re.escape(
        f"num_codewords={2**62} is too large: image labels of shape ({n}, {2**62}) exceed the "
        "largest tensor"
    )):
        fn(a["values"], a["indices"], 2**62)
    # Image labels are means over each image's pixels, which must exist (as
    # predictor_loss requires of y), not NaN from an empty mean.
    with pytest.raises(ValueError, match=re.escape("values must have at least one pixel per image (H*W > 0)")):
        fn(a["values"][:, :0], a["indices"][:, :0], 6)
    with pytest.raises(TypeError, match=re.escape("indices must be a dense (strided) tensor")):
        fn(a["values"], a["indices"].to_sparse(), 6)


PREDICTOR_CASES = [
    (lambda g: dict(g, pixel=g["pixel"].int()), TypeError, "pixel_labels must have dtype torch.int64"),
    (lambda g: dict(g, pixel=g["pixel"][:, :2]), ValueError, "pixel_labels must have shape (N, H, W) = (2, 3, 3)"),
    (lambda g: dict(g, pixel=g["pixel"] + 6), ValueError, "pixel_labels must lie in [0, 6)"),
    (lambda g: dict(g, image=g["image"][:, :3]), ValueError, "image_labels must have shape (N, K) = (2, 6)"),
    (lambda g: dict(g, image=g["image"] + 2), ValueError, "image_labels must lie in [0, 1]"),
    (lambda g: dict(g, image=g["image"].double()), TypeError, "image_labels has dtype torch.float64 but y has torch.float32"),
    (lambda g: dict(g, C=torch.randn(3, 6)), ValueError, "dictionary has D=3 rows but y has 4 channels"),
    (lambda g: dict(g, x=g["x"][:, :, :0], pixel=g["pixel"][:, :0]), ValueError, "y must have at least one pixel (N*H*W > 0)"),
    (lambda g: dict(g, x=g["x"][:0], pixel=g["pixel"][:0], image=g["image"][:0]), ValueError, "y must have at least one pixel (N*H*W > 0)"),
    (lambda g: dict(g, x=g["x"][:, :, :, 0]), ValueError, "y must be a 4-D"),
    (lambda g: dict(g, weight="1"), TypeError, "local_weight must be a float"),
    (lambda g: dict(g, x=g["x"][:, :0], C=g["C"][:0]), ValueError, "dictionary must have at least one row (D >= 1), got shape (0, K): y has no channels"),
    (lambda g: dict(g, weight=float("nan")), ValueError, "local_weight must be finite and >= 0, got nan"),
    (lambda g: dict(g, weight=float("inf")), ValueError, "local_weight must be finite and >= 0, got inf"),
    (lambda g: dict(g, weight=-0.5), ValueError, "local_weight must be finite and >= 0, got -0.5"),
    (lambda g: dict(g, weight=True), TypeError, "local_weight must be a float, got bool"),
    (lambda g: dict(g, weight=1e39), ValueError, "local_weight must be at most 3.403e+38 (float32's largest), got 1e+39"),
    (lambda g: dict(g, image=g["image"].to_sparse()), TypeError, "image_labels must be a dense (strided) tensor"),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("mutate,exc,message", PREDICTOR_CASES)
def test_predictor_arguments(backend, mutate, exc, message):
    a = mutate(dict(good(), weight=1.0))
    with pytest.raises(exc, match=re.escape(message)):
        BACKENDS[backend].predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"], a["weight"])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_numpy_scalars_are_accepted_as_sizes_and_weights(backend):
    np = pytest.importorskip("numpy")
    ops = BACKENDS[backend]
    a = good()
    values, indices = ops.sparse_encode(a["x"], a["C"], a["b"], np.int64(2))
    assert torch.equal(indices, reference.sparse_encode(a["x"], a["C"], a["b"], 2)[1])
    torch.testing.assert_close(
        ops.reconstruction_loss(a["x"], a["C"], a["b"], np.int32(2)),
        reference.reconstruction_loss(a["x"], a["C"], a["b"], 2),
    )
    _, image = ops.sparse_labels(values, indices, np.int64(6))
    torch.testing.assert_close(image, a["image"])
    torch.testing.assert_close(
        ops.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"], np.float32(0.5), np.int64(2)),
        reference.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"], 0.5, 2.0),
    )
    with pytest.raises(TypeError, match="k must be an int, got float64"):
        ops.sparse_encode(a["x"], a["C"], a["b"], np.float64(2))
    with pytest.raises(TypeError, match="global_weight must be a float, got bool"):
        ops.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"], 1.0, np.bool_(True))


def test_label_ranges_are_read_back_together(monkeypatch):
    """Both label range checks share one read-back (one device sync on a GPU),
    and an index past 2^53 is still refused exactly at the bound."""
    a = good()
    read_backs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: read_backs.append(t) or tolist(t))
    check_labels(a["pixel"], a["image"], a["x"], 6)
    assert len(read_backs) == 1
    monkeypatch.undo()

    pixel = a["pixel"].clone()
    pixel.view(-1)[0] = 2**62 + 1
    with pytest.raises(ValueError, match=re.escape("pixel_labels must lie in [0, 6), got values in [")):
        check_labels(pixel, a["image"], a["x"], 6)
    pixel.view(-1)[0] = 5
    check_labels(pixel, a["image"], a["x"], 6)  # 5 is the largest valid label
    image = a["image"].clone()
    image.view(-1)[-1] = float("nan")
    with pytest.raises(ValueError, match=re.escape("image_labels must lie in [0, 1], got NaN")):
        check_labels(a["pixel"], image, a["x"], 6)


@requires_native_cpu
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_each_call_reads_the_ranges_once(monkeypatch, backend):
    """The public ops check shapes and leave the index and label ranges to the
    backend that runs (a read is a device sync on a GPU): the compiled op
    checks them itself, the reference through the Python checks, once."""
    if backend == "reference":
        monkeypatch.setenv("SRM_EXT_BACKEND", "reference")
    a = good()
    reads = []
    value_ranges = _validation._value_ranges
    monkeypatch.setattr(
        _validation, "_value_ranges", lambda *t: reads.append(len(t)) or value_ranges(*t)
    )
    srm_ext.sparse_decode(a["values"], a["indices"], a["C"])
    srm_ext.sparse_labels(a["values"], a["indices"], 6)
    srm_ext.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"])
    # The reference reads the indices, then both labels together.
    assert reads == ([1, 1, 2] if backend == "reference" else [])


@requires_native_cpu
def test_kernels_reject_bad_input_when_called_directly():
    # The operators are public too: they must raise, never read out of bounds.
    # A value out of range raises the ValueError the Python checks raise.
    a = good()
    ops = torch.ops.srm_ext
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 6), got values in [100, 105]")):
        ops.sparse_decode(a["values"], a["indices"] + 100, a["C"])
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 6), got values in [-1, ")):
        ops.sparse_labels(a["values"], a["indices"] - 1, 6)
    with pytest.raises(RuntimeError, match="k must satisfy"):
        ops.sparse_encode(a["x"], a["C"], a["b"], 9)
    with pytest.raises(RuntimeError, match="dictionary must have shape"):
        ops.reconstruction_loss(a["x"], torch.randn(3, 6), a["b"], 2)
    low = int(a["pixel"].min()) + 6  # the draw's lowest label, shifted out of range
    with pytest.raises(ValueError, match=re.escape(f"pixel_labels must lie in [0, 6), got values in [{low}, ")):
        ops.predictor_loss(
            a["x"], a["C"], a["b"], a["pixel"] + 6, a["image"], 1.0, 1.0, [True, True, True]
        )
    for bad, got in [(a["image"] + 1, "values in ["), (a["image"] - 1, "values in ["),
                     (a["image"] * float("nan"), "NaN")]:
        with pytest.raises(ValueError, match=re.escape(f"image_labels must lie in [0, 1], got {got}")):
            ops.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], bad, 1.0, 1.0, [True, True, True])
    with pytest.raises(RuntimeError, match=re.escape("y must have at least one pixel")):
        ops.predictor_loss(
            a["x"][:, :, :0], a["C"], a["b"], a["pixel"][:, :0], a["image"], 1.0, 1.0,
            [True, True, True],
        )
    with pytest.raises(RuntimeError, match=re.escape("values must have at least one pixel per image")):
        ops.sparse_labels(a["values"][:, :, :0], a["indices"][:, :, :0], 6)
    for weights in [(float("nan"), 1.0), (1.0, -1.0), (float("inf"), 1.0), (1.0, 1e39)]:
        name = "local_weight" if weights[1] == 1.0 else "global_weight"
        with pytest.raises(RuntimeError, match=f"{name} must be finite, >= 0 and at most"):
            ops.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"], *weights, [True] * 3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.sparse_encode(a["x"].half(), a["C"].half(), a["b"].half(), 2)
    # A backward op handed the code of fewer pixels than x has.
    small_values, small_indices = a["values"][:1, :1, :1], a["indices"][:1, :1, :1]
    with pytest.raises(RuntimeError, match=re.escape("values must have shape (2, 3, 3, k) to match x")):
        ops.sparse_encode_backward(
            torch.ones_like(small_values), small_values, small_indices, a["x"], a["C"], a["b"],
            [True, True, True],
        )
    with pytest.raises(RuntimeError, match=re.escape("values must have shape (2, 3, 3, k) to match x")):
        ops.reconstruction_loss_backward(
            torch.tensor(1.0), a["x"], a["C"], a["b"], small_values, small_indices,
            [True, True, True],
        )
    # The student backward op handed gradients that do not belong to y.
    _, *unit_grads = ops.predictor_loss(
        a["x"], a["C"], a["b"], a["pixel"], a["image"], 1.0, 1.0, [True, True, True]
    )
    with pytest.raises(RuntimeError, match=re.escape("grad_y must have shape [1, 4, 3, 3]")):
        ops.predictor_loss_backward(
            torch.tensor(1.0), *unit_grads, a["x"][:1], a["C"], [True, True, True]
        )


@pytest.mark.parametrize(
    "dtype,error", [(torch.float32, ValueError), (torch.bfloat16, RuntimeError)]
)  # kernel, reference
@pytest.mark.parametrize("bad", [2.0, -0.5, float("nan")])
def test_image_labels_out_of_range_are_refused_under_torch_compile(dtype, error, bad):
    # The Python range checks are skipped while tracing: the CPU kernel checks
    # the labels itself, and the reference asserts in the graph.
    a = {name: t.to(dtype) if t.is_floating_point() else t for name, t in good().items()}
    image = a["image"].clone()
    image[1, 3] = bad
    torch._dynamo.reset()
    compiled = torch.compile(srm_ext.predictor_loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(a["x"], a["C"], a["b"], a["pixel"], a["image"]),
        reference.predictor_loss(a["x"], a["C"], a["b"], a["pixel"], a["image"]),
    )
    with pytest.raises(error, match=re.escape("image_labels must lie in [0, 1]")):
        compiled(a["x"], a["C"], a["b"], a["pixel"], image)


@pytest.mark.parametrize(
    "dtype,error", [(torch.float32, ValueError), (torch.bfloat16, RuntimeError)]
)  # kernel, reference
@pytest.mark.parametrize("bad", [6, -1, -100], ids=["K", "negative", "ignore index"])
def test_pixel_labels_out_of_range_are_refused_under_torch_compile(dtype, error, bad):
    # As for the image labels; -100 is cross_entropy's default ignore_index,
    # which must not drop the pixel silently.
    a = {name: t.to(dtype) if t.is_floating_point() else t for name, t in good().items()}
    pixel = a["pixel"].clone()
    pixel[0, 1, 2] = bad
    torch._dynamo.reset()
    compiled = torch.compile(srm_ext.predictor_loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(error, match=re.escape("pixel_labels must lie in [0, ")):
        compiled(a["x"], a["C"], a["b"], pixel, a["image"])
