"""Backend selection: compiled ops where present, the reference otherwise."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import srm_ext
from srm_ext import _backend, reference

from conftest import requires_native_cpu


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 3, 3, generator=g).to(dtype),
        torch.randn(4, 8, generator=g).to(dtype),
        torch.zeros(1, dtype=dtype),
    )


def test_backend_info_reports_versions_and_backends():
    info = srm_ext.backend_info()
    assert info["torch"] == torch.__version__
    assert "cpu" in info and "cuda" in info
    if _backend.native_module is not None:
        assert info["cpu"]["torch_built_against"] == torch.__version__.split("+")[0]
        assert info["cpu"]["dtypes"] == ["float32", "float64"]
        assert info["cpu"]["compiler"]
    else:
        assert info["cpu"] is None and info["cpu_error"]


def test_a_module_never_built_is_reported_as_such_and_a_broken_one_with_its_error(monkeypatch):
    monkeypatch.setattr(_backend, "_load_errors", {})
    real_import = _backend.importlib.import_module

    def fake_import(name):
        if name == "srm_ext._C_cuda":
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        if name == "srm_ext._C":
            raise ImportError("undefined symbol: cublasGemmStridedBatchedEx")
        return real_import(name)

    monkeypatch.setattr(_backend.importlib, "import_module", fake_import)
    assert _backend._try_import("srm_ext._C_cuda") is None
    assert _backend._try_import("srm_ext._C") is None
    assert _backend._load_errors["srm_ext._C_cuda"].startswith("not built: the build found no CUDA")
    assert _backend._load_errors["srm_ext._C"] == "undefined symbol: cublasGemmStridedBatchedEx"


@requires_native_cpu
def test_compiled_ops_are_used_for_supported_dtypes(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    called = []
    real = torch.ops.srm_ext.reconstruction_loss
    monkeypatch.setattr(
        torch.ops.srm_ext, "reconstruction_loss", lambda *a: called.append(1) or real(*a)
    )
    srm_ext.reconstruction_loss(*inputs(), 2)
    assert called


def test_environment_variable_forces_the_reference(monkeypatch):
    monkeypatch.setenv("SRM_EXT_BACKEND", "reference")
    assert not _backend.use_native(torch.zeros(1))
    monkeypatch.setattr(torch.ops, "srm_ext", None)  # any compiled call would fail
    x, C, b = inputs()
    torch.testing.assert_close(
        srm_ext.reconstruction_loss(x, C, b, 2), reference.reconstruction_loss(x, C, b, 2)
    )


def test_unsupported_dtype_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    x, C, b = inputs(torch.bfloat16)
    with pytest.warns(UserWarning, match="using the PyTorch reference"):
        values, indices = srm_ext.sparse_encode(x, C, b, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        srm_ext.sparse_encode(x, C, b, 3)  # warned once already
    assert values.dtype == torch.bfloat16
    torch.testing.assert_close(indices, reference.sparse_encode(x, C, b, 3)[1])


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (["80", "90+PTX"], (8, 0), True),
        (["80", "90+PTX"], (8, 6), True),  # sm_80 machine code runs on any 8.x from 8.0
        (["80", "90+PTX"], (9, 0), True),
        (["80", "90+PTX"], (12, 0), True),  # through the PTX
        (["80", "90+PTX"], (7, 5), False),
        (["80", "90"], (10, 0), False),  # no PTX: no later GPU
        (["86"], (8, 0), False),  # machine code does not run on an earlier minor
        (["90a"], (9, 0), True),
        (["90a"], (10, 0), False),  # arch-specific code runs on its own GPU only
        (["75+PTX"], (8, 9), True),
        (["Hopper"], (7, 0), True),  # not understood: no fallback on a guess
        ([], (9, 0), False),
    ],
)
def test_cuda_architecture_compatibility(archs, capability, runs):
    assert _backend.archs_run_on(archs, capability) is runs


def test_gpu_the_kernels_were_not_built_for_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_cuda_runs_on", {})
    monkeypatch.setattr(
        _backend, "cuda_module", types.SimpleNamespace(build_info=lambda: {"cuda_archs": ["80", "90+PTX"]})
    )
    capability = {0: (7, 5), 1: (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    turing = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)
    with pytest.warns(UserWarning, match=r"compute capability 7\.5; rebuild with TORCH_CUDA_ARCH_LIST=7\.5"):
        assert not _backend.use_native(turing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _backend.use_native(turing)  # warned once already
        assert _backend.use_native(types.SimpleNamespace(device=torch.device("cuda", 1), dtype=torch.float16))


def test_sizes_beyond_the_cuda_kernels_fall_back_with_one_warning_per_size(monkeypatch):
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_cuda_runs_on", {0: True})
    monkeypatch.setattr(_backend, "cuda_module", types.SimpleNamespace())
    monkeypatch.setattr(_backend, "_cuda_code_limits", {"D": 4096, "K": 8192, "k": 128})
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_native(gpu, {"D": 4096, "K": 8192, "k": 128})  # the limits themselves
        assert _backend.use_native(gpu)  # ops without a sparse code have no limits
    with pytest.warns(UserWarning, match=r"take k <= 128, got k = 129; using the PyTorch reference"):
        assert not _backend.use_native(gpu, {"D": 64, "K": 300, "k": 129})
    with pytest.warns(UserWarning, match=r"take D <= 4096, got D = 4097"):
        assert not _backend.use_native(gpu, {"D": 4097, "K": 300, "k": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _backend.use_native(gpu, {"D": 64, "K": 300, "k": 200})  # k warned already
    cpu = torch.zeros(1)
    if _backend.native_module is not None:  # the CPU kernels take any size
        assert _backend.use_native(cpu, {"D": 5000, "K": 9000, "k": 200})


def test_package_imports_without_the_compiled_library(tmp_path):
    # Simulates a pure-Python install: the import must succeed and say why.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["srm_ext._C"] = None  # makes 'import srm_ext._C' fail
        import torch, srm_ext
        assert srm_ext.backend_info()["cpu"] is None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = srm_ext.reconstruction_loss(torch.randn(1, 2, 2, 2), torch.randn(2, 3), torch.zeros(1), 1)
        assert any("compiled cpu backend is not available" in str(w.message) for w in caught)
        print("ok", float(loss) >= 0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok True" in out.stdout


def test_fallback_warning_is_left_to_eager_calls_under_torch_compile(monkeypatch):
    # Dynamo cannot trace warnings.warn: a first call under
    # torch.compile(fullgraph=True) must trace, and an eager call still warns.
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    block = srm_ext.SparseRepresentation(4, 8, 2).bfloat16()
    x = inputs(torch.bfloat16)[0]
    torch._dynamo.reset()
    compiled = torch.compile(block.loss, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's own warnings, if any
        got = compiled(x)
    with pytest.warns(UserWarning, match="using the PyTorch reference"):
        want = block.loss(x)
    torch.testing.assert_close(got, want)


def test_the_fallback_warning_points_at_the_callers_line(monkeypatch):
    # Between the user's call and the warning lie srm_ext's functions and
    # modules and torch's Module.__call__: none of them is where to look.
    monkeypatch.delenv("SRM_EXT_BACKEND", raising=False)
    x, _, _ = inputs(torch.bfloat16)
    block = srm_ext.SparseRepresentation(x.shape[1], 8, 2).to(torch.bfloat16)
    for call in (lambda: srm_ext.sparse_encode(x, block.dictionary, block.intercept, 2), lambda: block(x)):
        monkeypatch.setattr(_backend, "_warned", set())
        with pytest.warns(UserWarning, match="using the PyTorch reference") as record:
            call()
        assert [(w.filename, w.lineno) for w in record] == [(__file__, call.__code__.co_firstlineno)]
