//! What the node tests share: the operator installed once by the chart with the image built here,
//! RabbitCluster manifests that fit this machine, and clients that reach a cluster the way a user on
//! the node does, through its client Service.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::Mutex;
use warren::api::RabbitCluster;
use warren::rabbitmq::version::RabbitVersion;

use testkit::control_plane::cluster::{condition, summary};
use testkit::control_plane::{ensure_crds, helm, kubectl, ok, wait_for};
use testkit::rabbit_nodes::console_digest;
use testkit::wait::try_wait_for;

/// Formation, restarts and rejoins of real pods on two cores: generous, never asserted on.
pub const POD_TIMEOUT: Duration = Duration::from_secs(300);

pub fn image(variable: &str) -> String {
    std::env::var(variable).unwrap_or_else(|_| {
        panic!("{variable} is not set: run these tests through e2e/with-control-plane.sh --node (make test does)")
    })
}

static OPERATOR: Mutex<bool> = Mutex::const_new(false);

/// Stamps a phase of a node test on stderr with the seconds since the first stamp of this test
/// process: tier 4's time varies by minutes between runs of the same tests, and these say where.
pub fn phase(what: &str) {
    static FIRST: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let first = FIRST.get_or_init(std::time::Instant::now);
    eprintln!("[node tests +{} s] {what}", first.elapsed().as_secs());
}

/// `helm install` of charts/warren in warren-system, watching every namespace, with the warren image
/// built and imported by e2e/images.sh; waits until its Deployment is available. As `upgrade
/// --install`: `make test` runs the node tests in two processes on one cluster, and the second
/// finds the release the first installed (the same chart and values: nothing changes, nothing
/// restarts).
pub async fn ensure_operator() {
    let mut done = OPERATOR.lock().await;
    if *done {
        return;
    }
    ensure_crds().await;
    let warren = image("WARREN_IMAGE");
    let (repository, tag) = warren.rsplit_once(':').expect("image with a tag");
    ok(
        "helm upgrade --install",
        helm(&[
            "upgrade",
            "--install",
            "warren",
            "charts/warren",
            "-n",
            "warren-system",
            "--create-namespace",
            "--set",
            &format!("image.repository={repository}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "logFormat=text",
            // The node tests make a namespace each.
            "--set",
            "clusterWide=true",
            "--wait",
            "--timeout",
            "180s",
        ]),
    );
    *done = true;
}

/// A RabbitCluster of `replicas` on the default generation's RabbitMQ image built here (what
/// `make up` runs), with requests that fit several pods on this machine.
pub fn manifest(name: &str, replicas: i32) -> String {
    manifest_on(name, replicas, &image("RABBITMQ_IMAGE"))
}

/// The image built here of RabbitMQ `generation` (`3.10`, `4.0`, `4.3`).
pub fn generation_image(generation: &str) -> String {
    image(&format!("RABBITMQ_IMAGE_{}", generation.replace('.', "_")))
}

/// A RabbitCluster of `replicas` on `rabbitmq_image`.
pub fn manifest_on(name: &str, replicas: i32, rabbitmq_image: &str) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  \
         image: {rabbitmq_image}\n  resources:\n    requests: {{cpu: 100m, memory: 256Mi}}\n    limits: {{memory: 1Gi}}\n"
    )
}

/// Whether the default image replicates queues as quorum queues (4.x) rather than by mirroring.
pub fn default_is_quorum() -> bool {
    RabbitVersion::from_image(&image("RABBITMQ_IMAGE")).is_some_and(|v| !v.has_classic_mirroring())
}

/// Waits until the RabbitCluster's status (for its current generation) says Ready with `members`
/// running members. On a timeout the failure carries, for each pod not ready, its containers'
/// states, the digest of its console (this container's and the previous one's) and what its node
/// says of itself (running, in maintenance mode, cluster members).
pub async fn wait_ready(client: &Client, namespace: &str, name: &str, members: usize) -> RabbitCluster {
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), namespace);
    let what = format!("RabbitCluster {name} Ready with {members} members");
    let probe = || async {
        let cluster = api.get(name).await.map_err(|e| e.to_string())?;
        let current = cluster.status.as_ref().and_then(|s| s.observed_generation) == cluster.metadata.generation;
        let ready = condition(&cluster, "Ready").is_some_and(|c| c.status == "True");
        let formed = condition(&cluster, "ClusterFormed")
            .is_some_and(|c| c.status == "True" && c.message == format!("{members} running members"));
        if current && ready && formed { Ok(cluster) } else { Err(summary(&cluster)) }
    };
    match try_wait_for(POD_TIMEOUT, probe).await {
        Ok(cluster) => cluster,
        Err(last) => {
            let pods = not_ready_pods_explained(client, namespace, name).await;
            panic!("waited {} s for {what}; last seen: {last}\n{pods}", POD_TIMEOUT.as_secs())
        }
    }
}

/// For each pod of cluster `name` that is not ready: its containers' states, its console's digest
/// (and the previous container's, after a restart), and its node's own view through `kubectl exec`.
async fn not_ready_pods_explained(client: &Client, namespace: &str, name: &str) -> String {
    let mut out = String::new();
    for pod in cluster_pods(client, namespace, name).await {
        if pod_ready(&pod) {
            continue;
        }
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let terminating = match &pod.metadata.deletion_timestamp {
            Some(since) => format!(", terminating since {}", since.0),
            None => String::new(),
        };
        let status = pod.status.unwrap_or_default();
        let node = pod.spec.and_then(|s| s.node_name).unwrap_or_else(|| "no node".into());
        out.push_str(&format!("--- pod {pod_name} on {node}, phase {:?}{terminating}, not ready\n", status.phase));
        for c in status.container_statuses.iter().flatten() {
            out.push_str(&format!("container {}: restarts {}, state {:?}\n", c.name, c.restart_count, c.state));
        }
        let logs = |previous: bool| {
            let mut args = vec!["logs", pod_name.as_str(), "-n", namespace, "-c", "rabbitmq"];
            if previous {
                args.push("--previous");
            }
            let output = kubectl(&args);
            output.status.success().then(|| console_digest(&String::from_utf8_lossy(&output.stdout)))
        };
        if let Some(previous) = logs(true) {
            out.push_str(&format!("previous container's console:\n{previous}\n"));
        }
        out.push_str(&format!("console:\n{}\n", logs(false).unwrap_or_else(|| "(no logs)".into())));
        let view = kubectl(&[
            "exec",
            &pod_name,
            "-n",
            namespace,
            "-c",
            "rabbitmq",
            "--",
            "timeout",
            "60",
            "rabbitmqctl",
            "-q",
            "eval",
            "{{running, rabbit:is_running()}, {drained, rabbit_maintenance:is_being_drained_local_read(node())}, \
             {members, rabbit_nodes:list_members()}, {running_members, rabbit_nodes:list_running()}}.",
        ]);
        out.push_str(&format!(
            "its node says: {}{}\n",
            String::from_utf8_lossy(&view.stdout).trim(),
            String::from_utf8_lossy(&view.stderr).trim()
        ));
    }
    out
}

/// Whether the pod's Ready condition is True.
fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The cluster's pods, sorted by name.
async fn cluster_pods(client: &Client, namespace: &str, name: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await
        .expect("list pods");
    let mut pods = list.items;
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    pods
}

/// The cluster's pods by name: (uid, ready).
pub async fn pods(client: &Client, namespace: &str, name: &str) -> Vec<(String, String, bool)> {
    cluster_pods(client, namespace, name)
        .await
        .into_iter()
        .map(|p| {
            let ready = pod_ready(&p);
            (p.metadata.name.unwrap_or_default(), p.metadata.uid.unwrap_or_default(), ready)
        })
        .collect()
}

/// The cluster's pods by name, each with the node it was scheduled to (None while Pending).
pub async fn pod_nodes(client: &Client, namespace: &str, name: &str) -> Vec<(String, Option<String>)> {
    cluster_pods(client, namespace, name)
        .await
        .into_iter()
        .map(|p| (p.metadata.name.unwrap_or_default(), p.spec.and_then(|s| s.node_name)))
        .collect()
}

/// The address of each pod of the cluster that has one.
pub async fn pod_addresses(client: &Client, namespace: &str, name: &str) -> BTreeMap<String, String> {
    cluster_pods(client, namespace, name)
        .await
        .into_iter()
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
        .collect()
}

/// How a client on the node reaches a cluster: its client Service's address and the default user.
pub struct Endpoint {
    pub address: String,
    pub username: String,
    pub password: String,
}

impl Endpoint {
    pub async fn of(client: &Client, namespace: &str, name: &str) -> Self {
        let services: Api<Service> = Api::namespaced(client.clone(), namespace);
        let service = services.get(name).await.expect("the client Service");
        let address = service.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let secret = secrets.get(&format!("{name}-default-user")).await.expect("the default-user Secret");
        let field = |key: &str| {
            let bytes = secret.data.as_ref().and_then(|d| d.get(key)).unwrap_or_else(|| panic!("no {key}"));
            String::from_utf8(bytes.0.clone()).expect("utf-8")
        };
        Self { address, username: field("username"), password: field("password") }
    }

    /// The same user, at one pod's address rather than the client Service's.
    pub fn at(&self, address: &str) -> Self {
        Self { address: address.to_string(), username: self.username.clone(), password: self.password.clone() }
    }

    pub fn amqp(&self) -> String {
        format!("amqp://{}:{}@{}:5672/%2f", self.username, self.password, self.address)
    }

    async fn management(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut request = reqwest::Client::new()
            .request(method, format!("http://{}:15672/api/{path}", self.address))
            .basic_auth(&self.username, Some(&self.password))
            .timeout(Duration::from_secs(15));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{path}: HTTP {status}: {text}"));
        }
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text).map_err(|e| e.to_string())? })
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.management(reqwest::Method::GET, path, None).await
    }

    /// Declares a durable queue with no arguments in vhost `/`: its type is the vhost's default
    /// (quorum on 4.x, which the operator sets; classic, mirrored by ha-all, on 3.x).
    pub async fn declare_queue(&self, queue: &str) {
        self.declare_queue_with(queue, serde_json::json!({})).await;
    }

    /// As `declare_queue`, with `arguments`.
    pub async fn declare_queue_with(&self, queue: &str, arguments: Value) {
        self.management(
            reqwest::Method::PUT,
            &format!("queues/%2F/{queue}"),
            Some(serde_json::json!({"durable": true, "arguments": arguments})),
        )
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
    }

    /// Closes a client connection (by its name in the management API), as an administrator does.
    pub async fn close_connection(&self, name: &str) -> Result<(), String> {
        let encoded: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        self.management(reqwest::Method::DELETE, &format!("connections/{encoded}"), None).await.map(drop)
    }

    /// Waits until `queue` is replicated on `copies` nodes, each online: quorum members (4.x) or a
    /// master with synchronised mirrors (3.x).
    pub async fn wait_copies(&self, queue: &str, copies: usize) {
        wait_for(&format!("{queue} replicated on {copies} nodes"), POD_TIMEOUT, || async {
            let q = self.get(&format!("queues/%2F/{queue}")).await?;
            let count = |key: &str| q[key].as_array().map_or(0, Vec::len);
            let online = if q["type"] == "quorum" {
                count("online").min(count("members"))
            } else {
                count("synchronised_slave_nodes") + usize::from(q["node"].is_string())
            };
            if online == copies { Ok(()) } else { Err(q.to_string()) }
        })
        .await;
    }

    /// Waits until the management API counts `expected` messages in `queue` (its statistics lag).
    pub async fn wait_depth(&self, queue: &str, expected: u64) {
        wait_for(&format!("{expected} messages in {queue}"), POD_TIMEOUT, || async {
            let q = self.get(&format!("queues/%2F/{queue}")).await?;
            match q["messages"].as_u64() {
                Some(n) if n == expected => Ok(()),
                other => Err(format!("messages: {other:?}")),
            }
        })
        .await;
    }
}

pub fn delete(what: &[&str]) {
    let mut args = vec!["delete"];
    args.extend_from_slice(what);
    ok("kubectl delete", kubectl(&args));
}
