//! Tier 2: feature flags after a roll-out, on real nodes of each generation. Nodes booted with only
//! `quorum_queue` asked for (`RABBITMQ_FEATURE_FLAGS`, as a cluster made by an older release is
//! after an upgrade) have stable flags disabled; the operator's broker step enables every one of
//! them, as `rabbitmqctl enable_feature_flag all` would, so that the next minor version can boot.

use testkit::generations::manifest;
use testkit::rabbit_nodes::{BOOT, NodeCluster};

/// The stable flags a node reports disabled, sorted.
async fn disabled_stable(nodes: &NodeCluster) -> Vec<String> {
    let client = warren::rabbitmq::management::ManagementClient::new(
        &nodes.management_url(0),
        &nodes.credentials.username,
        &nodes.credentials.password,
    )
    .expect("a management client");
    let flags = client.get("/api/feature-flags").await.expect("GET /api/feature-flags").expect("a list");
    let mut disabled: Vec<String> = flags
        .as_array()
        .expect("a list of flags")
        .iter()
        .filter(|f| f["state"] == "disabled" && f["stability"] == "stable")
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect::<Vec<_>>();
    disabled.sort();
    disabled
}

async fn stable_flags_are_enabled_after_a_roll_out(generation: &str) {
    let mut nodes = NodeCluster::create(&manifest("flags", 1, generation, "")).await;
    nodes.set_env("RABBITMQ_FEATURE_FLAGS", "quorum_queue");
    nodes.start_all();
    nodes.wait_formed(BOOT).await;
    let before = disabled_stable(&nodes).await;
    let left_to_the_user: Vec<String> = before.iter().filter(|f| f.as_str() == "khepri_db").cloned().collect();
    assert!(before.len() > left_to_the_user.len(), "{generation}: nothing disabled to enable: {before:?}");

    let observed = nodes.converge(0).await.expect("broker reconcile");
    let after = disabled_stable(&nodes).await;
    eprintln!("{generation}: disabled stable flags before {before:?}, after {after:?}; {:?}", observed.actions);
    assert_eq!(after, left_to_the_user, "{generation}: stable flags left disabled");
    assert_eq!(observed.disabled_feature_flags, left_to_the_user);
    let enabled = observed.actions.iter().find(|a| a.starts_with("enabled feature flags")).expect("an action");
    assert!(before.iter().filter(|f| !left_to_the_user.contains(f)).all(|f| enabled.contains(f.as_str())), "{enabled}");

    // The next pass has nothing left to do.
    let again = nodes.converge(0).await.expect("second broker reconcile");
    assert!(!again.actions.iter().any(|a| a.contains("feature flags")), "{:?}", again.actions);
}

#[tokio::test]
async fn rabbitmq_3_10_feature_flags() {
    stable_flags_are_enabled_after_a_roll_out("3.10").await;
}

#[tokio::test]
async fn rabbitmq_4_0_feature_flags() {
    stable_flags_are_enabled_after_a_roll_out("4.0").await;
}

#[tokio::test]
async fn rabbitmq_4_3_feature_flags() {
    stable_flags_are_enabled_after_a_roll_out("4.3").await;
}
