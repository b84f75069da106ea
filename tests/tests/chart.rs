//! The Helm chart and everything rendered from it, checked with the real
//! tools (helm, promtool) built from their Go modules: the plain manifests
//! of `deploy/` are the chart rendered, the chart lints and its schema
//! refuses what it does not know, the alerts pass `promtool check rules`
//! and their unit tests (each alert fires on its condition and is silent
//! otherwise), each has a runbook, and every dashboard query parses.

use std::collections::{BTreeMap, BTreeSet};

use stillpoint_tests::chart::{self, repo, run};

/// The rendered manifests, or (with `STILLPOINT_RENDER_MANIFESTS=1`) the
/// files written again.
#[test]
fn deploy_is_the_chart_rendered() {
    let rendered = chart::plain_manifests().unwrap();
    if std::env::var("STILLPOINT_RENDER_MANIFESTS").is_ok_and(|v| v == "1") {
        for (path, text) in &rendered {
            let path = repo().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }
    let mut drifted = Vec::new();
    for (path, text) in &rendered {
        let committed = std::fs::read_to_string(repo().join(path)).unwrap_or_default();
        if &committed != text {
            drifted.push(path.clone());
        }
    }
    assert!(
        drifted.is_empty(),
        "{drifted:?} differ from the chart rendered: edit deploy/helm/stillpoint and render \
         them again with STILLPOINT_RENDER_MANIFESTS=1 cargo test -p stillpoint-tests --test chart"
    );
    // Every file of deploy/ (but the examples and local mode's) comes
    // from the chart.
    let mut plain = BTreeSet::new();
    for dir in ["deploy", "deploy/monitoring"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                plain.insert(format!(
                    "{dir}/{}",
                    path.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }
    let unrendered: Vec<&String> = plain
        .iter()
        .filter(|p| !rendered.contains_key(*p))
        .collect();
    assert!(
        unrendered.is_empty(),
        "{unrendered:?} are not rendered from the chart"
    );
}

#[test]
fn the_chart_lints_and_its_schema_refuses_unknown_or_wrong_values() {
    let chart = chart::chart();
    let chart = chart.to_str().unwrap();
    let values = repo().join("deploy/helm/manifests-values.yaml");
    run("helm", &["lint", "--strict", chart]).unwrap();
    run(
        "helm",
        &["lint", "--strict", chart, "-f", values.to_str().unwrap()],
    )
    .unwrap();
    for (set, names) in [
        ("controller.replica=3", "replica"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("monitoring.serviceMonitor.interval=often", "interval"),
        (
            "monitoring.prometheusRule.freezeBudgetWarningRatio=2",
            "freezeBudgetWarningRatio",
        ),
    ] {
        let refused = chart::template("stillpoint-system", &[], &[set]).unwrap_err();
        assert!(refused.to_string().contains(names), "{set}: {refused}");
    }
}

#[test]
fn the_chart_installs_into_any_namespace_with_its_images_and_toggles() {
    let rendered = chart::template(
        "backups",
        &[],
        &[
            "image.controller.repository=registry.example/sp-controller",
            "image.controller.tag=9.9.9",
            "image.agent.repository=registry.example/sp-agent",
            "controller.replicas=3",
            "admissionPolicies.enabled=false",
            "networkPolicy.enabled=false",
            "controller.podDisruptionBudget.enabled=false",
        ],
    )
    .unwrap();
    let sources = chart::by_source(&rendered);
    let deployment = &sources["templates/controller.yaml"];
    let text = deployment.join("\n");
    assert!(
        text.contains("image: registry.example/sp-controller:9.9.9"),
        "{text}"
    );
    assert!(
        text.contains("value: \"registry.example/sp-agent:0.1.0\""),
        "{text}"
    );
    assert!(text.contains("replicas: 3"), "{text}");
    assert!(!text.contains("PodDisruptionBudget"), "{text}");
    assert!(
        !rendered.contains("stillpoint-system"),
        "a namespace left fixed:\n{rendered}"
    );
    for off in [
        "templates/controller-policy.yaml",
        "templates/restore-policy.yaml",
        "templates/controller-networkpolicy.yaml",
        "templates/monitoring/prometheusrule.yaml",
        "templates/namespace.yaml",
    ] {
        assert!(!sources.contains_key(off), "{off} rendered while off");
    }
    // Every object carries the chart's labels.
    for (source, docs) in &sources {
        for doc in docs {
            for label in [
                "app.kubernetes.io/part-of: stillpoint",
                "helm.sh/chart: stillpoint-",
            ] {
                assert!(doc.contains(label), "{source} lacks {label}:\n{doc}");
            }
        }
    }
}

/// The alerts' names, from the rule file.
fn alerts() -> Vec<String> {
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/stillpoint-rules.yaml")).unwrap(),
    )
    .unwrap();
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            names.push(rule["alert"].as_str().unwrap().to_string());
        }
    }
    names
}

#[test]
fn promtool_checks_the_rules_and_every_alert_fires_on_its_condition_and_only_then() {
    let rules = repo().join("deploy/monitoring/stillpoint-rules.yaml");
    let tests = repo().join("deploy/monitoring/tests/stillpoint-rules.test.yaml");
    let checked = run("promtool", &["check", "rules", rules.to_str().unwrap()]).unwrap();
    assert!(checked.contains("SUCCESS"), "{checked}");
    run("promtool", &["test", "rules", tests.to_str().unwrap()]).unwrap();
    // Each alert is tested firing and silent.
    let suite: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&tests).unwrap()).unwrap();
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for test in suite["tests"].as_sequence().unwrap() {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_string();
            let fires = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 = true;
            } else {
                entry.1 = true;
            }
        }
    }
    for alert in alerts() {
        assert_eq!(
            cases.get(&alert),
            Some(&(true, true)),
            "{alert}: (tested firing, tested silent)"
        );
    }
}

#[test]
fn every_alert_is_named_by_convention_and_has_a_runbook() {
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/stillpoint-rules.yaml")).unwrap(),
    )
    .unwrap();
    let runbooks = std::fs::read_to_string(repo().join("docs/src/operations/runbooks.md")).unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                name.starts_with("Stillpoint") && !name.contains('_'),
                "{name}"
            );
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: {severity}"
            );
            for key in ["summary", "description", "runbook_url"] {
                assert!(rule["annotations"][key].is_string(), "{name} lacks {key}");
            }
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = url.rsplit_once('#').unwrap().1;
            assert_eq!(anchor, name.to_lowercase(), "{name}: {url}");
            assert!(
                runbooks.contains(&format!("\n## {name}\n")),
                "docs/src/operations/runbooks.md has no section ## {name}"
            );
        }
    }
}

#[test]
fn every_dashboard_query_parses() {
    // As recording rules, promtool parses each expression.
    let queries = chart::dashboard_queries(".*", ".*").unwrap();
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "  - record: dashboard:query{i}\n    expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.yaml");
    std::fs::write(&file, rules).unwrap();
    run("promtool", &["check", "rules", file.to_str().unwrap()]).unwrap();
}

#[test]
fn the_krew_manifest_template_is_a_plugin_manifest_once_filled() {
    let template = std::fs::read_to_string(repo().join("deploy/krew/stillpoint.yaml")).unwrap();
    // As krew-release-bot fills it.
    let mut filled = String::new();
    for line in template.lines() {
        match line.trim_start().strip_prefix("{{addURIAndSha \"") {
            Some(rest) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                let uri = rest.split_once("\" .TagName }}").unwrap().0;
                filled.push_str(&format!(
                    "{indent}uri: {uri}\n{indent}sha256: {}\n",
                    "0".repeat(64)
                ));
            }
            None => {
                filled.push_str(line);
                filled.push('\n');
            }
        }
    }
    let filled = filled.replace("{{ .TagName }}", "v0.1.0");
    assert!(!filled.contains("{{"), "{filled}");
    let plugin: serde_yaml::Value = serde_yaml::from_str(&filled).unwrap();
    assert_eq!(plugin["kind"], "Plugin");
    assert_eq!(plugin["metadata"]["name"], "stillpoint");
    let platforms = plugin["spec"]["platforms"].as_sequence().unwrap();
    assert!(platforms.len() >= 2);
    for p in platforms {
        assert_eq!(p["bin"], "kubectl-stillpoint");
        assert!(
            p["uri"]
                .as_str()
                .unwrap()
                .contains("/v0.1.0/kubectl-stillpoint_v0.1.0_"),
            "{p:?}"
        );
    }
}
