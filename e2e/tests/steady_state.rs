//! What the operator costs the API server when nothing changes, and how it behaves when another
//! field manager takes a field it owns.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::support::cluster::{self, additional_config, config_map, manifest, wait_condition};
use crate::support::operator::Operator;
use crate::support::{
    TestNamespace, Write, admin_client, describe, ensure_crds, kubectl, kubectl_stdin, ok, wait_for, writes_by,
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

async fn settled(client: &Client, operator: &Operator) {
    wait_condition(client, &operator.namespace, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    // The StatefulSet controller has made the pods, so the status the operator reports is final.
    wait_for("status.replicas = 3", Duration::from_secs(60), || async {
        let c = cluster::get(client, &operator.namespace, NAME).await;
        match c.status.as_ref().map(|s| s.replicas) {
            Some(3) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_steady_cluster_costs_no_writes() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-steady").await;
    let operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, ""));
    settled(&client, &operator).await;
    nudge(&operator, &["rabbitcluster", NAME], 0).await;

    let before = writes_by(&operator.user);
    let reconciles_before = operator.reconciles().await;
    for round in 1..=3 {
        nudge(&operator, &["rabbitcluster", NAME], round).await;
    }
    nudge(&operator, &["configmap", "demo-config"], 4).await;
    nudge(&operator, &["statefulset", NAME], 5).await;
    let after = writes_by(&operator.user);
    let reconciles = operator.reconciles().await - reconciles_before;
    assert!(reconciles >= 5, "expected at least 5 reconciles, the operator counted {reconciles}");
    assert!(
        after.len() == before.len(),
        "{reconciles} reconciles of an unchanged cluster wrote:\n  {}",
        describe(&after[before.len()..])
    );
}

#[tokio::test]
async fn a_conflicting_field_manager_is_reported_not_fought() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-conflict").await;
    let operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    settled(&client, &operator).await;

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
