//! NetworkPolicy of the RabbitMQ pods: the Erlang distribution ports reached by the cluster's own
//! pods only (anyone who reaches them with the cookie runs code on the node), the management API
//! by the operator's namespace and Warren's migration Jobs, every other port by anyone (AMQP,
//! AMQPS and whatever port a plugin the user enables listens on).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::services::{
    DISTRIBUTION_PORT, EPMD_PORT, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT, PROMETHEUS_PORT, PROMETHEUS_TLS_PORT,
};
use super::{INSTANCE_LABEL, MANAGED_BY_LABEL, NAME_LABEL, child_meta, selector_labels};
use crate::controller::validate::ValidatedCluster;

/// The label every namespace carries with its own name (Kubernetes sets it).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The cluster's NetworkPolicy, or none when `spec.networkPolicy.enabled` is off.
pub fn network_policy(cluster: &ValidatedCluster) -> Option<NetworkPolicy> {
    let spec = &cluster.network_policy;
    if !spec.enabled {
        return None;
    }
    let members = vec![pods(selector_labels(&cluster.name))];
    let mut fenced = vec![(vec![EPMD_PORT, DISTRIBUTION_PORT], Some(members))];

    let mut management = Vec::new();
    if let Some(namespace) = &cluster.operator_namespace {
        let selector = BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.clone())]);
        management.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector { match_labels: Some(selector), ..Default::default() }),
            ..Default::default()
        });
        management.push(pods(BTreeMap::from([
            (NAME_LABEL.to_string(), "warren-migrate".to_string()),
            (MANAGED_BY_LABEL.to_string(), "warren".to_string()),
        ])));
        management.extend(spec.management_from.iter().cloned());
        fenced.push((vec![MANAGEMENT_PORT, MANAGEMENT_TLS_PORT], Some(management)));
    }
    if !spec.metrics_from.is_empty() {
        fenced.push((vec![PROMETHEUS_PORT, PROMETHEUS_TLS_PORT], Some(spec.metrics_from.clone())));
    }

    let closed: Vec<i32> = fenced.iter().flat_map(|(ports, _)| ports.iter().copied()).collect();
    let mut ingress: Vec<NetworkPolicyIngressRule> = fenced
        .into_iter()
        .map(|(ports, from)| NetworkPolicyIngressRule {
            from,
            ports: Some(ports.into_iter().map(|p| port(p, None)).collect()),
        })
        .collect();
    ingress.push(NetworkPolicyIngressRule {
        from: None,
        ports: Some(open_ranges(&closed).into_iter().map(|(first, last)| port(first, Some(last))).collect()),
    });
    Some(NetworkPolicy {
        metadata: child_meta(cluster, &cluster.network_policy_name()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (NAME_LABEL.to_string(), "rabbitmq".to_string()),
                    (INSTANCE_LABEL.to_string(), cluster.name.clone()),
                ])),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    })
}

fn pods(labels: BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector { match_labels: Some(labels), ..Default::default() }),
        ..Default::default()
    }
}

fn port(port: i32, end: Option<i32>) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        end_port: end.filter(|end| *end != port),
    }
}

/// Every TCP port but `closed`, as inclusive ranges.
fn open_ranges(closed: &[i32]) -> Vec<(i32, i32)> {
    let mut closed = closed.to_vec();
    closed.sort_unstable();
    closed.dedup();
    let mut ranges = Vec::new();
    let mut first = 1;
    for port in closed {
        if port > first {
            ranges.push((first, port - 1));
        }
        first = port + 1;
    }
    if first <= 65535 {
        ranges.push((first, 65535));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_ranges_leave_out_exactly_the_fenced_ports() {
        let ranges = open_ranges(&[25672, 4369, 15672, 15671, 4369]);
        assert_eq!(ranges, [(1, 4368), (4370, 15670), (15673, 25671), (25673, 65535)]);
        let open = |p: i32| ranges.iter().any(|(a, b)| (*a..=*b).contains(&p));
        for p in [4369, 15671, 15672, 25672] {
            assert!(!open(p), "{p} open");
        }
        for p in [1, 5671, 5672, 15692, 1883, 5552, 65535] {
            assert!(open(p), "{p} closed");
        }
    }
}
