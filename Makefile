# din-ray: `make demo` runs the whole pipeline on bundled data; `make test` runs the test suite.
# Both create .venv and install the CPU build of torch first (a bare `torch` requirement could
# pull a multi-GB CUDA build), then din-ray with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/din-ray demo --output $(OUT)

# `slow` tests start multi-process Ray clusters, tuning searches or `ray job submit`; they run
# separately (make test-slow) until each has been verified within CI's time budget.
test: setup
	$(PY) -m pytest -q -ra -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -ra -m slow

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
