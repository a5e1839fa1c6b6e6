//! Tier 2: real RabbitMQ nodes (Debian's rabbitmq-server) run the way the StatefulSet runs pods.
//!
//! Three generations, each from a rootfs that e2e/rootfs.sh builds once per machine (the same bits
//! the node's images hold): 3.10 (bookworm: classic mirroring), 4.0 (trixie: quorum queues, Mnesia)
//! and 4.3 (sid: quorum queues, Khepri). The RabbitCluster's image tag chooses the generation; the
//! pod's commands run under chroot in it, in the node's own network, UTS and mount namespaces.
//!
//! Each node is a process tree in its own network namespace (a veth pair onto one bridge: the
//! network shape of pods on a cluster network), with its own address, hostname and /etc/hosts
//! (the headless Service's DNS), started through the operator's own bootstrap script with the
//! environment, ConfigMap files, conf.d and Erlang cookie that the builders produce for pod i. A
//! per-node directory plays the PersistentVolume.
//!
//! Everything a cluster creates is removed when it is dropped (also on a failed assertion): the
//! processes in its namespaces (by pid, as `ip netns pids` lists them), the namespaces, the bridge,
//! /etc/netns entries and its directories. Clusters run one at a time: two cores do not start six
//! Erlang VMs in parallel without timeouts.
//!
//! `network.rs`: the pod network (namespaces, veths, the bridge, /etc/hosts) and the sweep of what
//! a killed test left; `node.rs`: one pod (its processes, probes, hooks, clients in its network);
//! `cluster.rs`: a RabbitCluster's pods, as the StatefulSet lays them out and scales them.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tokio::sync::Mutex;

mod cluster;
mod network;
mod node;

pub use super::wait::wait_for;
pub use cluster::NodeCluster;
pub use node::console_digest;

pub(super) const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// Enters the pod: its hostname, /proc, the host's /tmp, the scratch directory (where the node
/// directories live, see `scratch_dir`) at the same path, the namespace's /etc/hosts, then chroot
/// into the generation's rootfs. Mounts made here live in the mount namespace `ip netns exec`
/// creates: nothing to unmount.
pub(super) const ENTER_POD: &str = r#"hostname "$0" && root=$1 && scratch=$2 && shift 2 &&
mount -t proc proc "$root/proc" && mount --bind /tmp "$root/tmp" &&
{ [ "$scratch" = /tmp ] || mount --bind "$scratch" "$root$scratch"; } &&
mount --bind /etc/hosts "$root/etc/hosts" && exec chroot "$root" "$@""#;
pub(super) const NAMESPACE: &str = "harness";
/// Where the pod mounts each volume, and the node directory that plays it.
pub(super) const MOUNTS: [(&str, &str); 6] = [
    ("/var/lib/rabbitmq", "data"),
    ("/etc/warren/config", "config"),
    ("/etc/warren/cookie", "cookie"),
    ("/etc/rabbitmq/conf.d", "conf.d"),
    ("/tmp", "tmp"),
    ("/var/log/rabbitmq", "log"),
];

/// Where the node directories (the pods' volumes) live: `WARREN_NODE_SCRATCH` when set, else
/// /dev/shm when the machine has it, else the temporary directory. On tmpfs a quorum queue's or
/// Khepri's fsync costs nothing: on this machine's virtual disk tests/migrate.rs alone took 276 s
/// and 372 CPU-seconds, on tmpfs 240 s and 308. What the tests prove does not depend on the disk;
/// a node's restart still finds its data (the directory outlives the process, not the machine).
pub(super) fn scratch_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WARREN_NODE_SCRATCH") {
        return PathBuf::from(dir);
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() { shm } else { std::env::temp_dir() }
}

pub(super) static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

pub(super) fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

/// Runs a setup command that must succeed.
pub(super) fn must(program: &str, args: &[&str]) {
    let out = run(program, args);
    assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Time for nodes to boot and (re)join, a failure detector only: three nodes of 3.10 formed in
/// 27 s on an idle machine and in up to 238 s with two other clusters forming and tier 3 running
/// beside them (as `make test` runs them) on two cores.
pub const BOOT: Duration = Duration::from_secs(420);
