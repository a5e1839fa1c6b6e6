//! A RabbitMigration between two RabbitClusters of different generations — 3.10 with mirrored
//! classic queues into the default 4.x with quorum queues, the upgrade RabbitMQ cannot do in place —
//! run by the operator as a Job in the cluster (the warren image built here), moving every message.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use warren::api::{MigrationPhase, RabbitMigration};

use crate::observability::Prometheus;
use crate::rig::{Endpoint, POD_TIMEOUT, ensure_operator, generation_image, manifest, manifest_on, wait_ready};
use testkit::amqp;
use testkit::control_plane::cluster::apply;
use testkit::control_plane::{TestNamespace, admin_client, kubectl_stdin, ok, wait_for};

const QUEUES: [&str; 3] = ["celery", "emails", "reports"];
const PER_QUEUE: u32 = 1000;

#[tokio::test]
async fn a_migration_job_in_the_cluster_moves_every_message() {
    ensure_operator().await;
    let client = admin_client().await;
    let namespace = TestNamespace::create(&client, "node-migrate").await;
    let ns = namespace.name.clone();
    apply(&ns, &manifest_on("old", 1, &generation_image("3.10")));
    apply(&ns, &manifest("new", 1));
    wait_ready(&client, &ns, "old", 1).await;
    wait_ready(&client, &ns, "new", 1).await;

    let old = Endpoint::of(&client, &ns, "old").await;
    for (i, queue) in QUEUES.iter().enumerate() {
        old.declare_queue(queue).await;
        let first = i as u32 * PER_QUEUE;
        let (confirmed, error) = amqp::publish(&old.amqp(), queue, first..first + PER_QUEUE, 200).await;
        assert_eq!((confirmed.len(), error), (PER_QUEUE as usize, None), "publish to {queue}");
    }

    let migration = "apiVersion: warren.dev/v1alpha1\nkind: RabbitMigration\nmetadata:\n  name: old-to-new\nspec:\n  \
                     source:\n    clusterRef: old\n  target:\n    clusterRef: new\n";
    ok("kubectl apply RabbitMigration", kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], migration));
    let api: Api<RabbitMigration> = Api::namespaced(client.clone(), &ns);
    let done = wait_for("the migration Job to succeed", POD_TIMEOUT, || async {
        let m = api.get("old-to-new").await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        match status.phase {
            Some(MigrationPhase::Succeeded) => Ok(m),
            Some(MigrationPhase::Failed) => panic!("the migration failed: {status:?}"),
            _ => Err(format!("{status:?}")),
        }
    })
    .await;
    let status = done.status.expect("status");
    let complete = status.conditions.iter().find(|c| c.type_ == "Complete").expect("Complete condition");
    assert_eq!(complete.status, "True", "{complete:?}");
    // The Job's own summary, read back from its pod's termination message.
    assert_eq!(status.moved, Some(3 * PER_QUEUE as u64), "{status:?}");
    let queues: Vec<_> =
        status.queues.iter().map(|q| (q.vhost.as_str(), q.name.as_str(), q.total, q.moved, q.left)).collect();
    let per_queue = PER_QUEUE as u64;
    assert_eq!(queues, QUEUES.map(|q| ("/", q, per_queue, per_queue, 0)), "{status:?}");
    // The default spec keeps HA: a target without classic mirroring (4.x) gets quorum queues, and
    // the status says each queue's type there; nothing lost HA.
    let quorum = crate::rig::default_is_quorum();
    let types: Vec<Option<&str>> = status.queues.iter().map(|q| q.target_type.as_deref()).collect();
    assert_eq!(types, [Some(if quorum { "quorum" } else { "classic" }); 3], "{status:?}");
    assert!(status.ha_lost.is_empty(), "{status:?}");
    // The same counts, as the operator exports them to Prometheus.
    let prometheus = Prometheus::of_node().await;
    let object = format!(r#"exported_namespace="{ns}",name="old-to-new""#);
    for (metric, value) in [("moved", 3.0 * PER_QUEUE as f64), ("left", 0.0)] {
        let promql = format!("max(warren_migration_messages_{metric}{{{object}}})");
        prometheus
            .wait(&format!("messages {metric}: {value}"), &promql, |s| s.first().is_some_and(|s| s.1 == value))
            .await;
    }

    let new = Endpoint::of(&client, &ns, "new").await;
    for queue in QUEUES {
        let info = new.get(&format!("queues/%2F/{queue}")).await.expect("queue on the target");
        assert_eq!(info["type"], if quorum { "quorum" } else { "classic" }, "{info}");
    }
    let policies = new.get("policies/%2F").await.expect("policies on the target");
    assert_eq!(policies.to_string().contains("\"ha-"), !quorum, "mirroring keys on the target: {policies}");
    for (i, queue) in QUEUES.iter().enumerate() {
        old.wait_depth(queue, 0).await;
        let first = i as u32 * PER_QUEUE;
        let got = amqp::drain(&new.amqp(), queue, PER_QUEUE as usize, Duration::from_secs(10)).await.expect("drain");
        let expected: BTreeMap<u32, u32> = (first..first + PER_QUEUE).map(|id| (id, 1)).collect();
        assert_eq!(got, expected, "{queue}: every message, once");
    }
}
