//! `warren migrate` between real RabbitMQ clusters (one node each, from the tier-2 harness). Between
//! two 3.10 clusters: every message and property, definitions, consumers holding messages, a
//! SIGKILL mid-run, late messages with --follow, and bad input. Across generations, the upgrades
//! that cannot be done in place: 3.10 with mirrored classic queues into 4.3 with quorum queues,
//! and 4.0 into 4.3 (two minors apart).

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use testkit::amqp;
use testkit::generations::manifest;
use testkit::rabbit_nodes::{NodeCluster, wait_for};
use warren::error::BrokerReason;
use warren::migrate::{Endpoint, MigratePhase, MigrateReason, Options, migrate};

/// A source and a target of one node each, of these generations, formed and with HA applied.
async fn pair_of(source: &str, target: &str) -> (NodeCluster, NodeCluster) {
    NodeCluster::started_pair(&manifest("old", 1, source, ""), &manifest("new", 1, target, "")).await
}

async fn pair() -> (NodeCluster, NodeCluster) {
    pair_of("3.10", "3.10").await
}

fn endpoint(nodes: &NodeCluster) -> Endpoint {
    Endpoint::parse(&nodes.nodes[0].amqp_url(&nodes.credentials), &nodes.management_url(0)).expect("endpoint")
}

fn options(source: &NodeCluster, target: &NodeCluster) -> Options {
    Options::new(endpoint(source), endpoint(target))
}

fn amqp_url(nodes: &NodeCluster) -> String {
    nodes.nodes[0].amqp_url(&nodes.credentials)
}

async fn declare(nodes: &NodeCluster, queue: &str, arguments: serde_json::Value) {
    let body = serde_json::json!({"durable": true, "arguments": arguments});
    nodes.api_put(0, &format!("/api/queues/%2F/{queue}"), body).await.expect("declare queue");
}

/// Every id of `ids` once, in order.
fn assert_in_order_once(queue: &str, got: &[u32], ids: std::ops::Range<u32>) {
    let expected: Vec<u32> = ids.collect();
    assert!(got == expected.as_slice(), "queue {queue}: {} messages, expected {} in order", got.len(), expected.len());
}

/// Reads a queue in delivery order.
async fn ordered_ids(url: &str, queue: &str) -> Vec<u32> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) =
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
    {
        let id = message.delivery.properties.message_id().as_ref().and_then(|m| m.as_str().parse().ok());
        ids.push(id.expect("numeric message id"));
    }
    ids
}

/// Ready messages of `queue` in vhost `/`, as the broker counts them now.
async fn live_depth(nodes: &NodeCluster, queue: &str) -> u64 {
    amqp::live_depth(&amqp_url(nodes), queue).await
}

#[tokio::test]
async fn every_message_and_property_arrives_exactly_once() {
    let (old, new) = pair().await;
    let queues: Vec<String> = (0..20).map(|i| format!("tasks-{i:02}")).collect();
    for queue in &queues {
        declare(&old, queue, serde_json::json!({})).await;
    }
    let url = amqp_url(&old);
    let published = futures::future::join_all(queues.iter().map(|q| amqp::publish(&url, q, 0..5_000, 500))).await;
    for (queue, (confirmed, error)) in queues.iter().zip(published) {
        assert_eq!((confirmed.len(), error), (5_000, None), "publishing to {queue}");
    }
    // One message with every property set.
    declare(&old, "everything", serde_json::json!({"x-max-priority": 5})).await;
    let properties = every_property(&old.credentials.username);
    let body: Vec<u8> = (0u8..=255).chain(b"{\"task\":\"add\"}".iter().copied()).collect();
    publish_one(&url, "everything", &body, properties.clone()).await;
    // An auto-delete queue (that had no consumer yet): a consumer of the migrator's going away
    // would make the source delete it, with whatever is left in it.
    let auto_delete = serde_json::json!({"durable": true, "auto_delete": true, "arguments": {}});
    old.api_put(0, "/api/queues/%2F/replies", auto_delete).await.expect("declare replies");
    assert_eq!(amqp::publish(&url, "replies", 0..100, 100).await.0.len(), 100);

    // Keeping user_id needs a target user RabbitMQ lets publish as another user.
    let first = migrate(&options(&old, &new)).await.expect("migration");
    let refused =
        first.queues.iter().find(|q| q.name == "everything").and_then(|q| q.error.clone()).unwrap_or_default();
    assert!(refused.contains("impersonator"), "{first:#?}");
    assert_eq!(first.moved(), 100_100, "everything but the user_id message");
    assert!(old.api(0, "/api/queues/%2F/replies").await.is_ok(), "the source deleted the auto-delete queue");
    let tags = serde_json::json!({"password": new.credentials.password, "tags": "administrator,impersonator"});
    new.api_put(0, &format!("/api/users/{}", new.credentials.username), tags).await.expect("impersonator tag");
    let report = migrate(&options(&old, &new)).await.expect("migration");
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.moved(), 1, "the second run moves what was left: {report:#?}");
    // The refused message was delivered once already, so the source flags it redelivered: counted as
    // a possible duplicate, though the target never confirmed it (checked below: one copy).
    assert!(report.queues.iter().all(|q| q.refused == 0 && q.possible_duplicates == u64::from(q.name == "everything")));
    assert!(first.queues.iter().all(|q| q.possible_duplicates == 0 && q.refused == 0), "{first:#?}");

    let target = amqp_url(&new);
    for queue in &queues {
        assert_in_order_once(queue, &ordered_ids(&target, queue).await, 0..5_000);
    }
    assert_only_message(&target, "everything", &body, &properties).await;
    assert_in_order_once("replies", &ordered_ids(&target, "replies").await, 0..100);
    // The source is empty: everything left only after the target confirmed.
    for queue in queues.iter().chain(std::iter::once(&"everything".to_string())) {
        let depth = report.queues.iter().find(|q| &q.name == queue).map(|q| q.source_after);
        assert_eq!(depth, Some(0), "queue {queue} on the source");
    }
}

#[tokio::test]
async fn messages_held_by_consumers_are_detected_and_nothing_moves() {
    let (old, new) = pair().await;
    declare(&old, "celery", serde_json::json!({})).await;
    let url = amqp_url(&old);
    let (confirmed, _) = amqp::publish(&url, "celery", 0..10, 10).await;
    assert_eq!(confirmed.len(), 10);
    // A worker holding eta tasks: it receives them and does not ack.
    let worker = Connection::connect(&url, ConnectionProperties::default()).await.expect("connect");
    let channel = worker.create_channel().await.expect("channel");
    channel.basic_qos(10, BasicQosOptions::default()).await.expect("qos");
    let _consumer = channel
        .basic_consume("celery".into(), "worker".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    wait_for("the broker reports 10 unacknowledged", Duration::from_secs(30), || async {
        let q = old.api(0, "/api/queues/%2F/celery").await?;
        if q["messages_unacknowledged"] == 10 { Ok(()) } else { Err(q.to_string()) }
    })
    .await;

    let error = migrate(&options(&old, &new)).await.expect_err("refused");
    assert_eq!(
        (error.phase, error.reason),
        (MigratePhase::Preflight, MigrateReason::MessagesHeldByConsumers),
        "{error}"
    );
    assert!(error.message.contains("//celery: 10 unacknowledged, held by 1 consumer(s)"), "{error}");
    assert!(new.api(0, "/api/queues/%2F/celery").await.is_err(), "the target got the queue anyway");

    // With a bounded wait, the worker going away releases them and they move.
    let mut waiting = options(&old, &new);
    waiting.wait_for_consumers = Some(Duration::from_secs(60));
    let migration = tokio::spawn(async move { migrate(&waiting).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.close(200, "worker stopped".into()).await.expect("close the worker");
    let report = migration.await.expect("task").expect("migration after the worker left");
    assert!(report.complete, "{report:#?}");
    assert_in_order_once("celery", &ordered_ids(&amqp_url(&new), "celery").await, 0..10);
}

/// A message with every AMQP 0-9-1 property set, `user_id` naming `user`.
fn every_property(user: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("trace".into(), AMQPValue::LongString("abc-123".into()));
    headers.insert("retries".into(), AMQPValue::LongInt(3));
    let mut nested = FieldTable::default();
    nested.insert("eta".into(), AMQPValue::Timestamp(1_700_000_100));
    headers.insert("celery".into(), AMQPValue::FieldTable(nested));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(4)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("3600000".into())
        .with_message_id("everything-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("celery.task".into())
        .with_user_id(user.into())
        .with_app_id("billing".into())
}

async fn publish_one(url: &str, queue: &str, body: &[u8], properties: BasicProperties) {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let confirm = channel
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties)
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{queue}: {confirm:?}");
}

/// `queue` holds one message, with exactly this body and these properties.
async fn assert_only_message(url: &str, queue: &str, body: &[u8], properties: &BasicProperties) {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let get = || channel.basic_get(queue.into(), BasicGetOptions { no_ack: true });
    let message = get().await.expect("basic.get").expect("the message arrived");
    assert_eq!(message.delivery.data, body, "body changed");
    assert_eq!(&message.delivery.properties, properties, "properties changed");
    assert!(get().await.expect("basic.get").is_none(), "the message arrived twice");
}

/// A user's tags, whichever form the version reports them in (a list, or a comma-separated string).
fn tags(user: &serde_json::Value) -> Vec<String> {
    let mut tags: Vec<String> = match &user["tags"] {
        serde_json::Value::Array(t) => t.iter().filter_map(|t| t.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(t) => t.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    tags.sort();
    tags
}

/// The upgrade users need most, and that RabbitMQ cannot do in place (3.10 to 4.x skips minors):
/// a 3.10 cluster with ha-all mirrored classic queues into a 4.3 cluster (Khepri) with quorum queues.
/// The default queue type of vhost `/`.
async fn vhost_default_type(nodes: &NodeCluster) -> serde_json::Value {
    nodes.api(0, "/api/vhosts/%2F").await.map(|v| v["default_queue_type"].clone()).unwrap_or_default()
}

#[tokio::test]
async fn mirrored_3_10_moves_into_quorum_queues_on_4_3() {
    let (old, new) = pair_of("3.10", "4.3").await;
    // The source's broker reconcile applied ha-all. Queues of every kind a Celery setup has, and two
    // that cannot be quorum queues: a priority queue and a transient one.
    declare(&old, "emails", serde_json::json!({"x-queue-mode": "lazy"})).await;
    declare(&old, "everything", serde_json::json!({})).await;
    declare(&old, "invoices", serde_json::json!({"x-max-priority": 3})).await;
    let transient = serde_json::json!({"durable": false, "arguments": {}});
    old.api_put(0, "/api/queues/%2F/scratch", transient).await.expect("declare scratch");
    old.api_put(0, "/api/exchanges/%2F/billing", serde_json::json!({"type": "topic", "durable": true}))
        .await
        .expect("exchange");
    let bind = reqwest::Client::new()
        .post(format!("{}/api/bindings/%2F/e/billing/q/invoices", old.management_url(0)))
        .basic_auth(&old.credentials.username, Some(&old.credentials.password))
        .json(&serde_json::json!({"routing_key": "invoice.*"}))
        .send()
        .await
        .expect("bind");
    assert!(bind.status().is_success());
    let worker = serde_json::json!({"password": "worker-secret-1", "tags": "monitoring"});
    old.api_put(0, "/api/users/celery-worker", worker).await.expect("user");
    let permissions = serde_json::json!({"configure": "^celery", "write": ".*", "read": "^(celery|emails)"});
    old.api_put(0, "/api/permissions/%2F/celery-worker", permissions.clone()).await.expect("permissions");
    let url = amqp_url(&old);
    assert_eq!(amqp::publish(&url, "invoices", 0..300, 100).await.0.len(), 300);
    assert_eq!(amqp::publish(&url, "emails", 0..2_000, 500).await.0.len(), 2_000);
    assert_eq!(amqp::publish(&url, "scratch", 0..20, 20).await.0.len(), 20);
    let body: Vec<u8> = (0u8..=255).chain(b"{\"task\":\"add\"}".iter().copied()).collect();
    let properties = every_property(&old.credentials.username);
    publish_one(&url, "everything", &body, properties.clone()).await;
    for queue in ["emails", "invoices"] {
        // The policy shows in the queue's statistics, which follow a few seconds later.
        wait_for(&format!("{queue} mirrored by ha-all on the source"), Duration::from_secs(30), || async {
            let info = old.api(0, &format!("/api/queues/%2F/{queue}")).await?;
            if info["policy"] == "ha-all" { Ok(()) } else { Err(info.to_string()) }
        })
        .await;
    }
    // Keeping user_id takes a target user RabbitMQ lets publish as another user.
    let tags_on_target =
        serde_json::json!({"password": new.credentials.password, "tags": "administrator,impersonator"});
    new.api_put(0, &format!("/api/users/{}", new.credentials.username), tags_on_target).await.expect("impersonator");

    // No flags: a 4.x target has no classic mirroring, so the migration keeps HA by making durable
    // classic queues quorum queues by itself.
    assert_eq!(vhost_default_type(&new).await, "quorum", "the operator's default on the target");
    let report = migrate(&options(&old, &new)).await.expect("migration");
    assert!(report.complete, "{report:#?}");
    // The target's own vhost kept its settings (the 3.10 source's vhost carries none).
    assert_eq!(vhost_default_type(&new).await, "quorum", "the target's vhost default after the migration");
    let planned: Vec<(&str, &str, bool, &str, bool)> = report
        .planned
        .iter()
        .map(|q| (q.name.as_str(), q.queue_type.as_str(), q.source_mirrored, q.target_type.as_str(), q.replicated))
        .collect();
    assert!(planned.contains(&("emails", "classic", true, "quorum", true)), "{planned:?}");
    assert!(planned.contains(&("invoices", "classic", true, "classic", false)), "{planned:?}");
    for line in report.plan_lines() {
        eprintln!("[3.10 -> 4.3] {line}");
    }
    // The apps' own declarations, tried on the target before anything moved: the priority queue
    // kept classic is refused (the vhost defaults to quorum, so a declaration without a type asks
    // for quorum), with the fix; the lazy queue made quorum takes its app's x-queue-mode (4.3
    // accepts it on a redeclare).
    let refused: Vec<(&str, &str)> =
        report.refused_declarations.iter().map(|r| (r.kind.as_str(), r.name.as_str())).collect();
    assert_eq!(refused, [("queue", "invoices")], "{:?}", report.refused_declarations);
    let invoices = &report.refused_declarations[0];
    assert!(invoices.error.contains("inequivalent arg 'x-queue-type'"), "{invoices:?}");
    assert!(invoices.advice.contains("x-queue-type=classic"), "{invoices:?}");
    assert_eq!(
        (report.source_version.as_str(), report.target_version.as_str()),
        ("3.10.8", new.cluster.image_version.unwrap().to_string().as_str())
    );
    assert_eq!(report.moved(), 2_321, "{report:#?}");
    // Never silently dropped: what cannot be quorum is named as losing HA, with the reason, and
    // moved as classic.
    let kept: Vec<(&str, String)> = report.ha_lost.iter().map(|k| (k.name.as_str(), k.reason.to_string())).collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept[0].0 == "invoices" && kept[0].1.contains("x-max-priority 3"), "{kept:?}");
    assert!(kept[1].0 == "scratch" && kept[1].1.contains("not durable"), "{kept:?}");
    assert!(report.definitions.notes.iter().any(|n| n.contains("emails: dropped x-queue-mode")), "{report:#?}");
    assert!(report.definitions.notes.iter().any(|n| n.contains("policy ha-all: not imported")), "{report:#?}");

    // Definitions: no ha-* key anywhere, quorum where possible, every binding, user and permission.
    let policies = new.api(0, "/api/policies").await.expect("policies");
    assert!(!policies.to_string().contains("\"ha-"), "mirroring keys on 4.x: {policies}");
    for (queue, queue_type, count) in
        [("emails", "quorum", 2_000), ("invoices", "classic", 300), ("scratch", "classic", 20)]
    {
        let info = new.api(0, &format!("/api/queues/%2F/{queue}")).await.expect("queue on the target");
        assert_eq!(info["type"], queue_type, "{info}");
        assert_in_order_once(queue, &ordered_ids(&amqp_url(&new), queue).await, 0..count);
    }
    let bindings = new.api(0, "/api/exchanges/%2F/billing/bindings/source").await.expect("bindings");
    assert!(bindings.as_array().is_some_and(|b| b.iter().any(|b| b["routing_key"] == "invoice.*")), "{bindings}");
    let user = new.api(0, "/api/users/celery-worker").await.expect("user on the target");
    assert_eq!(tags(&user), ["monitoring"], "{user}");
    let granted = new.api(0, "/api/permissions/%2F/celery-worker").await.expect("permissions on the target");
    for key in ["configure", "write", "read"] {
        assert_eq!(granted[key], permissions[key], "{granted}");
    }

    // Every property and the body, byte for byte, from a quorum queue.
    let info = new.api(0, "/api/queues/%2F/everything").await.expect("queue everything");
    assert_eq!(info["type"], "quorum", "{info}");
    assert_only_message(&amqp_url(&new), "everything", &body, &properties).await;
    // The source is empty: every message left only after the target confirmed it.
    for queue in ["emails", "everything", "invoices", "scratch"] {
        let depth = report.queues.iter().find(|q| q.name == queue).map(|q| q.source_after);
        assert_eq!(depth, Some(0), "queue {queue} on the source");
    }
}

/// 4.0 (Mnesia) into 4.3 (Khepri): two minor versions apart, which no in-place upgrade allows.
#[tokio::test]
async fn quorum_queues_move_from_4_0_to_4_3() {
    let (old, new) = pair_of("4.0", "4.3").await;
    // Declared with no arguments: quorum by the vhost default the operator set.
    declare(&old, "jobs", serde_json::json!({})).await;
    let info = old.api(0, "/api/queues/%2F/jobs").await.expect("jobs");
    assert_eq!(info["type"], "quorum", "{info}");
    let url = amqp_url(&old);
    assert_eq!(amqp::publish(&url, "jobs", 0..3_000, 500).await.0.len(), 3_000);

    let report = migrate(&options(&old, &new)).await.expect("migration");
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.moved(), 3_000, "{report:#?}");
    let info = new.api(0, "/api/queues/%2F/jobs").await.expect("jobs on the target");
    assert_eq!(info["type"], "quorum", "{info}");
    assert_in_order_once("jobs", &ordered_ids(&amqp_url(&new), "jobs").await, 0..3_000);
    assert_eq!(report.queues.iter().map(|q| q.source_after).sum::<u64>(), 0, "{report:#?}");
}

#[tokio::test]
async fn a_killed_migration_run_again_loses_nothing() {
    let (old, new) = pair().await;
    let queues: Vec<String> = (0..4).map(|i| format!("jobs-{i}")).collect();
    for queue in &queues {
        declare(&old, queue, serde_json::json!({})).await;
    }
    let url = amqp_url(&old);
    for queue in &queues {
        assert_eq!(amqp::publish(&url, queue, 0..20_000, 1000).await.0.len(), 20_000);
    }
    let run = |report: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["migrate", "--report", report, "--window", "500"])
            .env("WARREN_SOURCE_URI", amqp_url(&old))
            .env("WARREN_SOURCE_API", old.management_url(0))
            .env("WARREN_TARGET_URI", amqp_url(&new))
            .env("WARREN_TARGET_API", new.management_url(0))
            .env("WARREN_LOG", "warn,lapin=off")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("warren migrate")
    };
    let dir = std::env::temp_dir().join(format!("warren-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("report dir");
    let mut first = run(&dir.join("first.json").to_string_lossy());
    wait_for("the first run moved some messages", Duration::from_secs(120), || async {
        let q = new.api(0, "/api/queues/%2F/jobs-0").await?;
        if q["messages"].as_u64().unwrap_or(0) > 2_000 { Ok(()) } else { Err(q.to_string()) }
    })
    .await;
    first.kill().expect("SIGKILL the migrator");
    let _ = first.wait();

    let second = run(&dir.join("second.json").to_string_lossy()).wait().expect("second run");
    assert!(second.success(), "the second run failed: {second}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("second.json")).expect("report")).expect("json");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report["complete"], true, "{report}");
    let mut duplicates = 0;
    let mut flagged = 0;
    for queue in &queues {
        let got: BTreeMap<u32, usize> =
            ordered_ids(&amqp_url(&new), queue).await.into_iter().fold(BTreeMap::new(), |mut m, id| {
                *m.entry(id).or_default() += 1;
                m
            });
        assert_eq!(
            got.keys().copied().collect::<Vec<u32>>(),
            (0..20_000).collect::<Vec<u32>>(),
            "queue {queue}: messages lost"
        );
        duplicates += got.values().filter(|n| **n > 1).count();
        let entry = report["queues"].as_array().and_then(|qs| qs.iter().find(|q| q["name"] == queue.as_str())).cloned();
        flagged += entry.and_then(|q| q["possible_duplicates"].as_u64()).unwrap_or(0) as usize;
    }
    // Duplicates only from the in-flight window, and every one was flagged by the second run.
    assert!(duplicates <= flagged && flagged <= 4 * 500, "{duplicates} duplicates, {flagged} flagged");
}

#[tokio::test]
async fn a_target_node_killed_mid_run_is_reconnected_and_nothing_is_lost() {
    let (old, mut new) = pair().await;
    let queues: Vec<String> = (0..2).map(|i| format!("tasks-{i}")).collect();
    for queue in &queues {
        declare(&old, queue, serde_json::json!({})).await;
        assert_eq!(amqp::publish(&amqp_url(&old), queue, 0..20_000, 1000).await.0.len(), 20_000);
    }
    // A small window keeps the run going long enough to be interrupted.
    let options = Options { window: 10, ..options(&old, &new) };
    let run = tokio::spawn(async move { migrate(&options).await });
    // Counted live (passive declare), not from the management statistics: those lag by their
    // collection interval, and on a quiet machine the whole run had finished by the time they
    // showed 2,000 (the kill then found nothing to interrupt).
    // (The queue exists on the target only once the definitions are in: until then, not yet.)
    wait_for("some messages moved", Duration::from_secs(120), || async {
        let url = amqp_url(&new);
        let connection = warren::migrate::amqp::connect(&url, None, "target").await.map_err(|e| e.message)?;
        let counted = async {
            let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
            warren::migrate::amqp::depth(&channel, "tasks-0").await.map_err(|e| e.message)
        }
        .await;
        warren::migrate::amqp::close(connection, "counted").await;
        match counted? {
            moved if moved > 500 => Ok(()),
            moved => Err(format!("{moved} moved")),
        }
    })
    .await;
    // The target's only node dies mid-run and comes back a few seconds later on its data.
    new.nodes[0].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    new.start(&[0]);
    let report = run.await.expect("migration task").expect("the migration goes on after the node is back");
    assert!(report.complete, "{report:?}");
    let reconnects: u64 = report.queues.iter().map(|q| q.reconnects).sum();
    assert!(reconnects > 0, "the run never lost its connection: {report:?}");
    for queue in &queues {
        let got: BTreeMap<u32, usize> =
            ordered_ids(&amqp_url(&new), queue).await.into_iter().fold(BTreeMap::new(), |mut m, id| {
                *m.entry(id).or_default() += 1;
                m
            });
        assert_eq!(got.keys().copied().collect::<Vec<u32>>(), (0..20_000).collect::<Vec<u32>>(), "{queue}: lost");
        let duplicates = got.values().filter(|n| **n > 1).count() as u64;
        let entry = report.queues.iter().find(|q| &q.name == queue).expect("queue in the report");
        assert!(duplicates <= entry.possible_duplicates, "{queue}: {duplicates} duplicates, {entry:?}");
        assert_eq!((entry.source_before, entry.source_after), (20_000, 0), "{entry:?}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_nothing_moves() {
    // Unreachable source, wrong password, a vhost missing on either side, a queue with other
    // arguments: each a clear error before anything moves.
    let (old, new) = pair().await;
    declare(&old, "orders", serde_json::json!({})).await;
    assert_eq!(amqp::publish(&amqp_url(&old), "orders", 0..50, 50).await.0.len(), 50);

    // The source's port is closed.
    let closed = Endpoint::parse(
        &format!("amqp://{}:{}@127.0.0.1:1/%2f", old.credentials.username, old.credentials.password),
        "http://127.0.0.1:1",
    )
    .expect("endpoint");
    let error = migrate(&Options::new(closed, endpoint(&new))).await.expect_err("unreachable");
    assert_eq!(
        (error.phase, error.reason),
        (MigratePhase::Preflight, MigrateReason::Broker(BrokerReason::BrokerUnreachable)),
        "{error}"
    );

    // Wrong password: said, not shown.
    let wrong = Endpoint::parse(
        &format!("amqp://{}:not-the-password@{}:5672/%2f", old.credentials.username, old.nodes[0].ip),
        &old.management_url(0),
    )
    .expect("endpoint");
    let error = migrate(&Options::new(wrong, endpoint(&new))).await.expect_err("401");
    assert_eq!(error.reason, MigrateReason::Broker(BrokerReason::BrokerUnauthorized), "{error}");
    assert!(!error.to_string().contains("not-the-password"));

    // A vhost the source does not have.
    let mut asked = options(&old, &new);
    asked.vhosts = vec!["nope".into()];
    let error = migrate(&asked).await.expect_err("no such vhost");
    assert_eq!((error.phase, error.reason), (MigratePhase::Preflight, MigrateReason::VhostMissing), "{error}");
    assert!(error.message.contains("the source has no vhost nope"), "{error}");

    // A --queues pattern that matches nothing (a typo) is an error, not a success that moved nothing.
    let mut asked = options(&old, &new);
    asked.queues = Some(regex::Regex::new("^ordres$").expect("regex"));
    let error = migrate(&asked).await.expect_err("no queue matches");
    assert_eq!((error.phase, error.reason), (MigratePhase::Preflight, MigrateReason::QueuesMissing), "{error}");
    assert!(error.message.contains(r#"no queue of the source matches --queues "^ordres$""#), "{error}");

    // A vhost the target lacks, and a target user who may not create one (no administrator tag).
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    old.api_put(0, "/api/vhosts/billing", serde_json::json!({})).await.expect("vhost billing");
    let permissions = format!("/api/permissions/billing/{}", old.credentials.username);
    old.api_put(0, &permissions, all.clone()).await.expect("permissions on billing");
    old.api_put(0, "/api/queues/billing/invoices", serde_json::json!({"durable": true})).await.expect("queue");
    new.api_put(0, "/api/users/limited", serde_json::json!({"password": "limited-secret-1", "tags": "management"}))
        .await
        .expect("user limited");
    new.api_put(0, "/api/permissions/%2F/limited", all).await.expect("permissions of limited");
    let limited = Endpoint::parse(
        &format!("amqp://limited:limited-secret-1@{}:5672/%2f", new.nodes[0].ip),
        &new.management_url(0),
    )
    .expect("endpoint");
    let error = migrate(&Options::new(endpoint(&old), limited)).await.expect_err("vhost missing on the target");
    assert_eq!((error.phase, error.reason), (MigratePhase::Preflight, MigrateReason::VhostMissing), "{error}");
    assert!(error.message.contains("the target has no vhost billing"), "{error}");
    assert!(error.message.contains("user limited may not create one"), "{error}");
    assert!(new.api(0, "/api/vhosts/billing").await.is_err(), "nothing created on the target");
    assert!(!error.to_string().contains("limited-secret-1"));

    // The target has a queue of that name with other arguments.
    declare(&new, "orders", serde_json::json!({"x-max-length": 10})).await;
    let error = migrate(&options(&old, &new)).await.expect_err("mismatch");
    assert_eq!(error.reason, MigrateReason::QueueMismatch, "{error}");
    assert!(error.message.contains("queue orders in vhost /"), "{error}");

    assert_eq!((live_depth(&old, "orders").await, live_depth(&new, "orders").await), (50, 0), "something moved");
}

#[tokio::test]
async fn follow_drains_messages_published_during_the_migration() {
    let (old, new) = pair().await;
    declare(&old, "late", serde_json::json!({})).await;
    let url = amqp_url(&old);
    assert_eq!(amqp::publish(&url, "late", 0..1_000, 500).await.0.len(), 1_000);
    let mut options = options(&old, &new);
    options.follow = true;
    options.idle_timeout = Duration::from_secs(5);
    let migration = tokio::spawn(async move { migrate(&options).await });
    // Producers not moved yet keep publishing to the old cluster.
    for batch in 1..5u32 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (confirmed, error) = amqp::publish(&url, "late", batch * 1_000..(batch + 1) * 1_000, 500).await;
        assert_eq!((confirmed.len(), error), (1_000, None));
    }
    let report = migration.await.expect("task").expect("migration");
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.moved(), 5_000);
    assert_in_order_once("late", &ordered_ids(&amqp_url(&new), "late").await, 0..5_000);

    // A delay queue (TTL 2 s, dead-lettered into its work queue) whose messages expire while they
    // move: one message in flight at a time makes the move outlast the TTL. Whatever expired on
    // the source after the work queue's move ended is moved in a later round; on the target the
    // rest expire into the work queue there. Every message ends on the target's work queue once.
    declare(&old, "work", serde_json::json!({})).await;
    let delay =
        serde_json::json!({"x-message-ttl": 2000, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work"});
    declare(&old, "delay", delay).await;
    assert_eq!(amqp::publish(&url, "delay", 0..3_000, 500).await.0.len(), 3_000);
    let mut delayed = self::options(&old, &new);
    delayed.queues = Some(regex::Regex::new("^(delay|work)$").expect("regex"));
    (delayed.window, delayed.parallel_queues) = (1, 1);
    let started = std::time::Instant::now();
    let report = migrate(&delayed).await.expect("migration");
    eprintln!(
        "[delay] moved in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        report.queues.iter().map(|q| (&q.name, q.moved, q.source_after)).collect::<Vec<_>>()
    );
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.moved(), 3_000, "{report:#?}");
    assert_eq!((live_depth(&old, "delay").await, live_depth(&old, "work").await), (0, 0), "left on the source");
    wait_for("every delayed message on the target's work queue", Duration::from_secs(30), || async {
        let (delay, work) = (live_depth(&new, "delay").await, live_depth(&new, "work").await);
        if (delay, work) == (0, 3_000) { Ok(()) } else { Err(format!("delay {delay}, work {work}")) }
    })
    .await;
    let mut ids = ordered_ids(&amqp_url(&new), "work").await;
    ids.sort_unstable();
    assert_eq!(ids, (0..3_000).collect::<Vec<u32>>(), "every delayed message once");

    // A target that refuses messages (a max-length with reject-publish): the queue stops at the
    // refusals, --follow or not, instead of requeueing them into a redelivery loop that never ends
    // (and that a source's delivery limit ends by dead-lettering or dropping them).
    declare(&old, "bounded", serde_json::json!({})).await;
    assert_eq!(amqp::publish(&url, "bounded", 0..50, 50).await.0.len(), 50);
    let policy = serde_json::json!({"pattern": "^bounded$", "apply-to": "queues", "priority": 10,
                                    "definition": {"max-length": 20, "overflow": "reject-publish"}});
    new.api_put(0, "/api/policies/%2F/bounded", policy).await.expect("the target's limit");
    let mut bounded = self::options(&old, &new);
    bounded.follow = true;
    bounded.idle_timeout = Duration::from_secs(5);
    bounded.queues = Some(regex::Regex::new("^bounded$").expect("regex"));
    let report = tokio::time::timeout(Duration::from_secs(120), migrate(&bounded))
        .await
        .expect("a run with refusals ends")
        .expect("migration");
    assert!(!report.complete, "{report:#?}");
    let queue = report.queues.iter().find(|q| q.name == "bounded").expect("bounded in the report");
    assert_eq!((queue.moved, queue.refused), (20, 30), "{queue:?}");
    let error = queue.error.as_deref().unwrap_or_default();
    assert!(error.contains("the target refused 30 message(s)"), "{queue:?}");
    // Nothing lost or doubled: the first 20 on the target, the other 30 back on the source, each once.
    assert_in_order_once("bounded", &ordered_ids(&amqp_url(&new), "bounded").await, 0..20);
    let mut left = ordered_ids(&url, "bounded").await;
    left.sort_unstable();
    assert_eq!(left, (20..50).collect::<Vec<u32>>(), "left on the source");
}
