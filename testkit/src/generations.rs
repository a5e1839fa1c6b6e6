//! The RabbitMQ generations the tier-2 nodes run: a rootfs each, built by e2e/rootfs.sh, and the
//! RabbitCluster manifests that name them.

use std::path::PathBuf;

/// A RabbitMQ generation's rootfs, built by e2e/rootfs.sh.
#[derive(Clone, Debug)]
pub struct Rootfs {
    pub path: PathBuf,
    /// The exact version it holds (`4.3.6`).
    pub version: String,
}

/// The rootfs of `generation` (`3.10`, `4.0`, `4.3`).
pub fn rootfs(generation: &str) -> Rootfs {
    let cache = std::env::var_os("WARREN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME or WARREN_CACHE")).join(".cache/warren")
    });
    let path = cache.join(format!("rootfs/rabbitmq-{generation}"));
    let version = std::fs::read_to_string(cache.join(format!("rootfs/rabbitmq-{generation}.version")))
        .unwrap_or_else(|e| {
            panic!("no RabbitMQ {generation} rootfs at {} ({e}): run e2e/rootfs.sh (make test does)", path.display())
        })
        .trim()
        .to_string();
    Rootfs { path, version }
}

/// The image a RabbitCluster names for `generation`, with the exact version its rootfs holds.
pub fn image(generation: &str) -> String {
    format!("rabbitmq:{}-management", rootfs(generation).version)
}

/// A RabbitCluster manifest: `replicas` nodes of `generation`, Auto HA, and `extra` spec lines
/// (indented by two spaces).
pub fn manifest(name: &str, replicas: usize, generation: &str, extra: &str) -> String {
    format!(
        "apiVersion: warren.dev/v1alpha1\nkind: RabbitCluster\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  image: {}\n{extra}",
        image(generation)
    )
}

/// A 3-node 3.10 cluster as a user would write it: Auto HA (classic mirroring on 3.x), pause_minority.
pub const THREE_NODES: &str = "
apiVersion: warren.dev/v1alpha1
kind: RabbitCluster
metadata: {name: demo}
spec:
  replicas: 3
  image: rabbitmq:3.10.8-management
";
