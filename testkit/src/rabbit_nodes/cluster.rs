//! A RabbitCluster's pods, laid out from the operator's builders as the StatefulSet lays them out:
//! created, started, scaled up and down, and removed with everything they made.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::EnvVar;
use tokio::sync::MutexGuard;
use warren::api::RabbitCluster;
use warren::controller::build::{self, Credentials};
use warren::controller::validate::{Settings, ValidatedCluster, validate};

use super::super::generations::{Rootfs, rootfs};
use super::super::rabbit_broker::node_list;
use super::network::{self, free_subnet, sweep_abandoned};
use super::node::Node;
use super::wait_for;
use super::{BOOT, MOUNTS, NAMESPACE, ONE_AT_A_TIME, RABBITMQ_BIN, must, scratch_dir};

/// A RabbitCluster's nodes.
pub struct NodeCluster {
    pub nodes: Vec<Node>,
    pub credentials: Credentials,
    pub cluster: ValidatedCluster,
    /// With `spec.tls`: the directory of its certificates (`ca.crt`, `tls.crt`, `tls.key`, made
    /// with openssl, a CA of its own) and the CA's PEM, which the harness's clients trust.
    pub tls: Option<(PathBuf, String)>,
    /// What every pod of the StatefulSet gets (the ConfigMap, Secrets, environment, image).
    template: PodTemplate,
    id: String,
    bridge: String,
    /// The network this cluster's nodes are on: `(subnet, first host number)`.
    network: (u8, u8),
    /// False for the second cluster of a pair, which shares the first one's bridge.
    owns_bridge: bool,
    dir: PathBuf,
    _one_at_a_time: Option<MutexGuard<'static, ()>>,
}

/// The builders' output that every node is made from.
struct PodTemplate {
    config: BTreeMap<String, String>,
    cookie: String,
    default_user: String,
    env: Vec<EnvVar>,
    rootfs: Rootfs,
}

fn secret_text(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> String {
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).unwrap_or_else(|| panic!("Secret key {key}"));
    String::from_utf8(bytes.0.clone()).unwrap_or_else(|e| panic!("Secret key {key}: {e}"))
}

impl PodTemplate {
    /// What every pod of `cluster` gets, as the builders make it, and the rootfs of its version.
    fn of(cluster: &ValidatedCluster, credentials: &Credentials) -> Self {
        let version = cluster.image_version.expect("the harness's RabbitCluster names a version in its image tag");
        let rootfs = rootfs(&format!("{}.{}", version.major, version.minor));
        assert_eq!(
            rootfs.version,
            version.to_string(),
            "the image names {version}, its rootfs holds {}",
            rootfs.version
        );
        // The mount point of the scratch directory inside the rootfs.
        let tmp = scratch_dir();
        std::fs::create_dir_all(rootfs.path.join(tmp.strip_prefix("/").unwrap_or(&tmp))).expect("tmp in the rootfs");
        let objects = build::build(cluster, credentials);
        PodTemplate {
            config: objects.config_map.data.clone().unwrap_or_default(),
            cookie: secret_text(&objects.erlang_cookie_secret, "cookie"),
            default_user: secret_text(&objects.default_user_secret, "default_user.conf"),
            env: objects
                .stateful_set
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .map(|p| p.containers[0].env.clone().unwrap_or_default())
                .expect("the StatefulSet's container"),
            rootfs,
        }
    }
}

impl NodeCluster {
    /// Builds the objects for `manifest` (a RabbitCluster) with the operator's builders and lays out
    /// one node per replica; nothing is started yet.
    pub async fn create(manifest: &str) -> Self {
        let guard = ONE_AT_A_TIME.lock().await;
        Self::create_holding(manifest, Some(guard), None)
    }

    /// Two clusters side by side (a migration's source and target), started and formed.
    pub async fn started_pair(source: &str, target: &str) -> (Self, Self) {
        let mut group = Self::started_group(&[source, target]).await.into_iter();
        let first = group.next().expect("the source");
        (first, group.next().expect("the target"))
    }

    /// Clusters side by side (migrations' sources and their target), started and formed.
    pub async fn started_group(manifests: &[&str]) -> Vec<Self> {
        let guard = ONE_AT_A_TIME.lock().await;
        let first = Self::create_holding(manifests[0], Some(guard), None);
        // One pod network for all, as clusters in one Kubernetes cluster: they reach each other
        // directly (a migration, or a Shovel, connects from one to the other). The first one's
        // nodes are at .1 and up, the next ones' at .101, .151, .201 and up.
        let (bridge, subnet) = (first.bridge.clone(), first.network.0);
        let mut group = vec![first];
        for (k, manifest) in manifests.iter().enumerate().skip(1) {
            let first_host = u8::try_from(101 + 50 * (k - 1)).expect("at most four clusters side by side");
            group.push(Self::create_holding(manifest, None, Some((bridge.clone(), subnet, first_host))));
        }
        for cluster in &mut group {
            cluster.start_all();
        }
        for cluster in &group {
            cluster.wait_formed(BOOT).await;
        }
        for cluster in &group {
            cluster.converge(0).await.expect("broker reconcile");
        }
        group
    }

    fn create_holding(
        manifest: &str,
        guard: Option<MutexGuard<'static, ()>>,
        shared_network: Option<(String, u8, u8)>,
    ) -> Self {
        sweep_abandoned();
        let mut resource: RabbitCluster = serde_yaml::from_str(manifest).expect("RabbitCluster manifest");
        resource.metadata.namespace = Some(NAMESPACE.into());
        resource.metadata.uid = Some("00000000-0000-4000-8000-00000000feed".into());
        let cluster = validate(&resource, &Settings::default()).expect("a valid RabbitCluster");
        let credentials = Credentials::generate();
        let template = PodTemplate::of(&cluster, &credentials);

        let id = format!("{:04x}", rand::random::<u16>());
        let (bridge, subnet, first_host) = match shared_network {
            Some(network) => network,
            None => (format!("wrb{id}"), free_subnet(), 1),
        };
        let owns_bridge = first_host == 1;
        let dir = scratch_dir().join(format!("warren-nodes-{id}"));
        let mut this = Self {
            nodes: Vec::new(),
            credentials,
            cluster,
            template,
            id,
            bridge: bridge.clone(),
            network: (subnet, first_host),
            owns_bridge,
            dir: dir.clone(),
            tls: None,
            _one_at_a_time: guard,
        };
        // From here on, Drop removes whatever was made, even if a later step fails; if this process
        // is killed before Drop runs, the next run's sweep finds the owner gone and removes it.
        std::fs::create_dir_all(&dir).expect("cluster dir");
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("owner.pid");
        if this.cluster.tls.is_some() {
            this.issue_certificates();
        }
        if owns_bridge {
            network::add_bridge(&bridge, subnet);
        }
        for i in 0..this.cluster.replicas as usize {
            this.add_node(i);
        }
        this.write_hosts();
        this
    }

    /// A CA of this cluster's and a certificate for every node it may have (its pod names and
    /// addresses, and loopback), laid out as the pods mount the cert-manager Secret: the
    /// configuration's certificate paths point at them.
    fn issue_certificates(&mut self) {
        let tls_dir = self.dir.join("tls");
        super::super::tls::ca(&self.dir.join("ca"), &format!("{} CA", self.cluster.name));
        self.install_certificate(&tls_dir, "..v1");
        let dir = tls_dir.to_string_lossy();
        for key in ["10-operator.conf", "inter-node-tls.config"] {
            if let Some(conf) = self.template.config.get_mut(key) {
                *conf = conf
                    .replace("/etc/warren/tls-ca/", &format!("{dir}/"))
                    .replace("/etc/warren/tls/", &format!("{dir}/"));
            }
        }
        let ca = std::fs::read_to_string(tls_dir.join("ca.crt")).expect("ca.crt");
        self.tls = Some((tls_dir, ca));
    }

    /// A new server certificate (a new key, the same CA and names) into `tls_dir`, as the kubelet
    /// updates a Secret volume: the files in a directory of their own, then `..data` switched to it
    /// in one rename; each key is a symlink through `..data`, so a reader never sees a new
    /// certificate beside an old key.
    fn install_certificate(&self, tls_dir: &Path, version: &str) {
        let (subnet, first_host) = self.network;
        let slots = self.cluster.replicas as usize + 2;
        let mut dns: Vec<String> = (0..slots as i32).map(|i| self.cluster.pod_host(i)).collect();
        dns.extend([self.cluster.client_service_host(), "localhost".into()]);
        let mut ips: Vec<String> = (0..slots).map(|i| format!("10.231.{subnet}.{}", i + first_host as usize)).collect();
        ips.push("127.0.0.1".into());
        super::super::tls::server(&tls_dir.join(version), &self.dir.join("ca"), &dns, &ips);
        let staged = tls_dir.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(version, &staged).expect("..data_tmp");
        std::fs::rename(&staged, tls_dir.join("..data")).expect("..data switched");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            let link = tls_dir.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link).expect("key symlink");
            }
        }
    }

    /// What cert-manager's renewal does to a running cluster: a new certificate and key (same CA)
    /// in the Secret, which the kubelet swaps into every pod's volume at once. Returns the new
    /// certificate's serial.
    pub fn rotate_certificate(&self) -> String {
        let (tls_dir, _) = self.tls.as_ref().expect("a cluster with spec.tls");
        self.install_certificate(tls_dir, "..v2");
        certificate_serial(&tls_dir.join("tls.crt"))
    }

    /// An HTTP client that trusts this cluster's CA (with TLS).
    pub fn http(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder();
        if let Some((_, ca)) = &self.tls {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("the CA"));
        }
        builder.build().expect("HTTP client")
    }

    /// The CA's PEM, when the cluster has TLS.
    pub fn ca(&self) -> Option<&str> {
        self.tls.as_ref().map(|(_, ca)| ca.as_str())
    }

    /// Lays out pod `i`: its network namespace on the bridge and its volumes; not started.
    fn add_node(&mut self, i: usize) {
        let (subnet, first_host) = self.network;
        let netns = format!("wr{}-{i}", self.id);
        let host_link = format!("wrv{}{i}", self.id);
        network::add_namespace(&netns);
        let node_dir = self.dir.join(format!("node-{i}"));
        let ip = format!("10.231.{subnet}.{}", i + first_host as usize);
        let name = self.cluster.node_name(i as i32);
        // Registered before the rest of its setup, so that Drop removes it whatever fails next.
        self.nodes.push(Node {
            index: i,
            pod: name.trim_start_matches("rabbit@").split('.').next().unwrap_or_default().into(),
            name,
            ip: ip.clone(),
            netns: netns.clone(),
            host_link: host_link.clone(),
            dir: node_dir.clone(),
            root: self.template.rootfs.path.clone(),
            env: Vec::new(),
            process: Default::default(),
            tls_only: warren::api::TlsSpec::tls_only(self.cluster.tls.as_ref()),
        });
        network::plug(&netns, &host_link, &self.bridge, &ip);

        // The volumes: ConfigMap, conf.d (projected), cookie Secret; data starts empty.
        let template = &self.template;
        write_files(&node_dir.join("config"), &template.config);
        write_files(
            &node_dir.join("conf.d"),
            &BTreeMap::from([
                ("10-operator.conf".to_string(), template.config["10-operator.conf"].clone()),
                ("11-default-user.conf".to_string(), template.default_user.clone()),
                ("90-additional.conf".to_string(), template.config["90-additional.conf"].clone()),
            ]),
        );
        write_files(&node_dir.join("cookie"), &BTreeMap::from([("cookie".to_string(), template.cookie.clone())]));
        let ctl_home = node_dir.join("ctl-home");
        std::fs::create_dir_all(&ctl_home).expect("ctl home");
        std::fs::write(ctl_home.join(".erlang.cookie"), &template.cookie).expect("cookie for rabbitmqctl");
        must("chmod", &["400", &ctl_home.join(".erlang.cookie").to_string_lossy()]);
        std::fs::write(node_dir.join("rabbitmq-env.conf"), "").expect("env file");
        self.nodes[i].env = pod_environment(&template.env, i, &self.cluster.stateful_set_name(), &node_dir);
    }

    /// The headless Service's names of every pod, in every pod's /etc/hosts (`ip netns exec`
    /// bind-mounts /etc/netns/<name>/hosts over /etc/hosts). Written in place: a running node's
    /// mount of the file sees the new names, as pods see new DNS records.
    fn write_hosts(&self) {
        let (subnet, first_host) = self.network;
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for node in &self.nodes {
            let host = node.name.trim_start_matches("rabbit@");
            let _ = writeln!(hosts, "10.231.{subnet}.{} {host} {}", node.index + first_host as usize, node.pod);
        }
        for node in &self.nodes {
            network::write_hosts(&node.netns, &hosts);
        }
    }

    /// Sets an environment variable of every node's RabbitMQ (before they start).
    pub fn set_env(&mut self, key: &str, value: &str) {
        for node in &mut self.nodes {
            node.env.retain(|(k, _)| k != key);
            node.env.push((key.to_string(), value.to_string()));
        }
    }

    /// Puts `script` (a shell script) as `program` first in pod `index`'s PATH, before it starts:
    /// a stand-in in front of the image's own program, for a state a real node gets into only at
    /// random. The script finds the image's programs under `RABBITMQ_BIN`.
    pub fn wrap_program(&mut self, index: usize, program: &str, script: &str) {
        let node = &mut self.nodes[index];
        assert!(!node.is_started(), "node {index} runs already");
        let dir = node.dir.join("wrapped");
        std::fs::create_dir_all(&dir).expect("wrapper dir");
        let path = dir.join(program);
        std::fs::write(&path, format!("#!/bin/sh\nRABBITMQ_BIN={RABBITMQ_BIN}\n{script}\n")).expect("wrapper");
        must("chmod", &["755", &path.to_string_lossy()]);
        let search = node.env.iter_mut().find(|(key, _)| key == "PATH").expect("the pod's PATH");
        search.1 = format!("{}:{}", dir.display(), search.1);
    }

    /// What the operator does on a scale-up: the ConfigMap's replica count changes (every pod's
    /// mounted copy follows) and the StatefulSet adds pods `current..replicas`, started at once.
    pub fn scale_to(&mut self, replicas: usize) {
        let current = self.nodes.len();
        assert!(replicas > current, "scale_to({replicas}) is a scale-up from {current}");
        self.template.config.insert("replicas".into(), replicas.to_string());
        self.cluster.replicas = replicas as i32;
        for i in current..replicas {
            self.add_node(i);
        }
        self.write_hosts();
        for node in &self.nodes[..current] {
            std::fs::write(node.dir.join("config/replicas"), replicas.to_string()).expect("replicas");
        }
        self.start(&(current..replicas).collect::<Vec<_>>());
    }

    pub fn management_url(&self, index: usize) -> String {
        self.nodes[index].management_url()
    }

    /// What the StatefulSet does when its replicas drop by one: the last pod is deleted (its preStop
    /// runs, then SIGTERM), and its claim goes (the operator's forget step deletes it). The ConfigMap says
    /// the new count first, as the operator applies both together.
    pub async fn remove_last(&mut self, grace: Duration) {
        let replicas = self.nodes.len() - 1;
        self.template.config.insert("replicas".into(), replicas.to_string());
        self.cluster.replicas = replicas as i32;
        for node in &self.nodes {
            std::fs::write(node.dir.join("config/replicas"), replicas.to_string()).expect("replicas");
        }
        self.nodes[replicas].stop_gracefully(grace).await;
        let node = self.nodes.pop().expect("the last node");
        network::remove_namespace(&node.netns);
        let _ = std::fs::remove_dir_all(&node.dir);
        self.write_hosts();
    }

    /// Starts the nodes given, in parallel (as the StatefulSet's Parallel pod management does).
    pub fn start(&mut self, indexes: &[usize]) {
        for &i in indexes {
            self.nodes[i].start();
        }
    }

    /// Every pod deleted at once: all preStop hooks run side by side, then every node gets SIGTERM.
    pub async fn stop_all_gracefully(&mut self, grace: Duration) {
        let hooks = futures::future::join_all(self.nodes.iter().map(|n| n.pre_stop())).await;
        futures::future::join_all(self.nodes.iter_mut().zip(&hooks).map(|(n, hook)| n.terminate(grace, hook))).await;
    }

    pub fn start_all(&mut self) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.start(&all);
    }

    /// Waits until node `index` is ready (the pod's readiness probe) and `cluster_status` on it
    /// lists every node in `members` as running.
    pub async fn wait_members(&self, index: usize, members: &[usize], limit: Duration) {
        let node = &self.nodes[index];
        let expected: Vec<&str> = members.iter().map(|&i| self.nodes[i].name.as_str()).collect();
        wait_for(&format!("node {index}: not ready with running members {members:?}"), limit, || async {
            // Any member's bootstrap.sh that exited is the answer (there is no kubelet here to
            // restart it), not only the waited node's.
            for &i in members.iter().chain([&index]) {
                if let Some(status) = self.nodes[i].exited() {
                    panic!("node {i}: bootstrap.sh exited ({status}); console:\n{}", self.nodes[i].console_digest());
                }
            }
            let running = node_list(&node.cluster_status().await?["running_nodes"]);
            let all = expected.iter().all(|n| running.iter().any(|r| r == n));
            let ready = node.ready().await;
            if all && ready {
                Ok(())
            } else {
                // The consoles of the nodes not running yet say why: the waited node's own when
                // it is not ready, else those of the members it does not list.
                let missing: Vec<usize> = members
                    .iter()
                    .copied()
                    .filter(|&i| !running.iter().any(|r| r == &self.nodes[i].name) || (i == index && !ready))
                    .collect();
                let consoles: Vec<String> = missing
                    .iter()
                    .map(|&i| format!("--- console of node {i}:\n{}", self.nodes[i].console_digest()))
                    .collect();
                Err(format!("cluster_status running_nodes {running:?}, ready.sh {ready}\n{}", consoles.join("\n")))
            }
        })
        .await;
    }

    /// How many times bootstrap.sh started a node's RabbitMQ again after an aborted boot (see the
    /// script: RabbitMQ 4.0 on Mnesia can abort when every node boots at once).
    pub fn boots_retried(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| std::fs::read_to_string(n.console_log()).unwrap_or_default().matches("starting it again").count())
            .sum()
    }

    /// Waits until every started node is ready and they all run as one cluster.
    pub async fn wait_formed(&self, limit: Duration) {
        let started: Vec<usize> = self.nodes.iter().filter(|n| n.is_started()).map(|n| n.index).collect();
        for &i in &started {
            self.wait_members(i, &started, limit).await;
        }
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("--- node {} ({}), console:\n{}", node.index, node.name, node.console_digest());
            }
        }
        for node in &mut self.nodes {
            node.kill();
            network::remove_namespace(&node.netns);
        }
        if self.owns_bridge {
            network::remove_bridge(&self.bridge);
        }
        if std::env::var_os("WARREN_KEEP_NODE_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn write_files(dir: &Path, files: &BTreeMap<String, String>) {
    std::fs::create_dir_all(dir).expect("volume dir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
    }
}

/// The container's environment for pod `index`: field references resolved, `$(VAR)` expanded as
/// the kubelet does, mount paths mapped onto the node's directory, and the PATH of the image.
fn pod_environment(env: &[EnvVar], index: usize, sts: &str, node_dir: &Path) -> Vec<(String, String)> {
    let mut resolved: Vec<(String, String)> = Vec::new();
    for var in env {
        let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
            (Some(value), _) => value.clone(),
            (None, Some(field)) if field.field_path == "metadata.name" => format!("{sts}-{index}"),
            (None, Some(field)) if field.field_path == "metadata.namespace" => NAMESPACE.to_string(),
            other => panic!("env {} not understood by the harness: {other:?}", var.name),
        };
        let mut expanded = value;
        for (name, earlier) in &resolved {
            expanded = expanded.replace(&format!("$({name})"), earlier);
        }
        // Each word that is a mounted path (`-ssl_dist_optfile /etc/warren/config/...` too), once:
        // the node's directories are under the scratch directory, itself a mount.
        let words: Vec<String> = expanded
            .split(' ')
            .map(|word| {
                match MOUNTS.iter().find(|(mount, _)| word == *mount || word.starts_with(&format!("{mount}/"))) {
                    Some((mount, local)) => word.replacen(mount, &node_dir.join(local).to_string_lossy(), 1),
                    None => word.to_string(),
                }
            })
            .collect();
        expanded = words.join(" ");
        resolved.push((var.name.clone(), expanded));
    }
    resolved.extend([
        ("PATH".to_string(), format!("{RABBITMQ_BIN}:/usr/sbin:/usr/bin:/sbin:/bin")),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        // The image reads conf.d from /etc/rabbitmq/conf.d; here it is the node's own.
        ("RABBITMQ_CONFIG_FILES".to_string(), node_dir.join("conf.d").to_string_lossy().into_owned()),
        ("RABBITMQ_CONF_ENV_FILE".to_string(), node_dir.join("rabbitmq-env.conf").to_string_lossy().into_owned()),
    ]);
    resolved
}

impl NodeCluster {
    /// All nodes started in parallel, formed into one cluster, and the operator's broker reconcile
    /// run once so the HA policy is in place.
    pub async fn started(manifest: &str) -> Self {
        let mut nodes = Self::create(manifest).await;
        nodes.start_all();
        nodes.wait_formed(BOOT).await;
        nodes.converge(0).await.expect("broker reconcile");
        nodes
    }
}

/// The operator's node commands, run as `kubectl exec` would: in the pod's image, with its
/// environment (the node name, the cookie in its HOME).
impl warren::rabbitmq::scale_down::NodeCommands for NodeCluster {
    async fn run(&self, ordinal: i32, command: &[&str]) -> warren::error::Result<String> {
        let node = &self.nodes[ordinal as usize];
        let out = node.output(node.exec(command[0], &command[1..]), command[0]).await;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(warren::error::Error::NodeCommand {
                pod: node.pod.clone(),
                command: command.join(" "),
                message: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            })
        }
    }
}

/// The serial of a PEM certificate (`openssl x509 -serial`).
pub fn certificate_serial(pem: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .expect("openssl x509");
    assert!(out.status.success(), "openssl x509: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
