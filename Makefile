# The commands README.md gives. Build caches live outside the clone (cargo's target dir, Go's build
# cache, the control plane's binaries keyed by version), so CI does not rebuild the world each run.
SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/warren
export WARREN_CACHE := $(CACHE_DIR)
export CARGO_TARGET_DIR ?= $(CACHE_DIR)/target
export GOCACHE ?= $(CACHE_DIR)/go-build
CARGO ?= cargo
WARREN := $(CARGO_TARGET_DIR)/debug/warren
include e2e/versions.env
HELM := $(CACHE_DIR)/bin/helm-$(HELM_VERSION)/helm

.PHONY: test unit e2e tier3 tier4 bench deps rootfs control-plane node node-parts build crds render fmt lint up down reset

## test: every tier: pure builders and mocked API server, real RabbitMQ nodes of three generations
## (tests/rabbitmq_*.rs, tests/migrate.rs), the real control plane, then a real node running
## RabbitMQ pods; the slow builds overlapped with the tests (e2e/test.sh says how).
test: deps
	CARGO="$(CARGO)" MAKE="$(MAKE)" e2e/test.sh

## unit: tiers 1 and 2 only.
unit: deps rootfs
	$(CARGO) fmt --all -- --check
	$(CARGO) test --locked --all-targets

## rootfs: a Debian rootfs with Debian's rabbitmq-server per RabbitMQ generation (e2e/versions.env),
## once per machine: the tier-2 nodes run them under chroot, the node's images are packed from them.
rootfs:
	e2e/rootfs.sh

## e2e: tests on a local control plane (etcd, kube-apiserver, kube-controller-manager built from
## their Go modules on first use), then on a local cluster with a real node (kubelet, kube-proxy,
## containerd, CoreDNS, Prometheus, images built here); each started for its run and removed after it.
e2e: tier3 tier4

## tier3: the chart and the GitHub workflows linted, then the control plane's tests (no node).
tier3: deps control-plane
	$(CACHE_DIR)/bin/actionlint-$(ACTIONLINT_VERSION)/actionlint .github/workflows/*.yaml
	$(HELM) lint --strict charts/warren
	$(HELM) lint --strict charts/warren --set 'watchNamespaces={apps,jobs}' --set metrics.serviceMonitor.enabled=true \
	  --set rabbitmqPodMonitor.enabled=true
	$(HELM) lint --strict charts/warren --set clusterWide=true --set rabbitmqPodMonitor.enabled=true
	e2e/with-control-plane.sh $(CARGO) test --locked --features e2e --test e2e

## tier4: a local cluster with a real node, and the node tests. Compiled first: that also builds the
## operator's binary the images pack (target/debug/warren), with the feature set tier 3 built it
## with, so it is not compiled a second time (a plain `cargo build` would be: another profile).
## On one cluster: the tests that drain nodes and power them off one at a time, then those that
## leave every node running (NODE_TESTS_BESIDE) side by side. Not the other way round: a drain
## waits for every pod on its node, the terminating ones of a namespace just deleted too.
NODE_TESTS_BESIDE := migration_job:: spread_on_node:: tls_on_node::
NODE_TEST := $(CARGO) test --locked --features e2e --test e2e_node --
## With WARREN_PROMETHEUS_BUILD (the pid of Prometheus' build, which make test runs beside it), the
## cluster starts without waiting for Prometheus (e2e/host.sh).
tier4: deps control-plane $(if $(WARREN_PROMETHEUS_BUILD),node-parts,node)
	$(CARGO) test --locked --features e2e --test e2e_node --no-run
	e2e/with-control-plane.sh --node bash -c '$(NODE_TEST) --test-threads=1 --nocapture $(addprefix --skip ,$(NODE_TESTS_BESIDE)) && \
	  $(NODE_TEST) --test-threads=3 --nocapture $(NODE_TESTS_BESIDE)'

## bench: prints figures: `warren migrate` vs the Shovel plugin and a PerfTest ceiling on the same
## brokers, the migrator's peak memory; the operator watching 200 then 1,000 RabbitClusters (time
## to apply, memory, CPU).
bench: deps rootfs control-plane
	e2e/perftest.sh > /dev/null
	$(CARGO) bench --locked --features benchmarks --bench migrate_vs_shovel
	e2e/with-control-plane.sh $(CARGO) bench --locked --features e2e --bench controller_scale

## deps: what the tests need from Debian besides Rust and Go (e2e/deps.sh installs what is missing).
deps:
	@e2e/deps.sh

control-plane:
	e2e/build.sh

## node: kube-scheduler, kubelet, kube-proxy (same module as the control plane), CoreDNS and
## Prometheus.
node: node-parts
	e2e/build.sh prometheus

node-parts:
	e2e/build.sh node coredns

build:
	$(CARGO) build --locked

## crds: regenerate crds/ and the chart's copy from the Rust types (a test fails when they are stale).
crds: build
	$(WARREN) crd > crds/warren.dev.yaml
	cp crds/warren.dev.yaml charts/warren/crds/warren.dev.yaml

## render: every object the operator makes for examples/basic.yaml.
render: build
	$(WARREN) render examples/basic.yaml

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --locked --workspace --all-targets --features e2e,benchmarks -- -D warnings

## up: a local cluster (control plane and a real node), the chart installed with the warren image
## built here, and examples/basic.yaml running as three RabbitMQ pods. `make down` stops it.
up: deps control-plane node build
	e2e/up.sh

down:
	e2e/down.sh

## reset: a fresh `make up` (new cluster state, volumes and RabbitMQ data; built parts reused).
reset: down up
