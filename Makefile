# din-ray: `make demo` runs the whole pipeline on bundled data; `make test` runs the test suite.
# Both create .venv and install the CPU build of torch first (a bare `torch` requirement could
# pull a multi-GB CUDA build), then din-ray with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test wheel-check lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/din-ray demo --output $(OUT)

# The whole suite, Ray clusters, tuning searches and `ray job submit` included; --durations
# names the slow ones. Two pytest workers, each taking whole files (a module's Ray cluster
# fixture starts once per file): most of a Ray test's wall time is waiting on process starts,
# so two files at a time fill the two cores that one leaves half idle.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -ra --durations=10 -n $(TEST_WORKERS) --dist loadfile

# The built wheel in a fresh venv, run from outside the checkout (.ci/run runs it after test).
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel_check.sh

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
