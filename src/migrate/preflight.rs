//! Phase 1: what is there, and whether it can be moved now.

use std::time::Duration;

use serde_json::Value;

use super::amqp::{self, Failure};
use super::definitions;
use super::{MigrateError, Options};
use crate::rabbitmq::management::{ManagementClient, encode};
use crate::rabbitmq::version::RabbitVersion;

/// One queue to move.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueuePlan {
    pub vhost: String,
    pub name: String,
    /// Ready messages when preflight looked.
    pub messages: u64,
    pub queue_type: String,
}

/// What preflight found and decided.
#[derive(Clone, Debug)]
pub struct Plan {
    pub source_version: String,
    pub target_version: String,
    /// Definitions to import, already converted for the target.
    pub definitions: Value,
    /// What the conversion changed, for the report.
    pub notes: Vec<String>,
    /// Queues `--convert-to-quorum` leaves classic, with the reason.
    pub kept_classic: Vec<definitions::KeptClassic>,
    pub queues: Vec<QueuePlan>,
}

fn fail(reason: &'static str, message: impl Into<String>) -> MigrateError {
    MigrateError::new("preflight", reason, message)
}

async fn version(api: &ManagementClient, side: &str) -> Result<(String, RabbitVersion), MigrateError> {
    let text = api.rabbitmq_version().await.map_err(|e| fail(e.reason(), format!("{side}: {e}")))?;
    let version =
        RabbitVersion::parse(&text).ok_or_else(|| fail("BrokerBadResponse", format!("{side}: version {text:?}")))?;
    Ok((text, version))
}

async fn get(api: &ManagementClient, side: &str, path: &str) -> Result<Value, MigrateError> {
    api.get(path)
        .await
        .map_err(|e| fail(e.reason(), format!("{side}: {e}")))?
        .ok_or_else(|| fail("BrokerBadResponse", format!("{side}: GET {path}: not found")))
}

/// The `name` of each object of a management API list.
fn names(list: &Value) -> Vec<String> {
    list.as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).map(str::to_string).collect()
}

/// A queue whose messages consumers hold unacknowledged.
struct Held {
    vhost: String,
    name: String,
    messages: u64,
    consumers: u64,
}

/// Queues (of `GET /api/queues`) whose statistics show messages held unacknowledged.
fn held_by_consumers(queues: &Value, options: &Options) -> Vec<Held> {
    queues
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| selected(options, q))
        .filter_map(|q| {
            let messages = q["messages_unacknowledged"].as_u64().unwrap_or(0);
            (messages > 0).then(|| Held {
                vhost: q["vhost"].as_str().unwrap_or("/").to_string(),
                name: q["name"].as_str().unwrap_or("").to_string(),
                messages,
                consumers: q["consumers"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// Of `held`, the queues that have a consumer right now. Statistics lag by seconds (more on a busy
/// broker): a consumer that just went away, a migrator killed a moment ago say, still shows there,
/// while its messages are back in the queue already. A passive queue.declare counts consumers live.
async fn still_held(options: &Options, held: Vec<Held>) -> Result<Vec<Held>, MigrateError> {
    let mut confirmed = Vec::new();
    for mut queue in held {
        let unreachable =
            |e: Failure| fail("BrokerUnreachable", format!("source AMQP (vhost {}): {}", queue.vhost, e.message));
        let connection = amqp::connect(&options.source.amqp_for(&queue.vhost), "source").await.map_err(unreachable)?;
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

fn selected(options: &Options, queue: &Value) -> bool {
    let vhost = queue["vhost"].as_str().unwrap_or_default();
    let name = queue["name"].as_str().unwrap_or_default();
    (options.vhosts.is_empty() || options.vhosts.iter().any(|v| v == vhost))
        && options.queues.as_ref().is_none_or(|re| re.is_match(name))
        && queue["exclusive"] != true
}

pub async fn run(
    source: &ManagementClient,
    target: &ManagementClient,
    options: &Options,
) -> Result<Plan, MigrateError> {
    let (source_version, _) = version(source, "source").await?;
    let (target_version, target_parsed) = version(target, "target").await?;

    // Every vhost asked for must be on the source.
    let source_vhosts = names(&get(source, "source", "/api/vhosts").await?);
    let unknown: Vec<&str> =
        options.vhosts.iter().map(String::as_str).filter(|v| !source_vhosts.iter().any(|s| s == v)).collect();
    if !unknown.is_empty() {
        return Err(fail(
            "VhostMissing",
            format!("the source has no vhost {} (it has: {})", unknown.join(", "), source_vhosts.join(", ")),
        ));
    }

    // Celery keeps eta/countdown tasks unacknowledged until they are due: those messages cannot
    // be moved while a worker holds them, and would be redelivered on the old cluster later.
    let mut source_queues = get(source, "source", "/api/queues").await?;
    let mut held = Vec::new();
    if !options.force {
        held = still_held(options, held_by_consumers(&source_queues, options)).await?;
    }
    if !held.is_empty() {
        if let Some(limit) = options.wait_for_consumers {
            let deadline = tokio::time::Instant::now() + limit;
            while !held.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(2)).await;
                source_queues = get(source, "source", "/api/queues").await?;
                held = still_held(options, held_by_consumers(&source_queues, options)).await?;
            }
        }
        if !held.is_empty() {
            let list: Vec<String> = held
                .iter()
                .map(|h| {
                    format!(
                        "{}/{}: {} unacknowledged, held by {} consumer(s)",
                        h.vhost, h.name, h.messages, h.consumers
                    )
                })
                .collect();
            return Err(fail(
                "MessagesHeldByConsumers",
                format!(
                    "consumers hold messages unacknowledged (for example Celery eta/countdown tasks): {}; stop those \
                     consumers, or pass --wait-for-consumers DURATION, or --force to leave them behind",
                    list.join("; ")
                ),
            ));
        }
    }

    let exported = get(source, "source", "/api/definitions").await?;
    let definitions::Conversion { definitions, notes, kept_classic } =
        definitions::convert(&exported, options, target_parsed);
    for kept in &kept_classic {
        tracing::warn!(vhost = %kept.vhost, queue = %kept.name, "stays a classic queue on the target: {}", kept.reason);
    }

    // A vhost the target lacks is created by the import, which takes the administrator tag.
    let target_vhosts = names(&get(target, "target", "/api/vhosts").await?);
    let missing: Vec<String> =
        names(&definitions["vhosts"]).into_iter().filter(|v| !target_vhosts.contains(v)).collect();
    if !missing.is_empty() {
        let whoami = get(target, "target", "/api/whoami").await?;
        let tags: Vec<String> = match &whoami["tags"] {
            Value::Array(tags) => tags.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Value::String(tags) => tags.split(',').map(|t| t.trim().to_string()).collect(),
            _ => Vec::new(),
        };
        if !tags.iter().any(|t| t == "administrator") {
            return Err(fail(
                "VhostMissing",
                format!(
                    "the target has no vhost {}, and its user {} may not create one (that takes the administrator \
                     tag): create the vhost on the target and give the user permissions there, or migrate as an \
                     administrator",
                    missing.join(", "),
                    whoami["name"].as_str().unwrap_or("?")
                ),
            ));
        }
    }

    // A queue that exists on the target with other arguments cannot receive these messages.
    for queue in definitions["queues"].as_array().into_iter().flatten() {
        let (vhost, name) = (queue["vhost"].as_str().unwrap_or("/"), queue["name"].as_str().unwrap_or(""));
        let path = format!("/api/queues/{}/{}", encode(vhost), encode(name));
        let existing = target.get(&path).await.map_err(|e| fail(e.reason(), format!("target: {e}")))?;
        if let Some(existing) = existing {
            let (have, want) = (definitions::effective_arguments(&existing), definitions::effective_arguments(queue));
            if have != want || existing["durable"] != queue["durable"] {
                return Err(fail(
                    "QueueMismatch",
                    format!(
                        "queue {name} in vhost {vhost} exists on the target with other properties (durable {}, \
                         arguments {have}) than the migration needs (durable {}, arguments {want}); delete or rename it",
                        existing["durable"], queue["durable"]
                    ),
                ));
            }
        }
    }

    // The queues to move: those the converted definitions kept (selected vhosts and names).
    let wanted: Vec<(String, String)> = definitions["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| (q["vhost"].as_str().unwrap_or("/").to_string(), q["name"].as_str().unwrap_or("").to_string()))
        .collect();
    let queues = source_queues
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| wanted.iter().any(|(v, n)| q["vhost"] == v.as_str() && q["name"] == n.as_str()))
        .map(|q| QueuePlan {
            vhost: q["vhost"].as_str().unwrap_or("/").to_string(),
            name: q["name"].as_str().unwrap_or_default().to_string(),
            messages: q["messages_ready"].as_u64().unwrap_or(0),
            queue_type: q["type"].as_str().unwrap_or("classic").to_string(),
        })
        .collect();
    Ok(Plan { source_version, target_version, definitions, notes, kept_classic, queues })
}
