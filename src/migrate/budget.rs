//! How much memory messages may take in the migrator: an in-flight budget in bytes, shared by every
//! queue moving at once, beside the message window.
//!
//! What the migrator holds of a message is what the source delivered and the target has not
//! confirmed yet. The source pushes deliveries up to a consumer's prefetch, which counts messages
//! (RabbitMQ does not implement basic.qos prefetch-size), so the budget works at two places: each
//! queue's prefetch is sized from the bytes of its messages (`prefetch`), and every delivery takes
//! its size from the shared budget until the target confirmed it (`Budget::take`), so a message
//! larger than the whole budget still moves, alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Without a memory limit to size from.
pub const DEFAULT_BYTES: u64 = 128 * MIB;

/// The budget never goes below this: a few messages of RabbitMQ's 4.x default maximum (16 MiB)
/// must fit for a queue of large messages to move at all at a useful pace.
pub const MIN_BYTES: u64 = 4 * MIB;

/// The budget's share of a memory limit. A message in flight exists up to three times: lapin's
/// delivery buffer (grown by doubling while it is assembled), the frames of its publish, and the
/// socket's write buffer; the process itself takes some 20 MiB. With a quarter, 16 MiB messages
/// under a 256 MiB limit reached the limit (the release build, `make bench`).
pub const SHARE_OF_LIMIT: u64 = 8;

/// The default budget for a memory `limit` in bytes.
pub fn for_limit(limit: u64) -> u64 {
    (limit / SHARE_OF_LIMIT).max(MIN_BYTES)
}

/// Bytes of messages held between the source's delivery and the target's confirm, shared by
/// every queue. Counted in KiB: a semaphore takes at most `u32::MAX` permits at once.
pub struct Budget {
    bytes: u64,
    kib: u32,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// A delivery's share of the budget, given back when dropped (once the message is settled).
pub type Held = OwnedSemaphorePermit;

impl Budget {
    pub fn new(bytes: u64) -> Self {
        let kib = u32::try_from(bytes.max(KIB) / KIB).unwrap_or(u32::MAX);
        Self { bytes, kib, permits: Arc::new(Semaphore::new(kib as usize)), waiting: AtomicUsize::new(0) }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What a message of `size` bytes costs: its size in KiB, at least one, at most everything.
    fn cost(&self, size: usize) -> u32 {
        let kib = (size as u64).div_ceil(KIB).max(1);
        u32::try_from(kib).unwrap_or(u32::MAX).min(self.kib)
    }

    /// The message's share now, or `None` when the budget is spent.
    pub fn try_take(&self, size: usize) -> Option<Held> {
        self.permits.clone().try_acquire_many_owned(self.cost(size)).ok()
    }

    /// The message's share once other queues gave enough back. A message larger than the budget
    /// waits for all of it: it moves alone.
    pub async fn take(&self, size: usize) -> Held {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let held = self.permits.clone().acquire_many_owned(self.cost(size)).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        // The semaphore is never closed.
        held.expect("the budget's semaphore is never closed")
    }

    /// Whether some queue waits for bytes: a queue holding confirmed messages should settle them
    /// now rather than when its window fills.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }
}

/// The prefetch of a queue whose messages are about `message_bytes` each: as many as `share` of
/// the budget holds, at least one, at most the message window.
pub fn prefetch(share: u64, message_bytes: u64, window: u16) -> u16 {
    let fits = share / message_bytes.max(1);
    u16::try_from(fits).unwrap_or(u16::MAX).clamp(1, window.max(1))
}

/// The memory limit of this process's cgroup, when it has one: `memory.max` (cgroup v2) or
/// `memory.limit_in_bytes` (v1; an unlimited v1 group reports a number near `i64::MAX`).
pub fn cgroup_memory_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        // Inside a container the group's own path is often mounted as the root.
        let root = if path.len() > 1 { file.replacen(path, "", 1) } else { file.clone() };
        let limit = std::fs::read_to_string(&file)
            .or_else(|_| std::fs::read_to_string(&root))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        if let Some(limit) = limit.filter(|l| *l < (1 << 62)) {
            return Some(limit);
        }
    }
    None
}

/// The budget when none is given: an eighth of the cgroup's memory limit, else [`DEFAULT_BYTES`].
pub fn default_bytes() -> u64 {
    cgroup_memory_limit().map(for_limit).unwrap_or(DEFAULT_BYTES)
}

/// `64Mi`, `512MiB`, `1Gi`, `100M`, `1G`, `4096`: bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected a size such as 64Mi or 1Gi"))?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => KIB,
        "Mi" | "MiB" => MIB,
        "Gi" | "GiB" => 1024 * MIB,
        "Ti" | "TiB" => 1024 * 1024 * MIB,
        "k" | "K" | "KB" => 1000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        other => return Err(format!("{text:?}: unknown unit {other:?} (Ki, Mi, Gi, k, M, G)")),
    };
    number.checked_mul(unit).ok_or_else(|| format!("{text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_size("64Mi"), Ok(64 * MIB));
        assert_eq!(parse_size("1Gi"), Ok(1024 * MIB));
        assert_eq!(parse_size("100M"), Ok(100_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("64 lots").is_err());
        assert!(parse_size("Mi").is_err());
    }

    #[test]
    fn prefetch_holds_what_the_share_holds() {
        assert_eq!(prefetch(64 * MIB, 16 * MIB, 2000), 4);
        assert_eq!(prefetch(16 * MIB, 16 * MIB, 2000), 1);
        assert_eq!(prefetch(4 * MIB, 16 * MIB, 2000), 1, "a message larger than the share: one at a time");
        assert_eq!(prefetch(64 * MIB, 100, 2000), 2000, "small messages: the window");
        assert_eq!(prefetch(64 * MIB, 0, 500), 500);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_waits_for_all_of_it() {
        let budget = Budget::new(4 * MIB);
        let small = budget.try_take(MIB as usize).expect("1 MiB of 4");
        assert!(budget.try_take(16 * MIB as usize).is_none(), "the whole budget is not free");
        let waiting = budget.take(16 * MIB as usize);
        tokio::pin!(waiting);
        assert!(futures::FutureExt::now_or_never(&mut waiting).is_none());
        assert!(budget.contended());
        drop(small);
        let alone = waiting.await;
        assert!(budget.try_take(1).is_none(), "the large message holds everything");
        drop(alone);
        assert!(budget.try_take(4 * MIB as usize).is_some());
    }
}
