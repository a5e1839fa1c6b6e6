//! The StatefulSet, applied and kept as applied. A person or a tool that changes what Warren owns
//! (`kubectl scale sts --replicas=0` in a runbook, an off-hours downscaler, `kubectl set image`,
//! an edit of the resources) moves its generation past the one recorded after the operator's last
//! apply: the next pass applies it again, taking the fields back, and a Warning Event says what
//! changed and which field manager changed it. Fields nobody else touched cost nothing: the store's
//! copy (generation and annotations) is enough to see that.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::{APPLIED_GENERATION_ANNOTATION, APPLIED_HASH_ANNOTATION, Applied, FIELD_MANAGER, ensure_owned, hash_of};
use crate::controller::validate::ValidatedCluster;
use crate::error::{Error, Result};

/// Changed fields named in one Event before the rest become a count.
const CHANGES_SHOWN: usize = 6;
/// A value longer than this is cut in the Event.
const VALUE_SHOWN: usize = 80;

fn recorded_generation(live: &StatefulSet) -> Option<i64> {
    live.annotations().get(APPLIED_GENERATION_ANNOTATION).and_then(|g| g.parse().ok())
}

/// Applies the StatefulSet when what the operator would apply changed, or when its spec changed
/// since the operator's last apply (drift, reverted and reported in `applied.reverted`).
pub async fn apply_stateful_set(
    api: &Api<StatefulSet>,
    cluster: &ValidatedCluster,
    mut desired: StatefulSet,
    existing: Option<&StatefulSet>,
    applied: &mut Applied,
) -> Result<()> {
    let name = desired.name_any();
    let hash = hash_of(&desired)?;
    let mut before = None;
    let mut ours = false;
    if let Some(live) = existing {
        ensure_owned(live, cluster)?;
        ours = live.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash);
        let untouched = live.metadata.generation.is_some() && recorded_generation(live) == live.metadata.generation;
        if ours && untouched {
            return Ok(());
        }
        if !untouched {
            // The store keeps no managed fields nor the pod template: one GET, only now, to say
            // what changed and who changed it.
            let full = api.get(&name).await.map_err(|e| Error::kube(format!("get StatefulSet {name}"), e))?;
            before = Some(full);
        }
    }
    desired.annotations_mut().insert(APPLIED_HASH_ANNOTATION.into(), hash);
    // Force: the StatefulSet's spec is the operator's. A field another manager took (`kubectl
    // scale` owns spec.replicas after it ran) is taken back, and the change is reported.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Conditional on the version read: a change made after the read and before the apply (`kubectl
    // scale` then `kubectl set image` a moment later) would be taken back unreported. On a
    // conflict the StatefulSet is read again and the apply retried, so the report names every
    // change the apply takes back.
    let mut attempt = 0;
    let after = loop {
        attempt += 1;
        desired.metadata.resource_version =
            before.as_ref().or(existing).and_then(|s: &StatefulSet| s.metadata.resource_version.clone());
        match api.patch(&name, &params, &Patch::Apply(&desired)).await {
            Ok(after) => break after,
            Err(kube::Error::Api(response)) if response.code == 409 && attempt < 4 => {
                let full = api.get(&name).await.map_err(|e| Error::kube(format!("get StatefulSet {name}"), e))?;
                before = Some(full);
            }
            Err(e) => return Err(Error::kube(format!("apply StatefulSet {name}"), e)),
        }
    };
    match (existing, &before) {
        (None, _) => applied.created.push(("StatefulSet".into(), name.clone())),
        // What the operator applies changed: an update (drift made at the same time goes with it).
        (Some(_), _) if !ours => applied.updated.push(("StatefulSet".into(), name.clone())),
        // Only someone else's change moved the generation (an unchanged apply leaves it, as after
        // `kubectl rollout restart`, whose annotation is not the operator's field).
        (Some(_), Some(before)) if before.metadata.generation != after.metadata.generation => {
            let changes = spec_changes(&spec_json(before)?, &spec_json(&after)?);
            let managers = changed_by(before, &changes);
            let note = describe_drift(&name, &changes, &managers, replicas_unattributed(before, &changes));
            applied.reverted.push(Reverted { note, resource_version: before.metadata.resource_version.clone() });
        }
        (Some(_), _) => {}
    }
    record_generation(api, &name, &after).await
}

/// Records the generation the apply left, unless it is recorded already.
async fn record_generation(api: &Api<StatefulSet>, name: &str, after: &StatefulSet) -> Result<()> {
    let Some(generation) = after.metadata.generation else { return Ok(()) };
    if recorded_generation(after) == Some(generation) {
        return Ok(());
    }
    // A merge patch of metadata: it does not move the generation it records.
    let patch =
        serde_json::json!({"metadata": {"annotations": {APPLIED_GENERATION_ANNOTATION: generation.to_string()}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| Error::kube(format!("record the applied generation of StatefulSet {name}"), e))?;
    Ok(())
}

fn spec_json(stateful_set: &StatefulSet) -> Result<Value> {
    serde_json::to_value(&stateful_set.spec)
        .map_err(|e| Error::Serialization { what: "a StatefulSet's spec".into(), message: e.to_string() })
}

/// One changed field: its path under `spec`, the value found and the value applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub path: String,
    pub found: String,
    pub applied: String,
}

/// The fields that differ between two specs, leaves only, in path order.
pub fn spec_changes(before: &Value, after: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    walk("spec", before, after, &mut changes);
    changes
}

fn walk(path: &str, before: &Value, after: &Value, changes: &mut Vec<Change>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let (bv, av) = (b.get(key).unwrap_or(&Value::Null), a.get(key).unwrap_or(&Value::Null));
                walk(&format!("{path}.{key}"), bv, av, changes);
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                // Containers, env and volumes are named: the name says more than the index.
                let label = av.get("name").and_then(Value::as_str).map_or_else(|| i.to_string(), str::to_string);
                walk(&format!("{path}[{label}]"), bv, av, changes);
            }
        }
        _ => changes.push(Change { path: path.to_string(), found: shown(before), applied: shown(after) }),
    }
}

fn shown(value: &Value) -> String {
    let text = match value {
        Value::Null => "(none)".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > VALUE_SHOWN {
        format!("{}…", text.chars().take(VALUE_SHOWN).collect::<String>())
    } else {
        text
    }
}

/// The field managers other than the operator (and the status writers) whose managed fields hold
/// one of the changed fields' names: who made the change, as far as the API server knows.
pub fn changed_by(live: &StatefulSet, changes: &[Change]) -> Vec<String> {
    let leaves: Vec<String> = changes
        .iter()
        .filter_map(|c| c.path.rsplit('.').next())
        .map(|leaf| format!("\"f:{}\"", leaf.split('[').next().unwrap_or(leaf)))
        .collect();
    let mut managers: Vec<String> = live
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some(FIELD_MANAGER) && m.subresource.as_deref() != Some("status"))
        .filter(|m| {
            let fields = m.fields_v1.as_ref().map(|f| f.0.to_string()).unwrap_or_default();
            leaves.iter().any(|leaf| fields.contains(leaf.as_str()))
        })
        .filter_map(|m| {
            let manager = m.manager.clone()?;
            Some(match m.subresource.as_deref() {
                Some(sub) if !sub.is_empty() => format!("{manager} (through /{sub})"),
                _ => manager,
            })
        })
        .collect();
    managers.sort();
    managers.dedup();
    managers
}

/// spec.replicas changed and no other manager's fields hold it: a change through /scale, for
/// which the API server records no field manager (seen on Kubernetes 1.34: `kubectl scale`).
pub fn replicas_unattributed(live: &StatefulSet, changes: &[Change]) -> bool {
    changes.iter().any(|c| c.path == "spec.replicas")
        && changed_by(live, &[Change { path: "spec.replicas".into(), found: String::new(), applied: String::new() }])
            .is_empty()
}

/// A StatefulSet change the operator set back: the Event's text, and the object as it was
/// (its resource version tells one change from the next).
#[derive(Clone, Debug, PartialEq)]
pub struct Reverted {
    pub note: String,
    pub resource_version: Option<String>,
}

/// The Warning's text: what changed, from what to what, and by whom when the managed fields say
/// (`scaled`: spec.replicas changed through /scale, which leaves no manager).
pub fn describe_drift(name: &str, changes: &[Change], managers: &[String], scaled: bool) -> String {
    let mut listed: Vec<String> = changes
        .iter()
        .take(CHANGES_SHOWN)
        .map(|c| format!("{} {} (set back to {})", c.path, c.found, c.applied))
        .collect();
    if changes.len() > CHANGES_SHOWN {
        listed.push(format!("and {} more", changes.len() - CHANGES_SHOWN));
    }
    let mut who = Vec::new();
    if !managers.is_empty() {
        who.push(format!(" by {}", managers.join(", ")));
    }
    if scaled {
        who.push(" through the scale subresource (kubectl scale, an autoscaler or a downscaler)".to_string());
    }
    let who = who.join(" and");
    format!(
        "StatefulSet {name} was changed outside the RabbitCluster{who}: {}. Reverted: change the RabbitCluster \
         instead (spec.replicas 0 stops the cluster and keeps its data; `kubectl scale rabbitcluster` works)",
        listed.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changes_name_the_leaves_and_containers_by_name() {
        let before = json!({"replicas": 0, "template": {"spec": {"containers": [
            {"name": "rabbitmq", "image": "rabbitmq:4.3.99", "resources": {"limits": {"memory": "1Gi"}}}]}}});
        let after = json!({"replicas": 3, "template": {"spec": {"containers": [
            {"name": "rabbitmq", "image": "rabbitmq:4.3.6", "resources": {"limits": {"memory": "1Gi"}}}]}}});
        let changes = spec_changes(&before, &after);
        assert_eq!(
            changes,
            vec![
                Change { path: "spec.replicas".into(), found: "0".into(), applied: "3".into() },
                Change {
                    path: "spec.template.spec.containers[rabbitmq].image".into(),
                    found: "rabbitmq:4.3.99".into(),
                    applied: "rabbitmq:4.3.6".into()
                },
            ]
        );
        assert!(spec_changes(&after, &after).is_empty());
    }

    #[test]
    fn the_manager_that_took_a_changed_field_is_named() {
        let live: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "demo", "managedFields": [
                {"manager": "warren", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {}}}},
                {"manager": "kubectl", "operation": "Update", "subresource": "scale", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:replicas": {}}}},
                {"manager": "helm", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:labels": {}}}}
            ]}
        }))
        .expect("a StatefulSet");
        let changes = vec![Change { path: "spec.replicas".into(), found: "0".into(), applied: "3".into() }];
        let managers = changed_by(&live, &changes);
        assert_eq!(managers, ["kubectl (through /scale)"]);
        assert!(!replicas_unattributed(&live, &changes));
        let text = describe_drift("demo", &changes, &managers, false);
        assert!(text.contains("by kubectl (through /scale): spec.replicas 0 (set back to 3)"), "{text}");
        // Kubernetes 1.34 records no manager for a change through /scale.
        let text = describe_drift("demo", &changes, &[], true);
        assert!(
            text.contains(
                "through the scale subresource (kubectl scale, an autoscaler or a downscaler): spec.replicas 0"
            )
        );
    }

    /// `kubectl scale` (no manager) and `kubectl set image` read in one pass: both are named.
    #[test]
    fn a_scale_and_an_image_change_read_together_are_both_attributed() {
        let live: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "demo", "managedFields": [
                {"manager": "warren", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:template": {}}}},
                {"manager": "kubectl-set", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"rabbitmq\"}": {"f:image": {}}}}}}}}
            ]}
        }))
        .expect("a StatefulSet");
        let changes = vec![
            Change { path: "spec.replicas".into(), found: "0".into(), applied: "3".into() },
            Change {
                path: "spec.template.spec.containers[rabbitmq].image".into(),
                found: "rabbitmq:4.1.99".into(),
                applied: "rabbitmq:4.3.6".into(),
            },
        ];
        let managers = changed_by(&live, &changes);
        assert_eq!(managers, ["kubectl-set"]);
        assert!(replicas_unattributed(&live, &changes));
        let text = describe_drift("demo", &changes, &managers, true);
        assert!(
            text.contains("outside the RabbitCluster by kubectl-set and through the scale subresource (kubectl scale"),
            "{text}"
        );
        assert!(
            text.contains("spec.replicas 0 (set back to 3); spec.template.spec.containers[rabbitmq].image"),
            "{text}"
        );
    }
}
