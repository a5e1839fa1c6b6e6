//! `make bench`: the operator (release build, the chart's RBAC) watching 200, then 1,000
//! RabbitClusters on the local control plane. Prints how long from creating them to all their
//! children applied, the operator's resident memory (empty, with 200 and with 1,000, per cluster)
//! and CPU time while applying and while idle, and what it wrote.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{ListParams, PostParams};
use testkit::control_plane::operator::Operator;
use testkit::control_plane::{TestNamespace, admin_client, ensure_crds, writes_by};
use warren::api::RabbitCluster;

const FIRST: usize = 200;
const ALL: usize = 1000;
const IDLE: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(20);

/// Resident set (now and peak, KiB) and CPU time (user + system, seconds) of a process.
fn usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    (kib("VmRSS:"), kib("VmHWM:"), ticks / 100.0)
}

/// Creates RabbitClusters `bench-<i>` for `range`, 16 at a time.
async fn create(clusters: &Api<RabbitCluster>, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .map(|i| {
            let clusters = clusters.clone();
            async move {
                let cluster: RabbitCluster = serde_json::from_value(serde_json::json!({
                    "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
                    "metadata": { "name": format!("bench-{i:04}") },
                    "spec": { "replicas": 3 }
                }))
                .expect("RabbitCluster");
                clusters.create(&PostParams::default(), &cluster).await.expect("create RabbitCluster");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Waits until `count` StatefulSets exist: the StatefulSet is the last child applied, so that
/// many means every child of that many clusters is there.
async fn wait_applied(stateful_sets: &Api<StatefulSet>, count: usize, started: Instant) -> Duration {
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=warren");
    loop {
        let n = stateful_sets.list_metadata(&selector).await.expect("list StatefulSets").items.len();
        if n >= count {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "only {n} of {count} clusters applied after 30 min");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "bench-scale").await;
    let operator = Operator::install(&client, &ns.name).await;
    let pid = operator.pid();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_empty, _, cpu_empty) = usage(pid);

    let clusters: Api<RabbitCluster> = Api::namespaced(client.clone(), &ns.name);
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let started = Instant::now();
    create(&clusters, 0..FIRST).await;
    let created_in = started.elapsed();
    let applied_in = wait_applied(&stateful_sets, FIRST, started).await;
    let (_, _, cpu_busy) = usage(pid);

    // Let the StatefulSet controller's pods and the resulting status updates settle, then idle.
    tokio::time::sleep(SETTLE).await;
    let (rss_first, _, _) = usage(pid);
    let writes_before = writes_by(&operator.user).len();
    let reconciles_before = operator.reconciles().await;
    let (_, _, cpu_idle_start) = usage(pid);
    tokio::time::sleep(IDLE).await;
    let (rss_idle, _, cpu_idle_end) = usage(pid);
    let idle_writes = writes_by(&operator.user).len() - writes_before;
    let idle_reconciles = operator.reconciles().await - reconciles_before;
    let total_writes = writes_by(&operator.user).len();

    let more = Instant::now();
    create(&clusters, FIRST..ALL).await;
    let more_applied_in = wait_applied(&stateful_sets, ALL, more).await;
    tokio::time::sleep(SETTLE).await;
    let (rss_all, rss_peak, _) = usage(pid);
    let per_cluster = |rss: u64, n: usize| (rss.saturating_sub(rss_empty)) as f64 / n as f64;

    println!("warren controller scale benchmark: RabbitClusters of 3 replicas, one namespace, one operator");
    println!("  {:<56} {:>12.2} s", format!("create {FIRST} RabbitClusters (16 in flight)"), created_in.as_secs_f64());
    println!(
        "  {:<56} {:>12.2} s",
        format!("from first create to all {FIRST} clusters' children"),
        applied_in.as_secs_f64()
    );
    println!("  {:<56} {:>12.2} s", "operator CPU time while applying", cpu_busy - cpu_empty);
    println!("  {:<56} {:>12} requests", "operator writes for them (children, status, events)", total_writes);
    println!("  {:<56} {:>12}", "operator RSS, no clusters", mib(rss_empty));
    println!("  {:<56} {:>12}", format!("operator RSS, {FIRST} clusters (settled)"), mib(rss_first));
    println!(
        "  {:<56} {:>12}",
        format!("operator RSS, {FIRST} clusters after {} s idle", IDLE.as_secs()),
        mib(rss_idle)
    );
    println!(
        "  {:<56} {:>12.3} s ({:.2}% of one core)",
        format!("operator CPU time over {} s idle", IDLE.as_secs()),
        cpu_idle_end - cpu_idle_start,
        (cpu_idle_end - cpu_idle_start) / IDLE.as_secs_f64() * 100.0
    );
    println!("  {:<56} {:>12} ({} reconciles)", "operator writes while idle", idle_writes, idle_reconciles);
    println!(
        "  {:<56} {:>12.2} s",
        format!("{} more clusters, to all children", ALL - FIRST),
        more_applied_in.as_secs_f64()
    );
    println!("  {:<56} {:>12}", format!("operator RSS, {ALL} clusters (settled)"), mib(rss_all));
    println!("  {:<56} {:>12}", "operator RSS peak", mib(rss_peak));
    println!("  {:<56} {:>9.1} KiB", format!("memory per cluster, {FIRST} clusters"), per_cluster(rss_idle, FIRST));
    println!("  {:<56} {:>9.1} KiB", format!("memory per cluster, {ALL} clusters"), per_cluster(rss_all, ALL));
    drop(operator);
    drop(ns);
}
