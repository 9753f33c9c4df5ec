# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= models.yaml

.PHONY: install run test unit integration lint bench loadtest loadtest-seeds compose-secrets clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# TGI's own client, for its compatibility test. Its metadata pins huggingface_hub < 1, which the
	@# dev extras' InferenceClient outgrew; the client itself runs with either, so it goes in without deps.
	$(BIN)/python -m pip install --quiet --no-deps 'text-generation==0.7.0'
	@touch $(STAMP)

install: $(STAMP)

## Start Envoy, the control plane and the simulated backends in the foreground (Ctrl-C stops them).
## Every port can be changed (0 = a free one): GATEWAY_PORT ADMIN_PORT XDS_PORT ENVOY_ADMIN_PORT
## PROMETHEUS_PORT ALERTMANAGER_PORT; SIM_PORTS=auto|+N moves the simulators; STATE_DIR=var.
## A second stack beside the first: make run FREE_PORTS=1 STATE_DIR=var2
run: $(STAMP)
	$(BIN)/python -m control_plane devstack --config $(CONFIG) \
	  $(if $(GATEWAY_PORT),--listen-port $(GATEWAY_PORT)) $(if $(ADMIN_PORT),--admin-port $(ADMIN_PORT)) \
	  $(if $(XDS_PORT),--xds-port $(XDS_PORT)) $(if $(ENVOY_ADMIN_PORT),--envoy-admin-port $(ENVOY_ADMIN_PORT)) \
	  $(if $(PROMETHEUS_PORT),--prometheus-port $(PROMETHEUS_PORT)) \
	  $(if $(ALERTMANAGER_PORT),--alertmanager-port $(ALERTMANAGER_PORT)) \
	  $(if $(SIM_PORTS),--sim-ports $(SIM_PORTS)) $(if $(STATE_DIR),--state-dir $(STATE_DIR)) \
	  $(if $(FREE_PORTS),--free-ports)

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

## docker-compose's secrets (xDS secret, admin token): random, 0600, created once, never committed.
compose-secrets:
	@umask 077; mkdir -p deploy/compose/secrets; \
	for name in xds-secret admin-token; do \
	  file=deploy/compose/secrets/$$name; \
	  if [ -s $$file ]; then echo "$$file exists (kept)"; \
	  else $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $$file && echo "wrote $$file"; fi; \
	done

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
