#!/usr/bin/env bash
# `make test`: every tier, the slow builds overlapped with the tests. What tiers 3 and 4 need from
# Go modules builds in the background (niced) while the rootfs of each RabbitMQ generation is made
# and tiers 1 and 2 compile and run: on a fresh machine that overlap is most of the cold time
# saved. Tier 3 (a control plane on loopback, no node, no network namespace) runs as soon as its
# parts are built, beside tier 2; tier 4 (the node) runs after both, and Prometheus (only some
# node tests ask it, late in them) is built beside tier 4 rather than before it: on a cold run its
# build was the last thing tier 4 waited for, with the tests all done.
#
# Until tier 4 both cores are busy all the time (the tests, the builds), while tier 4 mostly waits
# (kubelets, drains, grace periods: 54 % of the CPU idle over `make tier4` alone, 80-90 % through
# its drains and machine loss). So the tier-2 binaries named in TIER2_BESIDE_NODE run beside tier 4
# instead of before it, niced: the node tests come first, they take what the node leaves (a cold
# run went from 65.7 to 51.2 min, docs/testing.md).
#
# Run by the Makefile, which exports WARREN_CACHE, CARGO_TARGET_DIR and GOCACHE; CARGO and MAKE
# name the tools it uses.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${WARREN_CACHE:?run through make test}"
CARGO=${CARGO:-cargo}
MAKE=${MAKE:-make}
logs=$WARREN_CACHE/logs
# Test targets (tests/NAME.rs) of tier 2 that run beside tier 4: real brokers in their own network
# namespaces (10.231.0.0/16; the node's are 10.244.0.0/16), none of them asserting on time.
TIER2_BESIDE_NODE=(migrate migrate_memory celery)

formatting() {
  "$CARGO" fmt --all -- --check
}

# Tier 3's parts, then tier 3 itself (in the background, its status in tier3.rc) as soon as they
# are built, then the node's parts for tier 4. Fails when a build does.
go_parts_and_tier3() {
  local plane built
  nice -n 19 e2e/build.sh etcd helm kubernetes monitoring-crds actionlint
  plane=$?
  if [ "$plane" = 0 ]; then
    { "$MAKE" --no-print-directory tier3 > "$logs/tier3.log" 2>&1; echo $? > "$logs/tier3.rc"; } &
  fi
  nice -n 19 e2e/build.sh node coredns
  built=$?
  wait
  [ "$plane" = 0 ] && return "$built"
  return "$plane"
}

# Tiers 1 and 2: compiled while the rootfs are made, run once both are there.
tiers_1_and_2() {
  local compiled made
  e2e/rootfs.sh > "$logs/rootfs.log" 2>&1 &
  local rootfs=$!
  "$CARGO" test --locked --all-targets --no-run
  compiled=$?
  wait "$rootfs"
  made=$?
  cat "$logs/rootfs.log"
  [ "$compiled" = 0 ] && [ "$made" = 0 ] || return 1
  # The lifecycle binary (a cluster per generation through every scenario, its three tests two at
  # a time: some 18 minutes alone, with 15-45 % of the CPU idle while its nodes wait on boots,
  # elections and partition detection) runs beside the other binaries, which run one after another.
  local lifecycle rest lifecycle_status targets=(--lib --bins --benches --examples) t
  "$CARGO" test --locked --test rabbitmq_lifecycle > "$logs/lifecycle.log" 2>&1 &
  lifecycle=$!
  # Every other test target (tests/NAME.rs) but those of TIER2_BESIDE_NODE.
  for t in tests/*.rs; do
    t=$(basename "$t" .rs)
    [[ " rabbitmq_lifecycle ${TIER2_BESIDE_NODE[*]} " == *" $t "* ]] || targets+=(--test "$t")
  done
  "$CARGO" test --locked "${targets[@]}"
  rest=$?
  wait "$lifecycle"
  lifecycle_status=$?
  echo "--- tier 2's lifecycle tests (ran beside the other tier-2 binaries) ---"
  cat "$logs/lifecycle.log"
  [ "$rest" = 0 ] && [ "$lifecycle_status" = 0 ]
}

# Tier 4, with Prometheus built beside it and the tier-2 binaries of TIER2_BESIDE_NODE run beside
# it (both niced: the cluster and the node tests come first); fails when any of the three does.
tier4() {
  local build status built beside tier2 targets=()
  nice -n 19 e2e/build.sh prometheus > "$logs/prometheus-build.log" 2>&1 &
  build=$!
  for t in "${TIER2_BESIDE_NODE[@]}"; do targets+=(--test "$t"); done
  nice -n 10 "$CARGO" test --locked "${targets[@]}" > "$logs/tier2-beside.log" 2>&1 &
  beside=$!
  WARREN_PROMETHEUS_BUILD=$build "$MAKE" --no-print-directory tier4
  status=$?
  wait "$build"
  built=$?
  grep -v '^go: ' "$logs/prometheus-build.log" || true
  wait "$beside"
  tier2=$?
  echo "--- tier 2's ${TIER2_BESIDE_NODE[*]} (ran beside tier 4) ---"
  cat "$logs/tier2-beside.log"
  [ "$status" = 0 ] && [ "$built" = 0 ] && [ "$tier2" = 0 ]
}

formatting || exit 1
mkdir -p "$logs"
rm -f "$logs/tier3.rc" "$logs/tier3.log" "$logs/lifecycle.log" "$logs/tier2-beside.log"
go_parts_and_tier3 > "$logs/go-build.log" 2>&1 &
go=$!
tiers_1_and_2
tests=$?
wait "$go"
built=$?
grep -v '^go: ' "$logs/go-build.log" || true
echo "--- tier 3 (ran beside tier 2) ---"
cat "$logs/tier3.log" 2>/dev/null || true
tier3=$(cat "$logs/tier3.rc" 2>/dev/null || echo 1)
[ "$tests" = 0 ] && [ "$built" = 0 ] && [ "$tier3" = 0 ] || exit 1
tier4
