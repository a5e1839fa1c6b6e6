//! Tier 2: Celery apps moved from RabbitMQ 3.10 (3 nodes, `ha-all`) and from 4.0 (3 nodes, classic
//! queues left unreplicated by the upgrade from 3.x) into Warren's default 4.3 (3 nodes, quorum the
//! default queue type) with `warren migrate` and no flags, as a user does it:
//! real Celery and kombu from PyPI, pinned in tests/fixtures/celery, in two lines (5.3 with kombu
//! 5.3, which many apps still run, and the newest). Each app runs in a vhost of its own on both
//! clusters, its worker holding ETA tasks when the first run is tried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use testkit::generations::manifest;
use testkit::rabbit_nodes::{NodeCluster, wait_for};
use warren::migrate::{Endpoint, MigrateReason, Options, migrate};

/// Tasks each app sends with an ETA before the move, and tasks it sends to run now.
const ETA_TASKS: u32 = 200;
const NOW_TASKS: u32 = 20;
/// How far ahead the ETAs are. The unchanged apps' are due soon, so the test sees them run on the
/// target (whether the move took longer than that or not: then they run as soon as a worker takes
/// them). The tuned app's are due in an hour: its worker on the target holds every one of them
/// while the tasks sent after the move run, which shows without a clock that they do not wait.
const ETA_DELAY: Duration = Duration::from_secs(90);
const FAR_ETA_DELAY: Duration = Duration::from_secs(3600);
/// Task numbers: run now on the source, ETA tasks (moved), run now on the target.
const BEFORE: u32 = 0;
const HELD: u32 = 1_000;
const AFTER: u32 = 2_000;

struct App {
    line: &'static str,
    vhost: &'static str,
    /// The settings the README recommends for quorum queues (a prefetch with room for ETA tasks);
    /// its ETA tasks are due in an hour.
    recommended: bool,
}

impl App {
    fn eta_delay(&self) -> Duration {
        if self.recommended { FAR_ETA_DELAY } else { ETA_DELAY }
    }
}

const APPS: [App; 3] = [
    App { line: "5.3", vhost: "shop53", recommended: false },
    App { line: "5.7", vhost: "shop57", recommended: false },
    App { line: "5.7", vhost: "shop57-tuned", recommended: true },
];

fn fixtures() -> PathBuf {
    Path::new(testkit::repo()).join("tests/fixtures/celery")
}

/// The line's virtualenv, made once per machine.
fn venv(line: &str) -> PathBuf {
    let out = Command::new(fixtures().join("venv.sh")).arg(line).output().expect("venv.sh");
    assert!(out.status.success(), "venv.sh {line}: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn broker_url(nodes: &NodeCluster, vhost: &str) -> String {
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    let (user, password) = (&nodes.credentials.username, &nodes.credentials.password);
    format!("amqp://{}:{}@{}:5672/{}", encode(user), encode(password), nodes.nodes[0].ip, encode(vhost))
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// A Celery worker process, stopped by its pid when dropped (a failing test leaves none behind).
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(app: &App, vhost: &str, venv: &Path, url: &str, results: &Path, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(venv.join("bin/celery"))
            .args(["-A", "tasks", "worker", "--pool=solo", "--without-gossip", "--without-mingle"])
            .args(["--without-heartbeat", "--loglevel=INFO", "-n", &format!("{vhost}@%h")])
            .current_dir(fixtures())
            .env("WARREN_BROKER_URL", url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("WARREN_RESULTS", results)
            .env("WARREN_RECOMMENDED", if app.recommended { "1" } else { "0" })
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a celery worker");
        Self { child, log }
    }

    /// A warm shutdown (SIGTERM): what it holds unacknowledged goes back to the queue.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the worker did not stop within 60 s of SIGTERM:\n{}", self.log_tail());
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends tasks as the app's web process would (python send.py).
fn send(venv: &Path, url: &str, first: u32, count: u32, delay: Duration) {
    let out = Command::new(venv.join("bin/python"))
        .args(["send.py", &first.to_string(), &count.to_string(), &delay.as_secs_f64().to_string()])
        .current_dir(fixtures())
        .env("WARREN_BROKER_URL", url)
        .env("WARREN_RESULTS", "/dev/null")
        .output()
        .expect("send.py");
    assert!(out.status.success(), "send.py: {}", String::from_utf8_lossy(&out.stderr));
}

/// One task run, as the task recorded it.
#[derive(Debug, serde::Deserialize)]
struct Ran {
    number: u32,
    eta: Option<f64>,
    ran: f64,
}

fn runs(results: &Path) -> Vec<Ran> {
    let text = std::fs::read_to_string(results).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// How many times each task number ran.
fn counts(runs: &[Ran]) -> BTreeMap<u32, u32> {
    let mut counts = BTreeMap::new();
    for run in runs {
        *counts.entry(run.number).or_default() += 1;
    }
    counts
}

async fn queue(nodes: &NodeCluster, vhost: &str, name: &str) -> Result<serde_json::Value, String> {
    nodes.api(0, &format!("/api/queues/{vhost}/{name}")).await
}

/// A source cluster: RabbitMQ 3.10 with `ha-all` (where users come from), or 4.0 with classic
/// queues that lost their mirrors in the upgrade from 3.x. Its apps' vhosts start with `prefix`.
struct Source {
    generation: &'static str,
    prefix: &'static str,
    nodes: NodeCluster,
}

/// One app on one source, and on the target after the move: its vhost is the same on both.
struct Deployed<'a> {
    app: &'a App,
    vhost: String,
    source: usize,
}

#[tokio::test]
async fn celery_apps_move_from_3_10_and_4_0_into_4_3_with_no_flags_and_every_task_runs_once() {
    let mut group = NodeCluster::started_group(&[
        &manifest("old", 3, "3.10", ""),
        &manifest("old40", 3, "4.0", ""),
        &manifest("new", 3, "4.3", ""),
    ])
    .await;
    let new = group.pop().expect("the target");
    let sources: Vec<Source> = group
        .into_iter()
        .zip([("3.10", ""), ("4.0", "from40-")])
        .map(|(nodes, (generation, prefix))| Source { generation, prefix, nodes })
        .collect();
    let scratch = tempdir();
    let venvs: BTreeMap<&str, PathBuf> = ["5.3", "5.7"].into_iter().map(|line| (line, venv(line))).collect();
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let mut apps = Vec::new();
    for (source, old) in sources.iter().enumerate() {
        for app in &APPS {
            let vhost = format!("{}{}", old.prefix, app.vhost);
            old.nodes.api_put(0, &format!("/api/vhosts/{vhost}"), serde_json::json!({})).await.expect("vhost");
            let permissions = format!("/api/permissions/{vhost}/{}", old.nodes.credentials.username);
            old.nodes.api_put(0, &permissions, all.clone()).await.expect("permissions");
            apps.push(Deployed { app, vhost, source });
        }
    }
    // On 3.10 the operator's broker reconcile puts ha-all on every vhost, the new ones too. The 4.0
    // cluster's new vhosts keep RabbitMQ's default: classic queues, on one node each.
    sources[0].nodes.converge(0).await.expect("ha-all on the apps' vhosts");

    // On the old clusters: each app's worker runs what is due and holds its ETA tasks.
    let results = |deployed: &Deployed| scratch.join(format!("{}.jsonl", deployed.vhost));
    let url = |nodes: &NodeCluster, deployed: &Deployed| broker_url(nodes, &deployed.vhost);
    let mut workers = Vec::new();
    for deployed in &apps {
        let (venv, url) = (&venvs[deployed.app.line], url(&sources[deployed.source].nodes, deployed));
        let log = scratch.join(format!("old-{}.log", deployed.vhost));
        workers.push(Worker::start(deployed.app, &deployed.vhost, venv, &url, &results(deployed), log));
        send(venv, &url, BEFORE, NOW_TASKS, Duration::ZERO);
        send(venv, &url, HELD, ETA_TASKS, deployed.app.eta_delay());
    }
    for (deployed, worker) in apps.iter().zip(&workers) {
        let old = &sources[deployed.source];
        wait_for(
            &format!("{}: the worker runs what is due and holds its ETA tasks", deployed.vhost),
            Duration::from_secs(90),
            || async {
                let info = queue(&old.nodes, &deployed.vhost, "celery").await?;
                let ran = runs(&results(deployed)).iter().filter(|r| r.number < HELD).count();
                // How many it holds depends on the Celery line and the broker: Celery raises a
                // global prefetch for each ETA task it holds where it can (3.10), and keeps a
                // fixed one where it cannot (seen with Celery 5.7 on 4.0: 8).
                let held = info["messages_unacknowledged"].as_u64().unwrap_or(0);
                let mirrored = info["policy"] == "ha-all";
                if ran == NOW_TASKS as usize && held > 0 && mirrored == (old.generation == "3.10") {
                    eprintln!(
                        "[celery] {} on {} (Celery {}): the worker holds {held} ETA tasks",
                        deployed.vhost, old.generation, deployed.app.line
                    );
                    Ok(())
                } else {
                    Err(format!("{ran} ran; {info}\n{}", worker.log_tail()))
                }
            },
        )
        .await;
    }

    // `warren migrate`, no flags, while the workers hold the ETA tasks: refused, naming them.
    for (source, old) in sources.iter().enumerate() {
        let error = migrate(&Options::new(endpoint(&old.nodes), endpoint(&new))).await.expect_err("messages held");
        assert_eq!(error.reason, MigrateReason::MessagesHeldByConsumers, "{error}");
        for deployed in apps.iter().filter(|d| d.source == source) {
            assert!(error.message.contains(&format!("{}/celery: ", deployed.vhost)), "{error}");
        }
    }
    // The workers stop (a warm shutdown gives their ETA tasks back), then the moves.
    for worker in workers.drain(..) {
        worker.stop();
    }
    // What the move must take: each ETA task that has not run. (An ETA that came due while the
    // old workers still ran was run there, once: the exactly-once check below spans both clusters.)
    let left = |deployed: &Deployed| {
        let ran = runs(&results(deployed)).iter().filter(|r| (HELD..HELD + ETA_TASKS).contains(&r.number)).count();
        u64::from(ETA_TASKS) - ran as u64
    };
    for (source, old) in sources.iter().enumerate() {
        let expected: u64 = apps.iter().filter(|d| d.source == source).map(left).sum();
        let report = migrate(&Options::new(endpoint(&old.nodes), endpoint(&new))).await.expect("the migration");
        for line in report.plan_lines() {
            eprintln!("[celery] from {}: {line}", old.generation);
        }
        eprintln!("[celery] from {}: refused declarations: {:?}", old.generation, report.refused_declarations);
        assert!(report.complete, "{report:#?}");
        assert_eq!(report.moved(), expected, "{report:#?}");
        for deployed in apps.iter().filter(|d| d.source == source) {
            let vhost = deployed.vhost.as_str();
            let planned = report.planned.iter().find(|q| q.vhost == vhost && q.name == "celery").expect("planned");
            // Mirrored on 3.10, on one node on 4.0; replicated on the target either way.
            assert_eq!(planned.source_mirrored, old.generation == "3.10", "{planned:?}");
            assert!(planned.target_type == "quorum" && planned.replicated, "{planned:?}");
            assert!(!report.ha_lost.iter().any(|l| l.vhost == vhost && l.name == "celery"), "{:?}", report.ha_lost);
            assert!(
                !report.refused_declarations.iter().any(|r| r.vhost == vhost && r.name == "celery"),
                "{:?}",
                report.refused_declarations
            );
            // HA kept: a quorum queue with a member on every node; the vhost the migration created
            // defaults to quorum, as Warren's own do.
            let info = queue(&new, vhost, "celery").await.expect("celery on the target");
            assert_eq!(info["type"], "quorum", "{info}");
            assert_eq!(info["members"].as_array().map(Vec::len), Some(3), "{info}");
            let vhost = new.api(0, &format!("/api/vhosts/{vhost}")).await.expect("vhost on the target");
            assert_eq!(vhost["default_queue_type"], "quorum", "{vhost}");
        }
    }
    let root = new.api(0, "/api/vhosts/%2F").await.expect("vhost /");
    assert_eq!(root["default_queue_type"], "quorum", "the target's own vhost kept its default: {root}");

    // On Warren's cluster: the same apps, unchanged (one with the recommended settings), a worker
    // each, and new tasks sent now while the moved ETA tasks wait.
    let mut sent_after = Vec::new();
    for deployed in &apps {
        let (venv, url) = (&venvs[deployed.app.line], url(&new, deployed));
        let log = scratch.join(format!("new-{}.log", deployed.vhost));
        workers.push(Worker::start(deployed.app, &deployed.vhost, venv, &url, &results(deployed), log));
        send(venv, &url, AFTER, NOW_TASKS, Duration::ZERO);
        sent_after.push(now());
    }
    let limit = ETA_DELAY + Duration::from_secs(120);
    for (deployed, worker) in apps.iter().zip(&workers) {
        // The tuned app's ETA tasks are due in an hour: every task sent now ran while its worker
        // holds all of them.
        let tuned = deployed.app.recommended;
        let due = if tuned { 2 * NOW_TASKS } else { ETA_TASKS + 2 * NOW_TASKS };
        wait_for(&format!("{}: every task due ran", deployed.vhost), limit, || async {
            let ran = runs(&results(deployed)).len();
            let held = queue(&new, &deployed.vhost, "celery").await?["messages_unacknowledged"].as_u64();
            if ran >= due as usize && (!tuned || held == Some(u64::from(ETA_TASKS))) {
                Ok(())
            } else {
                Err(format!("{ran} ran, {held:?} held\n{}", worker.log_tail()))
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (deployed, sent_after) in apps.iter().zip(sent_after) {
        let (app, runs) = (deployed.app, runs(&results(deployed)));
        let held = if app.recommended { 0..0 } else { HELD..HELD + ETA_TASKS };
        let expected: BTreeMap<u32, u32> =
            (BEFORE..BEFORE + NOW_TASKS).chain(held).chain(AFTER..AFTER + NOW_TASKS).map(|n| (n, 1)).collect();
        assert_eq!(counts(&runs), expected, "{}: every task due exactly once, none early", deployed.vhost);
        let early: Vec<&Ran> = runs.iter().filter(|r| r.eta.is_some_and(|eta| r.ran < eta)).collect();
        assert!(early.is_empty(), "{}: ETA tasks run before their ETA: {early:?}", deployed.vhost);
        let new_done = runs.iter().filter(|r| r.number >= AFTER).map(|r| r.ran).fold(0.0, f64::max);
        let first_eta = runs.iter().filter_map(|r| r.eta).fold(f64::MAX, f64::min);
        let etas = if app.recommended {
            format!("the {ETA_TASKS} moved ETA tasks, due in an hour, held by the worker meanwhile")
        } else {
            format!("the moved ETA tasks were due {:.1} s after sending", first_eta - sent_after)
        };
        eprintln!(
            "[celery] {} from {} (Celery {}{}): tasks sent after the move done {:.1} s after sending; {etas}",
            deployed.vhost,
            sources[deployed.source].generation,
            app.line,
            if app.recommended { ", recommended settings" } else { ", unchanged" },
            new_done - sent_after,
        );
    }
    for worker in workers.drain(..) {
        worker.stop();
    }
    // The tuned apps' workers gave their ETA tasks back on their warm shutdown: each moved one is
    // in the queue once, with its arguments.
    for deployed in apps.iter().filter(|d| d.app.recommended) {
        let vhost = deployed.vhost.as_str();
        wait_for(&format!("{vhost}: the ETA tasks back in the queue"), Duration::from_secs(30), || async {
            let info = queue(&new, vhost, "celery").await?;
            if info["messages_ready"] == ETA_TASKS && info["messages_unacknowledged"] == 0 {
                Ok(())
            } else {
                Err(info.to_string())
            }
        })
        .await;
        let get = serde_json::json!({"count": ETA_TASKS, "ackmode": "ack_requeue_true", "encoding": "auto"});
        let messages = new.api_post(0, &format!("/api/queues/{vhost}/celery/get"), get).await.expect("ETA tasks");
        let mut numbers: Vec<u64> = messages
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                // Celery's message protocol 2: the body is [args, kwargs, embed]; args = (number, eta).
                let body: serde_json::Value =
                    serde_json::from_str(m["payload"].as_str().expect("payload")).expect("json");
                body[0][0].as_u64().unwrap_or_else(|| panic!("a task number in {body}"))
            })
            .collect();
        numbers.sort_unstable();
        let expected: Vec<u64> = (u64::from(HELD)..u64::from(HELD + ETA_TASKS)).collect();
        assert_eq!(numbers, expected, "{vhost}: each moved ETA task in the queue once");
    }
}

fn endpoint(nodes: &NodeCluster) -> Endpoint {
    Endpoint::parse(&nodes.nodes[0].amqp_url(&nodes.credentials), &nodes.management_url(0)).expect("endpoint")
}

/// A directory of this test's own under the system's temporary directory, removed when dropped
/// (after the workers, declared later, are stopped), also when the test fails.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Scratch {
    let dir = std::env::temp_dir().join(format!("warren-celery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}
