//! Phase 1: what is there, and whether it can be moved now.

use std::time::Duration;

use serde_json::Value;

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
    pub queues: Vec<QueuePlan>,
}

/// A little more than RabbitMQ's default `collect_statistics_interval`.
const STATISTICS_INTERVAL: Duration = Duration::from_secs(6);

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

/// Queues (of `GET /api/queues`) whose messages consumers hold unacknowledged:
/// `(vhost/queue, held, consumers)`.
fn held_by_consumers(queues: &Value, options: &Options) -> Vec<(String, u64, u64)> {
    queues
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| selected(options, q))
        .filter_map(|q| {
            let held = q["messages_unacknowledged"].as_u64().unwrap_or(0);
            (held > 0).then(|| {
                (
                    format!("{}/{}", q["vhost"].as_str().unwrap_or(""), q["name"].as_str().unwrap_or("")),
                    held,
                    q["consumers"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect()
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
    let mut held = held_by_consumers(&source_queues, options);
    if !held.is_empty() && !options.force {
        // Queue statistics are refreshed every 5 s: a consumer that just went away (a migrator
        // killed a moment ago, say) still shows. Only what a fresh sample confirms is held.
        tokio::time::sleep(STATISTICS_INTERVAL).await;
        source_queues = get(source, "source", "/api/queues").await?;
        held = held_by_consumers(&source_queues, options);
    }
    if !held.is_empty() && !options.force {
        if let Some(limit) = options.wait_for_consumers {
            let deadline = tokio::time::Instant::now() + limit;
            while !held.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(2)).await;
                source_queues = get(source, "source", "/api/queues").await?;
                held = held_by_consumers(&source_queues, options);
            }
        }
        if !held.is_empty() {
            let list: Vec<String> =
                held.iter().map(|(q, n, c)| format!("{q}: {n} unacknowledged, held by {c} consumer(s)")).collect();
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
    let (definitions, notes) = definitions::convert(&exported, options, target_parsed);

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
    Ok(Plan { source_version, target_version, definitions, notes, queues })
}
