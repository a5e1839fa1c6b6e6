//! The few management HTTP API calls the operator makes.
//!
//! `rabbitmq_http_client`'s node type has no `running` or `partitions` fields, which are what the
//! operator watches, so this is a small reqwest client over the documented endpoints.

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::queue_type::QueueType;
use crate::error::{BrokerReason, Error, Result};

/// A management API endpoint with the credentials to use it.
#[derive(Clone)]
pub struct ManagementClient {
    http: reqwest::Client,
    base_url: String,
    username: String,
    password: String,
}

// Credentials stay out of logs.
impl std::fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementClient").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// One node of `GET /api/nodes`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub partitions: Vec<String>,
    /// The memory alarm (publishers blocked cluster-wide).
    #[serde(default)]
    pub mem_alarm: bool,
    /// The free disk space alarm (publishers blocked cluster-wide).
    #[serde(default)]
    pub disk_free_alarm: bool,
    /// The node's applications; `rabbit`'s version is the node's RabbitMQ version.
    #[serde(default)]
    pub applications: Vec<Application>,
    /// In maintenance mode (`rabbitmq-upgrade drain`): clients and queue leaders moved off.
    /// Reported from 4.0; `None` where the version does not say.
    #[serde(default)]
    pub being_drained: Option<bool>,
}

impl NodeInfo {
    /// The RabbitMQ version the node runs, when the API lists its applications.
    pub fn rabbit_version(&self) -> Option<&str> {
        self.applications.iter().find(|a| a.name == "rabbit").map(|a| a.version.as_str())
    }
}

/// An Erlang application of a node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub version: String,
}

/// `GET /api/overview`: the cluster's version and totals. The totals are statistics: while there
/// are none, RabbitMQ sends an empty list (`"queue_totals": []`, an empty Erlang property list) or
/// nulls, read as zero.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Overview {
    #[serde(default)]
    pub rabbitmq_version: Option<String>,
    #[serde(default, deserialize_with = "or_default")]
    pub object_totals: ObjectTotals,
    #[serde(default, deserialize_with = "or_default")]
    pub queue_totals: QueueTotals,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct ObjectTotals {
    #[serde(default, deserialize_with = "or_default")]
    pub queues: u64,
}

/// Messages of every queue (absent, so zero, while the statistics are not in yet).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct QueueTotals {
    #[serde(default, deserialize_with = "or_default")]
    pub messages: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub messages_ready: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub messages_unacknowledged: u64,
}

/// A statistic as RabbitMQ may send it before it has one (null, an empty list): its default.
fn or_default<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned + Default>(
    deserializer: D,
) -> std::result::Result<T, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// A page of a paginated list (`?page=1&page_size=N`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Page<T> {
    #[serde(default = "Vec::new")]
    pub items: Vec<T>,
}

/// One queue of `GET /api/queues`: what decides whether a node can leave, and the statistics a
/// migration's preflight and `kubectl warren status` read (each caller asks for its columns; what
/// is not asked for keeps its default).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// `classic`, `quorum` or `stream` (absent on old versions: classic).
    #[serde(default, rename = "type")]
    pub queue_type: Option<QueueType>,
    /// Classic: the node holding the queue (its master when mirrored); quorum: the leader.
    #[serde(default)]
    pub node: Option<String>,
    /// Quorum and stream members.
    #[serde(default)]
    pub members: Vec<String>,
    /// Members that are online.
    #[serde(default)]
    pub online: Vec<String>,
    /// Classic mirrors (3.x), and those holding every message.
    #[serde(default)]
    pub slave_nodes: Vec<String>,
    #[serde(default)]
    pub synchronised_slave_nodes: Vec<String>,
    /// Absent until the node has emitted the queue's first statistics.
    #[serde(default)]
    pub messages: Option<u64>,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default, deserialize_with = "or_default")]
    pub messages_ready: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub messages_unacknowledged: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub message_bytes_ready: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub consumers: u64,
    /// The policy in effect (3.x and 4.x report it; absent on some versions).
    #[serde(default)]
    pub effective_policy_definition: Option<Value>,
}

fn default_vhost() -> String {
    "/".into()
}

impl QueueInfo {
    /// Its type (a queue whose version reports none is classic).
    pub fn kind(&self) -> QueueType {
        self.queue_type.clone().unwrap_or_default()
    }

    /// Whether a classic mirroring policy (`ha-mode`) applies to it.
    pub fn mirrored(&self) -> bool {
        self.effective_policy_definition.as_ref().is_some_and(|d| d.get("ha-mode").is_some())
    }
}

/// One vhost of `GET /api/vhosts`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VhostInfo {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Option<Value>,
    #[serde(default)]
    pub default_queue_type: Option<String>,
    #[serde(default)]
    pub metadata: Option<VhostMetadata>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VhostMetadata {
    #[serde(default)]
    pub default_queue_type: Option<String>,
}

impl VhostInfo {
    /// The default queue type, wherever this version reports it.
    pub fn effective_default_queue_type(&self) -> Option<QueueType> {
        self.default_queue_type
            .as_deref()
            .or_else(|| self.metadata.as_ref().and_then(|m| m.default_queue_type.as_deref()))
            .map(QueueType::parse)
    }
}

/// A policy as `GET /api/policies/{vhost}/{name}` returns it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PolicyInfo {
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to")]
    pub apply_to: String,
    pub priority: i32,
    pub definition: Map<String, Value>,
}

/// One feature flag of `GET /api/feature-flags`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct FeatureFlagInfo {
    pub name: String,
    /// `enabled`, `disabled`, `state_changing` or `unavailable` (a node does not know it).
    pub state: String,
    /// `stable`, `experimental` or `required`.
    #[serde(default)]
    pub stability: String,
}

/// Everything but RFC 3986's unreserved characters: safe for a path segment and for URI userinfo.
pub const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes a vhost, user or policy name for a URI (the default vhost `/` becomes `%2F`).
pub fn encode(component: &str) -> String {
    utf8_percent_encode(component, URI_COMPONENT).to_string()
}

/// An error's text with its sources', which reqwest keeps apart ("error sending request" says
/// nothing of a certificate that was not verified).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut texts: Vec<String> = Vec::new();
    for text in std::iter::successors(Some(error), |e| e.source()).map(ToString::to_string) {
        if !texts.last().is_some_and(|last| last.contains(&text)) {
            texts.push(text);
        }
    }
    texts.join(": ")
}

impl ManagementClient {
    /// `base_url` is the management listener, e.g. `http://demo.ns.svc:15672`.
    pub fn new(base_url: &str, username: &str, password: &str) -> Result<Self> {
        Self::with_ca(base_url, username, password, None)
    }

    /// An `https` listener's certificate is verified against `ca` (PEM) as well as the system's
    /// roots.
    pub fn with_ca(base_url: &str, username: &str, password: &str, ca: Option<&str>) -> Result<Self> {
        let client_error = |message: String| Error::Broker {
            reason: BrokerReason::BrokerClientError,
            what: base_url.to_string(),
            message,
        };
        let mut builder =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(15));
        if let Some(ca) = ca {
            for certificate in reqwest::Certificate::from_pem_bundle(ca.as_bytes())
                .map_err(|e| client_error(format!("the CA: {e}")))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(|e| Error::Broker {
            reason: BrokerReason::BrokerClientError,
            what: base_url.to_string(),
            // reqwest's own text is only "builder error": the cause is in its sources.
            message: std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": "),
        })?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            username: username.to_string(),
            password: password.to_string(),
        })
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Option<String>> {
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .basic_auth(&self.username, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| Error::Broker {
            reason: if e.is_timeout() { BrokerReason::BrokerTimeout } else { BrokerReason::BrokerUnreachable },
            what: what.clone(),
            // With its causes: a refused connection, a certificate that was not verified.
            message: causes(&e),
        })?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) if status.is_success() => {
                return Err(Error::Broker { reason: BrokerReason::BrokerUnreachable, what, message: e.to_string() });
            }
            // The status says what went wrong; a body cut short adds nothing.
            Err(_) => String::new(),
        };
        if status.is_success() {
            return Ok(Some(text));
        }
        let reason = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => BrokerReason::BrokerUnauthorized,
            s if s.is_server_error() => BrokerReason::BrokerUnavailable,
            _ => BrokerReason::BrokerRejected,
        };
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| text.chars().take(300).collect());
        Err(Error::Broker { reason, what, message: format!("HTTP {status}: {detail}") })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<Option<T>> {
        let Some(text) = self.send(reqwest::Method::GET, path, None).await? else {
            return Ok(None);
        };
        serde_json::from_str(&text).map(Some).map_err(|e| Error::Broker {
            reason: BrokerReason::BrokerBadResponse,
            what: format!("GET {path}"),
            message: e.to_string(),
        })
    }

    async fn get_required<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T> {
        self.get_json(path).await?.ok_or_else(|| Error::Broker {
            reason: BrokerReason::BrokerBadResponse,
            what: format!("GET {path}"),
            message: "404 Not Found".into(),
        })
    }

    /// Any GET, as JSON (`None` on 404).
    pub async fn get(&self, path: &str) -> Result<Option<Value>> {
        self.get_json(path).await
    }

    /// A POST of a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<()> {
        self.send(reqwest::Method::POST, path, Some(body.clone())).await.map(|_| ())
    }

    /// The RabbitMQ version the cluster reports.
    pub async fn rabbitmq_version(&self) -> Result<String> {
        self.get_required::<Overview>("/api/overview").await?.rabbitmq_version.ok_or_else(|| Error::Broker {
            reason: BrokerReason::BrokerBadResponse,
            what: "GET /api/overview".into(),
            message: "no rabbitmq_version in the answer".into(),
        })
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        self.get_required("/api/nodes").await
    }

    /// Every queue, with only the columns a scale-down decides on.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>> {
        let path = "/api/queues?columns=name,vhost,type,node,members,online,slave_nodes,synchronised_slave_nodes,\
                    messages,durable,exclusive";
        // RabbitMQ 4.0 sometimes sends a quorum queue's `members` twice in one object (seen while
        // members are being removed): read each queue as a map first, where the last one wins.
        let queues: Vec<Map<String, Value>> = self.get_required(path).await?;
        queues
            .into_iter()
            .map(|q| serde_json::from_value(Value::Object(q)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Broker {
                reason: BrokerReason::BrokerBadResponse,
                what: format!("GET {path}"),
                message: e.to_string(),
            })
    }

    /// The classic queues a mirroring policy (`ha-mode`) applies to, as `vhost/name` (3.x).
    pub async fn mirrored_classic_queues(&self) -> Result<Vec<String>> {
        let path = "/api/queues?columns=name,vhost,type,effective_policy_definition";
        let queues: Vec<Map<String, Value>> = self.get_required(path).await?;
        Ok(queues
            .iter()
            .filter(|q| q.get("type").and_then(Value::as_str).is_none_or(|t| t == "classic"))
            .filter(|q| q.get("effective_policy_definition").and_then(|d| d.get("ha-mode")).is_some())
            .map(|q| {
                let field = |key: &str| q.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
                format!("{}/{}", field("vhost"), field("name"))
            })
            .collect())
    }

    /// Asks a classic mirrored queue (3.x) to synchronise its mirrors now.
    pub async fn sync_queue(&self, vhost: &str, name: &str) -> Result<()> {
        let path = format!("/api/queues/{}/{}/actions", encode(vhost), encode(name));
        self.send(reqwest::Method::POST, &path, Some(json!({"action": "sync"}))).await.map(|_| ())
    }

    pub async fn feature_flags(&self) -> Result<Vec<FeatureFlagInfo>> {
        self.get_required("/api/feature-flags").await
    }

    /// Enables a feature flag on every node (all of them must run).
    pub async fn enable_feature_flag(&self, name: &str) -> Result<()> {
        let path = format!("/api/feature-flags/{}/enable", encode(name));
        self.send(reqwest::Method::PUT, &path, Some(json!({}))).await.map(|_| ())
    }

    pub async fn vhosts(&self) -> Result<Vec<VhostInfo>> {
        self.get_required("/api/vhosts").await
    }

    pub async fn policy(&self, vhost: &str, name: &str) -> Result<Option<PolicyInfo>> {
        self.get_json(&format!("/api/policies/{}/{}", encode(vhost), encode(name))).await
    }

    pub async fn put_policy(
        &self,
        vhost: &str,
        name: &str,
        pattern: &str,
        priority: i32,
        definition: &Map<String, Value>,
    ) -> Result<()> {
        let body = json!({"pattern": pattern, "apply-to": "queues", "priority": priority, "definition": definition});
        let path = format!("/api/policies/{}/{}", encode(vhost), encode(name));
        self.send(reqwest::Method::PUT, &path, Some(body)).await.map(|_| ())
    }

    pub async fn delete_policy(&self, vhost: &str, name: &str) -> Result<()> {
        let path = format!("/api/policies/{}/{}", encode(vhost), encode(name));
        self.send(reqwest::Method::DELETE, &path, None).await.map(|_| ())
    }

    /// Sets a vhost's default queue type, keeping its description and tags (a PUT replaces them).
    pub async fn set_default_queue_type(&self, vhost: &VhostInfo, key: &str, queue_type: &QueueType) -> Result<()> {
        let mut body = Map::new();
        if let Some(description) = &vhost.description {
            body.insert("description".into(), json!(description));
        }
        // Older versions take tags only as a comma-separated string; all accept that form.
        if let Some(Value::Array(tags)) = &vhost.tags {
            let tags: Vec<&str> = tags.iter().filter_map(Value::as_str).collect();
            body.insert("tags".into(), json!(tags.join(",")));
        }
        body.insert(key.into(), json!(queue_type));
        let path = format!("/api/vhosts/{}", encode(&vhost.name));
        self.send(reqwest::Method::PUT, &path, Some(Value::Object(body))).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_not_in_yet_read_as_zero() {
        let fresh: Overview = serde_json::from_value(json!({
            "rabbitmq_version": "4.3.6", "object_totals": {"queues": 0}, "queue_totals": []
        }))
        .expect("an overview without statistics");
        assert_eq!((fresh.rabbitmq_version.as_deref(), fresh.queue_totals), (Some("4.3.6"), QueueTotals::default()));
        let busy: Overview = serde_json::from_value(json!({
            "object_totals": {"queues": 2},
            "queue_totals": {"messages": 500, "messages_ready": 480, "messages_unacknowledged": 20,
                             "messages_details": {"rate": 0.0}}
        }))
        .expect("an overview");
        assert_eq!((busy.object_totals.queues, busy.queue_totals.messages_ready), (2, 480));
        let queue: QueueInfo = serde_json::from_value(json!({
            "name": "celery", "vhost": "/", "type": "quorum", "messages_ready": null, "consumers": 3
        }))
        .expect("a queue");
        assert_eq!((queue.kind(), queue.messages_ready, queue.consumers), (QueueType::Quorum, 0, 3));
    }
}
