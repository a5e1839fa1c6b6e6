//! The operator's errors. Each becomes a status condition reason and a Kubernetes Event.

/// Why a spec (or a manifest) is refused; each name is the condition reason Kubernetes shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::Display)]
pub enum SpecReason {
    InvalidSpec,
    InvalidName,
    InvalidReplicas,
    InvalidImage,
    InvalidStorage,
    InvalidResources,
    InvalidPlugin,
    InvalidTls,
    InvalidHighAvailability,
    InvalidConfig,
    /// `warren render`: the file is not a RabbitCluster.
    InvalidManifest,
    /// Classic mirroring asked of RabbitMQ 4.x, where it no longer exists.
    ClassicMirroringUnsupported,
    /// Quorum as the default queue type asked of a version without per-vhost defaults.
    QuorumDefaultUnsupported,
    /// A RabbitMigration names a Secret not meant for migrations (no opt-in label).
    CredentialsNotPermitted,
    /// A RabbitMigration names a Job image while the operator runs only its own.
    ImageNotPermitted,
    /// spec.tls.interNode changed while pods run: old and new nodes could not reach each other.
    InterNodeTlsChange,
}

/// Why the management API failed; each name is the condition reason Kubernetes shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::IntoStaticStr, strum::Display)]
pub enum BrokerReason {
    BrokerUnreachable,
    BrokerTimeout,
    BrokerUnauthorized,
    BrokerUnavailable,
    BrokerRejected,
    BrokerBadResponse,
    /// The HTTP client could not be built (a bad URL or TLS setting).
    BrokerClientError,
}

impl SpecReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl BrokerReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Everything that can stop a reconcile. Its snake-case name is the `error` label of the failure
/// metrics.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Error {
    /// The spec asks for something only reconcile can see is wrong; nothing is changed.
    #[error("{message}")]
    InvalidSpec { reason: SpecReason, message: String },

    /// A Secret the spec names does not exist or lacks a key.
    #[error("Secret {name}: {message}")]
    SecretMissing { name: String, message: String },

    /// Removing the next node would lose messages or a queue: held until the user acts (or the
    /// queues drain); `why` names them.
    #[error("{why}; the StatefulSet keeps {current} replicas (set spec.replicas back to {current} to call it off)")]
    ScaleDownRefused { current: i32, desired: i32, why: String },

    /// A rabbitmqctl-level command in a pod failed or could not run.
    #[error("pod {pod}: `{command}`: {message}")]
    NodeCommand { pod: String, command: String, message: String },

    /// spec.image names a RabbitMQ version the running cluster cannot move to in place.
    #[error(
        "spec.image changes RabbitMQ from {from} to {to}: {why}. Set spec.image back to {from} (or to the next \
         minor version), or create a new RabbitCluster on {to} and move queues, messages and definitions \
         there with a RabbitMigration"
    )]
    UpgradeRefused { from: String, to: String, why: String },

    /// Another field manager owns a field the operator applies.
    #[error("{object}: field conflict with another manager: {message}")]
    ApplyConflict { object: String, message: String },

    /// A Kubernetes API call failed.
    #[error("{action}: {source}")]
    #[strum(serialize = "kube_api")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },

    /// An object could not be turned into JSON (or back): a bug to report, never the user's spec;
    /// retried, as with any failure that is not the spec's.
    #[error("serialising {what}: {message}")]
    Serialization { what: String, message: String },

    /// The RabbitMQ management API refused, failed or could not be reached.
    #[error("RabbitMQ management API ({what}): {message}")]
    #[strum(serialize = "broker_api")]
    Broker { reason: BrokerReason, what: String, message: String },
}

impl Error {
    /// Wraps a kube error with what was being done.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube { action: action.into(), source }
    }

    /// The condition and Event reason (CamelCase, as Kubernetes expects).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec { reason, .. } => reason.as_str(),
            Error::SecretMissing { .. } => "SecretMissing",
            Error::ScaleDownRefused { .. } => "ScaleDownRefused",
            Error::NodeCommand { .. } => "NodeCommandFailed",
            Error::UpgradeRefused { .. } => "UpgradeRefused",
            Error::ApplyConflict { .. } => "FieldConflict",
            Error::Kube { .. } => "KubernetesApiError",
            Error::Serialization { .. } => "SerializationFailed",
            Error::Broker { reason, .. } => reason.as_str(),
        }
    }

    /// A short static label for metrics.
    pub fn metric_label(&self) -> &'static str {
        self.into()
    }

    /// Whether retrying without a spec change can help. Errors in the spec wait for the user; a
    /// refused scale-down is looked at again, as consumers may empty the queues that hold it.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, Error::InvalidSpec { .. } | Error::UpgradeRefused { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_the_variants_in_snake_case() {
        let text = |s: &str| s.to_string();
        let labels: Vec<&str> = [
            Error::InvalidSpec { reason: SpecReason::InvalidName, message: text("m") },
            Error::SecretMissing { name: text("s"), message: text("m") },
            Error::ScaleDownRefused { current: 3, desired: 1, why: text("w") },
            Error::NodeCommand { pod: text("p"), command: text("c"), message: text("m") },
            Error::UpgradeRefused { from: text("a"), to: text("b"), why: text("w") },
            Error::ApplyConflict { object: text("o"), message: text("m") },
            Error::Serialization { what: text("w"), message: text("m") },
            Error::Broker { reason: BrokerReason::BrokerTimeout, what: text("w"), message: text("m") },
        ]
        .iter()
        .map(Error::metric_label)
        .collect();
        assert_eq!(
            labels,
            [
                "invalid_spec",
                "secret_missing",
                "scale_down_refused",
                "node_command",
                "upgrade_refused",
                "apply_conflict",
                "serialization",
                "broker_api"
            ]
        );
    }
}
