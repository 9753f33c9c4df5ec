# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= models.yaml

.PHONY: install run test unit integration lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Start Envoy, the control plane and the simulated backends in the foreground (Ctrl-C stops them).
run: $(STAMP)
	$(BIN)/python -m control_plane devstack --config $(CONFIG) \
	  $(if $(GATEWAY_PORT),--listen-port $(GATEWAY_PORT)) $(if $(ADMIN_PORT),--admin-port $(ADMIN_PORT)) \
	  $(if $(XDS_PORT),--xds-port $(XDS_PORT)) $(if $(ENVOY_ADMIN_PORT),--envoy-admin-port $(ENVOY_ADMIN_PORT))

## Lint, type-check and run the whole test suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit

integration: $(STAMP)
	$(BIN)/python -m pytest -m integration

## Benchmarks (not tests): figures for docs/benchmarks.md, bounded in time.
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench

lint: $(STAMP)
	$(BIN)/ruff check control_plane backends tests loadtest
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
