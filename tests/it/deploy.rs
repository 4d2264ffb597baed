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
