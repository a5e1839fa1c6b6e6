//! What the tests on the local control plane share: the admin client, kubectl and helm, the audit
//! log, a namespace per test, and the operator run as a process with the chart's ServiceAccount.
//!
//! The control plane itself is started and stopped around the test binary by
//! e2e/with-control-plane.sh, which exports KUBECONFIG, WARREN_E2E_DIR and WARREN_HELM.

pub mod cluster;
pub mod operator;
pub use crate::wait::wait_for;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Mutex;

pub use crate::repo;

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run these tests through e2e/with-control-plane.sh (make test does)")
    }))
}

/// The control plane's directory (audit.log, pki/, server).
pub fn e2e_dir() -> PathBuf {
    env_path("WARREN_E2E_DIR")
}

pub async fn admin_client() -> Client {
    Client::try_default().await.expect("admin client from KUBECONFIG")
}

/// Runs a command from the repository root; returns its output whatever the exit status.
pub fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut command = Command::new(program.as_ref());
    command.args(args).current_dir(repo());
    command.stdin(std::process::Stdio::piped());
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{:?}: {e}", program.as_ref()));
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

pub fn kubectl(args: &[&str]) -> Output {
    run("kubectl", args, None)
}

pub fn kubectl_stdin(args: &[&str], stdin: &str) -> Output {
    run("kubectl", args, Some(stdin))
}

pub fn helm(args: &[&str]) -> Output {
    run(env_path("WARREN_HELM"), args, None)
}

/// Panics with the command's stderr unless it succeeded; returns stdout.
pub fn ok(what: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

static CRDS: Mutex<bool> = Mutex::const_new(false);

/// Applies crds/ once per test binary and waits until they are served.
pub async fn ensure_crds() {
    let mut done = CRDS.lock().await;
    if !*done {
        ok("kubectl apply crds/", kubectl(&["apply", "--server-side", "-f", "crds/"]));
        crd_established("rabbitclusters.warren.dev").await;
        *done = true;
    }
}

/// Waits until a CRD is Established. Not `kubectl wait`: it fails at once, instead of waiting,
/// while a CRD just created still has `status.conditions: null` (kubernetes/kubernetes#66439).
pub async fn crd_established(crd: &str) {
    let jsonpath = r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#;
    wait_for(&format!("CRD {crd} Established"), std::time::Duration::from_secs(60), || async {
        let output = kubectl(&["get", "crd", crd, "-o", jsonpath]);
        let status = String::from_utf8_lossy(&output.stdout).trim().to_string();
        match status.as_str() {
            "True" => Ok(()),
            _ => Err(format!("Established={status:?} {}", String::from_utf8_lossy(&output.stderr).trim())),
        }
    })
    .await
}

/// A namespace of one test, deleted when the test ends (pass or fail).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>`: a namespace of an earlier run may still be terminating.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = &format!("{prefix}-{:04x}", rand::random::<u16>());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(json!({ "metadata": { "name": name } })).expect("namespace");
        api.create(&PostParams::default(), &ns).await.unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Self { name: name.to_string() }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // kubectl rather than the client: this may run while the test's runtime unwinds, and the
        // client's connection pool lives on that runtime.
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// One audit event (see e2e/audit-policy.yaml): a request that changed something, or a read by a
/// service account.
#[derive(Debug, Clone)]
pub struct Write {
    pub user: String,
    /// The token's id (`JTI=...`): two replicas of one ServiceAccount differ here.
    pub credential: Option<String>,
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub code: i64,
    pub at: jiff::Timestamp,
}

/// Whether a request only read.
pub fn is_read(request: &Write) -> bool {
    request.verb == "get" || request.verb == "list"
}

/// The write requests the API server logged for `user`, in order, but for the Lease of leader
/// election (renewed every few seconds, not a reconcile's doing): `requests_by` has those.
pub fn writes_by(user: &str) -> Vec<Write> {
    requests_by(user).into_iter().filter(|r| !is_read(r) && r.resource != "leases").collect()
}

/// Every request the API server logged for `user` (writes, and reads by service accounts), in order.
pub fn requests_by(user: &str) -> Vec<Write> {
    let log = std::fs::read_to_string(e2e_dir().join("audit.log")).expect("read audit.log");
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["user"]["username"] == user)
        .map(|event| {
            let text = |v: &Value| v.as_str().map(str::to_string);
            Write {
                user: user.to_string(),
                credential: event["user"]["extra"]["authentication.kubernetes.io/credential-id"][0]
                    .as_str()
                    .map(str::to_string),
                verb: text(&event["verb"]).unwrap_or_default(),
                resource: text(&event["objectRef"]["resource"]).unwrap_or_default(),
                subresource: text(&event["objectRef"]["subresource"]),
                namespace: text(&event["objectRef"]["namespace"]),
                name: text(&event["objectRef"]["name"]),
                code: event["responseStatus"]["code"].as_i64().unwrap_or(0),
                at: event["stageTimestamp"].as_str().and_then(|t| t.parse().ok()).unwrap_or_default(),
            }
        })
        .collect()
}

pub fn describe(writes: &[Write]) -> String {
    writes
        .iter()
        .map(|w| {
            format!(
                "{} {}{} {} -> {}",
                w.verb,
                w.resource,
                w.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default(),
                w.name.as_deref().unwrap_or(""),
                w.code
            )
        })
        .collect::<Vec<_>>()
        .join("\n  ")
}

pub fn manifest(path: &Path) -> String {
    std::fs::read_to_string(Path::new(repo()).join(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
