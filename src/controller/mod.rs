//! The RabbitCluster controller: validate, build, apply, converge, status.

pub mod apply;
pub mod build;
pub mod migration;
pub mod scale;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use self::apply::{Existing, get_opt};
use self::build::Credentials;
use self::build::secrets::{COOKIE_KEY, PASSWORD_KEY, USERNAME_KEY};
use self::status::Verdict;
use self::validate::{Settings, ValidatedCluster};
use crate::api::{PAUSE_ANNOTATION, RabbitCluster, RabbitClusterStatus, RabbitMigration};
use crate::error::{Error, Result};
use crate::rabbitmq::broker::{self, BrokerObservation};
use crate::rabbitmq::management::ManagementClient;
use crate::rabbitmq::version::RabbitVersion;
use crate::server::Metrics;

/// How often a healthy cluster is looked at again (membership and partitions change without any
/// Kubernetes event).
const RESYNC: Duration = Duration::from_secs(60);
/// Back-off bounds after a failure.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Everything reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    /// Management API base URL, with `{service}` and `{namespace}` filled in per cluster.
    pub management_url_template: String,
    pub metrics: Metrics,
    /// Image of migration Jobs whose RabbitMigration names none.
    pub migration_image: String,
    /// Consecutive failures per cluster, for exponential back-off.
    failures: Mutex<HashMap<String, u32>>,
    /// Since when a scale-down has waited for mirrors to synchronise, per cluster.
    mirror_sync_since: Mutex<HashMap<String, Instant>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, management_url_template: String, metrics: Metrics) -> Self {
        let reporter = Reporter { controller: "warren".into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            management_url_template,
            metrics,
            migration_image: migration::DEFAULT_IMAGE.to_string(),
            failures: Mutex::default(),
            mirror_sync_since: Mutex::default(),
        }
    }

    fn management_url(&self, cluster: &ValidatedCluster) -> String {
        self.management_url_template
            .replace("{service}", &cluster.client_service_name())
            .replace("{namespace}", &cluster.namespace)
            .replace("{domain}", &cluster.cluster_domain)
    }

    async fn event(&self, cluster: &RabbitCluster, type_: EventType, reason: &str, action: &str, note: String) {
        self.publish(&cluster.object_ref(&()), type_, reason, action, note).await;
    }

    /// An Event about `cluster` that names a second object: the recorder keeps one series per
    /// (reason, object, second object), so Events of the same reason about different pods stay apart.
    async fn event_related(
        &self,
        cluster: &RabbitCluster,
        reason: &str,
        action: &str,
        related: ObjectReference,
        note: String,
    ) {
        self.record(&cluster.object_ref(&()), Some(related), EventType::Normal, reason, action, note).await;
    }

    /// An Event about `regarding`; a failure to publish is logged, never fatal.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.record(regarding, None, type_, reason, action, note).await;
    }

    async fn record(
        &self,
        regarding: &ObjectReference,
        secondary: Option<ObjectReference>,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(%error, object = ?regarding.name, "publishing an event failed");
        }
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        RETRY_MIN.saturating_mul(1u32 << (*count - 1).min(6)).min(RETRY_MAX)
    }

    fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

fn object_key(cluster: &RabbitCluster) -> String {
    format!("{}/{}", cluster.namespace().unwrap_or_default(), cluster.name_any())
}

/// Runs the controller until the process is asked to stop.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let (client, ns) = (ctx.client.clone(), namespace.as_deref());
    let children = watcher::Config::default().labels(&format!("{}=warren", build::MANAGED_BY_LABEL));
    let clusters = Controller::new(scoped::<RabbitCluster>(&client, ns), watcher::Config::default())
        .owns(scoped::<StatefulSet>(&client, ns), children.clone())
        .owns(scoped::<Service>(&client, ns), children.clone())
        .owns(scoped::<ConfigMap>(&client, ns), children.clone())
        .owns(scoped::<Secret>(&client, ns), children.clone())
        .owns(scoped::<ServiceAccount>(&client, ns), children.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), children.clone())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile loop");
            }
        });
    let migrations = Controller::new(scoped::<RabbitMigration>(&client, ns), watcher::Config::default())
        .owns(scoped::<Job>(&client, ns), children)
        .shutdown_on_signal()
        .run(migration::reconcile, migration_error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "migration reconcile loop");
            }
        });
    futures::join!(clusters, migrations);
}

fn migration_error_policy(migration: Arc<RabbitMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("migration/{}/{}", migration.namespace().unwrap_or_default(), migration.name_any());
    let delay = ctx.backoff(&key);
    tracing::warn!(migration = %key, reason = error.reason(), retry_in = ?delay, "{error}");
    Action::requeue(delay)
}

/// One reconcile of one RabbitCluster. Errors have already been reported in status and Events
/// when they come back from here; `error_policy` only schedules the retry.
pub async fn reconcile(cluster: Arc<RabbitCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let outcome = reconcile_cluster(&cluster, &ctx).await;
    ctx.metrics.observe_reconcile(started.elapsed(), outcome.as_ref().err());
    match outcome {
        Ok(action) => {
            ctx.succeeded(&object_key(&cluster));
            Ok(action)
        }
        Err(error) if !error.is_retriable() => {
            // Only a spec change can help: the watch brings that.
            tracing::info!(cluster = %object_key(&cluster), reason = error.reason(), "{error}");
            Ok(Action::await_change())
        }
        Err(error) => Err(error),
    }
}

pub fn error_policy(cluster: Arc<RabbitCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&object_key(&cluster));
    tracing::warn!(cluster = %object_key(&cluster), reason = error.reason(), retry_in = ?delay, "{error}");
    Action::requeue(delay)
}

async fn reconcile_cluster(cluster: &RabbitCluster, ctx: &Context) -> Result<Action> {
    let paused = cluster.annotations().get(PAUSE_ANNOTATION).is_some_and(|v| v == "true");
    if paused {
        let message = format!("reconciliation paused by the annotation {PAUSE_ANNOTATION}");
        write_status_early(cluster, ctx, "Paused", &message, None).await?;
        return Ok(Action::await_change());
    }
    let validated = match validate::validate(cluster, &ctx.settings) {
        Ok(v) => v,
        Err(error) => return fail_early(cluster, ctx, error).await,
    };
    match converge_cluster(cluster, &validated, ctx).await {
        Ok(action) => Ok(action),
        Err(Stop::Early(error)) => fail_early(cluster, ctx, error).await,
        Err(Stop::Reported(error)) => Err(error),
    }
}

/// Why a pass stopped: before it changed anything (still to be reported), or after it had written
/// status and Events itself.
enum Stop {
    Early(Error),
    Reported(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Early(error)
    }
}

async fn fail_early(cluster: &RabbitCluster, ctx: &Context, error: Error) -> Result<Action> {
    ctx.event(cluster, EventType::Warning, error.reason(), "Reconcile", error.to_string()).await;
    write_status_early(cluster, ctx, error.reason(), &error.to_string(), Some(false)).await?;
    Err(error)
}

/// Reads what decides credentials and scaling, refuses what must be refused, then applies,
/// converges the broker and writes status.
async fn converge_cluster(
    cluster: &RabbitCluster,
    validated: &ValidatedCluster,
    ctx: &Context,
) -> std::result::Result<Action, Stop> {
    let ns = validated.namespace.as_str();
    let stateful_sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = Existing {
        stateful_set: get_opt(&stateful_sets, &validated.stateful_set_name()).await?,
        erlang_cookie_secret: get_opt(&secrets, &validated.erlang_cookie_secret_name()).await?,
        default_user_secret: get_opt(&secrets, &validated.default_user_secret_name()).await?,
    };
    check_in_place_upgrade(existing.stateful_set.as_ref(), validated)?;
    check_tls_secrets(&secrets, validated).await?;
    let credentials = credentials(validated, &existing)?;
    // Fewer replicas: the nodes leave one at a time, each handed over first (controller::scale).
    let current = existing.stateful_set.as_ref().and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas);
    let mut scaling = match current {
        Some(current) if validated.replicas < current || scale::in_progress(cluster) => {
            Some(scale::pass(ctx, cluster, validated, &credentials, current).await)
        }
        _ => None,
    };
    let validated = &ValidatedCluster {
        replicas: scaling.as_ref().map_or(validated.replicas, |s| s.replicas),
        ..validated.clone()
    };
    let resources = build::build(validated, &credentials);

    let applied = apply::apply(&ctx.client, validated, resources, existing).await?;
    // One Event per kind of change: the recorder folds Events of equal reason into one series,
    // which would keep only the first object's name.
    let describe =
        |changed: &[(String, String)]| changed.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ");
    if !applied.created.is_empty() {
        ctx.event(cluster, EventType::Normal, "Created", "Apply", format!("created {}", describe(&applied.created)))
            .await;
    }
    if !applied.updated.is_empty() {
        ctx.event(cluster, EventType::Normal, "Updated", "Apply", format!("updated {}", describe(&applied.updated)))
            .await;
    }
    for warning in &validated.warnings {
        if !cluster.status.as_ref().is_some_and(|s| s.warnings.contains(warning)) {
            ctx.event(cluster, EventType::Warning, "SpecWarning", "Validate", warning.clone()).await;
        }
    }

    // The StatefulSet as it is now (its status is what the pods report).
    let stateful_set = get_opt(&stateful_sets, &validated.stateful_set_name()).await?;
    let (_, all_ready) = status::replicas_ready(stateful_set.as_ref(), validated.replicas);
    let (broker, error) = if all_ready {
        let expected: Vec<String> = (0..validated.replicas).map(|i| validated.node_name(i)).collect();
        let outcome = async {
            let client =
                ManagementClient::new(&ctx.management_url(validated), &credentials.username, &credentials.password)?;
            broker::converge(&client, &expected, &validated.high_availability).await
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
    // Nodes the cluster still lists after their pods went (an operator restarted between a pod's
    // removal and its forget): finish the job.
    if scaling.is_none()
        && let (Some(observation), Some(current)) = (&broker, current)
        && !observation.extra.is_empty()
    {
        scaling = Some(scale::pass(ctx, cluster, validated, &credentials, current.max(validated.replicas)).await);
    }
    if let Some(pass) = &scaling {
        report_scaling(cluster, ctx, pass).await;
    }
    let why_not_checked = match &error {
        Some(error) => format!("management API: {error}"),
        None => "waiting for all pods to be ready".to_string(),
    };
    let scaling_error = scaling.as_mut().and_then(|s| s.error.take());
    let error = scaling_error.or(error);
    let observed = status::Observed {
        desired_replicas: validated.replicas,
        stateful_set: stateful_set.as_ref(),
        broker: broker.as_ref().ok_or(why_not_checked),
        error: error.as_ref(),
    };
    let mut verdicts = status::verdicts(&observed);
    verdicts.push(match &scaling {
        Some(pass) => pass.verdict.clone(),
        None => status::steady_scaling(validated.replicas),
    });
    write_status(cluster, ctx, validated, stateful_set.as_ref(), broker.as_ref(), &verdicts).await?;
    match error {
        Some(error) => Err(Stop::Reported(error)),
        None if scaling.as_ref().is_some_and(|s| s.in_progress) => Ok(Action::requeue(scale::SCALING_RESYNC)),
        None if all_ready => Ok(Action::requeue(RESYNC)),
        // Pod readiness changes arrive through the owned StatefulSet's watch; this is a safety net.
        None => Ok(Action::requeue(Duration::from_secs(30))),
    }
}

/// Events of a scale-down pass: what it did, a node removed for good, a refusal.
async fn report_scaling(cluster: &RabbitCluster, ctx: &Context, pass: &scale::ScalePass) {
    if !pass.done.is_empty() {
        ctx.event(cluster, EventType::Normal, "ScalingDown", "Scale", pass.done.join("; ")).await;
    }
    if let Some(node) = &pass.removed {
        let note = format!("{node} left the cluster: its pod is gone and the cluster no longer lists it");
        let pod = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: node.split_once('@').and_then(|(_, host)| host.split('.').next()).map(str::to_string),
            namespace: cluster.namespace(),
            ..ObjectReference::default()
        };
        ctx.event_related(cluster, "NodeRemoved", "Scale", pod, note).await;
    }
    if let Some(error) = &pass.error {
        ctx.event(cluster, EventType::Warning, error.reason(), "Scale", error.to_string()).await;
    }
}

/// Refuses an image whose RabbitMQ version the running pods cannot roll to: a skipped minor or a
/// downgrade (a same-minor patch change rolls the pods one at a time, each through preStop).
fn check_in_place_upgrade(stateful_set: Option<&StatefulSet>, cluster: &ValidatedCluster) -> Result<()> {
    let running = stateful_set
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == build::statefulset::RABBITMQ_CONTAINER))
        .and_then(|c| c.image.as_deref())
        .and_then(RabbitVersion::from_image);
    let (Some(from), Some(to)) = (running, cluster.image_version) else { return Ok(()) };
    from.in_place_change_to(to).map_err(|refusal| Error::UpgradeRefused {
        from: from.to_string(),
        to: to.to_string(),
        why: refusal.0,
    })
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

/// The cluster's credentials: from the existing Secrets, generated only for what does not exist yet.
fn credentials(cluster: &ValidatedCluster, existing: &Existing) -> Result<Credentials> {
    let needs_fresh = existing.erlang_cookie_secret.is_none() || existing.default_user_secret.is_none();
    let fresh = if needs_fresh { Credentials::generate() } else { Credentials::default() };
    let erlang_cookie = match &existing.erlang_cookie_secret {
        Some(secret) => secret_value(secret, COOKIE_KEY).ok_or_else(|| Error::SecretMissing {
            name: cluster.erlang_cookie_secret_name(),
            message: format!(
                "key {COOKIE_KEY:?} is missing or empty; restore it (every node must share the same cookie)"
            ),
        })?,
        None => fresh.erlang_cookie,
    };
    let (username, password) = match &existing.default_user_secret {
        Some(secret) => match (secret_value(secret, USERNAME_KEY), secret_value(secret, PASSWORD_KEY)) {
            (Some(user), Some(password)) => (user, password),
            _ => {
                return Err(Error::SecretMissing {
                    name: cluster.default_user_secret_name(),
                    message: "keys \"username\" and \"password\" must be present".into(),
                });
            }
        },
        None => (fresh.username, fresh.password),
    };
    Ok(Credentials { erlang_cookie, username, password })
}

async fn check_tls_secrets(secrets: &Api<Secret>, cluster: &ValidatedCluster) -> Result<()> {
    let Some(tls) = &cluster.tls else { return Ok(()) };
    let ca_secret = tls.ca_secret_name.as_deref().unwrap_or(&tls.secret_name);
    let mut required = vec![(tls.secret_name.as_str(), vec!["tls.crt", "tls.key"])];
    match required.iter_mut().find(|(name, _)| *name == ca_secret) {
        Some((_, keys)) => keys.push("ca.crt"),
        None => required.push((ca_secret, vec!["ca.crt"])),
    }
    for (name, keys) in required {
        let secret = get_opt(secrets, name).await?.ok_or_else(|| Error::SecretMissing {
            name: name.to_string(),
            message: "named by spec.tls does not exist in the cluster's namespace".into(),
        })?;
        if let Some(key) = keys.into_iter().find(|key| secret_value(&secret, key).is_none()) {
            return Err(Error::SecretMissing { name: name.to_string(), message: format!("has no key {key:?}") });
        }
    }
    Ok(())
}

async fn patch_status(cluster: &RabbitCluster, ctx: &Context, status: RabbitClusterStatus) -> Result<()> {
    if cluster.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<RabbitCluster> = Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = json!({ "status": status });
    api.patch_status(&cluster.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| Error::kube(format!("update status of RabbitCluster {}", cluster.name_any()), e))?;
    Ok(())
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

async fn write_status_early(
    cluster: &RabbitCluster,
    ctx: &Context,
    reason: &str,
    message: &str,
    success: Option<bool>,
) -> Result<()> {
    let previous = cluster.status.clone().unwrap_or_default();
    let verdicts = status::early_stop_verdicts(reason, message, success);
    let conditions = status::merge_conditions(&previous.conditions, &verdicts, cluster.meta().generation, &now());
    let next = RabbitClusterStatus { observed_generation: cluster.meta().generation, conditions, ..previous };
    patch_status(cluster, ctx, next).await
}

async fn write_status(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    stateful_set: Option<&StatefulSet>,
    broker: Option<&BrokerObservation>,
    verdicts: &[Verdict],
) -> Result<()> {
    let previous = cluster.status.clone().unwrap_or_default();
    let sts_status = stateful_set.and_then(|s| s.status.as_ref());
    let next = RabbitClusterStatus {
        observed_generation: cluster.meta().generation,
        rabbitmq_version: broker
            .map(|b| b.version.clone())
            .or_else(|| validated.image_version.map(|v| v.to_string()))
            .or(previous.rabbitmq_version.clone()),
        replicas: sts_status.map(|s| s.replicas).unwrap_or(0),
        ready_replicas: sts_status.and_then(|s| s.ready_replicas).unwrap_or(0),
        members: broker.map(|b| b.members.clone()).unwrap_or(previous.members.clone()),
        warnings: validated.warnings.clone(),
        conditions: status::merge_conditions(&previous.conditions, verdicts, cluster.meta().generation, &now()),
    };
    patch_status(cluster, ctx, next).await
}
