//! RabbitMQ's version rules, in one place.

use std::fmt;

/// A RabbitMQ release, `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RabbitVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl RabbitVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self { major, minor, patch }
    }

    /// Parses `3.10.8`, `4.1`, `4.1.4-management`, `3.13.7-alpine`: the leading numeric part.
    pub fn parse(text: &str) -> Option<Self> {
        let numeric = text.trim().trim_start_matches('v');
        let numeric = numeric.split(['-', '+', '~']).next()?;
        let mut parts = numeric.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        Some(Self { major, minor, patch })
    }

    /// The version an image reference names through its tag, if it does
    /// (`rabbitmq:4.1.4-management` yes; `rabbitmq:management` or a digest no).
    pub fn from_image(image: &str) -> Option<Self> {
        let without_digest = image.split('@').next()?;
        let last_segment = without_digest.rsplit('/').next()?;
        let (_, tag) = last_segment.split_once(':')?;
        Self::parse(tag)
    }

    /// Classic queue mirroring (`ha-*` policy keys) was removed in 4.0: policies with them are refused.
    pub fn has_classic_mirroring(self) -> bool {
        self.major < 4
    }

    /// A vhost's default queue type: `default_queue_type` from 3.11.12 (earlier 3.11 spelled it
    /// `defaultqueuetype`, before 3.11 it does not exist).
    pub fn vhost_default_queue_type_key(self) -> Option<&'static str> {
        if self >= Self::new(3, 11, 12) {
            Some("default_queue_type")
        } else if self >= Self::new(3, 11, 0) {
            Some("defaultqueuetype")
        } else {
            None
        }
    }

    /// `cluster_partition_handling` is accepted but has no effect from 4.3 (Khepri only, Raft majority).
    pub fn honours_partition_handling(self) -> bool {
        self < Self::new(4, 3, 0)
    }
}

/// Why a running cluster cannot move to another version in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeRefusal(pub String);

impl RabbitVersion {
    /// Whether a running cluster may change from `self` to `to` by rolling its pods. RabbitMQ
    /// upgrades one minor at a time, never skips one (3.13 is the way into 4.x, to 4.0, 4.1 or
    /// 4.2), and never goes back to an older release: its feature flags and metadata only move
    /// forward (RabbitMQ's upgrade guide).
    pub fn in_place_change_to(self, to: RabbitVersion) -> Result<(), UpgradeRefusal> {
        let same_minor = (self.major, self.minor) == (to.major, to.minor);
        let next_minor = self.major == to.major && to.minor == self.minor + 1;
        let into_4 = (self.major, self.minor) == (3, 13) && to.major == 4 && to.minor <= 2;
        if to < self {
            Err(UpgradeRefusal(format!(
                "RabbitMQ cannot go back from {self} to {to} in place: enabled feature flags and migrated \
                 metadata only move forward"
            )))
        } else if same_minor || next_minor || into_4 {
            Ok(())
        } else {
            Err(UpgradeRefusal(format!(
                "RabbitMQ upgrades one minor version at a time, and {self} to {to} skips {}",
                skipped(self, to)
            )))
        }
    }
}

impl RabbitVersion {
    /// Of the stable feature flags still disabled, those that stop a move from `self` to `to`:
    /// RabbitMQ boots a later minor only with the flags of the one before it enabled (the feature
    /// flags guide: 4.2 requires 3.13's, 4.3 all of 4.2's), and 4.3, which has no Mnesia, only on a
    /// cluster whose metadata is in Khepri already (`khepri_db`).
    pub fn flags_blocking(self, to: RabbitVersion, disabled: &[String]) -> Vec<String> {
        if (to.major, to.minor) <= (self.major, self.minor) {
            return Vec::new();
        }
        disabled.iter().filter(|f| f.as_str() != "khepri_db" || to >= Self::new(4, 3, 0)).cloned().collect()
    }
}

/// The minor versions between `from` and `to`, for messages (`3.11, 3.12, 3.13`, `4.1, 4.2`).
fn skipped(from: RabbitVersion, to: RabbitVersion) -> String {
    if from.major == to.major {
        ((from.minor + 1)..to.minor).map(|m| format!("{}.{m}", to.major)).collect::<Vec<_>>().join(", ")
    } else if from.major == 3 && to.major == 4 {
        let mut steps: Vec<String> = ((from.minor + 1)..=13).map(|m| format!("3.{m}")).collect();
        if to.minor > 2 {
            steps.extend((2..to.minor).map(|m| format!("4.{m}")));
        }
        steps.join(", ")
    } else {
        format!("the releases between {}.{} and {}.{}", from.major, from.minor, to.major, to.minor)
    }
}

impl fmt::Display for RabbitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions_and_image_tags() {
        assert_eq!(RabbitVersion::parse("3.10.8"), Some(RabbitVersion::new(3, 10, 8)));
        assert_eq!(RabbitVersion::parse("4.1"), Some(RabbitVersion::new(4, 1, 0)));
        assert_eq!(RabbitVersion::parse("management"), None);
        assert_eq!(RabbitVersion::from_image("rabbitmq:4.1.4-management"), Some(RabbitVersion::new(4, 1, 4)));
        assert_eq!(
            RabbitVersion::from_image("registry.local:5000/team/rabbitmq:3.13.7-alpine"),
            Some(RabbitVersion::new(3, 13, 7))
        );
        assert_eq!(RabbitVersion::from_image("registry.local:5000/rabbitmq"), None);
        assert_eq!(RabbitVersion::from_image("rabbitmq:management"), None);
        assert_eq!(RabbitVersion::from_image("rabbitmq@sha256:abcd"), None);
    }

    #[test]
    fn rules_follow_the_release_notes() {
        let v3_10 = RabbitVersion::new(3, 10, 8);
        let v3_11_5 = RabbitVersion::new(3, 11, 5);
        let v3_13 = RabbitVersion::new(3, 13, 7);
        let v4_0 = RabbitVersion::new(4, 0, 0);
        let v4_3 = RabbitVersion::new(4, 3, 0);
        assert!(v3_10.has_classic_mirroring() && v3_13.has_classic_mirroring());
        assert!(!v4_0.has_classic_mirroring());
        assert_eq!(v3_10.vhost_default_queue_type_key(), None);
        assert_eq!(v3_11_5.vhost_default_queue_type_key(), Some("defaultqueuetype"));
        assert_eq!(v3_13.vhost_default_queue_type_key(), Some("default_queue_type"));
        assert!(v4_0.honours_partition_handling());
        assert!(!v4_3.honours_partition_handling());
    }

    #[test]
    fn a_later_minor_waits_for_the_flags_it_requires() {
        let v = |text: &str| RabbitVersion::parse(text).unwrap();
        let disabled = vec!["khepri_db".to_string(), "message_containers".to_string()];
        assert_eq!(v("4.2.3").flags_blocking(v("4.3.6"), &disabled), disabled);
        // Before 4.3 Mnesia still exists: khepri_db is not required.
        assert_eq!(v("4.1.4").flags_blocking(v("4.2.0"), &disabled), ["message_containers"]);
        // A patch release, or going back to what runs, requires nothing new.
        assert!(v("4.2.3").flags_blocking(v("4.2.9"), &disabled).is_empty());
        assert!(v("4.2.3").flags_blocking(v("4.2.3"), &disabled).is_empty());
        assert!(v("4.2.3").flags_blocking(v("4.3.6"), &[]).is_empty());
    }

    #[test]
    fn upgrades_go_one_minor_at_a_time_and_never_down() {
        let v = |text: &str| RabbitVersion::parse(text).unwrap();
        let allowed = [
            ("3.10.8", "3.10.8"),
            ("3.10.8", "3.10.25"),
            ("3.10.25", "3.11.0"),
            ("3.13.7", "4.0.5"),
            ("3.13.7", "4.2.1"),
            ("4.0.5", "4.1.0"),
            ("4.2.3", "4.3.6"),
        ];
        for (from, to) in allowed {
            assert_eq!(v(from).in_place_change_to(v(to)), Ok(()), "{from} -> {to}");
        }
        let refused = [
            ("3.10.8", "4.0.5", "skips 3.11, 3.12, 3.13"),
            ("3.12.1", "4.3.6", "skips 3.13, 4.2"),
            ("4.0.5", "4.3.6", "skips 4.1, 4.2"),
            ("3.10.8", "3.12.0", "skips 3.11"),
            ("4.3.6", "4.0.5", "cannot go back from 4.3.6 to 4.0.5"),
            ("4.0.5", "4.0.4", "cannot go back"),
            ("4.0.5", "3.13.7", "cannot go back"),
        ];
        for (from, to, says) in refused {
            let refusal = v(from).in_place_change_to(v(to)).expect_err(&format!("{from} -> {to}"));
            assert!(refusal.0.contains(says), "{from} -> {to}: {}", refusal.0);
        }
    }
}
