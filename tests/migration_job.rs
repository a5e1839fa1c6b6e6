//! Tier 1: the Job a RabbitMigration becomes, from the example manifest, with no API at all.

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use warren::api::MigrationPhase;
use warren::api::RabbitMigration;
use warren::controller::migration::{ClustersTls, migration_job, phase};

fn example() -> RabbitMigration {
    let text = std::fs::read_to_string(format!("{}/examples/migration.yaml", testkit::repo())).unwrap();
    let mut migration: RabbitMigration = serde_yaml::from_str(&text).unwrap();
    migration.metadata.namespace = Some("shop".into());
    migration.metadata.uid = Some("6f1c1c1e-0000-4000-8000-00000000feed".into());
    migration
}

#[test]
fn the_job_runs_warren_migrate_with_credentials_only_from_secrets() {
    let job = migration_job(&example(), "warren:test", false, "cluster.local", &ClustersTls::new()).expect("job");
    assert_eq!(job.metadata.name.as_deref(), Some("from-legacy-migrate"));
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("RabbitMigration", "from-legacy", Some(true))
    );
    let spec = job.spec.unwrap();
    assert_eq!(spec.backoff_limit, Some(4));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("warren:test"));
    // An eighth of the default 512Mi limit: 64 MiB in flight.
    assert_eq!(
        container.args.clone().unwrap(),
        ["migrate", "--max-in-flight", "67108864", "--wait-for-consumers", "10m"]
    );
    let resources = container.resources.clone().unwrap();
    let quantity = |map: &Option<std::collections::BTreeMap<String, Quantity>>, key: &str| {
        map.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone())
    };
    assert_eq!(quantity(&resources.requests, "memory").as_deref(), Some("128Mi"));
    assert_eq!(quantity(&resources.requests, "cpu").as_deref(), Some("250m"));
    assert_eq!(quantity(&resources.limits, "memory").as_deref(), Some("512Mi"));
    let env = container.env.clone().unwrap();
    let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
    let secret = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|s| (s.name.clone(), s.key.clone()))
    };
    assert_eq!(value("WARREN_SOURCE_URI").as_deref(), Some("amqp://rabbitmq.legacy.svc.cluster.local:5672/"));
    assert_eq!(value("WARREN_SOURCE_API").as_deref(), Some("http://rabbitmq.legacy.svc.cluster.local:15672"));
    assert_eq!(secret("WARREN_SOURCE_USERNAME"), Some(("old-rabbitmq-credentials".into(), "username".into())));
    assert_eq!(secret("WARREN_SOURCE_PASSWORD"), Some(("old-rabbitmq-credentials".into(), "password".into())));
    assert_eq!(value("WARREN_TARGET_URI").as_deref(), Some("amqp://demo.shop.svc.cluster.local:5672/"));
    assert_eq!(secret("WARREN_TARGET_PASSWORD"), Some(("demo-default-user".into(), "password".into())));
    assert!(env.iter().filter(|e| e.name.ends_with("PASSWORD")).all(|e| e.value.is_none()), "a password in plain text");
    // The summary goes where the kubelet keeps it for the operator: the termination message.
    assert_eq!(value("WARREN_TERMINATION_LOG").as_deref(), Some("/dev/termination-log"));
    assert_eq!(container.termination_message_path.as_deref(), Some("/dev/termination-log"));
    assert_eq!(container.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
}

#[test]
fn the_jobs_memory_and_in_flight_budget_come_from_the_spec() {
    let mut migration = example();
    migration.spec.max_in_flight = None;
    migration.spec.resources = Some(
        serde_json::from_value(serde_json::json!({
            "requests": { "memory": "256Mi" },
            "limits": { "memory": "2Gi", "cpu": "2" }
        }))
        .unwrap(),
    );
    let container = |migration: &RabbitMigration| {
        let job = migration_job(migration, "warren:test", false, "cluster.local", &ClustersTls::new()).expect("job");
        job.spec.unwrap().template.spec.unwrap().containers.remove(0)
    };
    let sized = container(&migration);
    let args = sized.args.unwrap();
    assert_eq!(args[1..3], ["--max-in-flight", "268435456"], "an eighth of 2Gi");
    let resources = sized.resources.unwrap();
    let limits = resources.limits.unwrap();
    assert_eq!((limits["memory"].0.as_str(), limits["cpu"].0.as_str()), ("2Gi", "2"));
    let requests = resources.requests.unwrap();
    assert_eq!((requests["memory"].0.as_str(), requests["cpu"].0.as_str()), ("256Mi", "250m"), "defaults fill in");

    migration.spec.max_in_flight = Some("256Mi".into());
    assert_eq!(container(&migration).args.unwrap()[2], "268435456");

    // More than a quarter of the limit: a message in flight can take three times its size.
    migration.spec.max_in_flight = Some("600Mi".into());
    let error =
        migration_job(&migration, "warren:test", false, "cluster.local", &ClustersTls::new()).expect_err("refused");
    assert_eq!(error.reason(), "InvalidResources");
    assert!(error.to_string().contains("spec.maxInFlight 600Mi") && error.to_string().contains("2Gi"), "{error}");
}

#[test]
fn the_queue_type_choices_become_flags() {
    let args = |migration: &RabbitMigration| {
        migration_job(migration, "warren:test", false, "cluster.local", &ClustersTls::new())
            .expect("job")
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap()
    };
    let mut migration = example();
    assert!(!args(&migration).iter().any(|a| a.contains("quorum") || a.contains("classic")), "the default keeps HA");
    migration.spec.keep_classic = true;
    assert!(args(&migration).contains(&"--keep-classic".to_string()));
    migration.spec.keep_classic = false;
    migration.spec.convert_to_quorum = true;
    assert!(args(&migration).contains(&"--convert-to-quorum".to_string()));
}

#[test]
fn a_tls_cluster_is_reached_over_amqps_and_https_with_its_ca_mounted() {
    let tls: warren::api::TlsSpec =
        serde_json::from_value(serde_json::json!({"secretName": "demo-tls", "disableNonTLSListeners": true})).unwrap();
    let job =
        migration_job(&example(), "warren:test", false, "cluster.local", &ClustersTls::from([("demo".into(), tls)]))
            .expect("job");
    let pod = job.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    let env = container.env.clone().unwrap();
    let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
    assert_eq!(value("WARREN_TARGET_URI").as_deref(), Some("amqps://demo.shop.svc.cluster.local:5671/"));
    assert_eq!(value("WARREN_TARGET_API").as_deref(), Some("https://demo.shop.svc.cluster.local:15671"));
    assert_eq!(value("WARREN_TARGET_CA").as_deref(), Some("/etc/warren/target-ca/ca.crt"));
    // The host side (no RabbitCluster) stays as the spec says.
    assert_eq!(value("WARREN_SOURCE_URI").as_deref(), Some("amqp://rabbitmq.legacy.svc.cluster.local:5672/"));
    assert_eq!(value("WARREN_SOURCE_CA"), None);
    let volume = &pod.volumes.unwrap()[0];
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!((volume.name.as_str(), secret.secret_name.as_deref()), ("target-ca", Some("demo-tls")));
    assert_eq!(secret.items.as_ref().unwrap()[0].key, "ca.crt", "the CA only, never the key");
    let mount = &container.volume_mounts.as_ref().unwrap()[0];
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/warren/target-ca", Some(true)));
}

#[test]
fn an_endpoint_without_credentials_is_refused() {
    let mut migration = example();
    migration.spec.source.credentials_secret = None;
    let error =
        migration_job(&migration, "warren:test", false, "cluster.local", &ClustersTls::new()).expect_err("refused");
    assert_eq!(error.reason(), "InvalidSpec");
    assert!(error.to_string().contains("source"), "{error}");
}

#[test]
fn the_jobs_image_is_the_operators_unless_the_operator_allows_another() {
    let image = |migration: &RabbitMigration, allow: bool| {
        migration_job(migration, "warren:test", allow, "cluster.local", &ClustersTls::new())
            .map(|job| job.spec.unwrap().template.spec.unwrap().containers[0].image.clone().unwrap())
    };
    let mut migration = example();
    migration.spec.image = Some("warren:test".into());
    assert_eq!(image(&migration, false).expect("its own image, named"), "warren:test");
    migration.spec.image = Some("registry.example/anything:1".into());
    let error = image(&migration, false).expect_err("another image");
    assert_eq!(error.reason(), "ImageNotPermitted");
    assert!(error.to_string().contains("spec.image registry.example/anything:1"), "{error}");
    assert!(error.to_string().contains("migration.allowImageOverride"), "{error}");
    assert_eq!(image(&migration, true).expect("allowed"), "registry.example/anything:1");
}

#[test]
fn only_a_secret_labelled_for_migrations_may_be_named() {
    use std::collections::BTreeMap;
    use warren::controller::migration::meant_for_migrations;
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert!(meant_for_migrations(&labels(&[("warren.dev/migration-credentials", "true")])));
    assert!(!meant_for_migrations(&labels(&[("warren.dev/migration-credentials", "false")])));
    assert!(!meant_for_migrations(&labels(&[("app", "legacy")])));
}

#[test]
fn the_phase_follows_the_job() {
    let job = |status: JobStatus| Job { status: Some(status), ..Default::default() };
    let condition = |type_: &str| JobCondition { type_: type_.into(), status: "True".into(), ..Default::default() };
    assert_eq!(phase(&Job::default()), MigrationPhase::Pending);
    assert_eq!(phase(&job(JobStatus { active: Some(1), ..Default::default() })), MigrationPhase::Running);
    assert_eq!(
        phase(&job(JobStatus { conditions: Some(vec![condition("Complete")]), ..Default::default() })),
        MigrationPhase::Succeeded
    );
    assert_eq!(
        phase(&job(JobStatus { conditions: Some(vec![condition("Failed")]), ..Default::default() })),
        MigrationPhase::Failed
    );
}

#[test]
fn a_finished_job_is_described_by_the_summary_its_pod_left() {
    use warren::api::MigrationQueueStatus;
    use warren::controller::migration::completion;
    use warren::migrate::report::{Summary, SummaryError};

    let queue = |name: &str, total: u64, moved: u64| MigrationQueueStatus {
        vhost: "/".into(),
        name: name.into(),
        total,
        moved,
        left: total - moved,
        ..Default::default()
    };
    let done = Summary {
        complete: true,
        moved: 30,
        queues: vec![queue("a", 10, 10), queue("b", 20, 20)],
        ..Default::default()
    };
    assert_eq!(
        completion("m-migrate", MigrationPhase::Succeeded, Some(&Ok(done))),
        Some((true, "Succeeded".into(), "30 messages moved from 2 queue(s) and verified".into()))
    );
    // The migrator's own reason and words, not a pointer to the logs.
    let held = Summary {
        error: Some(SummaryError {
            phase: "preflight".into(),
            reason: "MessagesHeldByConsumers".into(),
            message: "consumers hold messages unacknowledged: /celery: 3".into(),
        }),
        ..Default::default()
    };
    assert_eq!(
        completion("m-migrate", MigrationPhase::Failed, Some(&Ok(held))),
        Some((
            false,
            "MessagesHeldByConsumers".into(),
            "preflight: consumers hold messages unacknowledged: /celery: 3".into()
        ))
    );
    let partial = Summary { moved: 15, queues: vec![queue("a", 10, 10), queue("b", 20, 5)], ..Default::default() };
    assert_eq!(
        completion("m-migrate", MigrationPhase::Failed, Some(&Ok(partial))),
        Some((false, "Incomplete".into(), "15 messages moved; 1 queue(s) not fully moved (see status.queues)".into()))
    );
    // Not a summary (the end of the log of a container that died) and not a condition reason.
    assert_eq!(
        completion("m-migrate", MigrationPhase::Failed, Some(&Err("thread 'main' panicked".into()))),
        Some((false, "JobFailed".into(), "Job m-migrate failed: thread 'main' panicked".into()))
    );
    let odd = Summary {
        error: Some(SummaryError { phase: "x".into(), reason: "not a reason!".into(), message: "m".into() }),
        ..Default::default()
    };
    assert_eq!(
        completion("m-migrate", MigrationPhase::Failed, Some(&Ok(odd))).map(|c| c.1),
        Some("MigrationFailed".into())
    );
    assert_eq!(completion("m-migrate", MigrationPhase::Running, None), None);
}
