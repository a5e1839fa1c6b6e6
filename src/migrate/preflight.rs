//! Phase 1: what is there, and whether it can be moved now.

use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::amqp::{self, Failure};
use super::definitions;
use super::model::{Definitions, Exchange, Queue};
use super::{MigrateError, MigratePhase, MigrateReason, Options};
use crate::error::BrokerReason;
use crate::rabbitmq::management::{ManagementClient, QueueInfo, encode};
use crate::rabbitmq::queue_type::QueueType;
use crate::rabbitmq::version::RabbitVersion;

/// One queue to move.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueuePlan {
    pub vhost: String,
    pub name: String,
    /// Ready messages when preflight looked.
    pub messages: u64,
    /// Their bytes (bodies), when the statistics had them.
    pub bytes: u64,
    /// Its type on the source.
    pub queue_type: QueueType,
    /// A policy on the source mirrored it (`ha-mode`, RabbitMQ 3.x).
    pub source_mirrored: bool,
    /// Its type on the target.
    pub target_type: QueueType,
    /// It has replicas on the target: a quorum queue or a stream, or a classic queue on a 3.x
    /// target that a policy the migration brings mirrors.
    pub replicated: bool,
    /// Deleted by the source when its last consumer goes: moved with basic.get, never consumed.
    pub auto_delete: bool,
}

impl QueuePlan {
    /// The average size of the queue's messages when preflight looked; `None` when the
    /// statistics did not say (the mover then sizes its prefetch from the first message).
    pub fn average_message_bytes(&self) -> Option<u64> {
        (self.messages > 0 && self.bytes > 0).then(|| self.bytes.div_ceil(self.messages))
    }
}

/// What preflight found and decided.
#[derive(Clone, Debug)]
pub struct Plan {
    pub source_version: String,
    pub target_version: String,
    /// Definitions to import, already converted for the target.
    pub definitions: Definitions,
    /// What the conversion changed, for the report.
    pub notes: Vec<String>,
    /// Queues left unreplicated on a target without classic mirroring, with the reason.
    pub ha_lost: Vec<definitions::HaLost>,
    /// The selected queues and exchanges as the source has them: what the apps declare.
    pub app_queues: Vec<Queue>,
    pub app_exchanges: Vec<Exchange>,
    pub queues: Vec<QueuePlan>,
}

fn fail(reason: MigrateReason, message: impl Into<String>) -> MigrateError {
    MigrateError::new(MigratePhase::Preflight, reason, message)
}

async fn version(api: &ManagementClient, side: &str) -> Result<(String, RabbitVersion), MigrateError> {
    let text = api.rabbitmq_version().await.map_err(|e| {
        let text = e.to_string();
        if text.contains("certificate") {
            // The first call to either side: a TLS peer that was not verified is named as such.
            fail(
                MigrateReason::TlsNotVerified,
                format!(
                    "{side}: {text}: its certificate was not verified; pass --{side}-ca with the CA that signed it \
                     (a RabbitMigration takes it from the cluster's TLS Secret), and address the host by a name \
                     the certificate holds"
                ),
            )
        } else {
            fail(MigrateReason::of(&e), format!("{side}: {text}"))
        }
    })?;
    let version = RabbitVersion::parse(&text).ok_or_else(|| {
        fail(MigrateReason::Broker(BrokerReason::BrokerBadResponse), format!("{side}: version {text:?}"))
    })?;
    Ok((text, version))
}

/// A management API answer, read as the type that says what of it is used.
async fn get<T: DeserializeOwned>(api: &ManagementClient, side: &str, path: &str) -> Result<T, MigrateError> {
    let value =
        api.get(path).await.map_err(|e| fail(MigrateReason::of(&e), format!("{side}: {e}")))?.ok_or_else(|| {
            fail(MigrateReason::Broker(BrokerReason::BrokerBadResponse), format!("{side}: GET {path}: not found"))
        })?;
    serde_json::from_value(value)
        .map_err(|e| fail(MigrateReason::Broker(BrokerReason::BrokerBadResponse), format!("{side}: GET {path}: {e}")))
}

/// An object of a management API list that is known by its name (a vhost).
#[derive(Deserialize)]
struct Named {
    name: String,
}

/// `GET /api/whoami`: tags are a list from 3.9, a comma-separated string before.
#[derive(Deserialize)]
struct WhoAmI {
    name: String,
    #[serde(default)]
    tags: Tags,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Tags {
    List(Vec<String>),
    Text(String),
}

impl Default for Tags {
    fn default() -> Self {
        Tags::List(Vec::new())
    }
}

impl Tags {
    fn contains(&self, tag: &str) -> bool {
        match self {
            Tags::List(tags) => tags.iter().any(|t| t == tag),
            Tags::Text(tags) => tags.split(',').any(|t| t.trim() == tag),
        }
    }
}

/// The names in a list of named objects.
fn names(list: &[Named]) -> Vec<String> {
    list.iter().map(|n| n.name.clone()).collect()
}

/// A queue whose messages consumers hold unacknowledged.
struct Held {
    vhost: String,
    name: String,
    messages: u64,
    consumers: u64,
}

/// Queues whose statistics show messages held unacknowledged.
fn held_by_consumers(queues: &[QueueInfo], options: &Options) -> Vec<Held> {
    queues
        .iter()
        .filter(|q| selected(options, q) && q.messages_unacknowledged > 0)
        .map(|q| Held {
            vhost: q.vhost.clone(),
            name: q.name.clone(),
            messages: q.messages_unacknowledged,
            consumers: q.consumers,
        })
        .collect()
}

/// Of `held`, the queues that have a consumer right now. Statistics lag by seconds (more on a busy
/// broker): a consumer that just went away, a migrator killed a moment ago say, still shows there,
/// while its messages are back in the queue already. A passive queue.declare counts consumers live.
async fn still_held(options: &Options, held: Vec<Held>) -> Result<Vec<Held>, MigrateError> {
    let mut confirmed = Vec::new();
    for mut queue in held {
        let unreachable = |e: Failure| {
            fail(
                MigrateReason::Broker(BrokerReason::BrokerUnreachable),
                format!("source AMQP (vhost {}): {}", queue.vhost, e.message),
            )
        };
        let connection = amqp::connect(&options.source.amqp_for(&queue.vhost), options.source.ca.as_deref(), "source")
            .await
            .map_err(unreachable)?;
        let live = match amqp::within("open a channel", connection.create_channel()).await {
            Ok(channel) => amqp::declared(&channel, &queue.name).await,
            Err(e) => Err(e),
        };
        amqp::close(connection, "preflight").await;
        match live {
            Ok((_, consumers)) if consumers > 0 => {
                queue.consumers = consumers;
                confirmed.push(queue);
            }
            Ok(_) => {}
            // Gone since the statistics were taken (the broker closes the channel): nothing held.
            Err(e) if !e.transport => {}
            Err(e) => return Err(unreachable(e)),
        }
    }
    Ok(confirmed)
}

fn selected(options: &Options, queue: &QueueInfo) -> bool {
    (options.vhosts.is_empty() || options.vhosts.contains(&queue.vhost))
        && options.queues.as_ref().is_none_or(|re| re.is_match(&queue.name))
        && !queue.exclusive
}

/// Preflight: versions, vhosts, messages held by consumers, the definitions converted for the
/// target, the target's vhosts and queues, then the queues to move.
pub async fn run(
    source: &ManagementClient,
    target: &ManagementClient,
    options: &Options,
) -> Result<Plan, MigrateError> {
    let (source_version, _) = version(source, "source").await?;
    let (target_version, target_parsed) = version(target, "target").await?;
    check_vhosts_asked_for(source, options).await?;
    let source_queues = wait_until_released(source, options).await?;
    let exported: Definitions = get(source, "source", "/api/definitions").await?;
    let definitions::Conversion { definitions, notes, ha_lost, app_queues, app_exchanges } =
        definitions::convert(&exported, options, target_parsed);
    for lost in &ha_lost {
        tracing::warn!(vhost = %lost.vhost, queue = %lost.name, "{lost}");
    }
    check_target_may_create_vhosts(target, &definitions).await?;
    check_target_queues(target, &definitions).await?;
    let queues = queues_to_move(&source_queues, &definitions, target_parsed);
    if let Some(pattern) = options.queues.as_ref().filter(|_| definitions.queues.is_empty()) {
        // A pattern with a typo would otherwise "succeed" having moved nothing.
        return Err(fail(
            MigrateReason::QueuesMissing,
            format!("no queue of the source matches --queues {:?}{}", pattern.as_str(), vhosts_said(options)),
        ));
    }
    Ok(Plan { source_version, target_version, definitions, notes, ha_lost, app_queues, app_exchanges, queues })
}

fn vhosts_said(options: &Options) -> String {
    if options.vhosts.is_empty() { String::new() } else { format!(" in vhost {}", options.vhosts.join(", ")) }
}

/// Every vhost asked for must be on the source.
async fn check_vhosts_asked_for(source: &ManagementClient, options: &Options) -> Result<(), MigrateError> {
    let source_vhosts = names(&get::<Vec<Named>>(source, "source", "/api/vhosts").await?);
    let unknown: Vec<&str> =
        options.vhosts.iter().map(String::as_str).filter(|v| !source_vhosts.iter().any(|s| s == v)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(fail(
        MigrateReason::VhostMissing,
        format!("the source has no vhost {} (it has: {})", unknown.join(", "), source_vhosts.join(", ")),
    ))
}

/// The source's queues once no consumer holds messages of the selected ones (waiting up to
/// `--wait-for-consumers`). Celery keeps eta/countdown tasks unacknowledged until they are due:
/// those messages cannot be moved while a worker holds them, and would be redelivered on the old
/// cluster later.
async fn wait_until_released(source: &ManagementClient, options: &Options) -> Result<Vec<QueueInfo>, MigrateError> {
    let mut source_queues: Vec<QueueInfo> = get(source, "source", "/api/queues").await?;
    if options.force {
        return Ok(source_queues);
    }
    let mut held = still_held(options, held_by_consumers(&source_queues, options)).await?;
    if !held.is_empty()
        && let Some(limit) = options.wait_for_consumers
    {
        let deadline = tokio::time::Instant::now() + limit;
        while !held.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
            source_queues = get(source, "source", "/api/queues").await?;
            held = still_held(options, held_by_consumers(&source_queues, options)).await?;
        }
    }
    if held.is_empty() {
        return Ok(source_queues);
    }
    let list: Vec<String> = held
        .iter()
        .map(|h| format!("{}/{}: {} unacknowledged, held by {} consumer(s)", h.vhost, h.name, h.messages, h.consumers))
        .collect();
    Err(fail(
        MigrateReason::MessagesHeldByConsumers,
        format!(
            "consumers hold messages unacknowledged (for example Celery eta/countdown tasks): {}; stop those \
             consumers, or pass --wait-for-consumers DURATION, or --force to leave them behind",
            list.join("; ")
        ),
    ))
}

/// A vhost the target lacks is created by the import, which takes the administrator tag.
async fn check_target_may_create_vhosts(
    target: &ManagementClient,
    definitions: &Definitions,
) -> Result<(), MigrateError> {
    let target_vhosts = names(&get::<Vec<Named>>(target, "target", "/api/vhosts").await?);
    let missing: Vec<&str> =
        definitions.vhosts.iter().map(|v| v.name.as_str()).filter(|v| !target_vhosts.iter().any(|t| t == v)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let whoami: WhoAmI = get(target, "target", "/api/whoami").await?;
    if whoami.tags.contains("administrator") {
        return Ok(());
    }
    Err(fail(
        MigrateReason::VhostMissing,
        format!(
            "the target has no vhost {}, and its user {} may not create one (that takes the administrator \
             tag): create the vhost on the target and give the user permissions there, or migrate as an \
             administrator",
            missing.join(", "),
            whoami.name
        ),
    ))
}

/// A queue that exists on the target with other arguments cannot receive these messages.
async fn check_target_queues(target: &ManagementClient, definitions: &Definitions) -> Result<(), MigrateError> {
    for queue in &definitions.queues {
        let (vhost, name) = queue.key();
        let path = format!("/api/queues/{}/{}", encode(vhost), encode(name));
        let existing = target.get(&path).await.map_err(|e| fail(MigrateReason::of(&e), format!("target: {e}")))?;
        let Some(existing) = existing else { continue };
        let existing: Queue = serde_json::from_value(existing).map_err(|e| {
            fail(MigrateReason::Broker(BrokerReason::BrokerBadResponse), format!("target: GET {path}: {e}"))
        })?;
        let (have, want) = (Value::Object(existing.effective_arguments()), Value::Object(queue.effective_arguments()));
        if have != want || existing.durable != queue.durable {
            return Err(fail(
                MigrateReason::QueueMismatch,
                format!(
                    "queue {name} in vhost {vhost} exists on the target with other properties (durable {}, \
                     arguments {have}) than the migration needs (durable {}, arguments {want}); delete or rename it",
                    existing.durable, queue.durable
                ),
            ));
        }
    }
    Ok(())
}

/// The queues to move: those the converted definitions kept (selected vhosts and names), each with
/// its type on either side.
fn queues_to_move(source_queues: &[QueueInfo], definitions: &Definitions, target: RabbitVersion) -> Vec<QueuePlan> {
    source_queues
        .iter()
        .filter_map(|q| {
            let declared = definitions.queues.iter().find(|d| d.key() == (&q.vhost, &q.name))?;
            let target_type = declared.kind();
            let replicated = target_type.is_replicated()
                || (target_type == QueueType::Classic
                    && target.has_classic_mirroring()
                    && definitions::mirrored_by_policy(definitions, declared));
            Some(QueuePlan {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
                messages: q.messages_ready,
                bytes: q.message_bytes_ready,
                queue_type: q.kind(),
                source_mirrored: q.mirrored(),
                target_type,
                replicated,
                auto_delete: q.auto_delete,
            })
        })
        .collect()
}
