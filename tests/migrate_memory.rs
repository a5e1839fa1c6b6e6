//! `warren migrate`'s memory on real brokers (RabbitMQ 3.10 into 4.3, the upgrade Warren exists
//! for): four queues of 16 MiB messages moved inside a 256 MiB memory cgroup, as the kubelet
//! limits a Job's container, with no OOM kill and every byte intact; and one queue of a million
//! small messages moved with a flat resident set.

use std::time::Duration;

use testkit::generations::manifest;
use testkit::memory::{MemoryGroup, Scratch, assert_large_arrived, measure, migrate_command, publish_large};
use testkit::rabbit_nodes::NodeCluster;

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

/// Ready messages of `queue`, as the broker counts them now.
async fn live_depth(nodes: &NodeCluster, queue: &str) -> u64 {
    testkit::amqp::live_depth(&url(nodes), queue).await
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
    for queue in 0..QUEUES {
        declare(&old, &format!("large-{queue}")).await;
        publish_large(&url(&old), queue, PER_QUEUE, SIZE).await;
    }

    let limit = 256 * MIB as u64;
    let group = MemoryGroup::create("large", limit);
    let scratch = Scratch::create("memory-large");
    let report = scratch.0.join("report.json");
    // No --max-in-flight: the budget comes from the group's limit, as in a Job.
    let migrator = migrate_command(Some(&group), &old, &new, &report, &[]);
    let usage = measure(migrator, Duration::from_secs(600)).await;
    let (oom_kills, failcnt) = group.oom_kills_and_failcnt();
    let charged = group.peak_bytes();
    println!(
        "{QUEUES} queues x {PER_QUEUE} messages of 16 MiB under a 256 MiB limit: peak RSS {:.1} MiB, cgroup peak \
         {:.1} MiB, limit hit {failcnt} times, OOM kills {oom_kills}",
        usage.peak_rss_kib as f64 / 1024.0,
        charged as f64 / MIB as f64
    );
    assert_eq!(oom_kills, 0, "the migrator was OOM-killed");
    let summary = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(usage.status.success(), "warren migrate: {}: {summary}", usage.status);
    let summary = report_of(&report);
    assert_eq!(summary["complete"], true, "{summary}");
    assert!(usage.peak_rss_kib * 1024 < limit, "resident set at the limit");

    // Every message, in order, every byte, its header kept.
    for queue in 0..QUEUES {
        assert_large_arrived(&url(&new), queue, PER_QUEUE, SIZE).await;
    }

    // A budget smaller than one message: each is fetched alone (basic.get, the budget taken
    // first), and still arrives whole.
    for queue in 0..2 {
        publish_large(&url(&old), queue, 2, SIZE).await;
    }
    let migrator = migrate_command(Some(&group), &old, &new, &report, &["--max-in-flight", "8Mi"]);
    let usage = measure(migrator, Duration::from_secs(600)).await;
    let summary = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(usage.status.success(), "warren migrate --max-in-flight 8Mi: {}: {summary}", usage.status);
    assert_eq!(report_of(&report)["complete"], true, "{summary}");
    assert_eq!(group.oom_kills_and_failcnt().0, 0, "the migrator was OOM-killed");
    println!(
        "2 queues x 2 messages of 16 MiB, an 8 MiB budget: peak RSS {:.1} MiB",
        usage.peak_rss_kib as f64 / 1024.0
    );
    for queue in 0..2 {
        assert_large_arrived(&url(&new), queue, 2, SIZE).await;
    }
}

#[tokio::test]
async fn a_million_small_messages_move_with_a_flat_resident_set() {
    const MESSAGES: u32 = 1_000_000;
    let (old, new) = pair().await;
    declare(&old, "events").await;
    // Four publishers at once (the count matters here, not the order).
    let url = url(&old);
    let quarters =
        (0..4).map(|i| testkit::amqp::publish(&url, "events", i * MESSAGES / 4..(i + 1) * MESSAGES / 4, 5_000));
    for (confirmed, error) in futures::future::join_all(quarters).await {
        assert_eq!((confirmed.len(), error), (MESSAGES as usize / 4, None), "filling the source");
    }

    let scratch = Scratch::create("memory-small");
    let report = scratch.0.join("report.json");
    let usage = measure(migrate_command(None, &old, &new, &report, &[]), Duration::from_secs(1200)).await;
    let summary = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(usage.status.success(), "warren migrate: {}: {summary}", usage.status);
    let summary = report_of(&report);
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
