//! The status vocabulary: condition types, the verdicts a reconcile pass reaches, and how they
//! merge into the previous conditions (Kubernetes' conventions), for RabbitClusters and
//! RabbitMigrations alike. Pure: `status.rs` writes what these decide.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::error::Error;
use crate::rabbitmq::broker::{BrokerObservation, HaOutcome, Membership};

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
/// A RabbitMigration's one condition: True when its Job succeeded, False when it failed.
pub const COMPLETE: &str = "Complete";

/// Joins the partitions of the NoPartitions condition's message.
const PARTITION_SEPARATOR: &str = "; ";

/// A condition without its transition time (set when merged into the previous status).
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub type_: &'static str,
    pub status: Option<bool>,
    pub reason: String,
    pub message: String,
}

pub fn verdict(type_: &'static str, status: Option<bool>, reason: &str, message: impl Into<String>) -> Verdict {
    Verdict { type_, status, reason: reason.to_string(), message: message.into() }
}

/// What a full reconcile pass saw.
#[derive(Clone)]
pub struct Observed<'a> {
    pub desired_replicas: i32,
    pub stateful_set: Option<&'a StatefulSet>,
    pub broker: Result<&'a BrokerObservation, String>,
    pub error: Option<&'a Error>,
    /// Pods the scheduler could not place, with why (empty when all are placed or unknown).
    pub unschedulable: &'a [String],
    /// While some pods are not ready: which members run, if a serving node was asked.
    pub membership: Option<&'a Membership>,
    /// RabbitMQ node → `pod <pod> on node <node>[, not ready]`.
    pub placements: &'a BTreeMap<String, String>,
}

/// The missing members, each with where its pod is: `rabbit@x (pod x on node n, not ready)`.
pub fn describe_missing(missing: &[String], placements: &BTreeMap<String, String>) -> String {
    missing
        .iter()
        .map(|node| match placements.get(node) {
            Some(placement) => format!("{node} ({placement})"),
            None => format!("{node} (no pod)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn members_missing(missing: &[String], placements: &BTreeMap<String, String>) -> Verdict {
    verdict(
        CLUSTER_FORMED,
        Some(false),
        "MembersMissing",
        format!("not running members: {}", describe_missing(missing, placements)),
    )
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
    } else if !observed.unschedulable.is_empty() {
        verdict(
            ALL_REPLICAS_READY,
            Some(false),
            "PodsUnschedulable",
            format!("{ready}/{} pods ready; {}", observed.desired_replicas, observed.unschedulable.join("; ")),
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
                members_missing(&broker.missing, observed.placements)
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
            match observed.membership {
                Some(m) if !m.missing.is_empty() => members_missing(&m.missing, observed.placements),
                Some(m) => verdict(
                    CLUSTER_FORMED,
                    Some(true),
                    "AllNodesMembers",
                    format!("{} running members ({why})", m.members.len()),
                ),
                None => verdict(CLUSTER_FORMED, None, "BrokerNotChecked", why.clone()),
            },
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
    // `highAvailability.mode: None` is what the user asked for: no HA is then not a reason to be unready.
    let ha_disabled = matches!(&observed.broker, Ok(broker) if matches!(broker.high_availability, HaOutcome::Disabled));
    let ha_ok = ha.status == Some(true) || ha_disabled;
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

pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formed(observed: &Observed) -> Verdict {
        verdicts(observed).into_iter().find(|v| v.type_ == CLUSTER_FORMED).expect("ClusterFormed")
    }

    /// A machine lost: its pod not ready, the broker asked through a node that runs. The status
    /// names the member that is gone and where its pod was, not only "waiting for all pods".
    #[test]
    fn a_missing_member_is_named_with_its_pod_and_node() {
        let gone = "rabbit@ha-2.ha-nodes.apps.svc.cluster.local".to_string();
        let members = vec!["rabbit@ha-0.ha-nodes.apps.svc.cluster.local".to_string(), "rabbit@ha-1.x".into()];
        let placements = BTreeMap::from([(gone.clone(), "pod ha-2 on node worker-c, not ready".to_string())]);
        let membership = Membership { members, missing: vec![gone.clone()] };
        let observed = Observed {
            desired_replicas: 3,
            stateful_set: None,
            broker: Err("waiting for all pods to be ready".into()),
            error: None,
            unschedulable: &[],
            membership: Some(&membership),
            placements: &placements,
        };
        let verdict = formed(&observed);
        assert_eq!((verdict.status, verdict.reason.as_str()), (Some(false), "MembersMissing"));
        assert_eq!(
            verdict.message,
            "not running members: rabbit@ha-2.ha-nodes.apps.svc.cluster.local (pod ha-2 on node worker-c, not ready)"
        );

        // Every member runs (a pod restarting its readiness only): formed, and why the rest waits.
        let whole = Membership { members: vec!["a".into(), "b".into(), "c".into()], missing: Vec::new() };
        let verdict = formed(&Observed { membership: Some(&whole), ..observed.clone() });
        assert_eq!(verdict.status, Some(true));
        assert_eq!(verdict.message, "3 running members (waiting for all pods to be ready)");

        // Nobody asked (no pod serves): unknown, as before.
        let verdict = formed(&Observed { membership: None, ..observed });
        assert_eq!((verdict.status, verdict.reason.as_str()), (None, "BrokerNotChecked"));
    }
}
