//! The StatefulSet: stable names and volumes, Parallel start, non-root, safe stop.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    SeccompProfile, SecretProjection, SecretVolumeSource, SecurityContext, Volume, VolumeMount, VolumeProjection,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::config::{
    ADDITIONAL_CONF_KEY, ADVANCED_CONFIG_KEY, ENABLED_PLUGINS_KEY, INTER_NODE_TLS_KEY, OPERATOR_CONF_KEY, TLS_CA_DIR,
    TLS_DIR,
};
use super::secrets::{COOKIE_KEY, DEFAULT_USER_CONF_KEY};
use super::services::{AMQPS_PORT, DISTRIBUTION_PORT, EPMD_PORT, client_ports, prometheus_port};
use super::{CONFIG_HASH_ANNOTATION, child_meta, labels, selector_labels};
use crate::api::TlsSpec;
use crate::controller::validate::ValidatedCluster;

/// Where a Prometheus without the Prometheus operator finds the pods' metrics: the `prometheus.io/*`
/// annotations its `kubernetes-pods` example job keeps and relabels. The per-object endpoint
/// (RabbitMQ 3.10 and later) has a series per queue (`rabbitmq_queue_messages_ready{queue=...}`);
/// `/metrics` sums every queue of a node into one.
pub const PROMETHEUS_PATH: &str = "/metrics/per-object";

fn pod_annotations(cluster: &ValidatedCluster, config_hash: &str) -> BTreeMap<String, String> {
    let (_, port) = prometheus_port(cluster);
    let mut annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), PROMETHEUS_PATH.to_string()),
        (CONFIG_HASH_ANNOTATION.to_string(), config_hash.to_string()),
    ]);
    // Only when it is https: a new annotation on every pod template would roll every cluster's
    // pods when the operator is upgraded.
    if TlsSpec::prometheus_tls(cluster.tls.as_ref()) {
        annotations.insert("prometheus.io/scheme".to_string(), "https".to_string());
    }
    annotations
}

/// uid and gid of the `rabbitmq` user in the official image (and in the Debian-built one).
const RABBITMQ_UID: i64 = 999;
pub const DATA_VOLUME: &str = "data";
const DATA_DIR: &str = "/var/lib/rabbitmq";
const CONFIG_DIR: &str = "/etc/warren/config";
const COOKIE_DIR: &str = "/etc/warren/cookie";
/// Logs go to the console, but RabbitMQ 3.x still writes its upgrade log and crash dumps here,
/// and the root filesystem is read-only.
const LOG_DIR: &str = "/var/log/rabbitmq";
/// How long preStop may wait for mirrors and quorum queues, and the grace period around it.
const PRE_STOP_TIMEOUT_SECONDS: i64 = 3000;
/// The RabbitMQ container's name (the operator reads the image it runs from it).
pub const RABBITMQ_CONTAINER: &str = "rabbitmq";
const TERMINATION_GRACE_SECONDS: i64 = 3600;

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..Default::default() }
}

fn bash(script: &str) -> Vec<String> {
    vec!["/bin/bash".into(), format!("{CONFIG_DIR}/{script}")]
}

fn key(key: &str, path: &str) -> KeyToPath {
    KeyToPath { key: key.into(), path: path.into(), ..Default::default() }
}

fn environment(cluster: &ValidatedCluster) -> Vec<EnvVar> {
    let peer_domain = format!("{}.$(POD_NAMESPACE).svc.{}", cluster.headless_service_name(), cluster.cluster_domain);
    let mut environment = vec![
        env_from_field("POD_NAME", "metadata.name"),
        env_from_field("POD_NAMESPACE", "metadata.namespace"),
        env("WARREN_STS_NAME", cluster.stateful_set_name()),
        env("WARREN_PEER_DOMAIN", peer_domain.clone()),
        env("WARREN_CONFIG_DIR", CONFIG_DIR),
        env("WARREN_COOKIE_FILE", format!("{COOKIE_DIR}/{COOKIE_KEY}")),
        env("WARREN_PRESTOP_TIMEOUT", PRE_STOP_TIMEOUT_SECONDS.to_string()),
        env("RABBITMQ_USE_LONGNAME", "true"),
        env("RABBITMQ_NODENAME", format!("rabbit@$(POD_NAME).{peer_domain}")),
        env("RABBITMQ_MNESIA_BASE", format!("{DATA_DIR}/mnesia")),
        env("RABBITMQ_ENABLED_PLUGINS_FILE", format!("{CONFIG_DIR}/{ENABLED_PLUGINS_KEY}")),
        env("RABBITMQ_ADVANCED_CONFIG_FILE", format!("{CONFIG_DIR}/{ADVANCED_CONFIG_KEY}")),
        env("RABBITMQ_LOG_BASE", LOG_DIR),
        env("HOME", DATA_DIR),
    ];
    if TlsSpec::inter_node(cluster.tls.as_ref()) {
        // The node and every CLI tool in the pod (bootstrap, probes, preStop, the operator's
        // exec) speak the distribution over TLS; a CLI tool without it could not reach its node.
        let args = inter_node_erl_args();
        environment.push(env(INTER_NODE_SERVER_ARGS, args.clone()));
        environment.push(env("RABBITMQ_CTL_ERL_ARGS", args));
    }
    if TlsSpec::tls_only(cluster.tls.as_ref()) {
        // The readiness probe's port: the TLS listener, the only one (ready.sh defaults to 5672).
        environment.push(env("WARREN_AMQP_PORT", AMQPS_PORT.to_string()));
    }
    environment
}

/// The environment variable whose value says whether the pods run the distribution over TLS (the
/// operator's store keeps it: a change is refused while pods run).
pub const INTER_NODE_SERVER_ARGS: &str = "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS";

fn inter_node_erl_args() -> String {
    format!("-proto_dist inet_tls -ssl_dist_optfile {CONFIG_DIR}/{INTER_NODE_TLS_KEY}")
}

/// Whether a RabbitMQ container's environment runs the distribution over TLS.
pub fn runs_inter_node_tls(container: &Container) -> bool {
    container.env.iter().flatten().any(|e| {
        e.name == INTER_NODE_SERVER_ARGS && e.value.as_deref().is_some_and(|v| v.contains("-proto_dist inet_tls"))
    })
}

fn volumes(cluster: &ValidatedCluster) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cluster.config_map_name(),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        },
        // conf.d gathers the operator's file, the default user (from its Secret) and the user's lines.
        Volume {
            name: "rabbitmq-conf-d".into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o440),
                sources: Some(vec![
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: cluster.config_map_name(),
                            items: Some(vec![
                                key(OPERATOR_CONF_KEY, OPERATOR_CONF_KEY),
                                key(ADDITIONAL_CONF_KEY, ADDITIONAL_CONF_KEY),
                            ]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        secret: Some(SecretProjection {
                            name: cluster.default_user_secret_name(),
                            items: Some(vec![key(DEFAULT_USER_CONF_KEY, "11-default-user.conf")]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        },
        Volume {
            name: "erlang-cookie".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(cluster.erlang_cookie_secret_name()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
        Volume { name: "log".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
    if let Some(tls) = &cluster.tls {
        let secret_volume = |name: &str, secret: &str| Volume {
            name: name.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        };
        volumes.push(secret_volume("tls", &tls.secret_name));
        volumes.push(secret_volume("tls-ca", tls.ca_secret_name.as_deref().unwrap_or(&tls.secret_name)));
    }
    volumes
}

fn container(cluster: &ValidatedCluster) -> Container {
    let mut ports: Vec<ContainerPort> = client_ports(cluster)
        .into_iter()
        .chain([("epmd", EPMD_PORT), ("cluster-rpc", DISTRIBUTION_PORT)])
        .map(|(name, port)| ContainerPort {
            name: Some(name.into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    ports.sort_by_key(|p| p.container_port);
    let mut volume_mounts = vec![
        mount(DATA_VOLUME, DATA_DIR, false),
        mount("config", CONFIG_DIR, true),
        mount("rabbitmq-conf-d", "/etc/rabbitmq/conf.d", true),
        mount("erlang-cookie", COOKIE_DIR, true),
        mount("tmp", "/tmp", false),
        mount("log", LOG_DIR, false),
    ];
    if cluster.tls.is_some() {
        volume_mounts.push(mount("tls", TLS_DIR, true));
        volume_mounts.push(mount("tls-ca", TLS_CA_DIR, true));
    }
    Container {
        name: RABBITMQ_CONTAINER.into(),
        image: Some(cluster.image.clone()),
        command: Some(bash("bootstrap.sh")),
        env: Some(environment(cluster)),
        ports: Some(ports),
        resources: Some(cluster.resources.clone()),
        volume_mounts: Some(volume_mounts),
        // Only the node itself: a probe that needs the whole cluster deadlocks a full restart.
        readiness_probe: Some(Probe {
            exec: Some(ExecAction { command: Some(bash("ready.sh")) }),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction { command: Some(bash("pre-stop.sh")) }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn stateful_set(cluster: &ValidatedCluster, config_hash: &str) -> StatefulSet {
    let mut pod_labels = labels(&cluster.name);
    pod_labels.insert(super::COMPONENT_LABEL.into(), "broker".into());
    let pod_spec = PodSpec {
        service_account_name: Some(cluster.service_account_name()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_user: Some(RABBITMQ_UID),
            run_as_group: Some(RABBITMQ_UID),
            fs_group: Some(RABBITMQ_UID),
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        containers: vec![container(cluster)],
        volumes: Some(volumes(cluster)),
        affinity: Some(cluster.affinity.clone()),
        // Only when asked: a new field on every pod template would roll every cluster's pods.
        topology_spread_constraints: (!cluster.topology_spread.is_empty()).then(|| cluster.topology_spread.clone()),
        tolerations: (!cluster.tolerations.is_empty()).then(|| cluster.tolerations.clone()),
        node_selector: (!cluster.node_selector.is_empty()).then(|| cluster.node_selector.clone()),
        image_pull_secrets: (!cluster.image_pull_secrets.is_empty()).then(|| cluster.image_pull_secrets.clone()),
        ..Default::default()
    };
    let mut claim_spec = PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([("storage".to_string(), cluster.storage.clone())])),
            ..Default::default()
        }),
        ..Default::default()
    };
    claim_spec.storage_class_name = cluster.storage_class_name.clone();
    StatefulSet {
        metadata: child_meta(cluster, &cluster.stateful_set_name()),
        spec: Some(StatefulSetSpec {
            replicas: Some(cluster.replicas),
            service_name: Some(cluster.headless_service_name()),
            // Parallel: with OrderedReady, pod 0 waits for peers that are not started until it is
            // ready, and a full restart deadlocks (RabbitMQ clustering guide, "restarts").
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector { match_labels: Some(selector_labels(&cluster.name)), ..Default::default() },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            // The data outlives the cluster object, and outlives a StatefulSet scaled by hand (a
            // runbook's `kubectl scale sts --replicas=0`, an off-hours downscaler): with `Delete`,
            // Kubernetes removed every claim above the new count and the scale-back seeded an empty
            // cluster. A claim is deleted only by the operator's own forget step, for a node it
            // removed itself (controller::scale), so a forgotten node's data never boots again.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".into()),
                when_scaled: Some("Retain".into()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations(cluster, config_hash)),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.into()),
                    labels: Some(selector_labels(&cluster.name)),
                    ..Default::default()
                },
                spec: Some(claim_spec),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
