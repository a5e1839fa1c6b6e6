//! Scale-down on Kubernetes: the pods as the kubelet reports them, node commands through
//! `kubectl exec` (pods/exec), and one pass of `rabbitmq::scale_down` turned into the replicas to
//! apply, the `Scaling` condition and Events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{AttachParams, DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use tokio::io::AsyncReadExt;

use super::build;
use super::conditions::{self, Verdict};
use super::dereference::Dereferenced;
use super::validate::ValidatedCluster;
use super::{Context, object_key};
use crate::api::RabbitCluster;
use crate::error::{Error, Result};
use crate::rabbitmq::scale_down::{self, ClusterView, NodeCommands, PodState, Step, WaitReason};

/// How long one node command may run (a drain or a shrink of thousands of queues takes a while).
const COMMAND_LIMIT: Duration = Duration::from_secs(600);
/// How soon a scale-down in progress is looked at again.
pub const SCALING_RESYNC: Duration = Duration::from_secs(5);

/// Node commands run in the pods' RabbitMQ container, as `kubectl exec` would.
pub struct PodExec {
    pods: Api<Pod>,
    stateful_set: String,
}

impl PodExec {
    pub fn new(ctx: &Context, cluster: &ValidatedCluster) -> Self {
        Self {
            pods: Api::namespaced(ctx.client.clone(), &cluster.namespace),
            stateful_set: cluster.stateful_set_name(),
        }
    }
}

impl NodeCommands for PodExec {
    async fn run(&self, ordinal: i32, command: &[&str]) -> Result<String> {
        let pod = format!("{}-{ordinal}", self.stateful_set);
        let failed = |message: String| Error::NodeCommand { pod: pod.clone(), command: command.join(" "), message };
        let params = AttachParams::default().container(build::statefulset::RABBITMQ_CONTAINER).stderr(true);
        let run = async {
            let mut process =
                self.pods.exec(&pod, command.to_vec(), &params).await.map_err(|e| failed(e.to_string()))?;
            let status = process.take_status();
            let (mut stdout, mut stderr) = (process.stdout(), process.stderr());
            let (mut out, mut err) = (String::new(), String::new());
            let read_out = async {
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_string(&mut out).await;
                }
            };
            let read_err = async {
                if let Some(s) = stderr.as_mut() {
                    let _ = s.read_to_string(&mut err).await;
                }
            };
            futures::join!(read_out, read_err);
            let status = match status {
                Some(status) => status.await,
                None => None,
            };
            drop((stdout, stderr));
            let _ = process.join().await;
            match status {
                Some(s) if s.status.as_deref() == Some("Success") => Ok(out),
                Some(s) => Err(failed(format!(
                    "{}{}",
                    s.message.unwrap_or_else(|| "failed".into()),
                    if err.trim().is_empty() { String::new() } else { format!(": {}", err.trim()) }
                ))),
                None => Err(failed("the exec stream ended without a status".into())),
            }
        };
        tokio::time::timeout(COMMAND_LIMIT, run)
            .await
            .unwrap_or_else(|_| Err(failed(format!("no answer within {} s", COMMAND_LIMIT.as_secs()))))
    }
}

/// The StatefulSet's pods by ordinal.
async fn pod_states(pods: &Api<Pod>, cluster: &ValidatedCluster) -> Result<BTreeMap<i32, PodState>> {
    let list = pods
        .list(&ListParams::default().labels(&build::selector_string(&cluster.name)))
        .await
        .map_err(|e| Error::kube(format!("list the pods of StatefulSet {}", cluster.stateful_set_name()), e))?;
    let prefix = format!("{}-", cluster.stateful_set_name());
    Ok(list
        .items
        .iter()
        .filter_map(|pod| {
            let ordinal = pod.name_any().strip_prefix(&prefix)?.parse().ok()?;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some((ordinal, PodState { ready, terminating: pod.metadata.deletion_timestamp.is_some() }))
        })
        .collect())
}

/// Deletes the claim of pod `ordinal`, a node this operator removed and is about to forget: the
/// one place a claim is deleted (the StatefulSet retains them, see `build::statefulset`).
async fn delete_claim(ctx: &Context, cluster: &ValidatedCluster, ordinal: i32) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &cluster.namespace);
    let name = cluster.claim_name(ordinal);
    match claims.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete PersistentVolumeClaim {name} of the removed node"), e)),
    }
}

/// One pass of a scale-down (or of forgetting nodes whose pods are gone).
pub struct ScalePass {
    /// The StatefulSet's replicas to apply.
    pub replicas: i32,
    /// The `Scaling` condition.
    pub verdict: Verdict,
    /// Whether more steps follow (look again soon).
    pub in_progress: bool,
    /// What was done, for an Event; `removed` when a node left the cluster for good.
    pub done: Vec<String>,
    pub removed: Option<String>,
    /// A refusal or a failure, reported like any reconcile error.
    pub error: Option<Error>,
}

/// Whether the last status says a scale-down is under way.
pub fn in_progress(cluster: &RabbitCluster) -> bool {
    cluster
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == conditions::SCALING && c.status == "True"))
}

/// Observes, decides the next step and carries it out. `current` is the StatefulSet's replicas.
pub async fn pass(
    ctx: &Context,
    cluster: &RabbitCluster,
    validated: &ValidatedCluster,
    world: &Dereferenced,
    current: i32,
) -> ScalePass {
    let desired = validated.replicas;
    // Until a node is handed over, the StatefulSet keeps what it runs (or grows, when called off).
    let hold = desired.max(current);
    let outcome = async {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &validated.namespace);
        let mut view = ClusterView {
            stateful_set: validated.stateful_set_name(),
            desired,
            current,
            pods: pod_states(&pods, validated).await?,
            mirror_sync_waited: ctx.mirror_sync_waited(&object_key(cluster)),
            pause_minority: validated.partition_handling == crate::api::PartitionHandling::PauseMinority,
            ..ClusterView::default()
        };
        let broker = ctx.management_client(validated, world)?;
        let commands = PodExec::new(ctx, validated);
        scale_down::observe(&broker, &commands, &mut view).await?;
        let step = scale_down::decide(&view);
        ctx.track_mirror_sync(
            &object_key(cluster),
            matches!(&step, Step::Wait { reason: WaitReason::WaitingForMirrorSync, .. }),
        );
        if let Step::Forget { node } | Step::Leave { node, .. } = &step
            && let Some(ordinal) = scale_down::ordinal_of(node, &validated.stateful_set_name())
        {
            // Before the forget (or leave), so that one that fails is retried with the claim
            // already gone: a forgotten node's data must never boot again with a later scale-up.
            // A claim still mounted (a leave) goes when its pod does (pvc-protection).
            delete_claim(ctx, validated, ordinal).await?;
        }
        let done = scale_down::execute(&step, &broker, &commands).await?;
        Ok::<_, Error>((step, done))
    }
    .await;
    let (step, done) = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            let verdict = Verdict {
                type_: conditions::SCALING,
                status: Some(true),
                reason: error.reason().to_string(),
                message: format!("scaling from {current} to {desired} replicas paused: {error}"),
            };
            return ScalePass {
                replicas: hold,
                verdict,
                in_progress: true,
                done: Vec::new(),
                removed: None,
                error: Some(error),
            };
        }
    };
    let (reason, message) = step.describe(current, desired);
    let (replicas, scaling) = match &step {
        Step::Remove { .. } => (current - 1, Some(true)),
        Step::Steady => (desired, Some(false)),
        Step::Refuse { .. } => (hold, Some(false)),
        _ => (hold, Some(true)),
    };
    let error = match &step {
        Step::Refuse { message } => Some(Error::ScaleDownRefused { current, desired, why: message.clone() }),
        _ => None,
    };
    let removed = match &step {
        Step::Forget { node } | Step::Leave { node, .. } => Some(node.clone()),
        _ => None,
    };
    ScalePass {
        replicas,
        verdict: Verdict { type_: conditions::SCALING, status: scaling, reason: reason.to_string(), message },
        in_progress: scaling == Some(true),
        done,
        removed,
        error,
    }
}

impl Context {
    fn mirror_sync_waited(&self, key: &str) -> Option<Duration> {
        self.mirror_sync_since.lock().unwrap_or_else(|e| e.into_inner()).get(key).map(Instant::elapsed)
    }

    fn track_mirror_sync(&self, key: &str, waiting: bool) {
        let mut since = self.mirror_sync_since.lock().unwrap_or_else(|e| e.into_inner());
        if waiting {
            since.entry(key.to_string()).or_insert_with(Instant::now);
        } else {
            since.remove(key);
        }
    }
}
