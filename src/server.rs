//! /healthz, /readyz and /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register("reconciles", "RabbitCluster reconciles", reconciles.clone());
        registry.register("reconcile_failures", "Failed reconciles by error", failures.clone());
        registry.register("reconcile_duration_seconds", "Duration of one reconcile", duration.clone());
        Self { registry: Arc::new(registry), reconciles, failures, duration }
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, elapsed: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            self.failures.get_or_create(&ErrorLabels { error: error.metric_label() }).inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

/// Serves the probes and metrics; `/readyz` answers 200 once `ready` is set.
pub async fn serve(address: SocketAddr, metrics: Metrics, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(state): State<ServerState>| async move {
                if state.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
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
        .with_state(ServerState { metrics, ready });
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await
}
