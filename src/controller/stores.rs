//! What the controllers watch, kept in reflector stores: reconcile reads children here, never from
//! the API server, so a steady cluster costs the server neither writes nor reads.
//!
//! A store can lag a write the operator has just made. A child the store does not hold is looked
//! up with one GET before anything is created: applying a second, freshly generated Erlang cookie
//! or password over one the store had not seen yet would split the cluster or lock users out.

use std::fmt::Debug;
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::ByteString;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSpec, PodStatus, PodTemplateSpec,
    Secret, Service, ServiceAccount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::build::MANAGED_BY_LABEL;
use super::build::statefulset::{INTER_NODE_SERVER_ARGS, RABBITMQ_CONTAINER};
use super::namespaces::{self, WatchScope};
use crate::error::{Error, Result};

/// Readers of every watched kind.
#[derive(Clone)]
pub struct Stores {
    pub stateful_sets: Store<StatefulSet>,
    pub services: Store<Service>,
    pub config_maps: Store<ConfigMap>,
    /// The operator's own Secrets (Erlang cookie, default user).
    pub secrets: Store<Secret>,
    /// The users' Secrets labelled for the operator to watch (`WATCH_LABEL`): TLS certificates.
    pub watched_secrets: Store<Secret>,
    pub service_accounts: Store<ServiceAccount>,
    pub budgets: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    pub jobs: Store<Job>,
    /// The RabbitMQ pods (and migration Jobs' pods): their phase and whether they were scheduled.
    pub pods: Store<Pod>,
}

/// The writing halves, fed by the watches `controller::run` starts (or by a test).
pub struct Writers {
    pub stateful_sets: Writer<StatefulSet>,
    pub services: Writer<Service>,
    pub config_maps: Writer<ConfigMap>,
    pub secrets: Writer<Secret>,
    pub watched_secrets: Writer<Secret>,
    pub service_accounts: Writer<ServiceAccount>,
    pub budgets: Writer<PodDisruptionBudget>,
    pub network_policies: Writer<NetworkPolicy>,
    pub jobs: Writer<Job>,
    pub pods: Writer<Pod>,
}

/// Empty stores and their writers.
pub fn stores() -> (Stores, Writers) {
    let (stateful_sets, stateful_sets_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (config_maps, config_maps_w) = reflector::store();
    let (secrets, secrets_w) = reflector::store();
    let (watched_secrets, watched_secrets_w) = reflector::store();
    let (service_accounts, service_accounts_w) = reflector::store();
    let (budgets, budgets_w) = reflector::store();
    let (network_policies, network_policies_w) = reflector::store();
    let (jobs, jobs_w) = reflector::store();
    let (pods, pods_w) = reflector::store();
    (
        Stores {
            stateful_sets,
            services,
            config_maps,
            secrets,
            watched_secrets,
            service_accounts,
            budgets,
            network_policies,
            jobs,
            pods,
        },
        Writers {
            stateful_sets: stateful_sets_w,
            services: services_w,
            config_maps: config_maps_w,
            secrets: secrets_w,
            watched_secrets: watched_secrets_w,
            service_accounts: service_accounts_w,
            budgets: budgets_w,
            network_policies: network_policies_w,
            jobs: jobs_w,
            pods: pods_w,
        },
    )
}

impl Stores {
    /// Resolves once every store has had its first full list.
    pub async fn synced(&self) -> std::result::Result<(), reflector::store::WriterDropped> {
        self.stateful_sets.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.watched_secrets.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        self.budgets.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await?;
        self.jobs.wait_until_ready().await?;
        self.pods.wait_until_ready().await
    }
}

/// The object from its store; when the store does not hold it, from one GET (a store may not have
/// seen a create yet).
pub async fn cached<K>(client: &Client, store: &Store<K>, namespace: &str, name: &str) -> Result<Option<Arc<K>>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug,
{
    if let Some(object) = store.get(&ObjectRef::new(name).within(namespace)) {
        return Ok(Some(object));
    }
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let fetched = api.get_opt(name).await.map_err(|e| Error::kube(format!("get {} {name}", K::kind(&())), e))?;
    Ok(fetched.map(Arc::new))
}

/// A watch of `scope` that fills `writer` with each object as `slim` leaves it: only what a
/// reconcile reads. What an operator holds per cluster is its stores: whole objects (pod
/// templates, rendered configuration, managed fields) would cost it hundreds of KiB per cluster
/// for nothing.
pub fn reflect<K>(
    client: &Client,
    scope: &WatchScope,
    config: watcher::Config,
    writer: Writer<K>,
    slim: fn(&mut K),
) -> impl Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let reader = writer.as_reader();
    namespaces::watch(client, scope, config, slim, reader).reflect(writer).touched_objects()
}

/// What every kind keeps of its metadata: not the managed fields, nor kubectl's copy of the last
/// applied manifest (as large as the object). Names, uid, generation, labels, owners and the
/// applied-hash annotation stay.
pub fn slim_metadata<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A child whose content reconcile never reads (it compares the applied hash and the owner):
/// its metadata only.
pub fn metadata_only<K: Resource + Default>(object: &mut K) {
    slim_metadata(object);
    let meta = std::mem::take(object.meta_mut());
    *object = K::default();
    *object.meta_mut() = meta;
}

/// Of a StatefulSet, what reconcile reads: the replicas, the RabbitMQ container's image (the
/// version the pods run), each claim template's name and size (immutable: `controller::storage`)
/// whether it runs the Erlang distribution over TLS, and the status (without its conditions).
pub fn slim_stateful_set(stateful_set: &mut StatefulSet) {
    slim_metadata(stateful_set);
    if let Some(spec) = stateful_set.spec.as_mut() {
        let claim_templates = spec.volume_claim_templates.take().map(|templates| {
            templates
                .into_iter()
                .map(|t| PersistentVolumeClaim {
                    metadata: ObjectMeta { name: t.metadata.name, ..Default::default() },
                    spec: t.spec.map(|s| PersistentVolumeClaimSpec {
                        resources: s
                            .resources
                            .map(|r| VolumeResourceRequirements { requests: r.requests, limits: None }),
                        ..Default::default()
                    }),
                    status: None,
                })
                .collect()
        });
        let rabbitmq = spec
            .template
            .spec
            .as_mut()
            .and_then(|pod| pod.containers.drain(..).find(|c| c.name == RABBITMQ_CONTAINER))
            .map(|c| Container {
                name: c.name,
                image: c.image,
                // Whether the pods run the distribution over TLS (a change is refused while they run).
                env: c
                    .env
                    .map(|env| env.into_iter().filter(|e| e.name == INTER_NODE_SERVER_ARGS).collect::<Vec<_>>())
                    .filter(|env| !env.is_empty()),
                ..Default::default()
            });
        *spec = StatefulSetSpec {
            replicas: spec.replicas,
            volume_claim_templates: claim_templates,
            template: PodTemplateSpec {
                metadata: None,
                spec: Some(PodSpec { containers: rabbitmq.into_iter().collect(), ..Default::default() }),
            },
            ..Default::default()
        };
    }
    if let Some(status) = stateful_set.status.as_mut() {
        status.conditions = None;
    }
}

/// Of a Job, its status (the migration's phase).
pub fn slim_job(job: &mut Job) {
    slim_metadata(job);
    job.spec = None;
}

/// Of a pod, its metadata, phase, node and its PodScheduled and Ready conditions: whether the
/// scheduler could place it and why not, where it runs and whether it serves (`broker_step` names
/// unschedulable pods and where a missing member was from this store, without a read).
pub fn slim_pod(pod: &mut Pod) {
    slim_metadata(pod);
    let node_name = pod.spec.take().and_then(|s| s.node_name);
    pod.spec = Some(PodSpec { node_name, containers: Vec::new(), ..Default::default() });
    if let Some(status) = pod.status.take() {
        let kept = status
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "PodScheduled" || c.type_ == "Ready").collect::<Vec<_>>());
        pod.status = Some(PodStatus { phase: status.phase, conditions: kept, ..Default::default() });
    }
}

/// A RabbitCluster's RabbitMQ pods as the pods' store holds them (no read).
pub fn rabbitmq_pods(ctx: &super::Context, validated: &super::validate::ValidatedCluster) -> Vec<Arc<Pod>> {
    ctx.stores
        .pods
        .state()
        .into_iter()
        .filter(|pod| pod.namespace().as_deref() == Some(validated.namespace.as_str()))
        .filter(|pod| pod.labels().get(super::build::INSTANCE_LABEL) == Some(&validated.name))
        .filter(|pod| pod.labels().get(super::build::NAME_LABEL).is_some_and(|v| v == "rabbitmq"))
        .collect()
}

/// Whether a pod's Ready condition is true.
pub fn pod_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The key of a cert-manager Secret that holds the CA certificate.
pub const CA_KEY: &str = "ca.crt";

/// The label (value `true`) by which a user tells the operator to watch a Secret of theirs that a
/// RabbitCluster names (its TLS certificate and CA): the operator then sees it renewed, created or
/// deleted as it happens. It watches no other Secret than its own; an unlabelled TLS Secret is
/// read with a GET at each reconcile instead.
pub const WATCH_LABEL: &str = "warren.dev/watch";

/// Of a Secret that is not the operator's own, the store keeps which keys are there and whether
/// they are empty, all the TLS check asks, and a CA certificate (public by nature), which the
/// operator verifies a TLS cluster's management API against: never a private key.
pub fn slim_secret(secret: &mut Secret) {
    slim_metadata(secret);
    if secret.labels().get(MANAGED_BY_LABEL).is_some_and(|v| v == "warren") {
        return;
    }
    for (key, value) in secret.data.iter_mut().flat_map(|data| data.iter_mut()) {
        if key != CA_KEY {
            *value = ByteString(if value.0.is_empty() { Vec::new() } else { vec![1] });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(labels: &[(&str, &str)], data: &[(&str, &[u8])]) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        secret.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect());
        secret
    }

    #[test]
    fn a_stateful_set_keeps_its_replicas_image_status_and_applied_hash() {
        let stateful_set: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "demo", "generation": 3,
                "annotations": {
                    "warren.dev/applied-hash": "abc",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"a\": \"whole copy\"}"
                },
                "managedFields": [{"manager": "warren", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
                                     "name": "demo", "uid": "u1", "controller": true}]
            },
            "spec": {
                "replicas": 3, "serviceName": "demo-nodes",
                "selector": {"matchLabels": {"app": "demo"}},
                "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": {"app": "demo"}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}],
                "template": {"spec": {
                    "initContainers": [{"name": "setup", "image": "busybox"}],
                    "containers": [
                        {"name": "rabbitmq", "image": "rabbitmq:4.3.6-management",
                         "env": [{"name": "RABBITMQ_NODENAME", "value": "rabbit@x"},
                                 {"name": "RABBITMQ_USE_LONGNAME", "value": "true"},
                                 {"name": "RABBITMQ_MNESIA_BASE", "value": "/var/lib/rabbitmq/mnesia"},
                                 {"name": "RABBITMQ_ENABLED_PLUGINS_FILE", "value": "/etc/warren/config/enabled_plugins"},
                                 {"name": "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "value": "-proto_dist inet_tls"}],
                         "readinessProbe": {"exec": {"command": ["/bin/bash", "/etc/warren/config/ready.sh"]}}},
                        {"name": "exporter", "image": "other"}
                    ]
                }}
            },
            "status": {"replicas": 3, "readyReplicas": 2, "observedGeneration": 3,
                       "conditions": [{"type": "Available", "status": "True"}]}
        }))
        .expect("StatefulSet");
        let mut slim = stateful_set.clone();
        slim_stateful_set(&mut slim);
        let spec = slim.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(pod.containers.len(), 1);
        assert_eq!(pod.containers[0].image.as_deref(), Some("rabbitmq:4.3.6-management"));
        // Of the environment, only whether the distribution runs over TLS.
        let env = pod.containers[0].env.as_ref().expect("the distribution's arguments");
        assert_eq!(env.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]);
        assert!(pod.init_containers.is_none());
        assert!(spec.service_name.is_none());
        // Of the claim template, its name and size (a size change cannot be applied to it).
        let template = &spec.volume_claim_templates.as_ref().expect("claim templates")[0];
        assert_eq!(template.metadata.name.as_deref(), Some("data"));
        assert!(template.metadata.labels.is_none());
        let claim = template.spec.as_ref().expect("claim spec");
        assert_eq!(
            claim.resources.as_ref().and_then(|r| r.requests.as_ref()).map(|r| r["storage"].0.as_str()),
            Some("10Gi")
        );
        assert!(claim.access_modes.is_none());
        let status = slim.status.as_ref().expect("status");
        assert_eq!(
            (status.ready_replicas, status.observed_generation, status.conditions.is_none()),
            (Some(2), Some(3), true)
        );
        assert!(slim.metadata.managed_fields.is_none());
        let annotations = slim.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations.keys().collect::<Vec<_>>(), ["warren.dev/applied-hash"]);
        assert_eq!(slim.metadata.owner_references, stateful_set.metadata.owner_references);
        assert_eq!(slim.metadata.generation, Some(3));
        let (whole, kept) =
            (serde_json::to_vec(&stateful_set).unwrap().len(), serde_json::to_vec(&slim).unwrap().len());
        assert!(kept < whole / 2, "{kept} of {whole} bytes kept");
    }

    #[test]
    fn a_child_whose_content_is_never_read_keeps_its_metadata_only() {
        let mut config_map = ConfigMap::default();
        config_map.metadata.name = Some("demo-config".into());
        config_map.metadata.uid = Some("u2".into());
        config_map.data = Some([("rabbitmq.conf".to_string(), "x".repeat(4096))].into());
        metadata_only(&mut config_map);
        assert_eq!(
            (config_map.metadata.name.as_deref(), config_map.metadata.uid.as_deref()),
            (Some("demo-config"), Some("u2"))
        );
        assert!(config_map.data.is_none());
    }

    #[test]
    fn only_the_operators_secrets_keep_their_values() {
        let mut own = secret(&[(MANAGED_BY_LABEL, "warren")], &[("password", b"s3cret")]);
        slim_secret(&mut own);
        assert_eq!(own.data.unwrap()["password"].0, b"s3cret");

        let mut users = secret(&[], &[("tls.crt", b"-----BEGIN CERTIFICATE-----"), ("ca.crt", b"")]);
        slim_secret(&mut users);
        let data = users.data.unwrap();
        assert_eq!(data["tls.crt"].0, vec![1], "present and not empty, the value itself dropped");
        assert!(data["ca.crt"].0.is_empty(), "an empty key stays empty");

        // A CA certificate is public: kept, for verifying the cluster's management API.
        let key: &[u8] = b"-----BEGIN PRIVATE KEY-----";
        let mut tls = secret(&[], &[("tls.key", key), ("ca.crt", b"-----BEGIN CERTIFICATE-----")]);
        slim_secret(&mut tls);
        let data = tls.data.unwrap();
        assert_eq!(
            (data["tls.key"].0.as_slice(), data["ca.crt"].0.as_slice()),
            (&[1u8][..], &b"-----BEGIN CERTIFICATE-----"[..])
        );
    }
}
