//! A process's memory, measured from outside: a cgroup v1 memory group with a limit (what the
//! kubelet makes of a container's memory limit), and the process's resident set sampled from /proc
//! while it runs.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

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
