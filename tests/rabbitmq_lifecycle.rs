//! Tier 2: what the operator promises about RabbitMQ, on real nodes of each generation — 3.10
//! (classic mirroring), 4.0 (quorum queues, Mnesia) and 4.3 (quorum queues, Khepri) — run with the
//! exact configuration and bootstrap script the builders produce. One cluster per generation goes
//! through every scenario in turn (booting nodes is most of the cost on two cores): formation and
//! HA, loss of the node leading a queue, a lost volume, a partition, a full restart, a rolling
//! restart through preStop under load, a scale-up, and a scale-down (refused, then done under load). Every check reads what RabbitMQ reports:
//! cluster_status, the management API, messages consumed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use testkit::amqp::{self, assert_exactly_once};
use testkit::generations::manifest;
use testkit::rabbit_broker::node_list;
use testkit::rabbit_nodes::{BOOT, NodeCluster, wait_for};
use testkit::scaling::{scale_down, scale_down_called_off};
use tokio::sync::Mutex;
use warren::api::{HighAvailabilityMode, HighAvailabilitySpec};

/// Partitions are detected after net_ticktime (60 s by default); 10 s keeps the scenario short.
/// Set through the spec's advancedConfig, as a user could.
const SPEC: &str = "  rabbitmq:\n    advancedConfig: |\n      [{kernel, [{net_ticktime, 10}]}].\n";

/// Prints how long a step took, for the record (never asserted on).
struct Steps {
    generation: String,
    last: Instant,
}

impl Steps {
    fn done(&mut self, step: &str) {
        eprintln!("[{}] {step}: {:.1} s", self.generation, self.last.elapsed().as_secs_f64());
        self.last = Instant::now();
    }
}

#[tokio::test]
async fn rabbitmq_3_10_lifecycle() {
    lifecycle("3.10").await;
}

#[tokio::test]
async fn rabbitmq_4_0_lifecycle() {
    lifecycle("4.0").await;
}

#[tokio::test]
async fn rabbitmq_4_3_lifecycle() {
    lifecycle("4.3").await;
}

async fn lifecycle(generation: &str) {
    let mut nodes = NodeCluster::create(&manifest("demo", 3, generation, SPEC)).await;
    let mut steps = Steps { generation: generation.into(), last: Instant::now() };
    nodes.start_all();
    nodes.wait_formed(BOOT).await;
    steps.done("3 nodes formed one cluster");
    formation_and_high_availability(&nodes).await;
    steps.done("HA applied, second pass idle, the other mode refused");
    losing_the_leader_loses_no_confirmed_message(&mut nodes).await;
    steps.done("leader killed: 10,000 confirmed messages consumed once, node back");
    a_node_that_lost_its_volume_rejoins(&mut nodes).await;
    steps.done("lost volume: node rejoined, queues whole again");
    a_partitioned_minority_accepts_no_write(&nodes).await;
    steps.done("partition: minority refused writes, healed, nothing lost");
    a_full_restart_in_any_order_keeps_everything(&mut nodes).await;
    steps.done("full restart in reverse order");
    a_rolling_restart_through_pre_stop_loses_nothing(&mut nodes).await;
    steps.done("rolling restart through preStop under load");
    scaling_up_replicates_existing_queues(&mut nodes).await;
    steps.done("scale 3 -> 5: existing queues replicated on the new nodes");
    scaling_down_is_refused_while_a_queue_would_be_lost(&mut nodes).await;
    steps.done("scale 5 -> 3 refused: an unreplicated classic queue with messages, named");
    a_called_off_scale_down_gives_the_node_back(&mut nodes).await;
    steps.done("scale 5 -> 3 called off after node 4's hand-over: revived, members grown back");
    scaling_down_hands_over_and_forgets_under_load(&mut nodes).await;
    steps.done("scale 5 -> 3 under load: handed over, removed, forgotten, nothing lost");
    scaling_down_to_one_node_keeps_a_working_cluster(&mut nodes).await;
    steps.done("scale 3 -> 1: a working one-node cluster with every message");
}

/// The nodes that left the cluster for good, in order: forgotten after their pod stopped (Mnesia),
/// or left while they still ran (Khepri).
fn removed_for_good(steps: &[warren::rabbitmq::scale_down::Step]) -> Vec<&str> {
    use warren::rabbitmq::scale_down::Step;
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Forget { node } | Step::Leave { node, .. } => Some(node.as_str()),
            _ => None,
        })
        .collect()
}

/// 3 -> 1, the step a 2-node Khepri cluster cannot take by forgetting a stopped node (no majority
/// left to commit it): each node leaves while a majority stands. Afterwards the last node is a
/// cluster of one that still writes metadata (a queue declared) and holds every message.
async fn scaling_down_to_one_node_keeps_a_working_cluster(nodes: &mut NodeCluster) {
    // A queue of its own: those drained before may hold a few messages again (acks in flight when
    // a consumer closes come back).
    nodes.declare_ha_queue(0, "to-one", &[0, 1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "to-one", 0..200, 100).await;
    assert_eq!((confirmed.len(), error), (200, None));

    let steps = scale_down(nodes, 1, Duration::from_secs(600)).await.expect("3 -> 1");
    let names = nodes.names(&[0]);
    let gone = [names[0].replace("demo-0.", "demo-2."), names[0].replace("demo-0.", "demo-1.")];
    assert_eq!(removed_for_good(&steps), [gone[0].as_str(), gone[1].as_str()], "{steps:#?}");
    assert_eq!(
        steps.iter().any(|s| matches!(s, warren::rabbitmq::scale_down::Step::Leave { .. })),
        expects_khepri(nodes),
        "{steps:#?}"
    );
    let status = nodes.nodes[0].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["disk_nodes"]), names, "{status}");
    assert_eq!(node_list(&status["running_nodes"]), names, "{status}");
    // The metadata store commits alone: a new queue is declared, and a message goes through it.
    let queue = serde_json::json!({"durable": true});
    nodes.api_put(0, "/api/queues/%2F/after-one", queue).await.expect("declare a queue on the one node");
    assert_eq!(amqp::publish(&url, "after-one", 0..10, 10).await, ((0..10).collect(), None));
    let seen = amqp::drain(&url, "after-one", 10, Duration::from_secs(10)).await.expect("consume after-one");
    assert_exactly_once(&seen, 0..10);
    let seen = amqp::drain(&url, "to-one", 200, Duration::from_secs(15)).await.expect("consume on the one node");
    assert_exactly_once(&seen, 0..200);
}

/// Which metadata store the generation is expected to use: Khepri only from 4.3 here (4.2 made it
/// the default for new clusters, 4.3 removed Mnesia).
fn expects_khepri(nodes: &NodeCluster) -> bool {
    nodes.cluster.image_version.is_some_and(|v| v >= warren::rabbitmq::version::RabbitVersion::new(4, 2, 0))
}

async fn formation_and_high_availability(nodes: &NodeCluster) {
    let status = nodes.nodes[2].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["disk_nodes"]), nodes.names(&[0, 1, 2]), "cluster_status on node 2: {status}");
    let khepri = nodes.nodes[0].rabbitmqctl(&["-q", "eval", "rabbit_khepri:is_enabled()."]).await;
    assert_eq!(
        String::from_utf8_lossy(&khepri.stdout).trim() == "true",
        expects_khepri(nodes),
        "metadata store of {}: {khepri:?}",
        nodes.generation()
    );

    let observed = nodes.converge(0).await.expect("broker reconcile");
    assert_eq!(observed.members, nodes.names(&[0, 1, 2]));
    assert!(observed.missing.is_empty() && observed.partitions.is_empty(), "{observed:?}");
    let policies = nodes.api(1, "/api/policies").await.expect("policies");
    if nodes.quorum() {
        assert_eq!(observed.actions, ["set default queue type quorum on vhost /"]);
        assert_eq!(observed.high_availability.reason(), "QuorumQueues");
        let vhost = nodes.api(1, "/api/vhosts/%2F").await.expect("vhost /");
        assert_eq!(vhost["default_queue_type"], "quorum", "vhost /: {vhost}");
        assert_eq!(policies, serde_json::json!([]), "no policy on 4.x");
    } else {
        assert_eq!(observed.actions, ["applied policy ha-all in vhost /"]);
        let policy = &policies[0];
        assert_eq!(policy["name"], "ha-all");
        assert_eq!(policy["definition"], serde_json::json!({"ha-mode": "all", "ha-sync-mode": "automatic"}));
        assert_eq!(policy["pattern"], ".*");
    }
    // What only a partition-handling setting gave on Mnesia, Raft gives on Khepri: status says so.
    assert_eq!(
        observed.high_availability.message().contains("cluster_partition_handling has no effect"),
        nodes.cluster.image_version.is_some_and(|v| !v.honours_partition_handling()),
        "{:?}",
        observed.high_availability
    );
    let again = nodes.converge(2).await.expect("second broker reconcile");
    assert!(again.actions.is_empty(), "a second pass changed {:?}", again.actions);

    // The mode this generation cannot run is refused before anything is written to the broker.
    let (other, reason) = if nodes.quorum() {
        (HighAvailabilityMode::ClassicMirrored, "ClassicMirroringUnsupported")
    } else {
        (HighAvailabilityMode::Quorum, "QuorumDefaultUnsupported")
    };
    let spec = HighAvailabilitySpec { mode: other, ..nodes.cluster.high_availability.clone() };
    // 3.10 reports a vhost's default queue type as "undefined"; 4.x as what the operator set.
    let default_type =
        || async { nodes.api(1, "/api/vhosts/%2F").await.expect("vhost /")["default_queue_type"].clone() };
    let before = default_type().await;
    let refused = nodes.converge_with(0, &spec).await.expect_err("the other HA mode must be refused");
    assert_eq!(refused.reason(), reason, "{refused}");
    assert_eq!(nodes.api(1, "/api/policies").await.expect("policies"), policies, "the refusal wrote a policy");
    assert_eq!(default_type().await, before, "the refusal changed the default queue type");
    assert_eq!(before == "quorum", nodes.quorum(), "default queue type {before}");
}

async fn losing_the_leader_loses_no_confirmed_message(nodes: &mut NodeCluster) {
    nodes.declare_ha_queue(0, "orders", &[0, 1, 2]).await;
    // Published through node 1, whose connection survives the loss of another node.
    let url = nodes.nodes[1].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "orders", 0..10_000, 500).await;
    assert_eq!((confirmed.len(), error), (10_000, None), "publishing with confirms");

    let leader = nodes.queue_leader(1, "orders").await;
    let killed_at = Instant::now();
    nodes.nodes[leader].kill();
    let survivor = (leader + 1) % 3;
    let name = nodes.nodes[leader].name.clone();
    wait_for("another node leads orders with every message", Duration::from_secs(60), || async {
        let queue = nodes.api(survivor, "/api/queues/%2F/orders").await?;
        let now = queue["leader"].as_str().or_else(|| queue["node"].as_str()).unwrap_or_default();
        if now != name && !now.is_empty() && queue["messages"] == 10_000 { Ok(()) } else { Err(queue.to_string()) }
    })
    .await;
    eprintln!(
        "[{}] a new leader serves orders {:.1} s after SIGKILL",
        nodes.generation(),
        killed_at.elapsed().as_secs_f64()
    );
    let seen =
        amqp::drain(&nodes.nodes[survivor].amqp_url(&nodes.credentials), "orders", 10_000, Duration::from_secs(15))
            .await
            .expect("consume from a survivor");
    assert_exactly_once(&seen, 0..10_000);

    // The pod comes back on its volume and is a member again.
    nodes.start(&[leader]);
    nodes.wait_formed(BOOT).await;
    nodes.wait_replicated(0, "orders", &[0, 1, 2], None).await;
}

async fn a_node_that_lost_its_volume_rejoins(nodes: &mut NodeCluster) {
    nodes.declare_ha_queue(0, "kept", &[0, 1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "kept", 0..500, 100).await;
    assert_eq!((confirmed.len(), error), (500, None));

    nodes.nodes[2].kill();
    std::fs::remove_dir_all(nodes.nodes[2].data_dir()).expect("wipe node 2's volume");
    nodes.start(&[2]);
    nodes.wait_members(2, &[0, 1, 2], BOOT).await;
    nodes.wait_members(0, &[0, 1, 2], BOOT).await;
    // Its copy of every queue is back: a new quorum member (its lost incarnation forgotten, then
    // grown back), or a synchronised mirror (ha-sync-mode automatic).
    nodes.wait_replicated(0, "kept", &[0, 1, 2], Some(500)).await;
    nodes.wait_replicated(0, "orders", &[0, 1, 2], None).await;
    let console = std::fs::read_to_string(nodes.nodes[2].data_dir().join("../console.log")).unwrap_or_default();
    // Both stores still list the lost incarnation: it is forgotten before the node joins again.
    assert!(console.contains("was lost); forgetting it"), "console of node 2:\n{}", nodes.nodes[2].console_tail());
    let seen = amqp::drain(&nodes.nodes[2].amqp_url(&nodes.credentials), "kept", 500, Duration::from_secs(15))
        .await
        .expect("consume through the rejoined node");
    assert_exactly_once(&seen, 0..500);
}

/// A publisher inside node `index`'s own network: how many of `ids` the node confirmed.
async fn publish_from_inside(nodes: &NodeCluster, index: usize, ids: std::ops::Range<u32>) -> (usize, Option<String>) {
    let url = nodes.nodes[index].local_amqp_url(&nodes.credentials);
    nodes.nodes[index]
        .in_network(move || async move {
            let (confirmed, error) = amqp::publish(&url, "payments", ids, 10).await;
            (confirmed.len(), error)
        })
        .await
}

async fn a_partitioned_minority_accepts_no_write(nodes: &NodeCluster) {
    nodes.declare_ha_queue(0, "payments", &[0, 1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (before, error) = amqp::publish(&url, "payments", 0..500, 100).await;
    assert_eq!((before.len(), error), (500, None));
    // The control: a client inside node 2's network reaches it while its link is up.
    assert_eq!(publish_from_inside(nodes, 2, 500..510).await, (10, None), "a client in node 2's network");

    nodes.nodes[2].set_link(false);
    let cut_at = Instant::now();
    wait_for("the majority sees node 2 down", Duration::from_secs(90), || async {
        let all = nodes.api(0, "/api/nodes").await?;
        let down: Vec<&str> = all
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["running"] == false)
            .filter_map(|n| n["name"].as_str())
            .collect();
        if down == [nodes.nodes[2].name.as_str()] { Ok(()) } else { Err(all.to_string()) }
    })
    .await;
    let honoured = nodes.cluster.image_version.is_some_and(|v| v.honours_partition_handling());
    if honoured {
        // pause_minority: the cut-off node stops its RabbitMQ application and closes AMQP.
        wait_for("node 2 paused", Duration::from_secs(90), || async {
            let node = &nodes.nodes[2];
            if !node.serves_amqp().await && !node.app_running().await { Ok(()) } else { Err("still running".into()) }
        })
        .await;
    }
    eprintln!("[{}] partition detected in {:.1} s", nodes.generation(), cut_at.elapsed().as_secs_f64());
    // Paused (Mnesia) or a minority of every Raft group (Khepri): no write is confirmed there.
    let (minority, error) = publish_from_inside(nodes, 2, 900_000..900_010).await;
    assert_eq!(minority, 0, "the minority confirmed writes ({error:?})");
    let (during, error) = amqp::publish(&url, "payments", 510..1_510, 100).await;
    assert_eq!((during.len(), error), (1_000, None), "the majority must keep confirming");

    nodes.nodes[2].set_link(true);
    nodes.wait_members(2, &[0, 1, 2], BOOT).await;
    wait_for("no partition reported", Duration::from_secs(90), || async {
        let all = nodes.api(0, "/api/nodes").await?;
        let partitioned =
            all.as_array().into_iter().flatten().any(|n| n["partitions"].as_array().is_some_and(|p| !p.is_empty()));
        if partitioned { Err(all.to_string()) } else { Ok(()) }
    })
    .await;
    let (seen, error) =
        amqp::consume(&nodes.nodes[2].amqp_url(&nodes.credentials), "payments", usize::MAX, Duration::from_secs(10))
            .await;
    assert_eq!(error, None, "consuming after the heal");
    // What the minority never confirmed may or may not have landed; everything confirmed did, once.
    let (confirmed, unconfirmed): (BTreeMap<u32, u32>, BTreeMap<u32, u32>) =
        seen.into_iter().partition(|(id, _)| *id < 900_000);
    eprintln!("[{}] unconfirmed minority messages found after the heal: {}", nodes.generation(), unconfirmed.len());
    assert_exactly_once(&confirmed, 0..1_510);
}

async fn a_full_restart_in_any_order_keeps_everything(nodes: &mut NodeCluster) {
    nodes.declare_ha_queue(0, "durable", &[0, 1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "durable", 0..1_000, 200).await;
    assert_eq!((confirmed.len(), error), (1_000, None));

    // Every pod deleted at once, as a StatefulSet with Parallel pod management does.
    nodes.stop_all_gracefully(Duration::from_secs(120)).await;
    // Back in the reverse order: the last to start was the first to stop.
    nodes.start(&[2, 1, 0]);
    nodes.wait_formed(BOOT).await;
    eprintln!(
        "[{}] full restart: boots retried inside a container so far: {}",
        nodes.generation(),
        nodes.boots_retried()
    );
    let status = nodes.nodes[1].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["running_nodes"]), nodes.names(&[0, 1, 2]), "{status}");
    nodes.wait_replicated(1, "durable", &[0, 1, 2], Some(1_000)).await;
    let seen = amqp::drain(&nodes.nodes[2].amqp_url(&nodes.credentials), "durable", 1_000, Duration::from_secs(15))
        .await
        .expect("consume after the restart");
    assert_exactly_once(&seen, 0..1_000);
}

async fn a_rolling_restart_through_pre_stop_loses_nothing(nodes: &mut NodeCluster) {
    const QUEUE: &str = "rolling";
    nodes.declare_ha_queue(1, QUEUE, &[0, 1, 2]).await;
    let url = |i: usize| nodes.nodes[i].amqp_url(&nodes.credentials);
    // The publisher starts on node 0 and the consumer on node 2: both see their node restart.
    let (publisher_urls, consumer_urls) = (vec![url(0), url(1), url(2)], vec![url(2), url(0), url(1)]);
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let (stop_publishing, stop_consuming) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let publishing =
        tokio::spawn(amqp::publish_until(publisher_urls, QUEUE, confirmed.clone(), stop_publishing.clone()));
    let consuming = tokio::spawn(amqp::consume_until(consumer_urls, QUEUE, seen.clone(), stop_consuming.clone()));

    // Highest ordinal first, as the StatefulSet controller rolls pods.
    let mut confirmed_during = Vec::new();
    for i in [2, 1, 0] {
        let before = confirmed.lock().await.len();
        nodes.nodes[i].stop_gracefully(Duration::from_secs(180)).await;
        nodes.start(&[i]);
        nodes.wait_members(i, &[0, 1, 2], BOOT).await;
        confirmed_during.push(confirmed.lock().await.len() - before);
    }
    stop_publishing.store(true, Ordering::Relaxed);
    let publisher_moves = publishing.await.expect("publisher task");
    stop_consuming.store(true, Ordering::Relaxed);
    let consumer_moves = consuming.await.expect("consumer task");

    let confirmed = confirmed.lock().await;
    let seen = seen.lock().await;
    let lost: Vec<&u32> = confirmed.iter().filter(|id| !seen.contains_key(id)).take(20).collect();
    let duplicates = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "[{}] rolling restart: {} confirmed, {} consumed, {duplicates} delivered more than once (republished after a \
         lost confirm or redelivered after a lost ack); confirmed while restarting nodes 2, 1, 0: {confirmed_during:?}",
        nodes.generation(),
        confirmed.len(),
        seen.len()
    );
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?} (of {})", confirmed.len());
    assert!(confirmed_during.iter().all(|n| *n > 0), "the publisher stalled during a restart: {confirmed_during:?}");
    assert!(
        publisher_moves >= 1 && consumer_moves >= 1,
        "clients never lost their node: {publisher_moves}, {consumer_moves}"
    );
}

async fn scaling_up_replicates_existing_queues(nodes: &mut NodeCluster) {
    nodes.declare_ha_queue(0, "scaled", &[0, 1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "scaled", 0..300, 100).await;
    assert_eq!((confirmed.len(), error), (300, None));

    nodes.scale_to(5);
    nodes.wait_formed(BOOT).await;
    let observed = nodes.converge(0).await.expect("broker reconcile after the scale-up");
    assert_eq!(observed.members, nodes.names(&[0, 1, 2, 3, 4]));
    assert!(observed.missing.is_empty(), "{observed:?}");
    // Queues declared before the scale-up gain a copy on each new node: quorum members grown by the
    // joining node's bootstrap, or mirrors added by ha-all and synchronised automatically.
    nodes.wait_replicated(0, "scaled", &[0, 1, 2, 3, 4], Some(300)).await;
    nodes.wait_replicated(0, "kept", &[0, 1, 2, 3, 4], None).await;
    let seen = amqp::drain(&nodes.nodes[4].amqp_url(&nodes.credentials), "scaled", 300, Duration::from_secs(15))
        .await
        .expect("consume through a new node");
    assert_exactly_once(&seen, 0..300);
}

/// A classic queue that nothing replicates (on 3.10, a policy of the user's with a higher priority
/// than ha-all; on 4.x, declared classic), holding messages on the node that would leave first.
async fn scaling_down_is_refused_while_a_queue_would_be_lost(nodes: &mut NodeCluster) {
    let leaving = nodes.nodes[4].name.clone();
    if !nodes.quorum() {
        let policy = serde_json::json!({"pattern": "^solo$", "apply-to": "queues", "priority": 10,
                                        "definition": {"max-length": 100000}});
        nodes.api_put(0, "/api/policies/%2F/solo", policy).await.expect("the user's policy");
    }
    let queue = serde_json::json!({"durable": true, "node": leaving, "arguments": {"x-queue-type": "classic"}});
    nodes.api_put(4, "/api/queues/%2F/solo", queue).await.expect("declare solo");
    let url = nodes.nodes[4].amqp_url(&nodes.credentials);
    assert_eq!(amqp::publish(&url, "solo", 0..5, 5).await, ((0..5).collect(), None));
    wait_for("solo: 5 messages on the leaving node, unmirrored", Duration::from_secs(60), || async {
        let info = nodes.api(0, "/api/queues/%2F/solo").await?;
        let unmirrored = node_list(&info["slave_nodes"]).is_empty();
        (info["messages"] == 5 && info["node"] == leaving.as_str() && unmirrored).then_some(()).ok_or(info.to_string())
    })
    .await;

    let refusal = scale_down(nodes, 3, Duration::from_secs(120)).await.expect_err("the scale-down must be refused");
    eprintln!("[{}] refused: {refusal}", nodes.generation());
    assert!(refusal.contains("solo (5 messages)") && refusal.contains(&leaving), "{refusal}");
    assert_eq!(nodes.nodes.len(), 5, "nothing was removed");
    let status = nodes.nodes[0].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["running_nodes"]), nodes.names(&[0, 1, 2, 3, 4]));

    // The user's way out: consume the messages and delete the queue.
    let seen = amqp::drain(&url, "solo", 5, Duration::from_secs(5)).await.expect("consume solo");
    assert_exactly_once(&seen, 0..5);
    let deleted = nodes.nodes[0].rabbitmqctl(&["-q", "delete_queue", "solo"]).await;
    assert!(deleted.status.success(), "{deleted:?}");
    if !nodes.quorum() {
        assert!(nodes.nodes[0].rabbitmqctl(&["-q", "clear_policy", "solo"]).await.status.success());
    }
}

/// 5 -> 3 while a publisher confirms into a replicated queue and a consumer reads it, both starting
/// on nodes that leave: the operator's procedure removes node 4, then node 3, each handed over,
/// removed and forgotten.
async fn scaling_down_hands_over_and_forgets_under_load(nodes: &mut NodeCluster) {
    const QUEUE: &str = "shrinking";
    // A member on every node (4.x places 3 by default; ha-all mirrors on all five).
    let queue = serde_json::json!({"durable": true, "arguments": {"x-quorum-initial-group-size": 5}});
    let queue = if nodes.quorum() { queue } else { serde_json::json!({"durable": true}) };
    nodes.api_put(0, &format!("/api/queues/%2F/{QUEUE}"), queue).await.expect("declare");
    nodes.wait_replicated(0, QUEUE, &[0, 1, 2, 3, 4], Some(0)).await;
    let url = |i: usize| nodes.nodes[i].amqp_url(&nodes.credentials);
    let (publisher_urls, consumer_urls) = (vec![url(4), url(3), url(0)], vec![url(3), url(1)]);
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let (stop_publishing, stop_consuming) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let publishing =
        tokio::spawn(amqp::publish_until(publisher_urls, QUEUE, confirmed.clone(), stop_publishing.clone()));
    let consuming = tokio::spawn(amqp::consume_until(consumer_urls, QUEUE, seen.clone(), stop_consuming.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let steps = scale_down(nodes, 3, Duration::from_secs(900)).await.expect("5 -> 3");
    let took = started.elapsed();
    let confirmed_while_scaling = confirmed.lock().await.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_publishing.store(true, Ordering::Relaxed);
    let publisher_moves = publishing.await.expect("publisher task");
    stop_consuming.store(true, Ordering::Relaxed);
    let consumer_moves = consuming.await.expect("consumer task");

    let confirmed = confirmed.lock().await;
    let seen = seen.lock().await;
    let lost: Vec<&u32> = confirmed.iter().filter(|id| !seen.contains_key(id)).take(20).collect();
    eprintln!(
        "[{}] scale 5 -> 3 under load: {:.1} s; {} confirmed ({confirmed_while_scaling} by the end of the \
         scale-down), {} consumed; the publisher moved {publisher_moves} time(s), the consumer {consumer_moves}",
        nodes.generation(),
        took.as_secs_f64(),
        confirmed.len(),
        seen.len()
    );
    assert!(lost.is_empty(), "confirmed messages lost: {lost:?} (of {})", confirmed.len());
    assert!(publisher_moves >= 1, "the publisher's node (4) left, so it must have moved");

    // Each leaving node went through hand-over, removal and forget (Khepri: it left before its
    // removal), highest ordinal first.
    let forgotten = removed_for_good(&steps);
    let names = nodes.names(&[0, 1, 2]);
    let gone = [names[0].replace("demo-0.", "demo-4."), names[0].replace("demo-0.", "demo-3.")];
    assert_eq!(forgotten, [gone[0].as_str(), gone[1].as_str()], "{steps:#?}");
    for step in ["HandOver", "Remove"] {
        assert_eq!(steps.iter().filter(|s| format!("{s:?}").starts_with(step)).count(), 2, "{step}: {steps:#?}");
    }

    // The cluster lists exactly the nodes that exist, and every queue has its copies on them.
    let status = nodes.nodes[0].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["disk_nodes"]), names, "{status}");
    assert_eq!(node_list(&status["running_nodes"]), names, "{status}");
    for queue in [QUEUE, "scaled", "kept"] {
        nodes.wait_replicated(0, queue, &[0, 1, 2], None).await;
    }
}

/// 5 -> 3 asked, node 4 handed over (in maintenance mode, its quorum members shrunk), then 5 asked
/// again: node 4 leaves maintenance mode and every queue has a copy on it again.
async fn a_called_off_scale_down_gives_the_node_back(nodes: &mut NodeCluster) {
    let steps = scale_down_called_off(nodes, 3).await;
    eprintln!("[{}] called off: {steps:?}", nodes.generation());
    assert!(
        steps.iter().any(|s| matches!(s, warren::rabbitmq::scale_down::Step::Revive { ordinal: 4, .. })),
        "{steps:?}"
    );
    assert_eq!(nodes.nodes.len(), 5);
    let maintenance =
        nodes.nodes[4].rabbitmqctl(&["-q", "eval", "rabbit_maintenance:is_being_drained_local_read(node())."]).await;
    assert_eq!(String::from_utf8_lossy(&maintenance.stdout).trim(), "false", "{maintenance:?}");
    wait_for("node 4 serves AMQP again", Duration::from_secs(60), || async {
        nodes.nodes[4].ready().await.then_some(()).ok_or_else(|| "not ready".to_string())
    })
    .await;
    for queue in ["scaled", "kept"] {
        nodes.wait_replicated(0, queue, &[0, 1, 2, 3, 4], None).await;
    }
}
