"""Large inputs on the compiled CPU kernels.

360,000 pixels against K = 8192 codewords: about 2.9e9 pixel-codeword pairs,
more than 2^31, so a 32-bit offset anywhere in the encode path would wrap,
and a hidden dense (pixels x K) buffer would take 11 GiB. The kernels must
keep exact results at the far end of the map and a workspace of a few MiB.

The student-side loss works in tiles of whole images and allocates no
(pixels x K) tensor for images that fit in a tile, as the README says; a
smaller batch checks that its workspace stays far below one such buffer.
"""

from __future__ import annotations

import pytest
import torch

import srm_ext
from srm_ext import reference
from srm_ext.benchmark import _PeakMemory

from conftest import dyadic, requires_native_cpu

pytestmark = requires_native_cpu

N, D, H, W, K, k = 4, 4, 300, 300, 8192, 2
MIB = 1024 * 1024
# Tiles and blocks per worker thread, plus slack for the allocator.
WORKSPACE_LIMIT = (48 + 4 * torch.get_num_threads()) * MIB


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(20)
    x = dyadic(N, D, H, W, dtype=torch.float32, generator=g)
    dictionary = dyadic(K, D, dtype=torch.float32, generator=g).t()  # codeword-major
    intercept = torch.tensor([0.25])
    return x, dictionary, intercept


def test_pairs_exceed_32_bit_offsets():
    assert N * H * W * K > 2**31


def test_encode_is_exact_at_both_ends_of_the_map_with_a_small_workspace(inputs):
    x, C, b = inputs
    peak = _PeakMemory(torch.device("cpu"))
    result = {}
    peak_bytes = peak.measure(lambda: result.update(code=srm_ext.sparse_encode(x, C, b, k)))
    values, indices = result["code"]
    assert indices.min() >= 0 and indices.max() < K
    # The first rows and the last rows (pixel offsets past 2^31 / K) of the
    # map, against the reference on just those pixels.
    for rows in (slice(0, 2), slice(H - 2, H)):
        for image in (0, N - 1):
            want_v, want_i = reference.sparse_encode(x[image : image + 1, :, rows], C, b, k)
            assert torch.equal(indices[image : image + 1, rows], want_i)
            torch.testing.assert_close(values[image : image + 1, rows], want_v, rtol=0, atol=0)
    if peak.available:
        outputs = values.nbytes + indices.nbytes
        assert peak_bytes - outputs < WORKSPACE_LIMIT, f"encode used {peak_bytes / MIB:.0f} MiB"


def test_stage1_step_has_a_small_workspace(inputs):
    x, C, b = inputs
    leaves = [C.detach().clone().requires_grad_(True), b.clone().requires_grad_(True)]
    peak = _PeakMemory(torch.device("cpu"))
    result = {}

    def step():
        loss = srm_ext.reconstruction_loss(x, *leaves, k)
        result["loss"] = loss.detach()
        result["grads"] = torch.autograd.grad(loss, leaves)

    peak_bytes = peak.measure(step)
    grad_dictionary, grad_intercept = result["grads"]
    assert torch.isfinite(grad_dictionary).all() and torch.isfinite(grad_intercept).all()
    assert grad_dictionary.abs().sum() > 0
    # The fused loss equals decode(encode(x)) against x, computed sparsely.
    with torch.no_grad():
        values, indices = srm_ext.sparse_encode(x, C, b, k)
        mse = (srm_ext.sparse_decode(values, indices, C) - x).square().mean()
    torch.testing.assert_close(result["loss"], mse, rtol=1e-5, atol=0)
    if peak.available:
        # The code (values and indices) is kept for backward; the rest is
        # tiles, pixel blocks and the gradient itself.
        kept = N * H * W * k * (4 + 8)
        assert peak_bytes - kept < WORKSPACE_LIMIT, f"stage-1 step used {peak_bytes / MIB:.0f} MiB"
    # One image has fewer than 2^31 pairs, so per-image gradients need no
    # large offsets. The loss is a mean over N*D*H*W values and every image has
    # D*H*W of them: the batch gradient is the mean of the per-image ones.
    # float32 sums in another order differ by about 5e-5 relative.
    assert H * W * K < 2**31
    per_image = []
    for i in range(N):
        leaves = [C.detach().clone().requires_grad_(True), b.clone().requires_grad_(True)]
        loss = srm_ext.reconstruction_loss(x[i : i + 1], *leaves, k)
        per_image.append(torch.autograd.grad(loss, leaves))
    for got, parts in zip(result["grads"], zip(*per_image)):
        torch.testing.assert_close(got, torch.stack(parts).mean(0), rtol=1e-4, atol=1e-6)


def test_student_loss_holds_no_pixels_by_codewords_buffer(two_threads):
    # 16x16 images against 1024 codewords: 2^18 logits, one image per tile.
    # A dense float32 (N*H*W x K) buffer would take 64 MiB; the tiles take
    # 1 MiB per thread, the y gradient 2 MiB. Two threads, as the tiles'
    # share grows with the thread count.
    n, channels, size, codewords = 64, 32, 16, 1024
    g = torch.Generator().manual_seed(21)
    y = torch.randn(n, channels, size, size, generator=g)
    dictionary = torch.randn(channels, codewords, generator=g) * 0.2
    intercept = torch.zeros(1)
    pixel = torch.randint(0, codewords, (n, size, size), generator=g)
    image = torch.rand(n, codewords, generator=g) * 0.01
    leaves = [t.clone().requires_grad_(True) for t in (y, dictionary, intercept)]
    peak = _PeakMemory(torch.device("cpu"))
    if not peak.available:
        pytest.skip("the resident-set peak cannot be reset here")

    def step():
        loss = srm_ext.predictor_loss(*leaves, pixel, image)
        torch.autograd.grad(loss, leaves)

    step()  # thread pool and allocator set-up are not the op's
    peak_bytes = peak.measure(step)
    dense = n * size * size * codewords * 4
    assert peak_bytes < dense / 4, f"student loss used {peak_bytes / MIB:.1f} MiB"
