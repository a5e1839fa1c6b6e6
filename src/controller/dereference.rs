//! Step 0 of reconcile: the objects a pass needs, from the controller's stores — the children as
//! they are, the cluster's Secrets, the TLS Secrets its spec names — and what follows from them
//! alone: the credentials, the version the pods run. A steady cluster costs no read here.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;

use super::build::secrets::{COOKIE_KEY, PASSWORD_KEY, USERNAME_KEY};
use super::build::{self, Credentials};
use super::stores::CA_KEY;
use super::stores::cached;
use super::validate::ValidatedCluster;
use super::{Context, recover};
use crate::error::{Error, Result};
use crate::rabbitmq::version::RabbitVersion;

/// The children as the stores hold them (`None`: not created yet).
#[derive(Debug, Default)]
pub struct Children {
    pub stateful_set: Option<Arc<StatefulSet>>,
    pub erlang_cookie_secret: Option<Arc<Secret>>,
    pub default_user_secret: Option<Arc<Secret>>,
    pub service_account: Option<Arc<ServiceAccount>>,
    pub config_map: Option<Arc<ConfigMap>>,
    pub headless_service: Option<Arc<Service>>,
    pub client_service: Option<Arc<Service>>,
    pub pod_disruption_budget: Option<Arc<PodDisruptionBudget>>,
    pub network_policy: Option<Arc<NetworkPolicy>>,
}

/// What one pass works from.
#[derive(Debug)]
pub struct Dereferenced {
    pub children: Children,
    pub credentials: Credentials,
    /// Nodes 0..n that hold data when the StatefulSet is absent or at 0 replicas (the claims that
    /// outlived it); 0 when the StatefulSet runs (then not counted).
    pub members_with_data: i32,
    /// Credentials recovered or made anew for a cluster with data, for a Warning Event.
    pub recovered: Vec<String>,
    /// With spec.tls: the CA (`ca.crt`, PEM) the operator verifies the management API's
    /// certificate against.
    pub tls_ca: Option<String>,
}

/// Reads the cluster's objects from the stores (one GET for any the store does not hold yet) and
/// checks the Secrets the spec names.
pub async fn dereference(ctx: &Context, cluster: &ValidatedCluster) -> Result<Dereferenced> {
    let (ns, client, stores) = (cluster.namespace.as_str(), &ctx.client, &ctx.stores);
    let children = Children {
        stateful_set: cached(client, &stores.stateful_sets, ns, &cluster.stateful_set_name()).await?,
        erlang_cookie_secret: cached(client, &stores.secrets, ns, &cluster.erlang_cookie_secret_name()).await?,
        default_user_secret: cached(client, &stores.secrets, ns, &cluster.default_user_secret_name()).await?,
        service_account: cached(client, &stores.service_accounts, ns, &cluster.service_account_name()).await?,
        config_map: cached(client, &stores.config_maps, ns, &cluster.config_map_name()).await?,
        headless_service: cached(client, &stores.services, ns, &cluster.headless_service_name()).await?,
        client_service: cached(client, &stores.services, ns, &cluster.client_service_name()).await?,
        pod_disruption_budget: cached(client, &stores.budgets, ns, &cluster.name).await?,
        // Turned off, one is looked for in the store only: no GET for an object that should not be.
        network_policy: if cluster.network_policy.enabled {
            cached(client, &stores.network_policies, ns, &cluster.network_policy_name()).await?
        } else {
            stores.network_policies.get(&ObjectRef::new(&cluster.network_policy_name()).within(ns))
        },
    };
    let tls_ca = check_tls_secrets(ctx, cluster).await?;
    // A running StatefulSet says the cluster has data; otherwise its claims may (stopped, or the
    // RabbitCluster deleted and applied again): one LIST, only then.
    let running = children.current_replicas().is_some_and(|r| r > 0);
    let claimed = if running { Vec::new() } else { recover::claimed_ordinals(ctx, cluster).await? };
    let has_data = children.stateful_set.is_some() || !claimed.is_empty();
    let members_with_data = claimed.last().map_or(0, |last| last + 1);
    let mut recovered = Vec::new();
    let credentials = credentials(ctx, cluster, &children, has_data, &mut recovered).await?;
    Ok(Dereferenced { children, credentials, members_with_data, recovered, tls_ca })
}

impl Children {
    /// The StatefulSet's replicas, when it exists.
    pub fn current_replicas(&self) -> Option<i32> {
        self.stateful_set.as_ref().and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas)
    }

    /// Whether the StatefulSet's pods run the Erlang distribution over TLS (None: no StatefulSet).
    pub fn runs_inter_node_tls(&self) -> Option<bool> {
        self.stateful_set
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == build::statefulset::RABBITMQ_CONTAINER))
            .map(build::statefulset::runs_inter_node_tls)
    }

    /// The RabbitMQ version the StatefulSet's pods run, when its image says.
    pub fn running_version(&self) -> Option<RabbitVersion> {
        self.stateful_set
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == build::statefulset::RABBITMQ_CONTAINER))
            .and_then(|c| c.image.as_deref())
            .and_then(RabbitVersion::from_image)
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

/// The cluster's credentials: from the existing Secrets, generated only for what does not exist
/// yet. Of a cluster with data, a missing cookie is recovered from a running node, and new
/// default-user credentials are set on the broker by the broker step (`recover`).
async fn credentials(
    ctx: &Context,
    cluster: &ValidatedCluster,
    children: &Children,
    has_data: bool,
    recovered: &mut Vec<String>,
) -> Result<Credentials> {
    let needs_fresh = children.erlang_cookie_secret.is_none() || children.default_user_secret.is_none();
    let fresh = if needs_fresh { Credentials::generate() } else { Credentials::default() };
    let erlang_cookie = match &children.erlang_cookie_secret {
        Some(secret) => secret_value(secret, COOKIE_KEY).ok_or_else(|| Error::SecretMissing {
            name: cluster.erlang_cookie_secret_name(),
            message: format!(
                "key {COOKIE_KEY:?} is missing or empty; restore it (every node must share the same cookie)"
            ),
        })?,
        None if has_data => {
            let (cookie, note) = recover::erlang_cookie(ctx, cluster).await?;
            recovered.push(note);
            cookie
        }
        None => fresh.erlang_cookie,
    };
    let (username, password) = match &children.default_user_secret {
        Some(secret) => match (secret_value(secret, USERNAME_KEY), secret_value(secret, PASSWORD_KEY)) {
            (Some(user), Some(password)) => (user, password),
            _ => {
                return Err(Error::SecretMissing {
                    name: cluster.default_user_secret_name(),
                    message: "keys \"username\" and \"password\" must be present".into(),
                });
            }
        },
        None => {
            if has_data {
                recovered.push(format!(
                    "Secret {} was missing: new default-user credentials ({}); the broker's user is set to match \
                     once a node runs",
                    cluster.default_user_secret_name(),
                    fresh.username
                ));
            }
            (fresh.username, fresh.password)
        }
    };
    Ok(Credentials { erlang_cookie, username, password })
}

/// The Secrets spec.tls names exist and hold their keys (the store keeps only whether a key of a
/// Secret the operator does not own is empty, and the CA certificate: see `stores::slim_secret`;
/// a Secret without `stores::WATCH_LABEL` is not in the store, and read with a GET); the CA
/// certificate.
async fn check_tls_secrets(ctx: &Context, cluster: &ValidatedCluster) -> Result<Option<String>> {
    let Some(tls) = &cluster.tls else { return Ok(None) };
    let ca_secret = tls.ca_secret_name.as_deref().unwrap_or(&tls.secret_name);
    let mut required = vec![(tls.secret_name.as_str(), vec!["tls.crt", "tls.key"])];
    match required.iter_mut().find(|(name, _)| *name == ca_secret) {
        Some((_, keys)) => keys.push("ca.crt"),
        None => required.push((ca_secret, vec!["ca.crt"])),
    }
    let mut ca = None;
    for (name, keys) in required {
        let secret =
            cached(&ctx.client, &ctx.stores.watched_secrets, &cluster.namespace, name).await?.ok_or_else(|| {
                Error::SecretMissing {
                    name: name.to_string(),
                    message: "named by spec.tls does not exist in the cluster's namespace".into(),
                }
            })?;
        let empty = |key: &&str| secret.data.as_ref().and_then(|d| d.get(*key)).is_none_or(|v| v.0.is_empty());
        if let Some(key) = keys.into_iter().find(empty) {
            return Err(Error::SecretMissing { name: name.to_string(), message: format!("has no key {key:?}") });
        }
        // Read once: an unlabelled Secret is not in the store, and each look would be a GET.
        if name == ca_secret {
            ca = secret.data.as_ref().and_then(|d| d.get(CA_KEY)).map(|v| String::from_utf8_lossy(&v.0).into_owned());
        }
    }
    Ok(ca)
}
