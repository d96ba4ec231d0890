# One-command set-up: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
CONFIG ?= configs/mnist.yaml
# Extra arguments for `make train`, e.g. TRAIN_ARGS=--overwrite to replace the last run's checkpoints.
TRAIN_ARGS ?=
# The CPU build of PyTorch, used only as a reference by tests and benchmarks.
TORCH  ?= torch==2.13.0

.PHONY: install dev train test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e '.[dev,images,plot,onnx,mpi]' '$(TORCH)'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

train: install
	$(VENV)/bin/fastcnn train $(CONFIG) $(TRAIN_ARGS)

test: dev
	$(PY) -m pytest -q

# ruff: lint and import order (configured in pyproject.toml).
lint: dev
	$(VENV)/bin/ruff check .

bench: dev
	$(VENV)/bin/fastcnn bench --compare torch

clean:
	rm -rf $(VENV) runs .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
