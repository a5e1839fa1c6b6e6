//! The Job of a RabbitMigration: `warren migrate`, the two sides' addresses as plain values and
//! their credentials only as Secret references. A side named by `clusterRef` is reached the way
//! the cluster's own builders name it: its client Service, its default-user Secret, its ports.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use super::secrets::{PASSWORD_KEY, USERNAME_KEY};
use super::services::{AMQP_PORT, AMQPS_PORT, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT};
use super::{INSTANCE_LABEL, MANAGED_BY_LABEL, NAME_LABEL, client_service_name, default_user_secret_name};
use crate::api::{MigrationEndpoint, RabbitMigration, RabbitMigrationSpec, TlsSpec};
use crate::error::{Error, Result, SpecReason};
use crate::migrate::budget;

/// The Job's image when the resource names none: this operator's own release.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/warren-dev/warren:", env!("CARGO_PKG_VERSION"));
/// A rerun is safe (nothing leaves the source unconfirmed), so failed pods are retried.
const BACKOFF_LIMIT: i32 = 4;
/// Where the Job's container leaves its summary (the kubelet's termination message).
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The non-root user of the image.
const RUN_AS: i64 = 65532;

pub fn job_name(migration: &RabbitMigration) -> String {
    format!("{}-migrate", migration.name_any())
}

fn value_env(name: String, value: String) -> EnvVar {
    EnvVar { name, value: Some(value), value_from: None }
}

fn secret_env(name: String, secret: &str, key: &str) -> EnvVar {
    let selector = SecretKeySelector { name: secret.to_string(), key: key.to_string(), optional: None };
    EnvVar {
        name,
        value: None,
        value_from: Some(EnvVarSource { secret_key_ref: Some(selector), ..Default::default() }),
    }
}

/// What one side gives the Job: its environment, and with a TLS cluster the volume of its CA.
struct Side {
    env: Vec<EnvVar>,
    ca: Option<(Volume, VolumeMount)>,
}

/// The environment of one side. A `clusterRef` side whose RabbitCluster has TLS (`tls`) is reached
/// over AMQPS and HTTPS, its certificate verified against the `ca.crt` of its Secret, mounted.
fn endpoint_side(
    side: &str,
    endpoint: &MigrationEndpoint,
    namespace: &str,
    domain: &str,
    tls: Option<&TlsSpec>,
) -> Result<Side> {
    let upper = side.to_uppercase();
    let (host, secret, mut amqp, mut api) = match (&endpoint.cluster_ref, &endpoint.host, &endpoint.credentials_secret)
    {
        (Some(cluster), None, _) => {
            let host = format!("{}.{namespace}.svc.{domain}", client_service_name(cluster));
            let (amqp, api) = (format!("amqp://{host}:{AMQP_PORT}/"), format!("http://{host}:{MANAGEMENT_PORT}"));
            (host, default_user_secret_name(cluster), amqp, api)
        }
        (None, Some(host), Some(secret)) => {
            let amqp = format!("amqp://{host}:{}/", endpoint.amqp_port);
            (host.clone(), secret.clone(), amqp, format!("http://{host}:{}", endpoint.management_port))
        }
        _ => {
            return Err(Error::InvalidSpec {
                reason: SpecReason::InvalidSpec,
                message: format!("{side}: set clusterRef, or host with credentialsSecret"),
            });
        }
    };
    let mut ca = None;
    let mut env = Vec::new();
    if let (Some(tls), Some(_)) = (tls, &endpoint.cluster_ref) {
        (amqp, api) = (format!("amqps://{host}:{AMQPS_PORT}/"), format!("https://{host}:{MANAGEMENT_TLS_PORT}"));
        let (volume_name, dir) = (format!("{side}-ca"), format!("/etc/warren/{side}-ca"));
        let secret = tls.ca_secret_name.clone().unwrap_or_else(|| tls.secret_name.clone());
        let volume = Volume {
            name: volume_name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                items: Some(vec![KeyToPath { key: "ca.crt".into(), path: "ca.crt".into(), mode: None }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mount =
            VolumeMount { name: volume_name, mount_path: dir.clone(), read_only: Some(true), ..Default::default() };
        env.push(value_env(format!("WARREN_{upper}_CA"), format!("{dir}/ca.crt")));
        ca = Some((volume, mount));
    }
    env.extend([
        value_env(format!("WARREN_{upper}_URI"), amqp),
        value_env(format!("WARREN_{upper}_API"), api),
        secret_env(format!("WARREN_{upper}_USERNAME"), &secret, USERNAME_KEY),
        secret_env(format!("WARREN_{upper}_PASSWORD"), &secret, PASSWORD_KEY),
    ]);
    Ok(Side { env, ca })
}

/// Memory of the Job's container when the spec does not say.
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";
pub const DEFAULT_MEMORY_LIMIT: &str = "512Mi";
const DEFAULT_CPU_REQUEST: &str = "250m";

fn invalid(message: String) -> Error {
    Error::InvalidSpec { reason: SpecReason::InvalidResources, message }
}

/// The container's resources: the spec's, with the defaults for what it leaves out.
fn resources(spec: &RabbitMigrationSpec) -> ResourceRequirements {
    let mut resources = spec.resources.clone().unwrap_or_default();
    let requests = resources.requests.get_or_insert_with(BTreeMap::new);
    requests.entry("cpu".into()).or_insert_with(|| Quantity(DEFAULT_CPU_REQUEST.into()));
    requests.entry("memory".into()).or_insert_with(|| Quantity(DEFAULT_MEMORY_REQUEST.into()));
    let limits = resources.limits.get_or_insert_with(BTreeMap::new);
    limits.entry("memory".into()).or_insert_with(|| Quantity(DEFAULT_MEMORY_LIMIT.into()));
    resources
}

/// The in-flight budget in bytes: the spec's, or a share of the memory limit; refused when the
/// limit could not hold it.
fn max_in_flight(spec: &RabbitMigrationSpec, resources: &ResourceRequirements) -> Result<u64> {
    let limit = resources.limits.as_ref().and_then(|l| l.get("memory")).map(|q| q.0.as_str()).unwrap_or_default();
    let limit_bytes = budget::parse_size(limit).map_err(|e| invalid(format!("spec.resources.limits.memory: {e}")))?;
    let Some(asked) = &spec.max_in_flight else { return Ok(budget::for_limit(limit_bytes)) };
    let bytes = budget::parse_size(asked).map_err(|e| invalid(format!("spec.maxInFlight: {e}")))?;
    if bytes == 0 || bytes > limit_bytes / 4 {
        return Err(invalid(format!(
            "spec.maxInFlight {asked} must be more than 0 and at most a quarter of the memory limit {limit} (a \
             message in flight can take three times its size): lower it or raise spec.resources.limits.memory"
        )));
    }
    Ok(bytes)
}

/// `warren migrate` and its flags, from the spec.
fn args(migration: &RabbitMigration, max_in_flight: u64) -> Vec<String> {
    let spec = &migration.spec;
    let mut args = vec!["migrate".to_string(), "--max-in-flight".into(), max_in_flight.to_string()];
    for vhost in &spec.vhosts {
        args.extend(["--vhost".into(), vhost.clone()]);
    }
    let options: [(&str, Option<&String>); 3] = [
        ("--queues", spec.queues.as_ref()),
        ("--idle-timeout", spec.idle_timeout.as_ref()),
        ("--wait-for-consumers", spec.wait_for_consumers.as_ref()),
    ];
    for (flag, value) in options {
        if let Some(value) = value {
            args.extend([flag.to_string(), value.clone()]);
        }
    }
    for (flag, on) in [
        ("--convert-to-quorum", spec.convert_to_quorum),
        ("--keep-classic", spec.keep_classic),
        ("--follow", spec.follow),
        ("--force", spec.force),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    args
}

/// The label a Secret carries (value `true`) to be usable as a RabbitMigration's
/// `credentialsSecret`: without it, anyone who may create a RabbitMigration could have the
/// operator's Job send any Secret of the namespace to a host of their choosing.
pub const MIGRATION_CREDENTIALS_LABEL: &str = "warren.dev/migration-credentials";

/// Whether a Secret with these labels may be handed to a migration Job.
pub fn meant_for_migrations(labels: &BTreeMap<String, String>) -> bool {
    labels.get(MIGRATION_CREDENTIALS_LABEL).is_some_and(|v| v == "true")
}

/// The Job's image: the operator's own, or the spec's when the operator allows it (the chart's
/// `migration.allowImageOverride`): a Job runs with the credentials of both clusters.
fn image(spec: &RabbitMigrationSpec, default_image: &str, allow_override: bool) -> Result<String> {
    match &spec.image {
        None => Ok(default_image.to_string()),
        Some(image) if image == default_image || allow_override => Ok(image.clone()),
        Some(image) => Err(Error::InvalidSpec {
            reason: SpecReason::ImageNotPermitted,
            message: format!(
                "spec.image {image}: this operator runs migration Jobs with its own image ({default_image}) only; \
                 remove spec.image, or install the chart with migration.allowImageOverride=true"
            ),
        }),
    }
}

/// The TLS of the RabbitClusters a migration names by `clusterRef`, by name (those without TLS
/// are absent).
pub type ClustersTls = BTreeMap<String, TlsSpec>;

/// The Job of `migration` (pure: tested from fixtures).
pub fn migration_job(
    migration: &RabbitMigration,
    default_image: &str,
    allow_image_override: bool,
    domain: &str,
    clusters_tls: &ClustersTls,
) -> Result<Job> {
    let namespace = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let image = image(spec, default_image, allow_image_override)?;
    let resources = resources(spec);
    let max_in_flight = max_in_flight(spec, &resources)?;
    let tls_of = |endpoint: &MigrationEndpoint| endpoint.cluster_ref.as_ref().and_then(|c| clusters_tls.get(c));
    let source = endpoint_side("source", &spec.source, &namespace, domain, tls_of(&spec.source))?;
    let target = endpoint_side("target", &spec.target, &namespace, domain, tls_of(&spec.target))?;
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    for (volume, mount) in [source.ca, target.ca].into_iter().flatten() {
        volumes.push(volume);
        mounts.push(mount);
    }
    let mut env = source.env;
    env.extend(target.env);
    env.push(value_env("WARREN_LOG_FORMAT".into(), "json".into()));
    // The summary the operator reads back into status (per-queue counts, the error).
    env.push(value_env("WARREN_TERMINATION_LOG".into(), TERMINATION_LOG.into()));
    let owner = OwnerReference {
        api_version: RabbitMigration::api_version(&()).into(),
        kind: RabbitMigration::kind(&()).into(),
        name: migration.name_any(),
        uid: migration.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let labels = BTreeMap::from([
        (NAME_LABEL.to_string(), "warren-migrate".to_string()),
        (INSTANCE_LABEL.to_string(), migration.name_any()),
        (MANAGED_BY_LABEL.to_string(), "warren".to_string()),
    ]);
    let container = Container {
        name: "migrate".into(),
        image: Some(image),
        args: Some(args(migration, max_in_flight)),
        env: Some(env),
        termination_message_path: Some(TERMINATION_LOG.into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        resources: Some(resources),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        containers: vec![container],
        volumes: (!volumes.is_empty()).then_some(volumes),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(migration)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(BACKOFF_LIMIT),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    })
}
