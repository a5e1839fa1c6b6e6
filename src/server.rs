//! /healthz, /readyz and /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::RwLock;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

pub use crate::metrics::Metrics;

/// Where the operator is on its way to reconciling, as `/readyz` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Starting,
    /// Another replica holds the Lease. Ready: a rolling update needs the new replica ready while
    /// the old one still leads.
    Standby { lease: String },
    /// Leading (or alone), its watches still listing: reconciles would read half-filled stores.
    Syncing,
    /// Every store has listed once.
    Ready,
}

/// The operator's current [`Phase`], shared with the HTTP server.
#[derive(Clone, Default)]
pub struct Readiness(Arc<RwLock<Phase>>);

impl Readiness {
    pub fn set(&self, phase: Phase) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    pub fn phase(&self) -> Phase {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The `/readyz` answer.
    pub fn answer(&self) -> (StatusCode, String) {
        match self.phase() {
            Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting".into()),
            Phase::Standby { lease } => (
                StatusCode::OK,
                format!("standby: another replica holds the Lease {lease}; this one takes over when it lapses"),
            ),
            Phase::Syncing => {
                (StatusCode::SERVICE_UNAVAILABLE, "syncing: the watches have not listed every object yet".into())
            }
            Phase::Ready => (StatusCode::OK, "ready: reconciling from synced stores".into()),
        }
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    readiness: Readiness,
}

/// Serves the probes and metrics; `/readyz` answers from `readiness`.
pub async fn serve(address: SocketAddr, metrics: Metrics, readiness: Readiness) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|State(state): State<ServerState>| async move { state.readiness.answer() }))
        .route(
            "/metrics",
            get(|State(state): State<ServerState>| async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    state.metrics.encode(),
                )
                    .into_response()
            }),
        )
        .with_state(ServerState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_is_ready_for_a_synced_leader_and_for_a_standby_that_says_so() {
        let readiness = Readiness::default();
        assert_eq!(readiness.answer().0, StatusCode::SERVICE_UNAVAILABLE);
        readiness.set(Phase::Standby { lease: "warren-system/warren".into() });
        let (code, body) = readiness.answer();
        assert_eq!(code, StatusCode::OK);
        assert!(body.starts_with("standby") && body.contains("warren-system/warren"), "{body}");
        readiness.set(Phase::Syncing);
        assert_eq!(readiness.answer().0, StatusCode::SERVICE_UNAVAILABLE);
        readiness.set(Phase::Ready);
        assert_eq!(readiness.answer(), (StatusCode::OK, "ready: reconciling from synced stores".to_string()));
    }
}
