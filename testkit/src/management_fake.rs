//! A scripted RabbitMQ management API on 127.0.0.1: fixed answers per `METHOD path`, and a log of
//! every request with its body, so tests assert on exactly what the operator sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use serde_json::Value;

#[derive(Clone, Default)]
struct FakeState {
    answers: Arc<Mutex<HashMap<String, (u16, String)>>>,
    log: Arc<Mutex<Vec<(String, Value)>>>,
}

/// A running fake; dropped with the test's runtime.
pub struct ManagementFake {
    pub url: String,
    state: FakeState,
}

impl ManagementFake {
    pub async fn start() -> Self {
        let state = FakeState::default();
        // Every feature flag enabled, unless a test says otherwise.
        state.answers.lock().unwrap().insert("GET /api/feature-flags".into(), (200, "[]".into()));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// Answers `METHOD /path` (path as sent, percent-encoded) with `status` and `body`.
    pub fn answer(&self, method: &str, path: &str, status: u16, body: Value) {
        self.state.answers.lock().unwrap().insert(format!("{method} {path}"), (status, body.to_string()));
    }

    /// Answers with a body as given, byte for byte (what a `Value` cannot hold, such as a key twice).
    pub fn answer_raw(&self, method: &str, path: &str, status: u16, body: &str) {
        self.state.answers.lock().unwrap().insert(format!("{method} {path}"), (status, body.to_string()));
    }

    /// Every request so far: `METHOD /path` and its JSON body (Null when empty).
    pub fn requests(&self) -> Vec<(String, Value)> {
        self.state.log.lock().unwrap().clone()
    }

    /// The requests that change something (anything but GET).
    pub fn writes(&self) -> Vec<(String, Value)> {
        self.requests().into_iter().filter(|(call, _)| !call.starts_with("GET ")).collect()
    }
}

async fn handle(State(state): State<FakeState>, method: Method, uri: Uri, body: Bytes) -> (StatusCode, String) {
    let key = format!("{method} {}", uri.path());
    let parsed = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    state.log.lock().unwrap().push((key.clone(), parsed));
    let answer = state.answers.lock().unwrap().get(&key).cloned();
    match answer {
        Some((status, body)) => (StatusCode::from_u16(status).unwrap(), body),
        // Writes nobody scripted succeed with 201/204 like RabbitMQ's; unscripted reads are 404.
        None if method == Method::GET => {
            (StatusCode::NOT_FOUND, r#"{"error":"Object Not Found","reason":"Not Found"}"#.into())
        }
        None => (StatusCode::CREATED, String::new()),
    }
}
