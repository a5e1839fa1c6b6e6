//! Leader election: every replica of the operator waits on one Lease, and only its holder runs the
//! controllers. The holder renews it; when it dies or cannot renew, a standby takes the Lease once
//! it lapses. A holder that loses it stops at once: another replica may already be reconciling.

use std::future::Future;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use crate::server::{Phase, Readiness};

/// How long a Lease stays valid after its last renewal: the longest a cluster waits for a standby
/// after the leader died.
pub const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before its Lease would lapse.
pub const RENEW_BEFORE_SECONDS: u64 = 5;

/// Which Lease the replicas share, and who this replica is.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    pub identity: String,
}

/// Why the operator stops.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipError {
    #[error("Lease {lease}: {message}")]
    Lease { lease: String, message: String },
    #[error("lost the Lease {lease}: another replica may be reconciling now; stopping")]
    Lost { lease: String },
}

/// Waits as a standby until this replica holds the Lease, then runs `work`. Returns when `work`
/// ends (the process was asked to stop: the Lease is released so a standby takes over at once), or
/// with an error when the Lease is lost.
pub async fn lead<F>(client: Client, election: &Election, readiness: &Readiness, work: F) -> Result<(), LeadershipError>
where
    F: Future<Output = ()>,
{
    let lease = format!("{}/{}", election.namespace, election.lease);
    let failed = |message: String| LeadershipError::Lease { lease: lease.clone(), message };
    readiness.set(Phase::Standby { lease: lease.clone() });
    let manager = LeaseManagerBuilder::new(client, &election.lease)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_BEFORE_SECONDS)
        .build()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (mut leader, task) = manager.watch().await;
    tracing::info!(%lease, identity = %election.identity, "standby: waiting for the Lease");
    let granted = async {
        while !*leader.borrow_and_update() {
            leader.changed().await.map_err(|_| failed("the Lease task stopped".into()))?;
        }
        Ok(())
    };
    tokio::select! {
        outcome = granted => outcome?,
        () = shutdown_signal() => {
            drop(leader);
            let _ = task.await;
            return Ok(());
        }
    }
    tracing::info!(%lease, identity = %election.identity, "leading");
    readiness.set(Phase::Syncing);
    let lost = async {
        while leader.changed().await.is_ok() {
            if !*leader.borrow() {
                break;
            }
        }
    };
    let outcome = tokio::select! {
        () = work => Ok(()),
        () = lost => Err(LeadershipError::Lost { lease: lease.clone() }),
    };
    // Dropping the receiver makes the Lease task release the Lease (when still held) and end.
    drop(leader);
    if let Ok(Err(error)) = task.await {
        tracing::warn!(%lease, %error, "releasing the Lease failed; a standby waits for it to lapse");
    }
    outcome
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
