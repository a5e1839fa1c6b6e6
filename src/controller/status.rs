//! Step 5 of reconcile: conditions from what was applied and observed, written by server-side
//! apply — for RabbitClusters and RabbitMigrations alike, here and nowhere else.

use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::apply::FIELD_MANAGER;
use super::broker_step::Observation;
use super::validate::ValidatedCluster;
use super::{Context, RESYNC, build, scale};
use crate::api::{RabbitCluster, RabbitClusterStatus};
use crate::error::{Error, Result};
use crate::rabbitmq::broker::BrokerObservation;

/// Writes `next` as the status of `object` by server-side apply: a field left out is removed (a
/// warning that no longer applies goes). Nothing is sent when the status already says it.
pub async fn apply<K, S>(client: &Client, object: &K, current: Option<&S>, next: &S) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(next) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(client.clone(), &object.namespace().unwrap_or_default());
    let body = serde_json::json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": next });
    // The operator's one field manager, with force: status is the operator's alone, and fields an
    // earlier version wrote by merge patch are taken over.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&object.name_any(), &params, &Patch::Apply(&body))
        .await
        .map_err(|e| Error::kube(format!("apply the status of {} {}", K::kind(&()), object.name_any()), e))?;
    Ok(())
}

pub const READY: &str = "Ready";
pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
pub const CLUSTER_FORMED: &str = "ClusterFormed";
pub const HIGH_AVAILABILITY: &str = "HighAvailability";
pub const NO_PARTITIONS: &str = "NoPartitions";
pub const RECONCILE_SUCCESS: &str = "ReconcileSuccess";
/// A scale-down in progress: the node being removed and the step it is at.
pub const SCALING: &str = "Scaling";
/// The reason of Ready (and of the broker's conditions) while spec.replicas is 0.
pub const STOPPED: &str = "Stopped";

/// How many nodes report a partition, by the NoPartitions condition; None until the broker was
/// checked (the condition's message lists one `node: partitioned from ...` per such node).
pub fn partitioned_nodes(conditions: &[Condition]) -> Option<usize> {
    let condition = conditions.iter().find(|c| c.type_ == NO_PARTITIONS)?;
    match condition.status.as_str() {
        "True" => Some(0),
        "False" if condition.reason == "PartitionDetected" => {
            Some(condition.message.split(PARTITION_SEPARATOR).count())
        }
        _ => None,
    }
}

const PARTITION_SEPARATOR: &str = "; ";

/// A condition without its transition time (set when merged into the previous status).
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub type_: &'static str,
    pub status: Option<bool>,
    pub reason: String,
    pub message: String,
}

fn verdict(type_: &'static str, status: Option<bool>, reason: &str, message: impl Into<String>) -> Verdict {
    Verdict { type_, status, reason: reason.to_string(), message: message.into() }
}

/// What a full reconcile pass saw.
pub struct Observed<'a> {
    pub desired_replicas: i32,
    pub stateful_set: Option<&'a StatefulSet>,
    pub broker: Result<&'a BrokerObservation, String>,
    pub error: Option<&'a Error>,
}

/// Whether the StatefulSet runs the desired replicas, all updated and ready.
pub fn replicas_ready(stateful_set: Option<&StatefulSet>, desired: i32) -> (i32, bool) {
    let Some(status) = stateful_set.and_then(|s| s.status.as_ref()) else { return (0, false) };
    let generation_seen = stateful_set.and_then(|s| s.metadata.generation) == status.observed_generation;
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let current_revision = status.current_revision.is_some() && status.current_revision == status.update_revision;
    (ready, generation_seen && ready == desired && updated == desired && current_revision)
}

/// The conditions of a full pass.
pub fn verdicts(observed: &Observed) -> Vec<Verdict> {
    let (ready, all_ready) = replicas_ready(observed.stateful_set, observed.desired_replicas);
    let replicas = if all_ready {
        verdict(
            ALL_REPLICAS_READY,
            Some(true),
            "AllPodsReady",
            format!("{ready}/{} pods ready", observed.desired_replicas),
        )
    } else {
        verdict(
            ALL_REPLICAS_READY,
            Some(false),
            "PodsNotReady",
            format!("{ready}/{} pods ready and updated", observed.desired_replicas),
        )
    };
    let reconcile = match observed.error {
        Some(error) => verdict(RECONCILE_SUCCESS, Some(false), error.reason(), error.to_string()),
        None => verdict(RECONCILE_SUCCESS, Some(true), "Reconciled", "all children applied"),
    };
    let (formed, partitions, ha) = match &observed.broker {
        Ok(broker) => (
            if broker.missing.is_empty() {
                verdict(
                    CLUSTER_FORMED,
                    Some(true),
                    "AllNodesMembers",
                    format!("{} running members", broker.members.len()),
                )
            } else {
                verdict(
                    CLUSTER_FORMED,
                    Some(false),
                    "MembersMissing",
                    format!("not running members: {}", broker.missing.join(", ")),
                )
            },
            if broker.partitions.is_empty() {
                verdict(NO_PARTITIONS, Some(true), "NoPartitions", "no node reports a partition")
            } else {
                verdict(NO_PARTITIONS, Some(false), "PartitionDetected", broker.partitions.join(PARTITION_SEPARATOR))
            },
            {
                let ha = &broker.high_availability;
                verdict(HIGH_AVAILABILITY, Some(ha.is_available()), ha.reason(), ha.message())
            },
        ),
        Err(why) => (
            verdict(CLUSTER_FORMED, None, "BrokerNotChecked", why.clone()),
            verdict(NO_PARTITIONS, None, "BrokerNotChecked", why.clone()),
            match observed.error {
                Some(Error::InvalidSpec { reason, message }) => {
                    verdict(HIGH_AVAILABILITY, Some(false), reason.as_str(), message.clone())
                }
                _ => verdict(HIGH_AVAILABILITY, None, "BrokerNotChecked", why.clone()),
            },
        ),
    };
    if observed.desired_replicas == 0 {
        // Stopped on purpose: nothing serves, and nothing is wrong.
        let why = "spec.replicas is 0: every node stopped on purpose; the volumes, the Erlang cookie and the \
                   users are kept, and scaling back re-forms the same cluster";
        let stopped = |type_| verdict(type_, None, STOPPED, why);
        return vec![
            verdict(READY, Some(false), STOPPED, why),
            replicas,
            stopped(CLUSTER_FORMED),
            stopped(HIGH_AVAILABILITY),
            stopped(NO_PARTITIONS),
            reconcile,
        ];
    }
    let ha_ok = ha.status == Some(true) || ha.reason == "Disabled";
    let blockers: Vec<&Verdict> = [&reconcile, &replicas, &formed, &partitions]
        .into_iter()
        .filter(|v| v.status != Some(true))
        .chain((!ha_ok).then_some(&ha))
        .collect();
    let ready_verdict = match blockers.first() {
        None => verdict(
            READY,
            Some(true),
            "ClusterReady",
            "all replicas are running members of one cluster with HA applied",
        ),
        Some(first) => verdict(READY, Some(false), first.type_, format!("{}: {}", first.type_, first.message)),
    };
    vec![ready_verdict, replicas, formed, ha, partitions, reconcile]
}

/// The conditions when reconcile stopped before observing anything (bad spec, refused scale-down,
/// paused): ReconcileSuccess and Ready change, the rest keeps what was last observed.
pub fn early_stop_verdicts(reason: &str, message: &str, success: Option<bool>) -> Vec<Verdict> {
    vec![
        verdict(READY, Some(false), RECONCILE_SUCCESS, format!("{RECONCILE_SUCCESS}: {message}")),
        verdict(RECONCILE_SUCCESS, success, reason, message.to_string()),
    ]
}

fn status_word(status: Option<bool>) -> &'static str {
    match status {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    }
}

/// Merges verdicts into the previous conditions. A condition's transition time moves only when its
/// status changes, as Kubernetes conventions ask.
pub fn merge_conditions(
    previous: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut conditions: Vec<Condition> = previous.to_vec();
    for v in verdicts {
        let status = status_word(v.status).to_string();
        let transition = previous
            .iter()
            .find(|c| c.type_ == v.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        let condition = Condition {
            type_: v.type_.to_string(),
            status,
            reason: v.reason.clone(),
            message: v.message.chars().take(1024).collect(),
            observed_generation: generation,
            last_transition_time: transition,
        };
        match conditions.iter_mut().find(|c| c.type_ == v.type_) {
            Some(slot) => *slot = condition,
            None => conditions.push(condition),
        }
    }
    conditions
}

/// The `Scaling` condition when no scale-down is under way.
pub fn steady_scaling(replicas: i32) -> Verdict {
    verdict(SCALING, Some(false), "Steady", format!("{replicas} replicas; the cluster lists exactly its pods"))
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

pub async fn write_early(
    cluster: &RabbitCluster,
    ctx: &Context,
    reason: &str,
    message: &str,
    success: Option<bool>,
) -> Result<()> {
    let previous = cluster.status.clone().unwrap_or_default();
    let verdicts = early_stop_verdicts(reason, message, success);
    let conditions = merge_conditions(&previous.conditions, &verdicts, cluster.meta().generation, &now());
    let next = RabbitClusterStatus { observed_generation: cluster.meta().generation, conditions, ..previous };
    apply(&ctx.client, cluster, cluster.status.as_ref(), &next).await
}

/// The conditions of a full pass, then what to do next.
pub async fn write(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    observed: Observation,
) -> Result<Action> {
    let Observation { stateful_set, broker, why_not_checked, scaling, error, all_ready } = observed;
    let mut verdicts = verdicts(&Observed {
        desired_replicas: validated.replicas,
        stateful_set: stateful_set.as_deref(),
        broker: broker.as_ref().ok_or(why_not_checked),
        error: error.as_ref(),
    });
    verdicts.push(match &scaling {
        Some(pass) => pass.verdict.clone(),
        None => steady_scaling(validated.replicas),
    });
    let next = cluster_status(cluster, validated, stateful_set.as_deref(), broker.as_ref(), &verdicts);
    apply(&ctx.client, cluster, cluster.status.as_ref(), &next).await?;
    match error {
        Some(error) => Err(error),
        None if scaling.as_ref().is_some_and(|s| s.in_progress) => Ok(Action::requeue(scale::SCALING_RESYNC)),
        None if all_ready => Ok(Action::requeue(RESYNC)),
        // Pod readiness changes arrive through the owned StatefulSet's watch; this is a safety net.
        None => Ok(Action::requeue(Duration::from_secs(30))),
    }
}

fn cluster_status(
    cluster: &RabbitCluster,
    validated: &ValidatedCluster,
    stateful_set: Option<&StatefulSet>,
    broker: Option<&BrokerObservation>,
    verdicts: &[Verdict],
) -> RabbitClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let sts_status = stateful_set.and_then(|s| s.status.as_ref());
    RabbitClusterStatus {
        observed_generation: cluster.meta().generation,
        // What the broker reported once every pod was ready and updated, kept through a roll-out
        // that has not completed: the version to which a failed roll-out may always return. The
        // image's tag only until the broker was first reached.
        rabbitmq_version: broker
            .map(|b| b.version.clone())
            .or(previous.rabbitmq_version.clone())
            .or_else(|| validated.image_version.map(|v| v.to_string())),
        replicas: sts_status.map(|s| s.replicas).unwrap_or(0),
        ready_replicas: sts_status.and_then(|s| s.ready_replicas).unwrap_or(0),
        selector: Some(build::selector_string(&validated.name)),
        members: broker.map(|b| b.members.clone()).unwrap_or(previous.members.clone()),
        disabled_feature_flags: broker
            .map(|b| b.disabled_feature_flags.clone())
            .unwrap_or(previous.disabled_feature_flags.clone()),
        mirrored_classic_queues: broker
            .map(|b| b.mirrored_classic_queues.clone())
            .unwrap_or(previous.mirrored_classic_queues.clone()),
        warnings: validated.warnings.clone(),
        conditions: merge_conditions(&previous.conditions, verdicts, cluster.meta().generation, &now()),
    }
}
