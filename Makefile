# make demo : set everything up on a fresh machine (venv, torch CPU, data) and run the main job.
# make test : same set-up, then the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORDNET := /usr/share/wordnet/data.noun
CLIPART := /usr/share/openclipart/png
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= runs/demo

.PHONY: setup data demo test bench lint clean

# Python writes the bytecode of what it imports (.pyc, in .venv and src/__pycache__): with
# PYTHONDONTWRITEBYTECODE set, as on our development machines, and uv installing without bytecode, every Python process
# (each test's subprocess, each torchrun rank) compiled torch's sources again: 10 s per import instead of 4 s.
export PYTHONDONTWRITEBYTECODE :=

setup: $(STAMP) data

# uv installs the same packages as pip in seconds instead of minutes (parallel downloads, no per-package
# resolver round trips). torch is pinned in the same command: on our machines 2.13.0 CPU comes from a local
# wheel in $(WHEELS) (uv does not read pip's find-links setting, hence the flag); a bare 'torch' would pull a
# CUDA build. Without uv (no PyPI), plain pip does the same, slower.
WHEELS := /opt/wheels
FIND_LINKS := $(shell [ -d $(WHEELS) ] && echo --find-links $(WHEELS))

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	if $(BIN)/pip install --quiet uv; then \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python $(FIND_LINKS) torch==2.13.0 -e '.[dev]'; \
	else \
	  $(BIN)/pip install --quiet torch==2.13.0 && $(BIN)/pip install --quiet -e '.[dev]'; \
	fi
	touch $(STAMP)

# Debian ships Fashion-MNIST, WordNet and the openclipart PNGs (suite 'clipart'); install them when missing and
# apt is there.
data:
	@if [ ! -f $(FASHION) ] || [ ! -f $(WORDNET) ] || [ ! -d $(CLIPART) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq dataset-fashion-mnist wordnet-base openclipart-png >/dev/null; \
	  else echo "Fashion-MNIST ($(FASHION)) or openclipart ($(CLIPART)) not found and no apt-get: pass --data-root DIR"; fi; \
	fi

demo: setup
	$(BIN)/oodforge demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_feature_cache.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
