//! Tier 2: what the operator promises about RabbitMQ, on real nodes (Debian's rabbitmq-server
//! 3.10) run with the exact configuration and bootstrap script the builders produce. Every check
//! reads what RabbitMQ reports: cluster_status, the management API, messages consumed.

mod support;

use std::time::Duration;

use support::rabbit_nodes::{NodeCluster, wait_for};
use warren::rabbitmq::broker;
use warren::rabbitmq::management::ManagementClient;

const BOOT: Duration = Duration::from_secs(240);

/// A 3-node 3.10 cluster as a user would write it: Auto HA (classic mirroring on 3.x), pause_minority.
const CLUSTER: &str = "
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata: {name: demo}
spec:
  replicas: 3
  image: rabbitmq:3.10.8-management
";

fn mirrors(queue: &serde_json::Value, key: &str) -> Vec<String> {
    let mut nodes: Vec<String> = queue[key]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    nodes.sort();
    nodes
}

/// Runs the operator's broker reconcile (its real code) against node `index`'s management API.
async fn converge(nodes: &NodeCluster, index: usize) -> warren::error::Result<broker::BrokerObservation> {
    let client =
        ManagementClient::new(&nodes.management_url(index), &nodes.credentials.username, &nodes.credentials.password)?;
    let expected = nodes.names(&[0, 1, 2]);
    broker::converge(&client, &expected, &nodes.cluster.high_availability).await
}

#[tokio::test]
async fn three_nodes_form_one_cluster_and_mirror_queues() {
    let mut nodes = NodeCluster::create(CLUSTER).await;
    nodes.start_all();
    nodes.wait_formed(BOOT).await;
    let status = nodes.nodes[2].cluster_status().expect("cluster_status");
    let mut disk_nodes: Vec<String> = status["disk_nodes"]
        .as_array()
        .expect("disk_nodes")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    disk_nodes.sort();
    assert_eq!(disk_nodes, nodes.names(&[0, 1, 2]), "cluster_status on node 2: {status}");

    let observed = converge(&nodes, 0).await.expect("broker reconcile");
    assert_eq!(observed.members, nodes.names(&[0, 1, 2]));
    assert!(observed.missing.is_empty() && observed.partitions.is_empty(), "{observed:?}");
    assert_eq!(observed.actions, ["applied policy ha-all in vhost /"]);
    let policy = nodes.api(1, "/api/policies/%2F/ha-all").await.expect("ha-all policy");
    assert_eq!(policy["definition"], serde_json::json!({"ha-mode": "all", "ha-sync-mode": "automatic"}));
    assert_eq!(policy["pattern"], ".*");
    let again = converge(&nodes, 2).await.expect("second broker reconcile");
    assert!(again.actions.is_empty(), "a second pass changed {:?}", again.actions);

    // A queue declared through node 1 lives there, with synchronised mirrors on the other two.
    nodes.api_put(1, "/api/queues/%2F/formation", serde_json::json!({"durable": true})).await.expect("declare");
    let queue = wait_for("mirrors of queue formation synchronised", Duration::from_secs(60), || async {
        let queue = nodes.api(0, "/api/queues/%2F/formation").await?;
        // The policy shows in the queue's statistics, which follow a few seconds later.
        if mirrors(&queue, "synchronised_slave_nodes") == nodes.names(&[0, 2]) && queue["policy"] == "ha-all" {
            Ok(queue)
        } else {
            Err(queue.to_string())
        }
    })
    .await;
    assert_eq!(queue["node"], nodes.nodes[1].name);
}
