//! The deployment kit's files, checked by the tools that will read them: the Prometheus alert
//! rules by `promtool` (their syntax, and their unit tests of when each alert fires).

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The shipped alert rules are valid, and each fires when, and only when, its unit test says
/// (a paused hour counted once across instances, a growing backlog but not a flat one, summed
/// lag, slot lag, an open breaker, an instance down). Guarantee: every failure an operator must
/// act on pages them.
#[test]
fn the_alert_rules_pass_promtools_checks_and_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The Kubernetes manifests are valid against the Kubernetes API's schemas, strictly (no
/// unknown field), and carry what an operator relies on: probes on the routes Ferry serves, a
/// PodDisruptionBudget, resources, a non-root user. Guarantee: `kubectl apply` takes them as
/// written. (The ServiceMonitor is a CRD the validator has no schema for.)
#[test]
fn the_kubernetes_manifests_validate_strictly() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/ferry.yaml");
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&file)
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 6, "{text}");
    let manifests = std::fs::read_to_string(&file).unwrap();
    for needed in [
        "kind: PodDisruptionBudget",
        "path: /health",
        "path: /ready",
        "runAsNonRoot: true",
        "resources:",
    ] {
        assert!(manifests.contains(needed), "the manifests lack {needed:?}");
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every series name Ferry exports: the `ferry_...` names in the code that renders `/metrics`
/// (as the encoder writes them: a counter's with `_total`, an info's with `_info`, a
/// histogram's as `_bucket`, `_sum`, `_count`).
fn exported_metrics() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for file in ["src/admin/mod.rs", "src/relay/mod.rs"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        for piece in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if piece.starts_with("ferry_") && piece.len() > "ferry_".len() {
                for suffix in ["", "_total", "_info", "_bucket", "_sum", "_count"] {
                    names.insert(format!("{piece}{suffix}"));
                }
            }
        }
    }
    names
}

/// The `ferry_...` series an expression reads.
fn series_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|p| p.starts_with("ferry_"))
        .map(str::to_owned)
        .collect()
}

/// Checks PromQL expressions with promtool, as recording rules of a throwaway rule file.
fn promql_is_valid(exprs: &[String]) {
    let dir = std::env::temp_dir().join(format!("ferry-promql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(expr).unwrap();
        rules.push_str(&format!(
            "      - record: ferry:panel_{i}\n        expr: {quoted}\n"
        ));
    }
    let file = dir.join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Grafana dashboard loads as a dashboard (panels with a Prometheus data source and
/// queries), each query is valid PromQL, and each series it reads is one Ferry exports; the
/// alert rules read only exported series too. Guarantee: the shipped dashboard and alerts show
/// what Ferry measures, not an empty graph.
#[test]
fn the_dashboard_and_the_alerts_query_what_ferry_exports() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/ferry.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "ferry");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut exprs = Vec::new();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    promql_is_valid(&exprs);
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let exported = exported_metrics();
    for expr in exprs.iter().map(String::as_str).chain([alerts.as_str()]) {
        for series in series_in(expr) {
            assert!(
                exported.contains(&series),
                "{series} is not a series Ferry exports"
            );
        }
    }
}

/// docker-compose runs the whole pipeline: the change feed by profile, Ferry's relay or
/// Debezium, never both; two consumers, the simulator, Jaeger, Prometheus (with the alert rules)
/// and Grafana (with the dashboard); every file it mounts exists. Guarantee: `docker compose
/// --profile relay up` starts a working pipeline, not one that publishes every event twice.
#[test]
fn docker_compose_runs_the_pipeline_with_one_change_feed() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(root().join("docker-compose.yml"))
        .output()
        .expect("python3 with PyYAML");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = compose["services"].as_object().expect("services");
    let profiles = |name: &str| -> Vec<String> {
        services[name]["profiles"]
            .as_array()
            .map(|p| p.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    assert_eq!(profiles("ferry-relay"), ["relay"]);
    for debezium in ["connect", "publish-outbox", "register-connector"] {
        assert_eq!(profiles(debezium), ["debezium"], "{debezium}");
    }
    for always in [
        "postgres",
        "kafka",
        "ferry-migrate",
        "partner-sim",
        "consume-1",
        "consume-2",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(always), "{always} is missing");
        assert!(
            profiles(always).is_empty(),
            "{always} must run with either change feed"
        );
    }
    for (name, service) in services {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    root().join(path).exists(),
                    "{name} mounts {source}, which is missing"
                );
            }
        }
    }
    let prometheus =
        std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(prometheus.contains("consume-1:9190") && prometheus.contains("consume-2:9190"));
}
