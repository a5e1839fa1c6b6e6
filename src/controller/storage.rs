//! `spec.persistence.storage` changed on a running cluster. A StatefulSet's claim template cannot
//! change (Kubernetes refuses the whole update), so the StatefulSet keeps the size it was made with
//! and every other change still applies; the claims themselves are expanded in place where their
//! StorageClass allows it (`allowVolumeExpansion`); a smaller size is refused (volumes never
//! shrink). What could not be done is a status warning and a Warning Event.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::build;
use super::dereference::Children;
use super::validate::{ValidatedCluster, parse_quantity_bytes};
use super::{Context, recover};

/// What a size change asks of the claims.
#[derive(Clone, Debug, PartialEq)]
pub enum Resize {
    /// The claims are of the size asked for (or there are none yet).
    None,
    /// Every claim grows to `to`.
    Expand { to: Quantity },
}

/// The size of the StatefulSet's claim template, when it exists.
pub fn template_storage(children: &Children) -> Option<Quantity> {
    children
        .stateful_set
        .as_ref()?
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(build::statefulset::DATA_VOLUME))?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .cloned()
}

/// Pure: the cluster to build keeps the template's size (immutable), and what to do with the
/// claims. A smaller size becomes a warning.
pub fn plan(mut cluster: ValidatedCluster, children: &Children) -> (ValidatedCluster, Resize) {
    let Some(template) = template_storage(children) else { return (cluster, Resize::None) };
    let (Ok(made), Ok(asked)) = (parse_quantity_bytes(&template.0), parse_quantity_bytes(&cluster.storage.0)) else {
        return (cluster, Resize::None);
    };
    let asked_for = std::mem::replace(&mut cluster.storage, template.clone());
    if asked > made {
        (cluster, Resize::Expand { to: asked_for })
    } else {
        if asked < made {
            cluster.warnings.push(format!(
                "spec.persistence.storage {} is smaller than the volumes' {}: volumes cannot shrink, the claims keep {}",
                asked_for.0, template.0, template.0
            ));
        }
        (cluster, Resize::None)
    }
}

fn requested(claim: &PersistentVolumeClaim) -> Option<u64> {
    let storage = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?.get("storage")?;
    parse_quantity_bytes(&storage.0).ok()
}

/// Grows every claim of the cluster smaller than the size asked for. Returns the claims grown (for
/// an Event); what the API server refused (a StorageClass without `allowVolumeExpansion`) becomes
/// a warning on `cluster`.
pub async fn expand(ctx: &Context, cluster: &mut ValidatedCluster, resize: &Resize) -> Vec<String> {
    let Resize::Expand { to } = resize else { return Vec::new() };
    let Ok(target) = parse_quantity_bytes(&to.0) else { return Vec::new() };
    let claims = match recover::claims(ctx, cluster).await {
        Ok(claims) => claims,
        Err(error) => {
            cluster.warnings.push(format!("spec.persistence.storage {}: {error}", to.0));
            return Vec::new();
        }
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &cluster.namespace);
    let mut grown = Vec::new();
    let mut refused = Vec::new();
    for (_, claim) in claims.iter().filter(|(_, c)| requested(c) < Some(target)) {
        let name = claim.name_any();
        let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": to.0}}}});
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => grown.push(name),
            Err(kube::Error::Api(status)) => refused.push(format!("{name}: {}", status.message)),
            Err(error) => refused.push(format!("{name}: {error}")),
        }
    }
    if !refused.is_empty() {
        cluster.warnings.push(format!(
            "spec.persistence.storage {}: claims not expanded (their StorageClass must allow volume expansion): {}",
            to.0,
            refused.join("; ")
        ));
    }
    grown
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use std::sync::Arc;

    fn children_of(storage: &str) -> Children {
        let stateful_set: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo"},
            "spec": {"selector": {}, "serviceName": "demo-nodes", "template": {},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                        "spec": {"resources": {"requests": {"storage": storage}}}}]}
        }))
        .expect("a StatefulSet");
        Children { stateful_set: Some(Arc::new(stateful_set)), ..Default::default() }
    }

    fn cluster(storage: &str) -> ValidatedCluster {
        let mut cluster: crate::api::RabbitCluster = serde_yaml::from_str(&format!(
            "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata: {{name: demo, namespace: default, uid: u}}\n\
             spec: {{persistence: {{storage: {storage}}}}}\n"
        ))
        .expect("a RabbitCluster");
        cluster.metadata.uid = Some("u".into());
        crate::controller::validate::validate(&cluster, &Default::default()).expect("valid")
    }

    #[test]
    fn a_larger_size_expands_the_claims_and_keeps_the_template() {
        let (built, resize) = plan(cluster("20Gi"), &children_of("10Gi"));
        assert_eq!(built.storage, Quantity("10Gi".into()), "the claim template is immutable");
        assert_eq!(resize, Resize::Expand { to: Quantity("20Gi".into()) });
        assert!(built.warnings.iter().all(|w| !w.contains("persistence")), "{:?}", built.warnings);
    }

    #[test]
    fn a_smaller_size_is_refused_with_a_warning_and_everything_else_applies() {
        let (built, resize) = plan(cluster("5Gi"), &children_of("10Gi"));
        assert_eq!((built.storage.0.as_str(), resize), ("10Gi", Resize::None));
        assert!(
            built.warnings.iter().any(|w| w.contains("5Gi is smaller than the volumes' 10Gi")),
            "{:?}",
            built.warnings
        );
    }

    #[test]
    fn the_same_size_in_other_units_or_a_new_cluster_changes_nothing() {
        let (built, resize) = plan(cluster("10240Mi"), &children_of("10Gi"));
        assert_eq!((built.storage.0.as_str(), resize), ("10Gi", Resize::None));
        let (built, resize) = plan(cluster("20Gi"), &Children::default());
        assert_eq!((built.storage.0.as_str(), resize), ("20Gi", Resize::None));
    }
}
