//! AMQP clients for the tier-2 scenarios: a publisher that counts only what the broker confirmed,
//! and a consumer that records every message id it got.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Mutex;

/// Ready messages of `queue` in the URL's vhost, as the broker counts them now (a passive
/// declare): the management API's statistics follow seconds behind and may still show a count
/// from before.
pub async fn live_depth(url: &str, queue: &str) -> u64 {
    use warren::migrate::amqp;
    let connection = amqp::connect(url, None, "broker").await.expect("connect");
    let channel = amqp::within("open a channel", connection.create_channel()).await.expect("channel");
    let depth = amqp::depth(&channel, queue).await.expect("passive declare");
    amqp::close(connection, "counted").await;
    depth
}

pub async fn connect(url: &str) -> Result<Connection, String> {
    connect_trusting(url, None).await
}

/// A connection that verifies the broker's certificate against `ca` (amqps).
pub async fn connect_trusting(url: &str, ca: Option<&str>) -> Result<Connection, String> {
    if ca.is_some() {
        return warren::migrate::amqp::connect(url, ca, "broker").await.map_err(|e| e.message);
    }
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, ConnectionProperties::default())).await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// Every broker operation gets a bound: a connection to a node that went away can otherwise wait
/// forever (a close, for example, waits for close-ok).
async fn within<T, E: std::fmt::Display>(
    what: &str,
    operation: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_secs(30), operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within 30 s")),
    }
}

async fn close(connection: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, "done".into())).await;
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
    publish_trusting(url, None, queue, ids, window).await
}

/// `publish`, verifying the broker's certificate against `ca` (amqps).
pub async fn publish_trusting(
    url: &str,
    ca: Option<&str>,
    queue: &str,
    ids: impl IntoIterator<Item = u32>,
    window: usize,
) -> (Vec<u32>, Option<String>) {
    let mut confirmed = Vec::new();
    let connection = match connect_trusting(url, ca).await {
        Ok(c) => c,
        Err(e) => return (confirmed, Some(e)),
    };
    let outcome = async {
        let channel = within("open a channel", connection.create_channel()).await?;
        within("confirm.select", channel.confirm_select(ConfirmSelectOptions::default())).await?;
        let ids: Vec<u32> = ids.into_iter().collect();
        for chunk in ids.chunks(window.max(1)) {
            let mut pending = Vec::with_capacity(chunk.len());
            for &id in chunk {
                let properties =
                    BasicProperties::default().with_delivery_mode(2).with_message_id(id.to_string().into());
                let confirm = within(
                    "basic.publish",
                    channel.basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body(id),
                        properties,
                    ),
                )
                .await?;
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
    close(connection).await;
    (confirmed, outcome.err())
}

/// Consumes from `queue` until `expected` messages arrived or nothing came for `idle`; acks each
/// and returns how many times each id was delivered, with the error that ended it early (what was
/// consumed before a lost connection still counts).
pub async fn consume(url: &str, queue: &str, expected: usize, idle: Duration) -> (BTreeMap<u32, u32>, Option<String>) {
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let connection = match connect(url).await {
        Ok(c) => c,
        Err(e) => return (seen, Some(e)),
    };
    let outcome = async {
        let channel = within("open a channel", connection.create_channel()).await?;
        within("basic.qos", channel.basic_qos(500, BasicQosOptions::default())).await?;
        let mut consumer = within(
            "basic.consume",
            channel.basic_consume(
                queue.into(),
                "warren-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let mut total = 0;
        while total < expected {
            let next = match tokio::time::timeout(idle, consumer.next()).await {
                Err(_) => break,
                Ok(None) => return Err("the consumer was cancelled".to_string()),
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
            within("basic.ack", next.ack(BasicAckOptions::default())).await?;
            *seen.entry(id).or_default() += 1;
            total += 1;
        }
        Ok(())
    }
    .await;
    close(connection).await;
    (seen, outcome.err())
}

/// `consume` that must not fail.
pub async fn drain(url: &str, queue: &str, expected: usize, idle: Duration) -> Result<BTreeMap<u32, u32>, String> {
    match consume(url, queue, expected, idle).await {
        (seen, None) => Ok(seen),
        (_, Some(error)) => Err(error),
    }
}

/// Publishes batches of 100 to `queue` until `stop`, starting on `urls[0]` and moving to the next
/// URL when its node fails (a client with a failover list); returns how many times it moved.
pub async fn publish_until(
    urls: Vec<String>,
    queue: &'static str,
    confirmed: Arc<Mutex<BTreeSet<u32>>>,
    stop: Arc<AtomicBool>,
) -> usize {
    publish_timed_until(urls, queue, 100, confirmed, stop).await.moves
}

/// What a publisher saw while a fault ran.
#[derive(Debug, Clone, Copy)]
pub struct Publishing {
    /// How many times it moved to the next URL (its node failed).
    pub moves: usize,
    /// The longest time it went without a confirm: what its users waited.
    pub longest_silence: Duration,
}

/// `publish_until` in batches of `batch` (the smaller, the finer the silence is measured), timing
/// the longest stretch between two confirmed batches.
pub async fn publish_timed_until(
    urls: Vec<String>,
    queue: &'static str,
    batch: u32,
    confirmed: Arc<Mutex<BTreeSet<u32>>>,
    stop: Arc<AtomicBool>,
) -> Publishing {
    let (mut next, mut target, mut moves) = (0u32, 0usize, 0usize);
    let mut last_confirm = std::time::Instant::now();
    let mut longest_silence = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let (acked, error) = publish(&urls[target % urls.len()], queue, next..next + batch, batch as usize / 2).await;
        if !acked.is_empty() {
            longest_silence = longest_silence.max(last_confirm.elapsed());
            last_confirm = std::time::Instant::now();
        }
        // Confirms are awaited in order: what was acked is a prefix; the rest is published again.
        next += acked.len() as u32;
        confirmed.lock().await.extend(acked);
        if error.is_some() {
            target += 1;
            moves += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Publishing { moves, longest_silence: longest_silence.max(last_confirm.elapsed()) }
}

/// Consumes `queue` until `stop` and an idle queue, moving to the next URL when its node fails;
/// returns how many times it moved.
pub async fn consume_until(
    urls: Vec<String>,
    queue: &'static str,
    seen: Arc<Mutex<BTreeMap<u32, u32>>>,
    stop: Arc<AtomicBool>,
) -> usize {
    let (mut target, mut moves) = (0usize, 0usize);
    loop {
        let (got, error) = consume(&urls[target % urls.len()], queue, usize::MAX, Duration::from_secs(3)).await;
        let mut all = seen.lock().await;
        for (id, n) in got {
            *all.entry(id).or_default() += n;
        }
        drop(all);
        match error {
            Some(_) => {
                target += 1;
                moves += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            None if stop.load(Ordering::Relaxed) => return moves,
            None => {}
        }
    }
}

/// Every id in `ids` consumed exactly once, nothing else.
pub fn assert_exactly_once(seen: &BTreeMap<u32, u32>, ids: impl Iterator<Item = u32>) {
    let expected: Vec<u32> = ids.collect();
    let missing: Vec<&u32> = expected.iter().filter(|id| !seen.contains_key(id)).take(10).collect();
    let twice: Vec<(&u32, &u32)> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, first ones: {missing:?}",
        expected.iter().filter(|id| !seen.contains_key(id)).count()
    );
    assert!(twice.is_empty(), "messages delivered more than once: {twice:?}");
    assert_eq!(seen.len(), expected.len(), "unexpected messages consumed");
}
