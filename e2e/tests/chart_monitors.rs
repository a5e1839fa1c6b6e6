//! The chart's monitoring objects against the real API server: with the Prometheus operator's CRDs
//! applied (from its Go module, pinned in e2e/versions.env), the ServiceMonitor and PodMonitor the
//! chart renders are accepted; without them nothing asks for those kinds; values.schema.json
//! refuses a mistyped value and names it.

use serde_json::Value;

use testkit::control_plane::{crd_established, helm, kubectl, kubectl_stdin, ok};

fn template(sets: &[&str]) -> std::process::Output {
    let mut args = vec!["template", "warren", "charts/warren", "-n", "monitoring-e2e"];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args)
}

fn monitoring_crds() -> String {
    std::env::var("WARREN_MONITORING_CRDS").unwrap_or_else(|_| {
        panic!("WARREN_MONITORING_CRDS is not set: run these tests through e2e/with-control-plane.sh (make test does)")
    })
}

#[tokio::test]
async fn the_charts_monitors_are_accepted_with_the_prometheus_operators_crds_and_bad_values_refused() {
    // Off by default: the chart renders no monitoring.coreos.com object, so it installs where the
    // Prometheus operator is absent.
    let default = ok("helm template", template(&[]));
    assert!(!default.contains("monitoring.coreos.com"), "{default}");
    // The prometheus.io path: the operator's pods say where its metrics are.
    assert!(default.contains("prometheus.io/scrape: \"true\""), "{default}");
    assert!(default.contains("prometheus.io/port: \"8080\""), "{default}");

    let crds = monitoring_crds();
    ok("kubectl apply the monitoring CRDs", kubectl(&["apply", "--server-side", "-f", &crds]));
    for crd in ["servicemonitors.monitoring.coreos.com", "podmonitors.monitoring.coreos.com"] {
        crd_established(crd).await;
    }
    let rendered = ok(
        "helm template with monitors",
        template(&[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prometheus",
            "rabbitmqPodMonitor.enabled=true",
            "rabbitmqPodMonitor.interval=15s",
        ]),
    );
    ok("kubectl create namespace", kubectl(&["create", "namespace", "monitoring-e2e"]));
    // Created for real, validated by the CRDs' schemas (unknown fields refused).
    let created = ok(
        "kubectl apply the chart with monitors",
        kubectl_stdin(&["apply", "--validate=strict", "-n", "monitoring-e2e", "-f", "-"], &rendered),
    );
    assert!(created.contains("servicemonitor.monitoring.coreos.com/warren created"), "{created}");
    assert!(created.contains("podmonitor.monitoring.coreos.com/warren-rabbitmq created"), "{created}");
    let pod_monitor: Value = serde_json::from_str(&ok(
        "kubectl get podmonitor",
        kubectl(&["get", "podmonitor", "warren-rabbitmq", "-n", "monitoring-e2e", "-o", "json"]),
    ))
    .expect("PodMonitor as JSON");
    let endpoint = &pod_monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (endpoint["port"].as_str(), endpoint["path"].as_str()),
        (Some("prometheus"), Some("/metrics/per-object"))
    );
    assert_eq!(endpoint["interval"], "15s");
    assert_eq!(pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"], "warren");
    let service_monitor: Value = serde_json::from_str(&ok(
        "kubectl get servicemonitor",
        kubectl(&["get", "servicemonitor", "warren", "-n", "monitoring-e2e", "-o", "json"]),
    ))
    .expect("ServiceMonitor as JSON");
    assert_eq!(service_monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(service_monitor["spec"]["endpoints"][0]["honorLabels"], true, "{service_monitor}");
    let _ = kubectl(&["delete", "namespace", "monitoring-e2e", "--wait=false"]);

    // values.schema.json: a mistyped value is refused before anything reaches the cluster.
    for (set, named) in [
        ("replicaCount=two", "/replicaCount"),
        ("metrics.serviceMonitor.intervall=30s", "intervall"),
        ("rabbitmqPodMonitor.enabled=yes", "/rabbitmqPodMonitor/enabled"),
        ("logFormat=yaml", "/logFormat"),
        ("rabbitmqPodMonitor.interval=soon", "/rabbitmqPodMonitor/interval"),
    ] {
        let refused = template(&[set]);
        let error = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{set} accepted");
        assert!(error.contains("schema") && error.contains(named), "{set}: {error}");
    }
}
