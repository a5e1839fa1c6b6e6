//! The operator's metrics: its reconciles, and what users chart per RabbitCluster and per
//! RabbitMigration. The per-object gauges are read from the controllers' stores at each scrape, so
//! a deleted object's series end with it and nothing is kept between scrapes. Labels stay bounded:
//! namespace and name of the object (and a condition's type and status); no label per queue or per
//! pod, which RabbitMQ's own rabbitmq_prometheus plugin has.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{MigrationPhase, RabbitCluster, RabbitMigration};
use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    migration_reconciles: Counter,
    migration_failures: Family<ErrorLabels, Counter>,
    objects: ObjectGauges,
}

/// Which controller a reconcile belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerKind {
    RabbitCluster,
    RabbitMigration,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        let migration_reconciles = Counter::default();
        let migration_failures = Family::<ErrorLabels, Counter>::default();
        let objects = ObjectGauges::default();
        registry.register("reconciles", "RabbitCluster reconciles", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by error", failures.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile", duration.clone());
        registry.register("rabbitmigration_reconciles", "RabbitMigration reconciles", migration_reconciles.clone());
        registry.register(
            "rabbitmigration_reconcile_failures",
            "Failed RabbitMigration reconciles by error",
            migration_failures.clone(),
        );
        registry.register_collector(Box::new(objects.clone()));
        Self {
            registry: Arc::new(registry),
            reconciles,
            failures,
            duration,
            migration_reconciles,
            migration_failures,
            objects,
        }
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, controller: ControllerKind, elapsed: Duration, error: Option<&Error>) {
        let (reconciles, failures) = match controller {
            ControllerKind::RabbitCluster => {
                self.duration.observe(elapsed.as_secs_f64());
                (&self.reconciles, &self.failures)
            }
            ControllerKind::RabbitMigration => (&self.migration_reconciles, &self.migration_failures),
        };
        reconciles.inc();
        if let Some(error) = error {
            failures.get_or_create(&ErrorLabels { error: error.metric_label() }).inc();
        }
    }

    /// From now on, scrapes describe the objects in these stores (the leader's; a standby has
    /// none and reports only its own counters).
    pub fn watch_stores(&self, clusters: Store<RabbitCluster>, migrations: Store<RabbitMigration>) {
        *self.objects.stores.write().unwrap_or_else(|e| e.into_inner()) = Some((clusters, migrations));
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

type Stores = (Store<RabbitCluster>, Store<RabbitMigration>);

/// Gauges per RabbitCluster and per RabbitMigration, computed from the stores at each scrape.
#[derive(Clone, Debug, Default)]
struct ObjectGauges {
    stores: Arc<RwLock<Option<Stores>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    namespace: String,
    name: String,
    #[prometheus(flatten)]
    condition: ConditionKey,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionKey {
    r#type: String,
    status: &'static str,
}

/// One gauge family: its samples, by label set.
struct Gauges<L> {
    name: &'static str,
    help: &'static str,
    samples: Vec<(L, i64)>,
}

impl<L: EncodeLabelSet> Gauges<L> {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help, samples: Vec::new() }
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.samples.is_empty() {
            return Ok(());
        }
        let mut family =
            encoder.encode_descriptor(self.name, self.help, None, prometheus_client::metrics::MetricType::Gauge)?;
        for (labels, value) in &self.samples {
            ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

fn labels(object: &impl ResourceExt) -> ObjectLabels {
    ObjectLabels { namespace: object.namespace().unwrap_or_default(), name: object.name_any() }
}

/// One sample per condition status a Kubernetes condition can have, 1 for the current one (as
/// kube-state-metrics does): `== 1` selects, and a condition that flips never leaves two series at 1.
fn condition_samples(object: &ObjectLabels, condition: &Condition) -> [(ConditionLabels, i64); 3] {
    ["True", "False", "Unknown"].map(|status| {
        let labels = ConditionLabels {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            condition: ConditionKey { r#type: condition.type_.clone(), status: status_label(status) },
        };
        (labels, i64::from(condition.status == status))
    })
}

fn status_label(status: &str) -> &'static str {
    match status {
        "True" => "true",
        "False" => "false",
        _ => "unknown",
    }
}

impl Collector for ObjectGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((clusters, migrations)) = self.stores.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mut desired = Gauges::new("cluster_replicas_desired", "Replicas a RabbitCluster asks for (spec.replicas)");
        let mut ready = Gauges::new("cluster_replicas_ready", "Pods of a RabbitCluster ready to serve");
        let mut members = Gauges::new("cluster_members_running", "Running members of the RabbitMQ cluster");
        let mut partitions =
            Gauges::new("cluster_partitioned_nodes", "Nodes of a RabbitCluster that report a network partition");
        let mut conditions = Gauges::new(
            "cluster_status_condition",
            "A RabbitCluster's status conditions: 1 for the status each condition has",
        );
        let mut all = clusters.state();
        all.sort_by_key(|c| (c.namespace(), c.name_any()));
        for cluster in all {
            let key = labels(cluster.as_ref());
            desired.samples.push((key.clone(), i64::from(cluster.spec.replicas)));
            let status = cluster.status.clone().unwrap_or_default();
            ready.samples.push((key.clone(), i64::from(status.ready_replicas)));
            members.samples.push((key.clone(), status.members.len() as i64));
            if let Some(count) = status.partitioned_nodes {
                partitions.samples.push((key.clone(), count as i64));
            }
            for condition in &status.conditions {
                conditions.samples.extend(condition_samples(&key, condition));
            }
        }
        let mut moved =
            Gauges::new("migration_messages_moved", "Messages a RabbitMigration moved (published, confirmed, acked)");
        let mut left = Gauges::new("migration_messages_left", "Ready messages a RabbitMigration left on the source");
        let mut succeeded = Gauges::new("migration_succeeded", "1 when a RabbitMigration succeeded, 0 when it failed");
        let mut all = migrations.state();
        all.sort_by_key(|m| (m.namespace(), m.name_any()));
        for migration in all {
            let key = labels(migration.as_ref());
            let Some(status) = &migration.status else { continue };
            // Counts exist once the Job has reported (it writes them when it ends).
            if let Some(count) = status.moved {
                moved.samples.push((key.clone(), count as i64));
                left.samples.push((key.clone(), status.queues.iter().map(|q| q.left).sum::<u64>() as i64));
            }
            match status.phase {
                Some(MigrationPhase::Succeeded) => succeeded.samples.push((key, 1)),
                Some(MigrationPhase::Failed) => succeeded.samples.push((key, 0)),
                _ => {}
            }
        }
        desired.encode(&mut encoder)?;
        ready.encode(&mut encoder)?;
        members.encode(&mut encoder)?;
        partitions.encode(&mut encoder)?;
        conditions.encode(&mut encoder)?;
        moved.encode(&mut encoder)?;
        left.encode(&mut encoder)?;
        succeeded.encode(&mut encoder)
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store;
    use kube::runtime::watcher::Event;

    use super::*;

    fn cluster(namespace: &str, name: &str, status: serde_json::Value) -> RabbitCluster {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"replicas": 3},
            "status": status,
        }))
        .expect("a RabbitCluster")
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason, "message": message,
                           "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn per_object_gauges_come_from_the_stores_with_namespace_and_name_only() {
        let metrics = Metrics::default();
        assert!(!metrics.encode().contains("warren_cluster_"), "no store yet (a standby): no per-object series");
        let (clusters, mut cluster_writer) = store::<RabbitCluster>();
        let (migrations, mut migration_writer) = store::<RabbitMigration>();
        cluster_writer.apply_watcher_event(&Event::Apply(cluster(
            "apps",
            "orders",
            serde_json::json!({"readyReplicas": 2, "replicas": 3, "members": ["rabbit@orders-0", "rabbit@orders-1"],
                "partitionedNodes": 2,
                "conditions": [
                    condition("Ready", "False", "NotReady", "2/3 pods ready"),
                    condition("NoPartitions", "False", "PartitionDetected",
                              "rabbit@orders-0: partitioned from rabbit@orders-1; rabbit@orders-1: partitioned from rabbit@orders-0"),
                ]}),
        )));
        cluster_writer.apply_watcher_event(&Event::Apply(cluster("apps", "fresh", serde_json::json!(null))));
        migration_writer.apply_watcher_event(&Event::Apply(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitMigration",
                "metadata": {"namespace": "apps", "name": "drain"},
                "spec": {"source": {"host": "old", "credentialsSecret": "old"}, "target": {"clusterRef": "orders"}},
                "status": {"phase": "Failed", "moved": 90, "queues": [
                    {"vhost": "/", "name": "a", "total": 60, "moved": 50, "left": 10, "refused": 0},
                    {"vhost": "/", "name": "b", "total": 45, "moved": 40, "left": 5, "refused": 0}]},
            }))
            .expect("a RabbitMigration"),
        ));
        metrics.watch_stores(clusters, migrations);
        let text = metrics.encode();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        for expected in [
            r#"warren_cluster_replicas_desired{namespace="apps",name="fresh"} 3"#,
            r#"warren_cluster_replicas_desired{namespace="apps",name="orders"} 3"#,
            r#"warren_cluster_replicas_ready{namespace="apps",name="orders"} 2"#,
            r#"warren_cluster_replicas_ready{namespace="apps",name="fresh"} 0"#,
            r#"warren_cluster_members_running{namespace="apps",name="orders"} 2"#,
            r#"warren_cluster_partitioned_nodes{namespace="apps",name="orders"} 2"#,
            r#"warren_cluster_status_condition{namespace="apps",name="orders",type="Ready",status="false"} 1"#,
            r#"warren_cluster_status_condition{namespace="apps",name="orders",type="Ready",status="true"} 0"#,
            r#"warren_cluster_status_condition{namespace="apps",name="orders",type="Ready",status="unknown"} 0"#,
            r#"warren_migration_messages_moved{namespace="apps",name="drain"} 90"#,
            r#"warren_migration_messages_left{namespace="apps",name="drain"} 15"#,
            r#"warren_migration_succeeded{namespace="apps",name="drain"} 0"#,
        ] {
            assert!(lines.contains(&expected), "{expected} missing from:\n{text}");
        }
        // Partitions unknown until the broker was checked: no sample rather than a false 0.
        assert!(!text.contains(r#"warren_cluster_partitioned_nodes{namespace="apps",name="fresh"}"#), "{text}");
        assert!(text.contains("# TYPE warren_cluster_replicas_ready gauge"), "{text}");
        // Bounded labels: nothing but namespace, name and a condition's type and status.
        for line in &lines {
            if line.starts_with("warren_cluster_") || line.starts_with("warren_migration_") {
                let labels = line.split_once('{').and_then(|(_, rest)| rest.split_once('}')).map(|(l, _)| l);
                for label in labels.unwrap_or_default().split(',') {
                    let key = label.split('=').next().unwrap_or_default();
                    assert!(["namespace", "name", "type", "status"].contains(&key), "label {key} in {line}");
                }
            }
        }
    }
}
