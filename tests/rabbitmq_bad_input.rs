//! Tier 2: bad input reaching the broker. A policy RabbitMQ itself rejects, credentials it refuses,
//! a management API that answers 503 or never answers: the broker reconcile returns a clear,
//! retriable error (never a panic), and the controller's error policy backs off instead of looping.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use testkit::fixture;
use testkit::generations::THREE_NODES;
use testkit::rabbit_nodes::NodeCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::api::RabbitCluster;
use warren::controller::validate::{Settings, validate};
use warren::controller::{Config, Context, error_policy};
use warren::error::Error;
use warren::rabbitmq::broker;
use warren::rabbitmq::management::ManagementClient;
use warren::server::Metrics;

/// Mirrors queues whose names contain an em dash. A valid regular expression for the operator, but
/// Erlang's `re` compiles policy patterns in Latin-1 mode, where `\x{2014}` is out of range.
const EM_DASH_POLICY: &str = r"
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata: {name: demo, namespace: harness}
spec:
  replicas: 3
  image: rabbitmq:3.10.8-management
  highAvailability:
    mode: ClassicMirrored
    classicMirroring: {haMode: all, pattern: '\x{2014}', policyName: em-dash-queues}
";

fn broker_reason(error: &Error) -> &'static str {
    match error {
        Error::Broker { reason, .. } => reason.as_str(),
        other => panic!("expected a broker error, got {other:?}"),
    }
}

/// A management API on loopback that answers every request with `status` and a JSON `body`, or
/// with nothing at all.
async fn scripted_server(answer: Option<(&'static str, &'static str)>) -> String {
    let response = answer.map(|(status, body)| {
        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            match &response {
                Some(text) => {
                    let _ = stream.write_all(text.as_bytes()).await;
                }
                // Keep the connection open and silent.
                None => held.push(stream),
            }
        }
    });
    url
}

#[tokio::test]
async fn broker_errors_are_reported_and_retried_with_backoff() {
    let nodes = NodeCluster::started(THREE_NODES).await;
    let expected = nodes.names(&[0, 1, 2]);
    let (user, password) = (&nodes.credentials.username, &nodes.credentials.password);
    let mut errors = Vec::new();

    // 1. A policy the broker refuses (HTTP 400 with RabbitMQ's own reason); nothing is half-applied.
    let mut resource: RabbitCluster = serde_yaml::from_str(EM_DASH_POLICY).expect("manifest");
    resource.metadata.uid = Some("00000000-0000-4000-8000-00000000beef".into());
    let spec = validate(&resource, &Settings::default()).expect("the operator accepts the pattern");
    let client = ManagementClient::new(&nodes.management_url(1), user, password).expect("client");
    let refused =
        broker::converge(&client, &expected, &spec.high_availability, &[]).await.expect_err("RabbitMQ refuses it");
    assert_eq!(broker_reason(&refused), "BrokerRejected", "{refused}");
    let message = refused.to_string();
    assert!(message.contains("em-dash-queues") && message.contains("400"), "{message}");
    let stored = nodes.api(0, "/api/policies/%2F").await.expect("policies");
    assert!(stored.as_array().is_some_and(|p| p.iter().all(|p| p["name"] != "em-dash-queues")), "{stored}");
    errors.push(refused);

    // 2. Credentials RabbitMQ does not accept: reported without the password.
    let wrong = ManagementClient::new(&nodes.management_url(0), user, "not-the-password").expect("client");
    let unauthorized =
        broker::converge(&wrong, &expected, &nodes.cluster.high_availability, &[]).await.expect_err("401");
    assert_eq!(broker_reason(&unauthorized), "BrokerUnauthorized", "{unauthorized}");
    assert!(!unauthorized.to_string().contains("not-the-password"));
    errors.push(unauthorized);

    // 3. A management API that is there but unavailable, and one that never answers.
    let unavailable_url =
        scripted_server(Some(("503 Service Unavailable", r#"{"error":"unavailable","reason":"booting"}"#))).await;
    let unavailable = ManagementClient::new(&unavailable_url, user, password).expect("client");
    let error =
        broker::converge(&unavailable, &expected, &nodes.cluster.high_availability, &[]).await.expect_err("503");
    assert_eq!(broker_reason(&error), "BrokerUnavailable", "{error}");
    errors.push(error);
    let silent_url = scripted_server(None).await;
    let silent = ManagementClient::new(&silent_url, user, password).expect("client");
    let error = tokio::time::timeout(
        Duration::from_secs(60),
        broker::converge(&silent, &expected, &nodes.cluster.high_availability, &[]),
    )
    .await
    .expect("a hanging management API must not hang the reconcile")
    .expect_err("no answer");
    assert_eq!(broker_reason(&error), "BrokerTimeout", "{error}");
    errors.push(error);

    // Every one is retriable, and successive failures of one cluster back off: 5 s, 10 s, 20 s, ...
    let kube = kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().expect("url"))).expect("client");
    let ctx = Arc::new(Context::new(kube, Config::new(""), Metrics::default()));
    let cluster = Arc::new(fixture("classic-mirrored-3x.yaml"));
    let mut delays = Vec::new();
    for error in &errors {
        assert!(error.is_retriable(), "{error}");
        delays.push(error_policy(cluster.clone(), error, ctx.clone()));
    }
    let expected_delays: Vec<Action> = [5, 10, 20, 40].map(|s| Action::requeue(Duration::from_secs(s))).to_vec();
    assert_eq!(delays, expected_delays);
}
