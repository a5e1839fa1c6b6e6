//! Step 4 of reconcile: make the running broker match the spec through the management API, and
//! observe what only the broker knows (version, members, partitions).

use super::ha::{self, HaPlan, is_mirroring_definition};
use super::management::ManagementClient;
use super::queue_type::QueueType;
use super::version::RabbitVersion;
use crate::api::HighAvailabilitySpec;
use crate::error::{BrokerReason, Error, Result};

/// What the broker reported, and what the operator changed on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerObservation {
    pub version: String,
    /// Running members, sorted.
    pub members: Vec<String>,
    /// Expected nodes that are not running members.
    pub missing: Vec<String>,
    /// Nodes the cluster lists that are not expected (pods removed, nodes not yet forgotten).
    pub extra: Vec<String>,
    /// Running nodes the management API reports in maintenance mode (4.x reports it; 3.x does not).
    pub drained: Vec<String>,
    /// `node: partitioned from [peers]`, one entry per node that reports a partition.
    pub partitions: Vec<String>,
    /// How HA is provided, for the HighAvailability condition.
    pub high_availability: HaOutcome,
    /// Stable feature flags still disabled after this pass (sorted): those the operator leaves to the
    /// user (`khepri_db`), or any a node refused. A next minor version may require them.
    pub disabled_feature_flags: Vec<String>,
    /// On 3.13 (the release that may move to 4.x in place): classic queues that a mirroring policy
    /// replicates, which 4.x cannot (at most `MIRRORED_SHOWN` names, then a count).
    pub mirrored_classic_queues: Vec<String>,
    /// Changes made in this pass, for Events.
    pub actions: Vec<String>,
}

/// How the broker provides HA after a pass: the HighAvailability condition's reason and message.
#[derive(Clone, Debug, Default, PartialEq, strum::IntoStaticStr)]
pub enum HaOutcome {
    /// 3.x: a mirroring policy in every vhost.
    ClassicMirroring { policy: String, ha_mode: String, vhosts: usize },
    /// 4.x: quorum the default queue type of every vhost; `raft_metadata` when the metadata store is
    /// Khepri too (4.3), where `cluster_partition_handling` has no effect.
    QuorumQueues { vhosts: usize, raft_metadata: bool },
    /// `highAvailability.mode: None`.
    #[default]
    Disabled,
}

impl HaOutcome {
    /// The condition's reason.
    pub fn reason(&self) -> &'static str {
        self.into()
    }

    /// Whether the cluster is highly available (the condition's status).
    pub fn is_available(&self) -> bool {
        !matches!(self, HaOutcome::Disabled)
    }

    /// The condition's message.
    pub fn message(&self) -> String {
        match self {
            HaOutcome::ClassicMirroring { policy, ha_mode, vhosts } => {
                format!("policy {policy} ({ha_mode}) with ha-sync-mode automatic in {vhosts} vhost(s)")
            }
            HaOutcome::QuorumQueues { vhosts, raft_metadata } => {
                let mut message = format!("quorum is the default queue type of {vhosts} vhost(s)");
                if *raft_metadata {
                    // 4.3 keeps metadata only in Khepri: what pause_minority gave, Raft majorities give.
                    message.push_str(
                        "; metadata and queues are Raft groups (Khepri): a partitioned minority accepts no writes, \
                         so cluster_partition_handling has no effect",
                    );
                }
                message
            }
            HaOutcome::Disabled => "highAvailability.mode is None".to_string(),
        }
    }
}

/// Mirrored classic queues named in status before the rest become a count.
pub const MIRRORED_SHOWN: usize = 10;

/// The mirrored classic queues of a 3.13 cluster, for status (none on any other version).
async fn mirrored_classic_queues(broker: &ManagementClient, version: RabbitVersion) -> Result<Vec<String>> {
    if (version.major, version.minor) != (3, 13) {
        return Ok(Vec::new());
    }
    let mut queues = broker.mirrored_classic_queues().await?;
    queues.sort();
    if queues.len() > MIRRORED_SHOWN {
        let more = queues.len() - MIRRORED_SHOWN;
        queues.truncate(MIRRORED_SHOWN);
        queues.push(format!("and {more} more"));
    }
    Ok(queues)
}

/// Feature flags enabled only on request (`FEATURE_FLAGS_ANNOTATION`): `khepri_db` moves a Mnesia
/// cluster's metadata to Khepri, a migration of its own (RabbitMQ's Khepri guide), which 4.3 needs.
pub const ON_REQUEST_FEATURE_FLAGS: [&str; 1] = ["khepri_db"];

/// After a roll-out has reached every node, enables every stable feature flag still disabled (as
/// `rabbitmqctl enable_feature_flag all` does), but those enabled only on request unless
/// `requested` names them: RabbitMQ refuses to boot a next minor version while flags that version
/// requires are off (the feature flags guide). Returns the flags left disabled.
async fn enable_feature_flags(
    broker: &ManagementClient,
    requested: &[String],
    actions: &mut Vec<String>,
) -> Result<Vec<String>> {
    let flags = broker.feature_flags().await?;
    let mut enabled = Vec::new();
    let mut left = Vec::new();
    for flag in flags.iter().filter(|f| f.state == "disabled" && f.stability == "stable") {
        let on_request = ON_REQUEST_FEATURE_FLAGS.contains(&flag.name.as_str());
        if on_request && !requested.contains(&flag.name) {
            left.push(flag.name.clone());
            continue;
        }
        broker.enable_feature_flag(&flag.name).await?;
        enabled.push(flag.name.clone());
    }
    if !enabled.is_empty() {
        actions.push(format!("enabled feature flags {}", enabled.join(", ")));
    }
    left.sort();
    Ok(left)
}

/// Which expected nodes run as members of the cluster, and which do not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Membership {
    /// Running members, sorted.
    pub members: Vec<String>,
    /// Expected nodes that are not running members.
    pub missing: Vec<String>,
}

/// Membership alone, read-only (one GET /api/nodes): what a cluster with a pod not ready (a
/// machine lost, a pod evicted) can still say about itself through a node that runs.
pub async fn membership(broker: &ManagementClient, expected_nodes: &[String]) -> Result<Membership> {
    let nodes = broker.nodes().await?;
    Ok(running_members(&nodes, expected_nodes))
}

fn running_members(nodes: &[super::management::NodeInfo], expected_nodes: &[String]) -> Membership {
    let mut members: Vec<String> = nodes.iter().filter(|n| n.running).map(|n| n.name.clone()).collect();
    members.sort();
    let missing = expected_nodes.iter().filter(|n| !members.contains(n)).cloned().collect();
    Membership { members, missing }
}

/// Observes the cluster and applies the HA plan. `expected_nodes` are the node names of the
/// StatefulSet's pods.
pub async fn converge(
    broker: &ManagementClient,
    expected_nodes: &[String],
    spec: &HighAvailabilitySpec,
    requested_flags: &[String],
) -> Result<BrokerObservation> {
    let version_text = broker.rabbitmq_version().await?;
    let version = RabbitVersion::parse(&version_text).ok_or_else(|| Error::Broker {
        reason: BrokerReason::BrokerBadResponse,
        what: "GET /api/overview".into(),
        message: format!("unparsable rabbitmq_version {version_text:?}"),
    })?;
    let nodes = broker.nodes().await?;
    let Membership { members, missing } = running_members(&nodes, expected_nodes);
    let extra = nodes.iter().filter(|n| !expected_nodes.contains(&n.name)).map(|n| n.name.clone()).collect();
    let drained = nodes.iter().filter(|n| n.running && n.being_drained == Some(true)).map(|n| n.name.clone()).collect();
    let partitions = nodes
        .iter()
        .filter(|n| !n.partitions.is_empty())
        .map(|n| format!("{}: partitioned from {}", n.name, n.partitions.join(", ")))
        .collect();

    let plan = ha::plan(spec, version)
        .map_err(|refusal| Error::InvalidSpec { reason: refusal.reason, message: refusal.message })?;
    let mut actions = Vec::new();
    // A flag is enabled on every node at once: only with every expected node a running member.
    let disabled_feature_flags = if missing.is_empty() {
        enable_feature_flags(broker, requested_flags, &mut actions).await?
    } else {
        Vec::new()
    };
    let vhosts = broker.vhosts().await?;
    let high_availability = match &plan {
        HaPlan::ClassicMirroring(policy) => {
            for vhost in &vhosts {
                let current = broker.policy(&vhost.name, &policy.name).await?;
                let up_to_date = current.as_ref().is_some_and(|p| {
                    p.pattern == policy.pattern
                        && p.priority == policy.priority
                        && p.apply_to == "queues"
                        && p.definition == policy.definition
                });
                if !up_to_date {
                    broker
                        .put_policy(&vhost.name, &policy.name, &policy.pattern, policy.priority, &policy.definition)
                        .await?;
                    actions.push(format!("applied policy {} in vhost {}", policy.name, vhost.name));
                }
            }
            HaOutcome::ClassicMirroring {
                policy: policy.name.clone(),
                ha_mode: policy.definition.get("ha-mode").and_then(|v| v.as_str()).unwrap_or("all").to_string(),
                vhosts: vhosts.len(),
            }
        }
        HaPlan::QuorumDefault { vhost_key, stale_policy } => {
            for vhost in &vhosts {
                if vhost.effective_default_queue_type() != Some(QueueType::Quorum) {
                    broker.set_default_queue_type(vhost, vhost_key, &QueueType::Quorum).await?;
                    actions.push(format!("set default queue type quorum on vhost {}", vhost.name));
                }
                remove_mirroring_policy(broker, &vhost.name, stale_policy, &mut actions).await?;
            }
            HaOutcome::QuorumQueues { vhosts: vhosts.len(), raft_metadata: !version.honours_partition_handling() }
        }
        HaPlan::Disabled { stale_policy } => {
            for vhost in &vhosts {
                remove_mirroring_policy(broker, &vhost.name, stale_policy, &mut actions).await?;
            }
            HaOutcome::Disabled
        }
    };
    Ok(BrokerObservation {
        version: version.to_string(),
        members,
        missing,
        extra,
        drained,
        partitions,
        high_availability,
        disabled_feature_flags,
        mirrored_classic_queues: mirrored_classic_queues(broker, version).await?,
        actions,
    })
}

/// Removes the operator's mirroring policy after a switch to quorum queues or to no HA. A policy of
/// that name without `ha-*` keys is the user's and stays.
async fn remove_mirroring_policy(
    broker: &ManagementClient,
    vhost: &str,
    name: &str,
    actions: &mut Vec<String>,
) -> Result<()> {
    if let Some(policy) = broker.policy(vhost, name).await?
        && is_mirroring_definition(&policy.definition)
    {
        broker.delete_policy(vhost, name).await?;
        actions.push(format!("removed mirroring policy {name} from vhost {vhost}"));
    }
    Ok(())
}
