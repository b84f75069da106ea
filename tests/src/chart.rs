//! The Helm chart (`deploy/helm/stillpoint`) and what is rendered from it:
//! the tools that check it (helm, promtool, prometheus, built from their
//! Go modules by `tests/k8s/tools.sh`), and the plain manifests of
//! `deploy/`, which are the chart rendered with
//! `deploy/helm/manifests-values.yaml`, one file per template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart's directory.
pub fn chart() -> PathBuf {
    repo().join("deploy/helm/stillpoint")
}

/// Where `tests/k8s/tools.sh` built the tools (`bin/`) and put the
/// Prometheus Operator's CRDs (`crd/`), or `$STILLPOINT_TOOLS_DIR`.
pub fn tools() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("STILLPOINT_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/tools.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): the monitoring tools need Go 1.26 and the Go module proxy",
            script.display(),
            out.status
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A tool of [`tools`]: `helm`, `promtool` or `prometheus`.
pub fn tool(name: &str) -> Result<PathBuf> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = match DIR.get() {
        Some(d) => d.clone(),
        None => DIR
            .get_or_init(|| tools().expect("the monitoring tools"))
            .clone(),
    };
    Ok(dir.join("bin").join(name))
}

/// Runs `tool` with `args`; its stdout, or why it failed (with stderr).
pub fn run(tool_name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool(tool_name)?)
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("stillpoint-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("stillpoint-helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("stillpoint-helm/data"),
        )
        .output()
        .with_context(|| format!("running {tool_name}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{tool_name} {} failed ({}):\n{stdout}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `helm template` of the chart as release `stillpoint` in `ns`, with the
/// values files `values` and `--set` pairs `set`.
pub fn template(ns: &str, values: &[&Path], set: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args = vec!["template", "stillpoint", chart.to_str().unwrap(), "-n", ns];
    let values: Vec<String> = values.iter().map(|v| v.display().to_string()).collect();
    for v in &values {
        args.extend(["-f", v.as_str()]);
    }
    for s in set {
        args.extend(["--set", s]);
    }
    run("helm", &args)
}

/// The documents of a `helm template` output by the template they came
/// from (`templates/…`), in the order helm printed them.
pub fn by_source(rendered: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for doc in rendered.split("\n---\n") {
        let mut lines = doc.trim_start_matches("---\n").lines();
        let Some(source) = lines
            .next()
            .and_then(|l| l.strip_prefix("# Source: stillpoint/"))
        else {
            continue;
        };
        let body: Vec<&str> = lines.collect();
        let body = body.join("\n").trim().to_string();
        if !body.is_empty() {
            out.entry(source.to_string()).or_default().push(body);
        }
    }
    out
}

/// The file of `deploy/` each template renders into.
fn target_of(template: &str) -> Option<&'static str> {
    Some(match template {
        "templates/namespace.yaml" | "templates/rbac.yaml" => "deploy/rbac.yaml",
        "templates/controller.yaml" => "deploy/controller.yaml",
        "templates/webhook.yaml" => "deploy/webhook.yaml",
        "templates/networkpolicy.yaml" => "deploy/networkpolicy.yaml",
        "templates/controller-networkpolicy.yaml" => "deploy/controller-networkpolicy.yaml",
        "templates/controller-policy.yaml" => "deploy/controller-policy.yaml",
        "templates/restore-policy.yaml" => "deploy/restore-policy.yaml",
        "templates/monitoring/servicemonitor.yaml" => "deploy/monitoring/servicemonitor.yaml",
        "templates/monitoring/podmonitor.yaml" => "deploy/monitoring/podmonitor.yaml",
        "templates/monitoring/prometheusrule.yaml" => "deploy/monitoring/prometheusrule.yaml",
        "templates/monitoring/dashboard.yaml" => "deploy/monitoring/dashboard-configmap.yaml",
        _ => return None,
    })
}

const HEADER: &str = "# Rendered from the chart deploy/helm/stillpoint with \
                      deploy/helm/manifests-values.yaml:\n# edit the chart, not this file.\n";

/// Every file of `deploy/` the chart renders, by path (relative to the
/// repository), with its content.
pub fn plain_manifests() -> Result<BTreeMap<String, String>> {
    let values = repo().join("deploy/helm/manifests-values.yaml");
    let rendered = template("stillpoint-system", &[&values], &[])?;
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // The namespace first: templates/namespace.yaml sorts after rbac.yaml.
    let sources = by_source(&rendered);
    let mut order: Vec<&String> = sources.keys().collect();
    order.sort_by_key(|s| (!s.ends_with("namespace.yaml"), s.to_string()));
    for source in order {
        let target = target_of(source)
            .with_context(|| format!("{source} renders into no file of deploy/"))?;
        files
            .entry(target.to_string())
            .or_default()
            .extend(sources[source].iter().cloned());
    }
    let mut out: BTreeMap<String, String> = files
        .into_iter()
        .map(|(path, docs)| (path, format!("{HEADER}{}\n", docs.join("\n---\n"))))
        .collect();
    out.insert(
        "deploy/monitoring/stillpoint-rules.yaml".into(),
        rules_file(&rendered)?,
    );
    for (copy, source) in [
        (
            "deploy/monitoring/stillpoint-dashboard.json",
            "deploy/helm/stillpoint/files/stillpoint-dashboard.json",
        ),
        (
            "deploy/helm/stillpoint/crds/stillpoint.dev.yaml",
            "deploy/crds/stillpoint.dev.yaml",
        ),
    ] {
        out.insert(copy.into(), std::fs::read_to_string(repo().join(source))?);
    }
    Ok(out)
}

/// The PrometheusRule's groups as a plain Prometheus rule file.
fn rules_file(rendered: &str) -> Result<String> {
    let rule = by_source(rendered)
        .remove("templates/monitoring/prometheusrule.yaml")
        .and_then(|d| d.into_iter().next())
        .context("no PrometheusRule rendered")?;
    let spec = rule
        .split_once("\nspec:\n")
        .context("a PrometheusRule without spec")?
        .1;
    let groups: Vec<&str> = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    Ok(format!(
        "# Stillpoint's alerts as a Prometheus rule file (rule_files:), for a\n\
         # Prometheus without the Operator; the same rules as prometheusrule.yaml.\n{}{}\n",
        HEADER,
        groups.join("\n")
    ))
}

/// Every PromQL expression of the Grafana dashboard, by panel title, with
/// its variables given `namespace` and `group` (regular expressions).
pub fn dashboard_queries(namespace: &str, group: &str) -> Result<Vec<(String, String)>> {
    let path = chart().join("files/stillpoint-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            let expr = expr
                .replace("$namespace", namespace)
                .replace("$group", group);
            out.push((title.to_string(), expr));
        }
    }
    Ok(out)
}
