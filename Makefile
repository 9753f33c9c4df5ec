# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= models.yaml

.PHONY: install run test unit integration lint bench loadtest loadtest-seeds clean

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

GATEWAY_URL = http://127.0.0.1:$(or $(GATEWAY_PORT),8080)

## Load tests with locust against a running `make run` (reports in loadtest/results/).
loadtest: $(STAMP)
	$(BIN)/locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s --stop-timeout 30 \
	  --host $(GATEWAY_URL) --csv loadtest/results/run --html loadtest/results/run.html

## The seeds' scenario: 50 users on two models, 128 new tokens, compared with the seeds' claims.
loadtest-seeds: $(STAMP)
	$(BIN)/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s --stop-timeout 30 --scenario seeds \
	  --host $(GATEWAY_URL) --csv loadtest/results/seeds --html loadtest/results/seeds.html

## Benchmarks (not tests): figures for docs/benchmarks.md, bounded in time.
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench

lint: $(STAMP)
	$(BIN)/ruff check control_plane backends tests loadtest
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
