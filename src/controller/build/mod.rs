//! Step 2 of reconcile: a `ValidatedCluster` becomes every child object. Pure: no client.

mod config;
pub mod job;
pub mod network_policy;
mod pdb;
pub mod secrets;
pub mod services;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use config::config_hash;
pub use secrets::Credentials;

use super::validate::ValidatedCluster;

/// Label keys the operator sets on every child.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Annotation on the pod template: a hash of the configuration, so a config change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "warren.dev/config-hash";

/// Every object a RabbitCluster owns. `apply` destructures it without `..`, so a child added here
/// and forgotten there fails to compile.
#[derive(Clone, Debug)]
pub struct Resources {
    pub headless_service: Service,
    pub client_service: Service,
    pub erlang_cookie_secret: Secret,
    pub default_user_secret: Secret,
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub pod_disruption_budget: PodDisruptionBudget,
    /// None when `spec.networkPolicy.enabled` is off (one the operator made is then deleted).
    pub network_policy: Option<NetworkPolicy>,
    pub stateful_set: StatefulSet,
}

/// Builds every child. `credentials` come from the existing Secrets (or are generated once, by the
/// caller), so that building stays pure and the cookie never changes.
pub fn build(cluster: &ValidatedCluster, credentials: &Credentials) -> Resources {
    let config_map = config::config_map(cluster);
    Resources {
        headless_service: services::headless_service(cluster),
        client_service: services::client_service(cluster),
        erlang_cookie_secret: secrets::erlang_cookie_secret(cluster, credentials),
        default_user_secret: secrets::default_user_secret(cluster, credentials),
        service_account: ServiceAccount {
            metadata: child_meta(cluster, &cluster.service_account_name()),
            // Nodes form the cluster with join_cluster, not Kubernetes peer discovery: no API token.
            automount_service_account_token: Some(false),
            ..Default::default()
        },
        pod_disruption_budget: pdb::pod_disruption_budget(cluster),
        network_policy: network_policy::network_policy(cluster),
        stateful_set: statefulset::stateful_set(cluster, &config_hash(&config_map)),
        config_map,
    }
}

/// Labels that select a cluster's pods.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_string(), "rabbitmq".to_string()), (INSTANCE_LABEL.to_string(), name.to_string())])
}

/// The selector of a cluster's pods as one string (`kubectl get pods -l`, the scale subresource).
pub fn selector_string(name: &str) -> String {
    selector_labels(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels on every child.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(name);
    labels.insert(MANAGED_BY_LABEL.to_string(), "warren".to_string());
    labels
}

fn child_meta(cluster: &ValidatedCluster, name: &str) -> ObjectMeta {
    ObjectMeta { owner_references: Some(vec![cluster.owner.clone()]), ..kept_meta(cluster, name) }
}

/// A credential the data depends on (the Erlang cookie, the default user): no owner reference, so
/// it outlives the RabbitCluster as the claims do (a GitOps prune and re-sync, a deletion by
/// mistake), and the re-created RabbitCluster adopts it by its labels. Deleted only by the user.
fn kept_meta(cluster: &ValidatedCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(cluster.namespace.clone()),
        labels: Some(labels(&cluster.name)),
        ..Default::default()
    }
}

/// The Service clients of the RabbitCluster `cluster` connect to (a migration's `clusterRef` too).
pub fn client_service_name(cluster: &str) -> String {
    cluster.to_string()
}

/// The Secret of the RabbitCluster `cluster`'s default user.
pub fn default_user_secret_name(cluster: &str) -> String {
    format!("{cluster}-default-user")
}

/// Names of the children, derived from the RabbitCluster's name.
impl ValidatedCluster {
    pub fn stateful_set_name(&self) -> String {
        self.name.clone()
    }
    pub fn network_policy_name(&self) -> String {
        self.name.clone()
    }
    pub fn headless_service_name(&self) -> String {
        format!("{}-nodes", self.name)
    }
    pub fn client_service_name(&self) -> String {
        client_service_name(&self.name)
    }
    pub fn erlang_cookie_secret_name(&self) -> String {
        format!("{}-erlang-cookie", self.name)
    }
    pub fn default_user_secret_name(&self) -> String {
        default_user_secret_name(&self.name)
    }
    pub fn config_map_name(&self) -> String {
        format!("{}-config", self.name)
    }
    pub fn service_account_name(&self) -> String {
        format!("{}-rabbitmq", self.name)
    }
    /// DNS domain of the pods: `<headless>.<namespace>.svc.<cluster domain>`.
    pub fn peer_domain(&self) -> String {
        format!("{}.{}.svc.{}", self.headless_service_name(), self.namespace, self.cluster_domain)
    }
    /// Stable DNS name of pod `ordinal`.
    pub fn pod_host(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}.{}", self.stateful_set_name(), self.peer_domain())
    }
    /// The PersistentVolumeClaim of pod `ordinal`, as the StatefulSet's claim template names it.
    pub fn claim_name(&self, ordinal: i32) -> String {
        format!("{}-{}-{ordinal}", statefulset::DATA_VOLUME, self.stateful_set_name())
    }
    /// RabbitMQ node name of pod `ordinal` (long names: the pods' FQDNs).
    pub fn node_name(&self, ordinal: i32) -> String {
        format!("rabbit@{}", self.pod_host(ordinal))
    }
    /// DNS name of the client Service.
    pub fn client_service_host(&self) -> String {
        format!("{}.{}.svc.{}", self.client_service_name(), self.namespace, self.cluster_domain)
    }
}
