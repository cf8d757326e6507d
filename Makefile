# megatron-rlp: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCHRUN := $(BIN)/torchrun --standalone
PYTEST_FLAGS ?= -q

.PHONY: install demo test test-unit test-distributed bench clean

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

clean:
	rm -rf $(VENV) demo_out build *.egg-info
