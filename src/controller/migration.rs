//! The RabbitMigration controller: one Job running `warren migrate`, its outcome in status.

use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use super::Context;
pub use super::build::job::{
    ClustersTls, DEFAULT_IMAGE, MIGRATION_CREDENTIALS_LABEL, job_name, meant_for_migrations, migration_job,
};
use super::conditions::{self, Verdict};
use crate::api::{MigrationPhase, RabbitCluster, RabbitMigration, RabbitMigrationStatus};
use crate::error::{Error, Result, SpecReason};
use crate::migrate::report::Summary;

/// The phase of a Job.
pub fn phase(job: &Job) -> MigrationPhase {
    let status = job.status.clone().unwrap_or_default();
    let failed = status.conditions.iter().flatten().any(|c| c.type_ == "Failed" && c.status == "True");
    let complete = status.conditions.iter().flatten().any(|c| c.type_ == "Complete" && c.status == "True");
    if complete || status.succeeded.unwrap_or(0) > 0 {
        MigrationPhase::Succeeded
    } else if failed {
        MigrationPhase::Failed
    } else if status.active.unwrap_or(0) > 0 {
        MigrationPhase::Running
    } else {
        MigrationPhase::Pending
    }
}

/// One reconcile of one RabbitMigration; its log lines carry the migration's namespace/name.
pub async fn reconcile(migration: Arc<RabbitMigration>, ctx: Arc<Context>) -> Result<Action> {
    let key = format!("{}/{}", migration.namespace().unwrap_or_default(), migration.name_any());
    reconcile_migration(migration, ctx).instrument(tracing::info_span!("reconcile", migration = %key)).await
}

async fn reconcile_migration(migration: Arc<RabbitMigration>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = migration.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = job_name(&migration);
    let job = match super::stores::cached(&ctx.client, &ctx.stores.jobs, &namespace, &name).await? {
        Some(job) => job,
        None => {
            let built = match credentials_permitted(&ctx, &migration).await {
                Ok(()) => match clusters_tls(&ctx, &migration).await {
                    Ok(tls) => migration_job(
                        &migration,
                        &ctx.config.migration_image,
                        ctx.config.allow_migration_image,
                        &ctx.config.settings.cluster_domain,
                        &tls,
                    ),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            let job = match built {
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
                    write_status(&ctx, &migration, MigrationPhase::Failed, None, complete, None).await?;
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
    let before = migration.status.as_ref().and_then(|s| s.phase);
    // The Job just finished: its own report (per-queue counts, what stopped it) is read once and
    // the Complete condition set; later passes keep what was written then.
    let finishing = phase.finished() && before != Some(phase);
    let summary = if finishing { last_summary(&ctx, &namespace, &name).await } else { None };
    let complete = if finishing { completion(&name, phase, summary.as_ref()) } else { None };
    if let Some((_, reason, message)) = &complete {
        let type_ = if phase == MigrationPhase::Failed { EventType::Warning } else { EventType::Normal };
        let note = format!("Job {name}: {message}");
        ctx.publish(&migration.object_ref(&()), type_, reason.as_str(), "Migrate", note).await;
    }
    let summary = summary.and_then(|s| s.ok());
    if let Some(summary) = summary.as_ref().filter(|s| !s.ha_lost.is_empty()) {
        let note = format!("Job {name}: {}", summary.ha_lost.join("; "));
        ctx.publish(&migration.object_ref(&()), EventType::Warning, "HighAvailabilityLost", "Migrate", note).await;
    }
    if let Some(summary) = summary.as_ref().filter(|s| !s.refused_declarations.is_empty()) {
        let refused = summary.refused_declarations.join("; ");
        let note = format!("Job {name}: the apps' declarations would be refused: {refused}");
        ctx.publish(&migration.object_ref(&()), EventType::Warning, "DeclarationRefused", "Migrate", note).await;
    }
    write_status(&ctx, &migration, phase, Some(name), complete, summary).await?;
    Ok(Action::await_change())
}

/// A side given by `host` names a `credentialsSecret`: the Job sends its username and password
/// to that host. Only a Secret labelled for migrations may be named, so that the right to create
/// a RabbitMigration is not the right to read every Secret of the namespace. (A side given by
/// `clusterRef` uses that RabbitCluster's default-user Secret, which the operator made.)
async fn credentials_permitted(ctx: &Context, migration: &RabbitMigration) -> Result<()> {
    let namespace = migration.namespace().unwrap_or_default();
    for (field, endpoint) in [("spec.source", &migration.spec.source), ("spec.target", &migration.spec.target)] {
        let (Some(_), Some(name)) = (&endpoint.host, &endpoint.credentials_secret) else { continue };
        // Its metadata only: the operator needs the label, never the credentials themselves (and
        // watches no Secret of the users' but those labelled for it: one GET, when this changes).
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let secret =
            secrets.get_metadata_opt(name).await.map_err(|e| Error::kube(format!("get Secret {name} metadata"), e))?;
        let labelled = secret.as_ref().is_some_and(|s| meant_for_migrations(s.labels()));
        if !labelled {
            let state = if secret.is_some() { "has no label" } else { "does not exist, and needs the label" };
            return Err(Error::InvalidSpec {
                reason: SpecReason::CredentialsNotPermitted,
                message: format!(
                    "{field}.credentialsSecret: Secret {name} {state} {MIGRATION_CREDENTIALS_LABEL}=true, which says \
                     it is meant for migrations (kubectl label secret {name} {MIGRATION_CREDENTIALS_LABEL}=true), \
                     then edit or re-create this RabbitMigration"
                ),
            });
        }
    }
    Ok(())
}

/// The TLS of the RabbitClusters the migration names: the Job reaches a TLS cluster over AMQPS and
/// HTTPS and verifies it against its CA.
async fn clusters_tls(ctx: &Context, migration: &RabbitMigration) -> Result<ClustersTls> {
    let namespace = migration.namespace().unwrap_or_default();
    let clusters: Api<RabbitCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut tls = ClustersTls::new();
    for name in [&migration.spec.source, &migration.spec.target].into_iter().filter_map(|e| e.cluster_ref.as_ref()) {
        let cluster = clusters.get_opt(name).await.map_err(|e| Error::kube(format!("get RabbitCluster {name}"), e))?;
        if let Some(spec) = cluster.and_then(|c| c.spec.tls) {
            tls.insert(name.clone(), spec);
        }
    }
    Ok(tls)
}

/// The `Complete` condition for a finished Job — (status, reason, message) — from the summary its
/// last pod left, when there is one.
pub fn completion(
    job: &str,
    phase: MigrationPhase,
    summary: Option<&std::result::Result<Summary, String>>,
) -> Option<(bool, String, String)> {
    match (phase, summary) {
        (MigrationPhase::Succeeded, Some(Ok(s))) => Some((
            true,
            "Succeeded".to_string(),
            format!(
                "{} messages moved from {} queue(s) and verified",
                s.moved,
                s.queues.len() as u64 + s.omitted_queues
            ),
        )),
        (MigrationPhase::Succeeded, _) => {
            Some((true, "Succeeded".to_string(), "every queue moved and verified".to_string()))
        }
        (MigrationPhase::Failed, Some(Ok(Summary { error: Some(e), .. }))) => {
            Some((false, reason_of(&e.reason), format!("{}: {}", e.phase, e.message)))
        }
        (MigrationPhase::Failed, Some(Ok(s))) => Some((
            false,
            "Incomplete".to_string(),
            format!(
                "{} messages moved; {} queue(s) not fully moved (see status.queues)",
                s.moved,
                s.queues.iter().filter(|q| q.left > 0 || q.refused > 0 || q.error.is_some()).count()
            ),
        )),
        (MigrationPhase::Failed, Some(Err(text))) => {
            Some((false, "JobFailed".to_string(), format!("Job {job} failed: {text}")))
        }
        (MigrationPhase::Failed, None) => {
            Some((false, "JobFailed".to_string(), format!("Job {job} failed; see its pods' logs")))
        }
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
    phase: MigrationPhase,
    job_name: Option<String>,
    complete: Option<(bool, String, String)>,
    summary: Option<Summary>,
) -> Result<()> {
    let previous = migration.status.clone().unwrap_or_default();
    let verdicts: Vec<Verdict> = complete
        .map(|(ok, reason, message)| conditions::verdict(conditions::COMPLETE, Some(ok), &reason, message))
        .into_iter()
        .collect();
    let conditions =
        conditions::merge_conditions(&previous.conditions, &verdicts, migration.meta().generation, &conditions::now());
    let (moved, queues, omitted_queues, ha_lost, refused_declarations) = match summary {
        Some(s) => {
            let omitted = (s.omitted_queues > 0).then_some(s.omitted_queues);
            (Some(s.moved), s.queues, omitted, s.ha_lost, s.refused_declarations)
        }
        None => (
            previous.moved,
            previous.queues.clone(),
            previous.omitted_queues,
            previous.ha_lost.clone(),
            previous.refused_declarations.clone(),
        ),
    };
    let next = RabbitMigrationStatus {
        phase: Some(phase),
        job_name: job_name.or(previous.job_name.clone()),
        observed_generation: migration.meta().generation,
        conditions,
        moved,
        queues,
        omitted_queues,
        ha_lost,
        refused_declarations,
    };
    super::status::apply(&ctx.client, migration, migration.status.as_ref(), &next).await
}
