//! Step 5 of reconcile: the status, from what was applied and observed (the conditions decided in
//! `conditions.rs`), written by server-side apply — for RabbitClusters and RabbitMigrations alike,
//! here and nowhere else.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::apply::FIELD_MANAGER;
use super::broker_step::Observation;
use super::conditions::{Observed, Verdict, early_stop_verdicts, merge_conditions, now, steady_scaling, verdicts};
use super::validate::ValidatedCluster;
use super::{Context, build};
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

/// The status of a full pass.
pub async fn write(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    observed: &Observation,
) -> Result<()> {
    let Observation {
        stateful_set,
        broker,
        why_not_checked,
        scaling,
        error,
        unschedulable,
        membership,
        placements,
        ..
    } = observed;
    let mut verdicts = verdicts(&Observed {
        desired_replicas: validated.replicas,
        stateful_set: stateful_set.as_deref(),
        broker: broker.as_ref().ok_or(why_not_checked.clone()),
        error: error.as_ref(),
        unschedulable,
        membership: membership.as_ref(),
        placements,
    });
    verdicts.push(match &scaling {
        Some(pass) => pass.verdict.clone(),
        None => steady_scaling(validated.replicas),
    });
    let next = cluster_status(cluster, validated, stateful_set.as_deref(), broker.as_ref(), &verdicts);
    apply(&ctx.client, cluster, cluster.status.as_ref(), &next).await
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
        // Unknown (absent) until the broker was checked in this pass.
        partitioned_nodes: broker.map(|b| b.partitions.len() as i32),
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
