# One-command set-up on a fresh machine. Both targets install into the active Python environment.
# torch is installed first and pinned (TORCH=...), so that no other requirement pulls a different build. On
# this project's CI machines torch==2.13.0 resolves to a local CPU wheel; on a GPU machine install the torch
# build for your CUDA first, then `pip install -e .`.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install install-dev train-tiny test

install:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e .

install-dev:
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

# The first run: offline, on a CPU, on the sample data that ships with the package.
train-tiny: install
	$(PYTHON) -m ptuning_pl.train experiment=adgen_tiny

test: install-dev
	$(PYTHON) -m pytest -q -p no:cacheprovider
