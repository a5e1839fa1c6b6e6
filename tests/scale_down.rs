//! Tier 1: the scale-down decision (safe, wait, refuse, and which node next) from fixtures of what
//! the broker and the pods report.

use std::collections::BTreeMap;
use std::time::Duration;

use warren::rabbitmq::management::{NodeInfo, QueueInfo};
use warren::rabbitmq::queue_type::QueueType;
use warren::rabbitmq::scale_down::{ClusterView, MIRROR_SYNC_LIMIT, PodState, Step, WaitReason, decide, ordinal_of};

fn node(i: i32) -> String {
    format!("rabbit@demo-{i}.demo-nodes.default.svc.cluster.local")
}

fn running(i: i32) -> NodeInfo {
    NodeInfo { name: node(i), running: true, partitions: Vec::new(), being_drained: Some(false), ..NodeInfo::default() }
}

const READY: PodState = PodState { ready: true, terminating: false };

/// `current` pods ready and running members; spec.replicas `desired`.
fn view(current: i32, desired: i32) -> ClusterView {
    ClusterView {
        stateful_set: "demo".into(),
        desired,
        current,
        pods: (0..current).map(|i| (i, READY)).collect::<BTreeMap<_, _>>(),
        nodes: (0..current).map(running).collect(),
        queues: Vec::new(),
        mirror_sync_waited: None,
        khepri: false,
        pause_minority: true,
        partition_handling_now: None,
    }
}

fn quorum(name: &str, members: &[i32]) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        vhost: "/".into(),
        queue_type: Some(QueueType::Quorum),
        node: Some(node(members[0])),
        members: members.iter().map(|&i| node(i)).collect(),
        online: members.iter().map(|&i| node(i)).collect(),
        durable: true,
        messages: Some(10),
        ..QueueInfo::default()
    }
}

fn classic(name: &str, on: i32, messages: u64) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        vhost: "/".into(),
        queue_type: Some(QueueType::Classic),
        node: Some(node(on)),
        durable: true,
        messages: Some(messages),
        ..QueueInfo::default()
    }
}

fn wait_reason(step: &Step) -> WaitReason {
    match step {
        Step::Wait { reason, .. } => *reason,
        other => panic!("expected a wait, got {other:?}"),
    }
}

fn refusal(step: &Step) -> &str {
    match step {
        Step::Refuse { message } => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn ordinals_come_from_the_pod_part_of_the_node_name() {
    assert_eq!(ordinal_of(&node(4), "demo"), Some(4));
    assert_eq!(ordinal_of("rabbit@demo-12.x", "demo"), Some(12));
    assert_eq!(ordinal_of("rabbit@other-1.x", "demo"), None);
    assert_eq!(ordinal_of("rabbit@demo-old-1.x", "demo"), None);
    assert_eq!(ordinal_of("no-at-sign", "demo"), None);
}

#[test]
fn a_cluster_at_its_size_is_steady() {
    assert_eq!(decide(&view(3, 3)), Step::Steady);
    // A scale-up is the StatefulSet's business alone.
    assert_eq!(decide(&view(3, 5)), Step::Steady);
}

#[test]
fn quorum_queues_walk_the_highest_node_through_hand_over_remove_and_forget() {
    // 5 → 3: node 4 first, its quorum members shrunk and the node drained.
    let mut v = view(5, 3);
    v.queues = vec![quorum("orders", &[0, 1, 2, 3, 4]), quorum("audit", &[0, 1, 2])];
    assert_eq!(decide(&v), Step::HandOver { ordinal: 4, node: node(4), shrink: true });

    // Shrunk but not yet in maintenance mode: the hand-over again, without a shrink.
    v.queues = vec![quorum("orders", &[0, 1, 2, 3]), quorum("audit", &[0, 1, 2])];
    assert_eq!(decide(&v), Step::HandOver { ordinal: 4, node: node(4), shrink: false });

    // Drained: its listeners closed, so its pod is not ready; that alone does not hold it.
    v.nodes[4].being_drained = Some(true);
    v.pods.insert(4, PodState { ready: false, terminating: false });
    assert_eq!(decide(&v), Step::Remove { ordinal: 4, node: node(4) });

    // The StatefulSet dropped it: its preStop runs, then the pod goes; only then is it forgotten.
    v.current = 4;
    v.pods.insert(4, PodState { ready: false, terminating: true });
    assert_eq!(wait_reason(&decide(&v)), WaitReason::NodeStopping);
    v.pods.remove(&4);
    assert_eq!(wait_reason(&decide(&v)), WaitReason::NodeStopping, "its node still runs");
    v.nodes[4].running = false;
    assert_eq!(decide(&v), Step::Forget { node: node(4) });

    // Forgotten: node 3 is next.
    v.nodes.pop();
    assert_eq!(decide(&v), Step::HandOver { ordinal: 3, node: node(3), shrink: true });
}

#[test]
fn on_khepri_each_node_leaves_while_a_majority_stands_down_to_one() {
    // 2 -> 1 on Khepri: forgetting node 1 once its pod stopped would need a majority of a 2-member
    // metadata store, which node 0 alone is not. So node 1 leaves while it still runs.
    let mut v = view(2, 1);
    v.khepri = true;
    v.queues = vec![quorum("orders", &[0, 1])];
    assert_eq!(decide(&v), Step::HandOver { ordinal: 1, node: node(1), shrink: true });
    v.queues = vec![quorum("orders", &[0])];
    v.nodes[1].being_drained = Some(true);
    v.pods.insert(1, PodState { ready: false, terminating: false });
    assert_eq!(decide(&v), Step::Leave { ordinal: 1, node: node(1) });

    // The leave stopped the application but its reset failed: taken up again, not waited on.
    v.nodes[1].running = false;
    assert_eq!(decide(&v), Step::Leave { ordinal: 1, node: node(1) });
    // Not drained and not running: a node that failed, which is waited for.
    v.nodes[1].being_drained = Some(false);
    assert_eq!(wait_reason(&decide(&v)), WaitReason::ClusterNotWhole);

    // Left: the cluster no longer lists it, so its pod goes; nothing is left to forget, but the
    // scale-down is done only once the pod is gone.
    v.nodes.pop();
    assert!(matches!(decide(&v), Step::Remove { ordinal: 1, .. }), "{:?}", decide(&v));
    v.current = 1;
    v.pods.insert(1, PodState { ready: false, terminating: true });
    assert_eq!(wait_reason(&decide(&v)), WaitReason::NodeStopping);
    v.pods.remove(&1);
    assert_eq!(decide(&v), Step::Steady);

    // Mnesia forgets a stopped node without a majority: no leave there.
    let mut v = view(2, 1);
    v.nodes[1].being_drained = Some(true);
    assert_eq!(decide(&v), Step::Remove { ordinal: 1, node: node(1) });
}

#[test]
fn two_to_one_with_pause_minority_keeps_the_staying_node_serving() {
    // Mnesia, pause_minority: node 0 would pause itself the moment node 1 stops (1 of 2 is no
    // majority). It ignores partitions until node 1 is forgotten, then takes pause_minority back.
    let mut v = view(2, 1);
    v.partition_handling_now = Some("pause_minority".into());
    assert_eq!(decide(&v), Step::SuspendPauseMinority { node: node(0) });
    v.partition_handling_now = Some("ignore".into());
    assert_eq!(decide(&v), Step::HandOver { ordinal: 1, node: node(1), shrink: false });
    v.nodes[1].being_drained = Some(true);
    assert_eq!(decide(&v), Step::Remove { ordinal: 1, node: node(1) });
    v.current = 1;
    v.pods.remove(&1);
    v.nodes[1].running = false;
    assert_eq!(decide(&v), Step::Forget { node: node(1) });
    v.nodes.pop();
    assert_eq!(decide(&v), Step::RestorePauseMinority { node: node(0) });
    v.partition_handling_now = Some("pause_minority".into());
    assert_eq!(decide(&v), Step::Steady);

    // Called off after the suspension: the same restore.
    let mut v = view(2, 2);
    v.partition_handling_now = Some("ignore".into());
    assert_eq!(decide(&v), Step::RestorePauseMinority { node: node(0) });
    // 3 -> 2 keeps a majority: nothing to suspend (and nothing is asked there).
    let mut v = view(3, 2);
    v.partition_handling_now = None;
    assert_eq!(decide(&v), Step::HandOver { ordinal: 2, node: node(2), shrink: false });
}

#[test]
fn a_node_listed_past_the_stateful_set_is_forgotten_even_at_the_desired_size() {
    // The operator restarted between the pod's removal and the forget, and 3 is what was asked.
    let mut v = view(3, 3);
    v.nodes.push(NodeInfo { running: false, ..running(3) });
    assert_eq!(decide(&v), Step::Forget { node: node(3) });
}

#[test]
fn a_cluster_that_is_not_whole_is_not_shrunk() {
    let mut v = view(5, 3);
    v.nodes[1].running = false;
    assert_eq!(wait_reason(&decide(&v)), WaitReason::ClusterNotWhole);

    let mut v = view(5, 3);
    v.nodes[2].partitions = vec![node(0)];
    let step = decide(&v);
    assert_eq!(wait_reason(&step), WaitReason::ClusterNotWhole);
    assert!(matches!(&step, Step::Wait { message, .. } if message.contains("partition")), "{step:?}");

    let mut v = view(5, 3);
    v.pods.insert(0, PodState { ready: false, terminating: false });
    assert_eq!(wait_reason(&decide(&v)), WaitReason::ClusterNotWhole);

    let mut v = view(5, 3);
    v.pods.insert(2, PodState { ready: true, terminating: true });
    assert_eq!(wait_reason(&decide(&v)), WaitReason::ClusterNotWhole);

    let mut v = view(5, 3);
    v.nodes.remove(3);
    assert_eq!(wait_reason(&decide(&v)), WaitReason::ClusterNotWhole, "pod 3 has not joined");
}

#[test]
fn a_quorum_queue_that_would_lose_its_majority_waits() {
    let mut v = view(5, 3);
    let mut q = quorum("orders", &[0, 1, 2, 4]);
    // Of the members that stay (0, 1, 2), only one is online.
    q.online = vec![node(0), node(4)];
    v.queues = vec![q];
    assert_eq!(wait_reason(&decide(&v)), WaitReason::QuorumAtRisk);
}

#[test]
fn unreplicated_classic_queues_on_the_leaving_node_are_refused_by_name() {
    let mut v = view(3, 1);
    v.queues = vec![
        classic("invoices", 2, 12),
        classic("elsewhere", 0, 99),
        QueueInfo { exclusive: true, ..classic("amq.gen-reply", 2, 3) },
    ];
    let step = decide(&v);
    let message = refusal(&step);
    assert!(message.contains(&node(2)), "{message}");
    assert!(message.contains("invoices (12 messages)"), "{message}");
    assert!(!message.contains("elsewhere") && !message.contains("amq.gen-reply"), "{message}");

    // Many: the first few by name, then a count.
    v.queues = (0..8).map(|i| classic(&format!("q{i}"), 2, 1)).collect();
    let step = decide(&v);
    let message = refusal(&step);
    assert!(
        message.contains("q4 (1 messages)") && !message.contains("q5 ") && message.contains("and 3 more"),
        "{message}"
    );

    // A transient empty queue goes with the node as it would with any restart.
    v.queues = vec![QueueInfo { durable: false, ..classic("scratch", 2, 0) }];
    assert_eq!(decide(&v), Step::HandOver { ordinal: 2, node: node(2), shrink: false });
}

#[test]
fn a_quorum_queue_whose_only_member_leaves_and_a_stream_replica_are_refused() {
    let mut v = view(3, 2);
    v.queues = vec![quorum("single", &[2])];
    assert!(refusal(&decide(&v)).contains("only member of quorum queues single"));

    v.queues = vec![QueueInfo { queue_type: Some(QueueType::Stream), ..quorum("events", &[0, 1, 2]) }];
    assert!(refusal(&decide(&v)).contains("streams events"));
}

#[test]
fn a_mirrored_master_waits_for_a_synchronised_mirror_that_stays_then_gives_up() {
    let mut v = view(3, 2);
    let mut q = classic("celery", 2, 500);
    q.slave_nodes = vec![node(0), node(1)];
    q.synchronised_slave_nodes = vec![];
    v.queues = vec![q.clone()];
    let step = decide(&v);
    assert_eq!(wait_reason(&step), WaitReason::WaitingForMirrorSync);
    assert!(matches!(&step, Step::Wait { sync, .. } if sync == &vec![("/".to_string(), "celery".to_string())]));

    v.mirror_sync_waited = Some(MIRROR_SYNC_LIMIT + Duration::from_secs(1));
    assert!(refusal(&decide(&v)).contains("synchronised mirror of celery"));

    // Synchronised on a node that stays: safe (maintenance mode moves the master there).
    q.synchronised_slave_nodes = vec![node(1)];
    v.queues = vec![q];
    v.mirror_sync_waited = None;
    assert_eq!(decide(&v), Step::HandOver { ordinal: 2, node: node(2), shrink: false });
}

#[test]
fn a_called_off_hand_over_revives_the_node_but_a_stopping_pod_is_left_alone() {
    // Scaled back to 5 after node 4 was drained: it leaves maintenance mode.
    let mut v = view(5, 5);
    v.nodes[4].being_drained = Some(true);
    v.pods.insert(4, PodState { ready: false, terminating: false });
    assert_eq!(decide(&v), Step::Revive { ordinal: 4, node: node(4) });

    // Drained by its own preStop (a rolling restart): not touched.
    v.pods.insert(4, PodState { ready: false, terminating: true });
    assert_eq!(decide(&v), Step::Steady);
}
