//! Tier 2: why the partition handling setting matters, on real 3.10 nodes (classic mirroring, where
//! a split brain shows as two masters of one queue). With `ignore` both sides of a cut accept
//! writes; what `pause_minority` (the default) does instead is in rabbitmq_lifecycle.rs, for every
//! generation (4.3, with Khepri, has no such setting: Raft majorities decide).

use std::time::Duration;

use testkit::amqp;
use testkit::rabbit_nodes::{NodeCluster, wait_for};

/// Partitions are detected after net_ticktime (60 s by default); 10 s keeps the test short. Set
/// through the spec's advancedConfig, as a user would.
fn cluster(partition_handling: &str) -> String {
    format!(
        "
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata: {{name: demo}}
spec:
  replicas: 3
  image: rabbitmq:3.10.8-management
  partitionHandling: {partition_handling}
  rabbitmq:
    advancedConfig: |
      [{{kernel, [{{net_ticktime, 10}}]}}].
"
    )
}

/// What node `index` itself reports about its peers, through its own management API (reachable
/// only from inside its network while it is cut off).
async fn own_view(nodes: &NodeCluster, index: usize, path: &str) -> Result<serde_json::Value, String> {
    let out = nodes.nodes[index]
        .sh(
            "curl -fsS --max-time 10 -u \"$U:$P\" \"http://127.0.0.1:15672$API_PATH\"",
            &[("U", &nodes.credentials.username), ("P", &nodes.credentials.password), ("API_PATH", path)],
        )
        .await;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

#[tokio::test]
async fn with_ignore_both_sides_of_a_partition_accept_writes() {
    let nodes = NodeCluster::started(&cluster("ignore")).await;
    nodes.declare_mirrored_queue(0, "split", &[1, 2]).await;

    nodes.nodes[2].set_link(false);
    // Each side decides the other is down; node 2 promotes its mirror and keeps serving.
    wait_for("both sides see the other as down", Duration::from_secs(90), || async {
        let majority = nodes.api(0, "/api/nodes").await?;
        let node2_down = majority
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == nodes.nodes[2].name.as_str() && n["running"] == false);
        let minority = own_view(&nodes, 2, "/api/queues/%2F/split").await?;
        if node2_down && minority["node"] == nodes.nodes[2].name.as_str() {
            Ok(())
        } else {
            Err(format!("majority: {majority}; node 2's queue: {minority}"))
        }
    })
    .await;
    assert!(
        nodes.nodes[2].serves_amqp().await && nodes.nodes[2].app_running().await,
        "with ignore the cut-off node keeps running"
    );

    let (majority_side, error) = amqp::publish(&nodes.nodes[0].amqp_url(&nodes.credentials), "split", 0..100, 50).await;
    assert_eq!((majority_side.len(), error), (100, None));
    // The minority side, from a client inside its network: RabbitMQ routes the message there too.
    let routed = nodes.nodes[2].sh(
        "curl -fsS --max-time 10 -u \"$U:$P\" -H 'content-type: application/json' -X POST \
         http://127.0.0.1:15672/api/exchanges/%2F/amq.default/publish \
         -d '{\"properties\":{\"delivery_mode\":2},\"routing_key\":\"split\",\"payload\":\"minority\",\"payload_encoding\":\"string\"}'",
        &[("U", &nodes.credentials.username), ("P", &nodes.credentials.password)],
    )
    .await;
    assert!(String::from_utf8_lossy(&routed.stdout).contains("\"routed\":true"), "{routed:?}");
    // Queue statistics follow a few seconds behind.
    let majority_queue = wait_for("the majority's copy counts its 100 messages", Duration::from_secs(30), || async {
        let q = nodes.api(0, "/api/queues/%2F/split").await?;
        if q["messages"] == 100 { Ok(q) } else { Err(q.to_string()) }
    })
    .await;
    let minority_queue = wait_for("node 2's copy counts its message", Duration::from_secs(30), || async {
        let q = own_view(&nodes, 2, "/api/queues/%2F/split").await?;
        if q["messages"] == 1 { Ok(q) } else { Err(q.to_string()) }
    })
    .await;
    // Two masters of one queue, each with its own messages: the split brain pause_minority prevents.
    assert_ne!(majority_queue["node"], minority_queue["node"]);
    nodes.nodes[2].set_link(true);
}
