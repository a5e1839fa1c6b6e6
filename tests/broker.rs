//! Tier 1: the broker reconcile against a scripted management API: what it sends, per version.

use serde_json::json;
use testkit::management_fake::ManagementFake;
use warren::api::{HighAvailabilityMode, HighAvailabilitySpec};
use warren::rabbitmq::broker::converge;
use warren::rabbitmq::management::ManagementClient;

const NODES: [&str; 3] = ["rabbit@demo-0.demo-nodes", "rabbit@demo-1.demo-nodes", "rabbit@demo-2.demo-nodes"];

fn expected() -> Vec<String> {
    NODES.iter().map(|n| n.to_string()).collect()
}

async fn broker(version: &str) -> (ManagementFake, ManagementClient) {
    let fake = ManagementFake::start().await;
    fake.answer("GET", "/api/overview", 200, json!({"rabbitmq_version": version, "cluster_name": "demo"}));
    fake.answer(
        "GET",
        "/api/nodes",
        200,
        json!(NODES.iter().map(|n| json!({"name": n, "running": true, "partitions": []})).collect::<Vec<_>>()),
    );
    let client = ManagementClient::new(&fake.url, "warren-user", "s3cret").unwrap();
    (fake, client)
}

fn ha(mode: HighAvailabilityMode) -> HighAvailabilitySpec {
    HighAvailabilitySpec { mode, ..Default::default() }
}

#[tokio::test]
async fn on_3x_auto_applies_ha_all_with_automatic_sync_in_every_vhost_once() {
    let (fake, client) = broker("3.10.8").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/"}, {"name": "celery"}]));
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    let policy = json!({"pattern": ".*", "apply-to": "queues", "priority": 0,
                        "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}});
    assert_eq!(
        fake.writes(),
        vec![
            ("PUT /api/policies/%2F/ha-all".to_string(), policy.clone()),
            ("PUT /api/policies/celery/ha-all".to_string(), policy.clone())
        ]
    );
    assert_eq!(observed.version, "3.10.8");
    assert_eq!(observed.members, expected());
    assert!(observed.missing.is_empty() && observed.partitions.is_empty());
    assert_eq!(observed.high_availability.reason(), "ClassicMirroring");
    assert_eq!(observed.actions.len(), 2);

    // Second pass: the policies are there, nothing is written.
    let mut stored = policy.clone();
    stored["name"] = json!("ha-all");
    fake.answer("GET", "/api/policies/%2F/ha-all", 200, stored.clone());
    fake.answer("GET", "/api/policies/celery/ha-all", 200, stored);
    let before = fake.writes().len();
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    assert_eq!(fake.writes().len(), before, "a converged broker gets no writes");
    assert!(observed.actions.is_empty());
}

#[tokio::test]
async fn on_4x_auto_sets_quorum_default_keeping_vhost_metadata_and_never_sends_ha_keys() {
    let (fake, client) = broker("4.1.4").await;
    fake.answer(
        "GET",
        "/api/vhosts",
        200,
        json!([{"name": "/", "description": "main", "tags": ["prod", "eu"], "default_queue_type": "classic"},
               {"name": "done", "metadata": {"default_queue_type": "quorum"}}]),
    );
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    assert_eq!(
        fake.writes(),
        vec![(
            "PUT /api/vhosts/%2F".to_string(),
            json!({"description": "main", "tags": "prod,eu", "default_queue_type": "quorum"})
        )]
    );
    assert_eq!(observed.high_availability.reason(), "QuorumQueues");
    assert!(fake.requests().iter().all(|(call, body)| !call.contains("/api/policies/") || body.is_null()));
}

#[tokio::test]
async fn classic_mirrored_on_a_4x_broker_is_refused_without_writes() {
    let (fake, client) = broker("4.0.5").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/"}]));
    let error =
        converge(&client, &expected(), &ha(HighAvailabilityMode::ClassicMirrored), &[]).await.expect_err("refused");
    assert_eq!(error.reason(), "ClassicMirroringUnsupported");
    assert!(fake.writes().is_empty());
}

#[tokio::test]
async fn missing_members_and_partitions_are_reported() {
    let (fake, client) = broker("3.10.8").await;
    fake.answer(
        "GET",
        "/api/nodes",
        200,
        json!([{"name": NODES[0], "running": true, "partitions": [NODES[1]]},
               {"name": NODES[1], "running": false, "partitions": []},
               {"name": NODES[2], "running": true, "partitions": [NODES[1]]}]),
    );
    fake.answer("GET", "/api/vhosts", 200, json!([]));
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    assert_eq!(observed.members, vec![NODES[0].to_string(), NODES[2].to_string()]);
    assert_eq!(observed.missing, vec![NODES[1].to_string()]);
    assert_eq!(observed.partitions.len(), 2);
    assert!(observed.partitions[0].contains("partitioned from rabbit@demo-1"), "{:?}", observed.partitions);
}

#[tokio::test]
async fn switching_to_none_removes_only_the_operators_mirroring_policy() {
    let (fake, client) = broker("3.10.8").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/"}, {"name": "app"}]));
    let mirroring = json!({"name": "ha-all", "pattern": ".*", "apply-to": "queues", "priority": 0,
                           "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}});
    let users_own = json!({"name": "ha-all", "pattern": "^lim", "apply-to": "queues", "priority": 1,
                           "definition": {"max-length": 10}});
    fake.answer("GET", "/api/policies/%2F/ha-all", 200, mirroring);
    fake.answer("GET", "/api/policies/app/ha-all", 200, users_own);
    converge(&client, &expected(), &ha(HighAvailabilityMode::None), &[]).await.expect("converge");
    assert_eq!(fake.writes(), vec![("DELETE /api/policies/%2F/ha-all".to_string(), serde_json::Value::Null)]);
}

#[tokio::test]
async fn broker_failures_become_reasons() {
    let (fake, client) = broker("3.10.8").await;
    fake.answer("GET", "/api/overview", 401, json!({"error": "not_authorised", "reason": "Login failed"}));
    let error = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect_err("401");
    assert_eq!(error.reason(), "BrokerUnauthorized");
    assert!(error.to_string().contains("Login failed"), "{error}");
    assert!(!error.to_string().contains("s3cret"), "credentials never in messages: {error}");

    fake.answer("GET", "/api/overview", 503, json!({"error": "unavailable", "reason": "node is booting"}));
    let error = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect_err("503");
    assert_eq!(error.reason(), "BrokerUnavailable");
    assert!(error.is_retriable());

    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let closed = ManagementClient::new(&format!("http://127.0.0.1:{port}"), "u", "p").unwrap();
    let error = converge(&closed, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect_err("unreachable");
    assert_eq!(error.reason(), "BrokerUnreachable");
}

#[tokio::test]
async fn queues_are_read_even_when_a_key_comes_twice() {
    // What RabbitMQ 4.0 sent for a quorum queue while a member was being removed.
    let (fake, client) = broker("4.0.5").await;
    let body = r#"[{"name":"orders","vhost":"/","type":"quorum","members":["rabbit@a"],"online":["rabbit@a"],
                   "members":["rabbit@a","rabbit@b"],"durable":true,"exclusive":false,"messages":3}]"#;
    fake.answer_raw("GET", "/api/queues", 200, body);
    let queues = client.queues().await.expect("queues");
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].name, "orders");
    assert_eq!(queues[0].members, ["rabbit@a", "rabbit@b"], "the last one wins");
    assert_eq!(queues[0].messages, Some(3));
}

/// After a roll-out, every stable feature flag still disabled is enabled (a next minor version
/// refuses to boot without them); experimental ones are left, and `khepri_db` is enabled only when
/// the user asked for it, else reported as disabled.
#[tokio::test]
async fn stable_feature_flags_are_enabled_and_khepri_only_on_request() {
    let (fake, client) = broker("4.2.3").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/", "default_queue_type": "quorum"}]));
    fake.answer(
        "GET",
        "/api/feature-flags",
        200,
        json!([
            {"name": "quorum_queue", "state": "enabled", "stability": "required"},
            {"name": "message_containers_deaths_v2", "state": "disabled", "stability": "stable"},
            {"name": "khepri_db", "state": "disabled", "stability": "stable"},
            {"name": "rabbit_exchange_type_local_random", "state": "disabled", "stability": "stable"},
            {"name": "some_experiment", "state": "disabled", "stability": "experimental"}
        ]),
    );
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    let puts: Vec<String> = fake.writes().into_iter().map(|(call, _)| call).collect();
    assert_eq!(
        puts,
        [
            "PUT /api/feature-flags/message_containers_deaths_v2/enable",
            "PUT /api/feature-flags/rabbit_exchange_type_local_random/enable"
        ]
    );
    assert_eq!(observed.disabled_feature_flags, ["khepri_db"]);
    assert!(observed.actions.iter().any(|a| a.contains("enabled feature flags message_containers_deaths_v2")));

    // Asked for by the annotation: khepri_db too.
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &["khepri_db".to_string()])
        .await
        .expect("converge");
    assert!(fake.writes().iter().any(|(call, _)| call == "PUT /api/feature-flags/khepri_db/enable"));
    assert!(observed.disabled_feature_flags.is_empty());

    // A node not running: no flag can be enabled cluster-wide, none is tried.
    fake.answer(
        "GET",
        "/api/nodes",
        200,
        json!(NODES[..2].iter().map(|n| json!({"name": n, "running": true, "partitions": []})).collect::<Vec<_>>()),
    );
    let before = fake.writes().len();
    converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    assert_eq!(fake.writes().len(), before, "{:?}", fake.writes());
}

/// On 3.13, the release that may move to 4.x in place, the classic queues a mirroring policy
/// replicates are listed (the in-place upgrade is refused while any is); elsewhere not asked.
#[tokio::test]
async fn on_3_13_the_mirrored_classic_queues_are_listed() {
    let (fake, client) = broker("3.13.7").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/"}]));
    fake.answer(
        "GET",
        "/api/policies/%2F/ha-all",
        200,
        json!({"name": "ha-all", "pattern": ".*",
        "apply-to": "queues", "priority": 0, "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    );
    let mut queues = vec![
        json!({"name": "quorum-one", "vhost": "/", "type": "quorum", "effective_policy_definition": {}}),
        json!({"name": "lonely", "vhost": "/", "type": "classic", "effective_policy_definition": {}}),
    ];
    queues.extend((0..12).map(|i| {
        json!({"name": format!("celery-{i:02}"), "vhost": "/", "type": "classic",
        "effective_policy_definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}})
    }));
    fake.answer("GET", "/api/queues", 200, json!(queues));
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    let mut names: Vec<String> = (0..10).map(|i| format!("//celery-{i:02}")).collect();
    names.push("and 2 more".into());
    assert_eq!(observed.mirrored_classic_queues, names);

    let (fake, client) = broker("3.12.4").await;
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/"}]));
    let observed = converge(&client, &expected(), &ha(HighAvailabilityMode::Auto), &[]).await.expect("converge");
    assert!(observed.mirrored_classic_queues.is_empty());
    assert!(!fake.requests().iter().any(|(call, _)| call.starts_with("GET /api/queues")), "{:?}", fake.requests());
}
