//! Tier 1: reconcile decisions against a scripted API server, one scenario per test, asserting the
//! method, path and body of each call.

use std::sync::Arc;

use http::Method;
use k8s_openapi::api::apps::v1::StatefulSetStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use testkit::fixture;
use testkit::kube_mock::{Call, scripted_client};
use testkit::management_fake::ManagementFake;
use warren::api::{PAUSE_ANNOTATION, RabbitCluster, RabbitClusterStatus, TlsSpec};
use warren::controller::apply::{APPLIED_GENERATION_ANNOTATION, APPLIED_HASH_ANNOTATION, hash_of};
use warren::controller::build::{self, Credentials};
use warren::controller::stores::WATCH_LABEL;
use warren::controller::validate::{Settings, validate};
use warren::controller::{Config, Context, conditions, error_policy, reconcile};
use warren::rabbitmq::broker::{BrokerObservation, HaOutcome};
use warren::server::Metrics;

const NS: &str = "/api/v1/namespaces/default";
const STS: &str = "/apis/apps/v1/namespaces/default/statefulsets/demo";
const PDB: &str = "/apis/policy/v1/namespaces/default/poddisruptionbudgets/demo";
const NETWORK_POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/demo";
const CLUSTER: &str = "/apis/warren.dev/v1alpha1/namespaces/default/rabbitclusters/demo";

fn context(client: Client, management_url: &str) -> Arc<Context> {
    Arc::new(Context::new(client, Config::new(management_url), Metrics::default()))
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status_patch}"))
}

/// Runs one reconcile against the script, with the controller's stores empty; returns its result
/// and every call seen.
async fn run(
    cluster: RabbitCluster,
    script: Vec<Call>,
    management_url: &str,
) -> (Result<kube::runtime::controller::Action, warren::error::Error>, Vec<(Method, String, Value)>) {
    run_with(cluster, vec![], script, management_url).await
}

/// The same, with `live` objects in the stores, as the controller's watches would have put them.
async fn run_with(
    cluster: RabbitCluster,
    live: Vec<Value>,
    script: Vec<Call>,
    management_url: &str,
) -> (Result<kube::runtime::controller::Action, warren::error::Error>, Vec<(Method, String, Value)>) {
    let (client, calls) = scripted_client(script);
    let ctx = context(client, management_url);
    fill_stores(&ctx, live);
    let result = reconcile(Arc::new(cluster), ctx.clone()).await;
    drop(ctx);
    (result, calls.await.expect("the scripted API server panicked: see above"))
}

fn fill_stores(ctx: &Context, live: Vec<Value>) {
    fn put<K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned>(writer: &mut Writer<K>, value: Value) {
        let object: K = serde_json::from_value(value).expect("a live object");
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }
    let mut writers = ctx.take_writers().expect("the stores' writers");
    for object in live {
        match object["kind"].as_str() {
            Some("StatefulSet") => put(&mut writers.stateful_sets, object),
            Some("Secret") if object["metadata"]["labels"][WATCH_LABEL] == "true" => {
                put(&mut writers.watched_secrets, object)
            }
            Some("Secret") => put(&mut writers.secrets, object),
            Some("ServiceAccount") => put(&mut writers.service_accounts, object),
            Some("ConfigMap") => put(&mut writers.config_maps, object),
            Some("Service") => put(&mut writers.services, object),
            Some("PodDisruptionBudget") => put(&mut writers.budgets, object),
            Some("NetworkPolicy") => put(&mut writers.network_policies, object),
            Some("Pod") => put(&mut writers.pods, object),
            other => panic!("no store for {other:?}"),
        }
    }
}

/// A credential Secret: labelled for the cluster, owned by nothing (it outlives the RabbitCluster).
fn kept_for_demo(body: &Value) {
    assert!(body["metadata"]["ownerReferences"].is_null(), "{body}");
    assert_eq!(body["metadata"]["labels"]["app.kubernetes.io/instance"], "demo", "{body}");
    assert_eq!(body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "warren", "{body}");
    assert!(body["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].is_string(), "{body}");
}

fn owned_by_demo(body: &Value) {
    assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "RabbitCluster", "{body}");
    assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
    assert!(body["metadata"]["annotations"][APPLIED_HASH_ANNOTATION].is_string(), "{body}");
}

#[tokio::test]
async fn a_new_cluster_gets_every_child_then_status() {
    let applied = |path: String| Call::apply(path).check(owned_by_demo);
    // Nothing in the stores: each absence is confirmed by a GET before anything is created.
    let mut script = vec![Call::get_missing(STS)];
    script.extend(missing_except_stateful_set());
    script.extend([
        // No StatefulSet: do claims of an earlier cluster of this name hold data? None here.
        no_claims(),
        applied(format!("{NS}/serviceaccounts/demo-rabbitmq")),
        Call::apply(format!("{NS}/secrets/demo-erlang-cookie")).check(|body| {
            kept_for_demo(body);
            assert_eq!(body["data"]["cookie"].as_str().unwrap().len(), 64, "48 random bytes, base64: {body}");
        }),
        Call::apply(format!("{NS}/secrets/demo-default-user")).check(kept_for_demo),
        applied(format!("{NS}/configmaps/demo-config")).check(|body| {
            owned_by_demo(body);
            let conf = body["data"]["10-operator.conf"].as_str().unwrap();
            assert!(conf.contains("cluster_partition_handling = pause_minority"), "{conf}");
        }),
        applied(format!("{NS}/services/demo-nodes")),
        applied(format!("{NS}/services/demo")),
        applied(PDB.into()),
        applied(NETWORK_POLICY.into()).check(|body| {
            owned_by_demo(body);
            // The Erlang distribution ports: the cluster's own pods only.
            let rules = body["spec"]["ingress"].as_array().unwrap();
            let members = rules.iter().find(|r| r["ports"][0]["port"] == 4369).expect("a rule for epmd");
            assert_eq!(members["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "demo");
        }),
        Call::forced_apply(STS).check(|body| {
            owned_by_demo(body);
            assert_eq!(body["spec"]["replicas"], 3);
            assert_eq!(body["spec"]["podManagementPolicy"], "Parallel");
        }),
        Call::event("default", "Created").check(|body| {
            let note = body["note"].as_str().unwrap();
            for object in [
                "ServiceAccount demo-rabbitmq",
                "Secret demo-erlang-cookie",
                "Secret demo-default-user",
                "ConfigMap demo-config",
                "Service demo-nodes",
                "Service demo,",
                "PodDisruptionBudget demo",
                "NetworkPolicy demo",
                "StatefulSet demo",
            ] {
                assert!(note.contains(object), "{object} missing from {note}");
            }
        }),
        // Right after creation the store holds no StatefulSet yet, so no ready pods: the broker is
        // not contacted.
        Call::status_patch(CLUSTER).check(|body| {
            assert_eq!(condition(body, "ReconcileSuccess")["status"], "True");
            assert_eq!(condition(body, "AllReplicasReady")["status"], "False");
            assert_eq!(condition(body, "ClusterFormed")["status"], "Unknown");
            assert_eq!(condition(body, "Ready")["status"], "False");
            assert_eq!(body["status"]["rabbitmqVersion"], "4.1.4");
            assert_eq!(body["status"]["observedGeneration"], 1);
            // A server-side apply names what it applies.
            assert_eq!(
                (body["apiVersion"].as_str(), body["kind"].as_str()),
                (Some("warren.dev/v1alpha1"), Some("RabbitCluster"))
            );
        }),
    ]);
    let (result, calls) = run(fixture("basic.yaml"), script, "http://127.0.0.1:1").await;
    assert!(result.is_ok(), "{result:?}");
    let cookie_patches =
        calls.iter().filter(|(m, p, _)| m == Method::PATCH && p.ends_with("demo-erlang-cookie")).count();
    assert_eq!(cookie_patches, 1);
}

/// The LIST of the cluster's claims, answered with none.
fn no_claims() -> Call {
    Call::get(format!("{NS}/persistentvolumeclaims"))
        .returns(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": []}))
}

/// GETs confirming that every child but the StatefulSet is absent (the stores hold none).
fn missing_except_stateful_set() -> Vec<Call> {
    vec![
        Call::get_missing(format!("{NS}/secrets/demo-erlang-cookie")),
        Call::get_missing(format!("{NS}/secrets/demo-default-user")),
        Call::get_missing(format!("{NS}/serviceaccounts/demo-rabbitmq")),
        Call::get_missing(format!("{NS}/configmaps/demo-config")),
        Call::get_missing(format!("{NS}/services/demo-nodes")),
        Call::get_missing(format!("{NS}/services/demo")),
        Call::get_missing(PDB),
        Call::get_missing(NETWORK_POLICY),
    ]
}

#[tokio::test]
async fn an_image_that_skips_a_minor_version_is_refused_and_nothing_is_changed() {
    let mut cluster = fixture("basic.yaml");
    cluster.spec.image = "rabbitmq:4.3.6-management".into();
    let running = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo", "namespace": "default"},
        "spec": {"replicas": 3, "selector": {}, "serviceName": "demo-nodes", "template": {"spec": {
            "containers": [{"name": "rabbitmq", "image": "rabbitmq:4.0.5-management"}]}}}});
    let mut script = missing_except_stateful_set();
    script.extend([
        // The cluster has data and no cookie Secret: is a node running with the cookie? None is.
        Call::get(format!("{NS}/pods")).returns(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
            "items": []})),
        Call::event("default", "UpgradeRefused").check(|body| {
            assert_eq!(body["type"], "Warning");
            let note = body["note"].as_str().unwrap();
            for says in ["from 4.0.5 to 4.3.6", "skips 4.1, 4.2", "RabbitMigration"] {
                assert!(note.contains(says), "{says:?} not in {note}");
            }
        }),
        Call::status_patch(CLUSTER).check(|body| {
            let success = condition(body, "ReconcileSuccess");
            assert_eq!(success["status"], "False");
            assert_eq!(success["reason"], "UpgradeRefused");
            assert!(success["message"].as_str().unwrap().contains("4.0.5"), "{success}");
        }),
    ]);
    let (result, calls) = run_with(cluster, vec![running], script, "http://127.0.0.1:1").await;
    // Waits for a spec change rather than retrying; the StatefulSet keeps running 4.0.5.
    assert!(result.is_ok(), "{result:?}");
    assert!(calls.iter().all(|(m, p, _)| m == Method::GET || p.contains("/events") || p.ends_with("/status")));
}

#[tokio::test]
async fn a_paused_cluster_gets_only_its_condition() {
    let mut cluster = fixture("basic.yaml");
    cluster.metadata.annotations = Some([(PAUSE_ANNOTATION.to_string(), "true".to_string())].into());
    let script = vec![Call::status_patch(CLUSTER).check(|body| {
        let success = condition(body, "ReconcileSuccess");
        assert_eq!(success["status"], "Unknown");
        assert_eq!(success["reason"], "Paused");
    })];
    let (result, _) = run(cluster, script, "http://127.0.0.1:1").await;
    assert!(result.is_ok());
}

/// TLS from the Secret demo-tls, plain listeners kept.
fn demo_tls() -> TlsSpec {
    TlsSpec {
        secret_name: "demo-tls".into(),
        ca_secret_name: None,
        disable_non_tls_listeners: false,
        prometheus: false,
        inter_node: false,
    }
}

#[tokio::test]
async fn a_missing_tls_secret_is_reported_and_retried() {
    let mut cluster = fixture("basic.yaml");
    cluster.spec.tls = Some(demo_tls());
    let mut script = vec![Call::get_missing(STS)];
    script.extend(missing_except_stateful_set());
    script.extend([
        Call::get_missing(format!("{NS}/secrets/demo-tls")),
        Call::event("default", "SecretMissing"),
        Call::status_patch(CLUSTER).check(|body| {
            let success = condition(body, "ReconcileSuccess");
            assert_eq!(success["reason"], "SecretMissing");
            assert!(success["message"].as_str().unwrap().contains("demo-tls"), "{success}");
        }),
    ]);
    let (result, _) = run(cluster, script, "http://127.0.0.1:1").await;
    let error = result.expect_err("retried with back-off");
    assert_eq!(error.reason(), "SecretMissing");
}

#[tokio::test]
async fn a_tls_secret_labelled_for_the_operator_is_read_from_its_store_not_the_api_server() {
    let mut cluster = fixture("basic.yaml");
    cluster.spec.tls = Some(demo_tls());
    // The user's certificate, labelled warren.dev/watch=true, but without its CA.
    let live = vec![json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "demo-tls", "namespace": "default", "labels": {WATCH_LABEL: "true"}},
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}
    })];
    let mut script = vec![Call::get_missing(STS)];
    script.extend(missing_except_stateful_set());
    // No GET of secrets/demo-tls: the store holds it.
    script.extend([
        Call::event("default", "SecretMissing"),
        Call::status_patch(CLUSTER).check(|body| {
            let success = condition(body, "ReconcileSuccess");
            assert!(
                success["message"].as_str().unwrap().contains("Secret demo-tls: has no key \"ca.crt\""),
                "{success}"
            );
        }),
    ]);
    let (result, _) = run_with(cluster, live, script, "http://127.0.0.1:1").await;
    assert_eq!(result.expect_err("retried with back-off").reason(), "SecretMissing");
}

#[tokio::test]
async fn classic_mirroring_on_a_4x_image_is_refused_before_any_read() {
    let mut cluster = fixture("basic.yaml");
    cluster.spec.high_availability.mode = warren::api::HighAvailabilityMode::ClassicMirrored;
    let script = vec![
        Call::event("default", "ClassicMirroringUnsupported"),
        Call::status_patch(CLUSTER).check(|body| {
            assert_eq!(condition(body, "ReconcileSuccess")["reason"], "ClassicMirroringUnsupported");
        }),
    ];
    let (result, _) = run(cluster, script, "http://127.0.0.1:1").await;
    assert!(result.is_ok(), "a bad spec waits for a change: {result:?}");
}

#[tokio::test]
async fn a_child_owned_by_someone_else_is_not_taken_over() {
    let someone_elses = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "demo-rabbitmq", "namespace": "default"}});
    let mut script = vec![Call::get_missing(STS)];
    script.extend(missing_except_stateful_set().into_iter().filter(|c| !c.path.contains("serviceaccounts")));
    script.extend([
        no_claims(),
        Call::event("default", "FieldConflict"),
        Call::status_patch(CLUSTER).check(|body| {
            let message = condition(body, "ReconcileSuccess")["message"].as_str().unwrap().to_string();
            assert!(message.contains("ServiceAccount demo-rabbitmq") && message.contains("not owned"), "{message}");
        }),
    ]);
    let (result, _) = run_with(fixture("basic.yaml"), vec![someone_elses], script, "http://127.0.0.1:1").await;
    assert_eq!(result.expect_err("reported").reason(), "FieldConflict");
}

/// A formed 3-node 4.1 cluster whose children are as the operator last applied them, a fake
/// management API that reports it, and the status a previous pass wrote.
struct SteadyCluster {
    cluster: RabbitCluster,
    fake: ManagementFake,
    nodes: Vec<String>,
    /// Every child as the operator applied it, as the stores hold it.
    live: Vec<Value>,
}

async fn steady_cluster() -> SteadyCluster {
    let mut cluster = fixture("basic.yaml");
    let credentials =
        Credentials { erlang_cookie: "C".repeat(48), username: "warren-user".into(), password: "pw".into() };
    // Built as the operator builds it once the status below (with its members) was written.
    let validated = validate(&cluster, &Settings::default()).unwrap();
    let validated = warren::controller::validate::ValidatedCluster { formed: true, ..validated };
    let resources = build::build(&validated, &credentials);
    fn live<K: serde::Serialize>(object: &K) -> Value {
        let mut value = serde_json::to_value(object).unwrap();
        value["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = json!(hash_of(object).unwrap());
        value
    }
    let mut sts = resources.stateful_set.clone();
    sts.metadata.generation = Some(1);
    sts.status = Some(StatefulSetStatus {
        replicas: 3,
        ready_replicas: Some(3),
        updated_replicas: Some(3),
        current_revision: Some("demo-1".into()),
        update_revision: Some("demo-1".into()),
        observed_generation: Some(1),
        ..Default::default()
    });
    let mut sts_live = live(&resources.stateful_set);
    sts_live["metadata"]["generation"] = json!(1);
    sts_live["metadata"]["annotations"][APPLIED_GENERATION_ANNOTATION] = json!("1");
    sts_live["status"] = serde_json::to_value(sts.status.clone().unwrap()).unwrap();

    let fake = ManagementFake::start().await;
    let nodes: Vec<String> = (0..3).map(|i| validated.node_name(i)).collect();
    fake.answer("GET", "/api/overview", 200, json!({"rabbitmq_version": "4.1.4"}));
    fake.answer(
        "GET",
        "/api/nodes",
        200,
        json!(nodes.iter().map(|n| json!({"name": n, "running": true, "partitions": []})).collect::<Vec<_>>()),
    );
    fake.answer("GET", "/api/vhosts", 200, json!([{"name": "/", "default_queue_type": "quorum"}]));

    // The status a previous pass wrote, with the same observation.
    let observation = BrokerObservation {
        version: "4.1.4".into(),
        members: nodes.clone(),
        high_availability: HaOutcome::QuorumQueues { vhosts: 1, raft_metadata: false },
        ..Default::default()
    };
    let mut verdicts = conditions::verdicts(&conditions::Observed {
        desired_replicas: 3,
        stateful_set: Some(&sts),
        broker: Ok(&observation),
        error: None,
        unschedulable: &[],
        membership: None,
        placements: &Default::default(),
    });
    assert!(verdicts.iter().all(|v| v.status == Some(true)), "{verdicts:#?}");
    verdicts.push(conditions::steady_scaling(3));
    let earlier = Time(jiff::Timestamp::from_second(1_700_000_000).unwrap());
    cluster.status = Some(RabbitClusterStatus {
        observed_generation: Some(1),
        rabbitmq_version: Some("4.1.4".into()),
        replicas: 3,
        ready_replicas: 3,
        selector: Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=rabbitmq".into()),
        members: nodes.clone(),
        partitioned_nodes: Some(0),
        disabled_feature_flags: vec![],
        mirrored_classic_queues: vec![],
        warnings: vec![],
        conditions: conditions::merge_conditions(&[], &verdicts, Some(1), &earlier),
    });
    let live = vec![
        sts_live,
        live(&resources.erlang_cookie_secret),
        live(&resources.default_user_secret),
        live(&resources.service_account),
        live(&resources.config_map),
        live(&resources.headless_service),
        live(&resources.client_service),
        live(&resources.pod_disruption_budget),
        live(resources.network_policy.as_ref().expect("a NetworkPolicy by default")),
    ];
    SteadyCluster { cluster, fake, nodes, live }
}

/// Everything exists as the operator would apply it, the pods are ready and the broker converged:
/// a reconcile then reads its stores and the management API, and calls the API server not once.
#[tokio::test]
async fn a_steady_cluster_costs_the_api_server_nothing() {
    let SteadyCluster { cluster, fake, live, .. } = steady_cluster().await;
    let (result, calls) = run_with(cluster, live, vec![], &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(calls.is_empty(), "{calls:#?}");
    assert!(fake.writes().is_empty(), "broker writes: {:?}", fake.writes());
    assert!(fake.requests().iter().any(|(call, _)| call == "GET /api/nodes"), "membership was checked");
}

/// spec.networkPolicy.enabled turned off: the user asked for no policy, so the operator deletes
/// the one it made (and nothing else changes).
#[tokio::test]
async fn a_network_policy_turned_off_is_deleted() {
    let SteadyCluster { mut cluster, fake, live, .. } = steady_cluster().await;
    cluster.spec.network_policy.enabled = false;
    let script = vec![
        Call::new(Method::DELETE, NETWORK_POLICY).returns(json!({"apiVersion": "v1", "kind": "Status",
            "metadata": {}, "status": "Success"})),
        Call::event("default", "Deleted").check(|body| {
            assert_eq!(body["note"], "deleted NetworkPolicy demo", "{body}");
        }),
    ];
    let (result, _) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn a_scale_down_that_would_lose_messages_is_refused_naming_the_queue() {
    let SteadyCluster { mut cluster, fake, nodes, live } = steady_cluster().await;
    cluster.spec.replicas = 1;
    // As 4.x reports it (3.x does not: then the operator asks the leaving node itself).
    fake.answer(
        "GET",
        "/api/nodes",
        200,
        json!(
            nodes
                .iter()
                .map(|n| json!({"name": n, "running": true, "partitions": [], "being_drained": false}))
                .collect::<Vec<_>>()
        ),
    );
    fake.answer(
        "GET",
        "/api/queues",
        200,
        json!([{"name": "invoices", "vhost": "/", "type": "classic", "node": nodes[2], "durable": true,
                "exclusive": false, "messages": 12}]),
    );
    let pod = |i: usize| {
        json!({"metadata": {"name": format!("demo-{i}"), "namespace": "default"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    };
    let mut script: Vec<Call> = vec![Call::get(format!("{NS}/pods")).returns(json!({"apiVersion": "v1",
        "kind": "PodList", "metadata": {}, "items": [pod(0), pod(1), pod(2)]}))];
    // The StatefulSet keeps its 3 replicas: every child is as applied, nothing is written.
    script.push(Call::event("default", "ScaleDownRefused").check(|body| {
        assert_eq!(body["type"], "Warning");
        let note = body["note"].as_str().unwrap();
        assert!(note.contains("invoices (12 messages)") && note.contains("demo-2"), "{note}");
    }));
    script.push(Call::status_patch(CLUSTER).check(|body| {
        let scaling = condition(body, "Scaling");
        assert_eq!(scaling["status"], "False");
        assert_eq!(scaling["reason"], "ScaleDownRefused");
        assert!(scaling["message"].as_str().unwrap().contains("scaling down from 3 to 1"), "{scaling}");
        assert_eq!(condition(body, "ReconcileSuccess")["reason"], "ScaleDownRefused");
        assert_eq!(condition(body, "Ready")["status"], "False");
    }));
    let (result, calls) = run_with(cluster, live, script, &fake.url).await;
    // Looked at again later: consumers may empty the queue.
    assert!(result.is_err(), "{result:?}");
    assert!(calls.iter().all(|(m, p, _)| m == Method::GET || p.contains("/events") || p.ends_with("/status")));
    assert!(fake.writes().is_empty(), "nothing ran on the broker: {:?}", fake.writes());
    assert!(fake.requests().iter().any(|(call, _)| call == "GET /api/queues"));
}

#[tokio::test]
async fn failures_back_off_exponentially_up_to_five_minutes() {
    let (client, calls) = scripted_client(vec![]);
    let ctx = context(client, "http://127.0.0.1:1");
    let cluster = Arc::new(fixture("basic.yaml"));
    let error = warren::error::Error::Broker {
        reason: warren::error::BrokerReason::BrokerUnavailable,
        what: "GET /api/overview".into(),
        message: "503".into(),
    };
    let delays: Vec<kube::runtime::controller::Action> =
        (0..10).map(|_| error_policy(cluster.clone(), &error, ctx.clone())).collect();
    let expected: Vec<kube::runtime::controller::Action> = [5, 10, 20, 40, 80, 160, 300, 300, 300, 300]
        .into_iter()
        .map(|s| kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(s)))
        .collect();
    assert_eq!(delays, expected);
    drop(ctx);
    assert!(calls.await.unwrap().is_empty());
}

/// The binary's TLS stack: kube and reqwest must agree on one rustls crypto provider, or building
/// an https client panics (found by the e2e tests on the real API server).
#[tokio::test]
async fn https_clients_can_be_built() {
    let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    assert!(Client::try_from(config).is_ok());
    assert!(warren::rabbitmq::management::ManagementClient::new("https://127.0.0.1:15671", "u", "p").is_ok());
}

/// `kubectl scale sts demo --replicas=0`: the store shows a generation past the one the operator
/// recorded; the StatefulSet is read once (for its managed fields), applied again with force, the
/// new generation recorded, and a Warning names the field, its values and the manager.
#[tokio::test]
async fn a_stateful_set_scaled_by_hand_is_set_back_and_the_change_named() {
    let SteadyCluster { cluster, fake, mut live, .. } = steady_cluster().await;
    live[0]["spec"]["replicas"] = json!(0);
    live[0]["metadata"]["generation"] = json!(2);
    let mut full = live[0].clone();
    full["metadata"]["managedFields"] = json!([
        {"manager": "warren", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
        {"manager": "kubectl", "operation": "Update", "subresource": "scale", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    ]);
    let mut after = live[0].clone();
    after["spec"]["replicas"] = json!(3);
    after["metadata"]["generation"] = json!(3);
    let claim = |i: usize| json!({"metadata": {"name": format!("data-demo-{i}"), "namespace": "default"}});
    let script = vec![
        // At 0 replicas the StatefulSet does not say the cluster has data: its claims do.
        Call::get(format!("{NS}/persistentvolumeclaims")).returns(json!({"apiVersion": "v1",
            "kind": "PersistentVolumeClaimList", "metadata": {}, "items": [claim(0), claim(1), claim(2)]})),
        Call::get(STS).returns(full),
        Call::forced_apply(STS).check(|body| assert_eq!(body["spec"]["replicas"], 3, "{body}")).returns(after),
        Call::new(Method::PATCH, STS).check(|body| {
            assert_eq!(body["metadata"]["annotations"][APPLIED_GENERATION_ANNOTATION], "3", "{body}");
        }),
        Call::event("default", "DriftReverted").check(|body| {
            assert_eq!(body["type"], "Warning");
            let note = body["note"].as_str().unwrap();
            assert!(note.contains("by kubectl (through /scale): spec.replicas 0 (set back to 3)"), "{note}");
        }),
        // The StatefulSet's status is for generation 1: the pods are not looked at as ready yet.
        Call::status_patch(CLUSTER).check(|body| {
            assert_eq!(condition(body, "ReconcileSuccess")["status"], "True");
            assert_eq!(condition(body, "AllReplicasReady")["status"], "False");
            assert_eq!(condition(body, "AllReplicasReady")["reason"], "PodsNotReady");
        }),
    ];
    let (result, _) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(fake.writes().is_empty(), "nothing ran on the broker: {:?}", fake.writes());
}

/// A pod the scheduler cannot place (spec.spread.nodes Required on too few nodes): the
/// AllReplicasReady condition and a Warning Event say which and why, in the scheduler's words.
#[tokio::test]
async fn a_pod_the_scheduler_cannot_place_is_named_with_why() {
    let SteadyCluster { cluster, fake, mut live, .. } = steady_cluster().await;
    live[0]["status"]["readyReplicas"] = json!(2);
    let why = "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.";
    let labels = json!({"app.kubernetes.io/name": "rabbitmq", "app.kubernetes.io/instance": "demo"});
    let pending = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-2", "namespace": "default", "labels": labels},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}]}});
    let running = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "demo-0", "namespace": "default", "labels": labels}, "status": {"phase": "Running"}});
    live.extend([running, pending]);
    // From the pods' store: no read.
    let script = vec![
        Call::event("default", "PodUnschedulable").check(move |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["note"], format!("demo-2 cannot be scheduled: {why}"), "{body}");
            // The pod is the Event's related object: one series per pod, each with its own note.
            assert_eq!(
                (&body["related"]["kind"], &body["related"]["name"]),
                (&json!("Pod"), &json!("demo-2")),
                "{body}"
            );
        }),
        Call::status_patch(CLUSTER).check(move |body| {
            let replicas = condition(body, "AllReplicasReady");
            assert_eq!((&replicas["status"], &replicas["reason"]), (&json!("False"), &json!("PodsUnschedulable")));
            assert_eq!(replicas["message"], format!("2/3 pods ready; demo-2 cannot be scheduled: {why}"));
        }),
    ];
    let (result, _) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(fake.requests().is_empty(), "the broker is asked only once every pod is ready");
}

/// A roll-out to a tag that does not exist (one pod in ImagePullBackOff) is undone: the template
/// says 4.1.40, but the broker last reported 4.1.4 with every pod ready, so 4.1.4 is no downgrade.
#[tokio::test]
async fn returning_to_the_version_the_broker_runs_is_not_a_downgrade() {
    let SteadyCluster { cluster, fake, mut live, .. } = steady_cluster().await;
    assert_eq!(cluster.status.as_ref().and_then(|s| s.rabbitmq_version.as_deref()), Some("4.1.4"));
    live[0]["spec"]["template"]["spec"]["containers"][0]["image"] = json!("rabbitmq:4.1.40-management");
    live[0]["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = json!("the-4.1.40-roll-out");
    let script = vec![
        Call::forced_apply(STS).check(|body| {
            assert_eq!(body["spec"]["template"]["spec"]["containers"][0]["image"], "rabbitmq:4.1.4-management");
        }),
        // Then the broker, which reports 4.1.4 on every node: the status already says all of it
        // (no UpgradeRefused), so it is not written again.
        Call::event("default", "Updated"),
    ];
    let (result, _) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
}

/// spec.replicas 0 stops every node at once: no hand-over, no forget, no claim deleted, no broker
/// call; Ready says Stopped.
#[tokio::test]
async fn replicas_zero_stops_the_cluster_and_forgets_nothing() {
    let SteadyCluster { mut cluster, fake, live, .. } = steady_cluster().await;
    cluster.spec.replicas = 0;
    let script = vec![
        Call::apply(format!("{NS}/secrets/demo-default-user")),
        Call::apply(format!("{NS}/configmaps/demo-config")).check(|body| assert_eq!(body["data"]["replicas"], "0")),
        Call::forced_apply(STS).check(|body| assert_eq!(body["spec"]["replicas"], 0, "{body}")),
        Call::event("default", "Updated"),
        Call::status_patch(CLUSTER).check(|body| {
            let ready = condition(body, "Ready");
            assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("Stopped")));
            assert!(ready["message"].as_str().unwrap().contains("volumes, the Erlang cookie and the users are kept"));
            assert_eq!(condition(body, "ClusterFormed")["reason"], "Stopped");
            assert_eq!(condition(body, "ReconcileSuccess")["status"], "True");
        }),
    ];
    let (result, calls) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(!calls.iter().any(|(m, p, _)| m == Method::DELETE || p.contains("persistentvolumeclaims")), "{calls:?}");
    assert!(fake.requests().is_empty(), "the broker was called: {:?}", fake.requests());
}

/// Starting a cluster stopped with three nodes at spec.replicas 1: every node that holds data comes
/// back first (a node left out would be waited for by the others), then a scale-down runs.
#[tokio::test]
async fn a_stopped_cluster_starts_with_every_node_that_holds_data() {
    let SteadyCluster { mut cluster, fake, mut live, .. } = steady_cluster().await;
    cluster.spec.replicas = 1;
    live[0]["spec"]["replicas"] = json!(0);
    live[0]["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = json!("stopped");
    let claim = |i: usize| json!({"metadata": {"name": format!("data-demo-{i}"), "namespace": "default"}});
    let script = vec![
        Call::get(format!("{NS}/persistentvolumeclaims")).returns(json!({"apiVersion": "v1",
            "kind": "PersistentVolumeClaimList", "metadata": {}, "items": [claim(0), claim(1), claim(2)]})),
        Call::forced_apply(STS).check(|body| assert_eq!(body["spec"]["replicas"], 3, "{body}")),
        Call::event("default", "Updated"),
    ];
    let (result, _) = run_with(cluster, live, script, &fake.url).await;
    assert!(result.is_ok(), "{result:?}");
}
