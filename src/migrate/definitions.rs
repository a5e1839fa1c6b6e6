//! Phase 2: definitions exported from the source, converted for the target, imported, verified.

use serde_json::{Map, Value, json};

use super::preflight::Plan;
use super::{MigrateError, Options};
use crate::rabbitmq::management::ManagementClient;
use crate::rabbitmq::version::RabbitVersion;

/// Classic-only queue arguments that quorum queues refuse, and that a quorum queue does without
/// (it is always on disk, places its own leader, has one storage version).
const CLASSIC_ONLY_ARGUMENTS: [&str; 3] = ["x-queue-mode", "x-queue-master-locator", "x-queue-version"];

/// A queue that is not replicated on the target although it may have been on the source: a
/// classic queue on a target without classic mirroring (RabbitMQ 4.x), and why it stayed classic.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HaLost {
    pub vhost: String,
    pub name: String,
    pub reason: String,
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
    pub definitions: Value,
    pub notes: Vec<String>,
    /// Queues left unreplicated on a target without classic mirroring.
    pub ha_lost: Vec<HaLost>,
    /// The selected queues as the source has them: what the apps declare.
    pub app_queues: Vec<Value>,
    /// The selected exchanges the apps declare (not the built-in `amq.*` and default ones).
    pub app_exchanges: Vec<Value>,
}

/// Whether durable classic queues become quorum queues: when asked, and by default on a target
/// without classic mirroring (4.x), where a classic queue has no replica at all.
pub fn converts_to_quorum(options: &Options, target: RabbitVersion) -> bool {
    options.convert_to_quorum || (!target.has_classic_mirroring() && !options.keep_classic)
}

/// Why a classic queue cannot become a quorum queue with the same behaviour, if it cannot.
fn quorum_obstacle(queue: &Value) -> Option<String> {
    let arguments = &queue["arguments"];
    if queue["durable"] != true {
        return Some("not durable: quorum queues are durable only".into());
    }
    if queue["auto_delete"] == true {
        return Some("auto-delete: a quorum queue cannot be".into());
    }
    if queue["exclusive"] == true {
        return Some("exclusive: a quorum queue cannot be".into());
    }
    if let Some(levels) = arguments.get("x-max-priority") {
        return Some(format!(
            "x-max-priority {levels}: quorum queues know two priorities only (from RabbitMQ 4.0: above 4, and the \
             rest), so the delivery order would change"
        ));
    }
    if arguments["x-overflow"] == "reject-publish-dlx" {
        return Some("x-overflow reject-publish-dlx: quorum queues do not support it".into());
    }
    None
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

fn list<'a>(definitions: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    definitions[key].as_array().into_iter().flatten()
}

/// The queues of a definitions document.
pub fn queues(definitions: &Value) -> impl Iterator<Item = &Value> {
    list(definitions, "queues")
}

/// A queue's (vhost, name) in a definitions document.
pub fn queue_key(queue: &Value) -> (&str, &str) {
    (queue["vhost"].as_str().unwrap_or("/"), queue["name"].as_str().unwrap_or_default())
}

/// The names of the vhosts of a definitions document.
pub fn vhost_names(definitions: &Value) -> Vec<String> {
    list(definitions, "vhosts").filter_map(|v| v["name"].as_str()).map(str::to_string).collect()
}

/// Whether the policy that applies to `queue` (the highest priority of those in its vhost whose
/// pattern matches its name) mirrors it (`ha-mode`).
pub fn mirrored_by_policy(definitions: &Value, queue: &Value) -> bool {
    let (vhost, name) = queue_key(queue);
    list(definitions, "policies")
        .filter(|p| p["vhost"].as_str().unwrap_or("/") == vhost)
        .filter(|p| matches!(p["apply-to"].as_str().unwrap_or("all"), "all" | "queues" | "classic_queues"))
        .filter(|p| p["pattern"].as_str().and_then(|re| regex::Regex::new(re).ok()).is_some_and(|re| re.is_match(name)))
        .max_by_key(|p| p["priority"].as_i64().unwrap_or(0))
        .is_some_and(|p| p["definition"].get("ha-mode").is_some())
}

/// A queue's type: in its arguments when the client chose it, in `type` when its vhost's default
/// queue type did; classic when neither says.
pub fn queue_type(queue: &Value) -> &str {
    queue["arguments"]["x-queue-type"].as_str().or_else(|| queue["type"].as_str()).unwrap_or("classic")
}

/// A queue's arguments as they decide equivalence (`x-queue-type: classic` is the default).
pub fn effective_arguments(queue: &Value) -> Value {
    let mut arguments = queue["arguments"].as_object().cloned().unwrap_or_default();
    match queue_type(queue) {
        "classic" => arguments.remove("x-queue-type"),
        other => arguments.insert("x-queue-type".into(), json!(other)),
    };
    Value::Object(arguments)
}

/// Keeps the selected vhosts and queues, and converts what the target's version needs.
pub fn convert(exported: &Value, options: &Options, target: RabbitVersion) -> Conversion {
    let mut notes = Vec::new();
    let mut ha_lost = Vec::new();
    let vhost_selected = |item: &Value| {
        let vhost = item["vhost"].as_str().or_else(|| item["name"].as_str()).unwrap_or("/");
        options.vhosts.is_empty() || options.vhosts.iter().any(|v| v == vhost)
    };
    let vhosts: Vec<Value> =
        list(exported, "vhosts").filter(|v| vhost_selected(v)).map(|v| convert_vhost(v, target)).collect();

    let queues: Vec<Value> = list(exported, "queues")
        .filter(|q| vhost_selected(q))
        .filter(|q| options.queues.as_ref().is_none_or(|re| re.is_match(queue_key(q).1)))
        .map(|q| convert_queue(q, options, target, &mut notes, &mut ha_lost))
        .collect();
    let queue_names: Vec<(&str, &str)> = queues.iter().map(queue_key).collect();
    let bindings: Vec<Value> = list(exported, "bindings")
        .filter(|b| vhost_selected(b))
        .filter(|b| {
            b["destination_type"] != "queue"
                || queue_names.contains(&(b["vhost"].as_str().unwrap_or("/"), b["destination"].as_str().unwrap_or("")))
        })
        .cloned()
        .collect();

    let policies: Vec<Value> = list(exported, "policies")
        .filter(|p| vhost_selected(p))
        .filter_map(|p| convert_policy(p, target, &mut notes))
        .collect();
    let parameters: Vec<Value> = list(exported, "parameters")
        .filter(|p| vhost_selected(p))
        .filter(|p| {
            let component = p["component"].as_str().unwrap_or_default();
            let keep = !matches!(component, "shovel" | "federation-upstream" | "federation-upstream-set");
            if !keep {
                notes.push(format!(
                    "parameter {component}/{}: not imported (it would move or copy messages)",
                    p["name"]
                ));
            }
            keep
        })
        .cloned()
        .collect();
    let converted = json!({
        "users": list(exported, "users").cloned().collect::<Vec<_>>(),
        "vhosts": vhosts,
        "permissions": list(exported, "permissions").filter(|p| vhost_selected(p)).cloned().collect::<Vec<_>>(),
        "topic_permissions": list(exported, "topic_permissions").filter(|p| vhost_selected(p)).cloned().collect::<Vec<_>>(),
        "parameters": parameters,
        "policies": policies,
        "queues": queues,
        "exchanges": list(exported, "exchanges").filter(|e| vhost_selected(e)).cloned().collect::<Vec<_>>(),
        "bindings": bindings,
    });
    ha_lost.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    let app_queues = list(exported, "queues")
        .filter(|q| vhost_selected(q))
        .filter(|q| options.queues.as_ref().is_none_or(|re| re.is_match(queue_key(q).1)))
        .cloned()
        .collect();
    let app_exchanges = list(exported, "exchanges")
        .filter(|e| vhost_selected(e))
        .filter(|e| e["name"].as_str().is_some_and(|n| !n.is_empty() && !n.starts_with("amq.")))
        .cloned()
        .collect();
    Conversion { definitions: converted, notes, ha_lost, app_queues, app_exchanges }
}

/// A vhost as the target creates it when it lacks it (one it has is not imported, see `import`):
/// on a target without classic mirroring its default queue type is quorum, so that what apps
/// declare there without a type is replicated.
fn convert_vhost(vhost: &Value, target: RabbitVersion) -> Value {
    let mut vhost = vhost.clone();
    if !target.has_classic_mirroring()
        && let Some(key) = target.vhost_default_queue_type_key()
        && let Some(object) = vhost.as_object_mut()
    {
        object.insert(key.into(), json!("quorum"));
        let metadata = object.entry("metadata").or_insert_with(|| json!({}));
        if let Some(metadata) = metadata.as_object_mut() {
            metadata.insert(key.into(), json!("quorum"));
        }
    }
    vhost
}

/// A queue as the target declares it: quorum when converting and possible (classic-only arguments
/// dropped), its type always explicit where vhosts have a default queue type.
fn convert_queue(
    queue: &Value,
    options: &Options,
    target: RabbitVersion,
    notes: &mut Vec<String>,
    ha_lost: &mut Vec<HaLost>,
) -> Value {
    let (vhost, name) = queue_key(queue);
    let mut queue = queue.clone();
    let mut queue_type = queue_type(&queue).to_string();
    let mut arguments: Map<String, Value> = queue["arguments"].as_object().cloned().unwrap_or_default();
    let converts = converts_to_quorum(options, target);
    if queue_type == "classic" && (converts || !target.has_classic_mirroring()) {
        let obstacle = if converts {
            quorum_obstacle(&queue)
        } else {
            Some(format!("kept classic as asked (--keep-classic), and RabbitMQ {target} has no classic mirroring"))
        };
        match obstacle {
            None => {
                for key in CLASSIC_ONLY_ARGUMENTS {
                    if arguments.remove(key).is_some() {
                        notes.push(format!("queue {name}: dropped {key}, which quorum queues do not support"));
                    }
                }
                queue_type = "quorum".into();
                notes.push(format!("queue {name}: declared as a quorum queue"));
            }
            Some(reason) if !target.has_classic_mirroring() => {
                ha_lost.push(HaLost { vhost: vhost.to_string(), name: name.to_string(), reason });
            }
            // A 3.x target mirrors it as its policies say.
            Some(reason) => notes.push(format!("queue {name}: stays a classic queue ({reason})")),
        }
    }
    // A vhost's default queue type applies to queues declared without one: each queue says
    // its type, or an operator-managed 4.x target (quorum by default) would make a classic
    // queue quorum, and a 3.x one a quorum queue classic.
    if queue_type != "classic" || target.vhost_default_queue_type_key().is_some() {
        arguments.insert("x-queue-type".into(), json!(queue_type));
    }
    queue["arguments"] = Value::Object(arguments);
    queue
}

/// A policy for the target: without `ha-*` keys from 4.0 (none at all when nothing is left).
fn convert_policy(policy: &Value, target: RabbitVersion, notes: &mut Vec<String>) -> Option<Value> {
    let mut policy = policy.clone();
    let name = policy["name"].as_str().unwrap_or_default().to_string();
    if !target.has_classic_mirroring()
        && let Some(definition) = policy["definition"].as_object_mut()
    {
        let stripped: Vec<String> = definition.keys().filter(|k| k.starts_with("ha-")).cloned().collect();
        for key in &stripped {
            definition.remove(key);
        }
        if !stripped.is_empty() {
            notes.push(format!(
                "policy {name}: removed {} (classic mirroring does not exist from RabbitMQ 4.0)",
                stripped.join(", ")
            ));
        }
        if definition.is_empty() {
            notes.push(format!("policy {name}: not imported, nothing left in it"));
            return None;
        }
    }
    Some(policy)
}

fn fail(reason: &'static str, message: impl Into<String>) -> MigrateError {
    MigrateError::new("definitions", reason, message)
}

/// The vhosts and policies to import, leaving the target's own as they are: an import of a vhost
/// the target has would overwrite its metadata (its default queue type, description, tags), and
/// of a policy the target has, its definition. A vhost the target has is left out; a policy it has
/// the same is left out quietly, one it has otherwise is left out and named as a conflict.
fn keep_targets_own(
    current: &Value,
    definitions: &Value,
    notes: &mut Vec<String>,
    conflicts: &mut Vec<String>,
) -> (Vec<Value>, Vec<Value>) {
    let vhosts = list(definitions, "vhosts")
        .filter(|v| {
            let exists = list(current, "vhosts").any(|t| t["name"] == v["name"]);
            if exists {
                notes.push(format!(
                    "vhost {}: exists on the target, its settings (default queue type, description, tags) left as they are",
                    v["name"]
                ));
            }
            !exists
        })
        .cloned()
        .collect();
    let policies = list(definitions, "policies")
        .filter(|p| {
            let Some(theirs) = list(current, "policies").find(|t| t["vhost"] == p["vhost"] && t["name"] == p["name"])
            else {
                return true;
            };
            let same = ["pattern", "apply-to", "priority", "definition"].iter().all(|k| theirs[*k] == p[*k]);
            if !same {
                conflicts.push(format!(
                    "policy {} in vhost {}: the target has its own (pattern {}, definition {}), kept; the \
                     source's (pattern {}, definition {}) was not imported",
                    p["name"], p["vhost"], theirs["pattern"], theirs["definition"], p["pattern"], p["definition"]
                ));
            }
            false
        })
        .cloned()
        .collect();
    (vhosts, policies)
}

/// Imports the converted definitions (users that already exist on the target are left as they
/// are, with their permissions), then checks every vhost, queue, exchange, binding and policy is
/// there.
pub async fn import(target: &ManagementClient, plan: &Plan) -> Result<DefinitionsReport, MigrateError> {
    let current = target.get("/api/definitions").await.map_err(|e| fail(e.reason(), format!("target: {e}")))?;
    let current = current.unwrap_or(Value::Null);
    let existing_users: Vec<&str> = list(&current, "users").filter_map(|u| u["name"].as_str()).collect();
    let mut definitions = plan.definitions.clone();
    let mut notes = plan.notes.clone();
    let users: Vec<Value> = list(&definitions, "users")
        .filter(|u| {
            let exists = existing_users.contains(&u["name"].as_str().unwrap_or(""));
            if exists {
                notes.push(format!("user {}: exists on the target, left unchanged", u["name"]));
            }
            !exists
        })
        .cloned()
        .collect();
    let imported_users: Vec<String> = users.iter().filter_map(|u| u["name"].as_str().map(str::to_string)).collect();
    definitions["permissions"] = Value::Array(
        list(&definitions, "permissions")
            .filter(|p| imported_users.iter().any(|u| p["user"] == u.as_str()))
            .cloned()
            .collect(),
    );
    definitions["topic_permissions"] = Value::Array(
        list(&definitions, "topic_permissions")
            .filter(|p| imported_users.iter().any(|u| p["user"] == u.as_str()))
            .cloned()
            .collect(),
    );
    definitions["users"] = Value::Array(users);
    let mut conflicts = Vec::new();
    let (vhosts, policies) = keep_targets_own(&current, &definitions, &mut notes, &mut conflicts);
    definitions["vhosts"] = Value::Array(vhosts);
    definitions["policies"] = Value::Array(policies);
    target.post("/api/definitions", &definitions).await.map_err(|e| fail(e.reason(), format!("import: {e}")))?;

    let imported = target
        .get("/api/definitions")
        .await
        .map_err(|e| fail(e.reason(), format!("target: {e}")))?
        .unwrap_or(Value::Null);
    let key = |item: &Value, fields: &[&str]| -> String {
        fields.iter().map(|f| item[*f].to_string()).collect::<Vec<_>>().join("|")
    };
    let mut missing = Vec::new();
    for (kind, fields) in [
        ("vhosts", &["name"][..]),
        ("queues", &["vhost", "name"][..]),
        ("exchanges", &["vhost", "name"][..]),
        ("bindings", &["vhost", "source", "destination", "destination_type", "routing_key"][..]),
        ("policies", &["vhost", "name"][..]),
    ] {
        let present: Vec<String> = list(&imported, kind).map(|i| key(i, fields)).collect();
        for item in list(&definitions, kind) {
            if !present.contains(&key(item, fields)) {
                missing.push(format!("{kind}: {}", key(item, fields)));
            }
        }
    }
    if !missing.is_empty() {
        return Err(fail(
            "DefinitionsNotImported",
            format!("missing on the target after import: {}", missing.join("; ")),
        ));
    }
    Ok(DefinitionsReport {
        vhosts: list(&definitions, "vhosts").count(),
        queues: list(&definitions, "queues").count(),
        exchanges: list(&definitions, "exchanges").count(),
        bindings: list(&definitions, "bindings").count(),
        policies: list(&definitions, "policies").count(),
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

    fn exported() -> Value {
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

    #[test]
    fn a_4x_target_gets_no_ha_keys_and_no_empty_policies() {
        let v4 = RabbitVersion::parse("4.1.4").unwrap();
        let Conversion { definitions: converted, notes, .. } = convert(&exported(), &options(), v4);
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
        let Conversion { definitions: converted, ha_lost, .. } = convert(&exported(), &options(), v4);
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
        let Conversion { definitions: converted, ha_lost, .. } =
            convert(&exported(), &options, RabbitVersion::parse("4.3.6").unwrap());
        let types: Vec<&Value> =
            converted["queues"].as_array().unwrap().iter().map(|q| &q["arguments"]["x-queue-type"]).collect();
        assert!(types.iter().all(|t| *t == "classic"), "{types:?}");
        assert_eq!(ha_lost.len(), 4, "{ha_lost:?}");
        assert!(ha_lost[0].reason.contains("--keep-classic"), "{ha_lost:?}");
        // A 3.x target mirrors classic queues by policy: nothing converted, nothing lost, nothing pinned.
        let old = convert(&exported(), &self::options(), RabbitVersion::parse("3.10.8").unwrap());
        assert_eq!(old.definitions["queues"], exported()["queues"]);
        assert_eq!(old.definitions["vhosts"], exported()["vhosts"]);
        assert!(old.ha_lost.is_empty());
    }

    #[test]
    fn the_targets_own_vhosts_and_policies_are_kept_and_a_conflict_is_named() {
        let current = json!({
            "vhosts": [{"name": "/", "default_queue_type": "quorum"}],
            "policies": [
                {"vhost": "/", "name": "ttl", "pattern": "^jobs", "apply-to": "queues", "priority": 1,
                 "definition": {"message-ttl": 1000}},
                {"vhost": "/", "name": "same", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}}
            ]
        });
        let definitions = json!({
            "vhosts": [{"name": "/"}, {"name": "new"}],
            "policies": [
                {"vhost": "/", "name": "ttl", "pattern": "^jobs", "apply-to": "queues", "priority": 1,
                 "definition": {"message-ttl": 60000}},
                {"vhost": "/", "name": "same", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}},
                {"vhost": "new", "name": "other", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 5}}
            ]
        });
        let (mut notes, mut conflicts) = (Vec::new(), Vec::new());
        let (vhosts, policies) = keep_targets_own(&current, &definitions, &mut notes, &mut conflicts);
        assert_eq!(vhosts, [json!({"name": "new"})]);
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0]["name"], "other");
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].starts_with("policy \"ttl\" in vhost \"/\": the target has its own"), "{conflicts:?}");
        assert!(notes.iter().any(|n| n.starts_with("vhost \"/\": exists on the target")), "{notes:?}");
    }

    #[test]
    fn a_policy_with_ha_mode_marks_the_queues_it_matches_as_mirrored() {
        let exported = exported();
        let queue = |name: &str| json!({"vhost": "/", "name": name});
        assert!(mirrored_by_policy(&exported, &queue("jobs")), "ttl (priority 1) mirrors exactly 2");
        assert!(mirrored_by_policy(&exported, &queue("anything")), "ha-all");
        assert!(!mirrored_by_policy(&exported, &json!({"vhost": "other", "name": "elsewhere"})));
    }

    #[test]
    fn a_3x_target_keeps_mirroring_policies() {
        let v3 = RabbitVersion::parse("3.13.7").unwrap();
        let converted = convert(&exported(), &options(), v3).definitions;
        assert_eq!(converted["policies"], exported()["policies"]);
    }

    #[test]
    fn convert_to_quorum_takes_durable_classic_queues_and_drops_classic_arguments() {
        let mut options = options();
        options.convert_to_quorum = true;
        options.vhosts = vec!["/".into()];
        let Conversion { definitions: converted, notes, ha_lost, .. } =
            convert(&exported(), &options, RabbitVersion::parse("4.1.4").unwrap());
        let queues = converted["queues"].as_array().unwrap();
        assert_eq!(queues.len(), 3, "vhost filter: {queues:?}");
        assert_eq!(queues[0]["arguments"], json!({"x-queue-type": "quorum", "x-max-length": 10}));
        // Kept classic, and declared so on a target whose vhosts may default to quorum.
        assert_eq!(queues[1]["arguments"], json!({"x-queue-type": "classic"}));
        assert_eq!(queues[2]["arguments"], json!({"x-max-priority": 9, "x-queue-type": "classic"}));
        let kept: Vec<(&str, &str)> = ha_lost.iter().map(|k| (k.name.as_str(), k.reason.as_str())).collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(kept[0], ("scratch", "not durable: quorum queues are durable only"));
        assert_eq!(kept[1].0, "urgent");
        assert!(kept[1].1.starts_with("x-max-priority 9: quorum queues know two priorities only"), "{kept:?}");
        assert!(notes.iter().any(|n| n.contains("jobs: dropped x-queue-mode")));
        assert_eq!(converted["bindings"].as_array().unwrap().len(), 1);
        assert_eq!(converted["vhosts"].as_array().unwrap().len(), 1);
        assert_eq!(converted["vhosts"][0]["name"], "/");
    }
}
