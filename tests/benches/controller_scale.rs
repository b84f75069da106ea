//! Controller scale benchmark, in the Kubernetes lab: one controller
//! replica (under `deploy/`'s RBAC and policy, production `--resync 30s`)
//! watching every namespace, with many ConsistencyGroups, a BackupSchedule
//! per group and many ended GroupBackups. It measures
//!
//! - the time from the controller's start until every group's status is
//!   written (its first full pass),
//! - the reconcile latency of a group: a spec change (a new generation) to
//!   its status's `observedGeneration`, p50/p99 over many samples,
//! - the controller's RSS (now and peak) and its CPU time per second in the
//!   steady state,
//! - the GroupBackup LIST requests the API server served in the steady state
//!   (`apiserver_request_total`), every client together,
//! - the time a Prometheus scrape of `/metrics` takes (the leader reads its
//!   gauges of every group and schedule from its caches then) and the
//!   series it returns.
//!
//! Agents are pods of the lab, each one noop agent (its own process, with
//! the namespace's identity), and each a member of its own in a group: the
//! first `agents` members of the groups, spread evenly, resolve to them and
//! are described over mTLS at each reconcile; the other groups' members
//! select no pod (`MemberNotFound`).
//!
//! How it grows: the whole run is repeated at each scale of
//! `STILLPOINT_BENCH_SCALES` (default `0.25,0.5,1`: a quarter, half and all
//! of every size), each in a lab of its own, and the table gives each
//! figure's growth against the smallest scale.
//!
//! Run with:
//!   cargo build --release -p stillpoint-controller -p stillpoint-agent
//!   cargo bench -p stillpoint-tests --bench controller_scale
//! Prints a table and writes JSON to `target/bench/controller-scale.json`.
//! `STILLPOINT_BENCH_GROUPS` (default 100), `STILLPOINT_BENCH_BACKUPS`
//! (2000), `STILLPOINT_BENCH_AGENTS` (200), `STILLPOINT_BENCH_NAMESPACES`
//! (10), `STILLPOINT_BENCH_SAMPLES` (50) and
//! `STILLPOINT_BENCH_STEADY_SECONDS` (60) set the sizes at scale 1;
//! `STILLPOINT_BENCH_RENEW_DEADLINE` (seconds, default 10 as deployed) the
//! controller's `--renew-deadline`. Each run also reports the leader's
//! Lease renewals over the whole run (`stillpoint_controller_lease_renewal_seconds`):
//! how many, their mean, and the bucket bound under which the slowest fell.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use stillpoint_controller::kube::crd::{BackupSchedule, ConsistencyGroup, GroupBackup};
use stillpoint_tests::harness::kube::stillpoint::{self, ControllerProc};
use stillpoint_tests::harness::kube::{KubeLab, wait_async};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone)]
struct Sizes {
    groups: usize,
    backups: usize,
    agents: usize,
    namespaces: usize,
    samples: usize,
    steady: Duration,
    renew_deadline: usize,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

/// The API server's count of GroupBackup LISTs so far.
async fn backup_lists(admin: &kube::Client) -> Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = admin.request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"groupbackups\"") && l.contains("verb=\"LIST\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The members of group `i`: one per agent pod given to it (agent `j`
/// belongs to group `j % groups`), or one that selects no pod.
fn members_of(i: usize, sizes: &Sizes) -> serde_json::Value {
    let mine: Vec<serde_json::Value> = (0..sizes.agents)
        .filter(|j| j % sizes.groups == i)
        .map(|j| json!({"name": format!("m{j}"), "selector": {"matchLabels": {"agent": format!("a{j}")}}}))
        .collect();
    if mine.is_empty() {
        json!([{"name": "db", "selector": {"matchLabels": {"app": format!("g{i}")}}}])
    } else {
        json!(mine)
    }
}

/// Noop agent pods `a<j>`, each in its group's namespace, with the
/// namespace's agent identity; returns once every one is ready.
async fn agents(
    lab: &KubeLab,
    installed: &stillpoint::Installed,
    admin: &kube::Client,
    namespaces: &[String],
    sizes: &Sizes,
) -> Result<()> {
    if sizes.agents == 0 {
        return Ok(());
    }
    let per_ns = sizes.groups.div_ceil(namespaces.len());
    for ns in namespaces {
        stillpoint::apply_all(
            lab,
            admin,
            &format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bench, namespace: {ns}}}"
            ),
        )
        .await?;
        installed
            .agent_secret(lab, ns, "bench", "agent-bench")
            .await?;
    }
    let container = stillpoint::agent_container("noop", "", "agent-tls", "data");
    let pods: Vec<(String, String)> = (0..sizes.agents)
        .map(|j| {
            (
                namespaces[(j % sizes.groups) / per_ns].clone(),
                format!("a{j}"),
            )
        })
        .collect();
    stream::iter(pods.clone())
        .map(|(ns, name)| {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{agent: {name}}}}}\n\
                 spec:\n  serviceAccountName: bench\n  containers:\n{container}  volumes:\n  \
                 - {{name: data, emptyDir: {{}}}}\n  - {{name: agent-tls, secret: {{secretName: agent-bench}}}}\n"
            );
            async move { stillpoint::apply_all(lab, admin, &yaml).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    stream::iter(pods)
        .map(|(ns, name)| async move {
            stillpoint_tests::harness::kube::wait_pod_ready(
                admin,
                &ns,
                &name,
                Duration::from_secs(300),
            )
            .await
            .map(|_| ())
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Groups, a schedule per group, and ended backups spread over them.
async fn populate(admin: &kube::Client, namespaces: &[String], sizes: &Sizes) -> Result<()> {
    let per_ns = sizes.groups.div_ceil(namespaces.len());
    let groups: Vec<(String, String)> = (0..sizes.groups)
        .map(|i| (namespaces[i / per_ns].clone(), format!("g{i}")))
        .collect();
    stream::iter(groups.clone().into_iter().enumerate())
        .map(|(i, (ns, g))| {
            let admin = admin.clone();
            let members = members_of(i, sizes);
            async move {
                let group: ConsistencyGroup = serde_json::from_value(json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "ConsistencyGroup",
                    "metadata": {"name": g, "namespace": ns},
                    "spec": {"members": members, "snapshot": {"driver": "csi"}},
                }))?;
                Api::<ConsistencyGroup>::namespaced(admin.clone(), &ns)
                    .create(&PostParams::default(), &group)
                    .await?;
                let schedule: BackupSchedule = serde_json::from_value(json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "BackupSchedule",
                    "metadata": {"name": g, "namespace": ns},
                    "spec": {"group": g, "schedule": "0 0 3 * * *"},
                }))?;
                Api::<BackupSchedule>::namespaced(admin, &ns)
                    .create(&PostParams::default(), &schedule)
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    stream::iter(0..sizes.backups)
        .map(|i| {
            let (ns, g) = groups[i % groups.len()].clone();
            let admin = admin.clone();
            async move {
                let name = format!("{g}-b{i}");
                let api = Api::<GroupBackup>::namespaced(admin, &ns);
                let backup: GroupBackup = serde_json::from_value(json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupBackup",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"group": g},
                }))?;
                api.create(&PostParams::default(), &backup).await?;
                let status = json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupBackup",
                    "status": {"phase": "Succeeded", "backupId": name,
                        "completionTime": format!("2026-01-01T00:00:{:02}.000000Z", i % 60)},
                });
                api.patch_status(
                    &name,
                    &PatchParams::apply("stillpoint-bench").force(),
                    &Patch::Apply(&status),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Every group's status written for its current generation.
async fn all_current(admin: &kube::Client) -> Result<usize> {
    let groups = Api::<ConsistencyGroup>::all(admin.clone())
        .list(&ListParams::default())
        .await?;
    Ok(groups
        .items
        .iter()
        .filter(|g| {
            let status = g.status.as_ref();
            status.and_then(|s| s.observed_generation) == g.metadata.generation
                && status
                    .and_then(|s| s.last_successful_backup.as_ref())
                    .is_some()
        })
        .count())
}

/// Keeps the controller's log of a failed run in
/// `target/bench/controller-scale-failed.log`.
fn keep_log(controller: &ControllerProc) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/bench/controller-scale-failed.log"
    );
    let dir = std::path::Path::new(path).parent().expect("a directory");
    if std::fs::create_dir_all(dir).is_ok() && std::fs::write(path, controller.logs()).is_ok() {
        eprintln!("the controller's log: {path}");
    }
}

/// One spec change of a group until its status says it saw it (ms).
async fn latency(admin: &kube::Client, ns: &str, group: &str, n: usize) -> Result<f64> {
    let api = Api::<ConsistencyGroup>::namespaced(admin.clone(), ns);
    let budget = if n.is_multiple_of(2) { "6s" } else { "5s" };
    let patch = json!({"spec": {"freezeBudget": budget}});
    let start = Instant::now();
    let changed = api
        .patch(group, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let generation = changed.metadata.generation;
    loop {
        let g = api.get(group).await?;
        if g.status.as_ref().and_then(|s| s.observed_generation) >= generation {
            return Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        if start.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("group {ns}/{group} not reconciled within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(lab: &'static KubeLab, sizes: Sizes) -> Result<serde_json::Value> {
    stillpoint::apply_deploy(lab).await?;
    let installed: &'static stillpoint::Installed =
        Box::leak(Box::new(stillpoint::Installed::new()?));
    let admin = lab.admin().await?;
    let mut namespaces = Vec::new();
    for _ in 0..sizes.namespaces {
        namespaces.push(lab.namespace("scale").await?);
    }
    let made = Instant::now();
    agents(lab, installed, &admin, &namespaces, &sizes).await?;
    populate(&admin, &namespaces, &sizes).await?;
    eprintln!(
        "made {} agents, {} groups, schedules and {} backups in {:.1} s",
        sizes.agents,
        sizes.groups,
        sizes.backups,
        made.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    // The Lease timings as deployed (the controller's defaults), unless
    // told another renew deadline.
    let renew = format!("{}s", sizes.renew_deadline);
    let lease = format!("{}s", (sizes.renew_deadline + 5).max(15));
    let controller = ControllerProc::start_with(
        lab,
        installed,
        "",
        "scale-a",
        "scale-lease",
        &[
            "--resync",
            "30s",
            "--lease-duration",
            &lease,
            "--renew-deadline",
            &renew,
            "--retry-period",
            "2s",
        ],
    )
    .await?;
    let groups = sizes.groups;
    if let Err(e) = wait_async("every group reconciled", Duration::from_secs(300), || {
        let admin = admin.clone();
        async move { Ok(all_current(&admin).await? == groups) }
    })
    .await
    {
        let sample = Api::<ConsistencyGroup>::all(admin.clone())
            .list(&ListParams::default().limit(1))
            .await?;
        let status = serde_json::to_string(&sample.items.first().map(|g| &g.status))?;
        return Err(e.context(format!("a group: {status}\n{}", controller.logs())));
    }
    let first_pass = started.elapsed().as_secs_f64();
    let pid = controller.pid();
    // The steady state: nothing changes but time.
    let (lists0, cpu0, at0) = (
        backup_lists(&admin).await?,
        cpu_seconds(pid),
        Instant::now(),
    );
    tokio::time::sleep(sizes.steady).await;
    let (lists1, cpu1) = (backup_lists(&admin).await?, cpu_seconds(pid));
    let steady = at0.elapsed().as_secs_f64();
    let rss_steady = proc_kib(pid, "VmRSS:");
    let per_ns = sizes.groups.div_ceil(namespaces.len());
    let mut samples = Vec::new();
    for n in 0..sizes.samples {
        let i = (n * 7) % sizes.groups;
        let sample = latency(&admin, &namespaces[i / per_ns], &format!("g{i}"), n).await;
        samples.push(sample.inspect_err(|_| keep_log(&controller))?);
    }
    // A Prometheus scrape of the leader: its gauges of every group and
    // schedule are read from its caches at each one.
    let mut scrapes = Vec::new();
    let mut series = 0;
    let mut renewals = json!(null);
    for _ in 0..20 {
        let at = Instant::now();
        let (code, text) = controller.get("/metrics")?;
        anyhow::ensure!(code == 200, "GET /metrics: {code}");
        scrapes.push(at.elapsed().as_secs_f64() * 1e3);
        series = text.lines().filter(|l| !l.starts_with('#')).count();
        renewals = lease_renewals(&text);
    }
    let peak = proc_kib(pid, "VmHWM:");
    Ok(json!({
        "groups": sizes.groups, "schedules": sizes.groups, "backups": sizes.backups,
        "agents": sizes.agents,
        "namespaces": sizes.namespaces,
        "first_pass_s": first_pass,
        "reconcile_ms": {"n": samples.len(), "p50": percentile(&samples, 50.0),
            "p99": percentile(&samples, 99.0), "max": percentile(&samples, 100.0)},
        "rss_steady_kib": rss_steady, "rss_peak_kib": peak,
        "steady_s": steady,
        "cpu_s_per_s": (cpu1 - cpu0) / steady,
        "backup_lists_per_min": (lists1 - lists0) / steady * 60.0,
        "scrape_ms": {"n": scrapes.len(), "p50": percentile(&scrapes, 50.0),
            "max": percentile(&scrapes, 100.0)},
        "series": series,
        "renew_deadline_s": sizes.renew_deadline,
        "lease_renewals": renewals,
    }))
}

/// The leader's Lease renewals from a scrape of its metrics: how many,
/// their mean (ms), and the smallest bucket bound (s) that holds them all.
fn lease_renewals(text: &str) -> serde_json::Value {
    let name = "stillpoint_controller_lease_renewal_seconds";
    let value = |line: &str| line.rsplit(' ').next()?.parse::<f64>().ok();
    let field = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
            .and_then(value)
            .unwrap_or(0.0)
    };
    let (n, sum) = (field("count"), field("sum"));
    let slowest = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{le=\"")))
        .filter(|l| value(l) == Some(n))
        .filter_map(|l| l.split('"').nth(1)?.parse::<f64>().ok())
        .fold(f64::INFINITY, f64::min);
    json!({"n": n, "mean_ms": if n > 0.0 { sum / n * 1e3 } else { 0.0 }, "slowest_under_s": slowest})
}

/// `sizes` times `scale` (each at least 1, agents at least 0).
fn scaled(sizes: &Sizes, scale: f64) -> Sizes {
    let at = |n: usize| ((n as f64 * scale).round() as usize).max(1);
    Sizes {
        groups: at(sizes.groups),
        backups: at(sizes.backups),
        agents: (sizes.agents as f64 * scale).round() as usize,
        namespaces: at(sizes.namespaces),
        ..sizes.clone()
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// One row of the table; `base` is the smallest scale's result.
fn row(r: &serde_json::Value, base: &serde_json::Value) {
    if let Some(failed) = r["failed"].as_str() {
        let first = failed.lines().next().unwrap_or_default();
        println!(
            "{:<7} {:<7} {:<8} FAILED: {first}",
            r["groups"].to_string(),
            r["agents"].to_string(),
            r["backups"].to_string()
        );
        return;
    }
    let growth = |path: &[&str]| {
        let get = |v: &serde_json::Value| path.iter().fold(v.clone(), |v, k| v[k].clone());
        let b = f(&get(base));
        if b > 0.0 {
            format!("x{:.2}", f(&get(r)) / b)
        } else {
            "-".into()
        }
    };
    let renewals = format!(
        "{} / {:.1} ms / <= {} s",
        r["lease_renewals"]["n"],
        f(&r["lease_renewals"]["mean_ms"]),
        r["lease_renewals"]["slowest_under_s"]
    );
    println!(
        "{:<7} {:<7} {:<8} {:<10} {:<22} {:<22} {:<22} {:<8} {:<18} {renewals}",
        r["groups"].to_string(),
        r["agents"].to_string(),
        r["backups"].to_string(),
        format!("{:.1} s", f(&r["first_pass_s"])),
        format!(
            "{:.1} / {:.1} ms ({})",
            f(&r["reconcile_ms"]["p50"]),
            f(&r["reconcile_ms"]["p99"]),
            growth(&["reconcile_ms", "p50"])
        ),
        format!(
            "{:.1} MiB ({})",
            f(&r["rss_steady_kib"]) / 1024.0,
            growth(&["rss_steady_kib"])
        ),
        format!(
            "{:.1} MiB ({})",
            f(&r["rss_peak_kib"]) / 1024.0,
            growth(&["rss_peak_kib"])
        ),
        format!("{:.3}", f(&r["cpu_s_per_s"])),
        format!("{:.1} ms / {}", f(&r["scrape_ms"]["p50"]), r["series"]),
    );
}

fn main() -> Result<()> {
    let sizes = Sizes {
        groups: env("STILLPOINT_BENCH_GROUPS", 100),
        backups: env("STILLPOINT_BENCH_BACKUPS", 2000),
        agents: env("STILLPOINT_BENCH_AGENTS", 200),
        namespaces: env("STILLPOINT_BENCH_NAMESPACES", 10).max(1),
        samples: env("STILLPOINT_BENCH_SAMPLES", 50),
        steady: Duration::from_secs(env("STILLPOINT_BENCH_STEADY_SECONDS", 60) as u64),
        renew_deadline: env("STILLPOINT_BENCH_RENEW_DEADLINE", 10),
    };
    let scales: Vec<f64> = std::env::var("STILLPOINT_BENCH_SCALES")
        .unwrap_or_else(|_| "0.25,0.5,1".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for scale in &scales {
        // A lab of its own for each scale: nothing left from the last.
        let lab: &'static KubeLab = Box::leak(Box::new(KubeLab::start()?));
        let at = scaled(&sizes, *scale);
        let result = runtime.block_on(run(lab, at.clone()));
        lab.teardown();
        // A scale that fails is reported as failed; the others still are.
        let mut result = result.unwrap_or_else(|e| {
            json!({"groups": at.groups, "agents": at.agents, "backups": at.backups,
                "failed": format!("{e:#}")})
        });
        result["scale"] = json!(scale);
        eprintln!("scale {scale}: {result}");
        results.push(result);
    }
    println!(
        "{:<7} {:<7} {:<8} {:<10} {:<22} {:<22} {:<22} {:<8} {:<18} LEASE RENEWALS (N / MEAN / SLOWEST)",
        "GROUPS",
        "AGENTS",
        "BACKUPS",
        "FIRST PASS",
        "RECONCILE P50 / P99",
        "RSS",
        "RSS PEAK",
        "CPU S/S",
        "SCRAPE P50 / SERIES"
    );
    let base = results
        .iter()
        .find(|r| r["failed"].is_null())
        .cloned()
        .unwrap_or_default();
    for r in &results {
        row(r, &base);
    }
    println!("(xN: against the first row that did not fail; every size grows with the scale)");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("controller-scale.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"runs": results}))?,
    )?;
    println!("JSON: {}", path.display());
    Ok(())
}
