"""The dense products inside the CPU kernels (csrc/cpu/matmul.h) against
float64 matrix products: every blocking edge, layout and accumulation mode.
On a CPU with AVX-512F these run the project's own kernel; elsewhere, and
with SRM_EXT_CPU_GEMM=blas, ATen's BLAS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env, requires_native_cpu
from srm_ext import _backend

pytestmark = requires_native_cpu


# Sizes on both sides of the kernel's blocks: 12-row micro-panels, 16-lane
# vectors in 32-column panels, 256-deep blocks, 384-row blocks.
SHAPES = [
    (1, 1, 1),
    (11, 3, 15),
    (12, 16, 16),
    (13, 17, 17),
    (25, 255, 31),
    (24, 256, 32),
    (23, 257, 33),
    (7, 513, 65),
    (383, 40, 7),
    (385, 300, 50),
]


def matmul(a, b, out, accumulate=False):
    _backend.native_module.matmul(a, b, out, accumulate)
    return out


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values as a row-major, column-major or strided (no unit stride) matrix."""
    if kind == "row-major":
        return t.contiguous()
    if kind == "column-major":
        return t.t().contiguous().t()
    wide = t.new_zeros(t.shape[0], 2 * t.shape[1])
    wide[:, ::2] = t
    return wide[:, ::2]


def error_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A float32 rounding bound per element: a depth-long sum of products
    is within about depth * 2^-24 * (|a| @ |b|) of the exact value (twice
    that, for the block sums and the accumulated output)."""
    depth = a.shape[1]
    return 2 * (depth + 2) * 2.0**-24 * (a.abs().double() @ b.abs().double()) + 1e-30


def test_backend_info_names_the_float32_kernel():
    kernel = _backend.native_module.build_info()["float32_matmul"]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if os.environ.get("SRM_EXT_CPU_GEMM") == "blas":
        assert kernel == "blas"
    elif sys.platform.startswith("linux") and os.uname().machine == "x86_64" and flags:
        assert kernel == ("avx512" if " avx512f " in flags.replace("\n", " ") else "blas")
    else:
        assert kernel in ("avx512", "blas")


@pytest.mark.parametrize("rows,depth,cols", SHAPES)
@pytest.mark.parametrize("a_layout", ["row-major", "column-major", "strided"])
@pytest.mark.parametrize("b_layout", ["row-major", "column-major", "strided"])
def test_float32_products_are_within_rounding_of_the_exact_product(rows, depth, cols, a_layout,
                                                                     b_layout):
    g = torch.Generator().manual_seed(rows * 1000 + depth * 10 + cols)
    a = torch.randn(rows, depth, generator=g)
    b = torch.randn(depth, cols, generator=g)
    out = matmul(layout(a, a_layout), layout(b, b_layout), torch.full((rows, cols), float("nan")))
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs() <= error_bound(a, b)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("out_layout", ["row-major", "column-major"])
@pytest.mark.parametrize("rows,depth,cols", [(13, 257, 33), (40, 70, 300)])
def test_accumulate_adds_the_product_to_out(dtype, out_layout, rows, depth, cols):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(rows, depth, generator=g, dtype=dtype)
    b = torch.randn(depth, cols, generator=g, dtype=dtype)
    start = torch.randn(rows, cols, generator=g, dtype=dtype)
    out = layout(start.clone(), out_layout)
    matmul(a, b, out, accumulate=True)
    expected = start.double() + a.double() @ b.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # Overwriting ignores what out held, NaN included.
    out.fill_(float("nan"))
    matmul(a, b, out)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=tol, atol=tol)


def test_exact_inputs_give_the_exact_product():
    # Multiples of 1/8 with small sums: every partial sum is exact in float32,
    # so any missing, doubled or misplaced term shows as an exact mismatch.
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-16, 17, (37, 600), generator=g).float() / 8
    b = torch.randint(-16, 17, (600, 75), generator=g).float() / 8
    assert torch.equal(matmul(a, b, torch.empty(37, 75)), (a.double() @ b.double()).float())


def test_equal_columns_give_bitwise_equal_results():
    # Equal codewords must score equally wherever they sit: in different
    # panels, lanes, and the partial last panel.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(29, 300, generator=g)
    b = torch.randn(300, 70, generator=g)
    for col in (3, 17, 40, 69):
        b[:, col] = b[:, 0]
    out = matmul(a, b, torch.empty(29, 70))
    for col in (3, 17, 40, 69):
        assert torch.equal(out[:, col], out[:, 0])


def test_non_finite_values_stay_in_their_rows_and_columns():
    a = torch.randn(14, 20)
    b = torch.randn(20, 33)
    a[5, 7] = float("nan")
    b[3, 32] = float("inf")
    out = matmul(a, b, torch.empty(14, 33))
    assert out[5].isnan().all()
    finite = torch.ones(14, 33, dtype=torch.bool)
    finite[5] = False
    finite[:, 32] = False
    assert out[finite].isfinite().all()


def test_unsupported_arguments_are_refused():
    with pytest.raises(RuntimeError, match="expected a"):
        matmul(torch.randn(3, 4), torch.randn(5, 6), torch.empty(3, 6))
    with pytest.raises(RuntimeError, match="one dtype"):
        matmul(torch.randn(3, 4), torch.randn(4, 6).double(), torch.empty(3, 6))


def _run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # `python -c` puts its working folder first on the path: not the source
    # tree, whose srm_ext may lack the build under test.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(**env), cwd=cwd, timeout=300)


OPS_AGREE_WITH_REFERENCE = """
import torch, srm_ext
from srm_ext import reference, _backend
print(_backend.native_module.build_info()["float32_matmul"])
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 40, 5, 6, generator=g, requires_grad=True)
for C in (torch.randn(40, 90, generator=g), torch.randn(90, 40, generator=g).t()):
    C.requires_grad_(True)
    b = torch.tensor(0.1, requires_grad=True)
    outs = []
    for impl in (srm_ext, reference):
        loss = impl.reconstruction_loss(x, C, b, 7)
        grads = torch.autograd.grad(loss, (x, C, b))
        values, indices = impl.sparse_encode(x, C, b, 7)
        labels = impl.sparse_labels(values, indices, 90)
        student = impl.predictor_loss(x, C, b, *labels)
        outs.append((loss, *grads, values, indices, student,
                     *torch.autograd.grad(student, (x, C, b))))
    for mine, ref in zip(*outs):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
print("ok")
"""


def test_blas_products_serve_the_ops_when_asked(tmp_path):
    result = _run_python(OPS_AGREE_WITH_REFERENCE, tmp_path, SRM_EXT_CPU_GEMM="blas")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["blas", "ok"]


def test_an_unknown_product_kernel_is_refused_by_name(tmp_path):
    result = _run_python(
        "import torch, srm_ext\n"
        "srm_ext.sparse_encode(torch.randn(1, 4, 2, 2), torch.randn(4, 6), torch.zeros(()), 2)",
        tmp_path,
        SRM_EXT_CPU_GEMM="fast",
    )
    assert result.returncode != 0
    assert "SRM_EXT_CPU_GEMM must be 'auto' or 'blas', got 'fast'" in result.stderr
