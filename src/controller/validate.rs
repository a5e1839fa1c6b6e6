//! Step 1 of reconcile: a RabbitCluster's spec becomes a `ValidatedCluster`, or a clear error.
//! Pure: no client. What the CRD schema already rejects is checked again here so that `warren
//! render` and a cluster with an older CRD give the same answer.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodAffinityTerm, PodAntiAffinity, ResourceRequirements, Toleration,
    TopologySpreadConstraint, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::api::{
    FEATURE_FLAGS_ANNOTATION, HighAvailabilityMode, HighAvailabilitySpec, NetworkPolicySpec, NodeSpread,
    PartitionHandling, RabbitCluster, RabbitClusterSpec, ServiceSpec, TlsSpec,
};
use crate::error::{Error, Result, SpecReason};
use crate::rabbitmq::ha;
use crate::rabbitmq::version::RabbitVersion;

/// Settings of the operator itself that shape the objects it builds.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The Kubernetes cluster's DNS domain, part of every RabbitMQ node name.
    pub cluster_domain: String,
    /// The namespace the operator runs in (its pod's): the NetworkPolicy lets it reach the
    /// management API. None (run outside the cluster): the management API is not fenced.
    pub operator_namespace: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { cluster_domain: "cluster.local".into(), operator_namespace: None }
    }
}

/// Plugins every node runs: the operator needs the management API, users need metrics.
pub const ALWAYS_ENABLED_PLUGINS: [&str; 2] = ["rabbitmq_management", "rabbitmq_prometheus"];

/// rabbitmq.conf keys the operator sets itself; additionalConfig may not override them.
const OPERATOR_OWNED_KEYS: [&str; 3] = ["cluster_partition_handling", "default_user", "default_pass"];

/// RabbitMQ's share of the container memory limit (its default relative watermark).
const MEMORY_WATERMARK_FRACTION: f64 = 0.4;

/// A spec that passed every check, with defaults resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCluster {
    pub name: String,
    pub namespace: String,
    pub owner: OwnerReference,
    pub replicas: i32,
    /// The broker has reported members before (status): a node 0 that boots without data must join
    /// them, never seed a new, empty cluster (bootstrap.sh, the ConfigMap's `formed`).
    pub formed: bool,
    pub image: String,
    /// The version the image tag names, if it names one.
    pub image_version: Option<RabbitVersion>,
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub storage: Quantity,
    pub storage_class_name: Option<String>,
    pub resources: ResourceRequirements,
    pub memory_watermark_bytes: Option<u64>,
    pub affinity: Affinity,
    /// `spec.spread.zones`: an even spread over the zones.
    pub topology_spread: Vec<TopologySpreadConstraint>,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    pub service: ServiceSpec,
    pub plugins: Vec<String>,
    pub additional_config: String,
    pub advanced_config: String,
    pub partition_handling: PartitionHandling,
    pub high_availability: HighAvailabilitySpec,
    pub tls: Option<TlsSpec>,
    pub network_policy: NetworkPolicySpec,
    pub operator_namespace: Option<String>,
    pub cluster_domain: String,
    pub warnings: Vec<String>,
}

fn invalid(reason: SpecReason, message: impl Into<String>) -> Error {
    Error::InvalidSpec { reason, message: message.into() }
}

/// Checks a RabbitCluster and resolves its defaults.
pub fn validate(cluster: &RabbitCluster, settings: &Settings) -> Result<ValidatedCluster> {
    let name = cluster.name_any();
    let namespace = cluster
        .namespace()
        .ok_or_else(|| invalid(SpecReason::InvalidSpec, "metadata.namespace: a RabbitCluster is namespaced"))?;
    let owner = cluster.controller_owner_ref(&()).ok_or_else(|| {
        invalid(SpecReason::InvalidSpec, "metadata.uid: missing (the object was not read from the API)")
    })?;
    let spec = &cluster.spec;

    if name.len() > 42 || !is_dns_1035_label(&name) {
        return Err(invalid(
            SpecReason::InvalidName,
            format!("metadata.name {name:?}: must be a DNS-1035 label of at most 42 characters"),
        ));
    }
    if spec.replicas < 0 {
        return Err(invalid(
            SpecReason::InvalidReplicas,
            format!("spec.replicas: {} is below 0 (0 stops every node and keeps the data)", spec.replicas),
        ));
    }
    let image = spec.image.trim().to_string();
    if image.is_empty() {
        return Err(invalid(SpecReason::InvalidImage, "spec.image: must not be empty"));
    }
    let image_version = RabbitVersion::from_image(&image);

    let storage_bytes = parse_quantity_bytes(&spec.persistence.storage).map_err(|e| {
        invalid(SpecReason::InvalidStorage, format!("spec.persistence.storage {:?}: {e}", spec.persistence.storage))
    })?;
    if storage_bytes == 0 {
        return Err(invalid(SpecReason::InvalidStorage, "spec.persistence.storage: must be larger than zero"));
    }

    let resources = spec.resources.clone().unwrap_or_else(default_resources);
    let memory_watermark_bytes = memory_watermark(&resources)?;
    check_additional_config(&spec.rabbitmq.additional_config)?;
    let plugins = plugins(&spec.rabbitmq.plugins)?;

    check_high_availability(&spec.high_availability, image_version)?;
    if let Some(tls) = &spec.tls
        && tls.secret_name.trim().is_empty()
    {
        return Err(invalid(SpecReason::InvalidTls, "spec.tls.secretName: must not be empty"));
    }

    let warnings = warnings(spec, &image, image_version);
    if spec.affinity.is_some() && spec.spread.nodes == NodeSpread::Required {
        return Err(invalid(
            SpecReason::InvalidSpec,
            "spec.spread.nodes: Required sets the pods' anti-affinity, and spec.affinity replaces it: remove \
             spec.affinity, or put a required anti-affinity in it and leave spec.spread.nodes out",
        ));
    }
    let affinity = spec.affinity.clone().unwrap_or_else(|| spread_over_nodes(&name, spec.spread.nodes));
    let topology_spread = if spec.spread.zones { vec![spread_over_zones(&name)] } else { Vec::new() };
    Ok(ValidatedCluster {
        name,
        namespace,
        owner,
        replicas: spec.replicas,
        formed: cluster.status.as_ref().is_some_and(|s| !s.members.is_empty()),
        image,
        image_version,
        image_pull_secrets: spec.image_pull_secrets.clone(),
        storage: Quantity(spec.persistence.storage.clone()),
        storage_class_name: spec.persistence.storage_class_name.clone(),
        resources,
        memory_watermark_bytes,
        affinity,
        topology_spread,
        tolerations: spec.tolerations.clone(),
        node_selector: spec.node_selector.clone(),
        service: spec.service.clone(),
        plugins,
        additional_config: spec.rabbitmq.additional_config.clone(),
        advanced_config: spec.rabbitmq.advanced_config.clone(),
        partition_handling: spec.partition_handling,
        high_availability: spec.high_availability.clone(),
        tls: spec.tls.clone(),
        network_policy: spec.network_policy.clone(),
        operator_namespace: settings.operator_namespace.clone(),
        cluster_domain: settings.cluster_domain.clone(),
        warnings,
    })
}

/// What the spec allows but a user should hear about: status keeps them, each one an Event once.
fn warnings(spec: &RabbitClusterSpec, image: &str, image_version: Option<RabbitVersion>) -> Vec<String> {
    let mut warnings = Vec::new();
    if spec.replicas > 0 && spec.replicas % 2 == 0 {
        warnings.push(format!(
            "spec.replicas is {}: with an even count a partition can split the cluster in halves, and \
             pause_minority then pauses both; use an odd count",
            spec.replicas
        ));
    }
    if let Some(copies) = spec.high_availability.classic_mirroring.ha_params
        && copies > spec.replicas
    {
        warnings.push(format!(
            "highAvailability.classicMirroring.haParams is {copies} but only {} replicas run: every node holds a copy",
            spec.replicas
        ));
    }
    if let Some(version) = image_version
        && !version.honours_partition_handling()
        && spec.partition_handling != PartitionHandling::PauseMinority
    {
        warnings.push(format!(
            "spec.partitionHandling {} has no effect on RabbitMQ {version}: its metadata and queues are Raft groups \
             (Khepri), and a partitioned minority always stops accepting writes",
            spec.partition_handling.as_config_value()
        ));
    }
    if image_version.is_none() {
        warnings.push(format!(
            "spec.image {image:?} names no version in its tag: the HA mechanism is chosen once the broker reports its \
             version, and a change of image cannot be checked before the pods run it (a skipped minor version or a \
             downgrade is not refused); pin a version tag"
        ));
    }
    warnings
}

/// The memory high watermark: a fraction of the container's memory limit, when there is one.
fn memory_watermark(resources: &ResourceRequirements) -> Result<Option<u64>> {
    let Some(limit) = resources.limits.as_ref().and_then(|l| l.get("memory")) else { return Ok(None) };
    let bytes = parse_quantity_bytes(&limit.0).map_err(|e| {
        invalid(SpecReason::InvalidResources, format!("spec.resources.limits.memory {:?}: {e}", limit.0))
    })?;
    Ok(Some((bytes as f64 * MEMORY_WATERMARK_FRACTION) as u64))
}

/// The plugins to enable: those every node needs and the spec's, each a plugin name, sorted.
fn plugins(asked: &[String]) -> Result<Vec<String>> {
    let mut plugins: Vec<String> = ALWAYS_ENABLED_PLUGINS.iter().map(|p| p.to_string()).collect();
    for plugin in asked {
        if plugin.is_empty() || !plugin.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err(invalid(
                SpecReason::InvalidPlugin,
                format!("spec.rabbitmq.plugins: {plugin:?} is not a plugin name"),
            ));
        }
        if !plugins.contains(plugin) {
            plugins.push(plugin.clone());
        }
    }
    plugins.sort();
    Ok(plugins)
}

fn is_dns_1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_lowercase()
        && bytes.last().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn check_high_availability(spec: &HighAvailabilitySpec, image_version: Option<RabbitVersion>) -> Result<()> {
    let mirroring = &spec.classic_mirroring;
    match (mirroring.ha_mode, mirroring.ha_params) {
        (crate::api::HaMode::Exactly, None) => {
            return Err(invalid(
                SpecReason::InvalidHighAvailability,
                "highAvailability.classicMirroring.haParams: required when haMode is exactly",
            ));
        }
        (crate::api::HaMode::Exactly, Some(copies)) if copies < 2 => {
            return Err(invalid(
                SpecReason::InvalidHighAvailability,
                format!("highAvailability.classicMirroring.haParams: {copies} is below 2 (a leader and one mirror)"),
            ));
        }
        (crate::api::HaMode::All, Some(_)) => {
            return Err(invalid(
                SpecReason::InvalidHighAvailability,
                "highAvailability.classicMirroring.haParams: only allowed when haMode is exactly",
            ));
        }
        _ => {}
    }
    if mirroring.policy_name.trim().is_empty() || regex::Regex::new(&mirroring.pattern).is_err() {
        return Err(invalid(
            SpecReason::InvalidHighAvailability,
            format!(
                "highAvailability.classicMirroring: policyName must not be empty and pattern {:?} must be a regular expression",
                mirroring.pattern
            ),
        ));
    }
    // With the image's version known, refuse now what the broker would refuse later.
    if let Some(version) = image_version
        && spec.mode != HighAvailabilityMode::Auto
    {
        ha::plan(spec, version).map_err(|refusal| invalid(refusal.reason, refusal.message))?;
    }
    Ok(())
}

fn check_additional_config(config: &str) -> Result<()> {
    for (index, line) in config.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((key, _value)) = trimmed.split_once('=') else {
            return Err(invalid(
                SpecReason::InvalidConfig,
                format!("spec.rabbitmq.additionalConfig line {}: {trimmed:?} is not `key = value`", index + 1),
            ));
        };
        let key = key.trim();
        if OPERATOR_OWNED_KEYS.contains(&key) || key.starts_with("listeners.") {
            return Err(invalid(
                SpecReason::InvalidConfig,
                format!(
                    "spec.rabbitmq.additionalConfig line {}: {key} is set by the operator (use the spec's own field)",
                    index + 1
                ),
            ));
        }
    }
    Ok(())
}

/// 1 CPU and 2Gi, as RabbitMQ's production checklist starts from; the memory limit equals the request
/// so that the watermark derived from it holds.
fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("1".into())),
            ("memory".to_string(), Quantity("2Gi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("2Gi".into()))])),
        ..Default::default()
    }
}

/// One replica per Kubernetes node, preferred or required: losing a node then takes one replica,
/// not two.
fn spread_over_nodes(name: &str, spread: NodeSpread) -> Affinity {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(super::build::selector_labels(name)),
            ..Default::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..Default::default()
    };
    let anti_affinity = match spread {
        NodeSpread::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }]),
            ..Default::default()
        },
        NodeSpread::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..Default::default()
        },
    };
    Affinity { pod_anti_affinity: Some(anti_affinity), ..Default::default() }
}

/// At most one pod more in any zone than in another; a pod that would break it is not scheduled.
fn spread_over_zones(name: &str) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".into(),
        when_unsatisfiable: "DoNotSchedule".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(super::build::selector_labels(name)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Parses a Kubernetes quantity into bytes (`10Gi`, `512Mi`, `1G`, `1.5Gi`, `1073741824`).
pub fn parse_quantity_bytes(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        other => return Err(format!("unknown unit {other:?} (use Ki, Mi, Gi, Ti or k, M, G, T)")),
    };
    let value: f64 = number.parse().map_err(|_| "not a number followed by a unit, e.g. 10Gi".to_string())?;
    Ok((value * multiplier).round() as u64)
}

/// Refuses an image whose RabbitMQ version the running pods cannot roll to: a skipped minor or a
/// downgrade (a same-minor patch change rolls the pods one at a time, each through preStop).
/// What the broker last reported that an in-place version change depends on (status).
#[derive(Clone, Debug, Default)]
pub struct RunningBroker {
    pub version: Option<RabbitVersion>,
    pub disabled_feature_flags: Vec<String>,
    pub mirrored_classic_queues: Vec<String>,
}

/// Refuses turning the Erlang distribution's TLS on or off while pods run: the StatefulSet would
/// roll one pod at a time, and a node on either side of the change cannot reach the others, so
/// the roll-out would stall with the cluster split. Stopped (0 replicas), every pod starts anew.
pub fn check_inter_node_change(
    running: Option<bool>,
    running_replicas: Option<i32>,
    cluster: &ValidatedCluster,
) -> Result<()> {
    let wanted = TlsSpec::inter_node(cluster.tls.as_ref());
    let (Some(runs), Some(replicas)) = (running, running_replicas) else { return Ok(()) };
    if runs == wanted || replicas == 0 {
        return Ok(());
    }
    let (from, to) = if runs { ("TLS", "plain") } else { ("plain", "TLS") };
    Err(invalid(
        SpecReason::InterNodeTlsChange,
        format!(
            "spec.tls.interNode: the {replicas} running nodes speak {from} Erlang distribution; rolling them to {to} \
             one at a time would leave nodes that cannot reach each other. Stop the cluster first (spec.replicas: 0 \
             keeps its data), change spec.tls.interNode, then scale back"
        ),
    ))
}

pub fn check_in_place_upgrade(running: &RunningBroker, cluster: &ValidatedCluster) -> Result<()> {
    let (Some(from), Some(to)) = (running.version, cluster.image_version) else { return Ok(()) };
    let disabled_flags = &running.disabled_feature_flags;
    let refused = |why: String| Error::UpgradeRefused { from: from.to_string(), to: to.to_string(), why };
    from.in_place_change_to(to).map_err(|refusal| refused(refusal.0))?;
    if from.has_classic_mirroring() && !to.has_classic_mirroring() && !running.mirrored_classic_queues.is_empty() {
        return Err(refused(format!(
            "RabbitMQ {to} has no classic queue mirroring, and the classic queues {} are mirrored: they would \
             keep one copy each (and the operator would remove the mirroring policy). Move them into quorum \
             queues first, or with a RabbitMigration, which converts them",
            running.mirrored_classic_queues.join(", ")
        )));
    }
    let blocking = from.flags_blocking(to, disabled_flags);
    if blocking.is_empty() {
        return Ok(());
    }
    let mut why = format!(
        "feature flags {} are still disabled, and RabbitMQ {to} does not boot without them",
        blocking.join(", ")
    );
    if blocking.iter().any(|f| f == "khepri_db") {
        why.push_str(&format!(
            " (khepri_db moves the metadata from Mnesia to Khepri and is enabled only on request: annotate the \
             RabbitCluster {FEATURE_FLAGS_ANNOTATION}=khepri_db and wait until status.disabledFeatureFlags no \
             longer lists it)"
        ));
    }
    if blocking.iter().any(|f| f != "khepri_db") {
        why.push_str(&format!(
            "; the operator enables the stable ones once every pod runs {from} and is ready: wait for that"
        ));
    }
    Err(refused(why))
}
