//! A TLS-only RabbitCluster in pods: the user's certificate (made with openssl, in the layout of a
//! cert-manager Secret, labelled for the operator to watch) arrives after the cluster; the operator
//! waits for it, then runs the cluster and reaches its management API over verified HTTPS only;
//! clients get amqps:// URIs; the plain ports are closed (Prometheus's too: HTTPS on 15691); the
//! node and the CLI tools in the pod (bootstrap, probes, the operator's exec) speak the Erlang
//! distribution over TLS; `kubectl warren status` works.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::Api;
use testkit::control_plane::cluster::wait_condition;
use testkit::control_plane::{TestNamespace, admin_client, kubectl, ok, wait_for};

use crate::observability::kubectl_warren;
use crate::rig::{POD_TIMEOUT, ensure_operator, image, wait_ready};

const NAME: &str = "secure";

/// The test's certificates, removed when it ends (pass or fail).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_tls_only_cluster_runs_in_pods_with_the_users_certificate() {
    ensure_operator().await;
    let client = admin_client().await;
    let namespace = TestNamespace::create(&client, "node-tls").await;
    let ns = namespace.name.as_str();
    let manifest = format!(
        "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata:\n  name: {NAME}\nspec:\n  replicas: 1\n  \
         image: {}\n  resources:\n    requests: {{cpu: 100m, memory: 256Mi}}\n    limits: {{memory: 1Gi}}\n  tls:\n    \
         secretName: {NAME}-tls\n    disableNonTLSListeners: true\n    interNode: true\n    prometheus: true\n",
        image("RABBITMQ_IMAGE")
    );
    ok("kubectl apply", testkit::control_plane::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest));
    // No certificate yet: the cluster says which Secret it waits for, and makes nothing.
    let waiting = wait_condition(&client, ns, NAME, "ReconcileSuccess", "False", Some("SecretMissing")).await;
    let message =
        testkit::control_plane::cluster::condition(&waiting, "ReconcileSuccess").expect("condition").message.clone();
    assert!(message.contains(&format!("{NAME}-tls")), "{message}");

    // The certificate, as a user makes it: the client Service's names and each pod's.
    let dir = Scratch(std::env::temp_dir().join(format!("warren-{ns}")));
    let ca_dir = dir.0.join("ca");
    testkit::tls::ca(&ca_dir, "warren-e2e-ca");
    let service_host = format!("{NAME}.{ns}.svc.cluster.local");
    let dns = vec![service_host.clone(), format!("{NAME}.{ns}.svc"), format!("*.{NAME}-nodes.{ns}.svc.cluster.local")];
    let cert_dir = dir.0.join("server");
    testkit::tls::server(&cert_dir, &ca_dir, &dns, &[]);
    let file = |key: &str| format!("--from-file={key}={}", cert_dir.join(key).display());
    ok(
        "kubectl create secret",
        kubectl(&[
            "create",
            "secret",
            "generic",
            &format!("{NAME}-tls"),
            "-n",
            ns,
            &file("tls.crt"),
            &file("tls.key"),
            &file("ca.crt"),
        ]),
    );
    ok(
        "kubectl label secret",
        kubectl(&["label", "secret", &format!("{NAME}-tls"), "-n", ns, "warren.dev/watch=true"]),
    );

    // Ready with one running member: the operator read that from the management API over HTTPS,
    // verified against ca.crt for the Service's name (the plain port is closed).
    wait_ready(&client, ns, NAME, 1).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let user = secrets.get(&format!("{NAME}-default-user")).await.expect("default-user Secret");
    let field = |key: &str| {
        String::from_utf8(user.data.as_ref().and_then(|d| d.get(key)).expect(key).0.clone()).expect("utf-8")
    };
    assert!(
        field("uri").starts_with("amqps://") && field("uri").contains(&format!("@{service_host}:5671")),
        "uri: a TLS URI"
    );
    assert!(field("management-uri").starts_with(&format!("https://{service_host}:15671")), "management-uri");

    // From the node: AMQPS through the client Service presents a certificate the CA verifies for
    // the Service's name; the plain AMQP and HTTP ports of the pod are closed.
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let service = services.get(NAME).await.expect("client Service");
    let cluster_ip = service.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("ClusterIP");
    let ports: Vec<i32> = service.spec.and_then(|s| s.ports).into_iter().flatten().map(|p| p.port).collect();
    assert!(!ports.contains(&5672) && !ports.contains(&15672), "plain ports on the Service: {ports:?}");
    let handshake = wait_for("a verified AMQPS handshake through the Service", Duration::from_secs(60), || async {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("{cluster_ip}:5671"), "-verify_hostname", &service_host])
            .args(["-CAfile", &ca_dir.join("ca.crt").to_string_lossy(), "-verify_return_error", "-brief"])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if text.contains("Verification: OK") { Ok(text) } else { Err(text) }
    })
    .await;
    assert!(handshake.contains("Verified peername"), "{handshake}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = pods.get(&format!("{NAME}-0")).await.expect("pod");
    let pod_ip = pod.status.and_then(|s| s.pod_ip).expect("pod IP");
    for port in [5672, 15672, 15692] {
        let refused = tokio::net::TcpStream::connect((pod_ip.as_str(), port)).await;
        assert!(refused.is_err(), "port {port} of {pod_ip} accepts connections: the plain listener is open");
    }
    // The metrics over HTTPS, verified; the distribution port speaks TLS to the cluster's certificate.
    let (pem, key) = (cert_dir.join("tls.crt"), cert_dir.join("tls.key"));
    for (port, client_certificate) in [(15691, false), (25672, true)] {
        let mut command = Command::new("openssl");
        command
            .args(["s_client", "-connect", &format!("{pod_ip}:{port}"), "-brief", "-verify_return_error"])
            .args(["-CAfile", &ca_dir.join("ca.crt").to_string_lossy()])
            .stdin(std::process::Stdio::null());
        if client_certificate {
            command.args(["-cert", &pem.to_string_lossy(), "-key", &key.to_string_lossy()]);
        }
        let out = command.output().expect("openssl");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("Verification: OK"), "port {port} of {pod_ip} is not TLS: {said}");
    }
    // A client without the CA is refused by its own verification.
    let unverified = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{cluster_ip}:5671"), "-verify_hostname", &service_host])
        .args(["-verify_return_error", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    assert!(!String::from_utf8_lossy(&unverified.stderr).contains("Verification: OK"));

    // kubectl warren reaches the management API over HTTPS (port-forwarded to 15671), verified.
    let screen = wait_for("kubectl warren status over HTTPS", POD_TIMEOUT, || async {
        let out = kubectl_warren(&["status", NAME, "-n", ns]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && screen.contains("1/1 pods ready   Ready=True") {
            Ok(screen)
        } else {
            Err(format!("{screen}{}", String::from_utf8_lossy(&out.stderr)))
        }
    })
    .await;
    eprintln!("kubectl warren status {NAME} -n {ns}:\n{screen}");
    let line = screen.lines().find(|l| l.starts_with(&format!("{NAME}-0 "))).expect("the pod's line");
    assert_eq!(line.split_whitespace().nth(4), Some("yes"), "a running member: {line}");
}
