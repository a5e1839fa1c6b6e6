//! AMQP clients for the tier-2 scenarios: a publisher that counts only what the broker confirmed,
//! and a consumer that records every message id it got.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

pub async fn connect(url: &str) -> Result<Connection, String> {
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, ConnectionProperties::default())).await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

fn body(id: u32) -> Vec<u8> {
    format!("message {id}").into_bytes()
}

/// Publishes persistent messages `ids` to `queue` with publisher confirms, `window` in flight, and
/// returns the ids the broker acknowledged, stopping at the first failure (a lost connection, a
/// nack or a confirm that does not come within 30 s).
pub async fn publish(
    url: &str,
    queue: &str,
    ids: impl IntoIterator<Item = u32>,
    window: usize,
) -> (Vec<u32>, Option<String>) {
    let mut confirmed = Vec::new();
    let connection = match connect(url).await {
        Ok(c) => c,
        Err(e) => return (confirmed, Some(e)),
    };
    let outcome = async {
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
        let ids: Vec<u32> = ids.into_iter().collect();
        for chunk in ids.chunks(window.max(1)) {
            let mut pending = Vec::with_capacity(chunk.len());
            for &id in chunk {
                let properties =
                    BasicProperties::default().with_delivery_mode(2).with_message_id(id.to_string().into());
                let confirm = channel
                    .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body(id), properties)
                    .await
                    .map_err(|e| e.to_string())?;
                pending.push((id, confirm));
            }
            for (id, confirm) in pending {
                match tokio::time::timeout(Duration::from_secs(30), confirm).await {
                    Ok(Ok(c)) if c.is_ack() => confirmed.push(id),
                    Ok(Ok(c)) => return Err(format!("message {id} not acknowledged: {c:?}")),
                    Ok(Err(e)) => return Err(format!("message {id}: {e}")),
                    Err(_) => return Err(format!("message {id}: no confirm within 30 s")),
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    (confirmed, outcome.err())
}

/// Consumes from `queue` until `expected` messages arrived or nothing came for `idle`; acks each
/// and returns how many times each id was delivered.
pub async fn drain(url: &str, queue: &str, expected: usize, idle: Duration) -> Result<BTreeMap<u32, u32>, String> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.basic_qos(500, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(queue.into(), "warren-test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let mut total = 0;
    while total < expected {
        let next = match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(delivery)) => delivery.map_err(|e| e.to_string())?,
        };
        let id = next
            .properties
            .message_id()
            .as_ref()
            .and_then(|m| m.as_str().parse::<u32>().ok())
            .ok_or_else(|| format!("a message without a numeric message_id: {:?}", next.properties))?;
        if next.data != body(id) {
            return Err(format!("message {id} has body {:?}", String::from_utf8_lossy(&next.data)));
        }
        next.ack(BasicAckOptions::default()).await.map_err(|e| e.to_string())?;
        *seen.entry(id).or_default() += 1;
        total += 1;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(seen)
}
