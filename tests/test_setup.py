"""setup.py's search for the CUDA library headers that torch's CUDA headers
include, on folder layouts made here (no toolkit or GPU needed), and what a
source distribution holds."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tarfile
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


def test_the_sdist_holds_every_kernel_source_and_header(tmp_path):
    # Without MANIFEST.in an sdist held only the .cpp files setup.py names for
    # a CPU build: no header and no CUDA source, so it could not be built.
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "-d", str(tmp_path)],
        cwd=REPO, env={**os.environ, "SRM_EXT_NO_CUDA": "1"}, check=True, capture_output=True,
    )
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        held = {Path(*Path(name).parts[1:]).as_posix() for name in tar.getnames()}
    wanted = {
        path.relative_to(REPO).as_posix()
        for folder in ("csrc", "tools/cuda_emulator")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    wanted |= {"setup.py", "pyproject.toml", "README.md", "tests/conftest.py"}
    assert wanted <= held, sorted(wanted - held)
    assert not [name for name in held if name.endswith((".so", ".pyc"))]
