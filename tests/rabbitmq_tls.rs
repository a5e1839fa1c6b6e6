//! Tier 2: TLS only, live. Warren's default 4.3 with `spec.tls` (a cert-manager style Secret, here
//! made with openssl) and `disableNonTLSListeners`, 3 nodes: the plain listeners are closed, the
//! management API answers over HTTPS (the operator's broker reconcile ran through it), AMQPS
//! serves a client that trusts the CA and refuses one that does not. Then `warren migrate` from a
//! plain 3.10 into it: refused before anything moves with the wrong CA, every message moved with
//! the right one.

mod support;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use support::amqp;
use support::generations::manifest;
use support::rabbit_nodes::NodeCluster;
use warren::migrate::{Endpoint, MigrateReason, Options, migrate};

const MESSAGES: u32 = 500;

fn endpoint(nodes: &NodeCluster) -> Endpoint {
    Endpoint::parse(&nodes.nodes[0].amqp_url(&nodes.credentials), &nodes.management_url(0)).expect("endpoint")
}

fn closed(ip: &str, port: u16) -> bool {
    let address: SocketAddr = format!("{ip}:{port}").parse().expect("address");
    TcpStream::connect_timeout(&address, Duration::from_secs(3)).is_err()
}

/// The message ids in `queue` on the TLS cluster, read with a client that trusts its CA.
async fn ids_over_tls(nodes: &NodeCluster, queue: &str) -> Vec<u32> {
    let url = nodes.nodes[1].amqp_url(&nodes.credentials);
    let connection = warren::migrate::amqp::connect(&url, nodes.ca(), "target").await.expect("AMQPS with the CA");
    let channel = connection.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Some(message) =
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
    {
        let id = message.delivery.properties.message_id().as_ref().expect("message id").to_string();
        ids.push(id.parse().expect("numeric id"));
    }
    warren::migrate::amqp::close(connection, "read").await;
    ids
}

#[tokio::test]
async fn a_tls_only_cluster_serves_verified_clients_and_takes_a_migration_from_a_plain_one() {
    let tls = "  tls:\n    secretName: new-tls\n    disableNonTLSListeners: true\n";
    let (old, new) = NodeCluster::started_pair(&manifest("old", 1, "3.10", ""), &manifest("new", 3, "4.3", tls)).await;

    // The plain listeners are closed on every node; the TLS ones serve.
    for node in &new.nodes {
        assert!(closed(&node.ip, 5672) && closed(&node.ip, 15672), "{}: a plain listener is open", node.name);
        assert!(!closed(&node.ip, 5671) && !closed(&node.ip, 15671), "{}: no TLS listener", node.name);
    }
    let overview = new.api(0, "/api/overview").await.expect("the management API over HTTPS, verified");
    assert_eq!(overview["rabbitmq_version"], "4.3.6", "{overview}");
    // AMQPS: a client that trusts the CA connects; one that does not is refused by its own check.
    let url = new.nodes[0].amqp_url(&new.credentials);
    let trusted = warren::migrate::amqp::connect(&url, new.ca(), "target").await.expect("AMQPS with the CA");
    warren::migrate::amqp::close(trusted, "checked").await;
    let Err(untrusted) = warren::migrate::amqp::connect(&url, None, "target").await else {
        panic!("a client that does not trust the CA connected");
    };
    assert!(untrusted.message.to_lowercase().contains("certificate"), "{}", untrusted.message);

    // A plain 3.10 source with messages.
    let source_url = old.nodes[0].amqp_url(&old.credentials);
    let body = serde_json::json!({"durable": true, "arguments": {}});
    old.api_put(0, "/api/queues/%2F/orders", body).await.expect("declare orders");
    let (confirmed, error) = amqp::publish(&source_url, "orders", 0..MESSAGES, 100).await;
    assert_eq!((confirmed.len(), error), (MESSAGES as usize, None));

    // With another CA: refused before anything moves, naming the flag.
    let other = std::env::temp_dir().join(format!("warren-other-ca-{}", std::process::id()));
    let other_ca = support::tls::ca(&other, "another CA");
    let mut target = endpoint(&new).with_ca_file(Some(&other_ca)).expect("CA file");
    let _ = std::fs::remove_dir_all(&other);
    let error = migrate(&Options::new(endpoint(&old), target.clone())).await.expect_err("the wrong CA");
    assert_eq!(error.reason, MigrateReason::TlsNotVerified, "{error}");
    assert!(error.message.contains("--target-ca"), "{error}");
    assert_eq!(amqp::live_depth(&source_url, "orders").await, u64::from(MESSAGES), "the source untouched");
    assert!(new.api(0, "/api/queues/%2F/orders").await.is_err(), "the target got the queue anyway");

    // With the cluster's CA (the ca.crt of its Secret): everything moves, over AMQPS and HTTPS.
    target.ca = new.ca().map(str::to_string);
    let report = migrate(&Options::new(endpoint(&old), target)).await.expect("the migration");
    assert!(report.complete, "{report:#?}");
    assert_eq!(report.moved(), u64::from(MESSAGES), "{report:#?}");
    let info = new.api(0, "/api/queues/%2F/orders").await.expect("orders on the target");
    assert_eq!((info["type"].as_str(), info["members"].as_array().map(Vec::len)), (Some("quorum"), Some(3)), "{info}");
    let ids = ids_over_tls(&new, "orders").await;
    assert_eq!(ids.len(), MESSAGES as usize, "every message once");
    assert_eq!(ids.into_iter().collect::<BTreeSet<u32>>(), (0..MESSAGES).collect(), "every message once");
    assert_eq!(amqp::live_depth(&source_url, "orders").await, 0, "the source drained");
}
