//! Tier 2: a joining node whose first start fails, on real nodes of each generation.
//!
//! RabbitMQ 3.10 on Mnesia fails `rabbitmqctl start_app` after `join_cluster` at random when nodes
//! join at once on a loaded machine, and once a make test saw the next two start_app in the same
//! Erlang VM fail too ({cannot_create_schema,{has_no_disc,...}}). bootstrap.sh then stops that VM
//! and boots a new one. That failure cannot be had on demand, so a stand-in in front of the image's
//! rabbitmqctl refuses the first start_app; the rest is the real RabbitMQ: the new VM's boot from
//! what join_cluster wrote, the membership it finds, the quorum queue member grown onto it.

use std::time::Duration;

use testkit::generations::manifest;
use testkit::rabbit_broker::node_list;
use testkit::rabbit_nodes::{BOOT, NodeCluster};
use testkit::wait::wait_for;

/// The first `start_app` fails without starting anything.
const FIRST_START_FAILS: &str = r#"dir=$(dirname "$0")
case " $* " in
*" start_app "*)
    if [ ! -e "$dir/start-app-refused" ]; then
        touch "$dir/start-app-refused"
        echo "Error: start_app refused by the test's stand-in" >&2
        exit 70
    fi
    ;;
esac
exec "$RABBITMQ_BIN/rabbitmqctl" "$@""#;

async fn a_node_whose_start_after_joining_fails_boots_in_a_new_vm(generation: &str) {
    let mut nodes = NodeCluster::create(&manifest("join", 2, generation, "")).await;
    nodes.wrap_program(1, "rabbitmqctl", FIRST_START_FAILS);
    // Node 0 first, with a quorum queue, as when a replica is added to a cluster in use.
    nodes.start(&[0]);
    nodes.wait_members(0, &[0], BOOT).await;
    let queue = serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}});
    nodes.api_put(0, "/api/queues/%2F/orders", queue).await.expect("declare orders");
    nodes.start(&[1]);
    nodes.wait_members(1, &[0, 1], BOOT).await;

    let console = nodes.nodes[1].console();
    let digest = nodes.nodes[1].console_digest();
    assert!(
        console.contains("start_app refused by the test's stand-in"),
        "{generation}: the stand-in did not run:\n{digest}"
    );
    assert!(
        console.contains("failed to start after joining rabbit@join-0.")
            && console.contains("(try 1); starting it again in a new Erlang VM"),
        "{generation}:\n{digest}"
    );
    assert!(!console.contains("(try 2)"), "{generation}: the new VM booted the first time:\n{digest}");
    assert!(
        console.contains("booted in its new Erlang VM as a member of the cluster it joined"),
        "{generation}:\n{digest}"
    );
    assert_eq!(console.matches("joining the cluster of").count(), 1, "{generation}: joined once:\n{digest}");
    assert!(console.contains("is clustered"), "{generation}:\n{digest}");

    // A disc member in node 0's view, a member of the queue, its data on its own volume.
    let status = nodes.nodes[0].cluster_status().await.expect("cluster_status on node 0");
    assert_eq!(node_list(&status["disk_nodes"]), nodes.names(&[0, 1]), "{generation}: {status}");
    wait_for(&format!("{generation}: orders with a member on node 1"), Duration::from_secs(60), || async {
        let info = nodes.api(0, "/api/queues/%2F/orders").await?;
        (node_list(&info["members"]) == nodes.names(&[0, 1])).then_some(()).ok_or(info["members"].to_string())
    })
    .await;
    let data = nodes.nodes[1].data_dir().join("mnesia").join(&nodes.nodes[1].name);
    assert!(data.join("warren-clustered").exists(), "{generation}: no marker in {}", data.display());

    // Its container killed and started again (a graceful stop would wait in the preStop hook: on
    // two nodes the queue would lose its quorum): it boots as the member it is, from that data, and
    // joins nothing.
    nodes.nodes[1].kill();
    nodes.start(&[1]);
    nodes.wait_members(1, &[0, 1], BOOT).await;
    let restarted = nodes.nodes[1].console();
    let after = restarted.get(console.len()..).unwrap_or_default();
    assert!(after.contains("is a cluster member already; starting"), "{generation}:\n{after}");
    assert!(!after.contains("joining the cluster"), "{generation}:\n{after}");
    eprintln!(
        "{generation}: start_app refused after the join; a new VM booted, the node is a member of the cluster and of its queue"
    );
}

#[tokio::test]
async fn rabbitmq_3_10_a_joined_node_that_cannot_start_boots_as_a_member_in_a_new_vm() {
    a_node_whose_start_after_joining_fails_boots_in_a_new_vm("3.10").await;
}

#[tokio::test]
async fn rabbitmq_4_0_a_joined_node_that_cannot_start_boots_as_a_member_in_a_new_vm() {
    a_node_whose_start_after_joining_fails_boots_in_a_new_vm("4.0").await;
}

#[tokio::test]
async fn rabbitmq_4_3_a_joined_node_that_cannot_start_boots_as_a_member_in_a_new_vm() {
    a_node_whose_start_after_joining_fails_boots_in_a_new_vm("4.3").await;
}
