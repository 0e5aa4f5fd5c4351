"""torch.use_deterministic_algorithms(True) on the CPU backends.

Every op, forward and backward, must run under deterministic mode (no
"does not have a deterministic implementation" error) and give bitwise equal
results when repeated. The CUDA counterpart is in test_cuda_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

import srm_ext
from srm_ext import _backend

from conftest import dyadic

BACKENDS = [
    "reference",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(_backend.native_module is None, reason="compiled CPU backend not built"),
    ),
]


@pytest.fixture
def deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def every_op_with_gradients(dtype):
    """Outputs and input gradients of all five ops on fixed random inputs."""
    g = torch.Generator().manual_seed(30)
    n, d, h, w, K, k = 3, 12, 7, 6, 40, 4
    # Random (not dyadic) values: summation order shows in the last bits.
    x = torch.randn(n, d, h, w, generator=g, dtype=dtype).requires_grad_(True)
    C = torch.randn(d, K, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(1, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randn(n, 9, h, w, generator=g, dtype=dtype).requires_grad_(True)
    Cs = torch.randn(9, K, generator=g, dtype=dtype).requires_grad_(True)
    bs = dyadic(1, dtype=dtype, generator=g).requires_grad_(True)

    values, indices = srm_ext.sparse_encode(x, C, b, k)
    x_hat = srm_ext.sparse_decode(values, indices, C)
    stage1 = srm_ext.reconstruction_loss(x, C, b, k)
    pixel_labels, image_labels = srm_ext.sparse_labels(values.detach(), indices, K)
    stage2 = srm_ext.predictor_loss(y, Cs, bs, pixel_labels, image_labels)
    total = values.sum() + x_hat.square().mean() + stage1 + stage2
    grads = torch.autograd.grad(total, [x, C, b, y, Cs, bs])
    outputs = [values, indices, x_hat, stage1, pixel_labels, image_labels, stage2]
    return [t.detach() for t in outputs] + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_op_is_bitwise_reproducible_in_deterministic_mode(
    backend, dtype, deterministic_mode, monkeypatch
):
    monkeypatch.setenv("SRM_EXT_BACKEND", backend if backend == "reference" else "")
    first = every_op_with_gradients(dtype)
    second = every_op_with_gradients(dtype)
    assert len(first) == len(second) == 13
    for a, b in zip(first, second):
        assert torch.equal(a, b)
