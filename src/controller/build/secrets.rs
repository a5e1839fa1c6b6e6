//! The Erlang cookie Secret and the default-user Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rand::Rng;
use rand::distr::Alphanumeric;

use super::kept_meta;
use super::services::{AMQP_PORT, AMQPS_PORT, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT};
use crate::controller::validate::ValidatedCluster;
use crate::rabbitmq::management::encode;

pub const COOKIE_KEY: &str = "cookie";
pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";
pub const DEFAULT_USER_CONF_KEY: &str = "default_user.conf";
/// The default-user Secret's connection keys (for apps, and for `kubectl warren secrets`).
pub const URI_KEY: &str = "uri";
pub const FAILOVER_URIS_KEY: &str = "failover-uris";
pub const MANAGEMENT_URI_KEY: &str = "management-uri";
/// What separates the URIs of `failover-uris` (the list Celery/kombu take as `broker_url`).
pub const FAILOVER_SEPARATOR: &str = ";";

/// The secrets of one cluster. Generated once; afterwards always read back from the Secrets, because
/// a changed cookie splits the cluster and a changed password locks clients out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub erlang_cookie: String,
    pub username: String,
    pub password: String,
}

// Never print secrets, not even in a debug log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

fn random_alphanumeric(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

impl Credentials {
    /// Fresh random credentials: never `guest`, never a fixed password.
    pub fn generate() -> Self {
        Self {
            // Erlang accepts any printable characters; upper case letters are what it generates itself.
            erlang_cookie: random_alphanumeric(48).to_ascii_uppercase(),
            username: format!("warren-{}", random_alphanumeric(12).to_ascii_lowercase()),
            password: random_alphanumeric(32),
        }
    }
}

/// The conf.d fragment that creates the default user on a node's first boot.
pub fn default_user_conf(credentials: &Credentials) -> String {
    format!(
        "default_user = {}\ndefault_pass = {}\ndefault_user_tags.administrator = true\n\
         default_permissions.configure = .*\ndefault_permissions.read = .*\ndefault_permissions.write = .*\n",
        credentials.username, credentials.password
    )
}

// `data`, not `stringData`: server-side apply tracks `data`, and `stringData` never reads back.
fn secret(metadata: ObjectMeta, data: BTreeMap<String, String>) -> Secret {
    let data = data.into_iter().map(|(key, value)| (key, ByteString(value.into_bytes()))).collect();
    Secret { metadata, type_: Some("Opaque".to_string()), data: Some(data), ..Default::default() }
}

pub fn erlang_cookie_secret(cluster: &ValidatedCluster, credentials: &Credentials) -> Secret {
    secret(
        kept_meta(cluster, &cluster.erlang_cookie_secret_name()),
        BTreeMap::from([(COOKIE_KEY.to_string(), credentials.erlang_cookie.clone())]),
    )
}

/// An AMQP URI of the default vhost: `amqps` on 5671 when the cluster has TLS.
fn amqp_uri(cluster: &ValidatedCluster, user: &str, password: &str, host: &str) -> String {
    let (scheme, port) = amqp_scheme_port(cluster);
    // `//` is the default vhost "/" in the AMQP URI form kombu and pika read.
    format!("{scheme}://{user}:{password}@{host}:{port}//")
}

/// What clients use: TLS when the cluster has it.
fn amqp_scheme_port(cluster: &ValidatedCluster) -> (&'static str, i32) {
    if cluster.tls.is_some() { ("amqps", AMQPS_PORT) } else { ("amqp", AMQP_PORT) }
}

/// Credentials plus ready-made connection strings: `uri` through the client Service and
/// `failover-uris`, one URI per node joined by `;`, the failover list Celery/kombu accept.
pub fn default_user_secret(cluster: &ValidatedCluster, credentials: &Credentials) -> Secret {
    let user = encode(&credentials.username);
    let password = encode(&credentials.password);
    let host = cluster.client_service_host();
    let failover: Vec<String> =
        (0..cluster.replicas).map(|ordinal| amqp_uri(cluster, &user, &password, &cluster.pod_host(ordinal))).collect();
    let management_uri = if cluster.tls.is_some() {
        format!("https://{host}:{MANAGEMENT_TLS_PORT}")
    } else {
        format!("http://{host}:{MANAGEMENT_PORT}")
    };
    secret(
        kept_meta(cluster, &cluster.default_user_secret_name()),
        BTreeMap::from([
            (USERNAME_KEY.to_string(), credentials.username.clone()),
            (PASSWORD_KEY.to_string(), credentials.password.clone()),
            ("host".to_string(), host.clone()),
            ("port".to_string(), amqp_scheme_port(cluster).1.to_string()),
            (URI_KEY.to_string(), amqp_uri(cluster, &user, &password, &host)),
            (FAILOVER_URIS_KEY.to_string(), failover.join(FAILOVER_SEPARATOR)),
            (MANAGEMENT_URI_KEY.to_string(), management_uri),
            (DEFAULT_USER_CONF_KEY.to_string(), default_user_conf(credentials)),
        ]),
    )
}
