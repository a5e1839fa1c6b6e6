//! A machine lost under load, then back: the node that runs the queue's leader is powered off
//! (`e2e/node.sh power-off`: its link cut, then its kubelet, containerd and every container killed
//! at once, no preStop). The two other pods keep serving (a quorum of 3), no confirmed message is
//! lost, and the RabbitCluster says which member is missing and on which node. Powered on again,
//! the pod comes back on its volume and rejoins. Printed: the longest time the publisher went
//! without a confirm, and the time from the fault to the cluster whole again.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::{Api, Client};
use tokio::sync::Mutex;
use warren::api::RabbitCluster;

use crate::rig::{Endpoint, POD_TIMEOUT, pod_nodes, wait_ready};
use testkit::amqp;
use testkit::control_plane::cluster::{condition, summary};
use testkit::control_plane::{e2e_dir, repo, wait_for};

const QUEUE: &str = "e2e-loss";

/// `e2e/node.sh ACTION` on node `node` (named `<cluster>-<N>`) of the cluster under test.
fn machine(action: &str, node: &str) {
    let index = node.rsplit('-').next().expect("a node named <cluster>-<N>");
    let dir = e2e_dir();
    let output = Command::new(format!("{}/e2e/node.sh", repo()))
        .args([action, &dir.to_string_lossy(), index])
        .output()
        .expect("e2e/node.sh");
    let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "e2e/node.sh {action} {node}: {said}");
}

pub async fn loses_the_leaders_machine_and_gets_it_back(client: &Client, ns: &str, name: &str, endpoint: &Endpoint) {
    endpoint.declare_queue(QUEUE).await;
    endpoint.wait_copies(QUEUE, 3).await;
    let queue = endpoint.get(&format!("queues/%2F/{QUEUE}")).await.expect("the queue");
    let leader = queue["leader"].as_str().or(queue["node"].as_str()).expect("the queue's leader").to_string();
    let leader_pod = leader.split_once('@').map(|(_, host)| host.split('.').next().unwrap_or(host)).expect("node name");
    let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    let lost = placed.get(leader_pod).cloned().flatten().unwrap_or_else(|| panic!("{leader_pod} is not scheduled"));

    let confirmed = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let publishing =
        tokio::spawn(amqp::publish_timed_until(vec![endpoint.amqp()], QUEUE, 20, confirmed.clone(), stop.clone()));
    wait_for("the publisher's first confirms", Duration::from_secs(60), || async {
        if confirmed.lock().await.len() >= 100 { Ok(()) } else { Err("fewer than 100".to_string()) }
    })
    .await;

    let fault = Instant::now();
    machine("power-off", &lost);
    eprintln!("powered off {lost}, which runs {leader_pod}, the leader of {QUEUE}");
    let before = confirmed.lock().await.len();
    wait_for("confirms from the two machines left", POD_TIMEOUT, || async {
        let now = confirmed.lock().await.len();
        if now >= before + 200 { Ok(()) } else { Err(format!("{} confirmed since the fault", now - before)) }
    })
    .await;
    eprintln!("serving again {:.1} s after the fault", fault.elapsed().as_secs_f64());
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), ns);
    let said = wait_for("ClusterFormed naming the missing member and its node", POD_TIMEOUT, || async {
        let cluster = api.get(name).await.map_err(|e| e.to_string())?;
        match condition(&cluster, "ClusterFormed") {
            Some(c) if c.reason == "MembersMissing" => Ok(c.message.clone()),
            _ => Err(summary(&cluster)),
        }
    })
    .await;
    eprintln!("ClusterFormed: {said}");
    assert!(said.contains(&leader), "names the member: {said}");
    assert!(said.contains(&format!("pod {leader_pod} on node {lost}")), "names its pod and node: {said}");

    machine("power-on", &lost);
    wait_ready(client, ns, name, 3).await;
    endpoint.wait_copies(QUEUE, 3).await;
    let whole = fault.elapsed();
    let back: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    assert_eq!(back.get(leader_pod), Some(&Some(lost.clone())), "{leader_pod} back on its machine (its volume)");

    stop.store(true, Ordering::Relaxed);
    let published = publishing.await.expect("publisher task");
    let confirmed = confirmed.lock().await.clone();
    let seen = amqp::drain(&endpoint.amqp(), QUEUE, usize::MAX, Duration::from_secs(5)).await.expect("consume");
    let lost_messages: Vec<_> = confirmed.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(lost_messages.is_empty(), "{} confirmed messages lost: {lost_messages:?}", lost_messages.len());
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "machine loss under load: {} confirmed, 0 lost, {duplicates} delivered twice or more; longest time without a \
         confirm {:.1} s (the publisher moved {} time(s)); power-off to the cluster whole again {:.1} s",
        confirmed.len(),
        published.longest_silence.as_secs_f64(),
        published.moves,
        whole.as_secs_f64()
    );
}
