//! `warren migrate`'s memory on real brokers (RabbitMQ 3.10 into 4.3, the upgrade Warren exists
//! for): four queues of 16 MiB messages moved inside a 256 MiB memory cgroup, as the kubelet
//! limits a Job's container, with no OOM kill and every byte intact; and one queue of a million
//! small messages moved with a flat resident set.

mod support;

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};
use support::generations::manifest;
use support::memory::{MemoryGroup, measure};
use support::rabbit_nodes::NodeCluster;

const MIB: usize = 1024 * 1024;

async fn pair() -> (NodeCluster, NodeCluster) {
    NodeCluster::started_pair(&manifest("old", 1, "3.10", ""), &manifest("new", 1, "4.3", "")).await
}

fn url(nodes: &NodeCluster) -> String {
    nodes.nodes[0].amqp_url(&nodes.credentials)
}

async fn declare(nodes: &NodeCluster, queue: &str) {
    let body = serde_json::json!({"durable": true});
    nodes.api_put(0, &format!("/api/queues/%2F/{queue}"), body).await.expect("declare queue");
}

/// The environment of `warren migrate` between the two, run as a process of its own.
fn migrate_env(old: &NodeCluster, new: &NodeCluster) -> Vec<(&'static str, String)> {
    vec![
        ("WARREN_SOURCE_URI", url(old)),
        ("WARREN_SOURCE_API", old.management_url(0)),
        ("WARREN_TARGET_URI", url(new)),
        ("WARREN_TARGET_API", new.management_url(0)),
        ("WARREN_LOG", "warn,lapin=off".into()),
    ]
}

/// Ready messages of `queue`, as the broker counts them now.
async fn live_depth(nodes: &NodeCluster, queue: &str) -> u64 {
    use warren::migrate::amqp;
    let connection = amqp::connect(&url(nodes), "broker").await.expect("connect");
    let channel = amqp::within("open a channel", connection.create_channel()).await.expect("channel");
    let depth = amqp::depth(&channel, queue).await.expect("passive declare");
    amqp::close(connection, "counted").await;
    depth
}

/// A body no compression or deduplication could shrink, different for every (queue, index).
fn large_body(queue: usize, index: usize, size: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((queue as u64) << 32 | index as u64);
    let mut body = Vec::with_capacity(size);
    while body.len() < size {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        body.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    body.truncate(size);
    body
}

fn digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn report_of(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("report")).expect("report JSON")
}

#[tokio::test]
async fn large_messages_move_within_a_256_mib_memory_limit_and_arrive_intact() {
    const QUEUES: usize = 4;
    const PER_QUEUE: usize = 4;
    const SIZE: usize = 16 * MIB;
    let (old, new) = pair().await;
    let connection = Connection::connect(&url(&old), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    for queue in 0..QUEUES {
        let name = format!("large-{queue}");
        declare(&old, &name).await;
        for index in 0..PER_QUEUE {
            let body = large_body(queue, index, SIZE);
            let headers = FieldTable::from(std::collections::BTreeMap::from([(
                ShortString::from("sha256"),
                AMQPValue::LongString(digest(&body).into()),
            )]));
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(index.to_string().into())
                .with_headers(headers);
            let confirm = channel
                .basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), &body, properties)
                .await
                .expect("publish");
            assert!(confirm.await.expect("confirm").is_ack(), "{name}: message {index} not confirmed");
        }
    }
    let _ = connection.close(200, "filled".into()).await;

    let limit = 256 * MIB as u64;
    let group = MemoryGroup::create("large", limit);
    let dir = std::env::temp_dir().join(format!("warren-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("report dir");
    let report = dir.join("large.json");
    // No --max-in-flight: the budget comes from the group's limit, as in a Job.
    let mut command = group.command(env!("CARGO_BIN_EXE_warren"), &["migrate", "--report", &report.to_string_lossy()]);
    command.envs(migrate_env(&old, &new)).stdout(std::process::Stdio::null());
    let usage = measure(command.spawn().expect("warren migrate"), Duration::from_secs(600)).await;
    let (oom_kills, failcnt) = group.oom_kills_and_failcnt();
    let charged = group.peak_bytes();
    println!(
        "{QUEUES} queues x {PER_QUEUE} messages of 16 MiB under a 256 MiB limit: peak RSS {:.1} MiB, cgroup peak \
         {:.1} MiB, limit hit {failcnt} times, OOM kills {oom_kills}",
        usage.peak_rss_kib as f64 / 1024.0,
        charged as f64 / MIB as f64
    );
    assert_eq!(oom_kills, 0, "the migrator was OOM-killed");
    assert!(usage.status.success(), "warren migrate: {}", usage.status);
    let summary = report_of(&report);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(summary["complete"], true, "{summary}");
    assert!(usage.peak_rss_kib * 1024 < limit, "resident set at the limit");

    // Every message, in order, every byte, its header kept.
    let connection = Connection::connect(&url(&new), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for queue in 0..QUEUES {
        let name = format!("large-{queue}");
        for index in 0..PER_QUEUE {
            let message = channel
                .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
                .unwrap_or_else(|| panic!("{name}: message {index} missing on the target"));
            let properties = &message.delivery.properties;
            assert_eq!(properties.message_id().as_ref().map(|m| m.as_str()), Some(index.to_string().as_str()));
            let data = &message.delivery.data;
            assert_eq!(data.len(), SIZE, "{name}/{index}: size");
            assert!(*data == large_body(queue, index, SIZE), "{name}/{index}: the body changed");
            let header = properties.headers().as_ref().and_then(|h| h.inner().get("sha256").cloned());
            assert_eq!(header, Some(AMQPValue::LongString(digest(data).into())), "{name}/{index}: header");
        }
        let extra = channel.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("get");
        assert!(extra.is_none(), "{name}: a duplicate on the target");
    }
    let _ = connection.close(200, "checked".into()).await;
}

#[tokio::test]
async fn a_million_small_messages_move_with_a_flat_resident_set() {
    const MESSAGES: u32 = 1_000_000;
    let (old, new) = pair().await;
    declare(&old, "events").await;
    let (confirmed, error) = support::amqp::publish(&url(&old), "events", 0..MESSAGES, 5_000).await;
    assert_eq!((confirmed.len(), error), (MESSAGES as usize, None), "filling the source");

    let dir = std::env::temp_dir().join(format!("warren-memory-{}-small", std::process::id()));
    std::fs::create_dir_all(&dir).expect("report dir");
    let report = dir.join("small.json");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
    command.args(["migrate", "--report", &report.to_string_lossy()]).envs(migrate_env(&old, &new));
    let child = command.stdout(std::process::Stdio::null()).spawn().expect("warren migrate");
    let usage = measure(child, Duration::from_secs(1200)).await;
    assert!(usage.status.success(), "warren migrate: {}", usage.status);
    let summary = report_of(&report);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(summary["complete"], true, "{summary}");
    let queue = &summary["queues"][0];
    assert_eq!((queue["moved"].as_u64(), queue["source_after"].as_u64()), (Some(u64::from(MESSAGES)), Some(0)));
    assert_eq!(queue["possible_duplicates"].as_u64(), Some(0));
    assert_eq!(live_depth(&new, "events").await, u64::from(MESSAGES), "the target holds every message once");
    assert_eq!(live_depth(&old, "events").await, 0);

    // Flat: what the second half of the run held is what the first half held, give or take the
    // allocator; memory that grew with the messages moved would show here a hundredfold.
    let (first, second) = (usage.largest_between(0.1, 0.5), usage.largest_between(0.5, 1.0));
    println!(
        "1,000,000 small messages: peak RSS {:.1} MiB; largest sampled RSS 10-50% of the run {:.1} MiB, 50-100% \
         {:.1} MiB ({} samples)",
        usage.peak_rss_kib as f64 / 1024.0,
        first as f64 / 1024.0,
        second as f64 / 1024.0,
        usage.samples.len()
    );
    assert!(usage.samples.len() >= 20, "too few samples to tell: {}", usage.samples.len());
    assert!(second <= first + 8 * 1024, "RSS grew from {first} KiB to {second} KiB while messages moved");
}
