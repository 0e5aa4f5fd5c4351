#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc alone (no torch headers) for
# sm_80 and sm_90, with the half/bfloat16 restrictions torch extensions build
# under. Prints one line per file; exits non-zero if any file fails.
#
#   tools/check_cuda_compile.sh            # all files, NVCC / JOBS overridable
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
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Xptxas -warn-spills
  -Xcompiler -Wall
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
