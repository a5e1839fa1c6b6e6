//! A machine lost under load, then back: the node that runs the queue's leader is powered off
//! (`e2e/node.sh power-off`: its link cut, then its kubelet, containerd and every container killed
//! at once, no preStop). The two other pods keep serving (a quorum of 3), no confirmed message is
//! lost, and the RabbitCluster says which member is missing and on which node. Powered on again,
//! the pod comes back on its volume and rejoins. Then a machine declared gone, with the opt-in:
//! its members replaced on the machines left. Printed: the longest time the publisher went
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
use testkit::control_plane::{e2e_dir, kubectl, ok, repo, wait_for};

use crate::cluster_on_node::events;

const QUEUE: &str = "e2e-loss";

/// A machine powered off for the length of a scenario: powered on again when dropped, also when
/// the scenario fails, so that the tests after it find three nodes.
struct PoweredOff {
    node: String,
    on: bool,
}

impl PoweredOff {
    fn new(node: &str) -> Self {
        machine("power-off", node);
        Self { node: node.to_string(), on: false }
    }

    fn power_on(&mut self) {
        machine("power-on", &self.node);
        self.on = true;
    }
}

impl Drop for PoweredOff {
    fn drop(&mut self) {
        if !self.on {
            let _ = run_node_script("power-on", &self.node);
            let _ =
                testkit::control_plane::kubectl(&["taint", "node", &self.node, "node.kubernetes.io/out-of-service-"]);
        }
    }
}

fn run_node_script(action: &str, node: &str) -> std::process::Output {
    let index = node.rsplit('-').next().expect("a node named <cluster>-<N>");
    let dir = e2e_dir();
    Command::new(format!("{}/e2e/node.sh", repo()))
        .args([action, &dir.to_string_lossy(), index])
        .output()
        .expect("e2e/node.sh")
}

/// `e2e/node.sh ACTION` on node `node` (named `<cluster>-<N>`) of the cluster under test.
fn machine(action: &str, node: &str) {
    let output = run_node_script(action, node);
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
    let mut powered_off = PoweredOff::new(&lost);
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

    powered_off.power_on();
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

/// The machine of pod 0 lost, with `spec.replaceLostMembers: true`. While the node is only
/// unreachable nothing is replaced (it may come back with its data). Declared gone with the
/// out-of-service taint, each member on it is replaced: its claim and pod deleted by the operator
/// (an Event for each), made anew on a running node, joined, its queue members grown back; every
/// message is there. Then the machine comes back and the taint is lifted, for the tests after.
#[tokio::test]
async fn a_member_on_a_machine_declared_gone_is_replaced() {
    crate::rig::ensure_operator().await;
    let client = &testkit::control_plane::admin_client().await;
    let namespace = testkit::control_plane::TestNamespace::create(client, "node-lost").await;
    let (ns, name, replicas) = (namespace.name.as_str(), "lost", 3);
    testkit::control_plane::cluster::apply(
        ns,
        &format!("{}  replaceLostMembers: true\n", crate::rig::manifest(name, replicas as i32)),
    );
    wait_ready(client, ns, name, replicas).await;
    let endpoint = &Endpoint::of(client, ns, name).await;
    const KEPT: &str = "e2e-replace";
    endpoint.declare_queue(KEPT).await;
    endpoint.wait_copies(KEPT, replicas).await;
    let (confirmed, error) = amqp::publish(&endpoint.amqp(), KEPT, 0..300, 50).await;
    assert_eq!((confirmed.len(), error), (300, None));

    let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    let lost = placed.get(&format!("{name}-0")).cloned().flatten().expect("pod 0 scheduled");
    let stranded: Vec<String> =
        placed.iter().filter(|(_, n)| n.as_deref() == Some(&lost)).map(|(p, _)| p.clone()).collect();
    let uids_before: BTreeMap<String, String> =
        crate::rig::pods(client, ns, name).await.into_iter().map(|(pod, uid, _)| (pod, uid)).collect();
    let fault = Instant::now();
    let mut powered_off = PoweredOff::new(&lost);
    eprintln!("powered off {lost}, which runs {stranded:?}");
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), ns);
    wait_for("ClusterFormed naming the missing members", POD_TIMEOUT, || async {
        let cluster = api.get(name).await.map_err(|e| e.to_string())?;
        match condition(&cluster, "ClusterFormed") {
            Some(c) if c.reason == "MembersMissing" && c.message.contains(&format!("on node {lost}")) => Ok(()),
            _ => Err(summary(&cluster)),
        }
    })
    .await;
    // Unreachable is not gone: opted in or not, nothing is replaced yet.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let uids_now: BTreeMap<String, String> =
        crate::rig::pods(client, ns, name).await.into_iter().map(|(pod, uid, _)| (pod, uid)).collect();
    for pod in &stranded {
        assert_eq!(uids_now.get(pod), uids_before.get(pod), "{pod} replaced while its node was only unreachable");
    }
    assert!(events(ns, "LostMemberReplaced").is_empty(), "a member replaced before its node was declared gone");

    let declared = Instant::now();
    ok("kubectl taint", kubectl(&["taint", "node", &lost, "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"]));
    wait_for("the stranded members back on running nodes", POD_TIMEOUT, || async {
        let now = pod_nodes(client, ns, name).await;
        let misplaced: Vec<_> =
            now.iter().filter(|(p, n)| stranded.contains(p) && n.as_deref() != Some(&*lost)).collect();
        let uids: BTreeMap<String, String> =
            crate::rig::pods(client, ns, name).await.into_iter().map(|(pod, uid, _)| (pod, uid)).collect();
        let renewed = stranded.iter().all(|p| uids.get(p).is_some_and(|u| Some(u) != uids_before.get(p)));
        if misplaced.len() == stranded.len() && renewed { Ok(()) } else { Err(format!("{now:?}")) }
    })
    .await;
    wait_ready(client, ns, name, replicas).await;
    endpoint.wait_copies(KEPT, replicas).await;
    let whole = fault.elapsed();
    let notes = events(ns, "LostMemberReplaced");
    for pod in &stranded {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("{pod} was on node {lost}"))),
            "no Event for {pod}: {notes:?}"
        );
    }
    eprintln!(
        "member(s) {stranded:?} of lost node {lost} replaced: the cluster whole again {:.1} s after the power-off, \
         {:.1} s after the node was declared gone; {}",
        whole.as_secs_f64(),
        declared.elapsed().as_secs_f64(),
        notes.first().map(String::as_str).unwrap_or_default()
    );
    let seen = amqp::drain(&endpoint.amqp(), KEPT, usize::MAX, Duration::from_secs(5)).await.expect("consume");
    let missing: Vec<_> = (0..300).filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "{} confirmed messages lost: {missing:?}", missing.len());

    powered_off.power_on();
    ok("kubectl taint", kubectl(&["taint", "node", &lost, "node.kubernetes.io/out-of-service-"]));
    wait_for(&format!("node {lost} Ready"), POD_TIMEOUT, || async {
        let out = kubectl(&["get", "node", &lost, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]);
        let ready = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if ready == "True" { Ok(()) } else { Err(ready) }
    })
    .await;
}
