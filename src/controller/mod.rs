//! The RabbitCluster controller. A pass reads as its steps: validate, dereference, build, apply,
//! broker, status (see `reconcile_cluster`); the RabbitMigration controller is in `migration`.

pub mod apply;
pub mod broker_step;
pub mod build;
pub mod conditions;
pub mod dereference;
pub mod lost_nodes;
pub mod migration;
pub mod namespaces;
pub mod recover;
pub mod scale;
pub mod status;
pub mod storage;
pub mod stores;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::Instrument;

use self::apply::Applied;
use self::dereference::Dereferenced;
use self::namespaces::WatchScope;
use self::stores::{Stores, Writers, metadata_only, reflect, slim_metadata};
use self::validate::{Settings, ValidatedCluster};
use crate::api::{PAUSE_ANNOTATION, RabbitCluster, RabbitMigration};
use crate::error::{Error, Result};
use crate::metrics::ControllerKind;
use crate::rabbitmq::management::ManagementClient;
use crate::rabbitmq::version::RabbitVersion;
use crate::server::{Metrics, Phase, Readiness};

/// How often a healthy cluster is looked at again (membership and partitions change without any
/// Kubernetes event).
pub(crate) const RESYNC: Duration = Duration::from_secs(60);
/// Back-off bounds after a failure.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// How the operator runs: what `warren run`'s flags set.
#[derive(Clone, Debug)]
pub struct Config {
    pub settings: Settings,
    /// Management API base URL, with `{service}`, `{namespace}` and `{domain}` filled in per cluster.
    pub management_url_template: String,
    /// The same for a cluster with TLS (HTTPS).
    pub management_tls_url_template: String,
    /// Image of migration Jobs whose RabbitMigration names none.
    pub migration_image: String,
    /// Whether a RabbitMigration may name another image for its Job (`spec.image`).
    pub allow_migration_image: bool,
}

impl Config {
    /// The defaults, with clusters' management APIs reached through `management_url_template`.
    pub fn new(management_url_template: impl Into<String>) -> Self {
        Self {
            settings: Settings::default(),
            management_url_template: management_url_template.into(),
            management_tls_url_template: DEFAULT_MANAGEMENT_TLS_URL.to_string(),
            migration_image: migration::DEFAULT_IMAGE.to_string(),
            allow_migration_image: false,
        }
    }
}

/// Everything reconcile needs, complete once built.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// How the operator runs (`warren run`'s flags).
    pub config: Config,
    pub metrics: Metrics,
    /// Consecutive failures per cluster, for exponential back-off.
    failures: Mutex<HashMap<String, u32>>,
    /// Since when a scale-down has waited for mirrors to synchronise, per cluster.
    mirror_sync_since: Mutex<HashMap<String, Instant>>,
    /// The watched children, which reconcile reads instead of the API server.
    pub stores: Stores,
    /// Their writing halves, until `run` (or a test) takes them to feed the stores.
    writers: Mutex<Option<Writers>>,
}

/// Where the operator reaches a TLS cluster's management API (HTTPS).
pub const DEFAULT_MANAGEMENT_TLS_URL: &str = "https://{service}.{namespace}.svc.{domain}:15671";

impl Context {
    pub fn new(client: Client, config: Config, metrics: Metrics) -> Self {
        let reporter = Reporter { controller: "warren".into(), instance: std::env::var("POD_NAME").ok() };
        let (stores, writers) = stores::stores();
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
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
        let template = if cluster.tls.is_some() {
            &self.config.management_tls_url_template
        } else {
            &self.config.management_url_template
        };
        template
            .replace("{service}", &cluster.client_service_name())
            .replace("{namespace}", &cluster.namespace)
            .replace("{domain}", &cluster.cluster_domain)
    }

    /// The cluster's management API as its default user: over HTTPS with its certificate verified
    /// against its CA when the cluster has TLS (the certificate must name the client Service's
    /// host), else plain HTTP.
    pub fn management_client(&self, cluster: &ValidatedCluster, world: &Dereferenced) -> Result<ManagementClient> {
        let credentials = &world.credentials;
        ManagementClient::with_ca(
            &self.management_url(cluster),
            &credentials.username,
            &credentials.password,
            world.tls_ca.as_deref(),
        )
    }

    async fn event(&self, cluster: &RabbitCluster, type_: EventType, reason: &str, action: &str, note: String) {
        self.publish(&cluster.object_ref(&()), type_, reason, action, note).await;
    }

    /// An Event about `cluster` that names a second object: the recorder keeps one series per
    /// (reason, object, second object), so Events of the same reason about different pods stay apart.
    async fn event_related(
        &self,
        cluster: &RabbitCluster,
        type_: EventType,
        reason: &str,
        action: &str,
        related: ObjectReference,
        note: String,
    ) {
        self.record(&cluster.object_ref(&()), Some(related), type_, reason, action, note).await;
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

/// Reconciles running at once, per controller. Unbounded, a burst of new clusters ran one
/// reconcile each at once, each on a connection of its own to the API server: 1,000 clusters
/// created together left some 740 idle TLS connections in the client's pool, 100 MiB of buffers.
const CONCURRENT_RECONCILES: u16 = 16;

/// Runs both controllers until the process is asked to stop; `readiness` turns Ready once every
/// store has listed.
pub async fn run(ctx: Arc<Context>, scope: WatchScope, readiness: Readiness) {
    let Some(writers) = ctx.take_writers() else {
        tracing::error!("the controllers already run in this process");
        return;
    };
    let (client, scope) = (&ctx.client.clone(), &scope);
    let children = watcher::Config::default().labels(&format!("{}=warren", build::MANAGED_BY_LABEL));
    let all = watcher::Config::default;
    let (cluster_store, cluster_writer) = reflector::store();
    let watched = watcher::Config::default().labels(&format!("{}=true", stores::WATCH_LABEL));
    let naming = cluster_store.clone();
    let (migration_store, migration_writer) = reflector::store();
    let bounded = || controller::Config::default().concurrency(CONCURRENT_RECONCILES);
    let clusters = Controller::for_stream(reflect(client, scope, all(), cluster_writer, slim_metadata), cluster_store)
        .with_config(bounded())
        .owns_stream(reflect(client, scope, children.clone(), writers.stateful_sets, stores::slim_stateful_set))
        .owns_stream(reflect(client, scope, children.clone(), writers.services, metadata_only))
        .owns_stream(reflect(client, scope, children.clone(), writers.config_maps, metadata_only))
        // The credential Secrets have no owner (they outlive the cluster): their labels name it.
        .watches_stream(reflect(client, scope, children.clone(), writers.secrets, stores::slim_secret), cluster_of)
        // The users' TLS Secrets they labelled for the operator (no other Secret is watched).
        .watches_stream(reflect(client, scope, watched, writers.watched_secrets, stores::slim_secret), move |secret| {
            clusters_naming(&naming, &secret)
        })
        .owns_stream(reflect(client, scope, children.clone(), writers.service_accounts, metadata_only))
        .owns_stream(reflect(client, scope, children.clone(), writers.budgets, metadata_only))
        .owns_stream(reflect(client, scope, children.clone(), writers.network_policies, metadata_only))
        // The pods: a pod the scheduler cannot place is named in status as it happens.
        .watches_stream(reflect(client, scope, children.clone(), writers.pods, stores::slim_pod), cluster_of)
        .shutdown_on_signal();
    let migrations =
        Controller::for_stream(reflect(client, scope, all(), migration_writer, slim_metadata), migration_store)
            .owns_stream(reflect(client, scope, children, writers.jobs, stores::slim_job))
            .shutdown_on_signal();
    let (cluster_store, migration_store, stores) = (clusters.store(), migrations.store(), ctx.stores.clone());
    ctx.metrics.watch_stores(cluster_store.clone(), migration_store.clone());
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
    let migrations = migrations.run(reconcile_migration, migration_error_policy, ctx).for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "migration reconcile loop");
        }
    });
    futures::join!(clusters, migrations, synced);
}

/// The RabbitCluster a child without an owner reference belongs to, by the labels the operator
/// gave it: its credential Secrets (they outlive the cluster) and its pods (owned by the
/// StatefulSet). A migration Job's pod is not a RabbitMQ pod: none.
fn cluster_of<K: Resource>(object: K) -> Option<ObjectRef<RabbitCluster>> {
    let labels = object.labels();
    let label_is = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
    if !(label_is(build::MANAGED_BY_LABEL, "warren") && label_is(build::NAME_LABEL, "rabbitmq")) {
        return None;
    }
    Some(ObjectRef::new(labels.get(build::INSTANCE_LABEL)?).within(&object.namespace()?))
}

/// The RabbitClusters whose spec.tls names a Secret (its certificate or its CA).
fn clusters_naming(clusters: &reflector::Store<RabbitCluster>, secret: &Secret) -> Vec<ObjectRef<RabbitCluster>> {
    let (name, namespace) = (secret.name_any(), secret.namespace());
    clusters
        .state()
        .iter()
        .filter(|cluster| cluster.namespace() == namespace)
        .filter(|cluster| {
            cluster
                .spec
                .tls
                .as_ref()
                .is_some_and(|tls| tls.secret_name == name || tls.ca_secret_name.as_ref() == Some(&name))
        })
        .map(|cluster| ObjectRef::from_obj(cluster.as_ref()))
        .collect()
}

/// The back-off key of a RabbitMigration (apart from a RabbitCluster of the same name).
fn migration_key(migration: &RabbitMigration) -> String {
    format!("migration/{}/{}", migration.namespace().unwrap_or_default(), migration.name_any())
}

/// Both controllers' way with a reconcile's outcome: metered; a success resets the object's
/// back-off; an error only a spec change can fix waits for that change (the watch brings it); any
/// other error goes to the error policy. Errors are in status and Events already.
fn settle(
    ctx: &Context,
    controller: ControllerKind,
    key: &str,
    started: Instant,
    outcome: Result<Action>,
) -> Result<Action> {
    ctx.metrics.observe_reconcile(controller, started.elapsed(), outcome.as_ref().err());
    match outcome {
        Ok(action) => {
            ctx.succeeded(key);
            Ok(action)
        }
        Err(error) if !error.is_retriable() => {
            tracing::info!(object = %key, reason = error.reason(), "{error}");
            Ok(Action::await_change())
        }
        Err(error) => Err(error),
    }
}

/// Both controllers' error policy: a retry after 5 s, doubling per consecutive failure of the
/// same object up to 5 min, back to 5 s after its next success.
fn retry(ctx: &Context, key: &str, error: &Error) -> Action {
    let delay = ctx.backoff(key);
    tracing::warn!(object = %key, reason = error.reason(), retry_in = ?delay, "{error}");
    Action::requeue(delay)
}

/// One reconcile of one RabbitMigration.
async fn reconcile_migration(migration: Arc<RabbitMigration>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let key = migration_key(&migration);
    let outcome = migration::reconcile(migration, ctx.clone()).await;
    settle(&ctx, ControllerKind::RabbitMigration, &key, started, outcome)
}

fn migration_error_policy(migration: Arc<RabbitMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    retry(&ctx, &migration_key(&migration), error)
}

/// One reconcile of one RabbitCluster. Errors have already been reported in status and Events
/// when they come back from here; `error_policy` only schedules the retry.
pub async fn reconcile(cluster: Arc<RabbitCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let span = tracing::info_span!("reconcile", cluster = %object_key(&cluster));
    let outcome = reconcile_cluster(&cluster, &ctx).instrument(span).await;
    settle(&ctx, ControllerKind::RabbitCluster, &object_key(&cluster), started, outcome)
}

pub fn error_policy(cluster: Arc<RabbitCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    retry(&ctx, &object_key(&cluster), error)
}

async fn reconcile_cluster(cluster: &RabbitCluster, ctx: &Context) -> Result<Action> {
    let paused = cluster.annotations().get(PAUSE_ANNOTATION).is_some_and(|v| v == "true");
    if paused {
        let message = format!("reconciliation paused by the annotation {PAUSE_ANNOTATION}");
        status::write_early(cluster, ctx, "Paused", &message, None).await?;
        return Ok(Action::await_change());
    }
    let prepared = async {
        let validated = validate::validate(cluster, &ctx.config.settings)?;
        let world = dereference::dereference(ctx, &validated).await?;
        validate::check_in_place_upgrade(&running_broker(cluster, &world), &validated)?;
        let children = &world.children;
        validate::check_inter_node_change(children.runs_inter_node_tls(), children.current_replicas(), &validated)?;
        let (validated, scaling) = scale_before_apply(ctx, cluster, validated, &world).await;
        let (mut validated, resize) = storage::plan(validated, &world.children);
        let mut applied =
            apply::apply(&ctx.client, &validated, build::build(&validated, &world.credentials), &world.children)
                .await?;
        applied.expanded = storage::expand(ctx, &mut validated, &resize).await;
        Ok::<_, Error>((validated, world, scaling, applied))
    };
    let (validated, world, scaling, applied) = match prepared.await {
        Ok(prepared) => prepared,
        Err(error) => return fail_early(cluster, ctx, error).await,
    };
    report_applied(cluster, ctx, &validated, &applied).await;
    lost_nodes::replace_lost_members(cluster, ctx, &validated).await;
    for note in &world.recovered {
        ctx.event(cluster, EventType::Warning, "CredentialsRecovered", "Dereference", note.clone()).await;
    }
    let observed = broker_step::observe(cluster, ctx, &validated, &world, scaling).await;
    status::write(cluster, ctx, &validated, &observed).await?;
    after_pass(observed)
}

/// What follows a full pass once its status is written: its error (which the error policy backs
/// off), or when to look again.
fn after_pass(observed: broker_step::Observation) -> Result<Action> {
    match observed.error {
        Some(error) => Err(error),
        None if observed.scaling.as_ref().is_some_and(|s| s.in_progress) => Ok(Action::requeue(scale::SCALING_RESYNC)),
        None if observed.all_ready => Ok(Action::requeue(RESYNC)),
        // Pod readiness changes arrive through the owned StatefulSet's watch; this is a safety net.
        None => Ok(Action::requeue(Duration::from_secs(30))),
    }
}

/// What the cluster runs. Its version: what the broker reported when every pod was last ready and
/// updated (status), else the StatefulSet's image. Not the template alone: after a roll-out to a tag
/// that does not exist (one pod in ImagePullBackOff), going back to the version every ready pod still
/// runs must not be refused as a downgrade.
fn running_broker(cluster: &RabbitCluster, world: &Dereferenced) -> validate::RunningBroker {
    let status = cluster.status.clone().unwrap_or_default();
    validate::RunningBroker {
        version: status
            .rabbitmq_version
            .as_deref()
            .and_then(RabbitVersion::parse)
            .or_else(|| world.children.running_version()),
        disabled_feature_flags: status.disabled_feature_flags,
        mirrored_classic_queues: status.mirrored_classic_queues,
    }
}

/// Fewer replicas: the nodes leave one at a time, each handed over first (controller::scale). The
/// cluster to build keeps the StatefulSet's size until a node may go.
///
/// Two counts are not a scale-down. 0 stops every node at once and keeps their data (nothing is
/// handed over or forgotten). A StatefulSet below spec.replicas was scaled by hand (or is being
/// started from 0): apply reverts it, and no node is forgotten for it.
async fn scale_before_apply(
    ctx: &Context,
    cluster: &RabbitCluster,
    validated: ValidatedCluster,
    world: &Dereferenced,
) -> (ValidatedCluster, Option<scale::ScalePass>) {
    let Some(current) = world.children.current_replicas() else { return (validated, None) };
    if validated.replicas == 0 {
        return (validated, None);
    }
    if current == 0 {
        // Starting a stopped cluster: every node that holds data comes back (a node left out would
        // be waited for by the others, or seen as lost), then a scale-down runs as usual.
        let replicas = validated.replicas.max(world.members_with_data);
        return (ValidatedCluster { replicas, ..validated }, None);
    }
    if validated.replicas >= current && !scale::in_progress(cluster) {
        return (validated, None);
    }
    let current = current.max(validated.replicas);
    let pass = scale::pass(ctx, cluster, &validated, world, current).await;
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
    if !applied.deleted.is_empty() {
        ctx.event(cluster, EventType::Normal, "Deleted", "Apply", format!("deleted {}", describe(&applied.deleted)))
            .await;
    }
    if !applied.expanded.is_empty() {
        let note = format!("expanded to spec.persistence.storage: {}", applied.expanded.join(", "));
        ctx.event(cluster, EventType::Normal, "ClaimsExpanded", "Apply", note).await;
    }
    for reverted in &applied.reverted {
        // The StatefulSet as it was, as the related object: one Event per change, where one
        // series would keep only the first change's note.
        let stateful_set = ObjectReference {
            api_version: Some("apps/v1".into()),
            kind: Some("StatefulSet".into()),
            name: Some(validated.stateful_set_name()),
            namespace: Some(validated.namespace.clone()),
            resource_version: reverted.resource_version.clone(),
            ..ObjectReference::default()
        };
        let regarding = cluster.object_ref(&());
        let (type_, note) = (EventType::Warning, reverted.note.clone());
        ctx.record(&regarding, Some(stateful_set), type_, "DriftReverted", "Apply", note).await;
    }
    for warning in &validated.warnings {
        if !cluster.status.as_ref().is_some_and(|s| s.warnings.contains(warning)) {
            ctx.event(cluster, EventType::Warning, "SpecWarning", "Validate", warning.clone()).await;
        }
    }
}

async fn fail_early(cluster: &RabbitCluster, ctx: &Context, error: Error) -> Result<Action> {
    ctx.event(cluster, EventType::Warning, error.reason(), "Reconcile", error.to_string()).await;
    status::write_early(cluster, ctx, error.reason(), &error.to_string(), Some(false)).await?;
    Err(error)
}

/// A reference to pod `name` of `cluster`, for an Event about the cluster that names the pod.
fn pod_reference(cluster: &RabbitCluster, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.to_string()),
        namespace: cluster.namespace(),
        ..ObjectReference::default()
    }
}
