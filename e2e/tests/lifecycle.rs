//! A RabbitCluster's life with the operator installed by the chart: children with owner
//! references, spec edits, a cookie that never changes, the pause annotation, deletion.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use testkit::control_plane::cluster::{self, additional_config, config_map, manifest, wait_condition};
use testkit::control_plane::operator::Operator;
use testkit::control_plane::{TestNamespace, admin_client, describe, ensure_crds, kubectl, ok, wait_for, writes_by};

const NAME: &str = "demo";

#[tokio::test]
async fn children_are_owned_follow_the_spec_and_the_cookie_never_changes() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-children").await;
    let operator = Operator::install(&client, &ns.name).await;

    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    let created = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    let uid = created.uid().expect("uid");
    for (child, refs) in cluster::children(&client, &ns.name, NAME).await.expect("children") {
        let refs = refs.unwrap_or_else(|| panic!("{child} missing; operator log: {}", operator.log.display()));
        if child.starts_with("Secret ") {
            // The credentials outlive the RabbitCluster, as the claims do.
            assert!(refs.is_empty(), "{child} has owners (garbage-collected with the cluster): {refs:?}");
            continue;
        }
        assert!(
            refs.iter()
                .any(|r| r.uid == uid && r.kind == "RabbitCluster" && r.name == NAME && r.controller == Some(true)),
            "{child} is not controlled by RabbitCluster {NAME} ({uid}): {refs:?}"
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let events = events.list(&ListParams::default()).await.expect("events");
    assert!(
        events.items.iter().any(|e| e.reason.as_deref() == Some("Created")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NAME)
            && e.note.as_deref().is_some_and(|n| n.contains("StatefulSet demo"))),
        "no Created Event naming the StatefulSet: {:?}",
        events.items.iter().map(|e| (&e.reason, &e.note)).collect::<Vec<_>>()
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let cookie_before = secrets.get("demo-erlang-cookie").await.expect("cookie Secret");
    let user_before = secrets.get("demo-default-user").await.expect("default-user Secret");
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let template_before = stateful_sets.get(NAME).await.expect("StatefulSet").spec.expect("spec").template;

    // Scale out and change the configuration.
    cluster::patch(
        &ns.name,
        NAME,
        r#"{"spec":{"replicas":5,"rabbitmq":{"additionalConfig":"consumer_timeout = 7200000\n"}}}"#,
    );
    let updated = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    assert_eq!(updated.status.as_ref().and_then(|s| s.observed_generation), Some(2));
    assert_eq!(additional_config(&config_map(&client, &ns.name, NAME).await), "consumer_timeout = 7200000\n");
    let sts = stateful_sets.get(NAME).await.expect("StatefulSet").spec.expect("spec");
    assert_eq!(sts.replicas, Some(5));
    assert_ne!(
        sts.template.metadata.as_ref().map(|m| m.annotations.clone()),
        template_before.metadata.as_ref().map(|m| m.annotations.clone()),
        "a configuration change must roll the pods (config hash annotation of the pod template)"
    );

    // Compared without printing: these are credentials.
    let key = |secret: &Secret, key: &str| secret.data.as_ref().and_then(|d| d.get(key)).map(|v| v.0.clone());
    let cookie_after = secrets.get("demo-erlang-cookie").await.expect("cookie Secret");
    assert!(key(&cookie_after, "cookie") == key(&cookie_before, "cookie"), "the Erlang cookie changed");
    assert!(key(&cookie_after, "cookie").is_some_and(|c| c.len() >= 32), "no usable Erlang cookie");
    assert_eq!(cookie_after.resource_version(), cookie_before.resource_version(), "the cookie Secret was written");
    let user_after = secrets.get("demo-default-user").await.expect("default-user Secret");
    for field in ["username", "password"] {
        assert!(key(&user_after, field) == key(&user_before, field), "the default user's {field} changed");
    }
    // The client URIs follow the new replica count.
    let failover = key(&user_after, "failover-uris").map(|v| String::from_utf8_lossy(&v).matches("amqp://").count());
    assert_eq!(failover, Some(5), "failover-uris must list the 5 nodes");

    // The NetworkPolicy lets the operator's namespace (from the chart's downward API) reach the
    // management API; turned off it is deleted, turned on it comes back.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    let policy = serde_json::to_value(policies.get(NAME).await.expect("NetworkPolicy")).expect("JSON");
    let management = policy["spec"]["ingress"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["ports"][0]["port"] == 15672)
        .expect("a management rule");
    assert_eq!(management["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], ns.name);
    cluster::patch(&ns.name, NAME, r#"{"spec":{"networkPolicy":{"enabled":false}}}"#);
    wait_for("the NetworkPolicy deleted", Duration::from_secs(60), || async {
        match policies.get_opt(NAME).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    cluster::patch(&ns.name, NAME, r#"{"spec":{"networkPolicy":{"enabled":true}}}"#);
    wait_for("the NetworkPolicy back", Duration::from_secs(60), || async {
        match policies.get_opt(NAME).await {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // What the operator wrote, as the API server saw it: status only through the subresource, and
    // the chart's RBAC allowed every request.
    let writes = writes_by(&operator.user);
    let on_cluster: Vec<_> = writes.iter().filter(|w| w.resource == "rabbitclusters").cloned().collect();
    assert!(!on_cluster.is_empty(), "the operator never wrote status");
    assert!(
        on_cluster.iter().all(|w| w.subresource.as_deref() == Some("status")),
        "RabbitCluster written other than through /status:\n  {}",
        describe(&on_cluster)
    );
    let refused: Vec<_> = writes.iter().filter(|w| w.code >= 400).cloned().collect();
    assert!(refused.is_empty(), "requests refused to the operator:\n  {}", describe(&refused));
}

#[tokio::test]
async fn the_chart_grants_no_more_than_the_operator_needs() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-rbac").await;
    let operator = Operator::install(&client, &ns.name).await;
    let can = |verb: &str, resource: &str, namespace: &str| {
        let out = kubectl(&["auth", "can-i", verb, resource, "-n", namespace, "--as", &operator.user]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, resource) in
        [("patch", "statefulsets.apps"), ("create", "secrets"), ("watch", "rabbitclusters.warren.dev")]
    {
        assert!(can(verb, resource, &ns.name), "the operator may not {verb} {resource} in its namespace");
    }
    // Scale-down's node commands: exec into the RabbitMQ pods; pods deleted only to replace a
    // member on a node declared gone (opt-in). Claims: listed (does the cluster have data?),
    // expanded, read, deleted by the forget step and that replacement only; never made.
    for (verb, resource) in [
        ("list", "persistentvolumeclaims"),
        ("patch", "persistentvolumeclaims"),
        ("delete", "persistentvolumeclaims"),
        ("delete", "pods"),
    ] {
        assert!(can(verb, resource, &ns.name), "the operator may not {verb} {resource} in its namespace");
    }
    let exec =
        kubectl(&["auth", "can-i", "create", "pods", "--subresource=exec", "-n", &ns.name, "--as", &operator.user]);
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "yes", "the operator may not exec into pods");
    for (verb, resource) in [
        ("delete", "secrets"),
        ("delete", "statefulsets.apps"),
        ("update", "rabbitclusters.warren.dev"),
        ("create", "pods"),
        ("create", "persistentvolumeclaims"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
    ] {
        assert!(!can(verb, resource, &ns.name), "the operator may {verb} {resource}: more than it needs");
    }
    // Nodes and volumes: one read at a time (is a not-ready member's node gone?), nothing more.
    assert!(can("get", "nodes", &ns.name) && can("get", "persistentvolumes", &ns.name), "cannot read nodes, volumes");
    for (verb, resource) in [("list", "nodes"), ("watch", "nodes"), ("patch", "nodes"), ("delete", "persistentvolumes")]
    {
        assert!(!can(verb, resource, &ns.name), "the operator may {verb} {resource}: more than it needs");
    }
    // Leader election: the release's own Lease, nothing else of leases.
    assert!(can("patch", "leases.coordination.k8s.io/warren", &ns.name), "the operator may not renew its Lease");
    assert!(can("create", "leases.coordination.k8s.io", &ns.name), "the operator may not create its Lease");
    assert!(!can("patch", "leases.coordination.k8s.io/another", &ns.name), "the operator may take any Lease");
    assert!(!can("delete", "leases.coordination.k8s.io/warren", &ns.name), "the operator may delete its Lease");
    assert!(!can("create", "leases.coordination.k8s.io", "default"), "the operator may create Leases elsewhere");
    assert!(!can("get", "secrets", "default"), "the namespaced operator may read Secrets of another namespace");
    assert!(!can("list", "rabbitclusters.warren.dev", "default"), "the namespaced operator watches other namespaces");
}

#[tokio::test]
async fn deleting_the_cluster_collects_its_children_but_keeps_volumes_and_credentials() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-delete").await;
    let _operator = Operator::install(&client, &ns.name).await;

    cluster::apply(&ns.name, &manifest(NAME, 3, ""));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    // The StatefulSet controller makes one claim per replica from the volume claim template.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    let claim_names = wait_for("3 PersistentVolumeClaims", Duration::from_secs(60), || async {
        let list = claims.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let names: Vec<String> = list.items.iter().map(|c| c.name_any()).collect();
        if names.len() == 3 { Ok(names) } else { Err(format!("{names:?}")) }
    })
    .await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let credentials = || async {
        let mut values = Vec::new();
        for (name, key) in [("demo-erlang-cookie", "cookie"), ("demo-default-user", "password")] {
            let secret = secrets.get(name).await.unwrap_or_else(|e| panic!("Secret {name}: {e}"));
            values.push(secret.data.and_then(|d| d.get(key).cloned()).map(|v| v.0));
        }
        values
    };
    let before = credentials().await;
    assert!(before.iter().all(Option::is_some), "credentials missing");

    ok("kubectl delete RabbitCluster", kubectl(&["delete", "rabbitcluster", NAME, "-n", &ns.name, "--wait=true"]));
    wait_for("children garbage-collected, but the credentials", Duration::from_secs(90), || async {
        let left: Vec<String> = cluster::children(&client, &ns.name, NAME)
            .await?
            .into_iter()
            .filter(|(_, refs)| refs.is_some())
            .map(|(child, _)| child)
            .collect();
        if left == ["Secret demo-erlang-cookie", "Secret demo-default-user"] {
            Ok(())
        } else {
            Err(format!("still there: {left:?}"))
        }
    })
    .await;
    // Compared without printing: these are credentials.
    assert!(credentials().await == before, "the kept credentials changed");
    let kept = claims.list(&ListParams::default()).await.expect("claims");
    let mut kept_names: Vec<String> = kept.items.iter().map(|c| c.name_any()).collect();
    kept_names.sort();
    let mut expected = claim_names;
    expected.sort();
    assert_eq!(kept_names, expected, "PersistentVolumeClaims must outlive the RabbitCluster (they hold the queues)");
    assert!(
        kept.items.iter().all(|c| c.metadata.deletion_timestamp.is_none()),
        "a PersistentVolumeClaim is being deleted"
    );

    // A GitOps prune and re-sync: the same RabbitCluster applied again adopts the kept credentials
    // (the data on the claims opens with them), and owns its other children anew.
    cluster::apply(&ns.name, &manifest(NAME, 3, ""));
    let again = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    assert!(credentials().await == before, "the re-created cluster invented new credentials");
    let uid = again.uid().expect("uid");
    for (child, refs) in cluster::children(&client, &ns.name, NAME).await.expect("children") {
        let refs = refs.unwrap_or_else(|| panic!("{child} missing after the re-create"));
        let owned = refs.iter().any(|r| r.uid == uid && r.controller == Some(true));
        assert_eq!(owned, !child.starts_with("Secret "), "{child}: {refs:?}");
    }
}

#[tokio::test]
async fn the_pause_annotation_stops_reconciling() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-pause").await;
    let operator = Operator::install(&client, &ns.name).await;

    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    ok("annotate paused", kubectl(&["annotate", "rabbitcluster", NAME, "-n", &ns.name, "warren.dev/paused=true"]));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "Unknown", Some("Paused")).await;
    let children_writes = || {
        writes_by(&operator.user)
            .into_iter()
            .filter(|w| w.resource != "rabbitclusters" && w.resource != "events")
            .count()
    };
    let before = children_writes();

    cluster::patch(&ns.name, NAME, r#"{"spec":{"rabbitmq":{"additionalConfig":"consumer_timeout = 60000\n"}}}"#);
    // The operator has seen generation 2 (and said it is paused) ...
    let paused = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "Unknown", Some("Paused")).await;
    assert_eq!(paused.status.as_ref().and_then(|s| s.observed_generation), Some(2));
    // ... and left the children alone.
    assert_eq!(additional_config(&config_map(&client, &ns.name, NAME).await), "consumer_timeout = 3600000\n");
    assert_eq!(children_writes(), before, "children written while paused");

    ok("remove the annotation", kubectl(&["annotate", "rabbitcluster", NAME, "-n", &ns.name, "warren.dev/paused-"]));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", Some("Reconciled")).await;
    assert_eq!(additional_config(&config_map(&client, &ns.name, NAME).await), "consumer_timeout = 60000\n");
}

/// What a person does to the StatefulSet, set back by the operator with a Warning naming the field,
/// both values and the field manager; what the operator never sets (`kubectl rollout restart`'s
/// annotation) is left alone and is no drift.
#[tokio::test]
async fn a_stateful_set_changed_by_hand_is_set_back_with_a_warning() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-drift").await;
    let _operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, ""));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let image = |sts: &StatefulSet| {
        sts.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| p.containers[0].image.clone())
    };
    let applied = stateful_sets.get(NAME).await.expect("StatefulSet");

    ok("kubectl rollout restart", kubectl(&["rollout", "restart", "statefulset", NAME, "-n", &ns.name]));
    ok("kubectl scale sts", kubectl(&["scale", "statefulset", NAME, "-n", &ns.name, "--replicas=0"]));
    ok(
        "kubectl set image",
        kubectl(&["set", "image", &format!("statefulset/{NAME}"), "rabbitmq=rabbitmq:4.1.99", "-n", &ns.name]),
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let notes = wait_for("DriftReverted naming both fields", Duration::from_secs(60), || async {
        let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let notes: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("DriftReverted") && e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| e.note.clone())
            .collect();
        let both = notes.join("\n");
        if both.contains("spec.replicas 0 (set back to 3)") && both.contains("rabbitmq:4.1.99") {
            Ok(notes)
        } else {
            Err(format!("{notes:?}"))
        }
    })
    .await;
    // Who: kubectl set image's field manager; kubectl scale leaves none (the scale subresource).
    let both = notes.join("\n");
    assert!(both.contains("by kubectl-set") && both.contains("through the scale subresource"), "{notes:?}");
    let back = wait_for("the StatefulSet as applied", Duration::from_secs(60), || async {
        let sts = stateful_sets.get(NAME).await.map_err(|e| e.to_string())?;
        let replicas = sts.spec.as_ref().and_then(|s| s.replicas);
        if replicas == Some(3) && image(&sts) == image(&applied) { Ok(sts) } else { Err(format!("{replicas:?}")) }
    })
    .await;
    let restarted = back
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .is_some_and(|a| a.contains_key("kubectl.kubernetes.io/restartedAt"));
    assert!(restarted, "kubectl rollout restart's annotation was taken away");
}

/// `spec.persistence.storage` changed on a running cluster: the StatefulSet's claim template is
/// immutable, so it keeps its size and every other change in the same edit still applies; the
/// claims are expanded where the API server allows it (here it does not: the claims are not bound,
/// and the warning says so), and a smaller size is refused with a warning. Nothing blocks.
#[tokio::test]
async fn a_storage_change_never_blocks_the_other_changes() {
    ensure_crds().await;
    let client = admin_client().await;
    let ns = TestNamespace::create(&client, "e2e-storage").await;
    let _operator = Operator::install(&client, &ns.name).await;
    cluster::apply(&ns.name, &manifest(NAME, 3, "consumer_timeout = 3600000\n"));
    wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns.name);
    wait_for("3 claims", Duration::from_secs(60), || async {
        let n = claims.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items.len();
        if n == 3 { Ok(()) } else { Err(format!("{n} claims")) }
    })
    .await;

    cluster::patch(
        &ns.name,
        NAME,
        r#"{"spec":{"persistence":{"storage":"20Gi"},"rabbitmq":{"additionalConfig":"consumer_timeout = 60000\n"}}}"#,
    );
    let grown = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    assert_eq!(additional_config(&config_map(&client, &ns.name, NAME).await), "consumer_timeout = 60000\n");
    let warnings = grown.status.as_ref().map(|s| s.warnings.join("\n")).unwrap_or_default();
    assert!(
        warnings.contains("spec.persistence.storage 20Gi: claims not expanded") && warnings.contains("data-demo-0"),
        "{warnings}"
    );

    cluster::patch(&ns.name, NAME, r#"{"spec":{"persistence":{"storage":"1Gi"}}}"#);
    let shrunk = wait_condition(&client, &ns.name, NAME, "ReconcileSuccess", "True", None).await;
    let warnings = shrunk.status.as_ref().map(|s| s.warnings.join("\n")).unwrap_or_default();
    assert!(warnings.contains("1Gi is smaller than the volumes' 10Gi: volumes cannot shrink"), "{warnings}");
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let template = stateful_sets.get(NAME).await.expect("StatefulSet").spec.and_then(|s| s.volume_claim_templates);
    let size = template.and_then(|t| t[0].spec.clone()).and_then(|s| s.resources).and_then(|r| r.requests);
    assert_eq!(size.map(|r| r["storage"].0.clone()).as_deref(), Some("10Gi"));
}
