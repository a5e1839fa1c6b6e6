//! Step 3 of reconcile: server-side apply of every child, one field manager, owner references.
//!
//! Each child carries a hash of what the operator last applied; when the live object carries the
//! same hash nothing is sent: with the live objects from the stores, a steady cluster costs nothing.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::build::{INSTANCE_LABEL, MANAGED_BY_LABEL, Resources};
use super::dereference::Children;
use super::validate::ValidatedCluster;
use crate::error::{Error, Result};

pub mod drift;

pub const FIELD_MANAGER: &str = "warren";
pub const APPLIED_HASH_ANNOTATION: &str = "warren.dev/applied-hash";
/// The StatefulSet's `metadata.generation` right after the operator's last apply. Any later change
/// of its spec by someone else (`kubectl scale`, `kubectl set image`, an edit, a downscaler) moves
/// the generation past it: drift, seen from the store alone.
pub const APPLIED_GENERATION_ANNOTATION: &str = "warren.dev/applied-generation";

/// What `apply` changed: `(kind, name)` pairs, and drift it reverted (one line per object).
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    pub created: Vec<(String, String)>,
    pub updated: Vec<(String, String)>,
    /// Children the spec no longer asks for (a NetworkPolicy turned off), deleted.
    pub deleted: Vec<(String, String)>,
    pub reverted: Vec<drift::Reverted>,
    /// Claims grown to a larger `spec.persistence.storage` (`controller::storage`).
    pub expanded: Vec<String>,
}

/// Whether `live` is this cluster's to apply: controlled by it, or made by Warren for a
/// RabbitCluster of this name and controlled by nothing (a credential Secret kept through the
/// RabbitCluster's deletion, a child orphaned by `kubectl delete --cascade=orphan`): adopted.
/// Anything else of that name is left alone and reported.
fn ensure_owned<K: Resource<DynamicType = ()>>(live: &K, cluster: &ValidatedCluster) -> Result<()> {
    let refs = live.owner_references();
    let controlled = refs.iter().any(|o| o.uid == cluster.owner.uid && o.controller == Some(true));
    let labels = live.labels();
    let adoptable = refs.iter().all(|o| o.controller != Some(true))
        && labels.get(MANAGED_BY_LABEL).is_some_and(|v| v == "warren")
        && labels.get(INSTANCE_LABEL) == Some(&cluster.name);
    if controlled || adoptable {
        return Ok(());
    }
    Err(Error::ApplyConflict {
        object: format!("{} {}", K::kind(&()), live.name_any()),
        message: "exists and is not owned by this RabbitCluster; rename or delete it".into(),
    })
}

/// The hash recorded on a child: of the object as built, before the annotation is added.
pub fn hash_of<K: Serialize>(object: &K) -> Result<String> {
    let json = serde_json::to_vec(object)
        .map_err(|e| Error::Serialization { what: "a child".into(), message: e.to_string() })?;
    Ok(hex::encode(&Sha256::digest(&json)[..12]))
}

/// Applies one child unless it already carries what would be applied. An object of that name that
/// this RabbitCluster does not own is left alone and reported: the operator never takes over (or
/// later garbage-collects) something a user created.
async fn apply_child<K>(
    api: &Api<K>,
    cluster: &ValidatedCluster,
    mut desired: K,
    existing: Option<&K>,
    applied: &mut Applied,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Debug,
{
    let kind = K::kind(&()).to_string();
    let name = desired.name_any();
    let hash = hash_of(&desired)?;
    if let Some(live) = existing {
        ensure_owned(live, cluster)?;
        if live.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash) {
            return Ok(());
        }
    }
    desired.annotations_mut().insert(APPLIED_HASH_ANNOTATION.into(), hash);
    // No force: a field another manager took over is reported, not fought over forever.
    let params = PatchParams::apply(FIELD_MANAGER);
    match api.patch(&name, &params, &Patch::Apply(&desired)).await {
        Ok(_) => {
            let entry = (kind, name);
            if existing.is_some() {
                applied.updated.push(entry)
            } else {
                applied.created.push(entry)
            }
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Err(Error::ApplyConflict { object: format!("{kind} {name}"), message: status.message.clone() })
        }
        Err(e) => Err(Error::kube(format!("apply {kind} {name}"), e)),
    }
}

/// Applies every child. The Erlang cookie is never changed: its Secret is applied with the value it
/// holds (or the one recovered from a running node), so only its metadata can change.
pub async fn apply(
    client: &Client,
    cluster: &ValidatedCluster,
    resources: Resources,
    live: &Children,
) -> Result<Applied> {
    // Destructured without `..`: a child that `build` makes and this forgets is a compile error.
    let Resources {
        headless_service,
        client_service,
        erlang_cookie_secret,
        default_user_secret,
        config_map,
        service_account,
        pod_disruption_budget,
        network_policy,
        stateful_set,
    } = resources;
    let ns = cluster.namespace.as_str();
    let mut applied = Applied::default();

    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    apply_child(&service_accounts, cluster, service_account, live.service_account.as_deref(), &mut applied).await?;

    // The cookie is built from the Secret that exists (or from a running node, see `recover`):
    // applying it again changes its metadata only, never the cookie.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    apply_child(&secrets, cluster, erlang_cookie_secret, live.erlang_cookie_secret.as_deref(), &mut applied).await?;
    apply_child(&secrets, cluster, default_user_secret, live.default_user_secret.as_deref(), &mut applied).await?;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    apply_child(&config_maps, cluster, config_map, live.config_map.as_deref(), &mut applied).await?;

    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    apply_child(&services, cluster, headless_service, live.headless_service.as_deref(), &mut applied).await?;
    apply_child(&services, cluster, client_service, live.client_service.as_deref(), &mut applied).await?;

    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    apply_child(&budgets, cluster, pod_disruption_budget, live.pod_disruption_budget.as_deref(), &mut applied).await?;

    let network_policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    match (network_policy, live.network_policy.as_deref()) {
        (Some(policy), live) => apply_child(&network_policies, cluster, policy, live, &mut applied).await?,
        // spec.networkPolicy.enabled turned off: the user asked for none, so the operator's own goes.
        (None, Some(live)) if ensure_owned(live, cluster).is_ok() => {
            let name = live.name_any();
            match network_policies.delete(&name, &DeleteParams::default()).await {
                Ok(_) => applied.deleted.push(("NetworkPolicy".into(), name)),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(Error::kube(format!("delete NetworkPolicy {name}"), e)),
            }
        }
        (None, _) => {}
    }

    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    drift::apply_stateful_set(&stateful_sets, cluster, stateful_set, live.stateful_set.as_deref(), &mut applied)
        .await?;
    Ok(applied)
}
