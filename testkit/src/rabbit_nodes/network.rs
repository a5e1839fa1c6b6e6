//! The pod network: a network namespace per pod, a veth onto the cluster's bridge, the headless
//! Service's names in /etc/netns/<pod>/hosts; and the sweep of what a killed test process left.

use std::path::{Path, PathBuf};

use super::{must, run};

/// The cluster network's bridge, the host at .254 of 10.231.`subnet`.0/24.
pub(super) fn add_bridge(bridge: &str, subnet: u8) {
    must("ip", &["link", "add", bridge, "type", "bridge"]);
    must("ip", &["addr", "add", &format!("10.231.{subnet}.254/24"), "dev", bridge]);
    must("ip", &["link", "set", bridge, "up"]);
}

pub(super) fn remove_bridge(bridge: &str) {
    let _ = run("ip", &["link", "del", bridge]);
}

/// A pod's network namespace.
pub(super) fn add_namespace(netns: &str) {
    must("ip", &["netns", "add", netns]);
}

/// The pod's `eth0` at `ip`, a veth whose host end `host_link` is on `bridge`; and its loopback.
pub(super) fn plug(netns: &str, host_link: &str, bridge: &str, ip: &str) {
    must("ip", &["link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", netns]);
    must("ip", &["link", "set", host_link, "master", bridge, "up"]);
    must("ip", &["-n", netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    must("ip", &["-n", netns, "link", "set", "eth0", "up"]);
    must("ip", &["-n", netns, "link", "set", "lo", "up"]);
}

/// The pod's /etc/hosts (`ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts).
pub(super) fn write_hosts(netns: &str, hosts: &str) {
    let etc = PathBuf::from("/etc/netns").join(netns);
    std::fs::create_dir_all(&etc).expect("/etc/netns");
    std::fs::write(etc.join("hosts"), hosts).expect("hosts");
}

/// The namespace (its veth goes with it) and its /etc/netns entry.
pub(super) fn remove_namespace(netns: &str) {
    let _ = run("ip", &["netns", "del", netns]);
    let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(netns));
}

/// Removes what clusters of test processes that no longer exist left behind (a test binary killed
/// by a signal runs no Drop): the processes in their namespaces, the namespaces, bridge and dirs.
pub(super) fn sweep_abandoned() {
    let Ok(entries) = std::fs::read_dir(super::scratch_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("warren-nodes-") else { continue };
        let owner = std::fs::read_to_string(entry.path().join("owner.pid")).unwrap_or_default();
        if owner.is_empty() || Path::new(&format!("/proc/{}", owner.trim())).exists() {
            continue;
        }
        let namespaces = String::from_utf8_lossy(&run("ip", &["netns", "list"]).stdout).into_owned();
        for netns in namespaces.split_whitespace().filter(|n| n.starts_with(&format!("wr{id}-"))) {
            let pids = String::from_utf8_lossy(&run("ip", &["netns", "pids", netns]).stdout).into_owned();
            for pid in pids.split_whitespace() {
                let _ = run("kill", &["-KILL", pid]);
            }
            remove_namespace(netns);
        }
        remove_bridge(&format!("wrb{id}"));
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// A /24 in 10.231.0.0/16 that no interface of this machine uses.
pub(super) fn free_subnet() -> u8 {
    let addresses = String::from_utf8_lossy(&run("ip", &["-o", "-4", "addr", "show"]).stdout).into_owned();
    for _ in 0..100 {
        let candidate = 1 + rand::random::<u8>() % 250;
        if !addresses.contains(&format!("10.231.{candidate}.")) {
            return candidate;
        }
    }
    panic!("no free 10.231.x.0/24 subnet");
}
