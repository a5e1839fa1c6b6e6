//! PodDisruptionBudget: a voluntary disruption (node drain, upgrade) takes one RabbitMQ node at a time.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{child_meta, selector_labels};
use crate::controller::validate::ValidatedCluster;

pub fn pod_disruption_budget(cluster: &ValidatedCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(cluster, &cluster.name),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&cluster.name)), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
