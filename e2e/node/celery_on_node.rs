//! A Celery app as teams run it on the cluster: its workers a Deployment of the image
//! e2e/images.sh built (Debian's python3, Celery pinned from PyPI, the tests' app in
//! tests/fixtures/celery), their broker URL the failover list of the cluster's default-user Secret
//! (`failover-uris`); its web process on the machine, sending numbered tasks with publisher
//! confirms through the client Service. The workers record every task they run in a file of a
//! hostPath volume (the nodes share this machine's disk). Every task the broker confirmed must run,
//! once or more: the runs of a task beyond its first are counted and printed. The workers run one
//! per machine, set up as the README says workers that must live through a machine lost should be
//! (`WARREN_MACHINE_LOSS_READY` in tasks.py): tasks acknowledged once run, no remote-control
//! queue, no gossip, mingle or worker heartbeats.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::rig::{Endpoint, POD_TIMEOUT, image};
use testkit::control_plane::{kubectl, kubectl_stdin, ok, repo, wait_for};

const WORKERS: &str = "celery-worker";
/// Each round of sending numbers its tasks from a multiple of this.
const ROUND: u32 = 1_000_000;

pub struct CeleryApp {
    namespace: String,
    dir: PathBuf,
    venv: PathBuf,
    sender: Option<Child>,
    next: u32,
}

/// The venv of the pinned Celery line on this machine (tests/fixtures/celery/venv.sh).
fn venv() -> PathBuf {
    let line = image("CELERY_LINE");
    let out =
        Command::new(Path::new(repo()).join("tests/fixtures/celery/venv.sh")).arg(&line).output().expect("venv.sh");
    assert!(out.status.success(), "venv.sh {line}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl CeleryApp {
    /// Two workers (a Deployment) in `namespace`, connected to cluster `cluster`; waits until they
    /// are available.
    pub fn deploy(namespace: &str, cluster: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("warren-celery-{namespace}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("results dir");
        // The workers run as uid 65532 and append to a file here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        let manifest = format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {WORKERS}
spec:
  replicas: 2
  selector:
    matchLabels: {{app: {WORKERS}}}
  template:
    metadata:
      labels: {{app: {WORKERS}}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}}
      # One worker per machine: a machine lost takes one worker, never both.
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - labelSelector: {{matchLabels: {{app: {WORKERS}}}}}
              topologyKey: kubernetes.io/hostname
      containers:
        - name: worker
          image: {image}
          imagePullPolicy: IfNotPresent
          args: [python3, -m, celery, -A, tasks, worker, --loglevel=INFO, --without-gossip, --without-mingle,
                 --without-heartbeat]
          env:
            - name: WARREN_BROKER_URL
              valueFrom: {{secretKeyRef: {{name: {cluster}-default-user, key: failover-uris}}}}
            - {{name: WARREN_RESULTS, value: /results/ran.jsonl}}
            - {{name: WARREN_MACHINE_LOSS_READY, value: "1"}}
          volumeMounts: [{{name: results, mountPath: /results}}]
      volumes:
        - name: results
          hostPath: {{path: {dir}, type: Directory}}
"#,
            image = image("CELERY_IMAGE"),
            dir = dir.display(),
        );
        ok("kubectl apply the Celery workers", kubectl_stdin(&["apply", "-n", namespace, "-f", "-"], &manifest));
        ok(
            "the Celery workers available",
            kubectl(&["rollout", "status", &format!("deployment/{WORKERS}"), "-n", namespace, "--timeout=300s"]),
        );
        Self { namespace: namespace.to_string(), dir, venv: venv(), sender: None, next: 0 }
    }

    /// The web process starts sending tasks (numbers from where the last round stopped).
    pub fn start_sending(&mut self, endpoint: &Endpoint) {
        assert!(self.sender.is_none(), "a sender runs already");
        let _ = std::fs::remove_file(self.dir.join("stop"));
        let log = std::fs::File::create(self.dir.join("sender.log")).expect("sender log");
        let child = Command::new(self.venv.join("bin/python"))
            .arg("send_until.py")
            .arg(self.next.to_string())
            .arg(self.dir.join("stop"))
            .arg(self.dir.join("sent"))
            .current_dir(Path::new(repo()).join("tests/fixtures/celery"))
            .env("WARREN_BROKER_URL", endpoint.amqp())
            .env("WARREN_RESULTS", "/dev/null")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("send_until.py");
        self.sender = Some(child);
    }

    /// Stops the web process; the tasks the broker confirmed since it started.
    pub fn stop_sending(&mut self) -> BTreeSet<u32> {
        let first = self.next;
        let mut child = self.sender.take().expect("a sender runs");
        std::fs::write(self.dir.join("stop"), "").expect("stop file");
        let status = child.wait().expect("send_until.py");
        assert!(status.success(), "send_until.py: {status}\n{}", self.sender_log());
        let sent: BTreeSet<u32> = self.sent().into_iter().filter(|n| *n >= first).collect();
        // The next round's numbers apart from this round's, also from a task sent but not confirmed.
        self.next = (first / ROUND + 1) * ROUND;
        sent
    }

    pub fn sender_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sender.log")).unwrap_or_default()
    }

    /// The numbers of the tasks the broker confirmed so far, in the order sent.
    pub fn sent(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("sent"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().expect("a task number"))
            .collect()
    }

    /// Every run the workers recorded: the task's number and when it ran (seconds since the epoch).
    fn records(&self) -> Vec<(u32, f64)> {
        let text = std::fs::read_to_string(self.dir.join("ran.jsonl")).unwrap_or_default();
        text.lines()
            // A line being written while this reads it has no newline yet: left for the next read.
            .take(text.matches('\n').count())
            .map(|line| {
                let ran: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
                let number = ran["number"].as_u64().unwrap_or_else(|| panic!("no number in {line}"));
                let at = ran["ran"].as_f64().unwrap_or_else(|| panic!("no time in {line}"));
                (number as u32, at)
            })
            .collect()
    }

    /// How many times each task ran, as the workers recorded it.
    fn runs(&self) -> BTreeMap<u32, u32> {
        let mut runs = BTreeMap::new();
        for (number, _) in self.records() {
            *runs.entry(number).or_default() += 1;
        }
        runs
    }

    /// Waits until a task numbered `first` or above (sent after some moment) has run; returns its
    /// number and when it ran.
    pub async fn wait_a_task_ran_from(&self, first: u32) -> (u32, std::time::SystemTime) {
        wait_for(&format!("a task numbered {first} or above run by a worker"), POD_TIMEOUT, || async {
            match self.records().into_iter().filter(|(n, _)| *n >= first).min_by(|a, b| a.1.total_cmp(&b.1)) {
                Some((number, at)) => Ok((number, std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(at))),
                None => Err(format!("workers ({}):\n{}", self.placement(), self.workers_log())),
            }
        })
        .await
    }

    /// Waits until every task of `sent` ran; returns how many ran twice or more, and their runs in all.
    pub async fn wait_every_task_ran(&self, sent: &BTreeSet<u32>) -> (usize, u32) {
        wait_for("every confirmed task run by the workers", POD_TIMEOUT, || async {
            let runs = self.runs();
            let missing: Vec<&u32> = sent.iter().filter(|n| !runs.contains_key(n)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} tasks not run yet (first: {:?}); workers:\n{}",
                    missing.len(),
                    sent.len(),
                    missing.iter().take(5).collect::<Vec<_>>(),
                    self.workers_log()
                ))
            }
        })
        .await;
        let runs = self.runs();
        let twice = sent.iter().filter(|n| runs[n] > 1).count();
        (twice, sent.iter().map(|n| runs[n]).sum())
    }

    /// The last lines each worker logged.
    fn workers_log(&self) -> String {
        let mut said = String::new();
        for (pod, _, node) in self.workers() {
            let out = kubectl(&["logs", "-n", &self.namespace, &pod, "--tail=40", "--timestamps"]);
            said += &format!(
                "--- {pod} on {node}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        said
    }

    /// `kubectl get pods` of the workers, printed as `output` says.
    fn get_workers(&self, output: &str) -> String {
        let selector = format!("app={WORKERS}");
        let out = kubectl(&["get", "pods", "-n", &self.namespace, "-l", &selector, "-o", output, "--no-headers"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The workers: pod, address and node of each that has them.
    pub fn workers(&self) -> Vec<(String, String, String)> {
        self.get_workers(r#"jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName}{"\n"}{end}"#)
            .lines()
            .filter_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [pod, address, node] => Some((pod.to_string(), address.to_string(), node.to_string())),
                _ => None,
            })
            .collect()
    }

    /// Where the workers run.
    pub fn placement(&self) -> String {
        self.get_workers(
            "custom-columns=POD:.metadata.name,NODE:.spec.nodeName,READY:.status.containerStatuses[0].ready",
        )
        .trim()
        .replace('\n', "; ")
    }
}

impl Drop for CeleryApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.sender.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = kubectl(&["delete", "deployment", WORKERS, "-n", &self.namespace, "--wait=true", "--timeout=60s"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
