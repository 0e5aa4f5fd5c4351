"""setup.py's search for the CUDA library headers that torch's CUDA headers
include, on folder layouts made here (no toolkit or GPU needed)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_script():
    # setup.py builds its extension list and calls setuptools.setup when run;
    # with setup replaced and the CUDA extension off (its construction reads
    # this machine's toolkit and sets TORCH_CUDA_ARCH_LIST), running it only
    # defines its functions.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **kwargs: None)
        patch.setenv("SRM_EXT_NO_CUDA", "1")
        return runpy.run_path(str(REPO / "setup.py"), run_name="srm_ext_setup")


def make_headers(folder: Path, names) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("")
    return folder


def test_full_toolkit_needs_no_wheel_headers(setup_script, tmp_path):
    toolkit = tmp_path / "cuda"
    make_headers(toolkit / "include", ("cuda_runtime_api.h", *setup_script["CUDA_LIBRARY_HEADERS"]))
    wheels = tmp_path / "site" / "nvidia"
    make_headers(wheels / "cu13" / "include", setup_script["CUDA_LIBRARY_HEADERS"])
    assert setup_script["cuda_library_include_dirs"](str(toolkit), [str(wheels)]) == []


def test_cuda13_wheel_supplies_what_the_toolkit_lacks(setup_script, tmp_path):
    toolkit = tmp_path / "cuda"
    make_headers(toolkit / "include", ("cuda_runtime_api.h",))
    wheels = tmp_path / "site" / "nvidia"
    cu13 = make_headers(wheels / "cu13" / "include", setup_script["CUDA_LIBRARY_HEADERS"])
    make_headers(wheels / "cudnn" / "include", ("cudnn.h",))
    assert setup_script["cuda_library_include_dirs"](str(toolkit), [str(wheels)]) == [str(cu13)]


def test_cuda12_wheels_one_folder_per_library(setup_script, tmp_path):
    toolkit = tmp_path / "cuda"
    make_headers(toolkit / "include", ("cuda_runtime_api.h", "cusolverDn.h"))
    wheels = tmp_path / "site" / "nvidia"
    cublas = make_headers(wheels / "cublas" / "include", ("cublas_v2.h", "cublasLt.h"))
    cusparse = make_headers(wheels / "cusparse" / "include", ("cusparse.h",))
    make_headers(wheels / "cusolver" / "include", ("cusolverDn.h",))  # the toolkit has it
    dirs = setup_script["cuda_library_include_dirs"](str(toolkit), [str(wheels)])
    assert dirs == [str(cublas), str(cusparse)]


def test_header_found_nowhere_names_it_and_the_way_out(setup_script, tmp_path):
    toolkit = tmp_path / "cuda"
    make_headers(toolkit / "include", ("cuda_runtime_api.h", "cublas_v2.h", "cublasLt.h"))
    wheels = tmp_path / "site" / "nvidia"
    make_headers(wheels / "cusparse" / "include", ("cusparse.h",))
    with pytest.raises(RuntimeError, match=r"include cusolverDn\.h, which neither .*SRM_EXT_NO_CUDA=1"):
        setup_script["cuda_library_include_dirs"](str(toolkit), [str(wheels)])


def test_cuda_home_without_the_runtime_headers_is_refused(setup_script, tmp_path):
    # nvcc reached through a wrapper in /usr/local/bin makes torch guess
    # CUDA_HOME=/usr/local, which holds no CUDA headers.
    not_a_toolkit = tmp_path / "usr" / "local"
    make_headers(not_a_toolkit / "include", ())
    with pytest.raises(RuntimeError, match=r"CUDA_HOME=.*has no include/cuda_runtime_api\.h.*SRM_EXT_NO_CUDA=1"):
        setup_script["cuda_library_include_dirs"](str(not_a_toolkit), [])
