//! Tier 2: what the operator promises about RabbitMQ, on real nodes (Debian's rabbitmq-server
//! 3.10) run with the exact configuration and bootstrap script the builders produce. Every check
//! reads what RabbitMQ reports: cluster_status, the management API, messages consumed.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::amqp;
use support::rabbit_nodes::{BOOT, NodeCluster, THREE_NODES, node_list, wait_for};

/// Every id in `ids` consumed exactly once, nothing else.
fn assert_exactly_once(seen: &BTreeMap<u32, u32>, ids: impl Iterator<Item = u32>) {
    let expected: Vec<u32> = ids.collect();
    let missing: Vec<&u32> = expected.iter().filter(|id| !seen.contains_key(id)).take(10).collect();
    let twice: Vec<(&u32, &u32)> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, first ones: {missing:?}",
        expected.len() - seen.len().min(expected.len())
    );
    assert!(twice.is_empty(), "messages delivered more than once: {twice:?}");
    assert_eq!(seen.len(), expected.len(), "unexpected messages consumed");
}

#[tokio::test]
async fn three_nodes_form_one_cluster_and_mirror_queues() {
    let mut nodes = NodeCluster::create(THREE_NODES).await;
    nodes.start_all();
    nodes.wait_formed(BOOT).await;
    let status = nodes.nodes[2].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["disk_nodes"]), nodes.names(&[0, 1, 2]), "cluster_status on node 2: {status}");

    let observed = nodes.converge(0).await.expect("broker reconcile");
    assert_eq!(observed.members, nodes.names(&[0, 1, 2]));
    assert!(observed.missing.is_empty() && observed.partitions.is_empty(), "{observed:?}");
    assert_eq!(observed.actions, ["applied policy ha-all in vhost /"]);
    let policy = nodes.api(1, "/api/policies/%2F/ha-all").await.expect("ha-all policy");
    assert_eq!(policy["definition"], serde_json::json!({"ha-mode": "all", "ha-sync-mode": "automatic"}));
    assert_eq!(policy["pattern"], ".*");
    let again = nodes.converge(2).await.expect("second broker reconcile");
    assert!(again.actions.is_empty(), "a second pass changed {:?}", again.actions);

    // A queue declared through node 1 lives there, with synchronised mirrors on the other two.
    nodes.declare_mirrored_queue(1, "formation", &[0, 2]).await;
    wait_for("queue formation under policy ha-all", Duration::from_secs(30), || async {
        let queue = nodes.api(0, "/api/queues/%2F/formation").await?;
        // The policy shows in the queue's statistics, which follow a few seconds later.
        if queue["policy"] == "ha-all" { Ok(()) } else { Err(queue.to_string()) }
    })
    .await;
}

#[tokio::test]
async fn losing_the_master_node_loses_no_confirmed_message() {
    let mut nodes = NodeCluster::started(THREE_NODES).await;
    nodes.declare_mirrored_queue(0, "orders", &[1, 2]).await;
    // Published through node 1, whose connection survives the loss of node 0.
    let url = nodes.nodes[1].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "orders", 0..10_000, 500).await;
    assert_eq!((confirmed.len(), error), (10_000, None), "publishing with confirms");

    let queue = nodes.api(1, "/api/queues/%2F/orders").await.expect("queue");
    let master = nodes.index_of(queue["node"].as_str().expect("master node"));
    nodes.nodes[master].kill();
    let survivor = (master + 1) % 3;
    wait_for("a mirror promoted with every message", Duration::from_secs(60), || async {
        let queue = nodes.api(survivor, "/api/queues/%2F/orders").await?;
        if queue["node"] != nodes.nodes[master].name.as_str() && queue["messages"] == 10_000 {
            Ok(())
        } else {
            Err(queue.to_string())
        }
    })
    .await;
    let seen =
        amqp::drain(&nodes.nodes[survivor].amqp_url(&nodes.credentials), "orders", 10_000, Duration::from_secs(15))
            .await
            .expect("consume from a survivor");
    assert_exactly_once(&seen, 0..10_000);
}

#[tokio::test]
async fn a_full_restart_in_any_order_keeps_cluster_and_messages() {
    let mut nodes = NodeCluster::started(THREE_NODES).await;
    nodes.declare_mirrored_queue(0, "durable", &[1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "durable", 0..1_000, 200).await;
    assert_eq!((confirmed.len(), error), (1_000, None));

    // Every pod deleted at once, as a StatefulSet with Parallel pod management does.
    futures::future::join_all(nodes.nodes.iter_mut().map(|n| n.stop_gracefully(Duration::from_secs(120)))).await;
    // Back in the reverse order: the last to start was the first to stop.
    nodes.start(&[2, 1, 0]);
    nodes.wait_formed(BOOT).await;
    let status = nodes.nodes[1].cluster_status().await.expect("cluster_status");
    assert_eq!(node_list(&status["running_nodes"]), nodes.names(&[0, 1, 2]), "{status}");
    let seen = amqp::drain(&nodes.nodes[2].amqp_url(&nodes.credentials), "durable", 1_000, Duration::from_secs(15))
        .await
        .expect("consume after the restart");
    assert_exactly_once(&seen, 0..1_000);
}

#[tokio::test]
async fn a_node_that_lost_its_volume_rejoins_by_itself() {
    let mut nodes = NodeCluster::started(THREE_NODES).await;
    nodes.declare_mirrored_queue(0, "kept", &[1, 2]).await;
    let url = nodes.nodes[0].amqp_url(&nodes.credentials);
    let (confirmed, error) = amqp::publish(&url, "kept", 0..500, 100).await;
    assert_eq!((confirmed.len(), error), (500, None));

    nodes.nodes[2].kill();
    std::fs::remove_dir_all(nodes.nodes[2].data_dir()).expect("wipe node 2's volume");
    nodes.start(&[2]);
    nodes.wait_members(2, &[0, 1, 2], BOOT).await;
    nodes.wait_members(0, &[0, 1, 2], BOOT).await;
    // It holds a synchronised mirror again (ha-sync-mode automatic) and the messages are intact.
    wait_for("node 2 mirrors queue kept again", Duration::from_secs(60), || async {
        let queue = nodes.api(0, "/api/queues/%2F/kept").await?;
        if node_list(&queue["synchronised_slave_nodes"]).contains(&nodes.nodes[2].name) && queue["messages"] == 500 {
            Ok(())
        } else {
            Err(queue.to_string())
        }
    })
    .await;
    let log = std::fs::read_to_string(nodes.nodes[2].data_dir().join("../console.log")).unwrap_or_default();
    assert!(
        log.contains("its data was lost); forgetting it"),
        "the stale member was not forgotten:\n{}",
        nodes.nodes[2].console_tail()
    );
    let seen = amqp::drain(&nodes.nodes[2].amqp_url(&nodes.credentials), "kept", 500, Duration::from_secs(15))
        .await
        .expect("consume through the rejoined node");
    assert_exactly_once(&seen, 0..500);
}
