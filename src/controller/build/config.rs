//! The ConfigMap: rabbitmq.conf, enabled_plugins, advanced.config and the node scripts.

use std::collections::BTreeMap;
use std::fmt::Write;

use k8s_openapi::api::core::v1::ConfigMap;
use sha2::{Digest, Sha256};

use super::child_meta;
use super::services::{
    AMQP_PORT, AMQPS_PORT, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT, PROMETHEUS_PORT, PROMETHEUS_TLS_PORT,
};
use crate::api::TlsSpec;
use crate::controller::validate::ValidatedCluster;

pub const BOOTSTRAP_SCRIPT: &str = include_str!("scripts/bootstrap.sh");
pub const PRE_STOP_SCRIPT: &str = include_str!("scripts/pre-stop.sh");
pub const READINESS_SCRIPT: &str = include_str!("scripts/ready.sh");

/// ConfigMap keys.
pub const OPERATOR_CONF_KEY: &str = "10-operator.conf";
pub const ADDITIONAL_CONF_KEY: &str = "90-additional.conf";
pub const ENABLED_PLUGINS_KEY: &str = "enabled_plugins";
pub const ADVANCED_CONFIG_KEY: &str = "advanced.config";
/// The replica count, read by the scripts. Kept out of the pod template (and out of the config
/// hash), so scaling does not restart every node.
pub const REPLICAS_KEY: &str = "replicas";
/// `true` once the cluster has formed: node 0 without data then waits for a member to join.
pub const FORMED_KEY: &str = "formed";

/// Where the pods mount the TLS Secrets.
pub const TLS_DIR: &str = "/etc/warren/tls";
pub const TLS_CA_DIR: &str = "/etc/warren/tls-ca";

/// The operator's rabbitmq.conf fragment (conf.d/10-operator.conf).
pub fn rabbitmq_conf(cluster: &ValidatedCluster) -> String {
    let mut conf = String::from("# Written by Warren from the RabbitCluster spec; do not edit.\n");
    let mut line = |text: String| {
        conf.push_str(&text);
        conf.push('\n');
    };
    line(format!("cluster_name = {}", cluster.name));
    // pause_minority by default: a partition must never leave two halves that both accept writes.
    line(format!("cluster_partition_handling = {}", cluster.partition_handling.as_config_value()));
    if TlsSpec::tls_only(cluster.tls.as_ref()) {
        // The management plugin opens no plain listener when only its TLS one is configured.
        line("listeners.tcp = none".into());
    } else {
        line(format!("listeners.tcp.default = {AMQP_PORT}"));
        line(format!("management.tcp.port = {MANAGEMENT_PORT}"));
    }
    line(format!("prometheus.tcp.port = {PROMETHEUS_PORT}"));
    if TlsSpec::prometheus_tls(cluster.tls.as_ref()) {
        // The plugin keeps its plain listener whatever TLS one is configured (its default
        // tcp_config is port 15692, not empty): bound to the loopback, no one outside reaches it.
        line("prometheus.tcp.ip = 127.0.0.1".into());
    }
    line("log.console = true".into());
    line("log.console.level = info".into());
    line("log.file = false".into());
    if let Some(bytes) = cluster.memory_watermark_bytes {
        // RabbitMQ sees the host's memory, not the container limit: set the watermark from the limit.
        line(format!("vm_memory_high_watermark.absolute = {bytes}"));
    }
    if cluster.tls.is_some() {
        line(format!("listeners.ssl.default = {AMQPS_PORT}"));
        line(format!("ssl_options.cacertfile = {TLS_CA_DIR}/ca.crt"));
        line(format!("ssl_options.certfile = {TLS_DIR}/tls.crt"));
        line(format!("ssl_options.keyfile = {TLS_DIR}/tls.key"));
        line("ssl_options.verify = verify_peer".into());
        line("ssl_options.fail_if_no_peer_cert = false".into());
        line(format!("management.ssl.port = {MANAGEMENT_TLS_PORT}"));
        line(format!("management.ssl.cacertfile = {TLS_CA_DIR}/ca.crt"));
        line(format!("management.ssl.certfile = {TLS_DIR}/tls.crt"));
        line(format!("management.ssl.keyfile = {TLS_DIR}/tls.key"));
    }
    if TlsSpec::prometheus_tls(cluster.tls.as_ref()) {
        line(format!("prometheus.ssl.port = {PROMETHEUS_TLS_PORT}"));
        line(format!("prometheus.ssl.cacertfile = {TLS_CA_DIR}/ca.crt"));
        line(format!("prometheus.ssl.certfile = {TLS_DIR}/tls.crt"));
        line(format!("prometheus.ssl.keyfile = {TLS_DIR}/tls.key"));
    }
    conf
}

fn enabled_plugins(cluster: &ValidatedCluster) -> String {
    format!("[{}].\n", cluster.plugins.join(","))
}

fn advanced_config(cluster: &ValidatedCluster) -> String {
    if cluster.advanced_config.trim().is_empty() { "[].\n".to_string() } else { cluster.advanced_config.clone() }
}

pub fn config_map(cluster: &ValidatedCluster) -> ConfigMap {
    let mut additional = String::from("# spec.rabbitmq.additionalConfig\n");
    let _ = writeln!(additional, "{}", cluster.additional_config.trim_end());
    ConfigMap {
        metadata: child_meta(cluster, &cluster.config_map_name()),
        data: Some(
            BTreeMap::from([
                (OPERATOR_CONF_KEY.to_string(), rabbitmq_conf(cluster)),
                (ADDITIONAL_CONF_KEY.to_string(), additional),
                (ENABLED_PLUGINS_KEY.to_string(), enabled_plugins(cluster)),
                (ADVANCED_CONFIG_KEY.to_string(), advanced_config(cluster)),
                ("bootstrap.sh".to_string(), BOOTSTRAP_SCRIPT.to_string()),
                ("pre-stop.sh".to_string(), PRE_STOP_SCRIPT.to_string()),
                ("ready.sh".to_string(), READINESS_SCRIPT.to_string()),
                (REPLICAS_KEY.to_string(), cluster.replicas.to_string()),
                (FORMED_KEY.to_string(), cluster.formed.to_string()),
            ])
            .into_iter()
            .chain(
                TlsSpec::inter_node(cluster.tls.as_ref()).then(|| (INTER_NODE_TLS_KEY.to_string(), inter_node_tls())),
            )
            .collect(),
        ),
        ..Default::default()
    }
}

/// The ConfigMap key of the Erlang distribution's TLS options (`-ssl_dist_optfile`).
pub const INTER_NODE_TLS_KEY: &str = "inter-node-tls.config";

/// TLS options of the Erlang distribution, for the node and for the CLI tools (which are
/// distribution peers too): both sides verify the other against the CA, and a node refuses a peer
/// without a certificate. Not the peer's host name: a certificate for the pods' names is often a
/// wildcard, which the distribution's default host check does not match, and the options file
/// cannot name a match function; whoever holds a certificate of the cluster's CA still needs the
/// Erlang cookie. (RabbitMQ's guide, "Inter-node TLS".)
fn inter_node_tls() -> String {
    let files = format!(
        "{{cacertfile, \"{TLS_CA_DIR}/ca.crt\"}},\n    {{certfile, \"{TLS_DIR}/tls.crt\"}},\n    \
         {{keyfile, \"{TLS_DIR}/tls.key\"}},\n    {{secure_renegotiate, true}},\n    {{verify, verify_peer}}"
    );
    format!(
        "[\n  {{server, [\n    {files},\n    {{fail_if_no_peer_cert, true}}\n  ]}},\n  {{client, [\n    {files},\n    \
         {{server_name_indication, disable}}\n  ]}}\n].\n"
    )
}

/// A hash of everything a node reads only at boot: put on the pod template so a change rolls the pods.
/// Not what the bootstrap script reads live from the mounted ConfigMap (the replica count, whether
/// the cluster formed), which changes without a restart.
pub fn config_hash(config_map: &ConfigMap) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in config_map.data.iter().flatten() {
        if key != REPLICAS_KEY && key != FORMED_KEY {
            hasher.update(key.as_bytes());
            hasher.update([0]);
            hasher.update(value.as_bytes());
            hasher.update([0]);
        }
    }
    hex::encode(&hasher.finalize()[..8])
}
