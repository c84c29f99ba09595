# vlmtune: every target works from a fresh clone with only Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlmtune-installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(PY) -m vlmtune.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout 1200

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" --timeout 600

lint: setup
	$(VENV)/bin/ruff check vlmtune data_tools benchmarks tests

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .cache
