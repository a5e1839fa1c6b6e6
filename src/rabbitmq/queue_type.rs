//! A queue's type as RabbitMQ names it: in `x-queue-type`, the `type` of the management API, and
//! a vhost's default queue type.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `classic`, `quorum`, `stream`, or one RabbitMQ adds later (kept by its name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
    Stream,
    Other(String),
}

impl QueueType {
    pub fn parse(name: &str) -> Self {
        match name {
            "classic" => Self::Classic,
            "quorum" => Self::Quorum,
            "stream" => Self::Stream,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
            Self::Stream => "stream",
            Self::Other(name) => name,
        }
    }

    /// Replicated by its type, whatever the policies say (quorum queues and streams).
    pub fn is_replicated(&self) -> bool {
        matches!(self, Self::Quorum | Self::Stream)
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for QueueType {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for QueueType {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for QueueType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_types_are_kept() {
        for name in ["classic", "quorum", "stream", "delayed"] {
            let parsed: QueueType = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(serde_json::to_value(&parsed).unwrap(), name);
        }
        assert_eq!(QueueType::parse("delayed"), QueueType::Other("delayed".into()));
        assert!(QueueType::Quorum.is_replicated() && QueueType::Stream.is_replicated());
        assert!(!QueueType::Classic.is_replicated());
    }
}
