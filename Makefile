# The two set-up commands of the README: `make run` and `make test`. Both create .venv and
# install the project on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench gpu-wheels

$(STAMP): pyproject.toml requirements-dev.txt docker/control-plane-requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	BIN=$(BIN) scripts/run-example.sh examples/digits-adahessian.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_cost.py

# The wheels scripts/gpu-check installs on a lent GPU machine (scripts/README.md): carry the folder.
gpu-wheels: $(STAMP)
	BIN=$(BIN) scripts/gpu-wheels .gpu-wheels
