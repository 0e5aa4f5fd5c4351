"""SparseRepresentation / SparseCodePredictor: shapes, gradients, agreement with
the reference math, label resizing, autocast and torch.compile."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from srm_ext import SparseCodePredictor, SparseRepresentation, reference
from srm_ext.modules import resize_pixel_labels, srm_sizes

N, D, H, W, K, KEEP = 3, 8, 5, 4, 16, 3


@pytest.fixture
def rep() -> SparseRepresentation:
    torch.manual_seed(0)
    return SparseRepresentation(D, K, KEEP)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(N, D, H, W)


def test_representation_parameters_and_init(rep):
    assert rep.dictionary.shape == (D, K)
    assert rep.intercept.shape == (1,)
    assert -1.0 <= rep.intercept.item() <= 1.0
    bound = (6.0 / K) ** 0.5  # kaiming-uniform on the stored (D, K) tensor
    assert rep.dictionary.abs().max() <= bound
    # filled across the range, not left at zero (128 draws all under half the
    # bound: probability 2**-128)
    assert rep.dictionary.abs().max() > 0.5 * bound
    assert rep.dictionary.std() > 0.25 * bound  # uniform: bound / sqrt(3)
    assert rep.intercept.item() != 0.0
    # codeword-major: each codeword (column) is contiguous, so the kernels
    # read it and write its gradient in place
    assert rep.dictionary.stride() == (1, D)
    assert {name for name, _ in rep.named_parameters()} == {"dictionary", "intercept"}


def test_predictor_parameters_and_init():
    torch.manual_seed(0)
    pred = SparseCodePredictor(6, K)
    assert pred.dictionary.shape == (6, K) and pred.intercept.shape == (1,)
    bound = (6.0 / K) ** 0.5  # the same init as the representation's
    assert 0.5 * bound < pred.dictionary.abs().max() <= bound
    assert -1.0 <= pred.intercept.item() <= 1.0 and pred.intercept.item() != 0.0


def test_representation_forward_shapes(rep, x):
    out = rep(x)
    assert out.reconstruction.shape == (N, D, H, W)
    assert out.values.shape == out.indices.shape == (N, H, W, KEEP)
    assert out.indices.dtype == torch.int64
    # values sorted descending
    assert torch.all(out.values[..., :-1] >= out.values[..., 1:])


def test_representation_loss_equals_reference(rep, x):
    expected = reference.reconstruction_loss(x, rep.dictionary, rep.intercept, KEEP)
    torch.testing.assert_close(rep.loss(x), expected)
    # and equals the unfused forward
    torch.testing.assert_close(rep.loss(x), F.mse_loss(rep(x).reconstruction, x))


def test_representation_loss_gradients(rep, x):
    x = x.requires_grad_()
    rep.loss(x).backward()
    ref_dict = rep.dictionary.detach().clone().requires_grad_()
    ref_icpt = rep.intercept.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    reference.reconstruction_loss(ref_x, ref_dict, ref_icpt, KEEP).backward()
    torch.testing.assert_close(rep.dictionary.grad, ref_dict.grad)
    torch.testing.assert_close(rep.intercept.grad, ref_icpt.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_representation_labels_match_reference(rep, x):
    labels = rep.labels(x)
    values, indices = reference.sparse_encode(x, rep.dictionary, rep.intercept, KEEP)
    pixel, image = reference.sparse_labels(values, indices, K)
    assert torch.equal(labels.pixel, pixel)
    torch.testing.assert_close(labels.image, image)
    assert labels.pixel.shape == (N, H, W) and labels.image.shape == (N, K)
    assert not labels.image.requires_grad


def test_representation_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sparsity must satisfy 1 <= k <= K=8, got k=9"):
        SparseRepresentation(4, 8, 9)
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        SparseRepresentation(0, 8, 1)
    with pytest.raises(TypeError, match="sparsity must be an int, got float"):
        SparseRepresentation(4, 8, 2.0)


def test_predictor_rejects_bad_sizes_and_weights():
    with pytest.raises(ValueError, match="num_codewords must be >= 1, got 0"):
        SparseCodePredictor(4, 0)
    with pytest.raises(TypeError, match="in_channels must be an int, got float"):
        SparseCodePredictor(4.5, 8)
    with pytest.raises(ValueError, match="global_weight must be finite and >= 0, got nan"):
        SparseCodePredictor(4, 8, global_weight=float("nan"))


def test_blocks_take_numpy_sizes_and_store_python_ints(x):
    np = pytest.importorskip("numpy")
    rep = SparseRepresentation(np.int64(D), np.int64(K), np.int32(KEEP))
    pred = SparseCodePredictor(np.int64(6), np.int64(K))
    for value in (rep.in_channels, rep.num_codewords, rep.sparsity, pred.in_channels, pred.num_codewords):
        assert type(value) is int
    rep(x)
    rep.loss(x)
    labels = rep.labels(x)
    pred(torch.randn(N, 6, H, W), labels)
    with pytest.raises(TypeError, match="sparsity must be an int, got bool"):
        SparseRepresentation(D, K, True)


def test_blocks_name_a_wrong_channel_count(rep, x):
    pred = SparseCodePredictor(6, K)
    labels = rep.labels(x)
    assert pred.predict(torch.randn(N, 6, H, W)).shape == (N, H, W, K)
    # The block's in_channels, not the dictionary rows the ops would name.
    for call in (pred.predict, lambda y: pred(y, labels)):
        with pytest.raises(ValueError, match=re.escape(f"y must be a (N, 6, H, W) feature map for in_channels=6, got shape ({N}, 5, {H}, {W})")):
            call(torch.randn(N, 5, H, W))
    for call in (rep, rep.loss, rep.encode, rep.labels):
        with pytest.raises(ValueError, match=re.escape(f"x must be a (N, {D}, H, W) feature map for in_channels={D}, got shape ({N}, 3, {H}, {W})")):
            call(torch.randn(N, 3, H, W))
    with pytest.raises(ValueError, match=re.escape("y must be a 4-D (N, C, H, W) feature map, got shape (6, 5, 4)")):
        pred.predict(torch.randn(6, H, W))


def test_blocks_name_inputs_that_are_not_feature_maps(rep, x):
    pred = SparseCodePredictor(D, K)
    labels = rep.labels(x)
    for call in (rep, rep.loss, rep.encode, rep.labels):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
            call(x.numpy())
        with pytest.raises(TypeError, match="x must have a floating-point dtype .* got torch.complex64"):
            call(x.to(torch.complex64))  # never cast to real quietly
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got NoneType"):
        pred(None, labels)
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got ndarray"):
        pred.predict(x.numpy())
    with pytest.raises(TypeError, match=r"labels must be the teacher's \(pixel, image\) label tensors, .* got Tensor"):
        pred(x, labels.pixel)
    with pytest.raises(TypeError, match=r"labels must be the teacher's \(pixel, image\) label tensors, .* got tuple"):
        pred(x, (labels.pixel.numpy(), labels.image))
    for pixel in (labels.pixel.flatten(), labels.pixel[:, :0]):
        with pytest.raises(ValueError, match=re.escape(f"pixel labels must have shape (N, H, W) with H, W >= 1, got {tuple(pixel.shape)}")):
            pred(x, (pixel, labels.image))
    with pytest.raises(TypeError, match="local_weight must be a float, got str"):
        SparseCodePredictor(D, K, local_weight="2.5")


def test_blocks_run_on_the_meta_device(rep, x):
    # Shapes without data (as when a model is built on meta to be loaded
    # later): autocast has no meta device type, so there is none to turn off.
    rep = rep.to("meta")
    pred = SparseCodePredictor(D, K).to("meta")
    x = x.to("meta")
    assert rep.loss(x).shape == () and rep(x).reconstruction.shape == x.shape
    pixel = torch.zeros(N, H, W, dtype=torch.long, device="meta")
    assert pred(x, (pixel, torch.zeros(N, K, device="meta"))).shape == ()


def test_srm_sizes_follow_the_paper():
    assert srm_sizes(128, 2.0, 0.02) == (256, 5)  # CIFAR-100 DenseNet block 1
    assert srm_sizes(2048, 2.0, 0.02) == (4096, 81)  # ResNeXt50 last stage
    assert srm_sizes(8, 2.0, 0.02) == (16, 1)  # k is at least one
    with pytest.raises(ValueError, match="only K="):
        srm_sizes(8, 2.0, 1.5)
    for sparsity_multiplier in (0.0, -0.1):  # not a silent k = 1
        with pytest.raises(ValueError, match=f"sparsity_multiplier must be finite and > 0, got {sparsity_multiplier}"):
            srm_sizes(8, 2.0, sparsity_multiplier)
    for codeword_multiplier in (float("nan"), float("inf")):  # named, not int()'s error
        with pytest.raises(ValueError, match=f"codeword_multiplier must be finite and > 0, got {codeword_multiplier}"):
            srm_sizes(8, codeword_multiplier, 0.02)


def test_predictor_loss_equals_reference_and_has_gradients(rep, x):
    torch.manual_seed(2)
    pred = SparseCodePredictor(6, K, local_weight=0.5, global_weight=2.0)
    y = torch.randn(N, 6, H, W, requires_grad=True)
    labels = rep.labels(x)
    loss = pred(y, labels)
    expected = reference.predictor_loss(
        y, pred.dictionary, pred.intercept, labels.pixel, labels.image, 0.5, 2.0
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert y.grad is not None and pred.dictionary.grad is not None
    assert pred.intercept.grad is not None
    assert rep.dictionary.grad is None  # labels carry no gradient


def test_predictor_resizes_pixel_labels_when_grids_differ(rep, x):
    pred = SparseCodePredictor(6, K)
    y = torch.randn(N, 6, 2 * H, 2 * W)  # student grid twice the teacher's
    labels = rep.labels(x)
    loss = pred(y, labels)
    upsampled = resize_pixel_labels(labels.pixel, (2 * H, 2 * W))
    expected = reference.predictor_loss(
        y, pred.dictionary, pred.intercept, upsampled, labels.image
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("size", [(5, 4), (10, 8), (3, 2), (7, 9), (1, 1)])
def test_resize_pixel_labels_matches_nearest_interpolation(size):
    # Sizes where interpolate's floating-point scale is exact enough.
    labels = torch.randint(0, 50, (2, 5, 4))
    resized = resize_pixel_labels(labels, size)
    expected = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    assert resized.dtype == torch.int64
    assert torch.equal(resized, expected)


def test_resize_pixel_labels_uses_the_exact_integer_rule():
    # 62 -> 28 rows: interpolate's float scale sends some rows one further.
    labels = torch.arange(62).view(1, 62, 1).expand(1, 62, 3)
    resized = resize_pixel_labels(labels, (28, 3))
    assert resized[0, :, 0].tolist() == [(i * 62) // 28 for i in range(28)]


def test_resize_pixel_labels_keeps_large_ids_exact():
    labels = torch.full((1, 2, 2), 2**40 + 1, dtype=torch.int64)
    assert torch.equal(resize_pixel_labels(labels, (4, 4)), torch.full((1, 4, 4), 2**40 + 1))


def test_blocks_accept_half_precision_features_under_autocast(rep, x):
    pred = SparseCodePredictor(6, K)
    y = torch.randn(N, 6, H, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_half = F.conv2d(x, torch.eye(D).view(D, D, 1, 1))  # bf16 like a real layer
        y_half = F.conv2d(y, torch.eye(6).view(6, 6, 1, 1))
        assert x_half.dtype == torch.bfloat16
        loss = rep.loss(x_half)
        labels = rep.labels(x_half)
        stage2 = pred(y_half, labels)
    assert loss.dtype == stage2.dtype == torch.float32
    # The blocks cast the features to float32 and run the ops with autocast
    # off, so loss and gradients are exactly those of float32 copies fed the
    # promoted features.
    rep32, pred32 = copy.deepcopy(rep), copy.deepcopy(pred)
    loss32 = rep32.loss(x_half.float())
    stage2_32 = pred32(y_half.float(), rep32.labels(x_half.float()))
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(loss, loss32, **exact)
    torch.testing.assert_close(stage2, stage2_32, **exact)
    (loss + stage2).backward()
    (loss32 + stage2_32).backward()
    for block, block32 in ((rep, rep32), (pred, pred32)):
        for (name, p), p32 in zip(block.named_parameters(), block32.parameters()):
            torch.testing.assert_close(p.grad, p32.grad, **exact, msg=lambda m: f"{name}: {m}")


def test_blocks_under_torch_compile_without_graph_breaks(rep, x):
    pred = SparseCodePredictor(6, K)
    y = torch.randn(N, 6, H, W, requires_grad=True)

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return rep.loss(x) + pred(y, rep.labels(x))

    torch._dynamo.reset()
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    out = compiled(x, y)
    torch.testing.assert_close(out, objective(x, y))
    out.backward()
    assert y.grad is not None and rep.dictionary.grad is not None
