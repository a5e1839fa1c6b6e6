//! AMQP steps shared by preflight and the mover: each bounded in time, each failure classified from
//! lapin's error kind as the connection failing (worth reconnecting) or a broker refusing something.

use std::future::Future;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, DefaultConnectionBuilder, ErrorKind};

/// A broker that stops answering must not stall a step forever.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// A failed step: what was being done and why, and whether the connection itself failed.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub transport: bool,
}

impl Failure {
    /// A failure of lapin's, classified by its kind.
    pub fn of(what: &str, error: &lapin::Error) -> Self {
        Self { message: format!("{what}: {error}"), transport: is_transport(error.kind()) }
    }

    /// A broker's (or this program's) refusal: another attempt on a new connection would not help.
    pub fn refused(message: impl Into<String>) -> Self {
        Self { message: message.into(), transport: false }
    }

    /// The same failure, its message prefixed.
    pub fn context(self, prefix: &str) -> Self {
        Self { message: format!("{prefix} {}", self.message), ..self }
    }
}

/// The connection (or its socket) failed, went quiet, or the broker closed it because the node
/// is going away (CONNECTION_FORCED): not something the broker refused.
fn is_transport(kind: &ErrorKind) -> bool {
    match kind {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::MissingHeartbeatError => true,
        ErrorKind::ProtocolError(error) => {
            matches!(error.kind(), AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED))
        }
        _ => false,
    }
}

/// One lapin operation, bounded by [`ANSWER_WITHIN`]; no answer counts as a failed connection.
pub async fn within<T>(what: &str, operation: impl Future<Output = Result<T, lapin::Error>>) -> Result<T, Failure> {
    bounded(what, async { operation.await.map_err(|error| Failure::of(what, &error)) }).await
}

/// Steps that fail on their own terms, bounded together by [`ANSWER_WITHIN`].
pub async fn bounded<T>(what: &str, steps: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::time::timeout(ANSWER_WITHIN, steps).await.unwrap_or_else(|_| {
        Err(Failure { message: format!("{what}: no answer within {} s", ANSWER_WITHIN.as_secs()), transport: true })
    })
}

pub async fn connect(uri: &str, ca: Option<&str>, side: &str) -> Result<Connection, Failure> {
    let what = format!("connect to the {side}");
    let builder = DefaultConnectionBuilder::new().map_err(|e| Failure::of(&what, &e))?;
    let tls = OwnedTLSConfig { identity: None, cert_chain: ca.map(str::to_string) };
    let builder = builder.with_uri_str(uri.to_string()).with_tls_config(tls);
    within(&what, builder.connect()).await
}

/// Closes a connection, waiting a few seconds at most.
pub async fn close(connection: Connection, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close(200, reason.into())).await;
}

/// A queue as the broker counts it now (a passive declare): (ready messages, consumers).
pub async fn declared(channel: &Channel, queue: &str) -> Result<(u64, u64), Failure> {
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared =
        within(&format!("queue {queue}"), channel.queue_declare(queue.into(), options, FieldTable::default())).await?;
    Ok((u64::from(declared.message_count()), u64::from(declared.consumer_count())))
}

/// Ready messages of a queue, as the broker counts them.
pub async fn depth(channel: &Channel, queue: &str) -> Result<u64, Failure> {
    Ok(declared(channel, queue).await?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_socket_is_transport_and_a_refusal_is_not() {
        let io = ErrorKind::IOError(std::sync::Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        assert!(is_transport(&io));
        assert!(is_transport(&ErrorKind::MissingHeartbeatError));
        assert!(!is_transport(&ErrorKind::ChannelsLimitReached));
    }
}
