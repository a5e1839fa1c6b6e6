//! Phase 2: definitions exported from the source, converted for the target, imported, verified.

use serde_json::{Value, json};

use super::model::{Definitions, Exchange, Policy, Queue, Vhost};
use super::preflight::Plan;
use super::{MigrateError, MigratePhase, MigrateReason, Options};
use crate::error::BrokerReason;
use crate::rabbitmq::management::ManagementClient;
use crate::rabbitmq::queue_type::QueueType;
use crate::rabbitmq::version::RabbitVersion;

/// Classic-only queue arguments that quorum queues refuse, and that a quorum queue does without
/// (it is always on disk, places its own leader, has one storage version).
const CLASSIC_ONLY_ARGUMENTS: [&str; 3] = ["x-queue-mode", "x-queue-master-locator", "x-queue-version"];

/// Why a queue is not replicated on a target without classic mirroring.
#[derive(Clone, Debug, PartialEq)]
pub enum HaLostReason {
    NotDurable,
    AutoDelete,
    Exclusive,
    /// `x-max-priority` with its levels.
    Priorities(Value),
    RejectPublishDlx,
    /// `--keep-classic` (or `keepClassic`), on a target of this version.
    KeptClassic(RabbitVersion),
}

impl std::fmt::Display for HaLostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotDurable => f.write_str("not durable: quorum queues are durable only"),
            Self::AutoDelete => f.write_str("auto-delete: a quorum queue cannot be"),
            Self::Exclusive => f.write_str("exclusive: a quorum queue cannot be"),
            Self::Priorities(levels) => write!(
                f,
                "x-max-priority {levels}: quorum queues know two priorities only (from RabbitMQ 4.0: above 4, and \
                 the rest), so the delivery order would change"
            ),
            Self::RejectPublishDlx => f.write_str("x-overflow reject-publish-dlx: quorum queues do not support it"),
            Self::KeptClassic(target) => {
                write!(f, "kept classic as asked (--keep-classic), and RabbitMQ {target} has no classic mirroring")
            }
        }
    }
}

impl serde::Serialize for HaLostReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A queue that is not replicated on the target although it may have been on the source: a
/// classic queue on a target without classic mirroring (RabbitMQ 4.x), and why it stayed classic.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HaLost {
    pub vhost: String,
    pub name: String,
    pub reason: HaLostReason,
}

impl std::fmt::Display for HaLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {} in vhost {} is not replicated on the target (HA lost): {}",
            self.name, self.vhost, self.reason
        )
    }
}

/// The definitions converted for the target, with what the conversion changed or could not.
#[derive(Clone, Debug)]
pub struct Conversion {
    pub definitions: Definitions,
    pub notes: Vec<String>,
    /// Queues left unreplicated on a target without classic mirroring.
    pub ha_lost: Vec<HaLost>,
    /// The selected queues as the source has them: what the apps declare.
    pub app_queues: Vec<Queue>,
    /// The selected exchanges the apps declare (not the built-in `amq.*` and default ones).
    pub app_exchanges: Vec<Exchange>,
}

/// Whether durable classic queues become quorum queues: when asked, and by default on a target
/// without classic mirroring (4.x), where a classic queue has no replica at all.
pub fn converts_to_quorum(options: &Options, target: RabbitVersion) -> bool {
    options.convert_to_quorum || (!target.has_classic_mirroring() && !options.keep_classic)
}

/// Why a classic queue cannot become a quorum queue with the same behaviour, if it cannot.
fn quorum_obstacle(queue: &Queue) -> Option<HaLostReason> {
    if !queue.durable {
        Some(HaLostReason::NotDurable)
    } else if queue.auto_delete {
        Some(HaLostReason::AutoDelete)
    } else if queue.exclusive {
        Some(HaLostReason::Exclusive)
    } else if let Some(levels) = queue.arguments.get("x-max-priority") {
        Some(HaLostReason::Priorities(levels.clone()))
    } else if queue.arguments.get("x-overflow").is_some_and(|o| o == "reject-publish-dlx") {
        Some(HaLostReason::RejectPublishDlx)
    } else {
        None
    }
}

/// What the import did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DefinitionsReport {
    pub vhosts: usize,
    pub queues: usize,
    pub exchanges: usize,
    pub bindings: usize,
    pub policies: usize,
    pub users: usize,
    pub notes: Vec<String>,
    /// The target's own objects the source's would have replaced, kept, by name.
    pub conflicts: Vec<String>,
}

/// Whether the policy that applies to `queue` (the highest priority of those in its vhost whose
/// pattern matches its name) mirrors it (`ha-mode`).
pub fn mirrored_by_policy(definitions: &Definitions, queue: &Queue) -> bool {
    definitions.policies.iter().filter(|p| p.applies_to(queue)).max_by_key(|p| p.priority).is_some_and(Policy::mirrors)
}

/// Keeps the selected vhosts and queues, and converts what the target's version needs.
pub fn convert(exported: &Definitions, options: &Options, target: RabbitVersion) -> Conversion {
    let mut notes = Vec::new();
    let mut ha_lost = Vec::new();
    let in_vhost = |vhost: &str| options.vhosts.is_empty() || options.vhosts.iter().any(|v| v == vhost);
    let selected_queue =
        |q: &&Queue| in_vhost(&q.vhost) && options.queues.as_ref().is_none_or(|re| re.is_match(&q.name));
    let app_queues: Vec<Queue> = exported.queues.iter().filter(selected_queue).cloned().collect();
    let queues: Vec<Queue> =
        app_queues.iter().map(|q| convert_queue(q, options, target, &mut notes, &mut ha_lost)).collect();
    let bindings = exported
        .bindings
        .iter()
        .filter(|b| in_vhost(&b.vhost))
        .filter(|b| b.destination_type != "queue" || queues.iter().any(|q| q.key() == (&b.vhost, &b.destination)))
        .cloned()
        .collect();
    let parameters = exported
        .parameters
        .iter()
        .filter(|p| in_vhost(&p.vhost))
        .filter(|p| {
            if p.moves_messages() {
                notes.push(format!(
                    "parameter {}/{:?}: not imported (it would move or copy messages)",
                    p.component, p.name
                ));
            }
            !p.moves_messages()
        })
        .cloned()
        .collect();
    let policies = exported
        .policies
        .iter()
        .filter(|p| in_vhost(&p.vhost))
        .filter_map(|p| convert_policy(p, target, &mut notes))
        .collect();
    let exchanges: Vec<Exchange> = exported.exchanges.iter().filter(|e| in_vhost(&e.vhost)).cloned().collect();
    let app_exchanges = exchanges.iter().filter(|e| e.declared_by_apps()).cloned().collect();
    let converted = Definitions {
        users: exported.users.clone(),
        vhosts: exported.vhosts.iter().filter(|v| in_vhost(&v.name)).map(|v| convert_vhost(v, target)).collect(),
        permissions: exported.permissions.iter().filter(|p| in_vhost(&p.vhost)).cloned().collect(),
        topic_permissions: exported.topic_permissions.iter().filter(|p| in_vhost(&p.vhost)).cloned().collect(),
        parameters,
        policies,
        queues,
        exchanges,
        bindings,
        rest: Default::default(),
    };
    ha_lost.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    Conversion { definitions: converted, notes, ha_lost, app_queues, app_exchanges }
}

/// A vhost as the target creates it when it lacks it (one it has is not imported, see `import`):
/// on a target without classic mirroring its default queue type is quorum, so that what apps
/// declare there without a type is replicated.
fn convert_vhost(vhost: &Vhost, target: RabbitVersion) -> Vhost {
    let mut vhost = vhost.clone();
    if !target.has_classic_mirroring()
        && let Some(key) = target.vhost_default_queue_type_key()
    {
        vhost.rest.insert(key.into(), json!(QueueType::Quorum));
        let metadata = vhost.rest.entry("metadata").or_insert_with(|| json!({}));
        if let Some(metadata) = metadata.as_object_mut() {
            metadata.insert(key.into(), json!(QueueType::Quorum));
        }
    }
    vhost
}

/// A queue as the target declares it: quorum when converting and possible (classic-only arguments
/// dropped), its type always explicit where vhosts have a default queue type.
fn convert_queue(
    queue: &Queue,
    options: &Options,
    target: RabbitVersion,
    notes: &mut Vec<String>,
    ha_lost: &mut Vec<HaLost>,
) -> Queue {
    let mut queue = queue.clone();
    let mut queue_type = queue.kind();
    let converts = converts_to_quorum(options, target);
    if queue_type == QueueType::Classic && (converts || !target.has_classic_mirroring()) {
        let obstacle = if converts { quorum_obstacle(&queue) } else { Some(HaLostReason::KeptClassic(target)) };
        match obstacle {
            None => {
                for key in CLASSIC_ONLY_ARGUMENTS {
                    if queue.arguments.remove(key).is_some() {
                        notes.push(format!("queue {}: dropped {key}, which quorum queues do not support", queue.name));
                    }
                }
                queue_type = QueueType::Quorum;
                notes.push(format!("queue {}: declared as a quorum queue", queue.name));
            }
            Some(reason) if !target.has_classic_mirroring() => {
                ha_lost.push(HaLost { vhost: queue.vhost.clone(), name: queue.name.clone(), reason });
            }
            // A 3.x target mirrors it as its policies say.
            Some(reason) => notes.push(format!("queue {}: stays a classic queue ({reason})", queue.name)),
        }
    }
    // A vhost's default queue type applies to queues declared without one: each queue says
    // its type, or an operator-managed 4.x target (quorum by default) would make a classic
    // queue quorum, and a 3.x one a quorum queue classic.
    if queue_type != QueueType::Classic || target.vhost_default_queue_type_key().is_some() {
        queue.arguments.insert("x-queue-type".into(), json!(queue_type));
    }
    queue
}

/// A policy for the target: without `ha-*` keys from 4.0 (none at all when nothing is left).
fn convert_policy(policy: &Policy, target: RabbitVersion, notes: &mut Vec<String>) -> Option<Policy> {
    let mut policy = policy.clone();
    if !target.has_classic_mirroring() {
        let stripped: Vec<String> = policy.definition.keys().filter(|k| k.starts_with("ha-")).cloned().collect();
        for key in &stripped {
            policy.definition.remove(key);
        }
        if !stripped.is_empty() {
            notes.push(format!(
                "policy {}: removed {} (classic mirroring does not exist from RabbitMQ 4.0)",
                policy.name,
                stripped.join(", ")
            ));
        }
        if policy.definition.is_empty() {
            notes.push(format!("policy {}: not imported, nothing left in it", policy.name));
            return None;
        }
    }
    Some(policy)
}

fn fail(reason: MigrateReason, message: impl Into<String>) -> MigrateError {
    MigrateError::new(MigratePhase::Definitions, reason, message)
}

/// Leaves the target's own vhosts, policies and runtime parameters as they are: an import of a
/// vhost the target has would overwrite its metadata (its default queue type, description, tags,
/// limits), of a policy the target has, its definition, and of a parameter (vhost limits, an
/// operator policy), its value. A vhost the target has is left out; a policy or parameter it has
/// the same is left out quietly, one it has otherwise is left out and named as a conflict.
fn keep_targets_own(
    current: &Definitions,
    definitions: &mut Definitions,
    notes: &mut Vec<String>,
    conflicts: &mut Vec<String>,
) {
    definitions.vhosts.retain(|v| {
        let exists = current.vhosts.iter().any(|t| t.name == v.name);
        if exists {
            notes.push(format!(
                "vhost {:?}: exists on the target, its settings (default queue type, description, tags) left as they are",
                v.name
            ));
        }
        !exists
    });
    definitions.policies.retain(|p| {
        let Some(theirs) = current.policies.iter().find(|t| t.vhost == p.vhost && t.name == p.name) else {
            return true;
        };
        if !theirs.same_as(p) {
            conflicts.push(format!(
                "policy {:?} in vhost {:?}: the target has its own (pattern {:?}, definition {}), kept; the \
                 source's (pattern {:?}, definition {}) was not imported",
                p.name,
                p.vhost,
                theirs.pattern,
                Value::Object(theirs.definition.clone()),
                p.pattern,
                Value::Object(p.definition.clone())
            ));
        }
        false
    });
    // Runtime parameters: vhost limits, operator policies, and the like. One the target has is
    // kept as it is, and named as a conflict when the source's differs.
    definitions.parameters.retain(|p| {
        let Some(theirs) =
            current.parameters.iter().find(|t| (&t.vhost, &t.component, &t.name) == (&p.vhost, &p.component, &p.name))
        else {
            return true;
        };
        if theirs.rest != p.rest {
            conflicts.push(format!(
                "{} {:?} in vhost {:?}: the target has its own ({}), kept; the source's ({}) was not imported",
                p.component,
                p.name,
                p.vhost,
                Value::Object(theirs.rest.clone()),
                Value::Object(p.rest.clone())
            ));
        }
        false
    });
}

/// The target's definitions.
async fn target_definitions(target: &ManagementClient) -> Result<Definitions, MigrateError> {
    let current =
        target.get("/api/definitions").await.map_err(|e| fail(MigrateReason::of(&e), format!("target: {e}")))?;
    serde_json::from_value(current.unwrap_or_else(|| json!({}))).map_err(|e| {
        fail(MigrateReason::Broker(BrokerReason::BrokerBadResponse), format!("target: GET /api/definitions: {e}"))
    })
}

/// Imports the converted definitions (users that already exist on the target are left as they
/// are, with their permissions), then checks every vhost, queue, exchange, binding and policy is
/// there.
pub async fn import(target: &ManagementClient, plan: &Plan) -> Result<DefinitionsReport, MigrateError> {
    let current = target_definitions(target).await?;
    let mut definitions = plan.definitions.clone();
    let mut notes = plan.notes.clone();
    definitions.users.retain(|u| {
        let exists = current.users.iter().any(|t| t.name == u.name);
        if exists {
            notes.push(format!("user {:?}: exists on the target, left unchanged", u.name));
        }
        !exists
    });
    let imported_users: Vec<String> = definitions.users.iter().map(|u| u.name.clone()).collect();
    definitions.permissions.retain(|p| imported_users.contains(&p.user));
    definitions.topic_permissions.retain(|p| imported_users.contains(&p.user));
    let mut conflicts = Vec::new();
    keep_targets_own(&current, &mut definitions, &mut notes, &mut conflicts);
    target
        .post("/api/definitions", &json!(definitions))
        .await
        .map_err(|e| fail(MigrateReason::of(&e), format!("import: {e}")))?;

    let present = target_definitions(target).await?.identities();
    let missing: Vec<String> = definitions.identities().into_iter().filter(|i| !present.contains(i)).collect();
    if !missing.is_empty() {
        return Err(fail(
            MigrateReason::DefinitionsNotImported,
            format!("missing on the target after import: {}", missing.join("; ")),
        ));
    }
    Ok(DefinitionsReport {
        vhosts: definitions.vhosts.len(),
        queues: definitions.queues.len(),
        exchanges: definitions.exchanges.len(),
        bindings: definitions.bindings.len(),
        policies: definitions.policies.len(),
        users: imported_users.len(),
        notes,
        conflicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::Endpoint;

    fn options() -> Options {
        let source = Endpoint::parse("amqp://u:p@old:5672", "http://old:15672").unwrap();
        let target = Endpoint::parse("amqp://u:p@new:5672", "http://new:15672").unwrap();
        Options::new(source, target)
    }

    fn exported_json() -> Value {
        json!({
            "vhosts": [{"name": "/"}, {"name": "other"}],
            "policies": [
                {"vhost": "/", "name": "ha-all", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}},
                {"vhost": "/", "name": "ttl", "pattern": "^jobs", "apply-to": "queues", "priority": 1,
                 "definition": {"ha-mode": "exactly", "ha-params": 2, "message-ttl": 60000}}
            ],
            "queues": [
                {"vhost": "/", "name": "jobs", "durable": true, "auto_delete": false,
                 "arguments": {"x-queue-mode": "lazy", "x-max-length": 10}},
                {"vhost": "/", "name": "scratch", "durable": false, "auto_delete": true, "arguments": {}},
                {"vhost": "/", "name": "urgent", "durable": true, "auto_delete": false, "arguments": {"x-max-priority": 9}},
                {"vhost": "other", "name": "elsewhere", "durable": true, "auto_delete": false, "arguments": {}}
            ],
            "bindings": [
                {"vhost": "/", "source": "amq.topic", "destination": "jobs", "destination_type": "queue", "routing_key": "j.#", "arguments": {}},
                {"vhost": "other", "source": "amq.topic", "destination": "elsewhere", "destination_type": "queue", "routing_key": "#", "arguments": {}}
            ],
            "parameters": [{"vhost": "/", "component": "shovel", "name": "old-shovel", "value": {}}]
        })
    }

    fn typed(definitions: Value) -> Definitions {
        serde_json::from_value(definitions).unwrap()
    }

    fn exported() -> Definitions {
        typed(exported_json())
    }

    /// The converted definitions, as JSON.
    fn json_of(conversion: &Conversion) -> Value {
        serde_json::to_value(&conversion.definitions).unwrap()
    }

    #[test]
    fn a_4x_target_gets_no_ha_keys_and_no_empty_policies() {
        let v4 = RabbitVersion::parse("4.1.4").unwrap();
        let conversion = convert(&exported(), &options(), v4);
        let (converted, notes) = (json_of(&conversion), conversion.notes);
        let policies = converted["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 1, "{policies:?}");
        assert_eq!(policies[0]["name"], "ttl");
        assert_eq!(policies[0]["definition"], json!({"message-ttl": 60000}));
        assert!(notes.iter().any(|n| n.contains("policy ha-all: not imported")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("old-shovel")), "{notes:?}");
        assert!(converted["parameters"].as_array().unwrap().is_empty());
    }

    #[test]
    fn a_4x_target_gets_quorum_queues_by_default_and_every_unreplicated_queue_is_named() {
        let v4 = RabbitVersion::parse("4.3.6").unwrap();
        let conversion = convert(&exported(), &options(), v4);
        let (converted, ha_lost) = (json_of(&conversion), conversion.ha_lost);
        let types: Vec<(&Value, &Value)> = converted["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| (&q["name"], &q["arguments"]["x-queue-type"]))
            .collect();
        assert_eq!(
            types,
            [
                (&json!("jobs"), &json!("quorum")),
                (&json!("scratch"), &json!("classic")),
                (&json!("urgent"), &json!("classic")),
                (&json!("elsewhere"), &json!("quorum"))
            ]
        );
        let lost: Vec<String> = ha_lost.iter().map(ToString::to_string).collect();
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert_eq!(
            lost[0],
            "queue scratch in vhost / is not replicated on the target (HA lost): not durable: quorum queues are \
             durable only"
        );
        assert!(
            lost[1].starts_with("queue urgent in vhost / is not replicated on the target (HA lost): x-max-priority")
        );
        // A vhost the migration creates defaults to quorum, as the target's own do.
        assert_eq!(converted["vhosts"][0]["default_queue_type"], "quorum");
        assert_eq!(converted["vhosts"][1]["metadata"]["default_queue_type"], "quorum");
    }

    #[test]
    fn keep_classic_keeps_them_classic_and_says_ha_is_lost_for_each() {
        let mut options = options();
        options.keep_classic = true;
        let conversion = convert(&exported(), &options, RabbitVersion::parse("4.3.6").unwrap());
        let (converted, ha_lost) = (json_of(&conversion), conversion.ha_lost);
        let types: Vec<&Value> =
            converted["queues"].as_array().unwrap().iter().map(|q| &q["arguments"]["x-queue-type"]).collect();
        assert!(types.iter().all(|t| *t == "classic"), "{types:?}");
        assert_eq!(ha_lost.len(), 4, "{ha_lost:?}");
        assert!(ha_lost[0].reason.to_string().contains("--keep-classic"), "{ha_lost:?}");
        // A 3.x target mirrors classic queues by policy: nothing converted, nothing lost, nothing pinned.
        let old = convert(&exported(), &self::options(), RabbitVersion::parse("3.10.8").unwrap());
        assert_eq!(json_of(&old)["queues"], exported_json()["queues"]);
        assert_eq!(json_of(&old)["vhosts"], exported_json()["vhosts"]);
        assert!(old.ha_lost.is_empty());
    }

    #[test]
    fn the_targets_own_vhosts_and_policies_are_kept_and_a_conflict_is_named() {
        let current = typed(json!({
            "vhosts": [{"name": "/", "default_queue_type": "quorum"}],
            "policies": [
                {"vhost": "/", "name": "ttl", "pattern": "^jobs", "apply-to": "queues", "priority": 1,
                 "definition": {"message-ttl": 1000}},
                {"vhost": "/", "name": "same", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}}
            ],
            "parameters": [
                {"vhost": "/", "component": "vhost-limits", "name": "limits", "value": {"max-connections": 100}},
                {"vhost": "/", "component": "operator_policy", "name": "cap",
                 "value": {"pattern": ".*", "definition": {"max-length": 1000}}}
            ]
        }));
        let mut definitions = typed(json!({
            "vhosts": [{"name": "/"}, {"name": "new"}],
            "policies": [
                {"vhost": "/", "name": "ttl", "pattern": "^jobs", "apply-to": "queues", "priority": 1,
                 "definition": {"message-ttl": 60000}},
                {"vhost": "/", "name": "same", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}},
                {"vhost": "new", "name": "other", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}}
            ],
            "parameters": [
                {"vhost": "/", "component": "vhost-limits", "name": "limits", "value": {"max-connections": 10}},
                {"vhost": "/", "component": "operator_policy", "name": "cap",
                 "value": {"pattern": ".*", "definition": {"max-length": 1000}}},
                {"vhost": "new", "component": "vhost-limits", "name": "limits", "value": {"max-queues": 10}}
            ]
        }));
        let (mut notes, mut conflicts) = (Vec::new(), Vec::new());
        keep_targets_own(&current, &mut definitions, &mut notes, &mut conflicts);
        let names: Vec<&str> = definitions.vhosts.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["new"]);
        let names: Vec<&str> = definitions.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["other"]);
        let kept: Vec<(&str, &str)> =
            definitions.parameters.iter().map(|p| (p.vhost.as_str(), p.name.as_str())).collect();
        assert_eq!(kept, [("new", "limits")], "the target's own limits and operator policy are kept");
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        assert!(conflicts[0].starts_with("policy \"ttl\" in vhost \"/\": the target has its own"), "{conflicts:?}");
        assert_eq!(
            conflicts[1],
            "vhost-limits \"limits\" in vhost \"/\": the target has its own ({\"value\":{\"max-connections\":100}}), \
             kept; the source's ({\"value\":{\"max-connections\":10}}) was not imported"
        );
        assert!(notes.iter().any(|n| n.starts_with("vhost \"/\": exists on the target")), "{notes:?}");
    }

    #[test]
    fn a_policy_with_ha_mode_marks_the_queues_it_matches_as_mirrored() {
        let exported = exported();
        let queue = |vhost: &str, name: &str| -> Queue {
            serde_json::from_value(json!({"vhost": vhost, "name": name})).unwrap()
        };
        assert!(mirrored_by_policy(&exported, &queue("/", "jobs")), "ttl (priority 1) mirrors exactly 2");
        assert!(mirrored_by_policy(&exported, &queue("/", "anything")), "ha-all");
        assert!(!mirrored_by_policy(&exported, &queue("other", "elsewhere")));
    }

    #[test]
    fn a_3x_target_keeps_mirroring_policies() {
        let v3 = RabbitVersion::parse("3.13.7").unwrap();
        let converted = json_of(&convert(&exported(), &options(), v3));
        assert_eq!(converted["policies"], exported_json()["policies"]);
    }

    #[test]
    fn convert_to_quorum_takes_durable_classic_queues_and_drops_classic_arguments() {
        let mut options = options();
        options.convert_to_quorum = true;
        options.vhosts = vec!["/".into()];
        let conversion = convert(&exported(), &options, RabbitVersion::parse("4.1.4").unwrap());
        let (converted, notes, ha_lost) = (json_of(&conversion), conversion.notes, conversion.ha_lost);
        let queues = converted["queues"].as_array().unwrap();
        assert_eq!(queues.len(), 3, "vhost filter: {queues:?}");
        assert_eq!(queues[0]["arguments"], json!({"x-queue-type": "quorum", "x-max-length": 10}));
        // Kept classic, and declared so on a target whose vhosts may default to quorum.
        assert_eq!(queues[1]["arguments"], json!({"x-queue-type": "classic"}));
        assert_eq!(queues[2]["arguments"], json!({"x-max-priority": 9, "x-queue-type": "classic"}));
        let kept: Vec<(&str, String)> = ha_lost.iter().map(|k| (k.name.as_str(), k.reason.to_string())).collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept[0], ("scratch", "not durable: quorum queues are durable only".to_string()));
        assert_eq!(kept[1].0, "urgent");
        assert!(kept[1].1.starts_with("x-max-priority 9: quorum queues know two priorities only"), "{kept:?}");
        assert!(notes.iter().any(|n| n.contains("jobs: dropped x-queue-mode")));
        assert_eq!(converted["bindings"].as_array().unwrap().len(), 1);
        assert_eq!(converted["vhosts"].as_array().unwrap().len(), 1);
        assert_eq!(converted["vhosts"][0]["name"], "/");
    }
}
