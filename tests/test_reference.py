"""The reference against the dense masked research-style computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srm_ext import reference, research_style

from conftest import beyond_float16


def tie_free_inputs(n, d, h, w, K, seed):
    # Continuous float64 values: ties between pre-activations have probability 0.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, h, w, dtype=torch.float64, generator=g)
    C = torch.randn(d, K, dtype=torch.float64, generator=g) / d**0.5
    b = torch.rand(1, dtype=torch.float64, generator=g) * 2 - 1
    return x, C, b


@pytest.mark.parametrize("n,d,h,w,K,k", [(2, 8, 4, 4, 16, 3), (3, 12, 5, 3, 24, 1), (1, 6, 2, 7, 10, 10)])
def test_reference_matches_dense_masked_research_code(n, d, h, w, K, k):
    x, C, b = tie_free_inputs(n, d, h, w, K, seed=n * 100 + k)
    values, indices = reference.sparse_encode(x, C, b, k)
    dense_code = research_style.dense_sparse_code(x, C, b, k)
    assert (dense_code > 0).sum(-1).eq(k).all(), "inputs must be tie-free"
    rebuilt = torch.zeros_like(dense_code).scatter(-1, indices, values)
    torch.testing.assert_close(rebuilt, dense_code)

    torch.testing.assert_close(
        reference.reconstruction_loss(x, C, b, k),
        research_style.dense_reconstruction_loss(x, C, b, k),
    )
    pixel, image = reference.sparse_labels(values, indices, K)
    dense_pixel, dense_image = research_style.dense_labels(x, C, b, k)
    torch.testing.assert_close(pixel, dense_pixel)
    torch.testing.assert_close(image, dense_image)


def test_reference_gradients_match_dense_masked_research_code():
    x, C, b = tie_free_inputs(2, 8, 4, 4, 16, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (x, C, b)]
    ours = torch.autograd.grad(reference.reconstruction_loss(*leaves, 4), leaves)
    leaves = [t.clone().requires_grad_(True) for t in (x, C, b)]
    dense = torch.autograd.grad(research_style.dense_reconstruction_loss(*leaves, 4), leaves)
    torch.testing.assert_close(ours, dense)


def test_research_code_keeps_ties_where_the_spec_keeps_exactly_k():
    x = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    C = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    assert (research_style.dense_sparse_code(x, C, b, 2) > 0.6).sum() == 3
    values, indices = reference.sparse_encode(x, C, b, 2)
    assert indices.flatten().tolist() == [0, 1]


def test_values_are_sorted_sigmoids_of_the_selected_pre_activations():
    x, C, b = tie_free_inputs(2, 8, 3, 3, 20, seed=3)
    values, indices = reference.sparse_encode(x, C, b, 6)
    pre = x.permute(0, 2, 3, 1) @ C + b
    torch.testing.assert_close(values, torch.sigmoid(pre.gather(-1, indices)))
    assert (values.diff(dim=-1) <= 0).all()
    # no excluded codeword has a larger pre-activation than the k-th kept one
    excluded = pre.scatter(-1, indices, float("-inf"))
    assert (excluded.max(-1).values <= pre.gather(-1, indices)[..., -1]).all()


def test_predictor_loss_formula():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=g)
    C = torch.randn(3, 5, dtype=torch.float64, generator=g)
    b = torch.tensor([0.3], dtype=torch.float64)
    pixel = torch.randint(0, 5, (2, 2, 2), generator=g)
    image = torch.rand(2, 5, dtype=torch.float64, generator=g)
    q = torch.sigmoid(torch.einsum("ndhw,dk->nhwk", y, C) + 0.3)
    local = (torch.logsumexp(q, -1) - q.gather(-1, pixel.unsqueeze(-1)).squeeze(-1)).mean()
    m = q.mean(dim=(1, 2))
    global_ = -(image * m.log() + (1 - image) * (1 - m).log()).mean()
    torch.testing.assert_close(
        reference.predictor_loss(y, C, b, pixel, image, 0.25, 4.0), 0.25 * local + 4.0 * global_
    )


def test_float16_values_that_round_to_one_keep_their_gradient():
    # Kept pre-activations 9 to 9.75: sigmoids within 1.3e-4 of 1, which
    # float16 stores as 1.0, yet the gradient s (1 - s) must come from the
    # float32 sigmoid.
    x = torch.ones(1, 1, 1, 2, dtype=torch.float16)
    C = torch.tensor([[8.5, 8.75, 9.0, 1.5, 9.25]], dtype=torch.float16)
    b = torch.tensor([0.5], dtype=torch.float16, requires_grad=True)
    values, indices = reference.sparse_encode(x, C, b, 4)
    assert (values == 1).all()
    (grad,) = torch.autograd.grad(values.sum(), b)
    # In float64: the kept sigmoids' derivatives, over both pixels.
    kept = torch.sigmoid(C.double()[0, indices] + 0.5)
    want = (kept * (1 - kept)).sum().reshape(1)
    assert grad > 0
    # float32 holds s to 3e-8 (its spacing below 1 is 6e-8), about 5e-4 of
    # the smallest 1 - s here (5.8e-5), and the sum is rounded to float16
    # (within 2^-11): 2e-3 is twice the worst case.
    torch.testing.assert_close(grad.double(), want, rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_large_magnitudes_accumulate_in_float32(dtype):
    x, C, b, want = beyond_float16(dtype, 2, 3, 3, num_codewords=32, k=4, seed=40)
    values, indices = reference.sparse_encode(x, C, b, 4)
    assert values.dtype == dtype and torch.isfinite(values).all()
    assert torch.equal(indices, want)

    pixel_labels, image_labels = reference.sparse_labels(values, indices, 32)
    assert torch.isfinite(image_labels).all()
    g = torch.Generator().manual_seed(41)
    y = (torch.randn(2, 16, 3, 3, generator=g) * 60).to(dtype).requires_grad_(True)
    Cs = (torch.randn(16, 32, generator=g) * 60).to(dtype).requires_grad_(True)
    loss = reference.predictor_loss(y, Cs, b, pixel_labels, image_labels)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(y.grad).all() and torch.isfinite(Cs.grad).all()

    # The stage-1 loss (about 5.5e4, near float16's limit) stays finite and
    # agrees with float32.
    stage1 = reference.reconstruction_loss(x, C, b, 4)
    assert torch.isfinite(stage1)
    want_loss = reference.reconstruction_loss(x.float(), C.float(), b.float(), 4)
    torch.testing.assert_close(stage1.float(), want_loss, rtol=1e-2, atol=0)


def _student_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 3, 2, 2, dtype=dtype, generator=g)
    C = torch.randn(3, 5, dtype=dtype, generator=g)
    b = torch.tensor([0.3], dtype=dtype)
    pixel = torch.randint(0, 5, (2, 2, 2), generator=g)
    image = torch.rand(2, 5, dtype=dtype, generator=g)
    return y, C, b, pixel, image


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_predictor_loss_of_nan_features_is_nan(dtype):
    # binary_cross_entropy refuses NaN means; the loss must be NaN, as from the kernels.
    y, C, b, pixel, image = _student_inputs(dtype)
    y[1, 2, 0, 1] = float("nan")
    y.requires_grad_(True)
    loss = reference.predictor_loss(y, C, b, pixel, image)
    assert loss.isnan()
    loss.backward()
    assert y.grad[1].isnan().any() and not y.grad[0].isnan().any()


def test_predictor_loss_keeps_binary_cross_entropy_gradients():
    # Saturated means included: torch clamps the logs at -100 and the gradient's
    # denominator at 1e-12, and so do the kernels.
    y, C, b, pixel, image = _student_inputs()
    y = y.abs() + 0.1
    C[:, 0] = 1e3  # codeword 0 saturates: every image's mean is exactly 1
    for t in (y, C, b):
        t.requires_grad_(True)
    got_loss = reference.predictor_loss(y, C, b, pixel, image, 0.0, 1.0)
    q = torch.sigmoid(torch.einsum("ndhw,dk->nhwk", y, C) + b)
    assert (q.mean(dim=(1, 2))[:, 0] == 1).all()
    want_loss = F.binary_cross_entropy(q.mean(dim=(1, 2)), image)
    torch.testing.assert_close(got_loss, want_loss)
    got = torch.autograd.grad(got_loss, (y, C, b))
    torch.testing.assert_close(got, torch.autograd.grad(want_loss, (y, C, b)))


def test_image_labels_carry_no_gradient():
    y, C, b, pixel, image = _student_inputs()
    y.requires_grad_(True)
    image.requires_grad_(True)
    reference.predictor_loss(y, C, b, pixel, image).backward()
    assert y.grad is not None and image.grad is None


@pytest.mark.parametrize("layout", ["channels_last", "one_pixel"])
def test_inference_mode_features_and_dictionary_train_through_the_reference(layout):
    # A frozen teacher's features come from torch.inference_mode. Where the
    # matmul reads pixels as a view (channels_last, or a 1x1 map) or keeps a
    # dictionary made there, autograd would refuse to save them: the reference
    # copies them, as the compiled ops do.
    h, w = (1, 1) if layout == "one_pixel" else (4, 5)
    x, C, b = tie_free_inputs(2, 6, h, w, 12, seed=41)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        frozen_x, frozen_C = x.clone(), C.clone()
        values, indices = reference.sparse_encode(x, C, b, 3)

    def dictionary_grads(x):
        leaves = [t.detach().clone().requires_grad_() for t in (C, b)]
        return torch.autograd.grad(reference.reconstruction_loss(x, *leaves, 3), leaves)

    torch.testing.assert_close(dictionary_grads(frozen_x), dictionary_grads(x))
    x_leaf = x.clone().requires_grad_()
    frozen = torch.autograd.grad(reference.reconstruction_loss(x_leaf, frozen_C, b, 3), x_leaf)
    plain = torch.autograd.grad(reference.reconstruction_loss(x_leaf, C, b, 3), x_leaf)
    torch.testing.assert_close(frozen, plain)

    v = values.clone().requires_grad_()
    frozen = torch.autograd.grad(reference.sparse_decode(v, indices, frozen_C).sum(), v)
    plain = torch.autograd.grad(reference.sparse_decode(v, indices.clone(), C).sum(), v)
    torch.testing.assert_close(frozen, plain)


def test_pixel_labels_are_a_copy_of_the_indices_even_for_k_1():
    # indices[..., 0] is a view for k = 1: writing to the labels (masking to an
    # ignore index, say) must not change the code autograd still holds.
    x, C, b = tie_free_inputs(2, 4, 3, 3, 6, seed=42)
    values, indices = reference.sparse_encode(x, C, b, 1)
    kept = indices.clone()
    pixel, _ = reference.sparse_labels(values, indices, 6)
    pixel.fill_(-100)
    torch.testing.assert_close(indices, kept)
