//! A machine lost under load, then back: the node that runs the queue's leader is powered off
//! (`e2e/node.sh power-off`: its link cut, then its kubelet, containerd and every container killed
//! at once, no preStop). The two other pods keep serving (a quorum of 3), no confirmed message is
//! lost, and the RabbitCluster says which member is missing and on which node. Powered on again,
//! the pod comes back on its volume and rejoins. A Celery app runs through it: the worker on a
//! machine left runs tasks sent after the fault before the machine is back, and every task the
//! broker confirmed runs. Then a machine declared gone, with the opt-in:
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

use crate::celery_on_node::CeleryApp;
use crate::rig::{Endpoint, POD_TIMEOUT, pod_addresses, pod_nodes, wait_ready};
use testkit::amqp;
use testkit::control_plane::cluster::{condition, summary};
use testkit::control_plane::{e2e_dir, kubectl, ok, repo, wait_for};
use warren::kubectl::status::pod_of;

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

/// A RabbitMQ pod that a Celery worker running on another machine consumes from (the consumers of
/// queue `celery` in the management API, by the worker's address), and that worker. When every
/// worker consumes from the pod on its own machine, one worker's connection is closed (as an
/// administrator does): it reconnects to the next broker of its failover list by itself.
async fn broker_of_a_worker_elsewhere(
    client: &Client,
    ns: &str,
    name: &str,
    endpoint: &Endpoint,
    celery: &CeleryApp,
) -> (String, String) {
    wait_for("a Celery worker consuming from a RabbitMQ pod on another machine", POD_TIMEOUT, || async {
        let workers = celery.workers();
        let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
        let consumers = endpoint.get("consumers/%2F").await?;
        let mut consuming = Vec::new();
        for consumer in consumers.as_array().into_iter().flatten().filter(|c| c["queue"]["name"] == "celery") {
            let details = &consumer["channel_details"];
            let (Some(peer), Some(node)) = (details["peer_host"].as_str(), details["node"].as_str()) else { continue };
            let Some((pod, _, machine)) = workers.iter().find(|(_, address, _)| address == peer) else { continue };
            let broker = pod_of(node).to_string();
            let broker_machine = placed.get(&broker).cloned().flatten();
            if broker_machine.as_deref().is_some_and(|m| m != machine) {
                return Ok((broker, pod.clone()));
            }
            consuming.push((pod.clone(), broker, details["connection_name"].as_str().unwrap_or_default().to_string()));
        }
        let said = format!("workers {workers:?} consume from {consuming:?}");
        if workers.len() == 2 && consuming.len() == 2 {
            // Each worker consumes from its own machine's pod: the first moves to another.
            endpoint.close_connection(&consuming[0].2).await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Err(said)
    })
    .await
}

pub async fn loses_the_leaders_machine_and_gets_it_back(
    client: &Client,
    ns: &str,
    name: &str,
    endpoint: &Endpoint,
    celery: &mut CeleryApp,
) {
    // The machine to lose: one whose RabbitMQ pod a Celery worker on another machine consumes from,
    // and the queue's leader put there (declared through that pod: leader client-local).
    let (broker, worker) = broker_of_a_worker_elsewhere(client, ns, name, endpoint, celery).await;
    let addresses = pod_addresses(client, ns, name).await;
    let at_broker = endpoint.at(addresses.get(&broker).unwrap_or_else(|| panic!("{broker} has no address")));
    at_broker.declare_queue_with(QUEUE, serde_json::json!({"x-queue-leader-locator": "client-local"})).await;
    endpoint.wait_copies(QUEUE, 3).await;
    let queue = endpoint.get(&format!("queues/%2F/{QUEUE}")).await.expect("the queue");
    let leader = queue["leader"].as_str().or(queue["node"].as_str()).expect("the queue's leader").to_string();
    let leader_pod = pod_of(&leader);
    assert_eq!(leader_pod, broker, "{QUEUE} declared through {broker} has its leader elsewhere: {queue}");
    let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    let lost = placed.get(leader_pod).cloned().flatten().unwrap_or_else(|| panic!("{leader_pod} is not scheduled"));

    let confirmed = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let publishing =
        tokio::spawn(amqp::publish_timed_until(vec![endpoint.amqp()], QUEUE, 20, confirmed.clone(), stop.clone()));
    celery.start_sending(endpoint);
    wait_for("the publisher's and the web process's first confirms", Duration::from_secs(60), || async {
        let (messages, tasks) = (confirmed.lock().await.len(), celery.sent().len());
        if messages >= 100 && tasks > 0 { Ok(()) } else { Err(format!("{messages} messages, {tasks} tasks")) }
    })
    .await;
    let workers_before = format!("{}; {worker} consumes from {broker}", celery.placement());

    let fault = Instant::now();
    let fault_at = std::time::SystemTime::now();
    let mut powered_off = PoweredOff::new(&lost);
    let sent_before_fault = celery.sent().last().copied().expect("a task sent");
    eprintln!(
        "powered off {lost}, which runs {leader_pod}, the leader of {QUEUE}; celery workers were: {workers_before}"
    );
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
    // The worker left on a running machine, whose broker was on the lost one, finds another broker
    // by itself: a task sent after the fault runs before the machine is back.
    let (task, ran_at) = celery.wait_a_task_ran_from(sent_before_fault + 1).await;
    eprintln!(
        "celery: task {task}, sent after the power-off, ran {:.1} s after it, the machine still off ({worker} had \
         consumed from {broker}); workers: {}",
        ran_at.duration_since(fault_at).unwrap_or_default().as_secs_f64(),
        celery.placement()
    );

    powered_off.power_on();
    wait_ready(client, ns, name, 3).await;
    endpoint.wait_copies(QUEUE, 3).await;
    let whole = fault.elapsed();
    let back: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    assert_eq!(back.get(leader_pod), Some(&Some(lost.clone())), "{leader_pod} back on its machine (its volume)");

    stop.store(true, Ordering::Relaxed);
    let published = publishing.await.expect("publisher task");
    let tasks = celery.stop_sending();
    let (twice, ran) = celery.wait_every_task_ran(&tasks).await;
    eprintln!(
        "celery through the machine loss: {} tasks confirmed, every one run ({ran} runs; {twice} run twice or more); \
         workers now: {}",
        tasks.len(),
        celery.placement()
    );
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

/// How a person says a machine is gone.
#[derive(Clone, Copy, Debug)]
enum Declare {
    /// The `node.kubernetes.io/out-of-service` taint of Kubernetes' non-graceful node shutdown.
    OutOfService,
    /// `kubectl delete node`: the Node object removed (its kubelet registers it again if it ever
    /// comes back).
    DeleteNode,
}

/// Members on machines declared gone, with `spec.replaceLostMembers: true`. First the machine of
/// pod 0: while the node is only unreachable nothing is replaced (it may come back with its data).
/// Declared gone with the out-of-service taint, each member on it is replaced: its claim and pod
/// deleted by the operator (an Event for each), made anew on a running node, joined, its queue
/// members grown back; every message is there. Then the machine comes back and the taint is lifted.
/// Then another machine running one member is lost and its Node object deleted: the same
/// replacement. Both machines are back at the end, for the tests after.
#[tokio::test]
async fn a_member_on_a_machine_declared_gone_is_replaced() {
    crate::rig::phase("lost: formation");
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
    endpoint.declare_queue(KEPT).await;
    endpoint.wait_copies(KEPT, replicas).await;

    let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    let lost = placed.get(&format!("{name}-0")).cloned().flatten().expect("pod 0 scheduled");
    crate::rig::phase("lost: a machine tainted out-of-service");
    replaces_the_members_of_a_lost_machine(client, ns, name, endpoint, &lost, Declare::OutOfService, 0..300).await;

    // Now a machine that runs one member (pod 0's replacement shares a machine with another).
    let placed = pod_nodes(client, ns, name).await;
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (pod, node) in placed {
        members.entry(node.unwrap_or_else(|| panic!("{pod} not scheduled"))).or_default().push(pod);
    }
    let (lost, _) = members.iter().find(|(_, pods)| pods.len() == 1).expect("a machine running one member");
    crate::rig::phase("lost: a machine's Node deleted");
    replaces_the_members_of_a_lost_machine(client, ns, name, endpoint, lost, Declare::DeleteNode, 300..600).await;
    crate::rig::phase("lost: done");
}

const KEPT: &str = "e2e-replace";

async fn replaces_the_members_of_a_lost_machine(
    client: &Client,
    ns: &str,
    name: &str,
    endpoint: &Endpoint,
    lost: &str,
    declare: Declare,
    ids: std::ops::Range<u32>,
) {
    let replicas = 3;
    let (confirmed, error) = amqp::publish(&endpoint.amqp(), KEPT, ids.clone(), 50).await;
    assert_eq!((confirmed.len(), error), (ids.len(), None));
    let placed: BTreeMap<String, Option<String>> = pod_nodes(client, ns, name).await.into_iter().collect();
    let stranded: Vec<String> =
        placed.iter().filter(|(_, n)| n.as_deref() == Some(lost)).map(|(p, _)| p.clone()).collect();
    let uids_before: BTreeMap<String, String> =
        crate::rig::pods(client, ns, name).await.into_iter().map(|(pod, uid, _)| (pod, uid)).collect();
    let replaced_before = events(ns, "LostMemberReplaced").len();
    let fault = Instant::now();
    let mut powered_off = PoweredOff::new(lost);
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
    if matches!(declare, Declare::OutOfService) {
        // Unreachable is not gone: opted in or not, nothing is replaced yet.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let uids_now: BTreeMap<String, String> =
            crate::rig::pods(client, ns, name).await.into_iter().map(|(pod, uid, _)| (pod, uid)).collect();
        for pod in &stranded {
            assert_eq!(uids_now.get(pod), uids_before.get(pod), "{pod} replaced while its node was only unreachable");
        }
        assert!(events(ns, "LostMemberReplaced").is_empty(), "a member replaced before its node was declared gone");
    }

    let declared = Instant::now();
    let (how, said) = match declare {
        Declare::OutOfService => {
            ok(
                "kubectl taint",
                kubectl(&["taint", "node", lost, "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"]),
            );
            ("tainted out-of-service", "tainted node.kubernetes.io/out-of-service")
        }
        Declare::DeleteNode => {
            ok("kubectl delete node", kubectl(&["delete", "node", lost]));
            ("its Node deleted", "deleted from the cluster")
        }
    };
    wait_for("the stranded members back on running nodes", POD_TIMEOUT, || async {
        let now = pod_nodes(client, ns, name).await;
        let misplaced: Vec<_> =
            now.iter().filter(|(p, n)| stranded.contains(p) && n.is_some() && n.as_deref() != Some(lost)).collect();
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
    assert!(notes.len() > replaced_before, "no new LostMemberReplaced Event: {notes:?}");
    for pod in &stranded {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("{pod} was on node {lost}, {said}"))),
            "no Event for {pod} saying its node was {said}: {notes:?}"
        );
    }
    eprintln!(
        "member(s) {stranded:?} of lost node {lost} ({how}) replaced: the cluster whole again {:.1} s after the \
         power-off, {:.1} s after the node was declared gone; {}",
        whole.as_secs_f64(),
        declared.elapsed().as_secs_f64(),
        notes
            .iter()
            .find(|n| stranded.iter().any(|p| n.starts_with(&format!("{p} was on node {lost}"))))
            .map(String::as_str)
            .unwrap_or_default()
    );
    let seen = amqp::drain(&endpoint.amqp(), KEPT, usize::MAX, Duration::from_secs(5)).await.expect("consume");
    let missing: Vec<_> = ids.clone().filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "{} confirmed messages lost: {missing:?}", missing.len());

    powered_off.power_on();
    if matches!(declare, Declare::OutOfService) {
        ok("kubectl taint", kubectl(&["taint", "node", lost, "node.kubernetes.io/out-of-service-"]));
    }
    // A deleted Node is registered again by its kubelet.
    wait_for(&format!("node {lost} Ready"), POD_TIMEOUT, || async {
        let out = kubectl(&["get", "node", lost, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]);
        let ready = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if ready == "True" { Ok(()) } else { Err(ready + &String::from_utf8_lossy(&out.stderr)) }
    })
    .await;
}
