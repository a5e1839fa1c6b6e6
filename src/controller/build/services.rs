//! The headless Service (stable pod DNS for clustering) and the client Service.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec as K8sServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, selector_labels};
use crate::api::ServiceType;
use crate::api::TlsSpec;
use crate::controller::validate::ValidatedCluster;

pub const AMQP_PORT: i32 = 5672;
pub const AMQPS_PORT: i32 = 5671;
pub const MANAGEMENT_PORT: i32 = 15672;
pub const MANAGEMENT_TLS_PORT: i32 = 15671;
pub const PROMETHEUS_PORT: i32 = 15692;
/// The Prometheus endpoint over TLS (`spec.tls.prometheus`).
pub const PROMETHEUS_TLS_PORT: i32 = 15691;
pub const EPMD_PORT: i32 = 4369;
pub const DISTRIBUTION_PORT: i32 = 25672;

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port: number,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

/// The Prometheus endpoint's port, by name: plain, or over TLS with `spec.tls.prometheus`.
pub fn prometheus_port(cluster: &ValidatedCluster) -> (&'static str, i32) {
    if TlsSpec::prometheus_tls(cluster.tls.as_ref()) {
        ("prometheus-tls", PROMETHEUS_TLS_PORT)
    } else {
        ("prometheus", PROMETHEUS_PORT)
    }
}

/// Client-facing ports of a cluster (AMQPS and HTTPS only with TLS).
pub fn client_ports(cluster: &ValidatedCluster) -> Vec<(&'static str, i32)> {
    let mut ports = Vec::new();
    if !TlsSpec::tls_only(cluster.tls.as_ref()) {
        ports.extend([("amqp", AMQP_PORT), ("management", MANAGEMENT_PORT)]);
    }
    ports.push(prometheus_port(cluster));
    if cluster.tls.is_some() {
        ports.push(("amqps", AMQPS_PORT));
        ports.push(("management-tls", MANAGEMENT_TLS_PORT));
    }
    ports
}

/// Headless: gives each pod `<pod>.<name>-nodes.<ns>.svc` for Erlang distribution. Addresses are
/// published before readiness, since a booting node must reach its peers to become ready at all.
pub fn headless_service(cluster: &ValidatedCluster) -> Service {
    Service {
        metadata: child_meta(cluster, &cluster.headless_service_name()),
        spec: Some(K8sServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&cluster.name)),
            ports: Some(vec![
                port("epmd", EPMD_PORT),
                port("cluster-rpc", DISTRIBUTION_PORT),
                if TlsSpec::tls_only(cluster.tls.as_ref()) {
                    port("amqps", AMQPS_PORT)
                } else {
                    port("amqp", AMQP_PORT)
                },
                if TlsSpec::tls_only(cluster.tls.as_ref()) {
                    port("management-tls", MANAGEMENT_TLS_PORT)
                } else {
                    port("management", MANAGEMENT_PORT)
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service clients use: ready pods only.
pub fn client_service(cluster: &ValidatedCluster) -> Service {
    let mut metadata = child_meta(cluster, &cluster.client_service_name());
    if !cluster.service.annotations.is_empty() {
        metadata.annotations = Some(cluster.service.annotations.clone());
    }
    let type_ = match cluster.service.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata,
        spec: Some(K8sServiceSpec {
            type_: Some(type_.to_string()),
            selector: Some(selector_labels(&cluster.name)),
            ports: Some(client_ports(cluster).into_iter().map(|(name, number)| port(name, number)).collect()),
            ..Default::default()
        }),
        ..Default::default()
    }
}
