//! A scripted Kubernetes API server: each expected call is checked for method, path, query and
//! body, in order, and answered; a call outside the script fails the test.

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type BodyCheck = Box<dyn Fn(&Value) + Send>;

/// One expected call and its answer.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query_contains: Vec<String>,
    pub check: Option<BodyCheck>,
    pub status: StatusCode,
    /// `None`: echo the request body back (what create and apply return).
    pub response: Option<Value>,
}

impl Call {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self { method, path: path.into(), query_contains: vec![], check: None, status: StatusCode::OK, response: None }
    }
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }
    /// GET answered with 404.
    pub fn get_missing(path: impl Into<String>) -> Self {
        Self::get(path).respond(StatusCode::NOT_FOUND, not_found())
    }
    /// Server-side apply by the operator's field manager, without force.
    pub fn apply(path: impl Into<String>) -> Self {
        let mut call = Self::new(Method::PATCH, path);
        call.query_contains = vec!["fieldManager=warren".into()];
        call
    }
    /// Server-side apply by the operator's field manager, forced (the StatefulSet, whose fields
    /// another manager may have taken: drift is reverted).
    pub fn forced_apply(path: impl Into<String>) -> Self {
        let mut call = Self::new(Method::PATCH, path);
        call.query_contains = vec!["force=true".into(), "fieldManager=warren".into()];
        call
    }
    /// A server-side apply (forced, by the one status field manager) of a RabbitCluster's status
    /// subresource, answered with the object.
    pub fn status_patch(path: impl Into<String>) -> Self {
        let path = path.into();
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        let mut call = Self::new(Method::PATCH, format!("{path}/status"));
        call.query_contains = vec!["force=true".into(), "fieldManager=warren".into()];
        call.returns(json!({
            "apiVersion": "warren.dev/v1alpha1", "kind": "RabbitCluster",
            "metadata": {"name": name, "namespace": "default"}, "spec": {}}))
    }
    /// An Event about the RabbitCluster, in its namespace.
    pub fn event(namespace: &str, reason: &'static str) -> Self {
        Self::new(Method::POST, format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events")).check(move |body| {
            assert_eq!(body["reason"], reason, "event reason; event: {body}");
            assert_eq!(body["regarding"]["kind"], "RabbitCluster", "event subject; event: {body}");
        })
    }
    pub fn check(mut self, check: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }
    pub fn respond(mut self, status: StatusCode, body: Value) -> Self {
        self.status = status;
        self.response = Some(body);
        self
    }
    pub fn returns(self, body: Value) -> Self {
        self.respond(StatusCode::OK, body)
    }
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": "NotFound", "message": "not found", "code": 404})
}

/// Every request the mock served: method, path with query, JSON body.
pub type Served = Vec<(Method, String, Value)>;

/// A client whose requests must follow `script`. The handle finishes once the script is done and
/// every clone of the client is dropped; it panics on any deviation, so await it.
pub fn scripted_client(script: Vec<Call>) -> (Client, JoinHandle<Served>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (index, call) in script.into_iter().enumerate() {
            let Some((request, send)) = handle.next_request().await else {
                panic!("call {index} ({} {}) never came; calls seen: {seen:#?}", call.method, call.path)
            };
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request.into_body().collect().await.expect("request body").to_bytes();
            let body: Value =
                if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
            assert_eq!(
                (&method, path.as_str()),
                (&call.method, call.path.as_str()),
                "call {index}: unexpected request (query {query:?}); calls seen before: {seen:#?}"
            );
            for part in &call.query_contains {
                assert!(query.contains(part.as_str()), "call {index} {path}: query {query:?} lacks {part}");
            }
            // Children are applied without force (a conflict is reported), unless the script says
            // force (the StatefulSet); status is forced.
            let child_apply = call.method == Method::PATCH && !path.ends_with("/status");
            let forced = call.query_contains.iter().any(|q| q == "force=true");
            if child_apply && !forced && call.query_contains.iter().any(|q| q.contains("fieldManager")) {
                assert!(!query.contains("force=true"), "call {index} {path}: apply must not force");
            }
            if let Some(check) = &call.check {
                check(&body);
            }
            let response_body = call.response.clone().unwrap_or_else(|| body.clone());
            let response = Response::builder()
                .status(call.status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&response_body).expect("serialize")))
                .expect("response");
            send.send_response(response);
            seen.push((method, path, body));
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected extra call {} {}; calls seen: {seen:#?}", request.method(), request.uri());
        }
        seen
    });
    (Client::new(service, "default"), task)
}
