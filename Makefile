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

.PHONY: test lint demo bench install clean system-deps

# What Qt needs to draw napari under Xvfb (tests/test_napari_widget.py). `make test`
# installs them with apt-get where it runs as root and they are missing; elsewhere the
# napari tests are skipped with one line naming this list.
XVFB_PACKAGES := xvfb xauth libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 \
  libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libegl1 libgl1-mesa-dri

$(VENV)/.installed: requirements.txt tests/requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r tests/requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fibseg_jax experiments tests
	$(VENV)/bin/ruff format --check fibseg_jax experiments tests

system-deps:
	@if dpkg -s $(XVFB_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the X server packages the napari tests need (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(XVFB_PACKAGES) >/dev/null) \
	  || echo "warning: apt-get failed; the napari tests will be skipped"; \
	else echo "note: not root: the napari tests need: apt-get install $(XVFB_PACKAGES)"; fi

# TEST_WORKERS: pytest-xdist workers, each running whole test files (module fixtures
# are built once). 2 halves the suite on 2 cores; 0 runs it in one process.
TEST_WORKERS ?= 2

test: lint system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

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
