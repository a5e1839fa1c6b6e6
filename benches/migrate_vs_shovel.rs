//! `make bench`: `warren migrate` against the Shovel plugin (dynamic shovels, ack-mode
//! on-confirm) and against a ceiling, moving the same load between the same brokers (from the
//! tier-2 harness, on one pod network): 100,000 persistent 1 KiB messages from a single-node
//! RabbitMQ 3.10.8 into another in one queue, then over 20 queues; then in one queue into
//! Warren's default, a 3-node 4.3 where the queue is a quorum queue (warren migrate converts it
//! with no flags; the Shovel and the ceiling publish into the same quorum queue, declared so).
//! The ceiling is RabbitMQ PerfTest (from Maven Central, e2e/perftest.sh) consuming the source with
//! manual acks while a second PerfTest publishes as many messages with confirms into the target,
//! at the same time: what the two brokers can do with no relay between them (for a quorum target,
//! confirms come once a majority of the three members has the message on disk). Prints messages
//! per second side by side, then the migrator's peak memory on 16 MiB messages under a 256 MiB
//! cgroup and on a million small ones.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use testkit::generations::manifest;
use testkit::memory::{MemoryGroup, Scratch, measure, migrate_command, publish_large};
use testkit::rabbit_nodes::NodeCluster;
use warren::migrate::{Endpoint, Options, migrate};

const MESSAGES: u32 = 100_000;

fn cluster(name: &str, replicas: usize, generation: &str) -> String {
    manifest(name, replicas, generation, "  rabbitmq:\n    plugins: [rabbitmq_shovel, rabbitmq_shovel_management]\n")
}

/// The queues a target row declares: classic on 3.10, quorum on 4.3.
fn target_arguments(target: &NodeCluster) -> FieldTable {
    let mut arguments = FieldTable::default();
    if target.cluster.image_version.is_some_and(|v| v.major >= 4) {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    arguments
}

/// Declares `queues` on the target as its row says.
async fn declare_on_target(channel: &lapin::Channel, target: &NodeCluster, queues: &[String]) {
    for queue in queues {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), durable, target_arguments(target)).await.expect("declare");
    }
}

fn url(nodes: &NodeCluster) -> String {
    nodes.nodes[0].amqp_url(&nodes.credentials)
}

/// Declares `queues` on `nodes` and fills them with `per_queue` persistent 1 KiB messages each.
async fn fill(nodes: &NodeCluster, queues: &[String], per_queue: u32) {
    let connection = Connection::connect(&url(nodes), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let body = vec![b'x'; 1024];
    for queue in queues {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.expect("declare");
        let mut pending = Vec::new();
        for i in 0..per_queue {
            let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(i.to_string().into());
            let confirm = channel
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, properties)
                .await
                .expect("publish");
            pending.push(confirm);
            if pending.len() == 2_000 {
                for c in pending.drain(..) {
                    assert!(c.await.expect("confirm").is_ack());
                }
            }
        }
        for c in pending {
            assert!(c.await.expect("confirm").is_ack());
        }
    }
}

/// Ready messages in `queue` on `nodes`.
async fn depth(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.map(|q| q.message_count()).unwrap_or(0)
}

async fn with_warren(source: &NodeCluster, target: &NodeCluster, queues: &[String]) -> f64 {
    fill(source, queues, MESSAGES / queues.len() as u32).await;
    let mut options = Options::new(
        Endpoint::parse(&url(source), &source.management_url(0)).expect("source"),
        Endpoint::parse(&url(target), &target.management_url(0)).expect("target"),
    );
    let pattern = format!("^({})$", queues.join("|"));
    options.queues = Some(regex::Regex::new(&pattern).expect("regex"));
    options.parallel_queues = queues.len();
    let started = Instant::now();
    let report = migrate(&options).await.expect("migration");
    let elapsed = started.elapsed();
    assert!(report.complete && report.moved() == u64::from(MESSAGES), "{report:#?}");
    let declared = target_arguments(target).inner().get("x-queue-type").is_some();
    assert!(report.planned.iter().all(|q| (q.target_type == "quorum") == declared), "{:?}", report.planned);
    f64::from(MESSAGES) / elapsed.as_secs_f64()
}

async fn with_shovel(source: &NodeCluster, target: &NodeCluster, queues: &[String]) -> f64 {
    fill(source, queues, MESSAGES / queues.len() as u32).await;
    let connection = Connection::connect(&url(target), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    declare_on_target(&channel, target, queues).await;
    let (user, password) = (&source.credentials.username, &source.credentials.password);
    let dest =
        format!("amqp://{}:{}@{}:5672", target.credentials.username, target.credentials.password, target.nodes[0].ip);
    let started = Instant::now();
    for queue in queues {
        let shovel = serde_json::json!({"value": {
            "src-protocol": "amqp091", "src-uri": format!("amqp://{user}:{password}@localhost:5672"),
            "src-queue": queue, "src-delete-after": "queue-length", "src-prefetch-count": 1000,
            "dest-protocol": "amqp091", "dest-uri": dest, "dest-queue": queue,
            "ack-mode": "on-confirm", "dest-add-forward-headers": false
        }});
        source.api_put(0, &format!("/api/parameters/shovel/%2F/bench-{queue}"), shovel).await.expect("shovel");
    }
    loop {
        let mut arrived = 0;
        for queue in queues {
            arrived += depth(&channel, queue).await;
        }
        if arrived >= MESSAGES {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "the Shovel moved {arrived} in 15 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f64::from(MESSAGES) / started.elapsed().as_secs_f64()
}

/// The jars of RabbitMQ PerfTest, fetched once per machine.
fn perftest_classpath() -> String {
    let script = format!("{}/e2e/perftest.sh", testkit::repo());
    let output = Command::new(script).stderr(Stdio::inherit()).output().expect("e2e/perftest.sh");
    assert!(output.status.success(), "e2e/perftest.sh: {}", output.status);
    format!("{}/*", String::from_utf8_lossy(&output.stdout).trim())
}

/// PerfTest's own average of `what` ("sending" or "receiving") from its summary line.
fn perftest_rate(output: &std::process::Output, what: &str) -> f64 {
    let text = String::from_utf8_lossy(&output.stdout);
    let needle = format!("{what} rate avg: ");
    text.lines()
        .find_map(|line| line.split_once(&needle).map(|(_, rest)| rest.split_whitespace().next().unwrap_or("")))
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("PerfTest printed no {what} rate ({}):\n{text}", output.status))
}

/// The ceiling: a PerfTest consumer on the source (manual acks, the prefetch of warren's window,
/// one multiple ack per quarter of it) and a PerfTest producer into the target (persistent 1 KiB
/// messages, the window in unconfirmed publishes), started together. The slower of the two rates.
async fn with_perftest(classpath: &str, source: &NodeCluster, target: &NodeCluster, queues: &[String]) -> f64 {
    let per_queue = MESSAGES / queues.len() as u32;
    fill(source, queues, per_queue).await;
    let connection = Connection::connect(&url(target), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    declare_on_target(&channel, target, queues).await;
    let (n, per_queue) = (queues.len().to_string(), per_queue.to_string());
    // The queues are `<prefix>0`..`<prefix><n-1>`.
    let prefix = queues[0].strip_suffix('0').expect("queues numbered from 0");
    let (pattern, last) = (format!("{prefix}%d"), (queues.len() - 1).to_string());
    let run = |uri: String, role: &[&str]| {
        let mut command = Command::new("java");
        command.args(["-cp", classpath, "com.rabbitmq.perf.PerfTest", "--uri", &uri, "--predeclared"]);
        command.args(["--queue-pattern", &pattern, "--queue-pattern-from", "0", "--queue-pattern-to", &last]);
        command.args(role).stdout(Stdio::piped()).stderr(Stdio::null());
        command.spawn().expect("java (PerfTest)")
    };
    let consumer = run(url(source), &["-x", "0", "-y", &n, "-q", "2000", "-A", "500", "-D", &per_queue]);
    let producer =
        run(url(target), &["-x", &n, "-y", "0", "-C", &per_queue, "-s", "1024", "-f", "persistent", "-c", "2000"]);
    let (consumed, published) = (consumer.wait_with_output(), producer.wait_with_output());
    let (consumed, published) = (consumed.expect("PerfTest consumer"), published.expect("PerfTest producer"));
    let mut arrived = 0;
    for queue in queues {
        arrived += depth(&channel, queue).await;
    }
    assert_eq!(arrived, MESSAGES, "the PerfTest producer's messages on the target");
    perftest_rate(&consumed, "receiving").min(perftest_rate(&published, "sending"))
}

/// Peak memory of `warren migrate` (this build's binary): four queues of four 16 MiB messages
/// under a 256 MiB memory cgroup (the budget from the group's limit), then a million small
/// messages in one queue (no limit).
async fn memory(source: &NodeCluster, target: &NodeCluster) {
    const MIB: usize = 1024 * 1024;
    let scratch = Scratch::create("bench-memory");
    let report = scratch.0.join("report.json");
    let connection = Connection::connect(&url(source), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for queue in 0..4 {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let name = format!("large-{queue}");
        channel.queue_declare(name.as_str().into(), durable, FieldTable::default()).await.expect("declare");
        publish_large(&url(source), queue, 4, 16 * MIB).await;
    }
    let group = MemoryGroup::create("bench", 256 * MIB as u64);
    let large = measure(migrate_command(Some(&group), source, target, &report, &[]), Duration::from_secs(600)).await;
    assert!(large.status.success(), "warren migrate: {}", large.status);
    let (oom_kills, _) = group.oom_kills_and_failcnt();

    let queue = vec!["events".to_string()];
    fill(source, &queue, 1_000_000).await;
    let small = measure(migrate_command(None, source, target, &report, &[]), Duration::from_secs(1200)).await;
    assert!(small.status.success(), "warren migrate: {}", small.status);
    println!("warren migrate's memory (peak resident set of the process)");
    println!(
        "  {:<52} {:>8.1} MiB (cgroup peak {:.1} MiB, OOM kills {oom_kills})",
        "4 queues x 4 messages of 16 MiB, 256 MiB cgroup",
        large.peak_rss_kib as f64 / 1024.0,
        group.peak_bytes() as f64 / MIB as f64
    );
    println!(
        "  {:<52} {:>8.1} MiB (largest sampled: first half {:.1} MiB, second half {:.1} MiB)",
        "1,000,000 messages of 1 KiB in one queue",
        small.peak_rss_kib as f64 / 1024.0,
        small.largest_between(0.0, 0.5) as f64 / 1024.0,
        small.largest_between(0.5, 1.0) as f64 / 1024.0
    );
}

fn version(nodes: &NodeCluster) -> String {
    nodes.cluster.image_version.map(|v| v.to_string()).unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let classpath = perftest_classpath();
    let mut group = NodeCluster::started_group(&[
        &cluster("bench-src", 1, "3.10"),
        &cluster("bench-dst", 1, "3.10"),
        &cluster("bench-qq", 3, "4.3"),
    ])
    .await
    .into_iter();
    let (source, target, quorum) = (group.next().unwrap(), group.next().unwrap(), group.next().unwrap());
    let (from, to, to_quorum) = (version(&source), version(&target), version(&quorum));
    println!(
        "warren migrate vs the Shovel plugin: {MESSAGES} persistent 1 KiB messages, RabbitMQ {from} to {to}, and to \
         {to_quorum} (3 nodes, quorum queues)"
    );
    println!(
        "  {:<26} {:>15} {:>13} {:>13} {:>11} {:>11}",
        "load", "ceiling msg/s", "warren msg/s", "shovel msg/s", "of ceiling", "vs shovel"
    );
    let rows = [("1 queue", 1usize, &target), ("20 queues", 20, &target), ("1 queue, quorum x3 on 4.3", 1, &quorum)];
    for (row, (label, count, target)) in rows.into_iter().enumerate() {
        let names = |who: &str| (0..count).map(|i| format!("{who}-{row}-{i}")).collect::<Vec<String>>();
        let ceiling = with_perftest(&classpath, &source, target, &names("perftest")).await;
        let warren = with_warren(&source, target, &names("warren")).await;
        let shovel = with_shovel(&source, target, &names("shovel")).await;
        println!(
            "  {label:<26} {ceiling:>15.0} {warren:>13.0} {shovel:>13.0} {:>10.2}x {:>10.2}x",
            warren / ceiling,
            warren / shovel
        );
    }
    memory(&source, &target).await;
}
