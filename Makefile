# Two entry points: `make demo` (the main job) and `make test`; `make bench` times the op.
# Both create .venv with the pinned CPU build of PyTorch on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a local CPU wheel here; an unpinned torch pulls several GB of CUDA.
# triton 3.6.0 is what the GPU machines run; here its interpreter tests the GPU kernels.
TORCH_PIN ?= torch==2.13.0 triton==3.6.0

.PHONY: install peers demo bench test test-fast lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m msdeformattn demo --output demo_output

# The C++/OpenMP CPU peer ships no wheel: build it against the venv's torch
# (needs a C++ compiler); without it the benchmark leaves that peer out.
peers: install
	$(PY) -m pip install -q -U 'setuptools>=77' wheel 'packaging>=24.2'
	$(PY) -m pip install -q --no-build-isolation torch-ms-deform-attn==0.1.1 \
		|| echo "torch-ms-deform-attn not built: the benchmark leaves it out"

bench: peers
	$(PY) -m msdeformattn.bench
	$(PY) -m msdeformattn.bench --rtdetr

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# Every Triton specialisation compiled for sm_80/sm_90/sm_100 (no GPU needed): the table.
.PHONY: gpu-compile
gpu-compile: install
	PYTHON=$(PY) bash scripts/gpu_compile.sh

test: lint
	$(PY) -m pytest -q

# Skips the tests marked slow (see pyproject.toml); CI runs `make test`.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
