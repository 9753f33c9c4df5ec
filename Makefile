# Two commands on a fresh machine: `make run` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= models.yaml

.PHONY: llamacpp-try install run test unit integration lint bench loadtest loadtest-seeds compose-secrets llamacpp clean

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
test: $(STAMP) lint llamacpp-try
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

## The llama.cpp extra (docs/lifecycle.md): the `gguf` package, and llama.cpp's `llama-server` (a real CPU
## engine for GGUF files) built once, statically, into $(VENV)/llama.cpp/bin, where the llamacpp launcher finds
## it. The source is the one llama-cpp-python's sdist vendors (a pinned, released llama.cpp). Needs cmake, a
## C++17 compiler; about 10 minutes on two cores.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_SERVER := $(VENV)/llama.cpp/bin/llama-server

## The llama.cpp engine for its tests in `make test` (built once, cached in the venv); a failed build only
## skips those tests, with the reason.
llamacpp-try:
	-@$(MAKE) --no-print-directory llamacpp || echo "llama.cpp's server did not build: its tests will be skipped"

llamacpp: $(LLAMA_SERVER)
	@$(BIN)/python -c 'import gguf' 2>/dev/null || $(BIN)/python -m pip install --quiet gguf

$(LLAMA_SERVER): | $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "building llama-server (llama-cpp-python $(LLAMA_CPP_PYTHON)'s llama.cpp) in $$tmp"; \
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: --dest "$$tmp" \
	  'llama-cpp-python==$(LLAMA_CPP_PYTHON)'; \
	tar -xzf "$$tmp"/llama_cpp_python-*.tar.gz -C "$$tmp"; \
	src=$$(echo "$$tmp"/llama_cpp_python-*/vendor/llama.cpp); \
	cmake -S "$$src" -B "$$tmp/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	  -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_SERVER=ON > "$$tmp/cmake.log" || { cat "$$tmp/cmake.log"; exit 1; }; \
	cmake --build "$$tmp/build" --target llama-server -j$$(nproc); \
	mkdir -p $(@D); cp "$$tmp/build/bin/llama-server" $@.tmp; mv $@.tmp $@; \
	echo "built $@"

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
