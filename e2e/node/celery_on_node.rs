//! A Celery app as teams run it on the cluster: its workers a Deployment of the image
//! e2e/images.sh built (Debian's python3, Celery pinned from PyPI, the tests' app in
//! tests/fixtures/celery), their broker URL the failover list of the cluster's default-user Secret
//! (`failover-uris`); its web process on the machine, sending numbered tasks with publisher
//! confirms through the client Service. The workers record every task they run in a file of a
//! hostPath volume (the nodes share this machine's disk). Every task the broker confirmed must run,
//! once or more: the runs of a task beyond its first are counted and printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::rig::{Endpoint, POD_TIMEOUT, image};
use testkit::control_plane::{kubectl, kubectl_stdin, ok, repo, wait_for};

const WORKERS: &str = "celery-worker";

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
      containers:
        - name: worker
          image: {image}
          imagePullPolicy: IfNotPresent
          env:
            - name: WARREN_BROKER_URL
              valueFrom: {{secretKeyRef: {{name: {cluster}-default-user, key: failover-uris}}}}
            - {{name: WARREN_RESULTS, value: /results/ran.jsonl}}
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

    /// Stops the web process; the tasks the broker confirmed, every one sent since the deploy.
    pub fn stop_sending(&mut self) -> BTreeSet<u32> {
        let mut child = self.sender.take().expect("a sender runs");
        std::fs::write(self.dir.join("stop"), "").expect("stop file");
        let status = child.wait().expect("send_until.py");
        assert!(status.success(), "send_until.py: {status}\n{}", self.sender_log());
        let sent: BTreeSet<u32> = std::fs::read_to_string(self.dir.join("sent"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().expect("a task number"))
            .collect();
        self.next = sent.last().map_or(self.next, |n| n + 1);
        sent
    }

    pub fn sender_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sender.log")).unwrap_or_default()
    }

    /// How many times each task ran, as the workers recorded it.
    fn runs(&self) -> BTreeMap<u32, u32> {
        let mut runs = BTreeMap::new();
        for line in std::fs::read_to_string(self.dir.join("ran.jsonl")).unwrap_or_default().lines() {
            let ran: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            let number = ran["number"].as_u64().unwrap_or_else(|| panic!("no number in {line}"));
            *runs.entry(number as u32).or_default() += 1;
        }
        runs
    }

    /// Waits until every task of `sent` ran; returns how many ran twice or more, and the runs in all.
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
        (twice, runs.values().sum())
    }

    fn workers_log(&self) -> String {
        let out = kubectl(&["logs", "-n", &self.namespace, &format!("deployment/{WORKERS}"), "--tail=15"]);
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Where the workers run.
    pub fn placement(&self) -> String {
        let out = kubectl(&[
            "get",
            "pods",
            "-n",
            &self.namespace,
            "-l",
            &format!("app={WORKERS}"),
            "-o",
            "custom-columns=POD:.metadata.name,NODE:.spec.nodeName,READY:.status.containerStatuses[0].ready",
            "--no-headers",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().replace('\n', "; ")
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
