//! The definitions document of the management API (`GET` and `POST /api/definitions`), typed.
//!
//! What the migration reads or changes is a field; everything else RabbitMQ writes (and whatever a
//! later version adds) is kept as it came in `rest`, so an object imported is the object exported.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rabbitmq::queue_type::QueueType;

/// Queue, exchange and binding arguments (`x-*`), as JSON.
pub type Arguments = Map<String, Value>;

fn default_vhost() -> String {
    "/".into()
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub vhosts: Vec<Vhost>,
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub topic_permissions: Vec<Permission>,
    #[serde(default)]
    pub parameters: Vec<Parameter>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub queues: Vec<Queue>,
    #[serde(default)]
    pub exchanges: Vec<Exchange>,
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// The versions, global parameters and what else the export has: not imported.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vhost {
    pub name: String,
    /// Its default queue type (`default_queue_type` from 3.11.12, `defaultqueuetype` before, and
    /// also in `metadata`), description, tags, limits.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// A user's permissions (or topic permissions) in a vhost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Permission {
    pub user: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// A runtime parameter of a vhost (a shovel, a federation upstream, vhost limits).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parameter {
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub component: String,
    pub name: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl Parameter {
    /// It would move or copy messages by itself once imported.
    pub fn moves_messages(&self) -> bool {
        matches!(self.component.as_str(), "shovel" | "federation-upstream" | "federation-upstream-set")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to", default, skip_serializing_if = "Option::is_none")]
    pub apply_to: Option<String>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub definition: Map<String, Value>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl Policy {
    /// Whether it applies to `queue`: same vhost, a queue kind it names, a pattern that matches.
    pub fn applies_to(&self, queue: &Queue) -> bool {
        self.vhost == queue.vhost
            && matches!(self.apply_to.as_deref().unwrap_or("all"), "all" | "queues" | "classic_queues")
            && regex::Regex::new(&self.pattern).is_ok_and(|re| re.is_match(&queue.name))
    }

    /// Classic mirroring (`ha-mode`, RabbitMQ 3.x).
    pub fn mirrors(&self) -> bool {
        self.definition.contains_key("ha-mode")
    }

    /// The same policy: pattern, target kinds, priority and definition.
    pub fn same_as(&self, other: &Policy) -> bool {
        (&self.pattern, self.apply_to.as_deref().unwrap_or("all"), self.priority, &self.definition)
            == (&other.pattern, other.apply_to.as_deref().unwrap_or("all"), other.priority, &other.definition)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    /// Never in an export (exclusive queues are not exported); set in `GET /api/queues`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    #[serde(default)]
    pub arguments: Arguments,
    /// The type the queue has: given by its vhost's default when its arguments name none.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub queue_type: Option<QueueType>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl Queue {
    /// Its type: in its arguments when the client chose it, in `type` when its vhost's default
    /// queue type did; classic when neither says.
    pub fn kind(&self) -> QueueType {
        match self.arguments.get("x-queue-type").and_then(Value::as_str) {
            Some(name) => QueueType::parse(name),
            None => self.queue_type.clone().unwrap_or_default(),
        }
    }

    pub fn key(&self) -> (&str, &str) {
        (&self.vhost, &self.name)
    }

    /// Its arguments as they decide equivalence (`x-queue-type: classic` is the default).
    pub fn effective_arguments(&self) -> Arguments {
        let mut arguments = self.arguments.clone();
        match self.kind() {
            QueueType::Classic => arguments.remove("x-queue-type"),
            other => arguments.insert("x-queue-type".into(), Value::String(other.to_string())),
        };
        arguments
    }

    /// The declaration an app makes: these arguments without `x-queue-type`, as kombu and pika send
    /// them by default (the source's type came from its vhost's default, or from 3.x, where
    /// classic was the only kind an app declared without naming one).
    pub fn app_arguments(&self) -> Arguments {
        let mut arguments = self.arguments.clone();
        arguments.remove("x-queue-type");
        arguments
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub name: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    #[serde(rename = "type", default = "direct")]
    pub kind: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub arguments: Arguments,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

fn direct() -> String {
    "direct".into()
}

impl Exchange {
    /// One an app declares: not the default exchange nor a built-in `amq.*` one.
    pub fn declared_by_apps(&self) -> bool {
        !self.name.is_empty() && !self.name.starts_with("amq.")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub source: String,
    pub destination: String,
    pub destination_type: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default)]
    pub arguments: Arguments,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// The identity of each kind of object, by which the import is verified.
impl Definitions {
    pub fn identities(&self) -> Vec<String> {
        let vhosts = self.vhosts.iter().map(|v| format!("vhost {}", v.name));
        let queues = self.queues.iter().map(|q| format!("queue {} in vhost {}", q.name, q.vhost));
        let exchanges = self.exchanges.iter().map(|e| format!("exchange {} in vhost {}", e.name, e.vhost));
        let bindings = self.bindings.iter().map(|b| {
            format!(
                "binding {} -> {} {} ({}) in vhost {}",
                b.source, b.destination_type, b.destination, b.routing_key, b.vhost
            )
        });
        let policies = self.policies.iter().map(|p| format!("policy {} in vhost {}", p.name, p.vhost));
        vhosts.chain(queues).chain(exchanges).chain(bindings).chain(policies).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_export_reads_and_writes_back_unchanged() {
        let exported = json!({
            "rabbit_version": "3.10.8",
            "users": [{"name": "app", "password_hash": "h", "hashing_algorithm": "rabbit_password_hashing_sha256",
                       "tags": "", "limits": {}}],
            "vhosts": [{"name": "/", "limits": [], "metadata": {"description": "", "tags": []}}],
            "permissions": [{"user": "app", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
            "topic_permissions": [],
            "parameters": [{"vhost": "/", "component": "shovel", "name": "s", "value": {"src-uri": "amqp://"}}],
            "global_parameters": [{"name": "cluster_name", "value": "old"}],
            "policies": [{"vhost": "/", "name": "ha-all", "pattern": ".*", "apply-to": "queues", "priority": 0,
                          "definition": {"ha-mode": "all"}}],
            "queues": [{"name": "celery", "vhost": "/", "durable": true, "auto_delete": false,
                        "arguments": {"x-max-priority": 10}, "type": "classic"}],
            "exchanges": [{"name": "celery", "vhost": "/", "type": "direct", "durable": true, "auto_delete": false,
                           "internal": false, "arguments": {}}],
            "bindings": [{"source": "celery", "vhost": "/", "destination": "celery", "destination_type": "queue",
                          "routing_key": "celery", "arguments": {}}]
        });
        let typed: Definitions = serde_json::from_value(exported.clone()).unwrap();
        assert_eq!(typed.queues[0].kind(), QueueType::Classic);
        assert!(typed.parameters[0].moves_messages());
        assert!(typed.policies[0].mirrors() && typed.policies[0].applies_to(&typed.queues[0]));
        assert_eq!(serde_json::to_value(&typed).unwrap(), exported);
    }

    #[test]
    fn a_queue_type_comes_from_its_arguments_first() {
        let queue: Queue = serde_json::from_value(json!({"name": "q", "type": "classic",
            "arguments": {"x-queue-type": "quorum", "x-max-length": 5}}))
        .unwrap();
        assert_eq!(queue.kind(), QueueType::Quorum);
        assert_eq!(Value::Object(queue.app_arguments()), json!({"x-max-length": 5}));
        let defaulted: Queue = serde_json::from_value(json!({"name": "q", "type": "quorum"})).unwrap();
        assert_eq!(Value::Object(defaulted.effective_arguments()), json!({"x-queue-type": "quorum"}));
        let old: Queue =
            serde_json::from_value(json!({"name": "q", "arguments": {"x-queue-type": "classic"}})).unwrap();
        assert_eq!(Value::Object(old.effective_arguments()), json!({}));
        assert_eq!((old.vhost.as_str(), old.durable, old.auto_delete), ("/", true, false));
    }
}
