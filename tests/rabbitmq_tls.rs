//! Tier 2: TLS only, live. Warren's default 4.3 with `spec.tls` (a cert-manager style Secret, here
//! made with openssl), `disableNonTLSListeners`, `prometheus` and `interNode`, 3 nodes formed over
//! TLS distribution: the plain listeners are closed (Prometheus too: its metrics over HTTPS on
//! 15691), the
//! management API answers over HTTPS (the operator's broker reconcile ran through it), AMQPS
//! serves a client that trusts the CA and refuses one that does not. Then `warren migrate` from a
//! plain 3.10 into it: refused before anything moves with the wrong CA, every message moved with
//! the right one.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use testkit::amqp;
use testkit::generations::manifest;
use testkit::rabbit_nodes::NodeCluster;
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
    let tls = "  tls:\n    secretName: new-tls\n    disableNonTLSListeners: true\n    prometheus: true\n    interNode: true\n";
    let (old, new) = NodeCluster::started_pair(&manifest("old", 1, "3.10", ""), &manifest("new", 3, "4.3", tls)).await;

    // The plain listeners are closed on every node; the TLS ones serve.
    for node in &new.nodes {
        assert!(closed(&node.ip, 5672) && closed(&node.ip, 15672), "{}: a plain listener is open", node.name);
        assert!(!closed(&node.ip, 5671) && !closed(&node.ip, 15671), "{}: no TLS listener", node.name);
        // spec.tls.prometheus: the metrics over HTTPS on 15691, verified; the plain 15692 closed.
        assert!(closed(&node.ip, 15692), "{}: the plain Prometheus endpoint is open", node.name);
        let url = format!("https://{}:15691/metrics", node.ip);
        let metrics = new.http().get(&url).send().await.and_then(|r| r.error_for_status()).expect("15691 over HTTPS");
        let text = metrics.text().await.expect("metrics");
        assert!(text.contains("rabbitmq_build_info"), "{}: {}", node.name, &text[..text.len().min(300)]);
    }
    distribution_is_tls(&new).await;
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
    kombu_connects_with_the_ca_and_is_refused_without(&new).await;
    kubectl_warren_reads_the_management_api_over_verified_https(&new).await;

    // A plain 3.10 source with messages.
    let source_url = old.nodes[0].amqp_url(&old.credentials);
    let body = serde_json::json!({"durable": true, "arguments": {}});
    old.api_put(0, "/api/queues/%2F/orders", body).await.expect("declare orders");
    let (confirmed, error) = amqp::publish(&source_url, "orders", 0..MESSAGES, 100).await;
    assert_eq!((confirmed.len(), error), (MESSAGES as usize, None));

    // With another CA: refused before anything moves, naming the flag.
    let other = std::env::temp_dir().join(format!("warren-other-ca-{}", std::process::id()));
    let other_ca = testkit::tls::ca(&other, "another CA");
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

    certificate_renewed_under_a_confirming_publisher(&new).await;
}

/// A Celery app's kombu (5.7 line, pinned in tests/fixtures/celery) over AMQPS, as
/// `broker_use_ssl` configures it: with the cluster's CA it publishes and reads back; trusting only
/// the system's CAs it is refused by its own certificate check.
async fn kombu_connects_with_the_ca_and_is_refused_without(nodes: &NodeCluster) {
    let fixtures = std::path::Path::new(testkit::repo()).join("tests/fixtures/celery");
    let venv = tokio::process::Command::new(fixtures.join("venv.sh")).arg("5.7").output().await.expect("venv.sh");
    assert!(venv.status.success(), "venv.sh: {}", String::from_utf8_lossy(&venv.stderr));
    let python = std::path::PathBuf::from(String::from_utf8_lossy(&venv.stdout).trim()).join("bin/python");
    let (tls_dir, _) = nodes.tls.as_ref().expect("TLS");
    let url = nodes.nodes[1].amqp_url(&nodes.credentials);
    let check = |ca: String| {
        let (python, script, url) = (python.clone(), fixtures.join("tls_check.py"), url.clone());
        async move { tokio::process::Command::new(python).arg(script).arg(url).arg(ca).output().await.expect("python") }
    };
    let trusted = check(tls_dir.join("ca.crt").to_string_lossy().into_owned()).await;
    assert!(
        trusted.status.success() && String::from_utf8_lossy(&trusted.stdout).trim() == "ok",
        "kombu with the CA: {}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let untrusted = check("-".into()).await;
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!untrusted.status.success() && said.contains("CERTIFICATE_VERIFY_FAILED"), "kombu without the CA: {said}");
}

/// spec.tls.interNode: the nodes formed one cluster over TLS distribution: 25672 answers a TLS
/// handshake that the CA verifies, with the cluster's certificate as the client's.
async fn distribution_is_tls(nodes: &NodeCluster) {
    let (tls_dir, _) = nodes.tls.as_ref().expect("TLS");
    for node in &nodes.nodes {
        let out = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &format!("{}:25672", node.ip), "-brief", "-verify_return_error"])
            .args(["-CAfile", &tls_dir.join("ca.crt").to_string_lossy()])
            .args(["-cert", &tls_dir.join("tls.crt").to_string_lossy()])
            .args(["-key", &tls_dir.join("tls.key").to_string_lossy()])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("openssl s_client");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("Verification: OK"), "{}: 25672 is not TLS: {said}", node.name);
    }
}

/// The other 4.x generation (4.0, Mnesia) with the same TLS: three nodes form over TLS
/// distribution, the plain listeners are closed, and AMQPS takes and gives back confirmed
/// messages for a client that trusts the CA.
#[tokio::test]
async fn a_4_0_cluster_forms_over_tls_distribution_and_serves_amqps_only() {
    let tls = "  tls:\n    secretName: tls40-tls\n    disableNonTLSListeners: true\n    interNode: true\n";
    let nodes = NodeCluster::started(&manifest("tls40", 3, "4.0", tls)).await;
    distribution_is_tls(&nodes).await;
    let listed = nodes.api(0, "/api/nodes").await.expect("the management API over HTTPS");
    let running = listed.as_array().expect("nodes").iter().filter(|n| n["running"] == true).count();
    assert_eq!(running, 3, "one cluster of three: {listed}");
    for node in &nodes.nodes {
        assert!(closed(&node.ip, 5672) && closed(&node.ip, 15672), "{}: a plain listener is open", node.name);
    }
    let url = nodes.nodes[2].amqp_url(&nodes.credentials);
    nodes.api_put(0, "/api/queues/%2F/tls40", serde_json::json!({"durable": true})).await.expect("declare");
    let (confirmed, error) = amqp::publish_trusting(&url, nodes.ca(), "tls40", 0..100, 20).await;
    assert_eq!((confirmed.len(), error), (100, None));
    let info = nodes.api(0, "/api/queues/%2F/tls40").await.expect("the queue");
    assert_eq!((info["type"].as_str(), info["members"].as_array().map(Vec::len)), (Some("quorum"), Some(3)), "{info}");
}

/// `kubectl warren status`'s management client on a TLS cluster: HTTPS on 15671 through the pod's
/// port-forward (a byte stream; here a TCP connection to the pod), verified against the cluster's
/// CA for the client Service's name, as the default-user Secret's `management-uri` gives it. A
/// certificate from another CA, or one that does not hold the name, is refused.
async fn kubectl_warren_reads_the_management_api_over_verified_https(nodes: &NodeCluster) {
    use warren::kubectl::management::{Tls, get_over};
    let stream = || async { tokio::net::TcpStream::connect((nodes.nodes[0].ip.as_str(), 15671)).await.expect("15671") };
    let (user, password) = (&nodes.credentials.username, &nodes.credentials.password);
    let tls = Tls { ca_pem: nodes.ca().expect("CA").to_string(), server_name: nodes.cluster.client_service_host() };
    let overview = get_over(stream().await, Some(&tls), "overview", user, password).await.expect("verified HTTPS");
    assert_eq!(overview["rabbitmq_version"], "4.3.6", "{overview}");
    let listed: Vec<warren::rabbitmq::management::NodeInfo> = serde_json::from_value(
        get_over(stream().await, Some(&tls), "nodes", user, password).await.expect("GET /api/nodes"),
    )
    .expect("the operator's model of /api/nodes");
    assert_eq!(listed.iter().filter(|n| n.running).count(), 3, "{listed:?}");
    // The node that answers lists its own applications (the others' come empty: the plugin shows
    // them the version of the overview).
    assert_eq!(listed[0].rabbit_version(), Some("4.3.6"), "{:?}", listed[0]);

    let other = std::env::temp_dir().join(format!("warren-plugin-ca-{}", std::process::id()));
    let other_ca = std::fs::read_to_string(testkit::tls::ca(&other, "another CA")).expect("other CA");
    let _ = std::fs::remove_dir_all(&other);
    let wrong_ca = Tls { ca_pem: other_ca, ..tls.clone() };
    let refused = get_over(stream().await, Some(&wrong_ca), "overview", user, password).await.expect_err("another CA");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let wrong_name = Tls { server_name: "elsewhere.example.com".into(), ..tls };
    let refused = get_over(stream().await, Some(&wrong_name), "overview", user, password).await.expect_err("a name");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    eprintln!("[4.3] kubectl warren's HTTPS client: verified, another CA and another name refused ({refused})");
}

/// The serial of the certificate node `index` presents to a new TLS client now (awaited: the
/// publisher shares this runtime).
async fn presented_serial(nodes: &NodeCluster, index: usize) -> Option<String> {
    let (tls_dir, _) = nodes.tls.as_ref().expect("TLS");
    let script = format!(
        "openssl s_client -connect {}:5671 -CAfile {} -verify_return_error </dev/null 2>/dev/null \
         | openssl x509 -noout -serial",
        nodes.nodes[index].ip,
        tls_dir.join("ca.crt").display()
    );
    let out = tokio::process::Command::new("bash").args(["-c", &script]).output().await.expect("openssl s_client");
    let serial = String::from_utf8_lossy(&out.stdout).trim().to_string();
    serial.starts_with("serial=").then_some(serial)
}

/// cert-manager renews the certificate (a new key, the same CA): the kubelet swaps the Secret's
/// files in every pod, and RabbitMQ, which reads them again once its PEM cache is refreshed,
/// presents the new one to new clients with no restart, while a publisher that reconnects for
/// every batch of 100 (a new handshake every half second or so) loses no confirmed message.
async fn certificate_renewed_under_a_confirming_publisher(nodes: &NodeCluster) {
    const QUEUE: &str = "renewal";
    let body = serde_json::json!({"durable": true, "arguments": {}});
    nodes.api_put(0, "/api/queues/%2F/renewal", body).await.expect("declare renewal");
    let old_serial = presented_serial(nodes, 0).await.expect("a verified handshake before the renewal");
    let urls: Vec<String> = nodes.nodes.iter().map(|n| n.amqp_url(&nodes.credentials)).collect();
    let ca = nodes.ca().map(str::to_string);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (urls, ca, stop) = (urls.clone(), ca.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut confirmed, mut failures, mut next) = (Vec::new(), Vec::new(), 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let url = &urls[next as usize % urls.len()];
                let (acked, error) = amqp::publish_trusting(url, ca.as_deref(), QUEUE, next..next + 100, 50).await;
                next += acked.len() as u32;
                confirmed.extend(acked);
                if let Some(error) = error {
                    failures.push(error);
                }
                // A new connection, so a new handshake, every half second or so.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (confirmed, failures)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewed = std::time::Instant::now();
    let new_serial = nodes.rotate_certificate();
    assert_ne!(new_serial, old_serial, "the renewal made a new certificate");
    // Every node presents the new certificate to new clients, with no restart.
    let mut presented = Vec::new();
    for index in 0..nodes.nodes.len() {
        testkit::wait::wait_for(
            &format!("node {index} presents the renewed certificate"),
            Duration::from_secs(300),
            || async {
                let now = presented_serial(nodes, index).await;
                if now.as_deref() == Some(new_serial.as_str()) { Ok(()) } else { Err(format!("{now:?}")) }
            },
        )
        .await;
        presented.push((renewed.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (confirmed, failures) = publisher.await.expect("the publisher");
    eprintln!(
        "[4.3] certificate renewed: every node presented the new one after {:.1} s ({presented:?}); \
         {} confirmed while it happened, {} failed batches {failures:?}",
        renewed.elapsed().as_secs_f64(),
        confirmed.len(),
        failures.len()
    );
    assert!(confirmed.len() >= 100, "the publisher made progress: {}", confirmed.len());
    let ids = ids_over_tls(nodes, QUEUE).await;
    let found: BTreeSet<u32> = ids.iter().copied().collect();
    let lost: Vec<&u32> = confirmed.iter().filter(|id| !found.contains(id)).collect();
    assert!(lost.is_empty(), "confirmed messages lost across the renewal: {} of {}", lost.len(), confirmed.len());
}
