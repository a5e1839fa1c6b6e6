//! The RabbitCluster controller. A pass reads as its steps: validate, dereference, build, apply,
//! broker, status (see `reconcile_cluster`); the RabbitMigration controller is in `migration`.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod migration;
pub mod scale;
pub mod status;
pub mod stores;
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
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;

use self::apply::Applied;
use self::dereference::Dereferenced;
use self::status::Verdict;
use self::stores::{Stores, Writers};
use self::validate::{Settings, ValidatedCluster};
use crate::api::{PAUSE_ANNOTATION, RabbitCluster, RabbitClusterStatus, RabbitMigration};
use crate::error::{Error, Result};
use crate::rabbitmq::broker::{self, BrokerObservation};
use crate::rabbitmq::management::ManagementClient;
use crate::server::{Metrics, Phase, Readiness};

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
    /// The watched children, which reconcile reads instead of the API server.
    pub stores: Stores,
    /// Their writing halves, until `run` (or a test) takes them to feed the stores.
    writers: Mutex<Option<Writers>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings, management_url_template: String, metrics: Metrics) -> Self {
        let reporter = Reporter { controller: "warren".into(), instance: std::env::var("POD_NAME").ok() };
        let (stores, writers) = stores::stores();
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            management_url_template,
            metrics,
            migration_image: migration::DEFAULT_IMAGE.to_string(),
            failures: Mutex::default(),
            mirror_sync_since: Mutex::default(),
            stores,
            writers: Mutex::new(Some(writers)),
        }
    }

    /// The stores' writing halves: once (`run` feeds them from watches; a test, from fixtures).
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner()).take()
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

/// Runs both controllers until the process is asked to stop; `readiness` turns Ready once every
/// store has listed.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, readiness: Readiness) {
    fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let Some(writers) = ctx.take_writers() else {
        tracing::error!("the controllers already run in this process");
        return;
    };
    let (client, ns) = (ctx.client.clone(), namespace.as_deref());
    let children = watcher::Config::default().labels(&format!("{}=warren", build::MANAGED_BY_LABEL));
    let clusters = Controller::new(scoped::<RabbitCluster>(&client, ns), watcher::Config::default())
        .owns_stream(stores::reflect(scoped::<StatefulSet>(&client, ns), children.clone(), writers.stateful_sets))
        .owns_stream(stores::reflect(scoped::<Service>(&client, ns), children.clone(), writers.services))
        .owns_stream(stores::reflect(scoped::<ConfigMap>(&client, ns), children.clone(), writers.config_maps))
        .owns_stream(stores::reflect_secrets(scoped::<Secret>(&client, ns), writers.secrets))
        .owns_stream(stores::reflect(scoped::<ServiceAccount>(&client, ns), children.clone(), writers.service_accounts))
        .owns_stream(stores::reflect(scoped::<PodDisruptionBudget>(&client, ns), children.clone(), writers.budgets))
        .shutdown_on_signal();
    let migrations = Controller::new(scoped::<RabbitMigration>(&client, ns), watcher::Config::default())
        .owns_stream(stores::reflect(scoped::<Job>(&client, ns), children, writers.jobs))
        .shutdown_on_signal();
    let (cluster_store, migration_store, stores) = (clusters.store(), migrations.store(), ctx.stores.clone());
    let synced = async move {
        let listed = stores.synced().await.is_ok()
            && cluster_store.wait_until_ready().await.is_ok()
            && migration_store.wait_until_ready().await.is_ok();
        if listed {
            tracing::info!("every store has listed: ready");
            readiness.set(Phase::Ready);
        }
    };
    let clusters = clusters.run(reconcile, error_policy, ctx.clone()).for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "reconcile loop");
        }
    });
    let migrations = migrations.run(migration::reconcile, migration_error_policy, ctx).for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "migration reconcile loop");
        }
    });
    futures::join!(clusters, migrations, synced);
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
    let span = tracing::info_span!("reconcile", cluster = %object_key(&cluster));
    let outcome = reconcile_cluster(&cluster, &ctx).instrument(span).await;
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
    let prepared = async {
        let validated = validate::validate(cluster, &ctx.settings)?;
        let world = dereference::dereference(ctx, &validated).await?;
        validate::check_in_place_upgrade(world.running_version, &validated)?;
        let (validated, scaling) = scale_before_apply(ctx, cluster, validated, &world).await;
        let applied =
            apply::apply(&ctx.client, &validated, build::build(&validated, &world.credentials), &world.children)
                .await?;
        Ok::<_, Error>((validated, world, scaling, applied))
    };
    let (validated, world, scaling, applied) = match prepared.await {
        Ok(prepared) => prepared,
        Err(error) => return fail_early(cluster, ctx, error).await,
    };
    report_applied(cluster, ctx, &validated, &applied).await;
    let observed = observe_broker(cluster, ctx, &validated, &world, scaling).await;
    write_status(cluster, ctx, &validated, observed).await
}

/// Fewer replicas: the nodes leave one at a time, each handed over first (controller::scale). The
/// cluster to build keeps the StatefulSet's size until a node may go.
async fn scale_before_apply(
    ctx: &Context,
    cluster: &RabbitCluster,
    validated: ValidatedCluster,
    world: &Dereferenced,
) -> (ValidatedCluster, Option<scale::ScalePass>) {
    let Some(current) = world.current_replicas else { return (validated, None) };
    if validated.replicas >= current && !scale::in_progress(cluster) {
        return (validated, None);
    }
    let pass = scale::pass(ctx, cluster, &validated, &world.credentials, current).await;
    (ValidatedCluster { replicas: pass.replicas, ..validated }, Some(pass))
}

/// Events of what `apply` changed and of spec warnings not reported before.
async fn report_applied(cluster: &RabbitCluster, ctx: &Context, validated: &ValidatedCluster, applied: &Applied) {
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
}

/// What step 4 saw: the StatefulSet as its store holds it now, the broker when every pod is ready,
/// a scale-down pass, and the first error.
struct Observation {
    stateful_set: Option<Arc<StatefulSet>>,
    broker: Option<BrokerObservation>,
    why_not_checked: String,
    scaling: Option<scale::ScalePass>,
    error: Option<Error>,
    all_ready: bool,
}

/// Step 4: the broker (membership, HA, partitions) once every pod is ready, and the nodes a
/// cluster still lists after their pods went (an operator restarted between a pod's removal and
/// its forget).
async fn observe_broker(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    world: &Dereferenced,
    mut scaling: Option<scale::ScalePass>,
) -> Observation {
    let key = ObjectRef::new(&validated.stateful_set_name()).within(&validated.namespace);
    let stateful_set = ctx.stores.stateful_sets.get(&key);
    let (_, all_ready) = status::replicas_ready(stateful_set.as_deref(), validated.replicas);
    let (broker, error) = if all_ready {
        let expected: Vec<String> = (0..validated.replicas).map(|i| validated.node_name(i)).collect();
        let outcome = async {
            let credentials = &world.credentials;
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
    if scaling.is_none()
        && let (Some(observation), Some(current)) = (&broker, world.current_replicas)
        && !observation.extra.is_empty()
    {
        let pass = scale::pass(ctx, cluster, validated, &world.credentials, current.max(validated.replicas)).await;
        scaling = Some(pass);
    }
    if let Some(pass) = &scaling {
        report_scaling(cluster, ctx, pass).await;
    }
    let why_not_checked = match &error {
        Some(error) => format!("management API: {error}"),
        None => "waiting for all pods to be ready".to_string(),
    };
    let error = scaling.as_mut().and_then(|s| s.error.take()).or(error);
    Observation { stateful_set, broker, why_not_checked, scaling, error, all_ready }
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

async fn fail_early(cluster: &RabbitCluster, ctx: &Context, error: Error) -> Result<Action> {
    ctx.event(cluster, EventType::Warning, error.reason(), "Reconcile", error.to_string()).await;
    write_status_early(cluster, ctx, error.reason(), &error.to_string(), Some(false)).await?;
    Err(error)
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
    status::apply(&ctx.client, cluster, cluster.status.as_ref(), &next).await
}

/// Step 5: the conditions of a full pass, then what to do next.
async fn write_status(
    cluster: &RabbitCluster,
    ctx: &Context,
    validated: &ValidatedCluster,
    observed: Observation,
) -> Result<Action> {
    let Observation { stateful_set, broker, why_not_checked, scaling, error, all_ready } = observed;
    let mut verdicts = status::verdicts(&status::Observed {
        desired_replicas: validated.replicas,
        stateful_set: stateful_set.as_deref(),
        broker: broker.as_ref().ok_or(why_not_checked),
        error: error.as_ref(),
    });
    verdicts.push(match &scaling {
        Some(pass) => pass.verdict.clone(),
        None => status::steady_scaling(validated.replicas),
    });
    let next = cluster_status(cluster, validated, stateful_set.as_deref(), broker.as_ref(), &verdicts);
    status::apply(&ctx.client, cluster, cluster.status.as_ref(), &next).await?;
    match error {
        Some(error) => Err(error),
        None if scaling.as_ref().is_some_and(|s| s.in_progress) => Ok(Action::requeue(scale::SCALING_RESYNC)),
        None if all_ready => Ok(Action::requeue(RESYNC)),
        // Pod readiness changes arrive through the owned StatefulSet's watch; this is a safety net.
        None => Ok(Action::requeue(Duration::from_secs(30))),
    }
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
        rabbitmq_version: broker
            .map(|b| b.version.clone())
            .or_else(|| validated.image_version.map(|v| v.to_string()))
            .or(previous.rabbitmq_version.clone()),
        replicas: sts_status.map(|s| s.replicas).unwrap_or(0),
        ready_replicas: sts_status.and_then(|s| s.ready_replicas).unwrap_or(0),
        members: broker.map(|b| b.members.clone()).unwrap_or(previous.members.clone()),
        warnings: validated.warnings.clone(),
        conditions: status::merge_conditions(&previous.conditions, verdicts, cluster.meta().generation, &now()),
    }
}
