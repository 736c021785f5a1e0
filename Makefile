# din-ray: `make demo` runs the whole pipeline on bundled data; `make test` runs the test suite.
# Both create .venv and install the CPU build of torch first (a bare `torch` requirement could
# pull a multi-GB CUDA build), then din-ray with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test wheel-check lint clean

setup: $(VENV)/.installed

# pip byte-compiles every installed module of torch, Ray and pandas on one core (96 s of the
# 138 s `make setup` took here); installed with --no-compile and compiled afterwards on every
# core, the same install took 95 s. The .pyc files must exist: where PYTHONDONTWRITEBYTECODE is
# set (it is on the machine this was measured on) Python never writes them, and each Ray
# process then compiles Ray from source again (`import ray.train.torch` 8-10 s instead of 4 s).
# compileall's status is not checked: a few third-party files (old test fixtures) do not
# compile, and pip skips them the same way.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e ".[test]"
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $@

demo: setup
	$(VENV)/bin/din-ray demo --output $(OUT)

# The whole suite, Ray clusters, tuning searches and `ray job submit` included; --durations
# names the slow ones. Two pytest-xdist workers, each taking whole files (a file's tests share
# its Ray cluster): the serial suite leaves a third of the two cores idle while Ray processes
# start, and took 748 s against 635 s on two workers (session 9, one after the other).
# din_ray is compiled first for the same reason as the venv: the suite starts dozens of Python
# processes (Ray workers, CLI runs), each of which imports din_ray (measured: ~1 s more per
# process from source). TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m compileall -q din_ray > /dev/null
	$(PY) -m pytest -q -ra --durations=10 -n $(TEST_WORKERS) --dist loadfile

# The built wheel in a fresh venv, run from outside the checkout (.ci/run runs it after test).
wheel-check:
	PYTHON=$(PYTHON) .ci/wheel_check.sh

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
