# The two commands a newcomer needs: `make run` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
export WANDB_MODE ?= offline

.PHONY: install run test test-slow bench clean

install: $(STAMP)

# Re-install only when the package metadata changes, so repeated `make test` stays fast.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/lightning-resode fit --config recipes/quickstart.yaml

# Test subprocesses (DDP workers, a SIGTERM'd run) share the cores with pytest; spinning OpenMP threads
# slow them tenfold on a 2-core machine, so the test targets make idle threads sleep. MKL_CBWR holds MKL to
# its AVX2 code path, so the fixtures the tests train are the same weights on AVX-512 and AVX2 CPUs.
test test-slow: export OMP_WAIT_POLICY ?= PASSIVE
test test-slow: export MKL_CBWR ?= AVX2

# Two worker processes of one thread each (tests/conftest.py sets a worker's threads): most of a test's time is
# Python (dispatch, the CPU profiler that measures peaks), which one process runs on one core. On 2 cores the
# suite took 10:51 in one process and 4:55 in two (measured 2026-12-07). `make test TEST_WORKERS=0` runs it in
# one process with torch's default threads.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS)

test-slow: install
	$(PY) -m pytest -m slow -q

bench: install
	$(PY) scripts/bench_engine.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
