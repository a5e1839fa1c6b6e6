//! One RabbitCluster through a user's day on a real node: it forms, serves through its client
//! Service, survives losing a pod and losing every pod, grows, shrinks (with the operator killed
//! half-way) and grows again, and when deleted takes its pods and Services but leaves the data.
//! Holding messages, its three nodes are drained in turn and the queue leader's machine is lost,
//! under load and under a Celery app (drain_on_node, machine_loss_on_node, celery_on_node); after
//! the day-two faults it is watched: Prometheus and `kubectl warren`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};

use crate::celery_on_node::CeleryApp;
use crate::day_two;
use crate::drain_on_node;
use crate::machine_loss_on_node;
use crate::observability;
use crate::rig::{
    Endpoint, POD_TIMEOUT, default_is_quorum, delete, ensure_operator, manifest, phase, pod_nodes, pods, wait_ready,
};
use testkit::amqp;
use testkit::control_plane::cluster::{apply, condition, patch};
use testkit::control_plane::{TestNamespace, admin_client, kubectl, wait_for};

const NAME: &str = "ha";
const KEPT: &str = "e2e-kept";
const KEPT_COUNT: u32 = 500;

pub(crate) async fn volumes(client: &Client, namespace: &str) -> BTreeMap<String, String> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .expect("list PVCs")
        .items
        .into_iter()
        .map(|c| (c.metadata.name.unwrap_or_default(), c.spec.and_then(|s| s.volume_name).unwrap_or_default()))
        .collect()
}

/// The pods whose nodes the cluster lists (running or not), sorted.
async fn listed_nodes(endpoint: &Endpoint) -> Vec<String> {
    let nodes = endpoint.get("nodes").await.unwrap_or_default();
    let mut listed: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["name"].as_str())
        .filter_map(|n| n.trim_start_matches("rabbit@").split('.').next().map(str::to_string))
        .collect();
    listed.sort();
    listed
}

/// The notes of the Events of `reason` in `namespace`.
pub(crate) fn events(namespace: &str, reason: &str) -> Vec<String> {
    let out = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        namespace,
        "--field-selector",
        &format!("reason={reason}"),
        "-o",
        "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
    ]);
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// SIGKILL for the pod of the operator that leads (a node lost under it): the standby replica
/// takes the Lease over once it lapses, and the Deployment starts another standby.
async fn kill_operator(client: &Client) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "warren-system");
    let lease = leases.get("warren").await.expect("the operator's Lease");
    let leader = lease.spec.and_then(|s| s.holder_identity).expect("a Lease holder");
    delete(&["pod", "-n", "warren-system", &leader, "--grace-period=0", "--force", "--wait=false"]);
    leader
}

/// Waits until every pod of the cluster is ready and none of them is one of `old` (by uid). Shortly
/// before giving up, prints what the pods that are not ready say (their Events and log tail).
pub(crate) async fn wait_replaced(client: &Client, namespace: &str, old: &[String], count: usize) {
    let started = std::time::Instant::now();
    let explained = std::sync::atomic::AtomicBool::new(false);
    wait_for(&format!("{count} ready pods, none of the deleted ones"), POD_TIMEOUT, || async {
        let now = pods(client, namespace, NAME).await;
        let fresh = now.iter().all(|(_, uid, _)| !old.contains(uid));
        let ready = now.iter().filter(|(_, _, ready)| *ready).count();
        if fresh && ready == count {
            return Ok(());
        }
        let late = started.elapsed() + Duration::from_secs(10) > POD_TIMEOUT;
        if late && !explained.swap(true, std::sync::atomic::Ordering::Relaxed) {
            for (pod, _, _) in now.iter().filter(|(_, _, ready)| !ready) {
                let describe = kubectl(&["describe", "pod", pod, "-n", namespace]);
                let logs = kubectl(&["logs", pod, "-n", namespace, "--tail=80"]);
                eprintln!(
                    "{pod} is not ready:\n{}\n--- its log ---\n{}",
                    String::from_utf8_lossy(&describe.stdout),
                    String::from_utf8_lossy(&logs.stdout)
                );
            }
        }
        Err(format!("{now:?}"))
    })
    .await;
}

/// What HA looks like on the broker: quorum as vhost /'s default queue type and no policy (4.x), or
/// the ha-all policy with automatic sync (3.x).
async fn high_availability_applied(endpoint: &Endpoint) -> Result<(), String> {
    let policies = endpoint.get("policies/%2F").await?;
    if default_is_quorum() {
        let vhost = endpoint.get("vhosts/%2F").await?;
        return match (&vhost["default_queue_type"], policies.as_array().map(Vec::len)) {
            (queue_type, Some(0)) if queue_type == "quorum" => Ok(()),
            _ => Err(format!("vhost /: {vhost}; policies: {policies}")),
        };
    }
    let found = policies.as_array().into_iter().flatten().find(|p| p["name"] == "ha-all").cloned();
    match found {
        Some(p) if p["definition"]["ha-mode"] == "all" && p["definition"]["ha-sync-mode"] == "automatic" => Ok(()),
        other => Err(format!("ha-all policy: {other:?}")),
    }
}

#[tokio::test]
async fn a_rabbit_cluster_runs_heals_grows_and_keeps_its_data_on_a_real_node() {
    phase("ha: the operator");
    ensure_operator().await;
    let client = admin_client().await;
    let namespace = TestNamespace::create(&client, "node-ha").await;
    let ns = namespace.name.clone();
    phase("ha: formation");
    let (mut endpoint, claims) = forms_one_cluster_with_high_availability(&client, &ns).await;
    phase("ha: every pod deleted");
    every_pod_deleted_at_once_reforms_the_cluster(&client, &ns, &endpoint, &claims).await;
    // A Celery app runs through the drains and the machine loss: two workers on the failover URIs.
    let mut celery = CeleryApp::deploy(&ns, NAME);
    // Each pod evicted by a drain comes back on its own volume.
    phase("ha: drains");
    drain_on_node::drains_every_node_in_turn_under_load(&client, &ns, NAME, &endpoint, &mut celery).await;
    assert_eq!(volumes(&client, &ns).await, claims, "the same volumes after the drains");
    phase("ha: machine loss");
    machine_loss_on_node::loses_the_leaders_machine_and_gets_it_back(&client, &ns, NAME, &endpoint, &mut celery).await;
    drop(celery);
    endpoint.wait_depth(KEPT, KEPT_COUNT as u64).await;
    // What people do to a running cluster (issue: day-2 safety), on this formed cluster.
    phase("ha: day two");
    day_two::survives_what_people_do(&client, &ns, NAME, &mut endpoint, KEPT, KEPT_COUNT as u64).await;
    // What the team watches it with, on the cluster these faults left (the same three pods and
    // kept messages): Prometheus and `kubectl warren`. Late in the test on purpose: `make test`
    // builds Prometheus beside the first node tests, and by now it has long been running.
    let names = ["ha-0", "ha-1", "ha-2"];
    phase("ha: Prometheus and kubectl warren");
    observability::prometheus_sees_the_cluster(&ns, NAME, &names, KEPT, KEPT_COUNT as u64).await;
    observability::kubectl_warren_on(&client, &ns, NAME, &names, KEPT, KEPT_COUNT as u64).await;
    phase("ha: scale up, a scale-down called off");
    scales_up_and_a_scale_down_called_off_half_way(&client, &ns, &endpoint).await;
    phase("ha: scale down, the operator killed");
    scales_down_while_the_leading_operator_is_killed(&client, &ns, &endpoint).await;
    phase("ha: scale back up");
    scales_back_up_and_every_message_is_there_once(&client, &ns, &endpoint).await;
    phase("ha: deleted and applied again");
    deleted_and_applied_again_keeps_claims_credentials_and_messages(&client, &ns, &endpoint, &claims).await;
    phase("ha: done");
}

/// Three pods running RabbitMQ, one cluster, HA applied (quorum by default on 4.x), conditions
/// true; a message through the client Service; then 500 kept for the phases that follow. Returns
/// the endpoint and the claims (each bound to its volume).
async fn forms_one_cluster_with_high_availability(client: &Client, ns: &str) -> (Endpoint, BTreeMap<String, String>) {
    apply(ns, &manifest(NAME, 3));
    let cluster = wait_ready(client, ns, NAME, 3).await;
    for type_ in ["AllReplicasReady", "ClusterFormed", "HighAvailability", "NoPartitions", "ReconcileSuccess"] {
        let c = condition(&cluster, type_).unwrap_or_else(|| panic!("no {type_}"));
        assert_eq!(c.status, "True", "{type_}: {}", c.message);
    }
    let first_pods = pods(client, ns, NAME).await;
    assert_eq!(first_pods.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["ha-0", "ha-1", "ha-2"]);
    assert!(first_pods.iter().all(|p| p.2), "all ready: {first_pods:?}");
    // The default spread (preferred anti-affinity) puts the three pods on the three nodes.
    let placed = pod_nodes(client, ns, NAME).await;
    let nodes: std::collections::BTreeSet<_> = placed.iter().filter_map(|(_, node)| node.clone()).collect();
    assert_eq!(nodes.len(), 3, "one pod per node: {placed:?}");
    let endpoint = Endpoint::of(client, ns, NAME).await;
    let nodes = endpoint.get("nodes").await.expect("GET /api/nodes");
    let running: Vec<_> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["running"] == true)
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(running.len(), 3, "one cluster of the three pods: {nodes}");
    assert!(running.iter().all(|n| n.starts_with("rabbit@ha-")), "{running:?}");
    wait_for("HA on the broker", Duration::from_secs(30), || high_availability_applied(&endpoint)).await;

    // A message published through the client Service is consumed.
    endpoint.declare_queue("e2e-hello").await;
    let (confirmed, error) = amqp::publish(&endpoint.amqp(), "e2e-hello", [7], 1).await;
    assert_eq!((confirmed, error), (vec![7], None));
    let got = amqp::drain(&endpoint.amqp(), "e2e-hello", 1, Duration::from_secs(10)).await.expect("consume");
    assert_eq!(got, BTreeMap::from([(7, 1)]));
    // Messages for the restarts below: persistent, in a durable queue declared with no arguments,
    // replicated on every node (a quorum queue by the vhost's default, or mirrored by ha-all).
    endpoint.declare_queue(KEPT).await;
    endpoint.wait_copies(KEPT, 3).await;
    let (confirmed, error) = amqp::publish(&endpoint.amqp(), KEPT, 0..KEPT_COUNT, 100).await;
    assert_eq!((confirmed.len(), error), (KEPT_COUNT as usize, None));
    let claims = volumes(client, ns).await;
    assert_eq!(claims.len(), 3, "{claims:?}");
    assert!(claims.values().all(|v| !v.is_empty()), "every claim bound: {claims:?}");

    (endpoint, claims)
}

/// Every pod deleted at once: the cluster re-forms by itself.
async fn every_pod_deleted_at_once_reforms_the_cluster(
    client: &Client,
    ns: &str,
    endpoint: &Endpoint,
    claims: &BTreeMap<String, String>,
) {
    let before: Vec<String> = pods(client, ns, NAME).await.into_iter().map(|p| p.1).collect();
    delete(&["pod", "-n", ns, "-l", "app.kubernetes.io/instance=ha", "--wait=false"]);
    wait_replaced(client, ns, &before, 3).await;
    wait_ready(client, ns, NAME, 3).await;
    assert_eq!(volumes(client, ns).await, *claims, "the same volumes");
    endpoint.wait_depth(KEPT, KEPT_COUNT as u64).await;
}

/// Scale 3 to 5: two more pods join, and the queue gains a copy on each. Then a scale-down
/// called off half-way: 5 to 3, and back to 5 as soon as ha-4 is in maintenance mode (or already
/// gone); the cluster comes back to five nodes, none left in maintenance mode.
async fn scales_up_and_a_scale_down_called_off_half_way(client: &Client, ns: &str, endpoint: &Endpoint) {
    let api: Api<warren::api::RabbitCluster> = Api::namespaced(client.clone(), ns);
    patch(ns, NAME, r#"{"spec":{"replicas":5}}"#);
    wait_ready(client, ns, NAME, 5).await;
    assert_eq!(pods(client, ns, NAME).await.len(), 5);
    // The queue declared on three nodes gains a copy on each new one.
    endpoint.wait_copies(KEPT, 5).await;
    endpoint.wait_depth(KEPT, KEPT_COUNT as u64).await;

    // Scale-down called off half-way: 5 to 3, then back to 5 as soon as ha-4 is in maintenance mode
    // (or already gone). The cluster comes back to five nodes, none left in maintenance mode.
    patch(ns, NAME, r#"{"spec":{"replicas":3}}"#);
    wait_for("ha-4 handed over", POD_TIMEOUT, || async {
        let nodes = endpoint.get("nodes").await?;
        let drained = nodes.as_array().into_iter().flatten().any(|n| n["being_drained"] == true);
        if drained || listed_nodes(endpoint).await.len() < 5 { Ok(()) } else { Err(nodes.to_string()) }
    })
    .await;
    patch(ns, NAME, r#"{"spec":{"replicas":5}}"#);
    wait_ready(client, ns, NAME, 5).await;
    wait_for("five nodes, none in maintenance mode, Scaling=Steady", POD_TIMEOUT, || async {
        let nodes = endpoint.get("nodes").await?;
        let drained = nodes.as_array().into_iter().flatten().any(|n| n["being_drained"] == true);
        let cluster = api.get(NAME).await.map_err(|e| e.to_string())?;
        let steady = condition(&cluster, "Scaling").is_some_and(|c| c.reason == "Steady");
        let listed = listed_nodes(endpoint).await;
        if !drained && steady && listed.len() == 5 { Ok(()) } else { Err(format!("{listed:?} {nodes}")) }
    })
    .await;
    endpoint.wait_copies(KEPT, 5).await;
    endpoint.wait_depth(KEPT, KEPT_COUNT as u64).await;
}

/// Scale 5 to 3: ha-4 then ha-3 are handed over, removed and forgotten. The operator is killed
/// once the StatefulSet has dropped ha-4, before it can be forgotten: the next operator finishes.
async fn scales_down_while_the_leading_operator_is_killed(client: &Client, ns: &str, endpoint: &Endpoint) {
    let api: Api<warren::api::RabbitCluster> = Api::namespaced(client.clone(), ns);
    let started = std::time::Instant::now();
    patch(ns, NAME, r#"{"spec":{"replicas":3}}"#);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    wait_for("the StatefulSet drops ha-4", POD_TIMEOUT, || async {
        let replicas = sts.get(NAME).await.map_err(|e| e.to_string())?.spec.and_then(|s| s.replicas);
        if replicas <= Some(4) { Ok(()) } else { Err(format!("replicas {replicas:?}")) }
    })
    .await;
    let listed_at_kill = listed_nodes(endpoint).await;
    let leader = kill_operator(client).await;
    eprintln!(
        "operator {leader} (the leader) killed {:.1} s into the scale-down; the cluster then listed {listed_at_kill:?}",
        started.elapsed().as_secs_f64()
    );
    wait_ready(client, ns, NAME, 3).await;
    wait_for("the cluster lists exactly ha-0..2", POD_TIMEOUT, || async {
        let listed = listed_nodes(endpoint).await;
        if listed == ["ha-0", "ha-1", "ha-2"] { Ok(()) } else { Err(format!("{listed:?}")) }
    })
    .await;
    wait_for("Scaling=False (Steady)", POD_TIMEOUT, || async {
        let cluster = api.get(NAME).await.map_err(|e| e.to_string())?;
        match condition(&cluster, "Scaling") {
            Some(c) if c.status == "False" && c.reason == "Steady" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eprintln!("scale 5 -> 3 on the node: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(pods(client, ns, NAME).await.len(), 3);
    assert_eq!(sts.get(NAME).await.expect("StatefulSet").spec.and_then(|s| s.replicas), Some(3));
    endpoint.wait_copies(KEPT, 3).await;
    endpoint.wait_depth(KEPT, KEPT_COUNT as u64).await;
    let removed = events(ns, "NodeRemoved");
    for pod in ["ha-3", "ha-4"] {
        assert!(removed.iter().any(|note| note.contains(&format!("rabbit@{pod}."))), "NodeRemoved {pod}: {removed:?}");
    }
    // The removed nodes' claims went with their pods: a later scale-up cannot bring their data back.
    let left = volumes(client, ns).await;
    assert_eq!(left.keys().map(String::as_str).collect::<Vec<_>>(), ["data-ha-0", "data-ha-1", "data-ha-2"]);
}

/// Back to 5: two fresh nodes join the cluster, which lists exactly the five pods, and every
/// message is still there, each exactly once.
async fn scales_back_up_and_every_message_is_there_once(client: &Client, ns: &str, endpoint: &Endpoint) {
    patch(ns, NAME, r#"{"spec":{"replicas":5}}"#);
    wait_ready(client, ns, NAME, 5).await;
    wait_for("the cluster lists exactly ha-0..4", POD_TIMEOUT, || async {
        let listed = listed_nodes(endpoint).await;
        if listed == ["ha-0", "ha-1", "ha-2", "ha-3", "ha-4"] { Ok(()) } else { Err(format!("{listed:?}")) }
    })
    .await;
    endpoint.wait_copies(KEPT, 5).await;
    // Every message is still there, each exactly once.
    let got = amqp::drain(&endpoint.amqp(), KEPT, KEPT_COUNT as usize, Duration::from_secs(10)).await.expect("drain");
    assert_eq!(got, (0..KEPT_COUNT).map(|id| (id, 1)).collect::<BTreeMap<_, _>>());
}

/// The RabbitCluster deleted: pods and Services go, the claims and the credentials stay. Then
/// applied again (a GitOps prune and re-sync): the kept credential Secrets are adopted, the five
/// nodes come back on their claims as one cluster, and the messages are there.
async fn deleted_and_applied_again_keeps_claims_credentials_and_messages(
    client: &Client,
    ns: &str,
    endpoint: &Endpoint,
    claims: &BTreeMap<String, String>,
) {
    let (confirmed, error) = amqp::publish(&endpoint.amqp(), KEPT, REAPPLIED.clone(), 100).await;
    assert_eq!((confirmed.len(), error), (REAPPLIED.len(), None));
    // What the queue holds before the deletion, as the broker counts it now: the 100, and any of
    // the 500 whose acks the broker had not applied when the consumer closed (at least once).
    let held_before = amqp::live_depth(&endpoint.amqp(), KEPT).await;
    eprintln!("before the deletion: {held_before} messages in {KEPT} (100 published after the drain)");
    delete(&["rabbitcluster", NAME, "-n", ns]);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let service_api: Api<Service> = Api::namespaced(client.clone(), ns);
    wait_for("pods and Services gone", POD_TIMEOUT, || async {
        let pods = pod_api.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items.len();
        let services = service_api.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items.len();
        if pods == 0 && services == 0 { Ok(()) } else { Err(format!("{pods} pods, {services} Services")) }
    })
    .await;
    let left = volumes(client, ns).await;
    assert_eq!(left.len(), 5, "every claim kept: {left:?}");
    for (claim, volume) in claims {
        assert_eq!(left.get(claim), Some(volume), "{claim} still bound to its volume");
    }

    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    assert!(secrets.get_opt("ha-erlang-cookie").await.expect("get").is_some(), "the cookie Secret was deleted");
    assert!(secrets.get_opt("ha-default-user").await.expect("get").is_some(), "the default user Secret was deleted");
    apply(ns, &manifest(NAME, 5));
    wait_ready(client, ns, NAME, 5).await;
    let endpoint = Endpoint::of(client, ns, NAME).await;
    // Everything the queue held before the deletion, and nothing else: the 100 each once, and as
    // many of the 500 as were back before the deletion (a full stop and start neither loses a
    // message nor brings an acknowledged one back).
    let got = amqp::drain(&endpoint.amqp(), KEPT, usize::MAX, Duration::from_secs(10)).await.expect("drain");
    let (kept, earlier): (BTreeMap<u32, u32>, BTreeMap<u32, u32>) =
        got.into_iter().partition(|(id, _)| REAPPLIED.contains(id));
    assert_eq!(kept, REAPPLIED.map(|id| (id, 1)).collect::<BTreeMap<_, _>>());
    eprintln!(
        "after the re-apply: {} messages of the re-applied 100, {} ids consumed before (held before the deletion: \
         {held_before})",
        kept.len(),
        earlier.len()
    );
    assert_eq!((kept.len() + earlier.len()) as u64, held_before, "what the queue held before the deletion");
    assert!(earlier.values().all(|n| *n == 1), "a message of the 500 twice: {earlier:?}");
    assert_eq!(volumes(client, ns).await, left, "the same claims");
}

/// Messages kept through the RabbitCluster's deletion and re-creation (ids apart from the 500).
const REAPPLIED: std::ops::Range<u32> = 1_000..1_100;
