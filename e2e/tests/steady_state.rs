//! What the operator costs the API server when nothing changes, how status follows the spec, and
//! how it behaves when another field manager takes a field it owns.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};

use testkit::control_plane::cluster::{self, additional_config, config_map, manifest, wait_condition};
use testkit::control_plane::operator::Operator;
use testkit::control_plane::{
    TestNamespace, Write, admin_client, describe, ensure_crds, is_read, kubectl, kubectl_stdin, ok, requests_by,
    wait_for, writes_by,
};

const NAME: &str = "demo";

/// Makes the operator reconcile once more (a metadata change of its own object or of a child, not
/// a spec change) and waits until it has.
async fn nudge(operator: &Operator, target: &[&str], round: usize) {
    let before = operator.reconciles().await;
    let mut args = vec!["annotate", "--overwrite", "-n", &operator.namespace];
    args.extend_from_slice(target);
    let note = format!("e2e.warren.dev/nudge={round}");
    args.push(&note);
    ok("kubectl annotate", kubectl(&args));
    wait_for("a reconcile after the nudge", Duration::from_secs(30), || async {
        let now = operator.reconciles().await;
        if now > before { Ok(()) } else { Err(format!("{now} reconciles")) }
    })
    .await;
}

async fn settled(client: &Client, operator: &Operator, replicas: i32) {
    wait_condition(client, &operator.namespace, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    // The StatefulSet controller has made the pods, so the status the operator reports is final.
    wait_for(&format!("status.replicas = {replicas}"), Duration::from_secs(60), || async {
        let c = cluster::get(client, &operator.namespace, NAME).await;
        match c.status.as_ref().map(|s| s.replicas) {
            Some(r) if r == replicas => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The requests of `user` a reconcile makes: all but the Lease of leader election.
fn reconcile_requests(user: &str) -> Vec<Write> {
    requests_by(user).into_iter().filter(|r| r.resource != "leases").collect()
}

#[tokio::test]
async fn a_steady_cluster_costs_no_writes_and_no_reads() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-steady").await;
    let operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, ""));
    settled(&client, &operator, 3).await;
    nudge(&operator, &["rabbitcluster", NAME], 0).await;

    let before = reconcile_requests(&operator.user);
    let reconciles_before = operator.reconciles().await;
    for round in 1..=3 {
        nudge(&operator, &["rabbitcluster", NAME], round).await;
    }
    nudge(&operator, &["configmap", "demo-config"], 4).await;
    nudge(&operator, &["statefulset", NAME], 5).await;
    let after = reconcile_requests(&operator.user);
    let reconciles = operator.reconciles().await - reconciles_before;
    assert!(reconciles >= 5, "expected at least 5 reconciles, the operator counted {reconciles}");
    let (reads, writes): (Vec<Write>, Vec<Write>) = after[before.len()..].iter().cloned().partition(is_read);
    assert!(writes.is_empty(), "{reconciles} reconciles of an unchanged cluster wrote:\n  {}", describe(&writes));
    assert!(
        reads.is_empty(),
        "{reconciles} reconciles of an unchanged cluster read from the API server (the stores have it all):\n  {}",
        describe(&reads)
    );
    // The reads audited are real: the operator's first pass confirmed each absent child with one.
    assert!(
        before.iter().any(|r| is_read(r) && r.resource == "statefulsets"),
        "no read of the operator in the audit log at all: is e2e/audit-policy.yaml logging reads?"
    );
}

/// Status is applied whole: a warning the spec no longer earns goes, and status is written once per
/// change, not per pass.
#[tokio::test]
async fn a_warning_that_no_longer_applies_is_cleared() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-warning").await;
    let operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 4, ""));
    let warned = wait_for("a warning about 4 replicas", Duration::from_secs(60), || async {
        let c = cluster::get(&client, &ns.name, NAME).await;
        let warnings = c.status.as_ref().map(|s| s.warnings.clone()).unwrap_or_default();
        if warnings.iter().any(|w| w.contains('4')) { Ok(warnings) } else { Err(format!("{warnings:?}")) }
    })
    .await;
    eprintln!("with 4 replicas: {warned:?}");

    cluster::patch(&ns.name, NAME, r#"{"spec":{"replicas":5}}"#);
    wait_for("status of generation 2 without warnings", Duration::from_secs(60), || async {
        let c = cluster::get(&client, &ns.name, NAME).await;
        let status = c.status.clone().unwrap_or_default();
        if status.observed_generation == Some(2) && status.warnings.is_empty() {
            Ok(())
        } else {
            Err(format!("generation {:?}, warnings {:?}", status.observed_generation, status.warnings))
        }
    })
    .await;
    // Gone from the object, not merely emptied.
    let raw = ok("kubectl get", kubectl(&["get", "rabbitcluster", NAME, "-n", &ns.name, "-o", "json"]));
    let raw: serde_json::Value = serde_json::from_str(&raw).expect("JSON");
    assert!(raw["status"].get("warnings").is_none(), "status.warnings still there: {}", raw["status"]);

    // Unchanged from here on: reconciles write no status.
    settled(&client, &operator, 5).await;
    let status_writes = || writes_by(&operator.user).into_iter().filter(|w| w.resource == "rabbitclusters").count();
    let before = status_writes();
    for round in 1..=3 {
        nudge(&operator, &["rabbitcluster", NAME], round).await;
    }
    assert_eq!(status_writes(), before, "an unchanged cluster had its status written again");
}

#[tokio::test]
async fn a_conflicting_field_manager_is_reported_not_fought() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-conflict").await;
    let operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    settled(&client, &operator, 3).await;

    // Someone else takes the operator's rabbitmq.conf lines, forcing the conflict.
    let intruder = |data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo-config\n  namespace: {}\n{data}", ns.name)
    };
    ok(
        "intruder apply",
        kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "--field-manager=intruder", "-f", "-"],
            &intruder("data:\n  90-additional.conf: \"consumer_timeout = 1\\n\"\n"),
        ),
    );
    // The operator leaves a field it did not change alone; a spec change makes it apply again.
    cluster::patch(&ns.name, NAME, r#"{"spec":{"rabbitmq":{"additionalConfig":"consumer_timeout = 7200000\n"}}}"#);
    let refused = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "False", Some("FieldConflict")).await;
    let message = cluster::condition(&refused, "ReconcileSuccess").map(|c| c.message.clone()).unwrap_or_default();
    assert!(
        message.contains("ConfigMap demo-config") && message.contains("intruder"),
        "the condition must name the object and the other field manager: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let events = events.list(&ListParams::default()).await.expect("events");
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("FieldConflict") && e.type_.as_deref() == Some("Warning")),
        "no FieldConflict Warning Event"
    );

    // Not fought: each new attempt waits longer than the one before.
    let conflicts = |writes: Vec<Write>| -> Vec<Write> {
        writes.into_iter().filter(|w| w.resource == "configmaps" && w.code == 409).collect()
    };
    let attempts = wait_for("4 apply attempts", Duration::from_secs(90), || async {
        let seen = conflicts(writes_by(&operator.user));
        if seen.len() >= 4 { Ok(seen) } else { Err(format!("{} so far", seen.len())) }
    })
    .await;
    let gaps: Vec<f64> =
        attempts.windows(2).map(|p| (p[1].at - p[0].at).total(jiff::Unit::Second).unwrap_or(0.0)).collect();
    // The first retry may follow at once (the operator's own status write is a watch event); then
    // the backoff doubles: 5 s, 10 s, 20 s, ... up to 5 minutes.
    assert!(
        gaps[1] >= 4.0 && gaps[2] >= gaps[1] * 1.5,
        "retries after a conflict are not backing off: gaps {gaps:?} s"
    );
    assert_eq!(
        additional_config(&config_map(&client, &ns.name, NAME).await),
        "consumer_timeout = 1\n",
        "the operator overrode the other field manager"
    );

    // The other manager gives the field up: the operator applies the spec and reports success.
    ok(
        "intruder releases its fields",
        kubectl_stdin(&["apply", "--server-side", "--field-manager=intruder", "-f", "-"], &intruder("")),
    );
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    assert_eq!(additional_config(&config_map(&client, &ns.name, NAME).await), "consumer_timeout = 7200000\n");
}
