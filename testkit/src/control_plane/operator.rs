//! The operator as a user installs it: `helm install` of charts/warren, then the real binary run as
//! a process here with a token of the chart's ServiceAccount and the Deployment's own environment,
//! so what it may do is exactly what the chart's RBAC grants.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;
use kube::{Api, Client};

use super::{e2e_dir, helm, kubectl, ok, wait_for};

pub const RELEASE: &str = "warren";

pub struct Operator {
    pub namespace: String,
    /// The audit log's user name of the chart's ServiceAccount.
    pub user: String,
    /// The pod name this process plays (its identity in the leader-election Lease).
    pub pod_name: String,
    /// The audit log's credential id of this process's token: tells replicas apart.
    pub credential: String,
    pub metrics_url: String,
    pub log: PathBuf,
    launch: Launch,
    child: Child,
}

/// What the chart's Deployment runs: its container and ServiceAccount.
#[derive(Clone)]
struct Launch {
    namespace: String,
    service_account: String,
    container: Container,
}

impl Operator {
    /// Installs the chart in `namespace` with its defaults (it runs that namespace only) and starts
    /// one replica of the operator; waits until it is ready (leading, its stores synced).
    pub async fn install(client: &Client, namespace: &str) -> Self {
        Self::install_with(client, namespace, &[]).await
    }

    /// The same with chart values set (`--set` of each).
    pub async fn install_with(client: &Client, namespace: &str, values: &[&str]) -> Self {
        let mut args = vec!["install", RELEASE, "charts/warren", "-n", namespace];
        for value in values {
            args.extend(["--set", value]);
        }
        ok("helm install", helm(&args));
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        let deployment = deployments.get(RELEASE).await.expect("the chart's Deployment");
        let pod = deployment.spec.and_then(|s| s.template.spec).expect("pod template");
        let service_account = pod.service_account_name.clone().expect("serviceAccountName");
        let container = pod.containers.into_iter().find(|c| c.name == "warren").expect("container warren");
        let launch = Launch { namespace: namespace.to_string(), service_account, container };
        let operator = Self::start(launch, &format!("{RELEASE}-0"));
        operator.wait_readyz("ready").await;
        operator
    }

    /// Another replica of the same Deployment, as a second pod would run it; not waited for.
    pub fn another_replica(&self, pod_name: &str) -> Self {
        Self::start(self.launch.clone(), pod_name)
    }

    /// Runs the operator binary as the pod `pod_name` would: the container's arguments and
    /// environment (downward-API fields filled in as the kubelet would), a token of its own.
    fn start(launch: Launch, pod_name: &str) -> Self {
        let namespace = launch.namespace.as_str();
        let token = ok(
            "kubectl create token",
            kubectl(&["create", "token", &launch.service_account, "-n", namespace, "--duration", "2h"]),
        );
        let dir = e2e_dir();
        let server = std::fs::read_to_string(dir.join("server")).expect("server address");
        let kubeconfig = dir.join(format!("operator-{namespace}-{pod_name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    \
                 certificate-authority: {}\nusers:\n- name: operator\n  user:\n    token: {}\ncontexts:\n- name: \
                 e2e\n  context: {{cluster: e2e, user: operator}}\ncurrent-context: e2e\n",
                server.trim(),
                dir.join("pki/ca.crt").display(),
                token.trim()
            ),
        )
        .expect("write kubeconfig");

        let listen = free_loopback_port();
        std::fs::create_dir_all(dir.join("logs")).expect("logs dir");
        let log = dir.join(format!("logs/operator-{namespace}-{pod_name}.log"));
        let log_file = std::fs::File::create(&log).expect("operator log");
        let mut command = Command::new(crate::warren_binary());
        command.args(launch.container.args.clone().unwrap_or_default()).env_clear();
        for var in launch.container.env.clone().unwrap_or_default() {
            let field = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str());
            let value = match field {
                Some("metadata.name") => pod_name.to_string(),
                Some("metadata.namespace") => namespace.to_string(),
                Some(other) => panic!("{}: no value for the field {other}", var.name),
                None => var.value.unwrap_or_default(),
            };
            command.env(&var.name, value);
        }
        command
            .env("WARREN_LISTEN", format!("127.0.0.1:{listen}"))
            .env("WARREN_LOG_FORMAT", "text")
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("operator log"))
            .stderr(log_file);
        let child = command.spawn().expect("start warren run");
        Self {
            namespace: namespace.to_string(),
            user: format!("system:serviceaccount:{namespace}:{}", launch.service_account),
            pod_name: pod_name.to_string(),
            credential: credential_id(token.trim()),
            metrics_url: format!("http://127.0.0.1:{listen}/metrics"),
            log,
            launch,
            child,
        }
    }

    /// `/readyz` as the operator answers it now: (HTTP status, body).
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let url = self.metrics_url.replace("/metrics", "/readyz");
        let response = reqwest::get(&url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.unwrap_or_default()))
    }

    /// Waits until `/readyz` answers 200 with a body starting with `phase` ("ready", "standby").
    pub async fn wait_readyz(&self, phase: &str) {
        wait_for(&format!("{} /readyz {phase}", self.pod_name), Duration::from_secs(60), || async {
            match self.readyz().await {
                Some((200, body)) if body.starts_with(phase) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// `warren_reconciles_total` as the operator reports it.
    pub async fn reconciles(&self) -> u64 {
        let text = reqwest::get(&self.metrics_url).await.expect("scrape").text().await.expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix("warren_reconciles_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no warren_reconciles_total in:\n{text}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a lost node or the OOM killer would: no chance to release the Lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `jti` of a service-account token, as the audit log names the credential
/// (`authentication.kubernetes.io/credential-id: JTI=...`).
fn credential_id(token: &str) -> String {
    use base64::Engine;
    let claims = token.split('.').nth(1).expect("a JWT");
    let json =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).expect("base64 claims");
    let claims: serde_json::Value = serde_json::from_slice(&json).expect("JSON claims");
    format!("JTI={}", claims["jti"].as_str().expect("a jti claim"))
}

fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("address").port()
}
