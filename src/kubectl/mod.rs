//! `kubectl warren`: the warren binary installed as `kubectl-warren` (kubectl runs any
//! `kubectl-<name>` on its PATH as `kubectl <name>`). What a user of a RabbitCluster asks for
//! without reading Secrets through jsonpath and base64: `status`, `secrets`, `pause`, `resume`;
//! `migrate` is `warren migrate`.

pub mod management;
pub mod status;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;

use crate::api::{PAUSE_ANNOTATION, RabbitCluster};
use crate::controller::build::default_user_secret_name;
use crate::controller::build::secrets::{
    FAILOVER_SEPARATOR, FAILOVER_URIS_KEY, MANAGEMENT_URI_KEY, PASSWORD_KEY, URI_KEY, USERNAME_KEY,
};

/// Output for people (at most 100 columns) or for scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// A failure of a plugin command, printed as `kubectl warren: <message>`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginError(pub String);

fn kube_error(what: String) -> impl FnOnce(kube::Error) -> PluginError {
    move |error| match &error {
        kube::Error::Api(status) if status.code == 404 => PluginError(format!("{what}: not found")),
        _ => PluginError(format!("{what}: {error}")),
    }
}

/// The RabbitCluster `name` in `namespace`; "not found" names both.
pub async fn get_cluster(client: &Client, namespace: &str, name: &str) -> Result<RabbitCluster, PluginError> {
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), namespace);
    api.get(name).await.map_err(kube_error(format!("rabbitcluster {namespace}/{name}")))
}

/// How to connect to a RabbitCluster as its default user, as the operator wrote it in the
/// default-user Secret.
#[derive(Debug, Serialize)]
pub struct Connection {
    pub username: String,
    pub password: String,
    /// Through the client Service: any node.
    pub uri: String,
    /// One per pod, by its stable name: for clients that take a list and fail over themselves.
    pub failover_uris: Vec<String>,
    pub management_uri: String,
}

/// The connection of the RabbitCluster `name`, which must exist: a missing cluster is named as
/// such rather than as a missing Secret.
pub async fn connection(client: &Client, namespace: &str, name: &str) -> Result<Connection, PluginError> {
    get_cluster(client, namespace, name).await?;
    default_user(client, namespace, name).await
}

/// The default-user Secret of the RabbitCluster `name`, read as a [`Connection`].
pub async fn default_user(client: &Client, namespace: &str, name: &str) -> Result<Connection, PluginError> {
    let secret_name = default_user_secret_name(name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets.get(&secret_name).await.map_err(kube_error(format!("secret {namespace}/{secret_name}")))?;
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .ok_or_else(|| PluginError(format!("secret {namespace}/{secret_name} has no {key}")))
    };
    Ok(Connection {
        username: field(USERNAME_KEY)?,
        password: field(PASSWORD_KEY)?,
        uri: field(URI_KEY)?,
        failover_uris: field(FAILOVER_URIS_KEY)?
            .split(FAILOVER_SEPARATOR)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
        management_uri: field(MANAGEMENT_URI_KEY)?,
    })
}

pub fn render_connection(connection: &Connection) -> String {
    let mut text = format!(
        "username    {}\npassword    {}\nuri         {}\nmanagement  {}\n",
        connection.username, connection.password, connection.uri, connection.management_uri
    );
    for (i, uri) in connection.failover_uris.iter().enumerate() {
        text.push_str(&format!("{}{uri}\n", if i == 0 { "failover    " } else { "            " }));
    }
    text
}

/// Sets or removes the annotation that pauses reconciliation; returns what the user reads.
pub async fn set_paused(client: &Client, namespace: &str, name: &str, paused: bool) -> Result<String, PluginError> {
    get_cluster(client, namespace, name).await?;
    let api: Api<RabbitCluster> = Api::namespaced(client.clone(), namespace);
    let value = if paused { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"annotations": {PAUSE_ANNOTATION: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_error(format!("rabbitcluster {namespace}/{name}")))?;
    Ok(if paused {
        format!(
            "rabbitcluster {namespace}/{name} paused: the operator changes nothing of it until \
             `kubectl warren resume {name}`"
        )
    } else {
        format!("rabbitcluster {namespace}/{name} resumed: the operator reconciles it again")
    })
}

/// Cuts `text` to `width` characters, marking the cut with `…`.
pub fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_text_lists_one_failover_uri_per_line_and_fit_cuts_long_cells() {
        let connection = Connection {
            username: "u".into(),
            password: "p".into(),
            uri: "amqp://u:p@demo.apps.svc.cluster.local:5672//".into(),
            failover_uris: vec!["amqp://a".into(), "amqp://b".into()],
            management_uri: "http://demo.apps.svc.cluster.local:15672".into(),
        };
        assert_eq!(
            render_connection(&connection),
            "username    u\npassword    p\nuri         amqp://u:p@demo.apps.svc.cluster.local:5672//\n\
             management  http://demo.apps.svc.cluster.local:15672\n\
             failover    amqp://a\n            amqp://b\n"
        );
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("a-very-long-queue-name", 10), "a-very-lo…");
    }
}
