//! Tier 3: the operator against a real control plane (etcd, kube-apiserver and
//! kube-controller-manager built from their Go modules). Run through e2e/with-control-plane.sh:
//! `make test` does.

mod chart_monitors;
mod leader_election;
mod lifecycle;
mod migration;
mod namespaces;
mod schema;
mod steady_state;
