//! The management API of one pod, reached the way `kubectl port-forward` does: through the API
//! server's portforward subresource, so `kubectl warren status` works from a laptop that cannot
//! reach the cluster's Services. (The API server's service proxy cannot carry the management API's
//! basic auth: it strips the Authorization header once it has authenticated the caller.)

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PluginError;
use crate::controller::build::services::{MANAGEMENT_PORT, MANAGEMENT_TLS_PORT};

/// A pod's management API and the default user's credentials.
pub struct Management {
    pub pods: Api<Pod>,
    pub pod: String,
    pub username: String,
    pub password: String,
    /// A cluster with `spec.tls`: HTTPS on 15671, verified.
    pub tls: Option<Tls>,
}

/// How a TLS cluster's management API is verified: against the CA of its Secret (`ca.crt`), for
/// the name its certificate must hold (the client Service's host, as the default-user Secret's
/// `management-uri` gives it), as the operator verifies it.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca_pem: String,
    pub server_name: String,
}

impl Tls {
    /// The TLS client side over `stream`, the peer verified.
    pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> Result<tokio_rustls::client::TlsStream<S>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let certificate = certificate.map_err(|e| format!("ca.crt: {e}"))?;
            roots.add(certificate).map_err(|e| format!("ca.crt: {e}"))?;
        }
        if roots.is_empty() {
            return Err("ca.crt holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.server_name.clone()).map_err(|e| format!("{}: {e}", self.server_name))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.server_name))
    }
}

/// Largest answer read (a page of queues is far below it).
const MAX_ANSWER: usize = 16 << 20;

impl Management {
    /// `GET /api/<path>` on the pod, as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, PluginError> {
        let port = if self.tls.is_some() { MANAGEMENT_TLS_PORT } else { MANAGEMENT_PORT } as u16;
        let fail = |what: String| PluginError(format!("management API of pod {}: {what}", self.pod));
        let mut forwarder = self.pods.portforward(&self.pod, &[port]).await.map_err(|e| fail(e.to_string()))?;
        let stream = forwarder.take_stream(port).ok_or_else(|| fail("no port-forward stream".into()))?;
        let answer = get_over(stream, self.tls.as_ref(), path, &self.username, &self.password).await;
        forwarder.abort();
        answer.map_err(fail)
    }

    /// `GET /api/<path>` read as the management API's own model (`rabbitmq::management`), as the
    /// operator reads it. Through a JSON value first: a key sent twice (RabbitMQ 4.0 can repeat a
    /// quorum queue's `members`) keeps its last value.
    pub async fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, PluginError> {
        let value = self.get(path).await?;
        serde_json::from_value(value)
            .map_err(|e| PluginError(format!("management API of pod {}: GET /api/{path}: {e}", self.pod)))
    }
}

/// `GET /api/<path>` over `stream` (a port-forward's, or any connection to the management port),
/// through TLS when `tls` says so, as JSON.
pub async fn get_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: Option<&Tls>,
    path: &str,
    username: &str,
    password: &str,
) -> Result<Value, String> {
    let (status, body) = match tls {
        Some(tls) => exchange(tls.connect(stream).await?, path, username, password).await?,
        None => exchange(stream, path, username, password).await?,
    };
    if !(200..300).contains(&status) {
        return Err(format!("GET /api/{path}: HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET /api/{path}: {e}"))
}

/// One request and its answer. HTTP/1.0 and one request per stream: the answer has a
/// Content-Length and nothing follows.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
    username: &str,
    password: &str,
) -> Result<(u16, Vec<u8>), String> {
    let credentials =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{username}:{password}"));
    let request = format!(
        "GET /api/{path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Basic {credentials}\r\n\
         Accept: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    read_answer(&mut stream).await.map_err(|e| format!("GET /api/{path}: {e}"))
}

/// The status code and body of one HTTP answer: the body is Content-Length bytes, or all that
/// comes until the stream ends when there is no Content-Length.
async fn read_answer(stream: &mut (impl AsyncReadExt + Unpin)) -> Result<(u16, Vec<u8>), String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (head_end, status, length) = loop {
        let read = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("the connection closed before an answer".into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse::<u16>().ok())
                .ok_or_else(|| format!("not an HTTP answer: {}", super::fit(&head, 80)))?;
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
            });
            break (end + 4, status, length);
        }
        if buffer.len() > 64 * 1024 {
            return Err("answer headers larger than 64 KiB".into());
        }
    };
    let wanted = length.map(|l| head_end + l);
    while wanted.is_none_or(|w| buffer.len() < w) {
        let read = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            if wanted.is_some() {
                return Err(format!("the answer ended after {} of {length:?} bytes", buffer.len() - head_end));
            }
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if buffer.len() > MAX_ANSWER {
            return Err("answer larger than 16 MiB".into());
        }
    }
    buffer.truncate(wanted.unwrap_or(buffer.len()));
    Ok((status, buffer.split_off(head_end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_read_by_its_content_length_or_to_its_end() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx: y\r\n\r\n[1,2,3]trailing";
        assert_eq!(read_answer(&mut &answer[..]).await, Ok((200, b"[1,2,3]".to_vec())));
        let answer = b"HTTP/1.0 401 Unauthorized\r\n\r\nno";
        assert_eq!(read_answer(&mut &answer[..]).await, Ok((401, b"no".to_vec())));
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1]";
        assert!(read_answer(&mut &cut[..]).await.unwrap_err().contains("ended after 3"));
        assert!(read_answer(&mut &b""[..]).await.is_err());
    }
}
