# Set-up and everyday commands. Every target that needs the package first
# makes a virtual environment in .venv (seeing any torch already installed,
# CPU or CUDA) and builds the extension into it.
#
#   make distill        the main job: the SRM story on an embedded dataset
#   make test           build, then run the test suite
#   make bench          kernel microbenchmarks (ARGS="--shapes imagenet ...")
#   make cuda-check     compile every CUDA kernel for sm_75, sm_80 and sm_90 with nvcc,
#                       and the torch glue against torch's CUDA headers

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Used only when no torch is installed: the CPU build, never the CUDA one.
# The CPU index is an extra index (a local wheel mirror may serve torch too);
# no retries, so an unreachable index is skipped at once rather than retried
# for every dependency.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export MAX_JOBS ?= 2

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/* csrc/cuda/*)
STAMP := $(VENV)/.srm_ext-installed

.PHONY: install test distill bench cuda-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install --retries 0 --timeout 10 "torch==$(TORCH_VERSION)" \
	    --extra-index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install setuptools wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	$(PY) -c "import srm_ext, json; print(json.dumps(srm_ext.backend_info(), indent=1))"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

distill: $(STAMP)
	$(PY) -m srm_ext distill $(ARGS)

bench: $(STAMP)
	$(PY) -m srm_ext bench $(ARGS)

# The torch glue is checked too where the venv's torch is installed.
cuda-check:
	TORCH_PYTHON="$(or $(wildcard $(PY)),$(PYTHON))" bash tools/check_cuda_compile.sh

clean:
	rm -rf build $(VENV) srm_ext/*.so *.egg-info
