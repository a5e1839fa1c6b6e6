//! The chart's default is namespaced: the operator runs the namespaces `watchNamespaces` lists,
//! with a Role in each, one watch per namespace merged into its stores; it can do nothing in any
//! other namespace and never asks to.

use std::time::Duration;

use kube::Api;

use testkit::control_plane::cluster::{self, manifest, wait_condition};
use testkit::control_plane::operator::Operator;
use testkit::control_plane::{TestNamespace, admin_client, describe, ensure_crds, kubectl, requests_by};

#[tokio::test]
async fn an_operator_of_listed_namespaces_runs_clusters_in_each_and_nothing_elsewhere() {
    ensure_crds().await;
    let client = admin_client().await;
    let home = TestNamespace::create(&client, "e2e-home").await;
    let apps = TestNamespace::create(&client, "e2e-apps").await;
    let outside = TestNamespace::create(&client, "e2e-outside").await;
    let operator =
        Operator::install_with(&client, &home.name, &[&format!("watchNamespaces={{{},{}}}", home.name, apps.name)])
            .await;

    let can = |verb: &str, resource: &str, namespace: Option<&str>| {
        // `pods/exec` is a subresource to kubectl, not a resource name.
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, subresource)) => (resource, format!("--subresource={subresource}")),
            None => (resource, String::new()),
        };
        let mut args = vec!["auth", "can-i", verb, resource, "--as", &operator.user];
        if !subresource.is_empty() {
            args.push(&subresource);
        }
        match namespace {
            Some(namespace) => args.extend(["-n", namespace]),
            None => args.push("--all-namespaces"),
        }
        let out = kubectl(&args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for namespace in [&home.name, &apps.name] {
        for (verb, resource) in [
            ("watch", "rabbitclusters.warren.dev"),
            ("create", "secrets"),
            ("create", "pods/exec"),
            ("create", "jobs.batch"),
        ] {
            assert!(can(verb, resource, Some(namespace)), "the operator may not {verb} {resource} in {namespace}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("watch", "rabbitclusters.warren.dev"),
        ("create", "pods/exec"),
        ("create", "jobs.batch"),
        ("patch", "statefulsets.apps"),
    ] {
        assert!(
            !can(verb, resource, Some(&outside.name)),
            "the operator may {verb} {resource} in an unlisted namespace"
        );
        assert!(!can(verb, resource, None), "the operator may {verb} {resource} in every namespace");
    }

    for namespace in [&home.name, &apps.name, &outside.name] {
        cluster::apply(namespace, &manifest("demo", 3, ""));
    }
    for namespace in [&home.name, &apps.name] {
        wait_condition(&client, namespace, "demo", "ReconcileSuccess", "True", None).await;
    }
    // Both listed namespaces reconciled; give the watch of an unlisted one (were there any) time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let unlisted = cluster::get(&client, &outside.name, "demo").await;
    assert!(unlisted.status.is_none(), "a RabbitCluster outside the listed namespaces got a status: {unlisted:?}");
    let stateful_sets: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(client.clone(), &outside.name);
    assert!(stateful_sets.get_opt("demo").await.expect("get StatefulSet").is_none());

    // What the operator did, it was allowed to: no request refused, none outside its namespaces.
    let requests = requests_by(&operator.user);
    let refused: Vec<_> = requests.iter().filter(|r| r.code == 403).cloned().collect();
    assert!(refused.is_empty(), "requests refused to the operator:\n  {}", describe(&refused));
    let elsewhere: Vec<_> = requests
        .iter()
        .filter(|r| r.namespace.as_deref().is_none_or(|n| n != home.name && n != apps.name))
        .cloned()
        .collect();
    assert!(elsewhere.is_empty(), "requests outside the listed namespaces:\n  {}", describe(&elsewhere));
    assert!(
        requests.iter().any(|r| r.namespace.as_deref() == Some(apps.name.as_str()) && r.resource == "statefulsets"),
        "no request of the operator in {} in the audit log",
        apps.name
    );
}
