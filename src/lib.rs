//! Warren: a Kubernetes operator for highly available RabbitMQ clusters.

pub mod api;
pub mod controller;
pub mod error;
pub mod kubectl;
pub mod leader;
pub mod metrics;
pub mod migrate;
pub mod rabbitmq;
pub mod render;
pub mod server;

/// Every CRD of the project as one YAML stream (what `warren crd` prints and crds/ holds).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let crds = [api::RabbitCluster::crd(), api::RabbitMigration::crd()];
    crds.iter().map(|crd| format!("---\n{}", serde_yaml::to_string(crd).unwrap_or_default())).collect()
}
