#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc alone (no torch headers) for
# sm_80 and sm_90 (the default build) and sm_75 (the oldest target, without
# the tensor-core paths), with the half/bfloat16 restrictions torch extensions
# build under. Prints one line per file; exits non-zero if any file fails.
#
#   tools/check_cuda_compile.sh            # all files, NVCC / JOBS overridable
#
# It then compiles the torch glue (csrc/cuda/*.cpp) against torch's CUDA
# headers and links it with the kernels, so that glue that does not compile,
# or a kernel the glue calls but no .cu defines, shows here instead of at
# build or import time on a GPU machine. The headers come from
# TORCH_CUDA_INCLUDES (colon-separated include folders) or else from the torch
# that TORCH_PYTHON (default python3) imports: its CPU wheels ship ATen/cuda
# and c10/cuda, and tools/cuda_library_stubs stands in for the cuBLAS,
# cuSPARSE and cuSOLVER headers they name. Without either, only the kernels
# are checked.
set -u -o pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc_bin="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${nvcc_bin}" || ! -x "${nvcc_bin}" ]]; then
  echo "nvcc not found, skipping"
  exit 0
fi

jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

flags=(
  -std=c++17 -O3 --expt-relaxed-constexpr
  -gencode arch=compute_75,code=sm_75
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Xptxas -warn-spills
  -Xcompiler -Wall -Xcompiler -fPIC
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -I "${repo_root}/csrc/cuda"
)

shopt -s nullglob
sources=("${repo_root}"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "no CUDA sources under csrc/cuda"
  exit 1
fi

compile_one() {
  local src="$1" name log start status
  name="$(basename "${src}")"
  log="${work_dir}/${name}.log"
  start=${SECONDS}
  "${nvcc_bin}" "${flags[@]}" -c "${src}" -o "${work_dir}/${name}.o" \
    >"${log}" 2>&1
  status=$?
  if [[ ${status} -eq 0 ]]; then
    echo "ok    ${name} ($((SECONDS - start))s)" >"${log}.status"
  else
    echo "FAIL  ${name} ($((SECONDS - start))s)" >"${log}.status"
  fi
  return ${status}
}

pids=()
failed=0
for src in "${sources[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge ${jobs} ]]; do
    wait -n || true
  done
  compile_one "${src}" &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "${pid}" || failed=1
done

for src in "${sources[@]}"; do
  name="$(basename "${src}")"
  cat "${work_dir}/${name}.log.status"
  # Show diagnostics (errors, or warnings such as register spills).
  if [[ -s "${work_dir}/${name}.log" ]]; then
    sed 's/^/      /' "${work_dir}/${name}.log"
  fi
done

if [[ ${failed} -ne 0 ]]; then
  echo "CUDA compile check failed"
  exit 1
fi
echo "CUDA compile check passed (${#sources[@]} files)"

torch_python="${TORCH_PYTHON:-python3}"
if [[ -z "${TORCH_CUDA_INCLUDES:-}" ]]; then
  torch_include="$("${torch_python}" -c \
    'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' \
    2>/dev/null || true)"
  if [[ -n "${torch_include}" && -f "${torch_include}/ATen/cuda/CUDAContext.h" ]]; then
    TORCH_CUDA_INCLUDES="${torch_include}:${repo_root}/tools/cuda_library_stubs"
  else
    echo "no torch with CUDA headers for ${torch_python}: torch glue not checked"
  fi
fi

if [[ -n "${TORCH_CUDA_INCLUDES:-}" ]]; then
  cuda_include=""
  for root in "${CUDA_HOME:-}" "$(dirname "$(dirname "${nvcc_bin}")")" /usr/local/cuda; do
    if [[ -n "${root}" && -f "${root}/include/cuda.h" ]]; then
      cuda_include="${root}/include"
      break
    fi
  done
  includes=(-I "${repo_root}/csrc/cuda" ${cuda_include:+-I "${cuda_include}"})
  IFS=: read -r -a dirs <<<"${TORCH_CUDA_INCLUDES}"
  for dir in "${dirs[@]}"; do
    includes+=(-I "${dir}")
    [[ -d "${dir}/torch/csrc/api/include" ]] && includes+=(-I "${dir}/torch/csrc/api/include")
  done
  includes+=(-I "$("${torch_python}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
  for src in "${repo_root}"/csrc/cuda/*.cpp; do
    if ! "${CXX:-g++}" -std=c++20 -O0 -fPIC -Wall -c "${includes[@]}" \
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C_cuda \
        -DSRM_EXT_CUDA_ARCHS='"80;90"' "${src}" -o "${work_dir}/$(basename "${src}").o"; then
      echo "FAIL  $(basename "${src}") (torch glue)"
      exit 1
    fi
    echo "ok    $(basename "${src}") (torch glue)"
  done
  "${CXX:-g++}" -shared "${work_dir}"/*.o -o "${work_dir}/glue_and_kernels.so" || exit 1
  missing="$(nm -uC "${work_dir}/glue_and_kernels.so" | grep 'srm_cuda::' || true)"
  if [[ -n "${missing}" ]]; then
    echo "kernels the glue calls but no .cu defines:"
    echo "${missing}"
    exit 1
  fi
  echo "torch glue compiles and links with every kernel it calls"
fi
