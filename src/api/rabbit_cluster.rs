//! The `RabbitCluster` custom resource: one highly available RabbitMQ cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Annotation that pauses reconciliation of one cluster: while it is `"true"` the operator
/// writes nothing but the `ReconcileSuccess` condition.
pub const PAUSE_ANNOTATION: &str = "warren.dev/paused";

/// Annotation naming feature flags (comma-separated) the operator enables only when asked:
/// `khepri_db`, which moves a Mnesia cluster's metadata to Khepri, required before RabbitMQ 4.3.
/// Every other stable flag is enabled by the operator after each completed roll-out.
pub const FEATURE_FLAGS_ANNOTATION: &str = "warren.dev/enable-feature-flags";

/// The default image: the official RabbitMQ image of a current 4.x release, with the management plugin.
pub const DEFAULT_IMAGE: &str = "rabbitmq:4.1.4-management";

/// Desired state of a highly available RabbitMQ cluster.
///
/// The operator turns it into a StatefulSet with stable names and volumes, a headless and a client
/// Service, an Erlang cookie Secret, default-user credentials, a ConfigMap with rabbitmq.conf and the
/// bootstrap script, a ServiceAccount and a PodDisruptionBudget; then it applies the HA policy or
/// default queue type through the management API and reports membership and partitions in status.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "RabbitCluster",
    namespaced,
    shortname = "rbc",
    category = "rabbitmq",
    status = "RabbitClusterStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    doc = "A highly available RabbitMQ cluster managed by Warren.",
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.rabbitmqVersion"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 42").message(
        "metadata.name: at most 42 characters, so that pod, Service and Secret names derived from it stay valid"
    ),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "metadata.name: must be a DNS-1035 label (lower case letters, digits and '-', starting with a letter), since it names Services"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RabbitClusterSpec {
    /// Number of RabbitMQ nodes. Odd counts are recommended: with `pause_minority` an even split
    /// pauses both halves. Scaling down removes the highest ordinals one at a time: each node is
    /// checked (no queue would lose its only copy or its majority), handed over (quorum members
    /// shrunk, maintenance mode), removed with its volume claim, then forgotten by the cluster; the
    /// Scaling condition shows the step, and what is unsafe is refused with the queues named.
    /// 0 stops the cluster on purpose: every pod stops, the volumes, the Erlang cookie and the users
    /// are kept, and scaling back re-forms the same cluster with its messages (starting again with
    /// fewer nodes than it stopped with first brings back every node that holds data, then scales
    /// down). `kubectl scale rabbitcluster` (the scale subresource) goes through the same path.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 99))]
    pub replicas: i32,

    /// Container image running RabbitMQ. Its tag (for example `4.1.4-management`) tells the operator
    /// the RabbitMQ version before the broker is reachable.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Persistent volume of each node (the Mnesia / Khepri data and message store).
    #[serde(default)]
    pub persistence: PersistenceSpec,

    /// Compute resources of the RabbitMQ container. Defaults: 1 CPU and 2Gi memory requested,
    /// 2Gi memory limit. A memory limit sets RabbitMQ's memory high watermark to 40% of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Pod affinity. Default: from `spread` (prefer spreading the nodes over Kubernetes nodes, so
    /// that losing one Kubernetes node takes one replica, not two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// How the RabbitMQ pods spread over Kubernetes nodes and zones. A pod the spread leaves
    /// without a place stays Pending, and the AllReplicasReady condition says why.
    #[serde(default)]
    pub spread: SpreadSpec,

    /// Replace a member whose Kubernetes node was declared gone (the Node object deleted, or the
    /// `node.kubernetes.io/out-of-service` taint of a non-graceful node shutdown) while its volume
    /// is local to that node: the operator deletes its claim and its pod, the StatefulSet makes
    /// both anew on a running node, and the member joins afresh (its old incarnation forgotten, its
    /// quorum queues grown back). Its data on the lost node is given up. Off by default: a node
    /// that is only unreachable may come back with its data, and only a person can tell.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_lost_members: bool,

    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Pod node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// The client Service (AMQP, management, Prometheus).
    #[serde(default)]
    pub service: ServiceSpec,

    /// RabbitMQ configuration beyond what the operator sets.
    #[serde(default)]
    pub rabbitmq: RabbitmqConfigSpec,

    /// What a node does when it loses contact with its peers. `pause_minority` (default) pauses the
    /// nodes on the minority side, so a partition never yields two clusters that both accept writes.
    /// No effect from RabbitMQ 4.3, whose Raft-based metadata store always behaves that way.
    #[serde(default)]
    pub partition_handling: PartitionHandling,

    /// How queues survive the loss of a node.
    #[serde(default)]
    pub high_availability: HighAvailabilitySpec,

    /// TLS for AMQPS (5671) and the management API over HTTPS (15671).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// The NetworkPolicy the operator creates for the RabbitMQ pods (on by default).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// How the RabbitMQ pods spread over Kubernetes nodes and zones.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpreadSpec {
    /// `Preferred` (default): each pod on a Kubernetes node of its own when one is free, else
    /// beside another. `Required`: never two on one node (a node lost takes one member, never a
    /// majority); a pod that finds no free node stays Pending. Set by `affinity` when given.
    #[serde(default)]
    pub nodes: NodeSpread,
    /// Spread evenly over the zones (`topology.kubernetes.io/zone`): no zone holds more than one
    /// pod more than another; a pod that would break it stays Pending.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zones: bool,
}

/// Whether two RabbitMQ pods may share a Kubernetes node.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeSpread {
    #[default]
    Preferred,
    Required,
}

/// Who may reach the RabbitMQ pods. Only the cluster's own pods reach the Erlang distribution
/// ports (epmd 4369, 25672: whoever reaches them with the cookie runs code on the node); only the
/// operator's namespace and Warren's migration Jobs reach the management API (15672, 15671),
/// unless `managementFrom` adds peers; every other port (AMQP, AMQPS, the Prometheus port unless
/// `metricsFrom` is set, plugins' own) from anywhere. Enforced only where the network plugin
/// enforces NetworkPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy. Off: none is made, and one the operator made is deleted.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// More peers that may reach the management API (a Celery Flower, an admin tool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub management_from: Vec<NetworkPolicyPeer>,
    /// The only peers that may reach the Prometheus port (15692; 15691 with TLS), such as your
    /// Prometheus's namespace. Empty: anyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_from: Vec<NetworkPolicyPeer>,
}

fn enabled() -> bool {
    true
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true, management_from: Vec::new(), metrics_from: Vec::new() }
    }
}

fn default_replicas() -> i32 {
    3
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

fn default_storage() -> String {
    "10Gi".to_string()
}

/// Persistent storage of each node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceSpec {
    /// StorageClass of the volume claims; the cluster's default class when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Size of each node's volume, as a Kubernetes quantity (for example `10Gi`).
    #[serde(default = "default_storage")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage: String,
}

impl Default for PersistenceSpec {
    fn default() -> Self {
        Self { storage_class_name: None, storage: default_storage() }
    }
}

/// The client Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,

    /// Annotations put on the client Service (for example for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service type of the client Service.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// RabbitMQ configuration files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RabbitmqConfigSpec {
    /// Plugins to enable besides `rabbitmq_management` and `rabbitmq_prometheus`, which are
    /// always on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = r"^[a-z][a-z0-9_]*$"), length(max = 128)))]
    pub plugins: Vec<String>,

    /// Extra rabbitmq.conf lines (`key = value`), appended after the operator's own. Keys the
    /// operator owns (`cluster_partition_handling`, `default_user`, `default_pass`, listeners)
    /// are refused: set them through the spec instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 16384))]
    #[x_kube(validation = Rule::new("!self.matches('(?m)^\\\\s*(cluster_partition_handling|default_user|default_pass|listeners\\\\.)')").message("additionalConfig: cluster_partition_handling, default_user, default_pass and listeners.* are set by the operator"))]
    pub additional_config: String,

    /// Contents of advanced.config (Erlang terms), for settings rabbitmq.conf cannot express.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 65536))]
    pub advanced_config: String,
}

/// RabbitMQ's `cluster_partition_handling`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PartitionHandling {
    #[default]
    PauseMinority,
    Autoheal,
    Ignore,
}

impl PartitionHandling {
    /// The value rabbitmq.conf expects.
    pub fn as_config_value(self) -> &'static str {
        match self {
            PartitionHandling::PauseMinority => "pause_minority",
            PartitionHandling::Autoheal => "autoheal",
            PartitionHandling::Ignore => "ignore",
        }
    }
}

/// How queues survive the loss of a node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HighAvailabilitySpec {
    /// `Auto` (default): classic mirroring on RabbitMQ 3.x, quorum queues as every vhost's default
    /// queue type on 4.x. `ClassicMirrored` (3.x only: 4.0 removed mirroring), `Quorum` (default
    /// queue type, RabbitMQ 3.11.12 or later) or `None`.
    #[serde(default)]
    pub mode: HighAvailabilityMode,

    /// The classic mirroring policy used on RabbitMQ 3.x.
    #[serde(default)]
    pub classic_mirroring: ClassicMirroringSpec,
}

/// The HA mechanism.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HighAvailabilityMode {
    #[default]
    Auto,
    ClassicMirrored,
    Quorum,
    None,
}

fn default_policy_name() -> String {
    "ha-all".to_string()
}

fn default_policy_pattern() -> String {
    ".*".to_string()
}

/// The classic queue mirroring policy (`ha-mode`, `ha-params`, `ha-sync-mode: automatic`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.haMode != 'exactly' || has(self.haParams)").message("classicMirroring.haParams: required when haMode is exactly"))]
#[x_kube(validation = Rule::new("self.haMode == 'exactly' || !has(self.haParams)").message("classicMirroring.haParams: only allowed when haMode is exactly"))]
pub struct ClassicMirroringSpec {
    /// `all`: a mirror on every node; `exactly`: `haParams` copies in total.
    #[serde(default)]
    pub ha_mode: HaMode,

    /// Total number of copies (leader plus mirrors) when `haMode` is `exactly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2))]
    pub ha_params: Option<i32>,

    /// Name of the policy the operator maintains in every vhost.
    #[serde(default = "default_policy_name")]
    #[schemars(length(min = 1, max = 255))]
    pub policy_name: String,

    /// Queue name pattern (a regular expression) of the policy.
    #[serde(default = "default_policy_pattern")]
    #[schemars(length(min = 1))]
    pub pattern: String,

    /// Policy priority; the highest-priority matching policy wins.
    #[serde(default)]
    pub priority: i32,
}

impl Default for ClassicMirroringSpec {
    fn default() -> Self {
        Self {
            ha_mode: HaMode::default(),
            ha_params: None,
            policy_name: default_policy_name(),
            pattern: default_policy_pattern(),
            priority: 0,
        }
    }
}

/// Classic mirroring `ha-mode`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    #[default]
    All,
    Exactly,
}

/// TLS listeners from Secrets of type kubernetes.io/tls (cert-manager compatible).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret holding `tls.crt` and `tls.key` (and `ca.crt` unless `caSecretName` is set).
    #[schemars(length(min = 1))]
    pub secret_name: String,

    /// Secret holding the CA certificate `ca.crt` used to verify peers; defaults to `secretName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_name: Option<String>,

    /// Close the plain listeners (AMQP 5672, management HTTP 15672): clients and the operator
    /// then speak AMQPS 5671 and HTTPS 15671 only.
    #[serde(default, rename = "disableNonTLSListeners")]
    pub disable_non_tls_listeners: bool,

    /// Serve the Prometheus endpoint over HTTPS on 15691 instead of plain HTTP on 15692 (scrape
    /// it with `scheme: https` and the CA; the pods' `prometheus.io/scheme` says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prometheus: bool,

    /// Encrypt the traffic between the nodes (Erlang distribution over TLS on 25672): each node
    /// presents the certificate to its peers and to the CLI tools, and accepts only peers whose
    /// certificate the CA signed, so the certificate must allow client authentication too
    /// (cert-manager `usages: [server auth, client auth]`, or no extended key usage). Set it when
    /// the cluster is created or while it is stopped (`replicas: 0`): nodes on either side of the
    /// change cannot reach each other, so the operator refuses it while pods run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inter_node: bool,
}

impl TlsSpec {
    /// Whether the plain AMQP and HTTP listeners are closed.
    pub fn tls_only(tls: Option<&TlsSpec>) -> bool {
        tls.is_some_and(|t| t.disable_non_tls_listeners)
    }

    /// Whether the nodes speak Erlang distribution over TLS.
    pub fn inter_node(tls: Option<&TlsSpec>) -> bool {
        tls.is_some_and(|t| t.inter_node)
    }

    /// Whether the Prometheus endpoint is served over TLS (15691) rather than plain (15692).
    pub fn prometheus_tls(tls: Option<&TlsSpec>) -> bool {
        tls.is_some_and(|t| t.prometheus)
    }
}

/// Observed state of a RabbitCluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RabbitClusterStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// RabbitMQ version reported by the running broker (or read from the image tag until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq_version: Option<String>,

    /// Replicas of the StatefulSet.
    #[serde(default)]
    pub replicas: i32,

    /// Pods ready to serve.
    #[serde(default)]
    pub ready_replicas: i32,

    /// The label selector of the cluster's pods, for the scale subresource (a HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Running cluster members, as RabbitMQ node names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,

    /// How many nodes report a network partition (the NoPartitions condition names them); absent
    /// until the broker was checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitioned_nodes: Option<i32>,

    /// Stable feature flags the broker still reports disabled once every pod was ready: those
    /// enabled only on request (`khepri_db`, see the `warren.dev/enable-feature-flags` annotation).
    /// A next minor version that requires one is refused until it is enabled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_feature_flags: Vec<String>,

    /// On RabbitMQ 3.13: the classic queues a mirroring policy replicates (at most ten names, then a
    /// count). RabbitMQ 4 has no mirroring: an in-place move to 4.x is refused while any exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrored_classic_queues: Vec<String>,

    /// Things that work but deserve attention (for example an even replica count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,

    /// Ready, AllReplicasReady, ClusterFormed, HighAvailability, NoPartitions, ReconcileSuccess.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
