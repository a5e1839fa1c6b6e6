//! The operator as a user installs it: `helm install` of charts/warren, then the real binary run as
//! a process here with a token of the chart's ServiceAccount and the Deployment's own environment,
//! so what it may do is exactly what the chart's RBAC grants.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client};

use super::{e2e_dir, helm, kubectl, ok, wait_for};

pub const RELEASE: &str = "warren";

pub struct Operator {
    pub namespace: String,
    /// The audit log's user name of the chart's ServiceAccount.
    pub user: String,
    pub metrics_url: String,
    pub log: PathBuf,
    child: Child,
}

impl Operator {
    /// Installs the chart in `namespace`, watching that namespace only, and starts the operator.
    pub async fn install(client: &Client, namespace: &str) -> Self {
        ok(
            "helm install",
            helm(&[
                "install",
                RELEASE,
                "charts/warren",
                "-n",
                namespace,
                "--set",
                &format!("watchNamespace={namespace}"),
            ]),
        );
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        let deployment = deployments.get(RELEASE).await.expect("the chart's Deployment");
        let pod = deployment.spec.and_then(|s| s.template.spec).expect("pod template");
        let service_account = pod.service_account_name.clone().expect("serviceAccountName");
        let container = pod.containers.into_iter().find(|c| c.name == "warren").expect("container warren");

        let token = ok(
            "kubectl create token",
            kubectl(&["create", "token", &service_account, "-n", namespace, "--duration", "2h"]),
        );
        let dir = e2e_dir();
        let server = std::fs::read_to_string(dir.join("server")).expect("server address");
        let kubeconfig = dir.join(format!("operator-{namespace}.kubeconfig"));
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
        let log = dir.join(format!("logs/operator-{namespace}.log"));
        let log_file = std::fs::File::create(&log).expect("operator log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_warren"));
        command.args(container.args.unwrap_or_default()).env_clear();
        for var in container.env.unwrap_or_default() {
            command.env(&var.name, var.value.unwrap_or_default());
        }
        command
            .env("WARREN_LISTEN", format!("127.0.0.1:{listen}"))
            .env("WARREN_LOG_FORMAT", "text")
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("operator log"))
            .stderr(log_file);
        let child = command.spawn().expect("start warren run");
        let operator = Self {
            namespace: namespace.to_string(),
            user: format!("system:serviceaccount:{namespace}:{service_account}"),
            metrics_url: format!("http://127.0.0.1:{listen}/metrics"),
            log,
            child,
        };
        wait_for("operator /readyz", Duration::from_secs(30), || async {
            let url = operator.metrics_url.replace("/metrics", "/readyz");
            match reqwest::get(&url).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        operator
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

fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("address").port()
}
