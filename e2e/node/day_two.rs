//! What people do to a running cluster, done to the formed cluster of `cluster_on_node` while it
//! holds confirmed messages, the way a person at a terminal does it: the StatefulSet scaled to 0
//! by hand, the cookie Secret deleted and then a pod, the default-user Secret deleted, a tag that
//! does not exist deployed and reverted, the cluster stopped with `kubectl scale rabbitcluster`.
//! After each: Ready again, the same claims, every message still there, the Secret's user logs in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client};
use warren::api::RabbitCluster;

use crate::cluster_on_node::{events, volumes, wait_replaced};
use crate::rig::{Endpoint, POD_TIMEOUT, delete, pods, wait_ready};
use testkit::control_plane::cluster::{condition, patch};
use testkit::control_plane::{kubectl, ok, wait_for};

/// One key of a Secret, compared without printing (these are credentials).
async fn secret_value(secrets: &Api<Secret>, name: &str, key: &str) -> Option<Vec<u8>> {
    secrets.get_opt(name).await.ok().flatten()?.data?.get(key).map(|v| v.0.clone())
}

/// Waits until an Event of `reason` whose note contains `says` exists.
async fn wait_event(namespace: &str, reason: &str, says: &str) -> String {
    wait_for(&format!("a {reason} Event saying {says:?}"), POD_TIMEOUT, || async {
        let notes = events(namespace, reason);
        notes.iter().find(|n| n.contains(says)).cloned().ok_or_else(|| format!("{notes:?}"))
    })
    .await
}

/// Every day-2 scenario in turn on cluster `name` (3 ready members, `kept` holding `count`
/// confirmed messages). `endpoint` is replaced when the default user changes.
pub async fn survives_what_people_do(
    client: &Client,
    ns: &str,
    name: &str,
    endpoint: &mut Endpoint,
    kept: &str,
    count: u64,
) {
    let claims = volumes(client, ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let cookie_secret = format!("{name}-erlang-cookie");
    let cookie = secret_value(&secrets, &cookie_secret, "cookie").await.expect("the cookie");

    // 1. A runbook's `kubectl scale sts --replicas=0`: the claims stay (whenScaled: Retain), the
    //    operator sets the StatefulSet back and says who changed what.
    ok("kubectl scale sts", kubectl(&["scale", "statefulset", name, "-n", ns, "--replicas=0"]));
    let note = wait_event(ns, "DriftReverted", "spec.replicas 0 (set back to 3)").await;
    assert!(note.contains("through the scale subresource"), "the Warning says how: {note}");
    eprintln!("DriftReverted: {note}");
    wait_ready(client, ns, name, 3).await;
    assert_eq!(volumes(client, ns).await, claims, "the same claims, bound to the same volumes");
    endpoint.wait_depth(kept, count).await;

    // 2. The cookie Secret deleted, then a pod: the Secret comes back with the cookie the running
    //    nodes use, so the restarted pod rejoins.
    delete(&["secret", &cookie_secret, "-n", ns]);
    let note = wait_event(ns, "CredentialsRecovered", "recovered from the running node").await;
    eprintln!("CredentialsRecovered: {note}");
    wait_for("the cookie Secret back with the same cookie", POD_TIMEOUT, || async {
        match secret_value(&secrets, &cookie_secret, "cookie").await {
            Some(value) if value == cookie => Ok(()),
            Some(_) => Err("a different cookie".to_string()),
            None => Err("no cookie Secret".to_string()),
        }
    })
    .await;
    let before = pods(client, ns, name).await;
    let ha1 = before.iter().find(|p| p.0 == format!("{name}-1")).map(|p| p.1.clone()).expect("pod 1");
    delete(&["pod", &format!("{name}-1"), "-n", ns, "--wait=false"]);
    wait_replaced(client, ns, std::slice::from_ref(&ha1), 3).await;
    wait_ready(client, ns, name, 3).await;
    endpoint.wait_depth(kept, count).await;

    // 3. The default-user Secret deleted: it comes back, and its credentials log in. (A pass that
    //    read the Secret just before the deletion writes it back as it was; otherwise new
    //    credentials are made and the broker's user is set to match: default_user only applies to
    //    an empty database.)
    let user_secret = format!("{name}-default-user");
    let old_user = secret_value(&secrets, &user_secret, "username").await.expect("the default user");
    delete(&["secret", &user_secret, "-n", ns]);
    wait_for("the default-user Secret back", POD_TIMEOUT, || async {
        secret_value(&secrets, &user_secret, "username").await.ok_or("not yet".to_string())
    })
    .await;
    let new_user = secret_value(&secrets, &user_secret, "username").await.expect("a default-user Secret");
    if new_user != old_user {
        let note = wait_event(ns, "DefaultUserRestored", "set again from the Secret").await;
        eprintln!("DefaultUserRestored: {note}");
    }
    *endpoint = Endpoint::of(client, ns, name).await;
    wait_for("the Secret's user logs in to the management API", POD_TIMEOUT, || endpoint.get("whoami")).await;

    // The password changed in the Secret (a rotation, or an edit by mistake): the broker's user is
    // set to match it, through rabbitmqctl in a running pod.
    let rotated = format!("rotated-{}", std::process::id());
    let patch_secret = format!(r#"{{"stringData":{{"password":"{rotated}"}}}}"#);
    ok("kubectl patch secret", kubectl(&["patch", "secret", &user_secret, "-n", ns, "-p", &patch_secret]));
    // The proof is the login below: the Event may be the one of the deletion (same note, one series).
    wait_event(ns, "DefaultUserRestored", "set again from the Secret").await;
    *endpoint = Endpoint::of(client, ns, name).await;
    assert_eq!(endpoint.password, rotated);
    wait_for("the rotated password logs in to the management API", POD_TIMEOUT, || endpoint.get("whoami")).await;
    wait_ready(client, ns, name, 3).await;
    endpoint.wait_depth(kept, count).await;

    // 4. A tag that does not exist: the highest pod cannot pull it; going back to the version every
    //    ready pod still runs is accepted (not refused as a downgrade from the template's tag).
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), ns);
    let image = api.get(name).await.expect("the RabbitCluster").spec.image;
    let (repository, tag) = image.rsplit_once(':').expect("an image with a tag");
    let (version, flavour) = tag.split_once('-').unwrap_or((tag, ""));
    let (minor, _) = version.rsplit_once('.').expect("major.minor.patch");
    let missing =
        format!("{repository}:{minor}.999{}", if flavour.is_empty() { String::new() } else { format!("-{flavour}") });
    patch(ns, name, &format!(r#"{{"spec":{{"image":"{missing}"}}}}"#));
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("a pod that cannot pull {missing}"), POD_TIMEOUT, || async {
        let list = pod_api.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let stuck = list.items.iter().any(|p| {
            p.status.as_ref().and_then(|s| s.container_statuses.as_ref()).into_iter().flatten().any(|c| {
                c.image == missing
                    && c.state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref())
                        .is_some_and(|r| matches!(r, "ErrImagePull" | "ImagePullBackOff" | "ErrImageNeverPull"))
            })
        });
        if stuck { Ok(()) } else { Err("no pod waiting for the image yet".into()) }
    })
    .await;
    patch(ns, name, &format!(r#"{{"spec":{{"image":"{image}"}}}}"#));
    let cluster = wait_ready(client, ns, name, 3).await;
    let success = condition(&cluster, "ReconcileSuccess").expect("ReconcileSuccess");
    assert_eq!(success.status, "True", "{}", success.message);
    assert!(events(ns, "UpgradeRefused").is_empty(), "the revert was refused: {:?}", events(ns, "UpgradeRefused"));
    endpoint.wait_depth(kept, count).await;

    // 5. Stopped on purpose with `kubectl scale rabbitcluster` (the scale subresource): every pod
    //    stops, the claims and credentials stay; scaled back, the same cluster with every message.
    ok("kubectl scale rabbitcluster 0", kubectl(&["scale", "rabbitcluster", name, "-n", ns, "--replicas=0"]));
    wait_for("no pod, Ready=False (Stopped)", POD_TIMEOUT, || async {
        let left = pods(client, ns, name).await.len();
        let cluster = api.get(name).await.map_err(|e| e.to_string())?;
        let stopped = condition(&cluster, "Ready").is_some_and(|c| c.status == "False" && c.reason == "Stopped");
        if left == 0 && stopped { Ok(()) } else { Err(format!("{left} pods; {:?}", condition(&cluster, "Ready"))) }
    })
    .await;
    assert_eq!(volumes(client, ns).await, claims, "a stopped cluster keeps its claims");
    ok("kubectl scale rabbitcluster 3", kubectl(&["scale", "rabbitcluster", name, "-n", ns, "--replicas=3"]));
    wait_ready(client, ns, name, 3).await;
    assert_eq!(volumes(client, ns).await, claims, "the same claims after the stop");
    endpoint.wait_depth(kept, count).await;
    assert!(
        secret_value(&secrets, &cookie_secret, "cookie").await.as_ref() == Some(&cookie),
        "the Erlang cookie changed on the way"
    );
    let unexpected: BTreeMap<&str, Vec<String>> =
        [("NodeRemoved", events(ns, "NodeRemoved"))].into_iter().filter(|(_, e)| !e.is_empty()).collect();
    assert!(unexpected.is_empty(), "nodes were forgotten on the way: {unexpected:?}");
}
