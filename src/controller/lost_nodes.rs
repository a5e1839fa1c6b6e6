//! A member whose Kubernetes node was declared gone. With node-local volumes (the local volumes of
//! bare metal, a cloud's local SSDs) a pod is pinned to its node by its claim: when that machine
//! dies the pod stays Terminating, then Pending forever once Kubernetes removes it, because its
//! volume cannot follow it. Only a person can tell a machine that is gone from one that is slow to
//! answer, and says so the way Kubernetes asks: by deleting the Node object, or with the
//! `node.kubernetes.io/out-of-service` taint of its non-graceful node shutdown. Then, and only if
//! the RabbitCluster opts in (`spec.replaceLostMembers`), the member is replaced: its claim and its
//! pod are deleted, the StatefulSet makes both anew on a node that runs, and the new node joins the
//! cluster afresh (its bootstrap forgets the old incarnation and grows the quorum queues back onto
//! it). Without the opt-in the operator says what it would do and how to ask for it.
//!
//! Looked at only for pods that are not ready (from the pods' store): a steady cluster costs no read.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::DeleteParams;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::Context;
use super::validate::ValidatedCluster;
use crate::api::RabbitCluster;
use crate::error::{Error, Result};

/// The taint of Kubernetes' non-graceful node shutdown: the node is shut down and will not come
/// back with its pods running.
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// How a person declared a node gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    Deleted,
    OutOfService,
}

impl Declared {
    fn describe(self) -> &'static str {
        match self {
            Declared::Deleted => "deleted from the cluster",
            Declared::OutOfService => "tainted node.kubernetes.io/out-of-service",
        }
    }
}

/// Whether a node is declared gone: its object deleted (`None`), or tainted out-of-service.
pub fn declared_gone(node: Option<&Node>) -> Option<Declared> {
    match node {
        None => Some(Declared::Deleted),
        Some(node) => {
            let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
            taints.is_some_and(|t| t.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT)).then_some(Declared::OutOfService)
        }
    }
}

/// The one node a volume is local to: its required node affinity on `kubernetes.io/hostname`
/// naming a single node. A volume that can attach elsewhere (network storage) has none, and
/// Kubernetes moves it with the pod by itself.
pub fn pinned_node(volume: &PersistentVolume) -> Option<String> {
    let terms = &volume.spec.as_ref()?.node_affinity.as_ref()?.required.as_ref()?.node_selector_terms;
    let mut nodes = terms.iter().flat_map(|t| t.match_expressions.iter().flatten()).filter(|e| {
        e.key == "kubernetes.io/hostname" && e.operator == "In" && e.values.as_ref().is_some_and(|v| v.len() == 1)
    });
    let node = nodes.next()?.values.as_ref()?.first()?.clone();
    nodes.next().is_none().then_some(node)
}

/// Whether a pod from the store may be stuck on a lost node: scheduled and not ready, or Pending
/// because its volume's node does not fit (the scheduler's "volume node affinity conflict").
pub fn may_be_stranded(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let ready = super::stores::pod_ready(pod);
    let volume_conflict = conditions.iter().any(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.message.as_deref().is_some_and(|m| m.contains("volume node affinity conflict"))
    });
    (scheduled && !ready) || volume_conflict
}

/// Step 3b: for each pod that may be stranded, whether its volume is local to a node declared
/// gone; if so, replaces the member (opted in) or says how to (not opted in). Failures become
/// Warning Events; the pass goes on.
pub async fn replace_lost_members(cluster: &RabbitCluster, ctx: &Context, validated: &ValidatedCluster) {
    let stranded: Vec<(i32, String)> = {
        let pods = super::stores::rabbitmq_pods(ctx, validated);
        (0..validated.replicas)
            .map(|ordinal| (ordinal, format!("{}-{ordinal}", validated.stateful_set_name())))
            .filter(|(_, name)| pods.iter().any(|p| &p.name_any() == name && may_be_stranded(p)))
            .collect()
    };
    for (ordinal, pod) in stranded {
        // Each Event names its pod as the related object: the recorder folds Events of one reason
        // about one object into a series that keeps the first note, so a second member replaced
        // within minutes would otherwise be reported under the first one's words.
        let related = super::pod_reference(cluster, &pod);
        let event = |reason: &'static str, note: String| {
            ctx.event_related(cluster, EventType::Warning, reason, "ReplaceMember", related.clone(), note)
        };
        match lost_member(ctx, validated, ordinal).await {
            Ok(None) => {}
            Ok(Some(lost)) if cluster.spec.replace_lost_members => match replace(ctx, validated, &pod, &lost).await {
                Ok(note) => event("LostMemberReplaced", note).await,
                Err(error) => {
                    let note = format!("replacing {pod} on lost node {}: {error}", lost.node);
                    event("LostMemberReplacementFailed", note).await
                }
            },
            Ok(Some(lost)) => {
                let note = format!(
                    "{pod} cannot run anywhere else: its volume {} is local to node {}, which was {}. Bring the node \
                     back, or set spec.replaceLostMembers: true to replace the member on a running node (its data on \
                     {} is given up; the queues keep their copies on the other members)",
                    lost.volume,
                    lost.node,
                    lost.declared.describe(),
                    lost.node
                );
                event("MemberOnLostNode", note).await;
            }
            Err(error) => {
                let note = format!("checking whether {pod}'s node is lost: {error}");
                event("LostMemberCheckFailed", note).await;
            }
        }
    }
}

/// A member whose volume is on a node declared gone.
struct LostMember {
    claim: String,
    volume: String,
    node: String,
    declared: Declared,
}

async fn lost_member(ctx: &Context, validated: &ValidatedCluster, ordinal: i32) -> Result<Option<LostMember>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &validated.namespace);
    let claim = validated.claim_name(ordinal);
    let Some(found) = claims.get_opt(&claim).await.map_err(|e| Error::kube(format!("get claim {claim}"), e))? else {
        return Ok(None);
    };
    let Some(volume) = found.spec.and_then(|s| s.volume_name) else { return Ok(None) };
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(bound) = volumes.get_opt(&volume).await.map_err(|e| Error::kube(format!("get volume {volume}"), e))?
    else {
        return Ok(None);
    };
    let Some(node) = pinned_node(&bound) else { return Ok(None) };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let found = nodes.get_opt(&node).await.map_err(|e| Error::kube(format!("get node {node}"), e))?;
    Ok(declared_gone(found.as_ref()).map(|declared| LostMember { claim, volume, node, declared }))
}

/// Deletes the claim (it goes once no pod uses it), then the pod, at once (its kubelet is gone and
/// will never confirm): the StatefulSet makes a new pod and a new claim, bound on a running node.
async fn replace(ctx: &Context, validated: &ValidatedCluster, pod: &str, lost: &LostMember) -> Result<String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &validated.namespace);
    match claims.delete(&lost.claim, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(Error::kube(format!("delete claim {}", lost.claim), e)),
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &validated.namespace);
    match pods.delete(pod, &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(Error::kube(format!("delete pod {pod}"), e)),
    }
    Ok(format!(
        "{pod} was on node {}, {}: its claim {} (volume {}, local to that node) and the pod deleted \
         (spec.replaceLostMembers); the StatefulSet makes both anew on a running node, where the member joins \
         afresh (its old incarnation forgotten, its quorum queues grown back)",
        lost.node,
        lost.declared.describe(),
        lost.claim,
        lost.volume
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    #[test]
    fn a_node_is_gone_only_when_deleted_or_tainted_out_of_service() {
        assert_eq!(declared_gone(None), Some(Declared::Deleted));
        let mut node = Node::default();
        assert_eq!(declared_gone(Some(&node)), None, "a node that does not answer is not gone");
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node.kubernetes.io/unreachable".into(),
                effect: "NoExecute".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert_eq!(declared_gone(Some(&node)), None, "unreachable is what a slow node looks like too");
        node.spec.as_mut().unwrap().taints.as_mut().unwrap().push(Taint {
            key: OUT_OF_SERVICE_TAINT.into(),
            value: Some("nodeshutdown".into()),
            effect: "NoExecute".into(),
            ..Taint::default()
        });
        assert_eq!(declared_gone(Some(&node)), Some(Declared::OutOfService));
    }

    #[test]
    fn only_a_volume_local_to_one_node_is_pinned() {
        let local: PersistentVolume = serde_json::from_value(serde_json::json!({
            "spec": {"local": {"path": "/data"}, "nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["worker-2"]}]}
            ]}}}
        }))
        .unwrap();
        assert_eq!(pinned_node(&local).as_deref(), Some("worker-2"));
        let zonal: PersistentVolume = serde_json::from_value(serde_json::json!({
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}
            ]}}}
        }))
        .unwrap();
        assert_eq!(pinned_node(&zonal), None, "a zonal disk follows its pod to another node of the zone");
        assert_eq!(pinned_node(&PersistentVolume::default()), None);
    }

    #[test]
    fn a_pod_may_be_stranded_when_scheduled_and_not_ready_or_pending_on_its_volume() {
        let pod = |value: serde_json::Value| -> Pod { serde_json::from_value(value).unwrap() };
        let running_ready = pod(serde_json::json!({"spec": {"containers": [], "nodeName": "n"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
        assert!(!may_be_stranded(&running_ready));
        let not_ready = pod(serde_json::json!({"spec": {"containers": [], "nodeName": "n"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}}));
        assert!(may_be_stranded(&not_ready));
        let pinned = pod(serde_json::json!({"spec": {"containers": []}, "status": {"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False",
            "message": "0/3 nodes are available: 1 node(s) had volume node affinity conflict, 2 node(s) didn't match"}]}}));
        assert!(may_be_stranded(&pinned));
        let never_scheduled = pod(serde_json::json!({"spec": {"containers": []}, "status": {"phase": "Pending"}}));
        assert!(!may_be_stranded(&never_scheduled), "no scheduler yet: nothing to look at (no read)");
    }
}
