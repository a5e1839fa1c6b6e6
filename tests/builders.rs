//! Tier 1: from a RabbitCluster fixture to every child object, with no API at all.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use testkit::fixture;
use warren::controller::build::{self, CONFIG_HASH_ANNOTATION, Credentials, Resources};
use warren::controller::validate::{Settings, ValidatedCluster, parse_quantity_bytes, validate};

fn credentials() -> Credentials {
    Credentials { erlang_cookie: "COOKIECOOKIE".into(), username: "warren-user".into(), password: "s3cret".into() }
}

fn built(name: &str) -> (ValidatedCluster, Resources) {
    let validated = validate(&fixture(name), &Settings::default()).expect("valid fixture");
    let resources = build::build(&validated, &credentials());
    (validated, resources)
}

fn json_of<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("serialize")
}

fn secret_text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("data");
    String::from_utf8(data.get(key).unwrap_or_else(|| panic!("key {key}")).0.clone()).expect("utf-8")
}

fn env_of(sts: &Value) -> BTreeMap<String, Value> {
    sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.get("value").cloned().unwrap_or(e["valueFrom"].clone())))
        .collect()
}

#[test]
fn every_child_is_labelled_and_namespaced_and_owned_but_the_credentials() {
    let (_, r) = built("basic.yaml");
    let metas = [
        json_of(&r.headless_service),
        json_of(&r.client_service),
        json_of(&r.erlang_cookie_secret),
        json_of(&r.default_user_secret),
        json_of(&r.config_map),
        json_of(&r.service_account),
        json_of(&r.pod_disruption_budget),
        json_of(&r.stateful_set),
    ];
    let names: Vec<&str> = metas.iter().map(|m| m["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "demo-nodes",
            "demo",
            "demo-erlang-cookie",
            "demo-default-user",
            "demo-config",
            "demo-rabbitmq",
            "demo",
            "demo"
        ]
    );
    for object in &metas {
        let meta = &object["metadata"];
        assert_eq!(meta["namespace"], "default", "{}", meta["name"]);
        assert_eq!(meta["labels"]["app.kubernetes.io/instance"], "demo");
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "warren");
        // The cookie and the default user outlive the RabbitCluster, as the claims do: the data
        // they open is still there (the re-created RabbitCluster adopts them by their labels).
        if object["kind"] == "Secret" {
            assert!(meta["ownerReferences"].is_null(), "{} is garbage-collected with the cluster", meta["name"]);
            continue;
        }
        let owner = &meta["ownerReferences"][0];
        assert_eq!(owner["kind"], "RabbitCluster");
        assert_eq!(owner["apiVersion"], "warren.dev/v1alpha1");
        assert_eq!(owner["uid"], "6f1c1c1e-0000-4000-8000-000000000001");
        assert_eq!(owner["controller"], true);
    }
}

#[test]
fn stateful_set_starts_in_parallel_keeps_volumes_until_scaled_down_and_runs_non_root() {
    let (_, r) = built("basic.yaml");
    let sts = json_of(&r.stateful_set);
    let spec = &sts["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    assert_eq!(spec["serviceName"], "demo-nodes");
    // Deleting the RabbitCluster or scaling the StatefulSet by hand keeps the data; the claim of a
    // node the operator removed is deleted by its forget step, not by Kubernetes.
    assert_eq!(spec["persistentVolumeClaimRetentionPolicy"], json!({"whenDeleted": "Retain", "whenScaled": "Retain"}));
    assert_eq!(spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "10Gi");
    assert_eq!(spec["volumeClaimTemplates"][0]["spec"]["accessModes"], json!(["ReadWriteOnce"]));

    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 999);
    assert_eq!(pod["securityContext"]["fsGroup"], 999);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "demo-rabbitmq");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "rabbitmq:4.1.4-management");
    assert_eq!(container["command"], json!(["/bin/bash", "/etc/warren/config/bootstrap.sh"]));
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        container["lifecycle"]["preStop"]["exec"]["command"],
        json!(["/bin/bash", "/etc/warren/config/pre-stop.sh"])
    );
    assert_eq!(container["readinessProbe"]["exec"]["command"], json!(["/bin/bash", "/etc/warren/config/ready.sh"]));
    // Checked on the typed object: a misspelt JSON key would pass a lookup of it.
    let typed = r.stateful_set.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|p| &p.containers[0]);
    assert!(typed.is_some_and(|c| c.liveness_probe.is_none()), "a liveness probe would kill nodes waiting for peers");
    assert_eq!(container["resources"]["limits"]["memory"], "2Gi");
    assert_eq!(container["resources"]["requests"]["cpu"], "1");
    let ports: Vec<i64> =
        container["ports"].as_array().unwrap().iter().map(|p| p["containerPort"].as_i64().unwrap()).collect();
    assert_eq!(ports, [4369, 5672, 15672, 15692, 25672]);

    let env = env_of(&sts);
    assert_eq!(env["RABBITMQ_NODENAME"], "rabbit@$(POD_NAME).demo-nodes.$(POD_NAMESPACE).svc.cluster.local");
    assert_eq!(env["RABBITMQ_USE_LONGNAME"], "true");
    assert_eq!(env["WARREN_STS_NAME"], "demo");
    assert_eq!(env["POD_NAME"]["fieldRef"]["fieldPath"], "metadata.name");

    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(anti["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "demo");

    let volumes: Vec<&str> = pod["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(volumes, ["config", "rabbitmq-conf-d", "erlang-cookie", "tmp", "log"]);
    let projected = &pod["volumes"][1]["projected"]["sources"];
    assert_eq!(projected[1]["secret"]["name"], "demo-default-user");
    assert_eq!(projected[1]["secret"]["items"][0]["key"], "default_user.conf");
    assert_eq!(pod["volumes"][2]["secret"]["secretName"], "demo-erlang-cookie");
    let hash = spec["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION].as_str().unwrap();
    assert_eq!(hash.len(), 16);
    // A Prometheus without the Prometheus operator finds the per-queue metrics by these.
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15692");
    assert_eq!(annotations["prometheus.io/path"], "/metrics/per-object");
}

#[test]
fn config_map_holds_partition_handling_watermark_plugins_and_scripts() {
    let (_, r) = built("basic.yaml");
    let data = r.config_map.data.as_ref().unwrap();
    let conf = &data["10-operator.conf"];
    assert!(conf.contains("\ncluster_partition_handling = pause_minority\n"), "{conf}");
    assert!(conf.contains("\ncluster_name = demo\n"), "{conf}");
    // 40% of the 2Gi default limit.
    assert!(conf.contains("\nvm_memory_high_watermark.absolute = 858993459\n"), "{conf}");
    assert!(!conf.contains("ssl"), "no TLS listeners without spec.tls: {conf}");
    assert_eq!(data["enabled_plugins"], "[rabbitmq_management,rabbitmq_prometheus].\n");
    assert_eq!(data["advanced.config"], "[].\n");
    assert_eq!(data["replicas"], "3");
    assert!(data["bootstrap.sh"].contains("join_cluster"));
    assert!(data["bootstrap.sh"].contains("forget_cluster_node"));
    assert!(data["bootstrap.sh"].contains("the cluster formed before: waiting for a member to join"));
    assert_eq!(data["formed"], "false", "a new cluster has not formed yet");
    assert!(data["pre-stop.sh"].contains("await_online_synchronized_mirror"));
    assert!(data["pre-stop.sh"].contains("await_online_quorum_plus_one"));
    assert!(data["ready.sh"].contains("warren-clustered"));
}

#[test]
fn scaling_does_not_restart_pods_but_a_config_change_does() {
    let mut cluster = fixture("basic.yaml");
    let settings = Settings::default();
    let hash = |cluster: &warren::api::RabbitCluster| {
        let r = build::build(&validate(cluster, &settings).unwrap(), &credentials());
        (json_of(&r.stateful_set)["spec"]["template"].clone(), r.config_map.data.unwrap()["replicas"].clone())
    };
    let (template_3, replicas_3) = hash(&cluster);
    cluster.spec.replicas = 5;
    let (template_5, replicas_5) = hash(&cluster);
    assert_eq!(template_3, template_5, "the pod template must not change with the replica count");
    assert_eq!((replicas_3.as_str(), replicas_5.as_str()), ("3", "5"));
    // Once the broker reported members, the ConfigMap says the cluster formed (node 0 without data
    // then joins instead of seeding), without restarting a pod.
    let formed = |cluster: &warren::api::RabbitCluster| {
        let r = build::build(&validate(cluster, &settings).unwrap(), &credentials());
        (json_of(&r.stateful_set)["spec"]["template"].clone(), r.config_map.data.unwrap()["formed"].clone())
    };
    let (template_new, formed_new) = formed(&cluster);
    cluster.status = Some(warren::api::RabbitClusterStatus {
        members: vec!["rabbit@demo-0.demo-nodes.default.svc.cluster.local".into()],
        ..Default::default()
    });
    let (template_formed, formed_formed) = formed(&cluster);
    assert_eq!((formed_new.as_str(), formed_formed.as_str()), ("false", "true"));
    assert_eq!(template_new, template_formed, "the pod template must not change when the cluster forms");
    cluster.status = None;
    cluster.spec.partition_handling = warren::api::PartitionHandling::Autoheal;
    let (template_autoheal, _) = hash(&cluster);
    assert_ne!(
        template_3["metadata"]["annotations"][CONFIG_HASH_ANNOTATION],
        template_autoheal["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    );
}

#[test]
fn services_headless_for_peers_and_client_for_ready_pods() {
    let (_, r) = built("basic.yaml");
    let headless = json_of(&r.headless_service);
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let ports: Vec<&str> =
        headless["spec"]["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(ports, ["epmd", "cluster-rpc", "amqp", "management"]);
    let client = json_of(&r.client_service);
    assert_eq!(client["spec"]["type"], "ClusterIP");
    let typed = r.client_service.spec.as_ref();
    assert!(typed.is_some_and(|s| s.publish_not_ready_addresses.is_none()), "not-ready pods must not take clients");
    let ports: Vec<i64> =
        client["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()).collect();
    assert_eq!(ports, [5672, 15672, 15692]);
    assert_eq!(client["spec"]["selector"]["app.kubernetes.io/instance"], "demo");
}

#[test]
fn secrets_hold_the_cookie_credentials_and_failover_uris() {
    let (_, r) = built("basic.yaml");
    assert_eq!(secret_text(&r.erlang_cookie_secret, "cookie"), "COOKIECOOKIE");
    let user = &r.default_user_secret;
    assert_eq!(secret_text(user, "username"), "warren-user");
    assert_eq!(secret_text(user, "password"), "s3cret");
    assert_eq!(secret_text(user, "uri"), "amqp://warren-user:s3cret@demo.default.svc.cluster.local:5672//");
    let failover = secret_text(user, "failover-uris");
    let uris: Vec<&str> = failover.split(';').collect();
    assert_eq!(uris.len(), 3);
    assert_eq!(uris[2], "amqp://warren-user:s3cret@demo-2.demo-nodes.default.svc.cluster.local:5672//");
    let conf = secret_text(user, "default_user.conf");
    assert!(conf.contains("default_user = warren-user\n") && conf.contains("default_pass = s3cret\n"), "{conf}");
    assert!(conf.contains("default_user_tags.administrator = true"));
}

#[test]
fn pdb_allows_one_node_down_and_service_account_has_no_token() {
    let (_, r) = built("basic.yaml");
    let pdb = json_of(&r.pod_disruption_budget);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], "rabbitmq");
    assert_eq!(r.service_account.automount_service_account_token, Some(false));
}

#[test]
fn classic_mirrored_3x_fixture_sets_plugins_memory_and_additional_config() {
    let (validated, r) = built("classic-mirrored-3x.yaml");
    assert_eq!(validated.image_version.map(|v| v.to_string()).as_deref(), Some("3.13.7"));
    let data = r.config_map.data.as_ref().unwrap();
    assert_eq!(
        data["enabled_plugins"],
        "[rabbitmq_management,rabbitmq_prometheus,rabbitmq_shovel,rabbitmq_shovel_management].\n"
    );
    assert!(data["10-operator.conf"].contains("vm_memory_high_watermark.absolute = 429496729\n"));
    assert!(data["90-additional.conf"].contains("consumer_timeout = 3600000\n"));
    let sts = json_of(&r.stateful_set);
    assert_eq!(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "20Gi");
}

#[test]
fn tls_fixture_adds_listeners_ports_and_volumes() {
    let (_, r) = built("tls.yaml");
    let conf = &r.config_map.data.as_ref().unwrap()["10-operator.conf"];
    assert!(conf.contains("listeners.ssl.default = 5671\n"), "{conf}");
    assert!(conf.contains("ssl_options.certfile = /etc/warren/tls/tls.crt\n"));
    assert!(conf.contains("management.ssl.port = 15671\n"));
    let client = json_of(&r.client_service);
    assert_eq!(client["spec"]["type"], "LoadBalancer");
    let ports: Vec<i64> =
        client["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()).collect();
    assert_eq!(ports, [5672, 15672, 15692, 5671, 15671]);
    let pod = &json_of(&r.stateful_set)["spec"]["template"]["spec"];
    let tls_volumes: Vec<&Value> =
        pod["volumes"].as_array().unwrap().iter().filter(|v| v["name"].as_str().unwrap().starts_with("tls")).collect();
    assert_eq!(tls_volumes.len(), 2);
    assert_eq!(tls_volumes[0]["secret"]["secretName"], "secure-tls");
    assert_eq!(tls_volumes[1]["secret"]["secretName"], "secure-tls");
}

#[test]
fn tls_only_closes_the_plain_listeners_and_hands_out_amqps_uris() {
    let mut cluster = fixture("tls.yaml");
    cluster.spec.tls.as_mut().unwrap().disable_non_tls_listeners = true;
    let validated = validate(&cluster, &Settings::default()).expect("valid");
    let r = build::build(&validated, &credentials());
    let conf = &r.config_map.data.as_ref().unwrap()["10-operator.conf"];
    assert!(conf.contains("listeners.tcp = none\n") && conf.contains("listeners.ssl.default = 5671\n"), "{conf}");
    assert!(!conf.contains("listeners.tcp.default") && !conf.contains("management.tcp.port"), "{conf}");
    let ports = |service: &Value| -> Vec<i64> {
        service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_i64().unwrap()).collect()
    };
    assert_eq!(ports(&json_of(&r.client_service)), [15692, 5671, 15671]);
    assert_eq!(ports(&json_of(&r.headless_service)), [4369, 25672, 5671, 15671]);
    let container = &json_of(&r.stateful_set)["spec"]["template"]["spec"]["containers"][0];
    let probe_port = container["env"].as_array().unwrap().iter().find(|e| e["name"] == "WARREN_AMQP_PORT");
    assert_eq!(probe_port.map(|e| &e["value"]), Some(&Value::from("5671")), "the readiness probe's port");
    let data = r.default_user_secret.data.as_ref().unwrap();
    let text = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    assert!(text("uri").starts_with("amqps://") && text("uri").contains(":5671/"), "{}", text("uri"));
    assert!(text("failover-uris").split(';').all(|u| u.starts_with("amqps://")), "{}", text("failover-uris"));
    assert_eq!(text("port"), "5671");
    assert!(text("management-uri").starts_with("https://") && text("management-uri").ends_with(":15671"));
    // Without TLS only, the plain listeners stay and the probe keeps its default port.
    let (_, both) = built("tls.yaml");
    let container = &json_of(&both.stateful_set)["spec"]["template"]["spec"]["containers"][0];
    assert!(!container["env"].as_array().unwrap().iter().any(|e| e["name"] == "WARREN_AMQP_PORT"));
}

#[test]
fn prometheus_over_tls_replaces_the_plain_endpoint() {
    let mut cluster = fixture("tls.yaml");
    cluster.spec.tls.as_mut().unwrap().prometheus = true;
    let validated = validate(&cluster, &Settings::default()).expect("valid");
    let r = build::build(&validated, &credentials());
    let conf = &r.config_map.data.as_ref().unwrap()["10-operator.conf"];
    assert!(conf.contains("prometheus.ssl.port = 15691\n"), "{conf}");
    assert!(conf.contains("prometheus.ssl.certfile = /etc/warren/tls/tls.crt\n"), "{conf}");
    assert!(conf.contains("prometheus.tcp.ip = 127.0.0.1\n"), "the plain endpoint open beyond the pod: {conf}");
    let client = json_of(&r.client_service);
    let named: Vec<(&str, i64)> = client["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap()))
        .collect();
    assert!(named.contains(&("prometheus-tls", 15691)) && !named.iter().any(|(_, p)| *p == 15692), "{named:?}");
    let template = &json_of(&r.stateful_set)["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(
        (&annotations["prometheus.io/port"], &annotations["prometheus.io/scheme"]),
        (&json!("15691"), &json!("https"))
    );
    let container_ports: Vec<i64> = template["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert!(container_ports.contains(&15691) && !container_ports.contains(&15692), "{container_ports:?}");
    // Without it: plain, and no scheme annotation (a new one would roll every cluster's pods).
    let (_, plain) = built("tls.yaml");
    let annotations = &json_of(&plain.stateful_set)["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        (&annotations["prometheus.io/port"], &annotations["prometheus.io/scheme"]),
        (&json!("15692"), &Value::Null)
    );
}

#[test]
fn inter_node_tls_runs_the_distribution_and_the_cli_over_tls_and_is_not_changed_while_pods_run() {
    let mut cluster = fixture("tls.yaml");
    cluster.spec.tls.as_mut().unwrap().inter_node = true;
    let validated = validate(&cluster, &Settings::default()).expect("valid");
    let r = build::build(&validated, &credentials());
    let options = &r.config_map.data.as_ref().unwrap()["inter-node-tls.config"];
    for says in [
        "{server, [",
        "{client, [",
        "{cacertfile, \"/etc/warren/tls-ca/ca.crt\"}",
        "{keyfile, \"/etc/warren/tls/tls.key\"}",
        "{verify, verify_peer}",
        "{fail_if_no_peer_cert, true}",
    ] {
        assert!(options.contains(says), "{says} not in {options}");
    }
    assert!(options.trim_end().ends_with("]."), "an Erlang term file: {options}");
    let sts = json_of(&r.stateful_set);
    let env = env_of(&sts);
    let args = "-proto_dist inet_tls -ssl_dist_optfile /etc/warren/config/inter-node-tls.config";
    assert_eq!(env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"], json!(args));
    assert_eq!(env["RABBITMQ_CTL_ERL_ARGS"], json!(args), "the CLI tools must speak TLS to their node");
    let container: k8s_openapi::api::core::v1::Container =
        serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0].clone()).unwrap();
    assert!(build::statefulset::runs_inter_node_tls(&container));

    // Turned on or off while pods run: refused, naming the field and the way (stop first).
    use warren::controller::validate::check_inter_node_change;
    let error = check_inter_node_change(Some(false), Some(3), &validated).expect_err("plain to TLS while running");
    assert_eq!(error.reason(), "InterNodeTlsChange");
    assert!(error.to_string().contains("spec.tls.interNode") && error.to_string().contains("spec.replicas: 0"));
    assert!(check_inter_node_change(Some(false), Some(0), &validated).is_ok(), "stopped: allowed");
    assert!(check_inter_node_change(None, None, &validated).is_ok(), "a new cluster");
    assert!(check_inter_node_change(Some(true), Some(3), &validated).is_ok(), "no change");
    let (_, plain) = built("tls.yaml");
    assert!(!plain.config_map.data.as_ref().unwrap().contains_key("inter-node-tls.config"));
}

#[test]
fn spread_prefers_or_requires_a_node_per_pod_and_can_spread_over_zones() {
    let spec_of = |r: &Resources| json_of(&r.stateful_set)["spec"]["template"]["spec"].clone();
    // Default: preferred, one term on the hostname; no topology spread (existing pods do not roll).
    let (_, r) = built("basic.yaml");
    let pod = spec_of(&r);
    let anti = &pod["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert!(anti["requiredDuringSchedulingIgnoredDuringExecution"].is_null());
    assert!(pod["topologySpreadConstraints"].is_null());

    let mut cluster = fixture("basic.yaml");
    cluster.spec.spread.nodes = warren::api::NodeSpread::Required;
    cluster.spec.spread.zones = true;
    let r = build::build(&validate(&cluster, &Settings::default()).expect("valid"), &credentials());
    let pod = spec_of(&r);
    let required = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(required["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(required["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"], "demo");
    let zones = &pod["topologySpreadConstraints"][0];
    assert_eq!(
        (&zones["topologyKey"], &zones["maxSkew"], &zones["whenUnsatisfiable"]),
        (&json!("topology.kubernetes.io/zone"), &json!(1), &json!("DoNotSchedule"))
    );

    // Required with an affinity of the user's, which replaces the default: refused, naming both.
    cluster.spec.affinity = Some(Default::default());
    let error = validate(&cluster, &Settings::default()).expect_err("both");
    assert!(error.to_string().contains("spec.spread.nodes") && error.to_string().contains("spec.affinity"), "{error}");
}

#[test]
fn bad_specs_are_refused_with_a_reason_that_names_the_field() {
    let cases = [
        ("bad-mirrored-on-4x.yaml", "ClassicMirroringUnsupported", "ClassicMirrored"),
        ("bad-storage.yaml", "InvalidStorage", "spec.persistence.storage"),
        ("bad-partition-in-additional-config.yaml", "InvalidConfig", "cluster_partition_handling"),
        ("bad-exactly-without-params.yaml", "InvalidHighAvailability", "haParams"),
        ("bad-negative-replicas.yaml", "InvalidReplicas", "spec.replicas"),
        ("bad-quorum-on-3-10.yaml", "QuorumDefaultUnsupported", "3.10.8"),
    ];
    for (file, reason, field) in cases {
        let error = validate(&fixture(file), &Settings::default()).expect_err(file);
        assert_eq!(error.reason(), reason, "{file}: {error}");
        assert!(error.to_string().contains(field), "{file}: {error:?} should name {field}");
        assert!(!error.is_retriable(), "{file}: a bad spec waits for the user");
    }
}

#[test]
fn even_replica_counts_are_accepted_with_a_warning() {
    let validated = validate(&fixture("even-replicas.yaml"), &Settings::default()).unwrap();
    assert_eq!(validated.replicas, 4);
    assert_eq!(validated.warnings.len(), 1);
    assert!(validated.warnings[0].contains("even"), "{:?}", validated.warnings);
    assert!(validate(&fixture("basic.yaml"), &Settings::default()).unwrap().warnings.is_empty());
}

#[test]
fn quantities_parse_like_kubernetes() {
    assert_eq!(parse_quantity_bytes("2Gi"), Ok(2 * 1024 * 1024 * 1024));
    assert_eq!(parse_quantity_bytes("1.5Gi"), Ok(1_610_612_736));
    assert_eq!(parse_quantity_bytes("500M"), Ok(500_000_000));
    assert_eq!(parse_quantity_bytes("1073741824"), Ok(1_073_741_824));
    assert!(parse_quantity_bytes("10Gb").is_err());
    assert!(parse_quantity_bytes("lots").is_err());
}

#[test]
fn generated_credentials_are_random_and_never_printed() {
    let a = Credentials::generate();
    let b = Credentials::generate();
    assert_ne!(a.password, b.password);
    assert_ne!(a.erlang_cookie, b.erlang_cookie);
    assert_ne!(a.username, "guest");
    assert!(a.username.starts_with("warren-") && a.username.len() == 19);
    assert_eq!(a.password.len(), 32);
    assert_eq!(a.erlang_cookie.len(), 48);
    let debug = format!("{a:?}");
    assert!(!debug.contains(&a.password) && !debug.contains(&a.erlang_cookie), "{debug}");
}

#[test]
fn render_prints_every_object_without_real_secrets() {
    let manifest = std::fs::read_to_string(format!("{}/examples/basic.yaml", testkit::repo())).unwrap();
    let yaml = warren::render::render(&manifest, &Settings::default()).expect("render");
    let kinds: Vec<&str> = yaml.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "Secret",
            "Secret",
            "ConfigMap",
            "Service",
            "Service",
            "PodDisruptionBudget",
            "StatefulSet",
            "NetworkPolicy"
        ]
    );
    let bad = std::fs::read_to_string(format!("{}/tests/fixtures/bad-storage.yaml", testkit::repo())).unwrap();
    let error = warren::render::render(&bad, &Settings::default()).expect_err("bad storage");
    assert_eq!(error.reason(), "InvalidStorage");
}

#[test]
fn crds_directory_and_chart_crds_are_up_to_date() {
    for file in ["crds/warren.dev.yaml", "charts/warren/crds/warren.dev.yaml"] {
        let committed = std::fs::read_to_string(format!("{}/{file}", testkit::repo())).unwrap();
        assert!(committed == warren::crds_yaml(), "{file} is stale: run `make crds`");
    }
}

#[test]
fn a_patch_release_changes_only_the_image_and_rolls_one_pod_at_a_time() {
    let (_, before) = built("basic.yaml");
    let mut cluster = fixture("basic.yaml");
    cluster.spec.image = "rabbitmq:4.1.5-management".into();
    let after = build::build(&validate(&cluster, &Settings::default()).expect("valid"), &credentials());
    let (mut old, new) = (json_of(&before.stateful_set), json_of(&after.stateful_set));
    // The StatefulSet controller's RollingUpdate replaces one pod at a time (maxUnavailable unset
    // is 1, no partition), each stopped through the preStop hook: nothing here overrides it.
    assert_eq!(new["spec"]["updateStrategy"], json!({"type": "RollingUpdate"}));
    assert_eq!(new["spec"]["template"]["spec"]["containers"][0]["image"], "rabbitmq:4.1.5-management");
    old["spec"]["template"]["spec"]["containers"][0]["image"] = json!("rabbitmq:4.1.5-management");
    assert_eq!(old, new, "a patch release changes nothing but the image");
    assert_eq!(json_of(&before.config_map), json_of(&after.config_map));
}

#[test]
fn partition_handling_other_than_the_default_is_flagged_where_it_has_no_effect() {
    let mut cluster = fixture("basic.yaml");
    cluster.spec.partition_handling = warren::api::PartitionHandling::Ignore;
    assert!(validate(&cluster, &Settings::default()).unwrap().warnings.is_empty(), "4.1 honours it");
    cluster.spec.image = "rabbitmq:4.3.6-management".into();
    let warnings = validate(&cluster, &Settings::default()).unwrap().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("partitionHandling ignore has no effect on RabbitMQ 4.3.6"), "{warnings:?}");
    cluster.spec.partition_handling = warren::api::PartitionHandling::PauseMinority;
    assert!(validate(&cluster, &Settings::default()).unwrap().warnings.is_empty(), "the default is what 4.3 does");
}

/// 4.2 → 4.3 on a Mnesia cluster: refused while `khepri_db` is disabled, naming it and the
/// annotation that enables it; allowed once the broker reports it enabled. A patch release is never
/// held back by a flag.
#[test]
fn a_next_minor_is_refused_while_a_flag_it_requires_is_disabled() {
    use warren::controller::validate::{RunningBroker, check_in_place_upgrade};
    use warren::rabbitmq::version::RabbitVersion;
    let mut cluster = fixture("basic.yaml");
    cluster.spec.image = "rabbitmq:4.3.6-management".into();
    let validated = validate(&cluster, &Settings::default()).expect("valid");
    let version = RabbitVersion::parse("4.2.3");
    let khepri_off = RunningBroker { version, disabled_feature_flags: vec!["khepri_db".into()], ..Default::default() };
    let error = check_in_place_upgrade(&khepri_off, &validated).expect_err("refused");
    assert_eq!(error.reason(), "UpgradeRefused");
    let text = error.to_string();
    for says in ["khepri_db", "warren.dev/enable-feature-flags=khepri_db", "from 4.2.3 to 4.3.6"] {
        assert!(text.contains(says), "{says:?} not in {text}");
    }
    assert!(check_in_place_upgrade(&RunningBroker { version, ..Default::default() }, &validated).is_ok());
    cluster.spec.image = "rabbitmq:4.2.9-management".into();
    let patch = validate(&cluster, &Settings::default()).expect("valid");
    assert!(check_in_place_upgrade(&khepri_off, &patch).is_ok());
}

/// 3.13 → 4.x in place while classic queues are mirrored: refused, naming them and the way out;
/// allowed once none is (quorum queues, or queues moved by a migration).
#[test]
fn three_thirteen_to_four_is_refused_while_queues_are_mirrored() {
    use warren::controller::validate::{RunningBroker, check_in_place_upgrade};
    use warren::rabbitmq::version::RabbitVersion;
    let mut cluster = fixture("basic.yaml");
    cluster.spec.image = "rabbitmq:4.0.5-management".into();
    let validated = validate(&cluster, &Settings::default()).expect("valid");
    let mirrored = RunningBroker {
        version: RabbitVersion::parse("3.13.7"),
        mirrored_classic_queues: vec!["//celery".into(), "orders/invoices".into()],
        ..Default::default()
    };
    let error = check_in_place_upgrade(&mirrored, &validated).expect_err("refused");
    assert_eq!(error.reason(), "UpgradeRefused");
    let text = error.to_string();
    for says in ["//celery, orders/invoices", "no classic queue mirroring", "RabbitMigration", "3.13.7 to 4.0.5"] {
        assert!(text.contains(says), "{says:?} not in {text}");
    }
    let none = RunningBroker { mirrored_classic_queues: vec![], ..mirrored };
    assert!(check_in_place_upgrade(&none, &validated).is_ok());
}

/// Which peers a NetworkPolicy rule lets reach `port`: None when no rule opens it, Some([]) when
/// one opens it to anyone.
fn reach(policy: &Value, port: i64) -> Option<Vec<Value>> {
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let opens = |rule: &&Value| {
        rule["ports"].as_array().into_iter().flatten().any(|p| {
            let first = p["port"].as_i64().unwrap();
            let last = p["endPort"].as_i64().unwrap_or(first);
            (first..=last).contains(&port)
        })
    };
    let matching: Vec<&Value> = rules.iter().filter(opens).collect();
    assert!(matching.len() <= 1, "port {port} in several rules: {policy}");
    matching.first().map(|rule| rule["from"].as_array().cloned().unwrap_or_default())
}

#[test]
fn the_network_policy_fences_the_erlang_ports_and_the_management_api_and_opens_the_rest() {
    let settings = Settings { operator_namespace: Some("warren-system".into()), ..Settings::default() };
    let validated = validate(&fixture("basic.yaml"), &settings).expect("valid fixture");
    let policy = json_of(&build::build(&validated, &credentials()).network_policy.expect("on by default"));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "rabbitmq", "app.kubernetes.io/instance": "demo"})
    );
    // epmd and the distribution port: the cluster's own pods, nobody else.
    for port in [4369, 25672] {
        let from = reach(&policy, port).expect("a rule");
        assert_eq!(from.len(), 1, "{from:?}");
        assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "demo");
        assert!(from[0]["namespaceSelector"].is_null(), "same namespace only: {from:?}");
    }
    // The management API: the operator's namespace and Warren's migration Jobs.
    for port in [15672, 15671] {
        let from = reach(&policy, port).expect("a rule");
        assert_eq!(from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "warren-system");
        assert_eq!(from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "warren-migrate");
        assert_eq!(from.len(), 2);
    }
    // Clients, the Prometheus scrape and plugins' ports (MQTT, streams): anyone.
    for port in [5672, 5671, 15692, 1883, 5552] {
        assert_eq!(reach(&policy, port), Some(vec![]), "port {port}");
    }

    // metricsFrom fences the Prometheus port; managementFrom adds a peer; off: no policy.
    let mut cluster = fixture("basic.yaml");
    let monitoring: k8s_openapi::api::networking::v1::NetworkPolicyPeer = serde_json::from_value(
        json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}),
    )
    .unwrap();
    cluster.spec.network_policy.metrics_from = vec![monitoring.clone()];
    cluster.spec.network_policy.management_from = vec![monitoring];
    let validated = validate(&cluster, &settings).expect("valid");
    let policy = json_of(&build::build(&validated, &credentials()).network_policy.expect("on"));
    let from = reach(&policy, 15692).expect("a rule");
    assert_eq!(from.len(), 1);
    assert_eq!(from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring");
    assert_eq!(reach(&policy, 15672).expect("a rule").len(), 3);
    cluster.spec.network_policy.enabled = false;
    let validated = validate(&cluster, &settings).expect("valid");
    assert!(build::build(&validated, &credentials()).network_policy.is_none());
}
