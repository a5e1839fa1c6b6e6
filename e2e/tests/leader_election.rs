//! Two replicas of the operator, as the chart runs them: one leads, the other stands by doing
//! nothing, and takes over when the leader is killed.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use testkit::control_plane::cluster::{self, additional_config, config_map, manifest, wait_condition};
use testkit::control_plane::operator::{Operator, RELEASE};
use testkit::control_plane::{TestNamespace, admin_client, describe, ensure_crds, requests_by, wait_for};

const NAME: &str = "demo";

async fn holder(client: &Client, namespace: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    leases.get_opt(RELEASE).await.ok().flatten()?.spec?.holder_identity
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_is_killed() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-leader").await;
    let mut leader = Operator::install(&client, &ns.name).await;
    let standby = leader.another_replica(&format!("{RELEASE}-1"));
    standby.wait_readyz("standby").await;
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some(leader.pod_name.as_str()));

    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    // The standby has done nothing but look at the Lease: no read, no write of anything else.
    let by_standby = |requests: Vec<testkit::control_plane::Write>| -> Vec<testkit::control_plane::Write> {
        requests.into_iter().filter(|r| r.credential.as_deref() == Some(standby.credential.as_str())).collect()
    };
    let standby_requests = by_standby(requests_by(&standby.user));
    let (lease, other): (Vec<_>, Vec<_>) = standby_requests.into_iter().partition(|r| r.resource == "leases");
    assert!(other.is_empty(), "the standby made requests besides the Lease:\n  {}", describe(&other));
    assert!(!lease.is_empty(), "no Lease request of the standby in the audit log: are tokens told apart?");
    assert!(
        requests_by(&leader.user)
            .iter()
            .any(|r| r.credential.as_deref() == Some(leader.credential.as_str()) && r.resource == "statefulsets"),
        "the leader's requests are not in the audit log under its own token"
    );

    // SIGKILL: the leader cannot release the Lease; the standby must wait for it to lapse.
    let killed = Instant::now();
    leader.kill();
    cluster::patch(&ns.name, NAME, r#"{"spec":{"rabbitmq":{"additionalConfig":"consumer_timeout = 7200000\n"}}}"#);
    wait_for("the standby applies the spec change", Duration::from_secs(120), || async {
        let config = additional_config(&config_map(&client, &ns.name, NAME).await);
        if config == "consumer_timeout = 7200000\n" { Ok(()) } else { Err(config) }
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!(
        "leader SIGKILLed; the standby applied the spec change {:.1} s later (Lease {} s)",
        takeover.as_secs_f64(),
        warren::leader::LEASE_SECONDS
    );
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some(standby.pod_name.as_str()));
    standby.wait_readyz("ready").await;
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    let mut last = by_standby(requests_by(&standby.user));
    last.retain(|r| r.resource == "configmaps");
    assert!(!last.is_empty(), "the new leader's apply is not in the audit log under its token");
}
