//! `make bench`: the operator (release build, the chart's RBAC) watching 200 RabbitClusters on the
//! local control plane. Prints how long from creating them to all their children applied, the
//! operator's resident memory and CPU time while doing it and while idle, and what it wrote.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Api;
use kube::api::{ListParams, PostParams};
use support::operator::Operator;
use support::{TestNamespace, admin_client, ensure_crds, writes_by};
use warren::api::RabbitCluster;

const CLUSTERS: usize = 200;
const IDLE: Duration = Duration::from_secs(60);

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
    let started = Instant::now();
    futures::stream::iter(0..CLUSTERS)
        .map(|i| {
            let clusters = clusters.clone();
            async move {
                let cluster: RabbitCluster = serde_json::from_value(serde_json::json!({
                    "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
                    "metadata": { "name": format!("bench-{i:03}") },
                    "spec": { "replicas": 3 }
                }))
                .expect("RabbitCluster");
                clusters.create(&PostParams::default(), &cluster).await.expect("create RabbitCluster");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let created_in = started.elapsed();

    // The StatefulSet is the last child applied: 200 of them means every child is there.
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=warren");
    loop {
        let n = stateful_sets.list_metadata(&selector).await.expect("list StatefulSets").items.len();
        if n == CLUSTERS {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "only {n} of {CLUSTERS} clusters applied after 15 min");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let applied_in = started.elapsed();
    let (rss_busy, rss_peak, cpu_busy) = usage(pid);

    // Let the StatefulSet controller's pods and the resulting status updates settle, then idle.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let writes_before = writes_by(&operator.user).len();
    let reconciles_before = operator.reconciles().await;
    let (_, _, cpu_idle_start) = usage(pid);
    tokio::time::sleep(IDLE).await;
    let (rss_idle, rss_peak_end, cpu_idle_end) = usage(pid);
    let idle_writes = writes_by(&operator.user).len() - writes_before;
    let idle_reconciles = operator.reconciles().await - reconciles_before;
    let total_writes = writes_by(&operator.user).len();

    println!("warren controller scale benchmark: {CLUSTERS} RabbitClusters (3 replicas each), one namespace");
    println!("  {:<52} {:>10.2} s", "create the RabbitClusters (16 in flight)", created_in.as_secs_f64());
    println!("  {:<52} {:>10.2} s", "from first create to all children applied", applied_in.as_secs_f64());
    println!("  {:<52} {:>10.2} s", "operator CPU time while applying", cpu_busy - cpu_empty);
    println!("  {:<52} {:>10} requests", "operator writes in total (children, status, events)", total_writes);
    println!("  {:<52} {:>10.1} MiB", "operator RSS, no clusters", rss_empty as f64 / 1024.0);
    println!("  {:<52} {:>10.1} MiB", "operator RSS, right after applying", rss_busy as f64 / 1024.0);
    println!("  {:<52} {:>10.1} MiB", "operator RSS peak", rss_peak.max(rss_peak_end) as f64 / 1024.0);
    println!(
        "  {:<52} {:>10.1} MiB",
        format!("operator RSS after {} s idle", IDLE.as_secs()),
        rss_idle as f64 / 1024.0
    );
    println!(
        "  {:<52} {:>10.3} s ({:.2}% of one core)",
        format!("operator CPU time over {} s idle", IDLE.as_secs()),
        cpu_idle_end - cpu_idle_start,
        (cpu_idle_end - cpu_idle_start) / IDLE.as_secs_f64() * 100.0
    );
    println!("  {:<52} {:>10} ({} reconciles)", "operator writes while idle", idle_writes, idle_reconciles);
    drop(operator);
    drop(ns);
}
