//! One pod of the harness: its main process (bootstrap.sh), what runs in it (`kubectl exec`),
//! its probes and hooks, and clients inside its network.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use warren::controller::build::Credentials;

use super::{ENTER_POD, RABBITMQ_BIN, must, run, scratch_dir};

/// One node: pod `<sts>-<index>`.
pub struct Node {
    pub index: usize,
    /// `rabbit@demo-0.demo-nodes.harness.svc.cluster.local`
    pub name: String,
    pub ip: String,
    pub(super) netns: String,
    pub(super) host_link: String,
    pub(super) dir: PathBuf,
    /// The pod's name: its hostname.
    pub(super) pod: String,
    pub(super) root: PathBuf,
    pub(super) env: Vec<(String, String)>,
    pub(super) process: std::sync::Mutex<Option<Child>>,
    /// Its plain listeners are closed (`spec.tls.disableNonTLSListeners`): AMQPS and HTTPS only.
    pub(super) tls_only: bool,
}

impl Node {
    pub fn amqp_url(&self, credentials: &Credentials) -> String {
        let (scheme, port) = if self.tls_only { ("amqps", 5671) } else { ("amqp", 5672) };
        format!("{scheme}://{}:{}@{}:{port}/%2f", credentials.username, credentials.password, self.ip)
    }

    pub fn management_url(&self) -> String {
        if self.tls_only { format!("https://{}:15671", self.ip) } else { format!("http://{}:15672", self.ip) }
    }

    /// The node's data directory (its PersistentVolume).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub(super) fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Everything the pod's main process (bootstrap.sh and RabbitMQ) printed.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.console_log()).unwrap_or_default()
    }

    /// The last lines the node printed, for failure messages.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.console_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// What a failure message needs from the node's console (see `console_digest`), short enough
    /// to survive a truncated CI log.
    pub fn console_digest(&self) -> String {
        console_digest(&std::fs::read_to_string(self.console_log()).unwrap_or_default())
    }

    /// A command of the pod's image with the pod's environment (as `kubectl exec`).
    pub(super) fn exec(&self, program: &str, args: &[&str]) -> Command {
        let scratch = scratch_dir();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "unshare", "--uts", "--", "/bin/sh", "-c", ENTER_POD, &self.pod])
            .arg(&self.root)
            .arg(&scratch)
            .arg(program)
            .args(args)
            .env_clear()
            .envs(self.env.iter().cloned());
        command
    }

    /// Runs a command of `exec` to completion without blocking the runtime: publishers and
    /// consumers of the same test keep running while rabbitmqctl or a hook takes its time.
    pub(super) async fn output(&self, command: Command, what: &str) -> Output {
        tokio::process::Command::from(command).output().await.unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// A client's shell command (the host's tools: curl, bash) inside the node's network namespace:
    /// it reaches what a client in the pod would, with `vars` as its only environment.
    pub async fn sh(&self, script: &str, vars: &[(&str, &str)]) -> Output {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "/bin/bash", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(vars.iter().copied());
        self.output(command, "bash in the node's namespace").await
    }

    /// Whether a client inside the pod's network reaches the node's AMQP listener.
    pub async fn serves_amqp(&self) -> bool {
        let port = if self.tls_only { 5671 } else { 5672 };
        self.sh(&format!("exec 3<>/dev/tcp/127.0.0.1/{port}"), &[]).await.status.success()
    }

    /// `rabbitmqctl <args>` against this node, run inside its namespace.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        let mut command = self.exec(&format!("{RABBITMQ_BIN}/rabbitmqctl"), &full);
        command.env("HOME", self.dir.join("ctl-home"));
        self.output(command, "rabbitmqctl").await
    }

    /// What `rabbitmqctl cluster_status` reports, as JSON (Err with its output when it fails).
    pub async fn cluster_status(&self) -> Result<serde_json::Value, String> {
        let out = self.rabbitmqctl(&["-q", "cluster_status", "--formatter", "json"]).await;
        if !out.status.success() {
            return Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Whether the RabbitMQ application runs on this node (a paused node answers "not running").
    pub async fn app_running(&self) -> bool {
        self.rabbitmqctl(&["-q", "eval", "rabbit:is_running()."]).await.stdout.starts_with(b"true")
    }

    /// The pod's readiness probe (ready.sh from the ConfigMap).
    pub async fn ready(&self) -> bool {
        let script = self.dir.join("config/ready.sh");
        self.output(self.exec("/bin/bash", &[&script.to_string_lossy()]), "ready.sh").await.status.success()
    }

    pub fn is_started(&self) -> bool {
        self.process.lock().unwrap().is_some()
    }

    /// The exit status of the pod's main process, if it has exited.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.process.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub(super) fn start(&mut self) {
        assert!(!self.is_started(), "node {} is running already", self.index);
        for dir in ["data", "tmp", "log", "ctl-home"] {
            std::fs::create_dir_all(self.dir.join(dir)).expect("node dirs");
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.console_log()).expect("console log");
        let bootstrap = self.dir.join("config/bootstrap.sh");
        let child = self
            .exec("/bin/bash", &[&bootstrap.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start bootstrap.sh");
        *self.process.lock().unwrap() = Some(child);
    }

    /// Every process in the node's network namespace (the pod's processes, epmd included).
    pub(super) fn pids(&self) -> Vec<i32> {
        let out = run("ip", &["netns", "pids", &self.netns]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    }

    pub(super) fn signal_all(&self, signal: &str) {
        for pid in self.pids() {
            let _ = run("kill", &[signal, &pid.to_string()]);
        }
    }

    /// SIGKILL of every process of the pod, as when its node dies.
    pub fn kill(&mut self) {
        self.signal_all("-KILL");
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.wait();
        }
        for _ in 0..50 {
            if self.pids().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the kubelet does on a graceful pod deletion: the preStop hook, then SIGTERM to the
    /// container's main process, then SIGKILL after the grace period.
    pub async fn stop_gracefully(&mut self, grace: Duration) {
        let hook_output = self.pre_stop().await;
        self.terminate(grace, &hook_output).await;
    }

    /// The preStop hook; returns what it printed on stderr.
    pub async fn pre_stop(&self) -> String {
        let script = self.dir.join("config/pre-stop.sh");
        let hook = self.output(self.exec("/bin/bash", &[&script.to_string_lossy()]), "pre-stop.sh").await;
        String::from_utf8_lossy(&hook.stderr).into_owned()
    }

    /// SIGTERM to the container's main process; fails unless it exits within `grace`.
    pub async fn terminate(&mut self, grace: Duration, hook_output: &str) {
        let pid = self.process.lock().unwrap().as_ref().map(|c| c.id());
        if let Some(pid) = pid {
            let _ = run("kill", &["-TERM", &pid.to_string()]);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.exited().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let exited = self.exited().is_some();
        assert!(exited, "node {} did not stop within {grace:?} of SIGTERM; preStop said: {hook_output}", self.index);
        // epmd (and anything else left) goes with the pod.
        self.kill();
    }

    /// Runs `client` on a thread of its own inside the node's network namespace, as a client in the
    /// pod would: it reaches the node at 127.0.0.1 even while the node's link is cut. Sockets are
    /// made by the thread that polls them (a current-thread runtime), so they live in that namespace.
    pub async fn in_network<T, F>(&self, client: impl FnOnce() -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T>,
    {
        use std::os::fd::AsRawFd;
        let path = PathBuf::from("/run/netns").join(&self.netns);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // SAFETY: setns on a valid descriptor changes only this thread's network namespace.
            let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let _ = sender.send(runtime.block_on(client()));
        });
        receiver.await.expect("the client thread in the node's network panicked")
    }

    /// An AMQP URL for a client in the node's own network (see `in_network`).
    pub fn local_amqp_url(&self, credentials: &Credentials) -> String {
        let (scheme, port) = if self.tls_only { ("amqps", 5671) } else { ("amqp", 5672) };
        format!("{scheme}://{}:{}@127.0.0.1:{port}/%2f", credentials.username, credentials.password)
    }

    /// Cuts the node's link to the pod network, or heals it.
    pub fn set_link(&self, up: bool) {
        must("ip", &["link", "set", &self.host_link, if up { "up" } else { "down" }]);
    }
}

/// A RabbitMQ console (a node's, or a pod's `kubectl logs`) cut to what a failure message needs:
/// every line of bootstrap.sh (timestamped), RabbitMQ's warnings and errors and the boot and
/// membership milestones (at most 40, the last ones), then the last 10 lines.
pub fn console_digest(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let milestones: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            [
                "warren-bootstrap",
                "[error]",
                "[warning]",
                "Starting RabbitMQ",
                "startup complete",
                "node '",
                "Waiting for",
            ]
            .iter()
            .any(|m| l.contains(m))
        })
        .collect();
    let milestones = &milestones[milestones.len().saturating_sub(40)..];
    let tail = &lines[lines.len().saturating_sub(10)..];
    format!("{}\n[...] last lines:\n{}", milestones.join("\n"), tail.join("\n"))
}
