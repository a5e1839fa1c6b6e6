//! `make bench`: `warren migrate` against the Shovel plugin (dynamic shovels, ack-mode
//! on-confirm), moving the same load between the same two brokers (single-node RabbitMQ 3.10.8 from
//! the tier-2 harness, on one pod network): 100,000 persistent 1 KiB messages in one queue, then
//! over 20 queues. Prints messages per second side by side.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use support::rabbit_nodes::NodeCluster;
use warren::migrate::{Endpoint, Options, migrate};

const MESSAGES: u32 = 100_000;

fn cluster(name: &str) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  \
         image: rabbitmq:3.10.8-management\n  rabbitmq:\n    plugins: [rabbitmq_shovel, rabbitmq_shovel_management]\n"
    )
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
    f64::from(MESSAGES) / elapsed.as_secs_f64()
}

async fn with_shovel(source: &NodeCluster, target: &NodeCluster, queues: &[String]) -> f64 {
    fill(source, queues, MESSAGES / queues.len() as u32).await;
    let connection = Connection::connect(&url(target), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for queue in queues {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await.expect("declare");
    }
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

#[tokio::main]
async fn main() {
    let (source, target) = NodeCluster::started_pair(&cluster("bench-src"), &cluster("bench-dst")).await;
    println!("warren migrate vs the Shovel plugin: {MESSAGES} persistent 1 KiB messages, RabbitMQ 3.10.8 to 3.10.8");
    println!("  {:<28} {:>14} {:>14} {:>8}", "load", "warren msg/s", "shovel msg/s", "ratio");
    for (label, count) in [("1 queue", 1usize), ("20 queues", 20)] {
        let ours: Vec<String> = (0..count).map(|i| format!("warren-{count}-{i}")).collect();
        let theirs: Vec<String> = (0..count).map(|i| format!("shovel-{count}-{i}")).collect();
        let warren = with_warren(&source, &target, &ours).await;
        let shovel = with_shovel(&source, &target, &theirs).await;
        println!("  {label:<28} {warren:>14.0} {shovel:>14.0} {:>7.2}x", warren / shovel);
    }
}
