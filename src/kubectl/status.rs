//! `kubectl warren status NAME`: one screen of what a RabbitCluster is doing: its conditions, each
//! node (pod ready, member running, version, alarms, partitions), its queues and messages, and the
//! last Events. Kubernetes' side comes from the API server; the broker's from the management API
//! of a ready pod, through a port-forward. A broker that cannot be asked leaves its part empty
//! and says why; the rest is still shown.

use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use super::management::{Management, Tls};
use super::{PluginError, fit, get_cluster};
use crate::api::{PAUSE_ANNOTATION, TlsSpec};
use crate::controller::build::statefulset::RABBITMQ_CONTAINER;
use crate::controller::build::{INSTANCE_LABEL, NAME_LABEL};
use crate::controller::conditions::SCALING;
use crate::controller::stores::CA_KEY;
use crate::rabbitmq::management::{NodeInfo, Overview, Page, QueueInfo};

/// Queues listed by name, the largest first.
const LISTED_QUEUES: usize = 10;
/// Events listed, the newest last.
const LISTED_EVENTS: usize = 5;

#[derive(Debug, Serialize)]
pub struct Status {
    pub namespace: String,
    pub name: String,
    pub paused: bool,
    pub replicas: i32,
    pub ready_replicas: i32,
    pub rabbitmq_version: Option<String>,
    pub conditions: Vec<ConditionLine>,
    pub nodes: Vec<NodeLine>,
    pub queues: Option<Queues>,
    /// Why the broker's part is missing.
    pub broker_error: Option<String>,
    pub events: Vec<EventLine>,
}

#[derive(Debug, Serialize)]
pub struct ConditionLine {
    pub r#type: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
pub struct NodeLine {
    pub pod: String,
    /// The Kubernetes node the pod is scheduled to (none while Pending).
    pub scheduled_on: Option<String>,
    pub ready: bool,
    pub restarts: i32,
    /// The RabbitMQ node, as the cluster names it.
    pub node: Option<String>,
    /// Whether the cluster lists it as a running member (unknown without the broker).
    pub running: Option<bool>,
    pub version: Option<String>,
    /// `memory`, `disk`: resource alarms that block publishers cluster-wide.
    pub alarms: Vec<String>,
    pub partitioned_from: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Queues {
    pub count: u64,
    pub messages: u64,
    pub ready: u64,
    pub unacknowledged: u64,
    /// The largest, by messages.
    pub largest: Vec<QueueLine>,
}

#[derive(Debug, Serialize)]
pub struct QueueLine {
    pub vhost: String,
    pub name: String,
    pub r#type: String,
    pub ready: u64,
    pub unacknowledged: u64,
    pub consumers: u64,
}

#[derive(Debug, Serialize)]
pub struct EventLine {
    /// RFC 3339.
    pub time: Option<String>,
    pub r#type: String,
    pub reason: String,
    pub message: String,
}

/// The pod a RabbitMQ node runs in: `rabbit@<pod>.<headless service>...`.
pub fn pod_of(node: &str) -> &str {
    let host = node.split_once('@').map_or(node, |(_, host)| host);
    host.split('.').next().unwrap_or(host)
}

pub async fn status(client: &Client, namespace: &str, name: &str) -> Result<Status, PluginError> {
    let cluster = get_cluster(client, namespace, name).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut listed = pods
        .list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name},{NAME_LABEL}=rabbitmq")))
        .await
        .map_err(|e| PluginError(format!("pods of rabbitcluster {namespace}/{name}: {e}")))?
        .items;
    listed.sort_by_key(|p| p.name_any());
    let status = cluster.status.clone().unwrap_or_default();
    let mut nodes: Vec<NodeLine> = listed
        .iter()
        .map(|pod| {
            let pod_status = pod.status.as_ref();
            let ready = pod_status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let containers = pod_status.and_then(|s| s.container_statuses.as_ref());
            let rabbitmq = containers.and_then(|c| c.iter().find(|c| c.name == RABBITMQ_CONTAINER));
            NodeLine {
                pod: pod.name_any(),
                scheduled_on: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                ready,
                restarts: rabbitmq.map_or(0, |c| c.restart_count),
                ..NodeLine::default()
            }
        })
        .collect();
    let tls = cluster.spec.tls.as_ref();
    let (queues, broker_error) = match broker(client, namespace, name, tls, &mut nodes).await {
        Ok(queues) => (Some(queues), None),
        Err(error) => (None, Some(error.0)),
    };
    Ok(Status {
        namespace: namespace.to_string(),
        name: name.to_string(),
        paused: cluster.annotations().get(PAUSE_ANNOTATION).is_some_and(|v| v == "true"),
        replicas: cluster.spec.replicas,
        ready_replicas: status.ready_replicas,
        rabbitmq_version: status.rabbitmq_version.clone(),
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionLine {
                r#type: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .collect(),
        nodes,
        queues,
        broker_error,
        events: events(client, namespace, name).await?,
    })
}

/// What the management API of a ready pod says: each node's membership, version, alarms and
/// partitions (into `nodes`), and the queues.
async fn broker(
    client: &Client,
    namespace: &str,
    name: &str,
    tls: Option<&TlsSpec>,
    nodes: &mut Vec<NodeLine>,
) -> Result<Queues, PluginError> {
    let Some(pod) = nodes.iter().find(|n| n.ready).or(nodes.first()).map(|n| n.pod.clone()) else {
        return Err(PluginError("no pod to ask".into()));
    };
    // The cluster was read already: only its Secret is.
    let connection = super::default_user(client, namespace, name).await?;
    let tls = match tls {
        Some(spec) => Some(management_tls(client, namespace, spec, &connection.management_uri).await?),
        None => None,
    };
    let management = Management {
        pods: Api::namespaced(client.clone(), namespace),
        pod,
        username: connection.username,
        password: connection.password,
        tls,
    };
    let listed: Vec<NodeInfo> = management.get_as("nodes").await?;
    for node in &listed {
        let pod = pod_of(&node.name).to_string();
        let index = match nodes.iter().position(|n| n.pod == pod) {
            Some(index) => index,
            // A member the cluster still lists whose pod is gone (a scale-down not yet forgotten).
            None => {
                nodes.push(NodeLine { pod, ..NodeLine::default() });
                nodes.len() - 1
            }
        };
        let line = &mut nodes[index];
        line.node = Some(node.name.clone());
        line.running = Some(node.running);
        line.version = node.rabbit_version().map(str::to_string);
        for (on, alarm) in [(node.mem_alarm, "memory"), (node.disk_free_alarm, "disk")] {
            if on {
                line.alarms.push(alarm.to_string());
            }
        }
        line.partitioned_from = node.partitions.clone();
    }
    let overview: Overview = management.get_as("overview").await?;
    // Nodes whose own version the API did not give run the one the cluster reports.
    for line in nodes.iter_mut().filter(|n| n.running == Some(true) && n.version.is_none()) {
        line.version = overview.rabbitmq_version.clone();
    }
    let page: Page<QueueInfo> = management
        .get_as(&format!(
            "queues?page=1&page_size={LISTED_QUEUES}&sort=messages&sort_reverse=true\
             &columns=vhost,name,type,messages_ready,messages_unacknowledged,consumers"
        ))
        .await?;
    let totals = &overview.queue_totals;
    Ok(Queues {
        count: overview.object_totals.queues,
        messages: totals.messages,
        ready: totals.messages_ready,
        unacknowledged: totals.messages_unacknowledged,
        largest: page
            .items
            .into_iter()
            .map(|q| QueueLine {
                r#type: q.kind().to_string(),
                vhost: q.vhost,
                name: q.name,
                ready: q.messages_ready,
                unacknowledged: q.messages_unacknowledged,
                consumers: q.consumers,
            })
            .collect(),
    })
}

/// How to verify a TLS cluster's management API: the `ca.crt` of its Secret, for the host of the
/// default-user Secret's `management-uri` (the client Service, which its certificate names).
async fn management_tls(
    client: &Client,
    namespace: &str,
    spec: &TlsSpec,
    management_uri: &str,
) -> Result<Tls, PluginError> {
    let secret_name = spec.ca_secret_name.as_deref().unwrap_or(&spec.secret_name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get(secret_name)
        .await
        .map_err(|e| PluginError(format!("secret {namespace}/{secret_name} (the cluster's CA): {e}")))?;
    let ca_pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get(CA_KEY))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .ok_or_else(|| PluginError(format!("secret {namespace}/{secret_name} has no {CA_KEY}")))?;
    let server_name = url::Url::parse(management_uri)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .ok_or_else(|| PluginError(format!("management-uri {management_uri:?} names no host")))?;
    Ok(Tls { ca_pem, server_name })
}

/// The last Events about the RabbitCluster, oldest first.
async fn events(client: &Client, namespace: &str, name: &str) -> Result<Vec<EventLine>, PluginError> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!("involvedObject.kind=RabbitCluster,involvedObject.name={name}");
    let mut listed = api
        .list(&ListParams::default().fields(&selector))
        .await
        .map_err(|e| PluginError(format!("events of rabbitcluster {namespace}/{name}: {e}")))?
        .items;
    let time = |e: &Event| {
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
            .or(e.last_timestamp.as_ref().map(|t| t.0))
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    listed.sort_by_key(time);
    let skip = listed.len().saturating_sub(LISTED_EVENTS);
    Ok(listed
        .iter()
        .skip(skip)
        .map(|e| EventLine {
            time: time(e).map(|t| t.to_string()),
            r#type: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
        })
        .collect())
}

/// How long ago `time` (RFC 3339) was, as kubectl prints ages: 45s, 12m, 3h, 2d.
fn age(time: Option<&str>, now: jiff::Timestamp) -> String {
    let Some(then) = time.and_then(|t| t.parse::<jiff::Timestamp>().ok()) else { return "?".into() };
    let seconds = now.as_second().saturating_sub(then.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn yes_no(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

/// The screen: every line at most 100 columns.
pub fn render(status: &Status, now: jiff::Timestamp) -> String {
    let mut out = Vec::new();
    let ready = status.conditions.iter().find(|c| c.r#type == "Ready").map_or("Unknown", |c| c.status.as_str());
    out.push(format!(
        "RabbitCluster {}/{}   RabbitMQ {}   {}/{} pods ready   Ready={ready}{}",
        status.namespace,
        status.name,
        status.rabbitmq_version.as_deref().unwrap_or("?"),
        status.ready_replicas,
        status.replicas,
        if status.paused { "   PAUSED" } else { "" },
    ));
    // Scaling is the one condition whose usual status is False (no scale-down under way).
    let usual = |c: &ConditionLine| (c.status == "True") != (c.r#type == SCALING);
    let fine: Vec<String> = status
        .conditions
        .iter()
        .filter(|c| usual(c) && c.r#type != "Ready")
        .map(|c| if c.status == "True" { c.r#type.clone() } else { format!("{}={}", c.r#type, c.status) })
        .collect();
    if !fine.is_empty() {
        out.push(format!("  ok: {}", fine.join(" ")));
    }
    for c in status.conditions.iter().filter(|c| !usual(c)) {
        out.push(format!("  {}={} {}: {}", c.r#type, c.status, c.reason, c.message));
    }
    out.push(String::new());
    out.push(format!(
        "{:<16} {:<14} {:<5} {:>8}  {:<7} {:<8} {:<11} {}",
        "POD", "NODE", "READY", "RESTARTS", "MEMBER", "VERSION", "ALARMS", "PARTITIONED FROM"
    ));
    for n in &status.nodes {
        let alarms = if n.running.is_none() {
            "?".to_string()
        } else if n.alarms.is_empty() {
            "none".to_string()
        } else {
            n.alarms.join(",")
        };
        let partitioned = if n.partitioned_from.is_empty() {
            "-".to_string()
        } else {
            n.partitioned_from.iter().map(|p| pod_of(p)).collect::<Vec<_>>().join(",")
        };
        out.push(format!(
            "{:<16} {:<14} {:<5} {:>8}  {:<7} {:<8} {:<11} {}",
            fit(&n.pod, 16),
            fit(n.scheduled_on.as_deref().unwrap_or("-"), 14),
            yes_no(Some(n.ready)),
            n.restarts,
            yes_no(n.running),
            fit(n.version.as_deref().unwrap_or("?"), 8),
            fit(&alarms, 11),
            partitioned
        ));
    }
    out.push(String::new());
    match (&status.queues, &status.broker_error) {
        (Some(q), _) => {
            out.push(format!(
                "QUEUES  {} queues, {} messages: {} ready, {} unacknowledged",
                q.count, q.messages, q.ready, q.unacknowledged
            ));
            if !q.largest.is_empty() {
                out.push(format!(
                    "{:<10} {:<40} {:<8} {:>10} {:>10} {:>9}",
                    "VHOST", "QUEUE", "TYPE", "READY", "UNACKED", "CONSUMERS"
                ));
                for line in &q.largest {
                    out.push(format!(
                        "{:<10} {:<40} {:<8} {:>10} {:>10} {:>9}",
                        fit(&line.vhost, 10),
                        fit(&line.name, 40),
                        fit(&line.r#type, 8),
                        line.ready,
                        line.unacknowledged,
                        line.consumers
                    ));
                }
            }
        }
        (None, error) => {
            out.push(format!("QUEUES  unknown: {}", error.as_deref().unwrap_or("the broker was not asked")))
        }
    }
    out.push(String::new());
    if status.events.is_empty() {
        out.push("EVENTS  none".into());
    } else {
        out.push(format!("{:<5} {:<8} {:<22} {}", "AGE", "TYPE", "EVENT", "MESSAGE"));
        for e in &status.events {
            out.push(format!(
                "{:<5} {:<8} {:<22} {}",
                age(e.time.as_deref(), now),
                fit(&e.r#type, 8),
                fit(&e.reason, 22),
                e.message
            ));
        }
    }
    out.iter().map(|line| fit(line, 100) + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_screen_fits_100_columns_and_shows_what_is_wrong() {
        let status = Status {
            namespace: "apps".into(),
            name: "orders".into(),
            paused: true,
            replicas: 3,
            ready_replicas: 2,
            rabbitmq_version: Some("4.3.6".into()),
            conditions: vec![
                ConditionLine {
                    r#type: "Ready".into(),
                    status: "False".into(),
                    reason: "NotReady".into(),
                    message: "x".into(),
                },
                ConditionLine {
                    r#type: "NoPartitions".into(),
                    status: "False".into(),
                    reason: "PartitionDetected".into(),
                    message: "rabbit@orders-0.orders-nodes.apps.svc.cluster.local: partitioned from ".repeat(3),
                },
                ConditionLine {
                    r#type: "ClusterFormed".into(),
                    status: "True".into(),
                    reason: "r".into(),
                    message: "m".into(),
                },
                ConditionLine {
                    r#type: "Scaling".into(),
                    status: "False".into(),
                    reason: "Steady".into(),
                    message: "m".into(),
                },
            ],
            nodes: vec![NodeLine {
                pod: "orders-0".into(),
                scheduled_on: Some("worker-a".into()),
                ready: true,
                restarts: 2,
                node: Some("rabbit@orders-0.orders-nodes.apps.svc.cluster.local".into()),
                running: Some(true),
                version: Some("4.3.6".into()),
                alarms: vec!["memory".into()],
                partitioned_from: vec!["rabbit@orders-1.orders-nodes.apps.svc.cluster.local".into()],
            }],
            queues: Some(Queues {
                count: 1,
                messages: 5,
                ready: 4,
                unacknowledged: 1,
                largest: vec![QueueLine {
                    vhost: "/".into(),
                    name: "celery".repeat(12),
                    r#type: "quorum".into(),
                    ready: 4,
                    unacknowledged: 1,
                    consumers: 1,
                }],
            }),
            broker_error: None,
            events: vec![EventLine {
                time: Some("2026-01-01T00:00:00Z".into()),
                r#type: "Warning".into(),
                reason: "PartitionDetected".into(),
                message: "m".repeat(200),
            }],
        };
        let now: jiff::Timestamp = "2026-01-01T00:03:00Z".parse().unwrap();
        let screen = render(&status, now);
        for line in screen.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        assert!(
            screen.starts_with("RabbitCluster apps/orders   RabbitMQ 4.3.6   2/3 pods ready   Ready=False   PAUSED")
        );
        assert!(screen.contains("\n  ok: ClusterFormed Scaling=False\n"), "{screen}");
        assert!(screen.contains("\n  NoPartitions=False PartitionDetected: rabbit@orders-0"), "{screen}");
        assert!(
            screen
                .contains("\norders-0         worker-a       yes          2  yes     4.3.6    memory      orders-1\n"),
            "{screen}"
        );
        assert!(screen.contains("QUEUES  1 queues, 5 messages: 4 ready, 1 unacknowledged"), "{screen}");
        assert!(screen.contains("celerycelerycelerycelerycelerycelerycel… quorum"), "{screen}");
        assert!(screen.contains("\n3m    Warning  PartitionDetected      mmm"), "{screen}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["nodes"][0]["alarms"][0], "memory");
        assert_eq!(json["queues"]["largest"][0]["type"], "quorum");
    }

    #[test]
    fn a_node_name_gives_its_pod() {
        assert_eq!(pod_of("rabbit@orders-2.orders-nodes.apps.svc.cluster.local"), "orders-2");
        assert_eq!(pod_of("rabbit@localhost"), "localhost");
    }
}
