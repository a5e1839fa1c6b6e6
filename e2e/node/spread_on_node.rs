//! `spec.spread.nodes: Required` on this one-node cluster: the first pod runs, the second finds no
//! node of its own and stays Pending, and the RabbitCluster says so in the scheduler's words (the
//! AllReplicasReady condition and a Warning Event), instead of a bare "1/2 pods ready".

use testkit::control_plane::cluster::{condition, summary};
use testkit::control_plane::{TestNamespace, admin_client, kubectl_stdin, ok, wait_for};

use crate::cluster_on_node::events;
use crate::rig::{POD_TIMEOUT, ensure_operator, manifest};

const NAME: &str = "spread";

#[tokio::test]
async fn a_required_spread_on_too_few_nodes_leaves_a_pod_pending_and_says_why() {
    ensure_operator().await;
    let client = admin_client().await;
    let namespace = TestNamespace::create(&client, "node-spread").await;
    let ns = namespace.name.as_str();
    let yaml = format!("{}  spread:\n    nodes: Required\n", manifest(NAME, 2));
    ok("kubectl apply", kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &yaml));
    let api: kube::Api<warren::api::RabbitCluster> = kube::Api::namespaced(client.clone(), ns);
    let message = wait_for("AllReplicasReady naming the pod the scheduler cannot place", POD_TIMEOUT, || async {
        let cluster = api.get(NAME).await.map_err(|e| e.to_string())?;
        match condition(&cluster, "AllReplicasReady") {
            Some(c) if c.reason == "PodsUnschedulable" => Ok(c.message.clone()),
            _ => Err(summary(&cluster)),
        }
    })
    .await;
    eprintln!("AllReplicasReady: {message}");
    assert!(message.contains(&format!("{NAME}-1 cannot be scheduled")), "{message}");
    assert!(message.contains("anti-affinity"), "the scheduler's reason: {message}");
    let warned = events(ns, "PodUnschedulable");
    assert!(warned.iter().any(|note| note.contains(&format!("{NAME}-1 cannot be scheduled"))), "{warned:?}");
}
