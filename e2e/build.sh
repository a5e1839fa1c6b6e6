#!/usr/bin/env bash
# Builds etcd, the Kubernetes control plane (kube-apiserver, kube-controller-manager), the node
# (kube-scheduler, kubelet, kube-proxy), CoreDNS and helm from their Go modules into a cache keyed by
# version, and fetches the Prometheus operator's CRDs from its module. Idempotent: a component whose
# binaries are already cached is not rebuilt.
# Usage: e2e/build.sh [etcd|kubernetes|node|coredns|prometheus|monitoring-crds|helm|actionlint]...
#        (default: etcd helm kubernetes monitoring-crds actionlint)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=e2e/versions.env
source "$here/versions.env"
cache=${WARREN_CACHE:-$HOME/.cache/warren}
# No DWARF from the compiler: the binaries are stripped (-s -w) anyway, and the packages compile
# in 15 % less time (helm from an empty cache: 102 s against 87 s).
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -gcflags=all=-dwarf=false"
export GOCACHE=${GOCACHE:-$cache/go-build}

log() { printf '[build %s] %s\n' "$(date +%T)" "$*" >&2; }

# module_build DIR MODULE@VERSION PACKAGE BINARY: in the consumer module DIR (a go.mod of its own,
# written here; a main.go if DIR has one), requires MODULE@VERSION and builds PACKAGE into BINARY.
module_build() {
  local dir=$1 module=$2 package=$3 binary=$4
  mkdir -p "$dir" "$(dirname "$binary")"
  printf 'module warren.dev/e2e/%s\n\ngo 1.24\n' "$(basename "$dir")" > "$dir/go.mod"
  (cd "$dir" && go get "$module" && go build -trimpath -ldflags "-s -w" -o "$binary.tmp" "$package" &&
    mv "$binary.tmp" "$binary")
}

build_etcd() {
  local out=$cache/bin/etcd-$ETCD_VERSION
  [[ -x $out/etcd ]] && return 0
  log "etcd $ETCD_VERSION"
  # server/v3's own go.mod has relative replaces, so `go install pkg@version` refuses it; as a
  # dependency of a consumer module those replaces are ignored.
  module_build "$cache/src/etcd-$ETCD_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" \
    go.etcd.io/etcd/server/v3 "$out/etcd"
}

# build_k8s_commands CMD...: builds the named k8s.io/kubernetes commands not yet in the cache.
build_k8s_commands() {
  local out=$cache/bin/kubernetes-$KUBERNETES_VERSION cmd missing=()
  for cmd in "$@"; do [[ -x $out/$cmd ]] || missing+=("$cmd"); done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  log "kubernetes $KUBERNETES_VERSION: ${missing[*]}"
  local mod=$cache/src/kubernetes-$KUBERNETES_VERSION
  mkdir -p "$mod" "$out"
  local staging=v0.${KUBERNETES_VERSION#v1.}
  local upstream_gomod
  upstream_gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [[ -f $upstream_gomod ]] || { log "no go.mod for k8s.io/kubernetes@$KUBERNETES_VERSION"; return 1; }
  # Every requirement at v0.0.0 is a staging module that upstream replaces with ./staging/...;
  # replaces only apply in the main module, so point each one at its published version.
  {
    echo "module warren.dev/e2e/kubernetes"
    echo
    sed -n 's/^go \(.*\)$/go \1/p' "$upstream_gomod" | head -1
    grep -E '^godebug ' "$upstream_gomod" || true
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "tool ("
    for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
      printf '\tk8s.io/kubernetes/cmd/%s\n' "$cmd"
    done
    echo ")"
    echo
    echo "replace ("
    awk '$2 == "v0.0.0" && $1 ~ /^k8s\.io\// { print $1 }' "$upstream_gomod" | sort -u |
      while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
    echo ")"
  } > "$mod/go.mod"
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean"
    ld+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$mod" && go mod tidy &&
    for cmd in "${missing[@]}"; do
      log "  $cmd"
      go build -trimpath -tags selinux,notest -ldflags "$ld" -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
      mv "$out/$cmd.tmp" "$out/$cmd"
    done)
}

build_kubernetes() { build_k8s_commands kube-apiserver kube-controller-manager; }
build_node() { build_k8s_commands kube-scheduler kubelet kube-proxy; }

# CoreDNS with the plugins e2e/node.sh's Corefile uses (bind, errors, kubernetes), CoreDNS' own way
# of choosing plugins at build time: a main that sets the directives and imports only those. The
# default build links every plugin, the cloud SDKs of route53, clouddns and azure among them: twice
# the packages to compile.
build_coredns() {
  local out=$cache/bin/coredns-$COREDNS_VERSION
  [[ -x $out/coredns ]] && return 0
  log "coredns $COREDNS_VERSION (bind errors kubernetes)"
  local mod=$cache/src/coredns-$COREDNS_VERSION
  mkdir -p "$mod"
  cat > "$mod/main.go" <<'MAIN'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func init() { dnsserver.Directives = []string{"bind", "errors", "kubernetes"} }

func main() { coremain.Run() }
MAIN
  module_build "$mod" "github.com/coredns/coredns@$COREDNS_VERSION" . "$out/coredns"
}

build_prometheus() {
  local out=$cache/bin/prometheus-$PROMETHEUS_VERSION
  [[ -x $out/prometheus ]] && return 0
  log "prometheus $PROMETHEUS_VERSION"
  mkdir -p "$out"
  # remove_all_sd drops every service discovery but static and file; enable_kubernetes_sd keeps
  # Kubernetes' (Prometheus' plugins/ build tags): a third of the build, none of the cloud SDKs.
  local minor=${PROMETHEUS_VERSION#v0.3} patch=${PROMETHEUS_VERSION##*.}
  minor=${minor%%.*}
  GOBIN=$out go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.$((10#$minor)).$patch" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
}

build_monitoring_crds() {
  local out=$cache/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crds
  [[ -f $out/monitoring.coreos.com_podmonitors.yaml ]] && return 0
  log "prometheus-operator $PROMETHEUS_OPERATOR_VERSION CRDs"
  local source
  source=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $source/example/prometheus-operator-crd ]] || { log "no CRDs in $source"; return 1; }
  mkdir -p "$out.tmp"
  cp "$source"/example/prometheus-operator-crd/monitoring.coreos.com_{servicemonitors,podmonitors}.yaml "$out.tmp/"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_helm() {
  local out=$cache/bin/helm-$HELM_VERSION
  [[ -x $out/helm ]] && return 0
  log "helm $HELM_VERSION"
  mkdir -p "$out"
  # Without these, `helm template` and `helm lint` assume Kubernetes 1.20: use the minor of the
  # client-go helm is built with, as helm's own Makefile does.
  local gomod minor ld
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  minor=$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$gomod")
  ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  GOBIN=$out go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# actionlint lints .github/workflows (run by tier 3; the workflows themselves run on GitHub).
build_actionlint() {
  local out=$cache/bin/actionlint-$ACTIONLINT_VERSION
  [[ -x $out/actionlint ]] && return 0
  log "actionlint $ACTIONLINT_VERSION"
  GOBIN=$out go install -trimpath -ldflags "-s -w" "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
}

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(etcd helm kubernetes monitoring-crds actionlint)
for c in "${components[@]}"; do
  start=$SECONDS
  "build_${c//-/_}"
  log "$c ready ($((SECONDS - start)) s)"
done
