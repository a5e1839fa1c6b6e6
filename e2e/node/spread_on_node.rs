//! Spread over the three nodes. `spec.spread.nodes: Required` with four replicas: three pods run,
//! one on each node, and the fourth finds no node of its own and stays Pending, and the
//! RabbitCluster says so in the scheduler's words (the AllReplicasReady condition and a Warning
//! Event), instead of a bare "3/4 pods ready". (The default, Preferred, is shown spreading three
//! pods over three nodes by cluster_on_node.)

use std::collections::BTreeSet;

use testkit::control_plane::cluster::{condition, summary};
use testkit::control_plane::{TestNamespace, admin_client, kubectl_stdin, ok, wait_for};

use crate::cluster_on_node::events;
use crate::rig::{POD_TIMEOUT, ensure_operator, manifest, pod_nodes};

const NAME: &str = "spread";

#[tokio::test]
async fn a_required_spread_puts_one_pod_per_node_and_says_why_the_extra_one_is_pending() {
    ensure_operator().await;
    let client = admin_client().await;
    let namespace = TestNamespace::create(&client, "node-spread").await;
    let ns = namespace.name.as_str();
    let yaml = format!("{}  spread:\n    nodes: Required\n", manifest(NAME, 4));
    ok("kubectl apply", kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &yaml));
    let api: kube::Api<warren::api::RabbitCluster> = kube::Api::namespaced(client.clone(), ns);
    // The scheduler places the pods one by one (their volumes bind on the way): wait for three
    // placed and the condition naming the one left.
    let (message, placed) =
        wait_for("three pods placed and AllReplicasReady naming the fourth", POD_TIMEOUT, || async {
            let cluster = api.get(NAME).await.map_err(|e| e.to_string())?;
            let placed = pod_nodes(&client, ns, NAME).await;
            let scheduled = placed.iter().filter(|(_, node)| node.is_some()).count();
            match condition(&cluster, "AllReplicasReady") {
                Some(c) if c.reason == "PodsUnschedulable" && scheduled == 3 && !c.message.contains("0/3 nodes") => {
                    Err(format!("{} (before the fourth pod was tried on every node)", c.message))
                }
                Some(c) if c.reason == "PodsUnschedulable" && scheduled == 3 => Ok((c.message.clone(), placed)),
                _ => Err(format!("{}; placed: {placed:?}", summary(&cluster))),
            }
        })
        .await;
    eprintln!("AllReplicasReady: {message}");
    eprintln!("placed: {placed:?}");
    let nodes: BTreeSet<_> = placed.iter().filter_map(|(_, node)| node.clone()).collect();
    assert_eq!(nodes.len(), 3, "three pods on three nodes: {placed:?}");
    let pending: Vec<_> = placed.iter().filter(|(_, node)| node.is_none()).map(|(pod, _)| pod.clone()).collect();
    assert_eq!(pending.len(), 1, "{placed:?}");
    assert!(message.contains(&format!("{} cannot be scheduled", pending[0])), "{message}");
    assert!(message.contains("0/3 nodes are available"), "the scheduler's reason: {message}");
    assert!(message.contains("anti-affinity"), "the scheduler's reason: {message}");
    let warned = events(ns, "PodUnschedulable");
    assert!(warned.iter().any(|note| note.contains(&format!("{} cannot be scheduled", pending[0]))), "{warned:?}");
}
