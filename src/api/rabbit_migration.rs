//! The `RabbitMigration` custom resource: `warren migrate` run as a Kubernetes Job.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Moves definitions and every message from one RabbitMQ cluster to another. The operator runs
/// `warren migrate` as a Job (credentials from Secrets, as environment variables) and reflects the
/// Job in status. Deleting the resource stops the Job; creating it again resumes safely, since a
/// message leaves the source only after the target confirmed it.
// Clippy reads the repeated `type_ = "string"` of the print columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "RabbitMigration",
    namespaced,
    shortname = "rbm",
    category = "rabbitmq",
    status = "RabbitMigrationStatus",
    doc = "A migration of definitions and messages from one RabbitMQ cluster to another.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Job", type_ = "string", json_path = ".status.jobName"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.convertToQuorum) && self.convertToQuorum && has(self.keepClassic) && self.keepClassic)").message("set at most one of convertToQuorum and keepClassic"))]
pub struct RabbitMigrationSpec {
    /// Where the messages are now.
    pub source: MigrationEndpoint,
    /// Where they go.
    pub target: MigrationEndpoint,
    /// Only these vhosts (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhosts: Vec<String>,
    /// Only queues whose names match this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<String>,
    /// Declare durable classic queues as quorum queues on the target. A target without classic
    /// mirroring (RabbitMQ 4.x) gets them as quorum queues anyway, unless `keepClassic`.
    #[serde(default)]
    pub convert_to_quorum: bool,
    /// On a target without classic mirroring (RabbitMQ 4.x), keep classic queues classic: they
    /// are then not replicated, and `status.haLost` names each.
    #[serde(default)]
    pub keep_classic: bool,
    /// Keep draining messages that still arrive until the source has been idle for `idleTimeout`.
    #[serde(default)]
    pub follow: bool,
    /// With `follow`: how long the source must stay empty (for example `30s`, `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)?$"))]
    pub idle_timeout: Option<String>,
    /// Wait this long for consumers to release messages they hold unacknowledged (Celery
    /// eta/countdown tasks) instead of refusing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)?$"))]
    pub wait_for_consumers: Option<String>,
    /// Move what can be moved although consumers hold messages unacknowledged.
    #[serde(default)]
    pub force: bool,
    /// Image of the Job: the operator's own by default, and another only when the operator allows
    /// it (the chart's `migration.allowImageOverride`), since the Job holds both clusters'
    /// credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The Job container's resources. Unset values default to requests cpu 250m and memory
    /// 128Mi, and a memory limit of 512Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Bytes of messages in flight at once (delivered by the source, not yet confirmed by the
    /// target), shared by every queue moving at once, for example `64Mi`. A message larger than
    /// this still moves, alone. Default: an eighth of the memory limit; at most a quarter of it,
    /// since a message in flight can take three times its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub max_in_flight: Option<String>,
}

/// One side of a migration: a RabbitCluster of this namespace, or any broker by address.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clusterRef) != has(self.host)").message("set exactly one of clusterRef and host"))]
#[x_kube(validation = Rule::new("has(self.clusterRef) || has(self.credentialsSecret)").message("credentialsSecret: required with host"))]
pub struct MigrationEndpoint {
    /// A RabbitCluster in this namespace: its client Service and its default-user Secret are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<String>,
    /// Host name of a broker outside Warren (AMQP on `amqpPort`, management API on `managementPort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default = "default_amqp_port")]
    pub amqp_port: u16,
    #[serde(default = "default_management_port")]
    pub management_port: u16,
    /// With `host`: a Secret of this namespace with keys `username` and `password`, labelled
    /// `warren.dev/migration-credentials=true` (the operator hands no other Secret to a Job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

fn default_amqp_port() -> u16 {
    5672
}

fn default_management_port() -> u16 {
    15672
}

/// Where a migration is, from its Job's status.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    schemars::JsonSchema,
    strum::IntoStaticStr,
    strum::Display,
)]
pub enum MigrationPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn finished(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

/// What the operator observed of the migration Job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMigrationStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Complete: True when the Job succeeded, False when it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Messages moved in all, once the Job has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<u64>,
    /// Per queue, once the Job has finished: what was there, what moved, what is left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<MigrationQueueStatus>,
    /// Queues left out of `queues` to keep the Job's report within Kubernetes' 4 KiB termination
    /// message; the Job's log has them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted_queues: Option<u64>,
    /// Queues not replicated on the target (a classic queue on RabbitMQ 4.x), each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ha_lost: Vec<String>,
    /// Declarations the apps make that the target refuses (tried before any message moved), each
    /// with what to change in the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_declarations: Vec<String>,
}

/// One queue of a finished migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationQueueStatus {
    pub vhost: String,
    pub name: String,
    /// Ready messages on the source when the queue's move began.
    pub total: u64,
    /// Published to the target, confirmed, then acknowledged on the source.
    pub moved: u64,
    /// Ready messages left on the source.
    pub left: u64,
    /// Refused by the target and left on the source.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The queue's type on the target (`quorum`, `classic`, `stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_type: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
