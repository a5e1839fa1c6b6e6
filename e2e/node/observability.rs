//! What a RabbitMQ team looks at, on a formed cluster: the Prometheus started with the node
//! (Kubernetes service discovery, the prometheus.io annotations) asked with PromQL, and
//! `kubectl warren` run by the real kubectl as its plugin.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::rig::POD_TIMEOUT;
use testkit::control_plane::{e2e_dir, ok, wait_for};

/// One series of a PromQL answer: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// The Prometheus e2e/host.sh started for this cluster.
pub struct Prometheus {
    url: String,
}

/// How long a test waits for Prometheus to start: `make test` builds it beside the first node
/// tests (e2e/test.sh), niced, on a cold machine. Generous, never asserted on.
const PROMETHEUS_BUILD: Duration = Duration::from_secs(1200);

impl Prometheus {
    /// The cluster's Prometheus, once started: at once when it started with the cluster, else
    /// when e2e/host.sh starts it, its binary built (DIR/host/prometheus.failed: it was not).
    pub async fn of_node() -> Self {
        let host = e2e_dir().join("host");
        let url = wait_for("Prometheus to start once its binary is built", PROMETHEUS_BUILD, || async {
            if let Ok(failed) = std::fs::read_to_string(host.join("prometheus.failed")) {
                let cache = std::env::var("WARREN_CACHE").unwrap_or_else(|_| "$WARREN_CACHE".into());
                panic!("{failed}: see the build's log, {cache}/logs/prometheus-build.log");
            }
            std::fs::read_to_string(host.join("prometheus.url")).map_err(|e| {
                format!(
                    "{}/prometheus.url: {e} (its waiter's log: {}/logs/prometheus-later.log)",
                    host.display(),
                    host.display()
                )
            })
        })
        .await;
        Self { url: url.trim().to_string() }
    }

    /// An instant query through the HTTP API.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let url = format!("{}/api/v1/query?query={}", self.url, utf8_percent_encode(promql, NON_ALPHANUMERIC));
        let answer: Value = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if answer["status"] != "success" {
            return Err(format!("{promql}: {answer}"));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = series["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect())
    }

    /// Waits until `promql` answers what `accept` takes.
    pub async fn wait(&self, what: &str, promql: &str, accept: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        wait_for(what, POD_TIMEOUT, || async {
            let samples = self.query(promql).await?;
            if accept(&samples) { Ok(samples) } else { Err(format!("{promql} -> {samples:?}")) }
        })
        .await
    }
}

fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample.0.get(name).map_or("", String::as_str)
}

/// Prometheus found every pod of the cluster and the operator by their annotations, reads the
/// filled queue's ready messages per pod, and the operator's own series.
pub async fn prometheus_sees_the_cluster(namespace: &str, name: &str, pods: &[&str], queue: &str, messages: u64) {
    let prometheus = Prometheus::of_node().await;
    let up = prometheus
        .wait(&format!("Prometheus scraping {pods:?}"), &format!(r#"up{{namespace="{namespace}"}} == 1"#), |s| {
            let mut scraped: Vec<&str> = s.iter().map(|s| label(s, "pod")).collect();
            scraped.sort();
            scraped == pods
        })
        .await;
    eprintln!("Prometheus scrapes {:?}", up.iter().map(|s| label(s, "pod")).collect::<Vec<_>>());
    // The per-object endpoint (the pods' prometheus.io/path): a series per queue, from the node
    // that hosts it (a quorum queue's leader); every node that reports it counts every message.
    let ready = format!(r#"rabbitmq_queue_messages_ready{{namespace="{namespace}",queue="{queue}"}}"#);
    let samples = prometheus
        .wait(&format!("{messages} ready in {queue}"), &ready, |s| {
            !s.is_empty() && s.iter().all(|s| s.1 == messages as f64 && pods.contains(&label(s, "pod")))
        })
        .await;
    eprintln!("{ready}: {:?}", samples.iter().map(|s| (label(s, "pod"), s.1)).collect::<Vec<_>>());

    // The operator: its reconcile counter, and the cluster's gauges with the object's namespace
    // (exported_namespace: the pods job's own namespace label is the operator's).
    prometheus
        .wait("the operator's reconciles", r#"sum(warren_reconciles_total{namespace="warren-system"})"#, |s| {
            s.first().is_some_and(|s| s.1 > 0.0)
        })
        .await;
    let object = format!(r#"exported_namespace="{namespace}",name="{name}""#);
    let replicas = pods.len() as f64;
    for (metric, value) in [
        ("warren_cluster_replicas_desired", replicas),
        ("warren_cluster_replicas_ready", replicas),
        ("warren_cluster_members_running", replicas),
        ("warren_cluster_partitioned_nodes", 0.0),
    ] {
        prometheus
            .wait(&format!("{metric} {value}"), &format!("max({metric}{{{object}}})"), |s| {
                s.first().is_some_and(|s| s.1 == value)
            })
            .await;
    }
    ready_condition(&prometheus, namespace, name, "true").await;
}

/// Waits until Prometheus has the cluster's Ready condition at `status` (true, false).
async fn ready_condition(prometheus: &Prometheus, namespace: &str, name: &str, status: &str) {
    let promql = format!(
        r#"warren_cluster_status_condition{{exported_namespace="{namespace}",name="{name}",type="Ready",status="{status}"}} == 1"#
    );
    prometheus.wait(&format!("Ready={status} in Prometheus"), &promql, |s| !s.is_empty()).await;
}

/// `kubectl warren ...` through the real kubectl, which finds `kubectl-warren` on PATH: the warren
/// binary under that name, as README tells users to install it.
pub fn kubectl_warren(args: &[&str]) -> Output {
    let plugins = e2e_dir().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    let link = plugins.join("kubectl-warren");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_warren"), &link).expect("link kubectl-warren");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = vec![plugins];
    paths.extend(std::env::split_paths(&path));
    Command::new("kubectl")
        .arg("warren")
        .args(args)
        .env("PATH", std::env::join_paths(paths).expect("PATH"))
        .output()
        .expect("run kubectl warren")
}

/// `kubectl warren status`, `secrets`, `pause` and `resume` on the formed cluster; the pause seen
/// by the operator (its Ready condition, in status and in Prometheus).
pub async fn kubectl_warren_on(
    client: &Client,
    namespace: &str,
    name: &str,
    pods: &[&str],
    queue: &str,
    messages: u64,
) {
    // The management API's queue statistics lag the queue by up to their collection interval (5 s):
    // the screen is taken once it counts the queue's messages, as a user would see it a moment later.
    let counted = |screen: &str| {
        screen.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.get(1) == Some(&queue) && cells.get(3) == Some(&messages.to_string().as_str())
        })
    };
    let screen = wait_for(&format!("kubectl warren status counting {messages} in {queue}"), POD_TIMEOUT, || async {
        let screen = ok("kubectl warren status", kubectl_warren(&["status", name, "-n", namespace]));
        if counted(&screen) { Ok(screen) } else { Err(screen) }
    })
    .await;
    eprintln!("kubectl warren status {name} -n {namespace}:\n{screen}");
    for line in screen.lines() {
        assert!(line.chars().count() <= 100, "wider than 100 columns: {line}");
    }
    let replicas = pods.len();
    assert!(screen.contains(&format!("{replicas}/{replicas} pods ready   Ready=True")), "{screen}");
    for pod in pods {
        let line =
            screen.lines().find(|l| l.starts_with(&format!("{pod} "))).unwrap_or_else(|| panic!("{pod}: {screen}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        // POD NODE READY RESTARTS MEMBER VERSION ALARMS PARTITIONED
        assert!(cells[1].starts_with("warren-e2e-"), "the node it runs on: {line}");
        assert_eq!((cells[2], cells[4], cells[6], cells[7]), ("yes", "yes", "none", "-"), "{line}");
        assert!(cells[5].starts_with(|c: char| c.is_ascii_digit()), "a version: {line}");
    }
    let queue_line = screen.lines().find(|l| l.split_whitespace().nth(1) == Some(queue)).expect("the queue's line");
    assert_eq!(queue_line.split_whitespace().nth(3), Some(messages.to_string().as_str()), "{queue_line}");
    assert!(screen.contains("\nAGE   TYPE"), "the last Events: {screen}");

    let json: Value = serde_json::from_str(&ok(
        "kubectl warren status -o json",
        kubectl_warren(&["status", name, "-n", namespace, "-o", "json"]),
    ))
    .expect("status as JSON");
    let nodes = json["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), replicas, "{json}");
    assert!(nodes.iter().all(|n| n["running"] == true && n["alarms"] == serde_json::json!([])), "{json}");
    let version = json["rabbitmq_version"].as_str().expect("the version");
    assert!(nodes.iter().all(|n| n["version"] == version), "every node runs {version}: {json}");
    let largest = &json["queues"]["largest"];
    let listed = largest.as_array().into_iter().flatten().find(|q| q["name"] == queue).expect("the queue in JSON");
    assert_eq!(listed["ready"], messages, "{listed}");

    let secrets: Value = serde_json::from_str(&ok(
        "kubectl warren secrets -o json",
        kubectl_warren(&["secrets", name, "-n", namespace, "-o", "json"]),
    ))
    .expect("secrets as JSON");
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&format!("{name}-default-user"))
        .await
        .expect("the default-user Secret");
    let field = |key: &str| String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8");
    assert_eq!(secrets["username"], field("username"));
    assert_eq!(secrets["password"], field("password"));
    assert_eq!(
        secrets["uri"].as_str().expect("uri").rsplit_once('@').map(|(_, host)| host),
        Some(format!("{name}.{namespace}.svc.cluster.local:5672//").as_str())
    );
    let failover: Vec<&str> =
        secrets["failover_uris"].as_array().expect("failover").iter().filter_map(Value::as_str).collect();
    assert_eq!(failover.len(), replicas, "{secrets}");
    for (uri, pod) in failover.iter().zip(pods) {
        assert!(uri.contains(&format!("@{pod}.{name}-nodes.{namespace}.svc.cluster.local:5672/")), "{uri}");
    }
    let text = ok("kubectl warren secrets", kubectl_warren(&["secrets", name, "-n", namespace]));
    assert!(text.contains(&format!("password    {}\n", field("password"))), "the password, for the user who asked");

    // Pause: the operator stops reconciling and says so; resume: it reconciles again.
    let paused = ok("kubectl warren pause", kubectl_warren(&["pause", name, "-n", namespace]));
    assert!(paused.contains("paused"), "{paused}");
    let prometheus = Prometheus::of_node().await;
    ready_condition(&prometheus, namespace, name, "false").await;
    let screen = ok("kubectl warren status", kubectl_warren(&["status", name, "-n", namespace]));
    assert!(screen.lines().next().is_some_and(|l| l.contains("Ready=False   PAUSED")), "{screen}");
    assert!(screen.contains("ReconcileSuccess=") && screen.contains("Paused"), "{screen}");
    ok("kubectl warren resume", kubectl_warren(&["resume", name, "-n", namespace]));
    crate::rig::wait_ready(client, namespace, name, replicas).await;
    ready_condition(&prometheus, namespace, name, "true").await;

    let missing = kubectl_warren(&["status", "no-such-cluster", "-n", namespace]);
    assert!(!missing.status.success());
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(error.contains(&format!("rabbitcluster {namespace}/no-such-cluster: not found")), "{error}");

    // `kubectl warren migrate` is `warren migrate`: the same flags.
    let plugin_help = ok("kubectl warren migrate --help", kubectl_warren(&["migrate", "--help"]));
    let help = ok(
        "warren migrate --help",
        testkit::control_plane::run(env!("CARGO_BIN_EXE_warren"), &["migrate", "--help"], None),
    );
    assert_eq!(plugin_help.replace("kubectl warren", "warren"), help);
}
