//! A RabbitMigration with the operator installed by the chart: a credentials Secret not labelled
//! for migrations refused, then the Job it creates, its phase in status, and deletion taking the
//! Job with it.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::{Api, ResourceExt};
use warren::api::{MigrationPhase, RabbitMigration};

use testkit::control_plane::operator::Operator;
use testkit::control_plane::{TestNamespace, admin_client, ensure_crds, kubectl, manifest, ok, wait_for, writes_by};

#[tokio::test]
async fn a_migration_becomes_an_owned_job_and_reports_its_phase() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-migration").await;
    let operator = Operator::install(&client, &ns.name).await;
    let example = manifest(std::path::Path::new("examples/migration.yaml"));
    let apply =
        || ok("kubectl apply", testkit::control_plane::kubectl_stdin(&["apply", "-n", &ns.name, "-f", "-"], &example));
    let migrations: Api<RabbitMigration> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);

    // The example's credentials Secret, as a user who has not read the example's comment makes it:
    // no label. The operator refuses to hand it to a Job, naming the field.
    let secret = ["create", "secret", "generic", "old-rabbitmq-credentials", "-n", &ns.name];
    ok(
        "kubectl create secret",
        kubectl(&[&secret[..], &["--from-literal=username=u", "--from-literal=password=p"]].concat()),
    );
    apply();
    wait_for("the migration refused", Duration::from_secs(60), || async {
        let m = migrations.get("from-legacy").await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        let refused = status.conditions.iter().any(|c| {
            c.type_ == "Complete"
                && c.status == "False"
                && c.reason == "CredentialsNotPermitted"
                && c.message.contains("spec.source.credentialsSecret: Secret old-rabbitmq-credentials has no label")
        });
        if refused && status.phase == Some(MigrationPhase::Failed) { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    let events = ok(
        "kubectl get events",
        kubectl(&["get", "events", "-n", &ns.name, "--field-selector", "reason=CredentialsNotPermitted", "-o", "name"]),
    );
    assert!(!events.trim().is_empty(), "a Warning Event for the refusal");
    assert!(jobs.get_opt("from-legacy-migrate").await.expect("jobs").is_none(), "a Job despite the refusal");

    // Labelled for migrations, and the migration applied again: the Job.
    let label =
        ["label", "secret", "old-rabbitmq-credentials", "-n", &ns.name, "warren.dev/migration-credentials=true"];
    ok("kubectl label", kubectl(&label));
    ok("kubectl delete", kubectl(&["delete", "rabbitmigration", "from-legacy", "-n", &ns.name]));
    apply();
    let job = wait_for("the migration Job", Duration::from_secs(60), || async {
        jobs.get_opt("from-legacy-migrate").await.map_err(|e| e.to_string())?.ok_or_else(|| "no Job yet".to_string())
    })
    .await;
    let migration = migrations.get("from-legacy").await.expect("migration");
    let owner = job.owner_references().first().cloned().expect("owner");
    assert_eq!((owner.uid, owner.controller), (migration.uid().expect("uid"), Some(true)));
    let image = job.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].image.clone());
    assert_eq!(image, Some(Some("ghcr.io/warren-dev/warren:0.1.0".into())), "the chart's image for Jobs");

    // The Job controller counts the (unscheduled) pod as active: the migration is Running.
    wait_for("phase Running", Duration::from_secs(60), || async {
        let m = migrations.get("from-legacy").await.map_err(|e| e.to_string())?;
        let status = m.status.clone().unwrap_or_default();
        if status.phase == Some(MigrationPhase::Running) && status.job_name.as_deref() == Some("from-legacy-migrate") {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    let refused: Vec<_> = writes_by(&operator.user).into_iter().filter(|w| w.code >= 400).collect();
    assert!(refused.is_empty(), "requests refused to the operator: {refused:?}");

    ok("kubectl delete", kubectl(&["delete", "rabbitmigration", "from-legacy", "-n", &ns.name]));
    wait_for("the Job garbage-collected", Duration::from_secs(60), || async {
        match jobs.get_opt("from-legacy-migrate").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
}
