# Two commands on a fresh machine with only python3 and pip:
#   make test   -- create .venv, install everything, lint, run the whole suite
#   make demo   -- create .venv if missing, run the main job end to end on a generated stack
# Both put the `fibseg` command in .venv/bin (`. .venv/bin/activate` to have it on PATH).
#   make install [PYTHON=...]  -- pip install the package and `fibseg` into that python
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_out
export PYTHONUNBUFFERED := 1

.PHONY: test lint demo bench install clean

$(VENV)/.installed: requirements.txt tests/requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r tests/requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fibseg_jax experiments tests
	$(VENV)/bin/ruff format --check fibseg_jax experiments tests

test: lint
	$(PY) -m pytest -q --durations=15 tests

demo: $(VENV)/.installed
	bash experiments/demo.sh $(DEMO_DIR)

install:
	$(PYTHON) -m pip install .

# make bench [BENCH_FLAGS=--quick]: bench/benchmark.json, bench/BENCHMARKS.md and a table.
bench: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0 monai==1.6.1 psutil
	$(VENV)/bin/fibseg bench --out=bench/ $(BENCH_FLAGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
