# The commands README.md gives. Build caches live outside the clone, keyed by nothing but the
# toolchain (cargo tracks the rest), so CI does not rebuild the world each run.
SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/warren
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target
CARGO ?= cargo
WARREN := $(CARGO_TARGET_DIR)/debug/warren

.PHONY: test build crds render fmt lint up

## test: every test tier that exists today (pure builders, mocked API server, CRD freshness).
test:
	$(CARGO) fmt --all -- --check
	$(CARGO) test --locked --all-targets

build:
	$(CARGO) build --locked

## crds: regenerate crds/ from the Rust types (a test fails when they are stale).
crds: build
	$(WARREN) crd > crds/warren.dev.yaml

## render: every object the operator makes for examples/basic.yaml.
render: build
	$(WARREN) render examples/basic.yaml

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --locked --all-targets -- -D warnings

## up: builds the operator and shows what it would create for the basic example. The local
## control plane it will run against is built by e2e/ (see README, "Status").
up: build
	@$(WARREN) render examples/basic.yaml > $(CACHE_DIR)/demo-objects.yaml
	@echo "warren built: $(WARREN)"
	@echo "objects for examples/basic.yaml: $(CACHE_DIR)/demo-objects.yaml ($$(grep -c '^kind:' $(CACHE_DIR)/demo-objects.yaml) objects)"
	@echo "run it against a cluster:  kubectl apply -f crds/ && $(WARREN) run"
