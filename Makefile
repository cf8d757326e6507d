# megatron-rlp: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCHRUN := $(BIN)/torchrun --standalone
PYTEST_FLAGS ?= -q

.PHONY: install demo test test-unit test-distributed bench clean gpu-wheels gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python setup.py
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,convert]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m megatron_rlp.demo

test-unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_FLAGS) tests/unit tests/functional

# One torchrun launch per world size; each test picks its world size with a marker.
# Strict device mode: a tensor a CUDA run keeps on the host fails at NCCL collectives here too.
test-distributed: $(STAMP)
	MEGATRON_RLP_STRICT_DEVICE=1 $(TORCHRUN) --nproc_per_node 2 -m pytest $(PYTEST_FLAGS) tests/distributed
	MEGATRON_RLP_STRICT_DEVICE=1 $(TORCHRUN) --nproc_per_node 4 -m pytest $(PYTEST_FLAGS) tests/distributed

test: test-unit test-distributed

# GPU check kit (README "Checking a GPU machine").  gpu-wheels: here, with network, fill wheels/
# with the Python 3.12 wheels a bare torch + triton machine lacks.  gpu-check: there, offline;
# one JSON report to $(OUT) (or build/), exit 2 without CUDA.  Uses the machine's python, not .venv;
# GPU_CHECK_ARGS e.g. "--budget 540" (fit a time limit) or "--skip-bench".
WHEELS     ?= wheels
GPU_PYTHON ?= python3

gpu-wheels:
	$(PYTHON) tools/gpu_check.py --download-wheels $(WHEELS)

gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --wheels $(WHEELS) $(if $(OUT),--out $(OUT)) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) demo_out build *.egg-info
