//! The operator's scale-down procedure driven on harness nodes: the same observe, decide and
//! execute as controller::scale, with the harness as the StatefulSet (pods and their readiness,
//! the last pod removed) and as `kubectl exec`.

use std::time::{Duration, Instant};

use warren::rabbitmq::management::ManagementClient;
use warren::rabbitmq::scale_down::{self, ClusterView, PodState, Step, WaitReason};

use super::rabbit_nodes::NodeCluster;

fn broker(nodes: &NodeCluster) -> ManagementClient {
    ManagementClient::new(&nodes.management_url(0), &nodes.credentials.username, &nodes.credentials.password)
        .expect("management client")
}

/// One pass: observe, decide, and carry the step out (`Remove` by removing the last node).
pub async fn pass(nodes: &mut NodeCluster, broker: &ManagementClient, desired: i32) -> Step {
    let mut view = ClusterView {
        stateful_set: nodes.cluster.stateful_set_name(),
        desired,
        current: nodes.nodes.len() as i32,
        pause_minority: nodes.cluster.partition_handling == warren::api::PartitionHandling::PauseMinority,
        ..ClusterView::default()
    };
    for node in &nodes.nodes {
        view.pods.insert(node.index as i32, PodState { ready: node.ready().await, terminating: false });
    }
    let step = match scale_down::observe(broker, &*nodes, &mut view).await {
        Ok(()) => scale_down::decide(&view),
        // The harness looks again, as the operator retries a pass whose observation failed.
        Err(error) => {
            return Step::Wait { reason: WaitReason::ClusterNotWhole, message: error.to_string(), sync: Vec::new() };
        }
    };
    match &step {
        Step::Steady | Step::Refuse { .. } => {}
        Step::Remove { .. } => nodes.remove_last(Duration::from_secs(300)).await,
        _ => {
            if let Err(error) = scale_down::execute(&step, broker, &*nodes).await {
                eprintln!("[{}] {step:?} failed, retried: {error}", nodes.generation());
            }
        }
    }
    step
}

/// Runs passes until the cluster is steady at `desired` nodes; every step taken, in order (a step
/// repeated is kept once), or the refusal's message. Each pass starts from nothing but what the
/// world reports, as an operator restarted at any point would.
pub async fn scale_down(nodes: &mut NodeCluster, desired: i32, limit: Duration) -> Result<Vec<Step>, String> {
    let broker = broker(nodes);
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    loop {
        let step = pass(nodes, &broker, desired).await;
        if steps.last() != Some(&step) {
            eprintln!("[{}] scale-down at {:.1} s: {step:?}", nodes.generation(), started.elapsed().as_secs_f64());
            steps.push(step.clone());
        }
        match &step {
            Step::Steady => return Ok(steps),
            Step::Refuse { message } => return Err(message.clone()),
            Step::Remove { .. } => {}
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
        assert!(started.elapsed() < limit, "scale-down to {desired} stuck at {step:?}; steps: {steps:#?}");
    }
}

/// A scale-down to `desired` called off right after its first hand-over: the passes that follow
/// ask for the current size again. Returns the steps of both.
pub async fn scale_down_called_off(nodes: &mut NodeCluster, desired: i32) -> Vec<Step> {
    let current = nodes.nodes.len() as i32;
    let broker = broker(nodes);
    let first = pass(nodes, &broker, desired).await;
    assert!(matches!(first, Step::HandOver { .. }), "{first:?}");
    let mut steps = vec![first];
    steps.extend(scale_down(nodes, current, Duration::from_secs(300)).await.expect("called off"));
    steps
}
