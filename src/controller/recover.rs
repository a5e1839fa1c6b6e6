//! What a cluster already depends on, recovered when it goes missing, never invented anew while
//! a node runs with the old one: the Erlang cookie read back from a running node, the default user
//! re-created on the broker to match its Secret. And whether a cluster has data at all (its
//! StatefulSet, or claims of its pods that outlived it), which decides between the two.

use base64::Engine;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::Context;
use super::build::{self, Credentials};
use super::scale::PodExec;
use super::validate::ValidatedCluster;
use crate::error::{Error, Result};
use crate::rabbitmq::scale_down::NodeCommands;

/// The claims of the cluster's pods (not being deleted), with their ordinals. One LIST.
pub async fn claims(ctx: &Context, cluster: &ValidatedCluster) -> Result<Vec<(i32, PersistentVolumeClaim)>> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &cluster.namespace);
    let list = api
        .list(&ListParams::default().labels(&build::selector_string(&cluster.name)))
        .await
        .map_err(|e| Error::kube(format!("list the PersistentVolumeClaims of RabbitCluster {}", cluster.name), e))?;
    let prefix = format!("{}-{}-", build::statefulset::DATA_VOLUME, cluster.stateful_set_name());
    Ok(list
        .items
        .into_iter()
        .filter(|claim| claim.metadata.deletion_timestamp.is_none())
        .filter_map(|claim| Some((claim.name_any().strip_prefix(&prefix)?.parse().ok()?, claim)))
        .collect())
}

/// The ordinals of the pods whose claims exist (the data a stopped or re-created cluster comes
/// back to), sorted. Read only when the StatefulSet does not say the cluster runs.
pub async fn claimed_ordinals(ctx: &Context, cluster: &ValidatedCluster) -> Result<Vec<i32>> {
    let mut ordinals: Vec<i32> = claims(ctx, cluster).await?.into_iter().map(|(ordinal, _)| ordinal).collect();
    ordinals.sort_unstable();
    Ok(ordinals)
}

/// The ordinals of the pods whose RabbitMQ container runs now.
async fn running_nodes(ctx: &Context, cluster: &ValidatedCluster) -> Result<Vec<i32>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cluster.namespace);
    let list = pods
        .list(&ListParams::default().labels(&build::selector_string(&cluster.name)))
        .await
        .map_err(|e| Error::kube(format!("list the pods of StatefulSet {}", cluster.stateful_set_name()), e))?;
    let prefix = format!("{}-", cluster.stateful_set_name());
    let mut running: Vec<i32> = list
        .items
        .iter()
        .filter(|pod| {
            pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).is_some_and(|statuses| {
                statuses.iter().any(|c| {
                    c.name == build::statefulset::RABBITMQ_CONTAINER
                        && c.state.as_ref().is_some_and(|s| s.running.is_some())
                })
            })
        })
        .filter_map(|pod| pod.name_any().strip_prefix(&prefix)?.parse().ok())
        .collect();
    running.sort_unstable();
    Ok(running)
}

/// Where the bootstrap script copies the cookie at each start (`$HOME/.erlang.cookie`, which
/// Erlang reads): what the running node uses, whatever became of its Secret.
const READ_COOKIE: [&str; 3] = ["sh", "-c", "cat \"$HOME/.erlang.cookie\""];

/// The cookie of a cluster whose cookie Secret is gone, and what was done, for an Event. From a
/// running node when one runs: every other node must boot with that one. When none runs, a new
/// cookie is safe (it is not part of a node's data: every node boots with the new one) and says so.
pub async fn erlang_cookie(ctx: &Context, cluster: &ValidatedCluster) -> Result<(String, String)> {
    let secret = cluster.erlang_cookie_secret_name();
    let running = running_nodes(ctx, cluster).await?;
    let Some(&ordinal) = running.first() else {
        let note = format!(
            "Secret {secret} was missing and no RabbitMQ node runs: a new Erlang cookie was made; every node \
             boots with it (the cookie is not part of a node's data)"
        );
        return Ok((Credentials::generate().erlang_cookie, note));
    };
    let pod = format!("{}-{ordinal}", cluster.stateful_set_name());
    let out = PodExec::new(ctx, cluster).run(ordinal, &READ_COOKIE).await?;
    let cookie = out.trim().to_string();
    if cookie.is_empty() || !cookie.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::SecretMissing {
            name: secret,
            message: format!(
                "is missing and the running node {pod} gave no usable cookie back; restore the Secret (key \
                 {:?}) from a backup: a new cookie would split the pods that restart from those that run",
                build::secrets::COOKIE_KEY
            ),
        });
    }
    Ok((cookie, format!("Secret {secret} was missing: the Erlang cookie was recovered from the running node {pod}")))
}

/// A password hash as RabbitMQ's `rabbit_password_hashing_sha256` makes it: base64 of a 4-byte
/// salt followed by SHA-256(salt ++ password) (RabbitMQ's passwords guide, "computing a hash").
pub fn password_hash(password: &str, salt: [u8; 4]) -> String {
    let digest = Sha256::new().chain_update(salt).chain_update(password.as_bytes()).finalize();
    let mut salted = salt.to_vec();
    salted.extend_from_slice(&digest);
    base64::engine::general_purpose::STANDARD.encode(salted)
}

/// The definitions that make the default user what its Secret says: an administrator with every
/// permission on vhost `/`, as `default_user` makes it on a node's first boot.
pub fn default_user_definitions(credentials: &Credentials, salt: [u8; 4]) -> serde_json::Value {
    serde_json::json!({
        "users": [{
            "name": credentials.username,
            "password_hash": password_hash(&credentials.password, salt),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": "administrator",
            "limits": {},
        }],
        "permissions": [{
            "user": credentials.username, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*",
        }],
    })
}

/// `rabbitmqctl import_definitions` of the definitions given (base64) as the script's argument,
/// through a file only the node's user can read in the pod's /tmp. Not through the command's
/// standard input: RabbitMQ 4.3's Erlang crashes reading a piped stdin (`prim_tty.read`), and an
/// exec whose stdin was closed hung until its time limit on the node tests. The argument holds a
/// salted hash, never the password.
const IMPORT_DEFINITIONS: &str = "umask 077; file=$(mktemp); printf %s \"$1\" | base64 -d > \"$file\"; \
     rabbitmqctl -q import_definitions --format json \"$file\" < /dev/null; status=$?; rm -f \"$file\"; exit $status";

/// Makes the broker's default user match its Secret, through `rabbitmqctl import_definitions` in a
/// running node (it speaks Erlang distribution, so it needs no password): the user is created, or
/// its password, tags and permissions on `/` set again. Only a salted hash goes to the pod
/// (`IMPORT_DEFINITIONS`).
pub async fn restore_default_user(
    ctx: &Context,
    cluster: &ValidatedCluster,
    credentials: &Credentials,
) -> Result<String> {
    let running = running_nodes(ctx, cluster).await?;
    let Some(&ordinal) = running.first() else {
        return Err(Error::SecretMissing {
            name: cluster.default_user_secret_name(),
            message: "does not log in to the broker, and no RabbitMQ node runs to set the user again".into(),
        });
    };
    let definitions = default_user_definitions(credentials, rand::rng().random());
    let json = serde_json::to_vec(&definitions)
        .map_err(|e| Error::Serialization { what: "the default user's definitions".into(), message: e.to_string() })?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(json);
    let command = ["sh", "-c", IMPORT_DEFINITIONS, "import-definitions", encoded.as_str()];
    PodExec::new(ctx, cluster).run(ordinal, &command).await.map_err(|error| match error {
        // Named without its argument: the definitions stay out of Events and logs.
        Error::NodeCommand { pod, message, .. } => {
            Error::NodeCommand { pod, command: "rabbitmqctl import_definitions (the default user)".into(), message }
        }
        other => other,
    })?;
    Ok(format!(
        "the broker's user {} did not match Secret {} (the Secret was re-created or edited): set again from the \
         Secret on {}-{ordinal} (administrator, all permissions on vhost /)",
        credentials.username,
        cluster.default_user_secret_name(),
        cluster.stateful_set_name()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_rabbitmqs_salted_sha256() {
        // Salt 908D C60A and password "test12": RabbitMQ's passwords guide computes
        // kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR.
        assert_eq!(
            password_hash("test12", [0x90, 0x8d, 0xc6, 0x0a]),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
    }

    #[test]
    fn the_definitions_carry_a_hash_never_the_password() {
        let credentials =
            Credentials { username: "warren-u".into(), password: "s3cret-pw".into(), ..Default::default() };
        let text = default_user_definitions(&credentials, [1, 2, 3, 4]).to_string();
        assert!(!text.contains("s3cret-pw"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["users"][0]["name"], "warren-u");
        assert_eq!(value["users"][0]["tags"], "administrator");
        assert_eq!(value["permissions"][0]["vhost"], "/");
    }
}
