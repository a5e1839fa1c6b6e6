//! After the import: would the apps' own declarations still be accepted by the target?
//!
//! Apps declare their queues and exchanges themselves when they start (kombu and pika do, with
//! the arguments they were written with and no `x-queue-type`). A queue that the migration made a
//! quorum queue, or a vhost whose default queue type differs, can make such a declaration
//! inequivalent: RabbitMQ then closes the channel with PRECONDITION_FAILED and the app stops
//! ("Unrecoverable error" in a Celery worker). Each declaration is tried on the target as the app
//! would send it, before any message moves: an equivalent declaration of an existing object
//! changes nothing, and a refused one changes nothing either, so the probe is safe.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use serde_json::{Map, Value};

use super::amqp::{self, Failure};
use super::model::Queue;
use super::preflight::Plan;
use super::{MigrateError, MigratePhase, MigrateReason, Options};
use crate::error::BrokerReason;
use crate::rabbitmq::queue_type::QueueType;

/// A declaration an app makes that the target refuses, with RabbitMQ's words and what to change.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RefusedDeclaration {
    pub vhost: String,
    /// `queue` or `exchange`.
    pub kind: String,
    pub name: String,
    /// RabbitMQ's error, as the app would get it.
    pub error: String,
    pub advice: String,
}

/// An AMQP field value for a definitions JSON value.
fn field(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(field).collect::<Vec<_>>())),
        Value::Object(map) => AMQPValue::FieldTable(table(map)),
    }
}

/// A declaration's arguments as an AMQP table.
pub fn table(arguments: &Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        table.insert(ShortString::from(key.as_str()), field(value));
    }
    table
}

/// What the app should change so the target accepts its declaration of `queue`.
fn queue_advice(name: &str, target_type: &QueueType, error: &str) -> String {
    if !error.contains("x-queue-type") {
        return format!(
            "declare queue {name} in the app with the arguments it has on the target (the management UI or \
             `rabbitmqctl list_queues name arguments` show them), or remove the argument the error names"
        );
    }
    let declare = format!(
        "declare it with x-queue-type={target_type} (Celery: task_queues = [Queue(\"{name}\", queue_arguments=\
         {{\"x-queue-type\": \"{target_type}\"}})]; kombu: Queue(..., queue_arguments=...); pika: \
         arguments={{\"x-queue-type\": \"{target_type}\"}})"
    );
    if *target_type == QueueType::Classic {
        // Kept classic (it cannot be quorum), on a vhost whose default is quorum: a declaration
        // that names no type asks for a quorum queue.
        format!(
            "queue {name} stayed a classic queue on the target, whose vhost defaults to quorum, so a declaration \
             without x-queue-type asks for a quorum queue: {declare}"
        )
    } else {
        format!(
            "queue {name} is a {target_type} queue on the target: {declare}, or from Celery 5.5 \
             task_default_queue_type = \"{target_type}\"; or migrate with --keep-classic"
        )
    }
}

/// Each migrated queue and exchange declared on the target as the apps declare it; the refused
/// ones, each with RabbitMQ's error. A channel the broker closes on a refusal is replaced.
pub async fn check(options: &Options, plan: &Plan) -> Result<Vec<RefusedDeclaration>, MigrateError> {
    let mut refused = Vec::new();
    let mut vhosts: Vec<&str> = plan.app_queues.iter().map(|q| q.vhost.as_str()).collect();
    vhosts.extend(plan.app_exchanges.iter().map(|e| e.vhost.as_str()));
    vhosts.sort_unstable();
    vhosts.dedup();
    for vhost in vhosts {
        let unreachable = |e: Failure| {
            MigrateError::new(
                MigratePhase::Definitions,
                MigrateReason::Broker(BrokerReason::BrokerUnreachable),
                format!("target: {}", e.message),
            )
        };
        let connection = amqp::connect(&options.target.amqp_for(vhost), options.target.ca.as_deref(), "target")
            .await
            .map_err(unreachable)?;
        let outcome = check_vhost(&connection, vhost, plan, &mut refused).await;
        amqp::close(connection, "declarations checked").await;
        outcome.map_err(unreachable)?;
    }
    Ok(refused)
}

async fn channel(connection: &lapin::Connection) -> Result<Channel, Failure> {
    amqp::within("open a channel", connection.create_channel()).await
}

async fn check_vhost(
    connection: &lapin::Connection,
    vhost: &str,
    plan: &Plan,
    refused: &mut Vec<RefusedDeclaration>,
) -> Result<(), Failure> {
    let mut on = channel(connection).await?;
    for queue in plan.app_queues.iter().filter(|q| q.vhost == vhost) {
        let name = queue.name.as_str();
        let declare = QueueDeclareOptions {
            durable: queue.durable,
            auto_delete: queue.auto_delete,
            ..QueueDeclareOptions::default()
        };
        let arguments = table(&queue.app_arguments());
        match amqp::within(&format!("queue.declare {name}"), on.queue_declare(name.into(), declare, arguments)).await {
            Ok(_) => {}
            Err(failure) if failure.transport => return Err(failure),
            Err(failure) => {
                let target_type = plan
                    .definitions
                    .queues
                    .iter()
                    .find(|d| d.key() == (vhost, name))
                    .map(Queue::kind)
                    .unwrap_or_default();
                refused.push(RefusedDeclaration {
                    vhost: vhost.to_string(),
                    kind: "queue".into(),
                    name: name.to_string(),
                    advice: queue_advice(name, &target_type, &failure.message),
                    error: failure.message,
                });
                on = channel(connection).await?;
            }
        }
    }
    for exchange in plan.app_exchanges.iter().filter(|e| e.vhost == vhost) {
        let name = exchange.name.as_str();
        let kind = match exchange.kind.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            "topic" => ExchangeKind::Topic,
            other => ExchangeKind::Custom(other.to_string()),
        };
        let declare = ExchangeDeclareOptions {
            durable: exchange.durable,
            auto_delete: exchange.auto_delete,
            internal: exchange.internal,
            ..ExchangeDeclareOptions::default()
        };
        let arguments = table(&exchange.arguments);
        let declared = on.exchange_declare(name.into(), kind, declare, arguments);
        match amqp::within(&format!("exchange.declare {name}"), declared).await {
            Ok(_) => {}
            Err(failure) if failure.transport => return Err(failure),
            Err(failure) => {
                refused.push(RefusedDeclaration {
                    vhost: vhost.to_string(),
                    kind: "exchange".into(),
                    name: name.to_string(),
                    advice: format!(
                        "declare exchange {name} in the app as it is on the target (type, durable, arguments)"
                    ),
                    error: failure.message,
                });
                on = channel(connection).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_arguments_become_amqp_fields_of_the_same_kind() {
        let arguments = json!({"x-max-length": 10, "x-message-ttl": 1.5, "x-dead-letter-exchange": "dlx",
                               "x-single-active-consumer": true});
        let table = table(arguments.as_object().unwrap());
        let inner = table.inner();
        assert_eq!(inner.get("x-max-length"), Some(&AMQPValue::LongLongInt(10)));
        assert_eq!(inner.get("x-message-ttl"), Some(&AMQPValue::Double(1.5)));
        assert_eq!(inner.get("x-dead-letter-exchange"), Some(&AMQPValue::LongString("dlx".into())));
        assert_eq!(inner.get("x-single-active-consumer"), Some(&AMQPValue::Boolean(true)));
    }

    #[test]
    fn a_type_mismatch_is_answered_with_the_declaration_to_use() {
        let advice = queue_advice(
            "celery",
            &QueueType::Quorum,
            "queue.declare celery: PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'celery'",
        );
        assert!(advice.contains("x-queue-type=quorum"), "{advice}");
        assert!(advice.contains("task_default_queue_type"), "{advice}");
        // A queue kept classic on a vhost that defaults to quorum (seen live on 4.3: a priority queue).
        let advice =
            queue_advice("invoices", &QueueType::Classic, "inequivalent arg 'x-queue-type': received 'quorum'");
        assert!(advice.contains("x-queue-type=classic") && advice.contains("defaults to quorum"), "{advice}");
        assert!(!advice.contains("--keep-classic"), "{advice}");
    }
}
