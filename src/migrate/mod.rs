//! `warren migrate`: drains an old RabbitMQ cluster into a new one.
//!
//! preflight (versions, queues, consumers holding messages) → definitions (exported, converted for
//! the target's version, imported, verified) → messages (per queue: consume with manual acks, publish
//! with confirms and `mandatory`, ack the source only after the target confirmed) → verify. Every
//! phase can run again after a crash: definitions import is idempotent, and a message leaves the
//! source only once the target has confirmed it.

pub mod amqp;
pub mod budget;
pub mod declarations;
pub mod definitions;
pub mod model;
pub mod mover;
pub mod preflight;
pub mod progress;
pub mod report;

use std::time::Duration;

use regex::Regex;
use url::Url;

use crate::error::BrokerReason;
use crate::rabbitmq::management::ManagementClient;
pub use report::Report;

/// One broker: its AMQP URI (credentials included) and its management API, and the CA its
/// certificates are verified against when either is TLS (`amqps`, `https`): with no CA, the
/// system's roots. A peer that cannot be verified is refused; there is no way to skip the check.
#[derive(Clone)]
pub struct Endpoint {
    pub amqp: Url,
    pub api: Url,
    /// PEM certificates (the `ca.crt` of a cert-manager Secret).
    pub ca: Option<String>,
}

// Credentials stay out of logs.
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut amqp = self.amqp.clone();
        let _ = amqp.set_password(None);
        f.debug_struct("Endpoint")
            .field("amqp", &amqp.as_str())
            .field("api", &self.api.as_str())
            .field("ca", &self.ca.is_some())
            .finish()
    }
}

impl Endpoint {
    /// `amqp_uri` carries the user and password, which the management API uses too.
    pub fn parse(amqp_uri: &str, api_uri: &str) -> Result<Self, MigrateError> {
        let amqp = Url::parse(amqp_uri).map_err(|e| MigrateError::input(format!("AMQP URI: {e}")))?;
        if !matches!(amqp.scheme(), "amqp" | "amqps") || amqp.username().is_empty() || amqp.password().is_none() {
            return Err(MigrateError::input("AMQP URI must be amqp[s]://USER:PASS@HOST:PORT"));
        }
        let api = Url::parse(api_uri).map_err(|e| MigrateError::input(format!("management API URI: {e}")))?;
        if !matches!(api.scheme(), "http" | "https") {
            return Err(MigrateError::input("management API URI must be http[s]://HOST:PORT"));
        }
        Ok(Self { amqp, api, ca: None })
    }

    /// The same endpoint, its TLS peers verified against the PEM certificates in `path`.
    pub fn with_ca_file(mut self, path: Option<&std::path::Path>) -> Result<Self, MigrateError> {
        if let Some(path) = path {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| MigrateError::input(format!("CA file {}: {e}", path.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(MigrateError::input(format!("CA file {}: no PEM certificate in it", path.display())));
            }
            self.ca = Some(pem);
        }
        Ok(self)
    }

    /// `parse`, with the user and password (when given) put into the AMQP URI, encoded.
    pub fn with_credentials(
        amqp_uri: &str,
        api_uri: &str,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, MigrateError> {
        let mut amqp = Url::parse(amqp_uri).map_err(|e| MigrateError::input(format!("AMQP URI: {e}")))?;
        if let Some(user) = username {
            amqp.set_username(&user).map_err(|_| MigrateError::input("AMQP URI cannot take a user"))?;
        }
        if let Some(password) = password {
            amqp.set_password(Some(&password)).map_err(|_| MigrateError::input("AMQP URI cannot take a password"))?;
        }
        Self::parse(amqp.as_str(), api_uri)
    }

    fn decoded(text: &str) -> String {
        percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
    }

    pub fn management(&self) -> Result<ManagementClient, MigrateError> {
        let user = Self::decoded(self.amqp.username());
        let password = Self::decoded(self.amqp.password().unwrap_or_default());
        ManagementClient::with_ca(self.api.as_str(), &user, &password, self.ca.as_deref()).map_err(|e| {
            MigrateError::new(
                MigratePhase::Preflight,
                MigrateReason::Broker(BrokerReason::BrokerClientError),
                e.to_string(),
            )
        })
    }

    /// The AMQP URI of one vhost.
    pub fn amqp_for(&self, vhost: &str) -> String {
        let mut url = self.amqp.clone();
        url.set_path(&format!("/{}", crate::rabbitmq::management::encode(vhost)));
        url.to_string()
    }
}

/// What `warren migrate` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Endpoint,
    pub target: Endpoint,
    /// Only these vhosts (all when empty).
    pub vhosts: Vec<String>,
    /// Only queues whose names match.
    pub queues: Option<Regex>,
    /// Declare durable classic queues as quorum queues, on any target (on a 4.x target they are
    /// converted anyway unless `keep_classic`).
    pub convert_to_quorum: bool,
    /// On a target without classic mirroring (4.x), keep classic queues classic: unreplicated.
    pub keep_classic: bool,
    /// Keep draining until the source has been empty for `idle_timeout`.
    pub follow: bool,
    pub idle_timeout: Duration,
    /// Wait this long for consumers to release the messages they hold unacknowledged.
    pub wait_for_consumers: Option<Duration>,
    /// Move what can be moved even though consumers hold messages.
    pub force: bool,
    pub dry_run: bool,
    /// Unconfirmed messages in flight per queue (also the source prefetch).
    pub window: u16,
    /// Queues moved at the same time.
    pub parallel_queues: usize,
    /// Bytes of messages in flight (delivered by the source, not yet confirmed by the target),
    /// shared by every queue moving at once; a larger message still moves, alone.
    pub max_in_flight_bytes: u64,
    /// Progress bars on stderr (a terminal) rather than per-queue logs only.
    pub progress: bool,
    /// How long a queue keeps reconnecting after losing a connection before it stops.
    pub reconnect_for: Duration,
}

impl Options {
    pub fn new(source: Endpoint, target: Endpoint) -> Self {
        Self {
            source,
            target,
            vhosts: Vec::new(),
            queues: None,
            convert_to_quorum: false,
            keep_classic: false,
            follow: false,
            idle_timeout: Duration::from_secs(30),
            wait_for_consumers: None,
            force: false,
            dry_run: false,
            window: 2000,
            parallel_queues: 8,
            max_in_flight_bytes: budget::default_bytes(),
            progress: false,
            reconnect_for: mover::DEFAULT_RECONNECT_FOR,
        }
    }
}

/// The phase a migration stopped in (lower case, as the report and the Job's summary name it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum MigratePhase {
    /// The command line or the resource: URIs, CA files.
    Input,
    /// Versions, vhosts, queues and their holders, before anything changes.
    Preflight,
    /// Export, conversion, the declarations tried and the import on the target.
    Definitions,
}

/// Why a migration stopped: a RabbitMigration's condition reason and the report's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr)]
pub enum MigrateReason {
    InvalidInput,
    /// A TLS peer's certificate did not verify against the CA given.
    TlsNotVerified,
    /// `--queues` matched no queue.
    QueuesMissing,
    /// A vhost asked for is missing on the source, or on the target whose user may not create it.
    VhostMissing,
    /// Consumers hold messages unacknowledged (Celery ETA tasks).
    MessagesHeldByConsumers,
    /// A queue exists on the target with other arguments.
    QueueMismatch,
    /// The target did not take the definitions as imported.
    DefinitionsNotImported,
    /// A management API or AMQP failure, by its reason.
    Broker(BrokerReason),
}

impl MigrateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrateReason::Broker(reason) => reason.as_str(),
            other => other.into(),
        }
    }

    /// The reason of a management client's error (which is always a broker error).
    pub fn of(error: &crate::error::Error) -> Self {
        match error {
            crate::error::Error::Broker { reason, .. } => MigrateReason::Broker(*reason),
            _ => MigrateReason::Broker(BrokerReason::BrokerBadResponse),
        }
    }
}

impl std::fmt::Display for MigrateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a migration stopped: the phase, a reason for conditions and metrics, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{phase}: {message}")]
pub struct MigrateError {
    pub phase: MigratePhase,
    pub reason: MigrateReason,
    pub message: String,
}

impl MigrateError {
    pub fn new(phase: MigratePhase, reason: MigrateReason, message: impl Into<String>) -> Self {
        Self { phase, reason, message: message.into() }
    }

    fn input(message: impl Into<String>) -> Self {
        Self::new(MigratePhase::Input, MigrateReason::InvalidInput, message)
    }
}

/// Runs every phase; a dry run stops after preflight and the definitions plan.
pub async fn migrate(options: &Options) -> Result<Report, MigrateError> {
    let source_api = options.source.management()?;
    let target_api = options.target.management()?;
    let plan = preflight::run(&source_api, &target_api, options).await?;
    let mut report = Report::from_plan(&plan, options.dry_run);
    if options.dry_run {
        return Ok(report);
    }
    report.definitions = definitions::import(&target_api, &plan).await?;
    // Before any message moves: would the apps' own declarations be accepted after the cutover?
    report.refused_declarations = declarations::check(options, &plan).await?;
    for refused in &report.refused_declarations {
        tracing::warn!(vhost = %refused.vhost, name = %refused.name, "the apps' declaration of this {} would be refused \
            by the target: {}; {}", refused.kind, refused.error, refused.advice);
    }
    tracing::info!(queues = plan.queues.len(), "definitions imported; moving messages");
    report.queues = mover::move_all(options, &plan.queues).await;
    if !options.follow {
        move_late_arrivals(options, &plan.queues, &mut report.queues).await;
    }
    report.finish();
    Ok(report)
}

/// Rounds after the first, at most.
const LATE_ROUNDS: usize = 3;

/// Messages that reached a queue after its move ended: dead-lettered from another queue that was
/// moving (a delay queue's TTL expiring into its work queue), or sent by a producer. A queue whose
/// move ended without error but left messages on the source is moved again, while rounds move
/// something (with `--follow` each queue waits for quiet instead).
async fn move_late_arrivals(options: &Options, plans: &[preflight::QueuePlan], reports: &mut [report::QueueReport]) {
    for round in 1..=LATE_ROUNDS {
        let again: Vec<preflight::QueuePlan> = plans
            .iter()
            .filter(|p| {
                reports
                    .iter()
                    .any(|q| q.vhost == p.vhost && q.name == p.name && q.error.is_none() && q.source_after > 0)
            })
            .cloned()
            .collect();
        if again.is_empty() {
            return;
        }
        tracing::info!(round, queues = again.len(), "messages arrived on the source during the move: moving them");
        let mut moved = 0;
        for late in mover::move_all(options, &again).await {
            let Some(report) = reports.iter_mut().find(|q| q.vhost == late.vhost && q.name == late.name) else {
                continue;
            };
            moved += late.moved;
            report.moved += late.moved;
            report.possible_duplicates += late.possible_duplicates;
            report.refused += late.refused;
            report.reconnects += late.reconnects;
            report.source_after = late.source_after;
            report.error = late.error;
        }
        if moved == 0 {
            return;
        }
    }
}

/// `30s`, `10m`, `1h`, `500ms` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected a duration such as 30s, 10m or 1h"))?;
    let seconds = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs(seconds))
}
