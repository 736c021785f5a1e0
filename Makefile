# din-ray: `make demo` runs the whole pipeline on bundled data; `make test` runs the test suite.
# Both create .venv and install the CPU build of torch first (a bare `torch` requirement could
# pull a multi-GB CUDA build), then din-ray with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test wheel-check lint clean

setup: $(VENV)/.installed

# --no-compile: pip byte-compiles every module of torch, Ray and pandas at install (96 s of the
# 138 s `make setup` took on 2 cores); Python compiles the few it imports on first use instead
# (measured: 42 s for the same install).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/din-ray demo --output $(OUT)

# The whole suite, Ray clusters, tuning searches and `ray job submit` included: about 10 min on
# 2 quiet cores (11 min for .ci/run with the install); --durations names the slow ones.
test: setup
	$(PY) -m pytest -q -ra --durations=10

# The built wheel in a fresh venv, run from outside the checkout (.ci/run runs it after test).
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel_check.sh

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
