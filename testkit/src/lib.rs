//! What Warren's tests share, by tier: test doubles for tier 1 (a scripted Kubernetes API server
//! with tower-test, a scripted RabbitMQ management API on loopback), real RabbitMQ nodes in network
//! namespaces for tier 2 (`rabbit_nodes`, `amqp`, `generations`), and the local control plane's
//! helpers for tiers 3 and 4 (`control_plane`).

pub mod amqp;
pub mod control_plane;
pub mod generations;
pub mod kube_mock;
pub mod management_fake;
pub mod memory;
pub mod rabbit_broker;
pub mod rabbit_nodes;
pub mod scaling;
pub mod tls;
pub mod wait;

use std::path::PathBuf;

use warren::api::RabbitCluster;

/// The repository's root, from the CARGO_MANIFEST_DIR cargo gives the running test or benchmark
/// (the root package's directory). Not the compile-time one: cargo reuses a workspace member's build
/// from another checkout of the same tree sharing the target directory (a CI clone), and a path
/// baked in there would point into that checkout, or nowhere once it is removed.
pub fn repo() -> &'static str {
    static ROOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let dir =
            std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/..").into());
        match dir.strip_suffix("/testkit") {
            Some(root) => root.to_string(),
            None => dir,
        }
    })
}

/// The `warren` binary cargo built for the test or benchmark running now: what
/// `CARGO_BIN_EXE_warren` names to an integration test, found the way cargo lays it out (the
/// test's executable in `<target>/<profile>/deps/`, the binary in `<target>/<profile>/`), since a
/// library cannot read that variable.
pub fn warren_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the running test's path");
    let binary = test.parent().and_then(|deps| deps.parent()).map(|profile| profile.join("warren"));
    match binary {
        Some(binary) if binary.is_file() => binary,
        _ => panic!("no warren binary beside {} (run through cargo test or cargo bench)", test.display()),
    }
}

/// Reads a RabbitCluster fixture from tests/fixtures and gives it what the API server would.
pub fn fixture(name: &str) -> RabbitCluster {
    let path = format!("{}/tests/fixtures/{name}", repo());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cluster: RabbitCluster = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    cluster.metadata.namespace.get_or_insert_with(|| "default".into());
    cluster.metadata.uid = Some("6f1c1c1e-0000-4000-8000-000000000001".into());
    cluster.metadata.generation = Some(1);
    cluster
}
