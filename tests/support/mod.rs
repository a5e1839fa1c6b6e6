//! Test doubles for tier 1: a scripted Kubernetes API server (tower-test) and a scripted RabbitMQ
//! management API (a real HTTP server on loopback).
#![allow(dead_code)]

pub mod amqp;
pub mod generations;
pub mod kube_mock;
pub mod management_fake;
pub mod memory;
pub mod rabbit_broker;
pub mod rabbit_nodes;
pub mod scaling;
pub mod tls;
pub mod wait;

use warren::api::RabbitCluster;

/// Reads a RabbitCluster fixture from tests/fixtures and gives it what the API server would.
pub fn fixture(name: &str) -> RabbitCluster {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cluster: RabbitCluster = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    cluster.metadata.namespace.get_or_insert_with(|| "default".into());
    cluster.metadata.uid = Some("6f1c1c1e-0000-4000-8000-000000000001".into());
    cluster.metadata.generation = Some(1);
    cluster
}
