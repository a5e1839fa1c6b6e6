//! A process's memory, measured from outside: a cgroup v1 memory group with a limit (what the
//! kubelet makes of a container's memory limit), and the process's resident set sampled from /proc
//! while it runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sha2::{Digest, Sha256};

use super::rabbit_nodes::NodeCluster;

const CGROUP_MEMORY: &str = "/sys/fs/cgroup/memory";

/// A memory cgroup this test made, removed when dropped.
pub struct MemoryGroup {
    path: PathBuf,
}

impl MemoryGroup {
    /// A new group `warren-test-<pid>-<name>` whose processes may use `limit` bytes at most; over
    /// that the kernel reclaims, then OOM-kills, as it would a container.
    pub fn create(name: &str, limit: u64) -> Self {
        let path = PathBuf::from(CGROUP_MEMORY).join(format!("warren-test-{}-{name}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e} (cgroup v1 memory controller?)", path.display()));
        let group = Self { path };
        group.write("memory.limit_in_bytes", &limit.to_string());
        // With swap, the limit covers memory and swap together, as for a container.
        if group.path.join("memory.memsw.limit_in_bytes").exists() {
            group.write("memory.memsw.limit_in_bytes", &limit.to_string());
        }
        group
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.path.join(file);
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// `program` with `args`, started inside the group (a shell joins it, then execs the program).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.path.join("cgroup.procs"))
            .arg(program)
            .args(args);
        command
    }

    /// The most memory the group's processes were charged at once, in bytes.
    pub fn peak_bytes(&self) -> u64 {
        self.read("memory.max_usage_in_bytes").trim().parse().unwrap_or(0)
    }

    /// Processes of the group the kernel OOM-killed (`oom_kill` of memory.oom_control), and how
    /// often the limit was hit.
    pub fn oom_kills_and_failcnt(&self) -> (u64, u64) {
        let kills = self
            .read("memory.oom_control")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        (kills, self.read("memory.failcnt").trim().parse().unwrap_or(0))
    }
}

impl Drop for MemoryGroup {
    fn drop(&mut self) {
        // The group's processes have exited by now (the test waited for them); a group still
        // holding a process cannot be removed, so that one is moved out first.
        for pid in self.read("cgroup.procs").lines() {
            let _ = std::fs::write(PathBuf::from(CGROUP_MEMORY).join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A directory of this test's, removed when dropped (also when the test fails).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn create(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("warren-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a process used while it ran.
pub struct Usage {
    pub status: ExitStatus,
    /// The peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// The resident set (VmRSS, KiB) sampled every 100 ms, with the time since the start.
    pub samples: Vec<(Duration, u64)>,
}

impl Usage {
    /// The largest resident set sampled in `[from, to)` of the run's length (fractions of it).
    pub fn largest_between(&self, from: f64, to: f64) -> u64 {
        let total = self.samples.last().map(|(t, _)| t.as_secs_f64()).unwrap_or(0.0);
        self.samples
            .iter()
            .filter(|(t, _)| {
                let at = t.as_secs_f64() / total.max(f64::EPSILON);
                at >= from && at < to
            })
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    }
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Waits for `child`, sampling its memory; killed (by pid) if it outlives `limit`.
pub async fn measure(mut child: Child, limit: Duration) -> Usage {
    let pid = child.id();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut peak_rss_kib = 0;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if let Some(rss) = status_kib(pid, "VmRSS:") {
            samples.push((started.elapsed(), rss));
        }
        peak_rss_kib = status_kib(pid, "VmHWM:").unwrap_or(0).max(peak_rss_kib);
        if started.elapsed() > limit {
            let _ = child.kill();
            let status = child.wait().expect("wait for the killed child");
            panic!("pid {pid} still ran after {limit:?} (killed): {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Usage { status, peak_rss_kib, samples }
}

/// `warren migrate` (this build's binary) with `flags` from `source` into `target`, its report
/// written to `report`, inside `group` when given; started.
pub fn migrate_command(
    group: Option<&MemoryGroup>,
    source: &NodeCluster,
    target: &NodeCluster,
    report: &Path,
    flags: &[&str],
) -> Child {
    let binary = crate::warren_binary();
    let binary = binary.to_str().expect("the warren binary's path is UTF-8");
    let report = report.to_string_lossy();
    let args: Vec<&str> = ["migrate", "--report", report.as_ref()].into_iter().chain(flags.iter().copied()).collect();
    let mut command = match group {
        Some(group) => group.command(binary, &args),
        None => {
            let mut command = Command::new(binary);
            command.args(args);
            command
        }
    };
    let url = |nodes: &NodeCluster| nodes.nodes[0].amqp_url(&nodes.credentials);
    command
        .env("WARREN_SOURCE_URI", url(source))
        .env("WARREN_SOURCE_API", source.management_url(0))
        .env("WARREN_TARGET_URI", url(target))
        .env("WARREN_TARGET_API", target.management_url(0))
        .env("WARREN_LOG", "warn,lapin=off")
        .stdout(Stdio::null())
        .spawn()
        .expect("warren migrate")
}

/// A body no compression or deduplication could shrink, different for every (queue, index).
pub fn large_body(queue: usize, index: usize, size: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ ((queue as u64) << 32 | index as u64);
    let mut body = Vec::with_capacity(size);
    while body.len() < size {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        body.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    body.truncate(size);
    body
}

fn digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Publishes `count` messages of `size` bytes to queue `large-<queue>` (declared), each confirmed,
/// with its index as message id and the SHA-256 of its body as a header.
pub async fn publish_large(url: &str, queue: usize, count: usize, size: usize) {
    let name = format!("large-{queue}");
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    for index in 0..count {
        let body = large_body(queue, index, size);
        let headers = FieldTable::from(std::collections::BTreeMap::from([(
            ShortString::from("sha256"),
            AMQPValue::LongString(digest(&body).into()),
        )]));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(index.to_string().into())
            .with_headers(headers);
        let confirm = channel
            .basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), &body, properties)
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "{name}: message {index} not confirmed");
    }
    let _ = connection.close(200, "filled".into()).await;
}

/// Queue `large-<queue>` holds exactly what `publish_large` sent: in order, every byte, the
/// header kept.
pub async fn assert_large_arrived(url: &str, queue: usize, count: usize, size: usize) {
    let name = format!("large-{queue}");
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    for index in 0..count {
        let message = channel
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .unwrap_or_else(|| panic!("{name}: message {index} missing on the target"));
        let properties = &message.delivery.properties;
        assert_eq!(properties.message_id().as_ref().map(|m| m.as_str()), Some(index.to_string().as_str()));
        let data = &message.delivery.data;
        assert_eq!(data.len(), size, "{name}/{index}: size");
        assert!(*data == large_body(queue, index, size), "{name}/{index}: the body changed");
        let header = properties.headers().as_ref().and_then(|h| h.inner().get("sha256").cloned());
        assert_eq!(header, Some(AMQPValue::LongString(digest(data).into())), "{name}/{index}: header");
    }
    let extra = channel.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("get");
    assert!(extra.is_none(), "{name}: a duplicate on the target");
    let _ = connection.close(200, "checked".into()).await;
}
