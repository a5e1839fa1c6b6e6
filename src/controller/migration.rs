//! The RabbitMigration controller: one Job running `warren migrate`, its outcome in status.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Context;
use crate::api::{MigrationEndpoint, RabbitMigration, RabbitMigrationStatus};
use crate::error::{Error, Result};
use crate::migrate::report::Summary;

/// The Job's image when the resource names none: this operator's own release.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/warren-dev/warren:", env!("CARGO_PKG_VERSION"));
/// A rerun is safe (nothing leaves the source unconfirmed), so failed pods are retried.
const BACKOFF_LIMIT: i32 = 4;
/// Where the Job's container leaves its summary (the kubelet's termination message).
const TERMINATION_LOG: &str = "/dev/termination-log";

pub fn job_name(migration: &RabbitMigration) -> String {
    format!("{}-migrate", migration.name_any())
}

fn secret_env(name: &str, secret: &str, key: &str) -> serde_json::Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
}

/// The environment of one side: addresses in plain values, credentials only as Secret references.
fn endpoint_env(
    side: &str,
    endpoint: &MigrationEndpoint,
    namespace: &str,
    domain: &str,
) -> Result<Vec<serde_json::Value>> {
    let invalid = |message: String| Error::InvalidSpec { reason: "InvalidSpec", message };
    let (host, secret) = match (&endpoint.cluster_ref, &endpoint.host, &endpoint.credentials_secret) {
        (Some(cluster), None, _) => (format!("{cluster}.{namespace}.svc.{domain}"), format!("{cluster}-default-user")),
        (None, Some(host), Some(secret)) => (host.clone(), secret.clone()),
        _ => return Err(invalid(format!("{side}: set clusterRef, or host with credentialsSecret"))),
    };
    let (amqp_port, api_port) = match endpoint.cluster_ref {
        Some(_) => (5672, 15672),
        None => (endpoint.amqp_port, endpoint.management_port),
    };
    let upper = side.to_uppercase();
    Ok(vec![
        json!({"name": format!("WARREN_{upper}_URI"), "value": format!("amqp://{host}:{amqp_port}/")}),
        json!({"name": format!("WARREN_{upper}_API"), "value": format!("http://{host}:{api_port}")}),
        secret_env(&format!("WARREN_{upper}_USERNAME"), &secret, "username"),
        secret_env(&format!("WARREN_{upper}_PASSWORD"), &secret, "password"),
    ])
}

/// The Job of a RabbitMigration (pure: tested from fixtures).
pub fn build_job(migration: &RabbitMigration, default_image: &str, domain: &str) -> Result<Job> {
    let namespace = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let mut env = endpoint_env("source", &spec.source, &namespace, domain)?;
    env.extend(endpoint_env("target", &spec.target, &namespace, domain)?);
    env.push(json!({"name": "WARREN_LOG_FORMAT", "value": "json"}));
    // The summary the operator reads back into status (per-queue counts, the error).
    env.push(json!({"name": "WARREN_TERMINATION_LOG", "value": TERMINATION_LOG}));
    let mut args = vec!["migrate".to_string()];
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
    for (flag, on) in
        [("--convert-to-quorum", spec.convert_to_quorum), ("--follow", spec.follow), ("--force", spec.force)]
    {
        if on {
            args.push(flag.into());
        }
    }
    let owner = OwnerReference {
        api_version: RabbitMigration::api_version(&()).into(),
        kind: RabbitMigration::kind(&()).into(),
        name: migration.name_any(),
        uid: migration.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let labels = json!({"app.kubernetes.io/name": "warren-migrate", "app.kubernetes.io/instance": migration.name_any(),
                        "app.kubernetes.io/managed-by": "warren"});
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(migration), "namespace": namespace, "labels": labels, "ownerReferences": [owner]},
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "migrate",
                        "image": spec.image.clone().unwrap_or_else(|| default_image.to_string()),
                        "args": args,
                        "env": env,
                        "terminationMessagePath": TERMINATION_LOG,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
                    }]
                }
            }
        }
    });
    serde_json::from_value(job)
        .map_err(|e| Error::Serialization { what: format!("Job {}", job_name(migration)), source: e })
}

/// Pending, Running, Succeeded or Failed, from the Job's status.
pub fn phase(job: &Job) -> &'static str {
    let status = job.status.clone().unwrap_or_default();
    let failed = status.conditions.iter().flatten().any(|c| c.type_ == "Failed" && c.status == "True");
    let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
    if complete || status.succeeded.unwrap_or(0) > 0 {
        "Succeeded"
    } else if failed {
        "Failed"
    } else if status.active.unwrap_or(0) > 0 {
        "Running"
    } else {
        "Pending"
    }
}

pub async fn reconcile(migration: Arc<RabbitMigration>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = migration.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = job_name(&migration);
    let job = match super::stores::cached(&ctx.stores.jobs, &jobs, &namespace, &name).await? {
        Some(job) => job,
        None => {
            let job = match build_job(&migration, &ctx.migration_image, &ctx.settings.cluster_domain) {
                Ok(job) => job,
                Err(error) => {
                    ctx.publish(
                        &migration.object_ref(&()),
                        EventType::Warning,
                        error.reason(),
                        "Validate",
                        error.to_string(),
                    )
                    .await;
                    let complete = Some((false, error.reason().to_string(), error.to_string()));
                    write_status(&ctx, &migration, "Failed", None, complete, None).await?;
                    return Ok(Action::await_change());
                }
            };
            let created = jobs
                .create(&PostParams::default(), &job)
                .await
                .map_err(|e| Error::kube(format!("create Job {name}"), e))?;
            ctx.publish(
                &migration.object_ref(&()),
                EventType::Normal,
                "JobCreated",
                "Migrate",
                format!("created Job {name}"),
            )
            .await;
            Arc::new(created)
        }
    };
    let phase = phase(&job);
    let before = migration.status.as_ref().and_then(|s| s.phase.clone());
    // The Job just finished: its own report (per-queue counts, what stopped it) is read once and
    // the Complete condition set; later passes keep what was written then.
    let finishing = matches!(phase, "Succeeded" | "Failed") && before.as_deref() != Some(phase);
    let summary = if finishing { last_summary(&ctx, &namespace, &name).await } else { None };
    let complete = if finishing { completion(&name, phase, summary.as_ref()) } else { None };
    if let Some((_, reason, message)) = &complete {
        let type_ = if phase == "Failed" { EventType::Warning } else { EventType::Normal };
        let note = format!("Job {name}: {message}");
        ctx.publish(&migration.object_ref(&()), type_, reason.as_str(), "Migrate", note).await;
    }
    let summary = summary.and_then(|s| s.ok());
    write_status(&ctx, &migration, phase, Some(name), complete, summary).await?;
    Ok(Action::await_change())
}

/// The `Complete` condition for a finished Job — (status, reason, message) — from the summary its
/// last pod left, when there is one.
pub fn completion(
    job: &str,
    phase: &str,
    summary: Option<&std::result::Result<Summary, String>>,
) -> Option<(bool, String, String)> {
    match (phase, summary) {
        ("Succeeded", Some(Ok(s))) => Some((
            true,
            "Succeeded".to_string(),
            format!(
                "{} messages moved from {} queue(s) and verified",
                s.moved,
                s.queues.len() as u64 + s.omitted_queues
            ),
        )),
        ("Succeeded", _) => Some((true, "Succeeded".to_string(), "every queue moved and verified".to_string())),
        ("Failed", Some(Ok(Summary { error: Some(e), .. }))) => {
            Some((false, reason_of(&e.reason), format!("{}: {}", e.phase, e.message)))
        }
        ("Failed", Some(Ok(s))) => Some((
            false,
            "Incomplete".to_string(),
            format!(
                "{} messages moved; {} queue(s) not fully moved (see status.queues)",
                s.moved,
                s.queues.iter().filter(|q| q.left > 0 || q.refused > 0 || q.error.is_some()).count()
            ),
        )),
        ("Failed", Some(Err(text))) => Some((false, "JobFailed".to_string(), format!("Job {job} failed: {text}"))),
        ("Failed", None) => Some((false, "JobFailed".to_string(), format!("Job {job} failed; see its pods' logs"))),
        _ => None,
    }
}

/// The migrator's reason when it is a valid condition reason, else a generic one.
fn reason_of(reason: &str) -> String {
    let valid = reason.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && reason.chars().all(|c| c.is_ascii_alphanumeric())
        && reason.len() <= 64;
    if valid { reason.to_string() } else { "MigrationFailed".to_string() }
}

/// The termination message of the Job's most recently finished pod: the migrator's summary, or
/// the raw text when it is not one (the end of the log, when the container failed without one).
async fn last_summary(ctx: &Context, namespace: &str, job: &str) -> Option<std::result::Result<Summary, String>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = match pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await {
        Ok(list) => list,
        Err(error) => {
            tracing::warn!(job, %error, "cannot read the migration pods' termination messages");
            return None;
        }
    };
    let mut finished: Vec<(Time, String)> = list
        .items
        .iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
            let terminated = status.state.as_ref()?.terminated.as_ref()?;
            Some((terminated.finished_at.clone()?, terminated.message.clone()?))
        })
        .collect();
    finished.sort_by_key(|(at, _)| at.0);
    let (_, message) = finished.pop()?;
    Some(serde_json::from_str(&message).map_err(|_| message.chars().take(500).collect()))
}

async fn write_status(
    ctx: &Context,
    migration: &RabbitMigration,
    phase: &str,
    job_name: Option<String>,
    complete: Option<(bool, String, String)>,
    summary: Option<Summary>,
) -> Result<()> {
    let previous = migration.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    if let Some((ok, reason, message)) = complete {
        let status = if ok { "True" } else { "False" };
        if !conditions.iter().any(|c| c.type_ == "Complete" && c.status == status && c.reason == reason) {
            conditions.retain(|c| c.type_ != "Complete");
            conditions.push(Condition {
                type_: "Complete".into(),
                status: status.into(),
                reason,
                message,
                observed_generation: migration.meta().generation,
                last_transition_time: Time(jiff::Timestamp::now()),
            });
        }
    }
    let (moved, queues, omitted_queues) = match summary {
        Some(s) => (Some(s.moved), s.queues, (s.omitted_queues > 0).then_some(s.omitted_queues)),
        None => (previous.moved, previous.queues.clone(), previous.omitted_queues),
    };
    let next = RabbitMigrationStatus {
        phase: Some(phase.to_string()),
        job_name: job_name.or(previous.job_name.clone()),
        observed_generation: migration.meta().generation,
        conditions,
        moved,
        queues,
        omitted_queues,
    };
    super::status::apply(&ctx.client, migration, migration.status.as_ref(), &next).await
}
