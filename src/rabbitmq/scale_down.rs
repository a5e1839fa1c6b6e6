//! Removing nodes safely: which step a scale-down takes next, decided from what the broker and the
//! pods report, and the rabbitmqctl-level commands that carry it out.
//!
//! The nodes with the highest ordinals leave one at a time, each through: check it is safe (the
//! cluster whole, no queue left without a copy or a majority), hand over (quorum members shrunk off
//! the node, then maintenance mode, which moves clients and queue leaders away), remove (the
//! StatefulSet drops the pod; its preStop runs as on any stop), forget (`forget_cluster_node` on a
//! node that stays, once the pod is gone). On Khepri the node leaves before its pod stops instead
//! (`stop_app` and `reset` on the node itself): removing a member from the metadata store's Raft
//! group needs a majority of its members, and a 2-node cluster whose leaving node has stopped has
//! none, so a forget after the fact could never commit (3 -> 1 stalled at 2). Every step is decided again from the world on every
//! pass, so an operator restarted at any point resumes where the cluster is.
//! See <https://www.rabbitmq.com/docs/clustering#removing-nodes>.

use std::collections::BTreeMap;
use std::time::Duration;

use super::management::{ManagementClient, NodeInfo, QueueInfo};
use super::queue_type::QueueType;
use crate::error::Result;

/// How long a 3.x scale-down waits for a leaving master's mirrors to synchronise before it gives up
/// and says so.
pub const MIRROR_SYNC_LIMIT: Duration = Duration::from_secs(600);
/// Queue names listed in a message before the rest become a count.
const NAMES_SHOWN: usize = 5;

/// A pod of the StatefulSet, as the kubelet reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodState {
    pub ready: bool,
    /// Deleted and running its preStop hook.
    pub terminating: bool,
}

/// Everything a decision needs.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// The StatefulSet's name: node `rabbit@<sts>-<ordinal>.<domain>` is pod `<sts>-<ordinal>`.
    pub stateful_set: String,
    /// spec.replicas.
    pub desired: i32,
    /// The StatefulSet's replicas now.
    pub current: i32,
    /// The pods that exist, by ordinal.
    pub pods: BTreeMap<i32, PodState>,
    /// `GET /api/nodes`: every node the cluster lists, running or not.
    pub nodes: Vec<NodeInfo>,
    pub queues: Vec<QueueInfo>,
    /// How long the scale-down has waited for mirrors to synchronise, if it is waiting.
    pub mirror_sync_waited: Option<Duration>,
    /// The metadata store is Khepri (`khepri_db` enabled): a node leaves while it still runs.
    pub khepri: bool,
    /// `cluster_partition_handling` is `pause_minority` in the configuration.
    pub pause_minority: bool,
    /// Node 0's `cluster_partition_handling` in its memory, asked only where it matters (Mnesia,
    /// `pause_minority`, at most 2 nodes).
    pub partition_handling_now: Option<String>,
}

/// Why a scale-down waits (the `Scaling` condition's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::Display)]
pub enum WaitReason {
    /// A pod (or the node of a pod already gone) still stops.
    NodeStopping,
    /// Not every pod is ready, not every node runs, or a partition is reported.
    ClusterNotWhole,
    /// 3.x: a mirrored queue led by the leaving node has no synchronised mirror on a node that stays.
    WaitingForMirrorSync,
    /// A quorum queue would lose its majority without the leaving node.
    QuorumAtRisk,
}

/// The next step of a scale-down.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The cluster runs the replicas asked for and lists exactly its pods.
    Steady,
    /// A node kept in maintenance mode by a scale-down that was called off: bring it back.
    Revive { ordinal: i32, node: String },
    /// The pod of `node` is gone but the cluster still lists it.
    Forget { node: String },
    /// Not safe yet; look again soon. `sync` are 3.x queues to ask for a mirror synchronisation.
    Wait { reason: WaitReason, message: String, sync: Vec<(String, String)> },
    /// Unsafe until the user acts: the message says what and why.
    Refuse { message: String },
    /// Move quorum members (when `shrink`), then clients and queue leaders (maintenance mode), off
    /// the leaving node.
    HandOver { ordinal: i32, node: String, shrink: bool },
    /// Khepri: the handed-over node leaves the cluster while it still runs, so a majority of the
    /// metadata store commits its removal (`stop_app`, `reset` on the node itself).
    Leave { ordinal: i32, node: String },
    /// 2 -> 1 with `pause_minority` (Mnesia): the node that stays would pause itself the moment the
    /// other stops (1 of 2 is no majority) and the cluster would stop serving. It ignores
    /// partitions, in memory, until the other is forgotten.
    SuspendPauseMinority { node: String },
    /// The node that stayed takes `pause_minority` back from the configuration.
    RestorePauseMinority { node: String },
    /// The leaving node holds nothing any more (or is no member at all): the StatefulSet may drop
    /// its pod.
    Remove { ordinal: i32, node: String },
}

impl Step {
    /// (reason, message) of the `Scaling` condition, with `to` the replicas asked for.
    pub fn describe(&self, from: i32, to: i32) -> (&'static str, String) {
        let removing = |node: &str| format!("scaling down from {from} to {to} replicas: {node}");
        match self {
            Step::Steady => ("Steady", format!("{to} replicas; the cluster lists exactly its pods")),
            Step::Revive { node, .. } => ("Reviving", format!("scale-down called off: {node} leaves maintenance mode")),
            Step::Forget { node } => {
                ("ForgettingNode", format!("{node}: pod gone, forgetting it (forget_cluster_node)"))
            }
            Step::Wait { reason, message, .. } => (reason.into(), message.clone()),
            Step::Refuse { message } => ("ScaleDownRefused", message.clone()),
            Step::HandOver { node, shrink, .. } => (
                "HandingOver",
                format!(
                    "{}{} enters maintenance mode (clients and queue leaders move to the nodes that stay)",
                    removing(node),
                    if *shrink { ": its quorum queue members are removed, then it" } else { "" }
                ),
            ),
            Step::SuspendPauseMinority { node } => (
                "SuspendingPauseMinority",
                format!(
                    "{}: {node} ignores partitions until the other node is forgotten (with 2 nodes, pause_minority \
                     would pause it when the other stops)",
                    removing(node)
                ),
            ),
            Step::RestorePauseMinority { node } => {
                ("RestoringPauseMinority", format!("{node} takes cluster_partition_handling pause_minority back"))
            }
            Step::Leave { node, .. } => (
                "LeavingCluster",
                format!("{} leaves the cluster while a majority stands (stop_app, reset)", removing(node)),
            ),
            Step::Remove { node, .. } => {
                ("RemovingNode", format!("{} holds no queue data any more; its pod stops", removing(node)))
            }
        }
    }
}

/// The ordinal of `node` when it is one of this StatefulSet's pods.
pub fn ordinal_of(node: &str, stateful_set: &str) -> Option<i32> {
    let host = node.split_once('@')?.1;
    let pod = host.split('.').next()?;
    pod.strip_prefix(stateful_set)?.strip_prefix('-')?.parse().ok()
}

fn names(list: &[String]) -> String {
    let mut text = list.iter().take(NAMES_SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if list.len() > NAMES_SHOWN {
        text.push_str(&format!(" and {} more", list.len() - NAMES_SHOWN));
    }
    text
}

fn wait(reason: WaitReason, message: String) -> Step {
    Step::Wait { reason, message, sync: Vec::new() }
}

/// The next step. Pure: the caller observed the view and carries the step out.
pub fn decide(view: &ClusterView) -> Step {
    let ordinal = |n: &NodeInfo| ordinal_of(&n.name, &view.stateful_set);
    // 1. Nodes whose pods the StatefulSet dropped: forget each once its pod is gone.
    if let Some(stale) = view.nodes.iter().find(|n| ordinal(n).is_some_and(|o| o >= view.current)) {
        let o = ordinal(stale).unwrap_or_default();
        if stale.running || view.pods.contains_key(&o) {
            return wait(
                WaitReason::NodeStopping,
                format!("{}: waiting for its pod to stop before forgetting it", stale.name),
            );
        }
        return Step::Forget { node: stale.name.clone() };
    }
    // A pod the StatefulSet dropped that still stops (a node that left on Khepri is no longer
    // listed): the scale-down is done only once it is gone, with its claim.
    if let Some((o, _)) = view.pods.range(view.current..).next() {
        return wait(WaitReason::NodeStopping, format!("pod {}-{o}: waiting for it to stop", view.stateful_set));
    }
    let leaving = (view.desired < view.current).then_some(view.current - 1);
    // 2. A node left in maintenance by a called-off hand-over (not one whose pod is stopping: its
    //    preStop drained it).
    if let Some(node) = view.nodes.iter().find(|n| {
        n.being_drained == Some(true)
            && n.running
            && ordinal(n).is_some_and(|o| Some(o) != leaving && view.pods.get(&o).is_some_and(|p| !p.terminating))
    }) {
        return Step::Revive { ordinal: ordinal(node).unwrap_or_default(), node: node.name.clone() };
    }
    let Some(leaving) = leaving else {
        if view.partition_handling_now.as_deref().is_some_and(|now| now != "pause_minority")
            && let Some(node) = view.nodes.iter().find(|n| ordinal(n) == Some(0) && n.running)
        {
            return Step::RestorePauseMinority { node: node.name.clone() };
        }
        return Step::Steady;
    };
    let Some(leaving_node) = view.nodes.iter().find(|n| ordinal(n) == Some(leaving)).map(|n| n.name.clone()) else {
        // The cluster does not list the leaving pod's node: it left (a Khepri leave, done), or
        // never joined. It holds nothing of the cluster's.
        return Step::Remove {
            ordinal: leaving,
            node: format!("pod {}-{leaving} (not a cluster member)", view.stateful_set),
        };
    };
    let prefix = format!("scaling down from {} to {}: {leaving_node}", view.current, view.desired);

    // 3. Only a whole cluster is shrunk.
    if let Some(why) = not_whole(view, leaving) {
        return wait(WaitReason::ClusterNotWhole, format!("{prefix} waits: {why}"));
    }
    let drained = view.nodes.iter().any(|n| n.name == leaving_node && n.being_drained == Some(true));
    let staying: Vec<&str> = view
        .nodes
        .iter()
        .filter(|n| n.running && ordinal(n).is_some_and(|o| o < leaving))
        .map(|n| n.name.as_str())
        .collect();

    // 4. Every queue keeps a copy, or a majority, on the nodes that stay.
    let safety = queue_safety(&view.queues, &leaving_node, &staying);
    if !safety.refused.is_empty() {
        return Step::Refuse { message: format!("{prefix} cannot leave: {}", safety.refused.join("; ")) };
    }
    if !safety.unsynchronised.is_empty() {
        let queues: Vec<String> = safety.unsynchronised.iter().map(|(v, q)| format!("{q} (vhost {v})")).collect();
        if view.mirror_sync_waited.is_some_and(|w| w >= MIRROR_SYNC_LIMIT) {
            return Step::Refuse {
                message: format!(
                    "{prefix} cannot leave: after {} min, no node that stays holds a synchronised mirror of {}",
                    MIRROR_SYNC_LIMIT.as_secs() / 60,
                    names(&queues)
                ),
            };
        }
        return Step::Wait {
            reason: WaitReason::WaitingForMirrorSync,
            message: format!("{prefix} waits for a synchronised mirror on a node that stays: {}", names(&queues)),
            sync: safety.unsynchronised,
        };
    }
    if !safety.without_majority.is_empty() {
        return wait(
            WaitReason::QuorumAtRisk,
            format!(
                "{prefix} waits: without it these quorum queues would lose their majority: {}",
                names(&safety.without_majority)
            ),
        );
    }
    // 5. With 2 nodes and pause_minority, the node that stays must not pause when the other stops.
    if view.partition_handling_now.as_deref() == Some("pause_minority") && view.current == 2 {
        return Step::SuspendPauseMinority { node: staying.first().map(|n| n.to_string()).unwrap_or_default() };
    }
    // 6. Hand over, then (Khepri) leave, then remove.
    if safety.quorum_members || !drained {
        return Step::HandOver { ordinal: leaving, node: leaving_node, shrink: safety.quorum_members };
    }
    if view.khepri {
        return Step::Leave { ordinal: leaving, node: leaving_node };
    }
    Step::Remove { ordinal: leaving, node: leaving_node }
}

/// Why the cluster is not whole, if it is not: a node of a pod that stays not running, a partition,
/// a pod not ready (the leaving node's own pod may be unready once drained: maintenance mode
/// closes its listeners).
fn not_whole(view: &ClusterView, leaving: i32) -> Option<String> {
    for o in 0..view.current {
        let node = view.nodes.iter().find(|n| ordinal_of(&n.name, &view.stateful_set) == Some(o));
        let drained = node.is_some_and(|n| n.being_drained == Some(true));
        match (node, view.pods.get(&o)) {
            (None, _) => return Some(format!("pod {}-{o} is not a cluster member yet", view.stateful_set)),
            // A Khepri leave that stopped the node's application but did not finish its reset
            // is taken up again.
            (Some(n), _) if !(n.running || view.khepri && o == leaving && drained) => {
                return Some(format!("{} is not running", n.name));
            }
            (_, None) => return Some(format!("pod {}-{o} does not exist", view.stateful_set)),
            (_, Some(p)) if p.terminating => return Some(format!("pod {}-{o} is stopping", view.stateful_set)),
            (_, Some(p)) if !(p.ready || o == leaving && drained) => {
                return Some(format!("pod {}-{o} is not ready", view.stateful_set));
            }
            _ => {}
        }
    }
    view.nodes
        .iter()
        .find(|n| !n.partitions.is_empty())
        .map(|n| format!("{} reports a partition from {}", n.name, n.partitions.join(", ")))
}

#[derive(Default)]
struct QueueSafety {
    /// Reasons the node cannot leave at all.
    refused: Vec<String>,
    /// (vhost, queue) of 3.x masters on the leaving node with no synchronised mirror that stays.
    unsynchronised: Vec<(String, String)>,
    /// Quorum queues that would keep no majority online.
    without_majority: Vec<String>,
    /// Whether any quorum queue has a member on the leaving node.
    quorum_members: bool,
}

fn queue_safety(queues: &[QueueInfo], leaving: &str, staying: &[&str]) -> QueueSafety {
    let mut safety = QueueSafety::default();
    let (mut unreplicated, mut only_member, mut streams) = (Vec::new(), Vec::new(), Vec::new());
    let label = |q: &QueueInfo| if q.vhost == "/" { q.name.clone() } else { format!("{} (vhost {})", q.name, q.vhost) };
    for q in queues {
        match q.queue_type.as_ref().unwrap_or(&QueueType::Classic) {
            QueueType::Quorum => {
                if !q.members.iter().any(|m| m == leaving) {
                    continue;
                }
                safety.quorum_members = true;
                let remaining: Vec<&String> = q.members.iter().filter(|m| *m != leaving).collect();
                let online = remaining.iter().filter(|m| q.online.contains(m) && staying.contains(&m.as_str())).count();
                if remaining.is_empty() {
                    only_member.push(label(q));
                } else if online < remaining.len() / 2 + 1 {
                    safety.without_majority.push(label(q));
                }
            }
            QueueType::Stream => {
                if q.members.iter().any(|m| m == leaving) {
                    streams.push(label(q));
                }
            }
            _ => {
                if q.node.as_deref() != Some(leaving) || q.exclusive {
                    continue;
                }
                let mirrored = !q.slave_nodes.is_empty() || !q.synchronised_slave_nodes.is_empty();
                if mirrored {
                    if !q.synchronised_slave_nodes.iter().any(|m| staying.contains(&m.as_str())) {
                        safety.unsynchronised.push((q.vhost.clone(), q.name.clone()));
                    }
                } else if q.durable || q.messages != Some(0) {
                    // A durable queue would be deleted with the node (forget_cluster_node), its
                    // messages with it; a transient one with messages loses them.
                    unreplicated.push(match q.messages {
                        Some(n) => format!("{} ({n} messages)", label(q)),
                        None => label(q),
                    });
                }
            }
        }
    }
    if !unreplicated.is_empty() {
        safety.refused.push(format!(
            "classic queues that are not replicated live on it and would be lost with it: {} \
             (consume or delete them, or mirror them with highAvailability; the scale-down goes on by itself)",
            names(&unreplicated)
        ));
    }
    if !only_member.is_empty() {
        safety.refused.push(format!(
            "it holds the only member of quorum queues {} (add one elsewhere with rabbitmq-queues add_member)",
            names(&only_member)
        ));
    }
    if !streams.is_empty() {
        safety.refused.push(format!(
            "it holds replicas of streams {} (move them with rabbitmq-streams add_replica / delete_replica)",
            names(&streams)
        ));
    }
    safety
}

/// Where rabbitmqctl-level commands run: in the RabbitMQ container of a pod (`kubectl exec` for
/// the operator, the node's own namespaces for the test harness).
pub trait NodeCommands {
    /// Runs `command` in pod `ordinal` and returns its standard output; an error when it fails.
    fn run(&self, ordinal: i32, command: &[&str]) -> impl Future<Output = Result<String>> + Send;
}

/// Removes every member on `node` from the quorum queues (run on a node that stays).
pub fn shrink_command(node: &str) -> [&str; 4] {
    ["rabbitmq-queues", "-q", "shrink", node]
}
/// Maintenance mode: clients and queue leaders move off the node (run on the node itself).
pub const DRAIN_COMMAND: [&str; 5] = ["rabbitmq-upgrade", "-q", "drain", "--timeout", "300"];
pub const REVIVE_COMMAND: [&str; 3] = ["rabbitmq-upgrade", "-q", "revive"];
/// Adds a member on the node to every quorum queue (run on the node itself).
pub fn grow_command(node: &str) -> [&str; 5] {
    ["rabbitmq-queues", "-q", "grow", node, "all"]
}
/// Removes a stopped node from the cluster (run on a node that stays).
pub fn forget_command(node: &str) -> [&str; 4] {
    ["rabbitmqctl", "-q", "forget_cluster_node", node]
}
/// A node leaves the cluster by itself, while the others commit it (run on the leaving node, in
/// this order): the application stops, then the node resets, which removes it from the cluster
/// and wipes its data (already handed over), then the marker bootstrap.sh keeps in the data
/// directory goes (a reset on Khepri leaves it): a node that restarts after leaving joins again
/// rather than start alone, and its preStop sees a node with nothing to hand over.
pub const LEAVE_COMMANDS: [&[&str]; 3] = [
    &["rabbitmqctl", "-q", "stop_app"],
    &["rabbitmqctl", "-q", "reset"],
    &["sh", "-c", "rm -f \"$RABBITMQ_MNESIA_BASE/$RABBITMQ_NODENAME/warren-clustered\""],
];

/// `cluster_partition_handling` as the node holds it now.
pub const PARTITION_HANDLING_QUERY: [&str; 4] =
    ["rabbitmqctl", "-q", "eval", "element(2, application:get_env(rabbit, cluster_partition_handling))."];
/// Sets `cluster_partition_handling` in the node's memory (a restart reads the configuration).
pub fn partition_handling_command(value: &'static str) -> [String; 4] {
    [
        "rabbitmqctl".into(),
        "-q".into(),
        "eval".into(),
        format!("application:set_env(rabbit, cluster_partition_handling, {value})."),
    ]
}

/// Whether the node is in maintenance mode, asked of the node itself where the management API does
/// not report it (3.x; `rabbit_maintenance` is there from 3.8 on).
pub const DRAINED_QUERY: [&str; 4] =
    ["rabbitmqctl", "-q", "eval", "rabbit_maintenance:is_being_drained_local_read(node())."];

/// What the broker says, for a view: its nodes, whether the last node is in maintenance mode (the
/// one a hand-over drains, asked of the node itself where the API does not say), and, while scaling
/// down, the queues.
pub async fn observe(broker: &ManagementClient, commands: &impl NodeCommands, view: &mut ClusterView) -> Result<()> {
    view.nodes = broker.nodes().await?;
    if view.desired < view.current {
        view.queues = broker.queues().await?;
    }
    if view.desired < view.current || (view.pause_minority && view.current <= 2) {
        view.khepri = broker.feature_flags().await?.iter().any(|f| f.name == "khepri_db" && f.state == "enabled");
    }
    if view.pause_minority && !view.khepri && view.current <= 2 {
        // Unknown (the command failed) is left unknown: nothing is suspended or restored on it.
        view.partition_handling_now =
            commands.run(0, &PARTITION_HANDLING_QUERY).await.ok().map(|out| out.trim().to_string());
    }
    let last = view.current - 1;
    if let Some(node) = view
        .nodes
        .iter_mut()
        .find(|n| n.running && n.being_drained.is_none() && ordinal_of(&n.name, &view.stateful_set) == Some(last))
    {
        // Unknown (the command failed) counts as not drained: a hand-over runs again, harmlessly.
        node.being_drained = Some(commands.run(last, &DRAINED_QUERY).await.is_ok_and(|out| out.trim() == "true"));
    }
    Ok(())
}

/// Carries out `step`, except `Remove` (the StatefulSet's change, the caller's) and `Steady`.
/// Returns what was done, for Events.
pub async fn execute(step: &Step, broker: &ManagementClient, commands: &impl NodeCommands) -> Result<Vec<String>> {
    let mut done = Vec::new();
    match step {
        Step::Revive { ordinal, node } => {
            commands.run(*ordinal, &REVIVE_COMMAND).await?;
            // The hand-over shrank its quorum members before draining it: give them back, as a
            // node that joins gets them (bootstrap.sh).
            commands.run(*ordinal, &grow_command(node)).await?;
            done.push(format!("{node} left maintenance mode and got its quorum queue members back"));
        }
        Step::Forget { node } => {
            commands.run(0, &forget_command(node)).await?;
            done.push(format!("forgot {node}"));
        }
        Step::Wait { sync, .. } => {
            for (vhost, queue) in sync {
                broker.sync_queue(vhost, queue).await?;
            }
        }
        Step::HandOver { ordinal, node, shrink } => {
            // Shrink first: on 4.3, `shrink` after `drain` (which stops the node's follower
            // replicas) left the members in place, pass after pass (seen in tier 2).
            if *shrink {
                commands.run(0, &shrink_command(node)).await?;
                done.push(format!("shrank quorum queues off {node}"));
            }
            commands.run(*ordinal, &DRAIN_COMMAND).await?;
            done.push(format!("{node} in maintenance mode"));
        }
        Step::SuspendPauseMinority { node } => {
            let command = partition_handling_command("ignore");
            commands.run(0, &command.each_ref().map(String::as_str)).await?;
            done.push(format!("{node} ignores partitions until the leaving node is forgotten"));
        }
        Step::RestorePauseMinority { node } => {
            let command = partition_handling_command("pause_minority");
            commands.run(0, &command.each_ref().map(String::as_str)).await?;
            done.push(format!("{node} takes pause_minority back"));
        }
        Step::Leave { ordinal, node } => {
            for command in LEAVE_COMMANDS {
                commands.run(*ordinal, command).await?;
            }
            done.push(format!("{node} left the cluster (stop_app, reset); the others committed it"));
        }
        Step::Steady | Step::Refuse { .. } | Step::Remove { .. } => {}
    }
    Ok(done)
}
