//! Which HA mechanism a cluster gets, from its spec and the RabbitMQ version it runs.

use serde_json::{Map, Value, json};

use super::version::RabbitVersion;
use crate::api::{HaMode, HighAvailabilityMode, HighAvailabilitySpec};
use crate::error::SpecReason;

/// What the broker reconcile makes true in every vhost.
#[derive(Clone, Debug, PartialEq)]
pub enum HaPlan {
    /// A classic mirroring policy (RabbitMQ 3.x).
    ClassicMirroring(MirroringPolicy),
    /// Quorum queues as the vhosts' default queue type; `vhost_key` is the field the version knows.
    QuorumDefault { vhost_key: &'static str, stale_policy: String },
    /// No HA: the operator's own mirroring policy, if any, is removed.
    Disabled { stale_policy: String },
}

/// The mirroring policy as the management API takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct MirroringPolicy {
    pub name: String,
    pub pattern: String,
    pub priority: i32,
    pub definition: Map<String, Value>,
}

/// Why a spec's HA mode cannot run on a version.
#[derive(Clone, Debug, PartialEq)]
pub struct HaRefusal {
    pub reason: SpecReason,
    pub message: String,
}

/// Resolves the spec's mode against the running (or image) version.
pub fn plan(spec: &HighAvailabilitySpec, version: RabbitVersion) -> Result<HaPlan, HaRefusal> {
    let mirroring = &spec.classic_mirroring;
    let stale_policy = mirroring.policy_name.clone();
    let quorum = |version: RabbitVersion| match version.vhost_default_queue_type_key() {
        Some(vhost_key) => Ok(HaPlan::QuorumDefault { vhost_key, stale_policy: stale_policy.clone() }),
        None => Err(HaRefusal {
            reason: SpecReason::QuorumDefaultUnsupported,
            message: format!(
                "highAvailability.mode Quorum needs RabbitMQ 3.11 or later to set a vhost's default queue type; \
                 this cluster runs {version}: use ClassicMirrored or Auto"
            ),
        }),
    };
    match spec.mode {
        HighAvailabilityMode::Auto if version.has_classic_mirroring() => {
            Ok(HaPlan::ClassicMirroring(mirroring_policy(spec)))
        }
        HighAvailabilityMode::Auto | HighAvailabilityMode::Quorum => quorum(version),
        HighAvailabilityMode::ClassicMirrored if version.has_classic_mirroring() => {
            Ok(HaPlan::ClassicMirroring(mirroring_policy(spec)))
        }
        HighAvailabilityMode::ClassicMirrored => Err(HaRefusal {
            reason: SpecReason::ClassicMirroringUnsupported,
            message: format!(
                "highAvailability.mode ClassicMirrored: RabbitMQ {version} has no classic queue mirroring \
                 (removed in 4.0); use Quorum or Auto"
            ),
        }),
        HighAvailabilityMode::None => Ok(HaPlan::Disabled { stale_policy }),
    }
}

fn mirroring_policy(spec: &HighAvailabilitySpec) -> MirroringPolicy {
    let mirroring = &spec.classic_mirroring;
    let mut definition = Map::new();
    match (mirroring.ha_mode, mirroring.ha_params) {
        (HaMode::Exactly, Some(copies)) => {
            definition.insert("ha-mode".into(), json!("exactly"));
            definition.insert("ha-params".into(), json!(copies));
        }
        _ => {
            definition.insert("ha-mode".into(), json!("all"));
        }
    }
    // Without automatic sync a new mirror stays empty until a human syncs it, so a node loss right
    // after a restart can still lose messages.
    definition.insert("ha-sync-mode".into(), json!("automatic"));
    MirroringPolicy {
        name: mirroring.policy_name.clone(),
        pattern: mirroring.pattern.clone(),
        priority: mirroring.priority,
        definition,
    }
}

/// Whether a policy definition holds classic mirroring keys (which RabbitMQ 4.x refuses).
pub fn is_mirroring_definition(definition: &Map<String, Value>) -> bool {
    definition.keys().any(|key| key.starts_with("ha-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ClassicMirroringSpec;

    fn spec(mode: HighAvailabilityMode) -> HighAvailabilitySpec {
        HighAvailabilitySpec { mode, classic_mirroring: ClassicMirroringSpec::default() }
    }

    #[test]
    fn auto_mirrors_on_3x_and_uses_quorum_on_4x() {
        let on_3 = plan(&spec(HighAvailabilityMode::Auto), RabbitVersion::new(3, 10, 8)).unwrap();
        let HaPlan::ClassicMirroring(policy) = on_3 else { panic!("expected mirroring, got {on_3:?}") };
        assert_eq!(policy.name, "ha-all");
        assert_eq!(policy.pattern, ".*");
        assert_eq!(
            serde_json::Value::Object(policy.definition),
            json!({"ha-mode": "all", "ha-sync-mode": "automatic"})
        );

        let on_4 = plan(&spec(HighAvailabilityMode::Auto), RabbitVersion::new(4, 1, 4)).unwrap();
        assert_eq!(on_4, HaPlan::QuorumDefault { vhost_key: "default_queue_type", stale_policy: "ha-all".into() });
    }

    #[test]
    fn exactly_n_sets_ha_params() {
        let mut ha = spec(HighAvailabilityMode::ClassicMirrored);
        ha.classic_mirroring.ha_mode = HaMode::Exactly;
        ha.classic_mirroring.ha_params = Some(2);
        let HaPlan::ClassicMirroring(policy) = plan(&ha, RabbitVersion::new(3, 13, 7)).unwrap() else {
            panic!("expected mirroring")
        };
        assert_eq!(
            serde_json::Value::Object(policy.definition),
            json!({"ha-mode": "exactly", "ha-params": 2, "ha-sync-mode": "automatic"})
        );
    }

    #[test]
    fn refuses_what_the_version_cannot_do() {
        let mirrored_on_4 = plan(&spec(HighAvailabilityMode::ClassicMirrored), RabbitVersion::new(4, 0, 1));
        assert_eq!(mirrored_on_4.unwrap_err().reason, SpecReason::ClassicMirroringUnsupported);
        let quorum_on_3_10 = plan(&spec(HighAvailabilityMode::Quorum), RabbitVersion::new(3, 10, 8));
        assert_eq!(quorum_on_3_10.unwrap_err().reason, SpecReason::QuorumDefaultUnsupported);
        assert_eq!(
            plan(&spec(HighAvailabilityMode::None), RabbitVersion::new(3, 10, 8)).unwrap(),
            HaPlan::Disabled { stale_policy: "ha-all".into() }
        );
    }
}
