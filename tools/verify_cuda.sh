#!/usr/bin/env bash
# Verifies the CUDA backend on a machine with a GPU, CUDA torch and nvcc, and
# collects everything a reviewer needs in one folder: the environment, the
# build log, the CUDA test results, compute-sanitizer reports and the GPU
# benchmarks (JSON, markdown, PNG).
#
#   tools/verify_cuda.sh OUT_DIR [STAGE...]
#
# Stages, run in the order given (default: all of them):
#   env       GPU, driver, CUDA, torch and compiler versions, the commit
#   build     build both extensions in place (TORCH_CUDA_ARCH_LIST honoured)
#   test      the test suite with its CUDA cases, but for the emulated kernel
#             suites, which CI runs (TEST_ARGS replaces the pytest arguments)
#   sanitize  compute-sanitizer memcheck over the CUDA op tests
#   racecheck compute-sanitizer racecheck over a smaller selection of them
#   profile   each kernel's device time in the stage-1 step, the labels and
#             the student loss at the ImageNet shapes (float32), and the
#             stage-1 step at two other encode box sizes
#   bench     ImageNet (N=256) and CIFAR (N=128) shapes, float32 and bfloat16
#             (BENCH_SHAPES, BENCH_DTYPES below)
#   paths     the encode and the stage-1 step at the ImageNet shapes in
#             float32 under each SRM_EXT_CUDA_ENCODE path (gemm, screened,
#             fused), with the dense GEMM their floors compare with, and each
#             kernel's device time in the screened step
#
# Each stage writes <stage>.log; a failing stage is reported and the next one
# still runs. The exit status is non-zero if any stage failed. Every stage but
# env and build first checks that the CUDA backend is built and a GPU seen,
# so that none passes by skipping its tests or timing the reference.
# VERIFY_ARCHIVE=FILE.tgz packs OUT_DIR into FILE after every stage (one file
# to bring back; a stage cut short keeps what the earlier ones wrote).
# SRM_EXT_COMMIT names the commit where the tree has no git metadata.
# BENCH_DTYPES picks the benchmark dtypes (default "float32 bfloat16") and
# BENCH_SHAPES the shape sets (default "imagenet cifar"), so a long benchmark
# can be split over several calls (each run compiles the reference for every
# shape, op and mode: minutes on a GPU); BENCH_ARGS adds flags to every
# benchmark run (e.g. "--ops stage1_step"). BENCH_TIMEOUT (seconds) stops
# each benchmark run there: it keeps the cases it timed (JSON and markdown
# marked incomplete) and the stage ends in time to be archived.
# STAGE_TIMEOUT (seconds) stops each test, sanitizer and profile run there
# (and each benchmark run, where BENCH_TIMEOUT is not given), so that a hung
# kernel cannot take the rest of the call; TEST_TIMEOUT (default 300) ends a
# single test of the test stage that runs longer (pytest-timeout, where
# installed).
set -u -o pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)" && [[ -n "${out}" ]] || {
  echo "cannot create the output folder '$1'" >&2
  exit 2
}
shift
# Named relative to the caller's folder, as OUT_DIR is, before the cd below.
archive=""
if [[ -n "${VERIFY_ARCHIVE:-}" ]]; then
  archive="$(realpath -m "${VERIFY_ARCHIVE}")"
fi
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(env build test sanitize racecheck profile bench paths)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"
python="${PYTHON:-python3}"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
# cuBLAS needs a fixed workspace for the deterministic-mode tests.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

stage_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "nvcc: $(command -v nvcc)"
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null || echo "commit: ${SRM_EXT_COMMIT:-unknown (no git metadata)}"
  "${python}" - <<'EOF'
import platform, torch
from torch.utils import cpp_extension
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("CUDA_HOME as the build finds it:", cpp_extension.CUDA_HOME)
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
      f"capability {p.major}.{p.minor}")
EOF
}

# The built libraries are copied to OUT_DIR/lib too, without their debug
# information (a tenth of the size): put back into srm_ext/ on another machine
# with the same torch, they spare the next run the build.
stage_build() {
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${python}" setup.py build_ext --inplace &&
    "${python}" -c "import json, srm_ext; print(json.dumps(srm_ext.backend_info(), indent=1))" &&
    check_errors_raise &&
    mkdir -p "${out}/lib" && cp srm_ext/_C*.so "${out}/lib/" &&
    strip --strip-debug "${out}"/lib/_C*.so
}

# The GPU stages need the compiled CUDA backend and a GPU: without them the
# tests would skip and the benchmarks time the reference, and pass.
require_cuda() {
  "${python}" - <<'EOF'
import sys, torch
from srm_ext import _backend
if _backend.cuda_module is None or not torch.cuda.is_available():
    sys.exit(f"the compiled CUDA backend is not usable here (run the build stage first): "
             f"{_backend.backend_info()}")
EOF
}

# A failed argument check must come back to Python as an error. Built by a
# compiler wrapper that links its own copy of libstdc++, the extension crashes
# formatting the message instead (every bad input would then kill the process).
check_errors_raise() {
  local device
  for device in cpu cuda; do
    if ! "${python}" - "${device}" <<'EOF'
import sys, torch, srm_ext
device = sys.argv[1]
x, C, b = (torch.zeros(*s, device=device) for s in ((1, 2, 1, 1), (2, 3), (1,)))
try:
    torch.ops.srm_ext.sparse_encode(x, C, b, 0)
except NotImplementedError as e:  # no kernel registered for the device
    sys.exit(f"{device}: no srm_ext kernel: {str(e).splitlines()[0]}")
except RuntimeError as e:
    print(f"{device}: bad k raises: {str(e).splitlines()[0]}")
    sys.exit(0)
sys.exit(f"{device}: k = 0 was not refused")
EOF
    then
      echo "a failed argument check on ${device} did not raise (exit status above);" \
        "if it crashed, rebuild with CXX and CC naming the system compiler" \
        "(e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc), not a wrapper (now: ${CXX:-c++})"
      return 1
    fi
  done
}

# A command stopped by SIGTERM at STAGE_TIMEOUT seconds, when that is set.
limited() {
  ${STAGE_TIMEOUT:+timeout -k 30 ${STAGE_TIMEOUT}} "$@"
}

# The whole suite: with a GPU present its CUDA cases run too (kernels,
# autocast, the distiller and the CLI on CUDA; NCCL where there are two GPUs).
# The emulated kernel suites are left out: they run the same on any CPU (CI
# runs them) and take about two thirds of the suite's time. TEST_ARGS
# replaces the pytest arguments (e.g. "tests" for everything).
stage_test() {
  require_cuda || return 1
  limited "${python}" -m pytest -q -p no:cacheprovider -rs --junitxml="${out}/pytest.xml" \
    -o timeout="${TEST_TIMEOUT:-300}" --durations=15 \
    ${TEST_ARGS:---ignore=tests/test_cuda_emulated.py --ignore=tests/test_cuda_glue_emulated.py tests}
}

# Small shapes keep the instrumented runs short; every kernel still runs in
# every dtype, with tails, channels_last and the deterministic variants.
# Without torch's caching allocator every tensor is its own allocation, so
# memcheck sees an access past a tensor's end instead of landing in a pooled
# block. A test failure does not stop the run (no -x): every kernel gets
# instrumented, and exit code 99 tells a sanitizer error from a test failure.
run_sanitizer() {
  local tool="$1" selection="$2" code
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer is not on PATH (it ships with the CUDA toolkit, in its bin folder)"
    return 1
  fi
  echo "== ${tool}: -k ${selection}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 limited compute-sanitizer --tool "${tool}" \
    --error-exitcode 99 --print-limit 20 \
    "${python}" -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py -k "${selection}"
  code=$?
  case ${code} in
    0) return 0 ;;
    99) echo "${tool}: sanitizer errors (above)" ;;
    *) echo "${tool}: tests failed under the sanitizer (exit ${code})" ;;
  esac
  return 1
}

# SANITIZE_TOOLS picks the tools (default memcheck; initcheck and synccheck
# also work) and SANITIZE_K the tests (a pytest -k expression; test ids name
# dtypes and shapes, e.g. float32, 2x8x5x7x20x4). Memcheck takes a few
# minutes over the default selection.
stage_sanitize() {
  local status=0 tool
  require_cuda || return 1
  for tool in ${SANITIZE_TOOLS:-memcheck}; do
    run_sanitizer "${tool}" "${SANITIZE_K:-not 2_31 and not opcheck}" || status=1
  done
  return ${status}
}

# Racecheck took about 4 s per test on an H100, so it runs over the tests of
# the contiguous layout in float32 at four shapes (tails, k = 64, k > 64 and
# the largest k) and in bfloat16 at the one with k > 64: about 90 tests.
# ("float16" alone would also match every bfloat16 id.) RACECHECK_K replaces
# the selection.
racecheck_default="not 2_31 and not opcheck and not channels_last and not strided"
racecheck_default+=" and not (float16 and not bfloat16) and not (bfloat16 and not 2x32x3x4)"
racecheck_default+=" and not 1x4096 and not 2x256x7 and not 2x64x13 and not 3x17x7"
racecheck_default+=" and not 1x3x1 and not 2x4x3x3"
# Tests of large sizes that no id above names (tens of thousands of pixels).
racecheck_default+=" and not holds_one_box and not rebuilds_its_residual"
racecheck_default+=" and not beyond_the_sparse_kernel_limits"
stage_racecheck() {
  require_cuda || return 1
  run_sanitizer racecheck "${RACECHECK_K:-${racecheck_default}}"
}

stage_profile() {
  local status=0 box
  require_cuda || return 1
  limited "${python}" benchmarks/profile_ops.py --device cuda --shapes imagenet \
    --ops stage1_step,sparse_labels,predictor_loss --out "${out}" || status=1
  # The GEMM encode's box of pixels (2^23 pre-activations by default): a
  # smaller box stays in L2 between the GEMM and the selection, at the cost
  # of more launches. The override sets the backward's boxes too.
  for box in 2097152 33554432; do
    SRM_EXT_CUDA_BOX_VALUES="${box}" limited "${python}" benchmarks/profile_ops.py \
      --device cuda --shapes imagenet --ops stage1_step \
      --name "profile-imagenet-cuda-float32-box${box}" --out "${out}" || status=1
  done
  return ${status}
}

# One benchmark run, ended at BENCH_TIMEOUT (else STAGE_TIMEOUT) by SIGTERM
# (SIGINT would be ignored by a script started in the background); the run
# has written its JSON and markdown after every case.
bench_run() {
  STAGE_TIMEOUT="${BENCH_TIMEOUT:-${STAGE_TIMEOUT:-}}" limited "${python}" benchmarks/bench_ops.py "$@"
}

stage_bench() {
  local status=0 dtype shapes
  require_cuda || return 1
  for dtype in ${BENCH_DTYPES:-float32 bfloat16}; do
    for shapes in ${BENCH_SHAPES:-imagenet cifar}; do
      case ${shapes} in
        imagenet) bench_run --device cuda --dtype "${dtype}" --shapes imagenet --out "${out}" \
                    ${BENCH_ARGS:-} || status=1 ;;
        cifar) bench_run --device cuda --dtype "${dtype}" --shapes cifar --batch 128 \
                 --name "cifar-n128-cuda-${dtype}" --out "${out}" ${BENCH_ARGS:-} || status=1 ;;
        *) echo "BENCH_SHAPES: unknown shape set '${shapes}' (imagenet, cifar)"; status=1 ;;
      esac
    done
  done
  return ${status}
}

stage_paths() {
  local status=0 path
  require_cuda || return 1
  for path in gemm screened fused; do
    SRM_EXT_CUDA_ENCODE="${path}" bench_run --device cuda \
      --dtype float32 --shapes imagenet --ops sparse_encode,stage1_step,dense_gemm \
      --implementations native,research \
      --name "imagenet-cuda-float32-encode-${path}" --out "${out}" ${BENCH_ARGS:-} || status=1
  done
  SRM_EXT_CUDA_ENCODE=screened limited "${python}" benchmarks/profile_ops.py --device cuda \
    --shapes imagenet --ops stage1_step --name "profile-imagenet-cuda-float32-screened" \
    --out "${out}" || status=1
  return ${status}
}

for stage in "${stages[@]}"; do
  if ! declare -F "stage_${stage}" >/dev/null; then
    echo "unknown stage '${stage}' (choose from env build test sanitize racecheck profile bench paths)" >&2
    exit 2
  fi
done

failed=()
for stage in "${stages[@]}"; do
  echo "== ${stage}"
  start=${SECONDS}
  if "stage_${stage}" >"${out}/${stage}.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); last lines of ${stage}.log:"
    tail -n 30 "${out}/${stage}.log" | sed 's/^/   /'
    failed+=("${stage}")
  fi
  if [[ -n "${archive}" ]] &&
    ! tar -czf "${archive}" -C "$(dirname "${out}")" "$(basename "${out}")"; then
    echo "   could not pack ${out} into ${archive}"
    failed+=("archive after ${stage}")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
