//! Step 4 of reconcile: the broker seen through its management API (membership, HA, partitions)
//! once every pod is ready, and the scale-down steps that follow from what it lists.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::dereference::Dereferenced;
use super::validate::ValidatedCluster;
use super::{Context, conditions, recover, scale, stores};
use crate::api::{FEATURE_FLAGS_ANNOTATION, RabbitCluster};
use crate::error::{BrokerReason, Error};
use crate::rabbitmq::broker::{self, BrokerObservation, Membership};

/// What step 4 saw: the StatefulSet as its store holds it now, the broker when every pod is ready,
/// a scale-down pass, and the first error.
pub struct Observation {
    pub stateful_set: Option<Arc<StatefulSet>>,
    pub broker: Option<BrokerObservation>,
    pub why_not_checked: String,
    pub scaling: Option<scale::ScalePass>,
    pub error: Option<Error>,
    pub all_ready: bool,
    /// Pods the scheduler could not place, each with its reason (`<pod>: <scheduler message>`).
    pub unschedulable: Vec<String>,
    /// While some pods are not ready but one serves: which members run (read-only).
    pub membership: Option<Membership>,
    /// Each RabbitMQ node's pod, where it is scheduled and whether it is ready (from the pods'
    /// store), to say where a missing member is.
    pub placements: BTreeMap<String, String>,
}

/// Step 4: the broker (membership, HA, partitions) once every pod is ready, and the nodes a
/// cluster still lists after their pods went (an operator restarted between a pod's removal and
/// its forget).
pub async fn observe(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    world: &Dereferenced,
    mut scaling: Option<scale::ScalePass>,
) -> Observation {
    let key = ObjectRef::new(&validated.stateful_set_name()).within(&validated.namespace);
    let stateful_set = ctx.stores.stateful_sets.get(&key);
    let (_, all_ready) = conditions::replicas_ready(stateful_set.as_deref(), validated.replicas);
    let expected: Vec<String> = (0..validated.replicas).map(|i| validated.node_name(i)).collect();
    // Stopped on purpose (spec.replicas 0): no broker to ask.
    let (broker, error) = if all_ready && validated.replicas > 0 {
        let requested = requested_feature_flags(cluster);
        let outcome = async {
            let credentials = &world.credentials;
            let client = ctx.management_client(validated, world)?;
            match broker::converge(&client, &expected, &validated.high_availability, &requested).await {
                // The Secret's user does not log in: the Secret was re-created (default_user only
                // applies to an empty database) or edited. The Secret is what clients read: the
                // broker's user is set to match it.
                // Only a 401 (the login itself failed), not a 403 (a permission the user lacks).
                Err(Error::Broker { reason: BrokerReason::BrokerUnauthorized, message, .. })
                    if message.starts_with("HTTP 401") =>
                {
                    let note = recover::restore_default_user(ctx, validated, credentials).await?;
                    ctx.event(cluster, EventType::Warning, "DefaultUserRestored", "Converge", note).await;
                    broker::converge(&client, &expected, &validated.high_availability, &requested).await
                }
                outcome => outcome,
            }
        }
        .await;
        match outcome {
            Ok(observation) => (Some(observation), None),
            Err(error) => (None, Some(error)),
        }
    } else {
        (None, None)
    };
    if let Some(observation) = broker.as_ref().filter(|o| !o.actions.is_empty()) {
        ctx.event(cluster, EventType::Normal, "BrokerConfigured", "Converge", observation.actions.join("; ")).await;
    }
    if let Some(error) = &error {
        ctx.event(cluster, EventType::Warning, error.reason(), "Converge", error.to_string()).await;
    }
    if scaling.is_none()
        && let (Some(observation), Some(current)) = (&broker, world.children.current_replicas())
        && !(observation.extra.is_empty() && observation.drained.is_empty())
    {
        // Nodes to forget, or a node left in maintenance mode: by a scale-down called off before
        // its Scaling condition was written, the pass that would revive it is not otherwise run.
        let pass = scale::pass(ctx, cluster, validated, world, current.max(validated.replicas)).await;
        scaling = Some(pass);
    }
    if let Some(pass) = &scaling {
        report_scaling(cluster, ctx, pass).await;
    }
    let why_not_checked = match &error {
        Some(error) => format!("management API: {error}"),
        None => "waiting for all pods to be ready".to_string(),
    };
    let error = scaling.as_mut().and_then(|s| s.error.take()).or(error);
    // Not all ready: is a pod waiting for a place (the spread, the volume's node, resources)?
    let unschedulable = if all_ready { Vec::new() } else { unschedulable_pods(ctx, validated) };
    // One Event per pod, naming it as the related object: Events of one reason about one object
    // fold into a series that keeps the first note, so a pod unschedulable for a moment (its claim
    // not made yet) would otherwise be what the Event says for the pod that stays Pending.
    for waiting in &unschedulable {
        let pod = waiting.split_once(' ').map_or(waiting.as_str(), |(pod, _)| pod);
        let related = super::pod_reference(cluster, pod);
        ctx.event_related(cluster, EventType::Warning, "PodUnschedulable", "Observe", related, waiting.clone()).await;
    }
    let placements = placements(ctx, validated);
    // A pod not ready (its machine lost, evicted, restarting) while another serves: the members
    // the cluster still lists say which one is gone, and the placements where it was.
    let membership = if !all_ready && placements.values().any(|p| p.ready) {
        match ctx.management_client(validated, world) {
            Ok(client) => broker::membership(&client, &expected).await.ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    let placements: BTreeMap<String, String> = placements.into_iter().map(|(node, p)| (node, p.describe())).collect();
    // One Warning when a formed cluster loses a member (the condition still says formed), not at
    // every pass after, nor while a new cluster is still forming.
    let was_formed = cluster
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == conditions::CLUSTER_FORMED && c.status == "True"));
    if let Some(missing) = membership.as_ref().map(|m| conditions::describe_missing(&m.missing, &placements))
        && !missing.is_empty()
        && was_formed
    {
        ctx.event(cluster, EventType::Warning, "MembersMissing", "Observe", format!("not running members: {missing}"))
            .await;
    }
    Observation {
        stateful_set,
        broker,
        why_not_checked,
        scaling,
        error,
        all_ready,
        unschedulable,
        membership,
        placements,
    }
}

/// Where a RabbitMQ node's pod is.
struct Placement {
    pod: String,
    node: Option<String>,
    ready: bool,
}

impl Placement {
    fn describe(&self) -> String {
        let node = self.node.as_deref().map_or_else(|| "not scheduled".to_string(), |n| format!("on node {n}"));
        format!("pod {} {node}{}", self.pod, if self.ready { "" } else { ", not ready" })
    }
}

/// Each expected RabbitMQ node's pod from the pods' store (no read): its Kubernetes node, ready or
/// not. A pod the store does not hold is left out.
fn placements(ctx: &Context, validated: &ValidatedCluster) -> BTreeMap<String, Placement> {
    let pods = stores::rabbitmq_pods(ctx, validated);
    (0..validated.replicas)
        .filter_map(|ordinal| {
            let name = format!("{}-{ordinal}", validated.stateful_set_name());
            let pod = pods.iter().find(|p| p.name_any() == name)?;
            let ready = stores::pod_ready(pod);
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            Some((validated.node_name(ordinal), Placement { pod: name, node, ready }))
        })
        .collect()
}

/// The cluster's Pending pods the scheduler marked unschedulable, with its message, from the pods'
/// store (no read).
fn unschedulable_pods(ctx: &Context, validated: &ValidatedCluster) -> Vec<String> {
    let mut waiting: Vec<String> = stores::rabbitmq_pods(ctx, validated)
        .iter()
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"))
        .filter_map(|pod| {
            let conditions = pod.status.as_ref()?.conditions.as_ref()?;
            let scheduled = conditions.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            let why = scheduled.message.as_deref().or(scheduled.reason.as_deref()).unwrap_or("not scheduled");
            Some(format!("{} cannot be scheduled: {}", pod.name_any(), why.trim()))
        })
        .collect();
    waiting.sort();
    waiting
}

/// The feature flags the user asked to enable beyond the stable ones the operator enables by itself
/// (`khepri_db`), from the annotation.
fn requested_feature_flags(cluster: &RabbitCluster) -> Vec<String> {
    cluster
        .annotations()
        .get(FEATURE_FLAGS_ANNOTATION)
        .map(|list| list.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Events of a scale-down pass: what it did, a node removed for good, a refusal.
async fn report_scaling(cluster: &RabbitCluster, ctx: &Context, pass: &scale::ScalePass) {
    if !pass.done.is_empty() {
        ctx.event(cluster, EventType::Normal, "ScalingDown", "Scale", pass.done.join("; ")).await;
    }
    if let Some(node) = &pass.removed {
        let note = format!(
            "{node} left the cluster for good: the cluster no longer lists it, and its volume claim goes with its pod"
        );
        let pod = super::pod_reference(cluster, crate::kubectl::status::pod_of(node));
        ctx.event_related(cluster, EventType::Normal, "NodeRemoved", "Scale", pod, note).await;
    }
    if let Some(error) = &pass.error {
        ctx.event(cluster, EventType::Warning, error.reason(), "Scale", error.to_string()).await;
    }
}
