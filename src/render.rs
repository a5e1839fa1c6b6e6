//! `warren render`: every object the operator would create for a RabbitCluster, as YAML.

use kube::ResourceExt;

use crate::api::RabbitCluster;
use crate::controller::build::{self, Credentials, Resources};
use crate::controller::validate::{self, Settings};
use crate::error::{Error, Result, SpecReason};

/// Placeholder credentials shown instead of real secrets: rendering never invents a password that
/// someone could mistake for the real one.
fn placeholder_credentials() -> Credentials {
    Credentials {
        erlang_cookie: "<generated-once-by-the-operator>".into(),
        username: "<generated-username>".into(),
        password: "<generated-password>".into(),
    }
}

/// Renders a RabbitCluster manifest (YAML) into a multi-document YAML stream.
pub fn render(manifest: &str, settings: &Settings) -> Result<String> {
    let mut cluster: RabbitCluster = serde_yaml::from_str(manifest).map_err(|e| Error::InvalidSpec {
        reason: SpecReason::InvalidManifest,
        message: format!("not a RabbitCluster manifest: {e}"),
    })?;
    // Objects read from a file have no namespace or uid yet; the API server would give them these.
    if cluster.namespace().is_none() {
        cluster.metadata.namespace = Some("default".into());
    }
    if cluster.metadata.uid.is_none() {
        cluster.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    }
    let validated = validate::validate(&cluster, settings)?;
    let Resources {
        headless_service,
        client_service,
        erlang_cookie_secret,
        default_user_secret,
        config_map,
        service_account,
        pod_disruption_budget,
        network_policy,
        stateful_set,
    } = build::build(&validated, &placeholder_credentials());
    let mut documents = vec![
        to_yaml(&service_account)?,
        to_yaml(&erlang_cookie_secret)?,
        to_yaml(&default_user_secret)?,
        to_yaml(&config_map)?,
        to_yaml(&headless_service)?,
        to_yaml(&client_service)?,
        to_yaml(&pod_disruption_budget)?,
        to_yaml(&stateful_set)?,
    ];
    if let Some(network_policy) = network_policy {
        documents.push(to_yaml(&network_policy)?);
    }
    Ok(documents.iter().map(|d| format!("---\n{d}")).collect())
}

fn to_yaml<K: serde::Serialize>(object: &K) -> Result<String> {
    // k8s-openapi's types serialize with their apiVersion and kind.
    serde_yaml::to_string(object)
        .map_err(|e| Error::Serialization { what: "the rendered objects".into(), message: e.to_string() })
}
