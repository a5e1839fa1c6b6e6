//! RabbitClusters as a user handles them (kubectl), and what the tests read back (typed API).

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use warren::api::RabbitCluster;

use super::{kubectl, kubectl_stdin, ok, wait_for};

/// `kubectl apply` of a RabbitCluster manifest into `namespace`.
pub fn apply(namespace: &str, yaml: &str) {
    ok("kubectl apply RabbitCluster", kubectl_stdin(&["apply", "-n", namespace, "-f", "-"], yaml));
}

/// `kubectl patch --type merge` of a RabbitCluster.
pub fn patch(namespace: &str, name: &str, patch: &str) {
    ok(
        "kubectl patch RabbitCluster",
        kubectl(&["patch", "rabbitcluster", name, "-n", namespace, "--type", "merge", "-p", patch]),
    );
}

pub async fn get(client: &Client, namespace: &str, name: &str) -> RabbitCluster {
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), namespace);
    api.get(name).await.unwrap_or_else(|e| panic!("get RabbitCluster {namespace}/{name}: {e}"))
}

pub fn condition<'a>(cluster: &'a RabbitCluster, type_: &str) -> Option<&'a Condition> {
    cluster.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

pub fn summary(cluster: &RabbitCluster) -> String {
    match &cluster.status {
        None => "no status".into(),
        Some(s) => format!(
            "observedGeneration {:?} (generation {:?}), conditions: {}",
            s.observed_generation,
            cluster.metadata.generation,
            s.conditions
                .iter()
                .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// Waits until the status describes the current generation and `type_` has `status` (and `reason`
/// when given); returns the cluster as then read.
pub async fn wait_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> RabbitCluster {
    let what = format!("RabbitCluster {namespace}/{name} condition {type_}={status} {}", reason.unwrap_or(""));
    wait_for(&what, Duration::from_secs(60), || async {
        let cluster = get(client, namespace, name).await;
        let current = cluster.status.as_ref().and_then(|s| s.observed_generation) == cluster.metadata.generation;
        let matches =
            condition(&cluster, type_).is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r));
        if current && matches { Ok(cluster) } else { Err(summary(&cluster)) }
    })
    .await
}

/// The name and kind of every child the operator makes for RabbitCluster `name`.
pub fn child_names(name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("StatefulSet", name.to_string()),
        ("Service", format!("{name}-nodes")),
        ("Service", name.to_string()),
        ("Secret", format!("{name}-erlang-cookie")),
        ("Secret", format!("{name}-default-user")),
        ("ConfigMap", format!("{name}-config")),
        ("ServiceAccount", format!("{name}-rabbitmq")),
        ("PodDisruptionBudget", name.to_string()),
        ("NetworkPolicy", name.to_string()),
    ]
}

async fn owners<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<Vec<OwnerReference>>, String>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(found) => Ok(found.map(|o| o.owner_references().to_vec())),
        Err(e) => Err(format!("get {} {name}: {e}", K::kind(&()))),
    }
}

/// Owner references of each child: `None` for a child that does not exist.
pub async fn children(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<(String, Option<Vec<OwnerReference>>)>, String> {
    let mut found = Vec::new();
    for (kind, child) in child_names(name) {
        let refs = match kind {
            "StatefulSet" => owners::<StatefulSet>(client, namespace, &child).await?,
            "Service" => owners::<Service>(client, namespace, &child).await?,
            "Secret" => owners::<Secret>(client, namespace, &child).await?,
            "ConfigMap" => owners::<ConfigMap>(client, namespace, &child).await?,
            "ServiceAccount" => owners::<ServiceAccount>(client, namespace, &child).await?,
            "PodDisruptionBudget" => owners::<PodDisruptionBudget>(client, namespace, &child).await?,
            "NetworkPolicy" => owners::<NetworkPolicy>(client, namespace, &child).await?,
            other => unreachable!("child kind {other}"),
        };
        found.push((format!("{kind} {child}"), refs));
    }
    Ok(found)
}

pub async fn config_map(client: &Client, namespace: &str, name: &str) -> ConfigMap {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    api.get(&format!("{name}-config")).await.expect("the cluster's ConfigMap")
}

/// The user's rabbitmq.conf lines as the ConfigMap carries them (without the operator's comments).
pub fn additional_config(config_map: &ConfigMap) -> String {
    let text = config_map.data.as_ref().and_then(|d| d.get("90-additional.conf")).cloned().unwrap_or_default();
    text.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect()
}

/// A RabbitCluster manifest with `replicas` nodes and extra rabbitmq.conf lines.
pub fn manifest(name: &str, replicas: i32, additional_config: &str) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  \
         rabbitmq:\n    additionalConfig: {}\n",
        serde_json::to_string(additional_config).expect("json string")
    )
}
