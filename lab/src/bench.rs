//! `stillpoint bench`: the benchmark suite, run on this machine.
//!
//! 1. **Freeze window against exec hooks.** The demo's six databases on
//!    btrfs. In the same run, interleaved: Stillpoint's group backup, and
//!    what shell-hook frameworks do (one `psql`/`mariadb`/`redis-cli`
//!    process per member per hook, one after another: pre hooks, the cut,
//!    post hooks), each with the btrfs cut and with a no-op cut.
//! 2. **Fan-out.** `noop` agents over real mTLS: the window and the
//!    orchestration overhead (the window minus the slowest member's own
//!    freeze and thaw time, minus the cut).
//! 3. **Application stall.** pgbench against the PostgreSQL primary, with
//!    back-to-back backups and without them.
//! 4. **Controller memory.** `stillpoint quiesce` holding one freeze stream
//!    per agent for many agents.
//! 5. **Flush cost.** A Redis primary with RDB persistence only (the flush
//!    saves while writes are paused) and with AOF, at 10k and 1M keys: the
//!    flush and the single member's freeze-to-thaw time.
//! 6. **Kubernetes** (`--parts kube`, not run by default: it starts the
//!    Kubernetes lab, whose first build takes minutes). The window in a
//!    cluster and where it goes: the `kube_window` bench of the test suite
//!    (`tests/benches/kube_window.rs`), run through cargo from a checkout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::demo::Cluster;
use crate::servers::agent::{AgentProc, AgentSpec};
use stillpoint_controller::certs;
use stillpoint_controller::local::catalog::Manifest;
use stillpoint_controller::local::config::{Driver, Group, MemberFile, RoleHint};
use stillpoint_controller::local::orchestrator::Orchestrator;
use stillpoint_controller::local::snapshot::{Snapshotter, VolumeRef, btrfs::Btrfs};

/// What to run and how much of it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Backups per arm (window) and per fan-out size.
    pub runs: usize,
    pub fanout: Vec<usize>,
    /// Agent channels held for the memory figure.
    pub channels: usize,
    pub pgbench_seconds: u64,
    pub parts: Vec<Part>,
    /// Backups per arm of the Kubernetes part.
    pub kube_runs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Window,
    Fanout,
    Stall,
    Memory,
    Flush,
    Kube,
}

/// Median, p99 and max of samples in µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Stats::default();
        }
        let at = |p: f64| v[((p / 100.0) * (v.len() - 1) as f64).round() as usize];
        Stats {
            n: v.len(),
            p50: at(50.0),
            p99: at(99.0),
            max: v[v.len() - 1],
        }
    }

    fn json_ms(&self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50 / 1000.0, "p99_ms": self.p99 / 1000.0, "max_ms": self.max / 1000.0})
    }
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn micros(us: f64) -> String {
    format!("{us:.0} µs")
}

/// The slowest member's own freeze + thaw time in one backup (µs).
pub fn slowest_member_us(m: &Manifest) -> f64 {
    m.members
        .iter()
        .map(|r| r.freeze_us.unwrap_or(0) + r.thaw_us.unwrap_or(0))
        .max()
        .unwrap_or(0) as f64
}

/// Orchestration overhead of one backup: the window minus the slowest
/// member's own freeze + thaw, minus the cut (µs).
pub fn overhead_us(m: &Manifest) -> Option<f64> {
    let window = m.freeze_window_us? as f64;
    Some(window - slowest_member_us(m) - m.cut_us.unwrap_or(0) as f64)
}

/// The flush phase of one backup on the controller's clock: first flush
/// request to last flush answer (µs).
pub fn flush_phase_us(m: &Manifest) -> Option<f64> {
    let phase = |name: &'static str| {
        m.timeline
            .members
            .values()
            .filter_map(move |p| p.get(name).copied())
    };
    let first = phase("flush_requested").min()?;
    let last = phase("flushed").max()?;
    Some(last.saturating_sub(first) as f64)
}

/// Each member's phases in one backup, in µs since the window opened
/// (the first freeze request): member → phase → µs.
pub fn phases_in_window(m: &Manifest) -> BTreeMap<String, BTreeMap<String, f64>> {
    let t = &m.timeline;
    let Some(open) = t
        .members
        .values()
        .filter_map(|p| p.get("freeze_requested"))
        .min()
        .copied()
    else {
        return BTreeMap::new();
    };
    t.members
        .iter()
        .map(|(member, phases)| {
            let inside = phases
                .iter()
                .filter(|(_, at)| **at >= open)
                .map(|(phase, at)| (phase.clone(), (at - open) as f64))
                .collect();
            (member.clone(), inside)
        })
        .collect()
}

/// Samples of each member's phases in the window, over many backups.
#[derive(Debug, Default)]
pub struct PhaseSamples(BTreeMap<String, BTreeMap<String, Vec<f64>>>);

impl PhaseSamples {
    pub fn add(&mut self, m: &Manifest) {
        for (member, phases) in phases_in_window(m) {
            let row = self.0.entry(member).or_default();
            for (phase, us) in phases {
                row.entry(phase).or_default().push(us);
            }
        }
    }

    /// The window's phases in protocol order, as columns.
    fn columns(&self) -> Vec<&'static str> {
        let seen: std::collections::BTreeSet<&str> = self
            .0
            .values()
            .flat_map(|p| p.keys().map(String::as_str))
            .collect();
        stillpoint_controller::core::timeline::PHASES
            .iter()
            .copied()
            .filter(|p| seen.contains(p))
            .collect()
    }

    /// One row per member: each phase's median, ms after the window opened.
    pub fn table(&self) -> String {
        let columns = self.columns();
        let mut headers = vec!["MEMBER (P50 MS IN WINDOW)"];
        headers.extend(columns.iter().copied());
        let rows: Vec<Vec<String>> = self
            .0
            .iter()
            .map(|(member, phases)| {
                let mut row = vec![member.clone()];
                row.extend(columns.iter().map(|c| {
                    phases
                        .get(*c)
                        .map_or("-".into(), |v| format!("{:.2}", Stats::of(v).p50 / 1000.0))
                }));
                row
            })
            .collect();
        table(&headers, &rows)
    }

    pub fn json(&self) -> Value {
        self.0
            .iter()
            .map(|(member, phases)| {
                let p: serde_json::Map<String, Value> = phases
                    .iter()
                    .map(|(phase, v)| (phase.clone(), json!(Stats::of(v).p50 / 1000.0)))
                    .collect();
                (member.clone(), Value::Object(p))
            })
            .collect::<serde_json::Map<String, Value>>()
            .into()
    }
}

/// The suite's output: a printed table and a JSON document.
#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<(String, String)>,
    pub json: serde_json::Map<String, Value>,
    /// The parts that failed, and why.
    pub failed: Vec<(Part, String)>,
}

impl Report {
    /// Records how part `part` ended: a failure gets a section of its own
    /// and a `failed` entry in the JSON; the other parts go on.
    fn outcome(&mut self, part: Part, result: Result<()>) {
        let Err(e) = result else { return };
        let why = format!("{e:#}");
        let name = part.name();
        self.sections
            .push((format!("{name}: FAILED"), format!("{why}\n")));
        let failed = self.json.entry("failed").or_insert_with(|| json!({}));
        failed[name] = json!(why);
        self.failed.push((part, why));
    }
}

impl Part {
    /// Its name on the command line and in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Part::Window => "window",
            Part::Fanout => "fanout",
            Part::Stall => "stall",
            Part::Memory => "memory",
            Part::Flush => "flush",
            Part::Kube => "kube",
        }
    }
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    stillpoint_controller::cli::output::table(headers, rows)
}

/// One exec hook: a client process per member, as hook frameworks run it.
struct Hook {
    member: &'static str,
    program: &'static str,
    args: Vec<String>,
}

impl Hook {
    fn run(&self) -> Result<()> {
        let out = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.program))?;
        if !out.status.success() {
            bail!(
                "{} hook of {} failed: {}",
                self.program,
                self.member,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The pre and post hooks of the six demo members, in the order a hook
/// framework runs them.
fn hooks(cluster: &Cluster) -> (Vec<Hook>, Vec<Hook>) {
    let psql = |member, port: u16, sql: &str| Hook {
        member,
        program: "psql",
        args: [
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "demo",
            "-c",
            sql,
        ]
        .map(String::from)
        .to_vec(),
    };
    let maria = |member, port: u16, sql: &str| Hook {
        member,
        program: "mariadb",
        args: [
            "-h",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-u",
            "root",
            "-e",
            sql,
        ]
        .map(String::from)
        .to_vec(),
    };
    let redis = |member, port: u16, cmd: &[&str]| Hook {
        member,
        program: "redis-cli",
        args: ["-h", "127.0.0.1", "-p", &port.to_string()]
            .iter()
            .chain(cmd)
            .map(|s| s.to_string())
            .collect(),
    };
    let (pg0, pg1) = (cluster.pg.primary.port, cluster.pg.replica.port);
    let (m0, m1) = (cluster.maria.primary.port, cluster.maria.replica.port);
    let (r0, r1) = (cluster.redis.primary.port, cluster.redis.replica.port);
    let lock = "BEGIN; LOCK TABLE chain_a, chain_b IN EXCLUSIVE MODE; COMMIT";
    let pre = vec![
        psql("pg-0", pg0, lock),
        psql("pg-1", pg1, "SELECT pg_wal_replay_pause()"),
        maria("maria-0", m0, "FLUSH TABLES WITH READ LOCK"),
        maria("maria-1", m1, "FLUSH TABLES WITH READ LOCK"),
        redis("redis-0", r0, &["CLIENT", "PAUSE", "30000", "WRITE"]),
        redis("redis-1", r1, &["CLIENT", "PAUSE", "30000", "WRITE"]),
    ];
    let post = vec![
        psql("pg-0", pg0, "SELECT pg_current_wal_lsn()"),
        psql("pg-1", pg1, "SELECT pg_wal_replay_resume()"),
        maria("maria-0", m0, "UNLOCK TABLES"),
        maria("maria-1", m1, "UNLOCK TABLES"),
        redis("redis-0", r0, &["CLIENT", "UNPAUSE"]),
        redis("redis-1", r1, &["CLIENT", "UNPAUSE"]),
    ];
    (pre, post)
}

/// One exec-hook backup: returns its window and its cut (one request for
/// every volume), in µs.
async fn hook_backup(
    pre: &[Hook],
    post: &[Hook],
    cut: Option<(&Btrfs, &[VolumeRef])>,
    id: &str,
) -> Result<(f64, f64)> {
    if let Some((btrfs, volumes)) = cut {
        // As the orchestrator does before its freeze: the comparison is of
        // the freeze pattern, not of the flush.
        btrfs.prepare(volumes).await?;
    }
    let started = Instant::now();
    for h in pre {
        tokio::task::block_in_place(|| h.run())?;
    }
    let made = stillpoint_controller::local::snapshot::Made::default();
    let cutting = Instant::now();
    if let Some((btrfs, volumes)) = cut {
        btrfs.cut(id, volumes, &made).await?;
    }
    let cut_us = cutting.elapsed().as_micros() as f64;
    for h in post {
        tokio::task::block_in_place(|| h.run())?;
    }
    let window = started.elapsed().as_micros() as f64;
    if let Some((btrfs, _)) = cut {
        btrfs.delete(&made.handles()).await?;
        btrfs.delete_backup(id).await?;
    }
    Ok((window, cut_us))
}

/// CPU time this process has used so far (every thread), µs: the
/// orchestrator runs in it, the agents and servers do not.
fn process_cpu_us() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

async fn stillpoint_backup(
    orchestrator: &Orchestrator,
    group: &Group,
    id: &str,
) -> Result<Manifest> {
    let m = orchestrator.backup(group, id).await?;
    stillpoint_controller::local::retention::delete_backup(&orchestrator.catalog, &m, Some(group))
        .await?;
    Ok(m)
}

/// Part 1: the freeze window of Stillpoint against exec hooks.
pub async fn window(cluster: &Cluster, runs: usize, report: &mut Report) -> Result<()> {
    let (pre, post) = hooks(cluster);
    let btrfs_group = cluster.group.clone();
    let mut none_group = cluster.group.clone();
    none_group.driver = Driver::None;
    let btrfs = Btrfs::new(cluster.group.snapshot_dir.clone());
    let vols = stillpoint_controller::local::snapshot::volumes_of(&cluster.group.members);
    let mut sp_btrfs = Vec::new();
    let mut sp_none = Vec::new();
    let mut hk_btrfs = Vec::new();
    let mut hk_none = Vec::new();
    let mut overhead = Vec::new();
    let mut member_max = Vec::new();
    let mut flush_phase = Vec::new();
    let mut member_flush: BTreeMap<String, Vec<f64>> = Default::default();
    let mut member_freeze: BTreeMap<String, Vec<f64>> = Default::default();
    // The btrfs backups' cut phase: one request for the replicas, then one
    // for their primaries (the cut never relies on one instant).
    let mut cut_phase = Vec::new();
    // The same six volumes in one request (the hooks' cut), for the cost.
    let mut one_request = Vec::new();
    let mut last = None;
    // The orchestrator's CPU time per member per no-op backup (µs).
    let mut cpu = Vec::new();
    let mut phases = PhaseSamples::default();
    for i in 0..runs + 2 {
        let cpu_before = process_cpu_us();
        let a =
            stillpoint_backup(&cluster.orchestrator, &none_group, &format!("sp-none-{i}")).await?;
        let cpu_used = process_cpu_us() - cpu_before;
        let b = stillpoint_backup(
            &cluster.orchestrator,
            &btrfs_group,
            &format!("sp-btrfs-{i}"),
        )
        .await?;
        let (c, _) = hook_backup(&pre, &post, None, &format!("hk-none-{i}")).await?;
        let (d, one_cut) =
            hook_backup(&pre, &post, Some((&btrfs, &vols)), &format!("hk-btrfs-{i}")).await?;
        if i < 2 {
            continue; // warm-up
        }
        sp_none.push(a.freeze_window_us.unwrap_or(0) as f64);
        cpu.push(cpu_used / a.members.len().max(1) as f64);
        sp_btrfs.push(b.freeze_window_us.unwrap_or(0) as f64);
        cut_phase.extend(b.cut_us.map(|us| us as f64));
        one_request.push(one_cut);
        hk_none.push(c);
        hk_btrfs.push(d);
        last = Some(a.clone());
        overhead.extend(overhead_us(&a));
        phases.add(&a);
        member_max.push(slowest_member_us(&a));
        flush_phase.extend(flush_phase_us(&a));
        for r in &a.members {
            member_flush
                .entry(r.name.clone())
                .or_default()
                .extend(r.flush_us.map(|us| us as f64));
            member_freeze
                .entry(r.name.clone())
                .or_default()
                .extend(r.freeze_us.map(|us| us as f64));
        }
    }
    let p50s = |by: &BTreeMap<String, Vec<f64>>| {
        by.iter()
            .map(|(name, us)| format!("{name} {}", ms(Stats::of(us).p50)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows_of = |name: &str, cut: &str, sp: &[f64], hk: &[f64]| {
        let (s, h) = (Stats::of(sp), Stats::of(hk));
        vec![
            format!("{name} ({cut} cut)"),
            ms(s.p50),
            ms(s.p99),
            ms(h.p50),
            ms(h.p99),
            format!("{:.0}x", h.p50 / s.p50.max(1.0)),
            format!("{:.0}x", h.p99 / s.p99.max(1.0)),
        ]
    };
    let gantt = last.map(|m| m.timeline.gantt(64)).unwrap_or_default();
    let text = format!(
        "{}\nStillpoint orchestration overhead (no-op cut): p50 {}, p99 {}; slowest member's own freeze+thaw: p50 {}\n\
         the orchestrator's CPU time per member per backup (no-op cut, the whole backup): p50 {}, p99 {}\n\
         each member's own freeze p50 (the agent's clock): {}\n\
         flush phase (no-op cut, inside the window): p50 {}, p99 {}; each member's own flush p50: {}\n\
         cut phase (btrfs: the replicas' snapshots, then their primaries'): p50 {}, p99 {}; \
         the same volumes in one request: p50 {}, p99 {}\n\
         The exec-hook baseline cannot hold its locks: each lock ends when its client process exits,\n\
         so its \"window\" protects nothing. That is the correctness gap; the time is the cost of the pattern.\n\n\
         where the window goes (no-op cut): each phase's median, ms after the first freeze request\n{}\n\
         timeline of the last Stillpoint backup (no-op cut):\n{gantt}",
        table(
            &[
                "SIX MEMBERS",
                "STILLPOINT P50",
                "P99",
                "EXEC HOOKS P50",
                "P99",
                "RATIO P50",
                "RATIO P99"
            ],
            &[
                rows_of("pg+mariadb+redis", "no-op", &sp_none, &hk_none),
                rows_of("pg+mariadb+redis", "btrfs", &sp_btrfs, &hk_btrfs),
            ],
        ),
        ms(Stats::of(&overhead).p50),
        ms(Stats::of(&overhead).p99),
        ms(Stats::of(&member_max).p50),
        micros(Stats::of(&cpu).p50),
        micros(Stats::of(&cpu).p99),
        p50s(&member_freeze),
        ms(Stats::of(&flush_phase).p50),
        ms(Stats::of(&flush_phase).p99),
        p50s(&member_flush),
        ms(Stats::of(&cut_phase).p50),
        ms(Stats::of(&cut_phase).p99),
        ms(Stats::of(&one_request).p50),
        ms(Stats::of(&one_request).p99),
        phases.table(),
    );
    report.sections.push((
        format!("1. Freeze window against exec hooks ({runs} runs each, interleaved)"),
        text,
    ));
    let pair = |sp: &[f64], hk: &[f64]| {
        let (s, h) = (Stats::of(sp), Stats::of(hk));
        json!({
            "stillpoint": s.json_ms(),
            "exec_hooks": h.json_ms(),
            "ratio_p50": h.p50 / s.p50.max(1.0),
            "ratio_p99": h.p99 / s.p99.max(1.0),
        })
    };
    report.json.insert(
        "window".into(),
        json!({
            "members": 6,
            "noop_cut": pair(&sp_none, &hk_none),
            "btrfs_cut": pair(&sp_btrfs, &hk_btrfs),
            "overhead": Stats::of(&overhead).json_ms(),
            "phases_p50_ms_in_window": phases.json(),
            "slowest_member_freeze_thaw": Stats::of(&member_max).json_ms(),
            "cpu_per_member_per_backup": Stats::of(&cpu).json_ms(),
            "flush_phase": Stats::of(&flush_phase).json_ms(),
            "btrfs_cut_phase": Stats::of(&cut_phase).json_ms(),
            "btrfs_cut_one_request": Stats::of(&one_request).json_ms(),
            "member_flush": member_flush
                .iter()
                .map(|(name, us)| (name.clone(), Stats::of(us).json_ms()))
                .collect::<serde_json::Map<String, Value>>(),
            "member_freeze": member_freeze
                .iter()
                .map(|(name, us)| (name.clone(), Stats::of(us).json_ms()))
                .collect::<serde_json::Map<String, Value>>(),
            "baseline_holds_its_locks": false,
        }),
    );
    Ok(())
}

/// pgbench's per-transaction latencies (µs) from its logs, and its failed count.
fn pgbench_run(cluster: &Cluster, seconds: u64, dir: &Path, tag: &str) -> Result<(Vec<f64>, u64)> {
    let prefix = dir.join(tag);
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.pg.primary.port.to_string(),
        ])
        .args(["-U", "postgres", "-n", "-c", "4", "-j", "2"])
        .args(["-T", &seconds.to_string(), "-l", "--log-prefix"])
        .arg(&prefix)
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(tag) {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())?.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<f64>().ok())
            {
                latencies.push(us);
            }
        }
    }
    Ok((latencies, failed))
}

/// Part 3: pgbench with and without back-to-back backups.
pub async fn stall(cluster: &Cluster, seconds: u64, report: &mut Report) -> Result<()> {
    let pg = &cluster.pg.primary;
    let scale = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-i", "-q", "-s", "4", "demo"])
        .output()
        .context("pgbench -i")?;
    if !scale.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&scale.stderr)
        );
    }
    let logs = tempfile::Builder::new()
        .prefix("stillpoint-pgbench-")
        .tempdir()?;
    let dir = logs.path().to_path_buf();
    let quiet = tokio::task::block_in_place(|| pgbench_run(cluster, seconds, &dir, "quiet"))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let group = cluster.group.clone();
    let orchestrator = cluster.orchestrator.clone();
    let backups = tokio::spawn(async move {
        let mut windows = Vec::new();
        let mut errors = Vec::new();
        let mut i = 0;
        while !*stopped.borrow() {
            match stillpoint_backup(&orchestrator, &group, &format!("stall-{i}")).await {
                Ok(m) => windows.push(m.freeze_window_us.unwrap_or(0) as f64),
                Err(e) => errors.push(format!("{e:#}")),
            }
            i += 1;
        }
        (windows, errors)
    });
    let during = tokio::task::block_in_place(|| pgbench_run(cluster, seconds, &dir, "busy"))?;
    let _ = stop.send(true);
    let (windows, errors) = backups.await?;
    if !errors.is_empty() {
        bail!("backups during pgbench failed: {}", errors.join("; "));
    }
    let (q, b, w) = (
        Stats::of(&quiet.0),
        Stats::of(&during.0),
        Stats::of(&windows),
    );
    let row = |name: &str, s: &Stats, failed: u64| {
        vec![
            name.to_string(),
            s.n.to_string(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
            failed.to_string(),
        ]
    };
    let text = format!(
        "{}\nbackups taken during the run: {} (freeze window p50 {}, p99 {}); added p99 latency: {}\n",
        table(
            &["PGBENCH (4 CLIENTS)", "TXNS", "P50", "P99", "MAX", "FAILED"],
            &[
                row("without backups", &q, quiet.1),
                row("back-to-back backups", &b, during.1),
            ],
        ),
        w.n,
        ms(w.p50),
        ms(w.p99),
        ms(b.p99 - q.p99),
    );
    report.sections.push((
        format!("3. Application stall (pgbench, {seconds} s each)"),
        text,
    ));
    report.json.insert(
        "stall".into(),
        json!({
            "seconds": seconds,
            "without_backups": {"latency": q.json_ms(), "failed": quiet.1},
            "with_backups": {"latency": b.json_ms(), "failed": during.1},
            "backups": w.n,
            "freeze_window": w.json_ms(),
            "added_p99_ms": (b.p99 - q.p99) / 1000.0,
        }),
    );
    Ok(())
}

/// Noop agents sharing one identity, for parts 2 and 4.
pub struct NoopFleet {
    agents: Vec<AgentProc>,
    dir: tempfile::TempDir,
    identity: String,
    controller_tls: PathBuf,
    binary: PathBuf,
    agent_tls: stillpoint_proto::tls::TlsFiles,
}

impl std::fmt::Debug for NoopFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoopFleet({} agents)", self.agents.len())
    }
}

const CONTROLLER: &str = "spiffe://stillpoint.bench/ns/stillpoint/sa/controller";

impl NoopFleet {
    pub fn new(binary: &Path) -> Result<NoopFleet> {
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-bench-")
            .tempdir()?;
        let pki = certs::ScratchPki::new(&dir.path().join("pki"), "Stillpoint bench CA")?;
        let issue = |name: &str, uri: &str| pki.issue(name, uri);
        let identity = "spiffe://stillpoint.bench/ns/bench/sa/noop".to_string();
        let agent_dir = issue("agent", &identity)?;
        let controller_tls = issue("controller", CONTROLLER)?;
        Ok(NoopFleet {
            agents: Vec::new(),
            dir,
            identity,
            controller_tls,
            binary: binary.to_path_buf(),
            agent_tls: stillpoint_proto::tls::TlsFiles::in_dir(&agent_dir),
        })
    }

    /// Grows the fleet to `n` agents (started in parallel).
    pub async fn grow(&mut self, n: usize) -> Result<()> {
        let have = self.agents.len();
        let mut tasks = tokio::task::JoinSet::new();
        for i in have..n {
            let spec = AgentSpec::new(
                &format!("noop-{i}"),
                "noop",
                self.agent_tls.clone(),
                CONTROLLER,
            )
            .with("STILLPOINT_LOG", "warn,stillpoint_agent=info");
            let binary = self.binary.clone();
            tasks.spawn_blocking(move || (i, AgentProc::spawn_with(&binary, &spec)));
            if tasks.len() >= 16 {
                let (i, a) = tasks.join_next().await.expect("a task")?;
                self.agents
                    .push(a.with_context(|| format!("noop agent {i}"))?);
            }
        }
        while let Some(done) = tasks.join_next().await {
            let (i, a) = done?;
            self.agents
                .push(a.with_context(|| format!("noop agent {i}"))?);
        }
        Ok(())
    }

    fn members(&self, n: usize) -> Vec<MemberFile> {
        self.agents[..n]
            .iter()
            .map(|a| MemberFile {
                name: a.member.clone(),
                agent: a.grpc_addr(),
                identity: self.identity.clone(),
                role: RoleHint::Primary,
                primary: None,
                volumes: vec![],
                restore_stage: None,
                fsfreeze: false,
                accept_uncovered: vec![],
            })
            .collect()
    }

    pub fn group(&self, n: usize) -> Group {
        Group {
            name: format!("noop-{n}"),
            driver: Driver::None,
            snapshot_dir: PathBuf::new(),
            exec: None,
            freeze_budget: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(30),
            align_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            rpc_timeout: stillpoint_controller::core::agents::DEFAULT_RPC_TIMEOUT,
            members: self.members(n),
        }
    }

    pub fn orchestrator(&self) -> Result<Orchestrator> {
        Ok(Orchestrator {
            tls: stillpoint_controller::core::agents::ControllerTls::watch(
                stillpoint_proto::tls::TlsFiles::in_dir(&self.controller_tls),
                Duration::from_secs(600),
            )?,
            catalog: stillpoint_controller::local::catalog::Catalog::open(
                &self.dir.path().join("catalog"),
            )?,
        })
    }

    /// A local-mode config with one group of the first `n` agents.
    pub fn config_file(&self, n: usize) -> Result<PathBuf> {
        let mut text = format!(
            "catalog = \"{}\"\n[tls]\ndir = \"{}\"\n[groups.fleet]\nsnapshotter = \"exec\"\n\
             [groups.fleet.exec]\nsnapshot = \"true\"\ndelete = \"true\"\n",
            self.dir.path().join("catalog").display(),
            self.controller_tls.display()
        );
        for m in self.members(n) {
            text.push_str(&format!(
                "[[groups.fleet.members]]\nname = \"{}\"\nagent = \"{}\"\nidentity = \"{}\"\nrole = \"primary\"\n",
                m.name, m.agent, m.identity
            ));
        }
        let path = self.dir.path().join(format!("fleet-{n}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Part 2: fan-out over noop agents.
pub async fn fanout(
    fleet: &mut NoopFleet,
    sizes: &[usize],
    runs: usize,
    report: &mut Report,
) -> Result<()> {
    let orchestrator = fleet.orchestrator()?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for &n in sizes {
        fleet.grow(n).await?;
        let group = fleet.group(n);
        let mut windows = Vec::new();
        let mut overheads = Vec::new();
        let mut slowest = Vec::new();
        let mut cpu = Vec::new();
        for i in 0..runs + 2 {
            let cpu_before = process_cpu_us();
            let m = stillpoint_backup(&orchestrator, &group, &format!("fan-{n}-{i}")).await?;
            let cpu_used = process_cpu_us() - cpu_before;
            if i < 2 {
                continue;
            }
            cpu.push(cpu_used / n as f64);
            windows.push(m.freeze_window_us.unwrap_or(0) as f64);
            overheads.extend(overhead_us(&m));
            slowest.push(slowest_member_us(&m));
        }
        let (w, o, s, c) = (
            Stats::of(&windows),
            Stats::of(&overheads),
            Stats::of(&slowest),
            Stats::of(&cpu),
        );
        rows.push(vec![
            n.to_string(),
            ms(w.p50),
            ms(w.p99),
            ms(o.p50),
            ms(o.p99),
            ms(s.p50),
            micros(c.p50),
        ]);
        out.push(
            json!({"agents": n, "window": w.json_ms(), "overhead": o.json_ms(),
            "slowest_member_freeze_thaw": s.json_ms(), "cpu_per_member_per_backup": c.json_ms()}),
        );
    }
    let text = format!(
        "{}\noverhead = window - slowest member's own freeze+thaw - cut (no-op cut); real mTLS to every agent\n\
         CPU = the orchestrator's CPU time per member per backup (the whole backup, resolve to record)\n",
        table(
            &[
                "NOOP AGENTS",
                "WINDOW P50",
                "P99",
                "OVERHEAD P50",
                "P99",
                "SLOWEST MEMBER P50",
                "CPU/MEMBER P50"
            ],
            &rows
        )
    );
    report
        .sections
        .push((format!("2. Fan-out ({runs} runs per size)"), text));
    report.json.insert("fanout".into(), Value::Array(out));
    Ok(())
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Part 4: the controller's memory while it holds `n` freeze streams:
/// `stillpoint quiesce` (the `controller` binary) measured from outside.
pub async fn memory(
    fleet: &mut NoopFleet,
    controller: &Path,
    n: usize,
    report: &mut Report,
) -> Result<()> {
    fleet.grow(n).await?;
    let config = fleet.config_file(n)?;
    let exe = controller;
    let out_path = fleet.dir.path().join("quiesce.out");
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(&config)
        .args(["quiesce", "fleet", "--for", "6s", "--ttl", "60s"])
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting stillpoint quiesce")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&out_path)?.contains("holding for") {
        if let Some(status) = child.try_wait()? {
            bail!("quiesce of {n} agents exited early ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("quiesce of {n} agents did not freeze them within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut rss = 0;
    let mut hwm = 0;
    for _ in 0..20 {
        rss = rss.max(proc_status_kib(pid, "VmRSS:"));
        hwm = hwm.max(proc_status_kib(pid, "VmHWM:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let frozen = std::fs::read_to_string(&out_path)?
        .lines()
        .filter(|l| l.starts_with("frozen "))
        .count();
    let status = tokio::task::block_in_place(|| child.wait())?;
    if !status.success() || frozen != n {
        bail!("quiesce held {frozen} of {n} agents and exited {status}");
    }
    let text = format!(
        "{}\nthe real `stillpoint quiesce` process, holding one mTLS freeze stream per agent (renewing)\n",
        table(
            &["CHANNELS", "CONTROLLER RSS", "PEAK RSS"],
            &[vec![
                n.to_string(),
                format!("{:.1} MiB", rss as f64 / 1024.0),
                format!("{:.1} MiB", hwm as f64 / 1024.0)
            ]]
        )
    );
    report.sections.push(("4. Controller memory".into(), text));
    report.json.insert(
        "memory".into(),
        json!({"channels": n, "rss_mib": rss as f64 / 1024.0, "peak_rss_mib": hwm as f64 / 1024.0}),
    );
    Ok(())
}

/// Fills a Redis server with `keys` keys of 64-byte values, in batches.
async fn populate(conn: &mut redis::aio::MultiplexedConnection, keys: usize) -> Result<()> {
    redis::cmd("FLUSHALL").query_async::<()>(conn).await?;
    let value = "v".repeat(64);
    for start in (0..keys).step_by(10_000) {
        let mut mset = redis::cmd("MSET");
        for k in start..(start + 10_000).min(keys) {
            mset.arg(format!("key:{k}")).arg(&value);
        }
        mset.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// Part 5: what the flush costs a Redis member, RDB only against AOF.
pub async fn flush(agent: &Path, runs: usize, report: &mut Report) -> Result<()> {
    use crate::servers::Setup;
    use crate::servers::redis::{Persistence, RedisPair};
    let dir = tempfile::Builder::new()
        .prefix("stillpoint-bench-")
        .tempdir()?;
    let pki = certs::ScratchPki::new(&dir.path().join("pki"), "Stillpoint bench CA")?;
    let identity = "spiffe://stillpoint.bench/ns/bench/sa/redis";
    let agent_tls = stillpoint_proto::tls::TlsFiles::in_dir(&pki.issue("redis", identity)?);
    let tls = stillpoint_controller::core::agents::ControllerTls::watch(
        stillpoint_proto::tls::TlsFiles::in_dir(&pki.issue("controller", CONTROLLER)?),
        Duration::from_secs(600),
    )?;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for persistence in [Persistence::Rdb, Persistence::Aof] {
        let pair = tokio::task::spawn_blocking(move || {
            RedisPair::start_with(&Setup::default(), persistence)
        })
        .await??;
        let spec = AgentSpec::new("redis", "redis", agent_tls.clone(), CONTROLLER)
            .with("STILLPOINT_DSN", &pair.primary.url())
            .with("STILLPOINT_LOG", "warn,stillpoint_agent=info");
        let proc = AgentProc::spawn_with(agent, &spec)?;
        let mut client = tls.connect(&proc.grpc_addr(), identity).await?;
        let mut conn = redis::Client::open(pair.primary.url())?
            .get_multiplexed_async_connection()
            .await?;
        for keys in [10_000usize, 1_000_000] {
            populate(&mut conn, keys).await?;
            let n = if keys > 100_000 { runs.min(10) } else { runs };
            let (mut flushes, mut windows) = (Vec::new(), Vec::new());
            for run in 0..n {
                let started = Instant::now();
                let mut held = stillpoint_controller::core::agents::HeldFreeze::start(
                    &mut client,
                    &format!("flush-{keys}-{run}"),
                    Duration::from_secs(60),
                )
                .await?;
                let flushed = held.flush(true).await?;
                if !flushed.error.is_empty() {
                    bail!("the flush failed: {}", flushed.error);
                }
                held.request_thaw(true).await?;
                held.thawed().await?;
                windows.push(started.elapsed().as_micros() as f64);
                flushes.push((flushed.engine_us + flushed.sync_us) as f64);
            }
            let (f, w) = (Stats::of(&flushes), Stats::of(&windows));
            let name = match persistence {
                Persistence::Rdb => "RDB only (save while paused)",
                _ => "AOF (drain the AOF buffer)",
            };
            rows.push(vec![
                name.to_string(),
                keys.to_string(),
                ms(f.p50),
                ms(f.p99),
                ms(w.p50),
                ms(w.p99),
            ]);
            results.push(json!({
                "persistence": format!("{persistence:?}").to_lowercase(),
                "keys": keys,
                "flush": f.json_ms(),
                "freeze_to_thaw": w.json_ms(),
            }));
        }
        drop(proc);
        drop(pair);
    }
    let text = format!(
        "{}
one Redis primary (64-byte values), freeze → flush → thaw through its agent; the flush is inside the freeze window
",
        table(
            &["REDIS PERSISTENCE", "KEYS", "FLUSH P50", "P99", "FREEZE→THAW P50", "P99"],
            &rows
        )
    );
    report.sections.push(("5. Flush cost".into(), text));
    report.json.insert("flush".into(), Value::Array(results));
    Ok(())
}

/// Runs the selected parts; `say` reports progress.
///
/// A part that fails is recorded as failed in the report and the others
/// still run.
pub async fn run(options: &Options, agent: &Path, controller: &Path, say: impl Fn(&str)) -> Report {
    let mut report = Report::default();
    report.json.insert("machine".into(), machine());
    let wants = |p: Part| options.parts.contains(&p);
    if wants(Part::Window) || wants(Part::Stall) {
        say("starting the six databases on btrfs and their agents");
        match Cluster::start(agent, &say).await {
            Err(e) => {
                let why = format!("starting the six databases: {e:#}");
                for p in [Part::Window, Part::Stall]
                    .into_iter()
                    .filter(|p| wants(*p))
                {
                    report.outcome(p, Err(anyhow::anyhow!("{why}")));
                }
            }
            Ok(cluster) => {
                if wants(Part::Window) {
                    say(&format!(
                        "1. freeze window: Stillpoint and exec hooks, {} runs each",
                        options.runs
                    ));
                    let r = window(&cluster, options.runs, &mut report).await;
                    report.outcome(Part::Window, r);
                }
                if wants(Part::Stall) {
                    say(&format!(
                        "3. application stall: pgbench, {} s without and {} s with backups",
                        options.pgbench_seconds, options.pgbench_seconds
                    ));
                    let r = stall(&cluster, options.pgbench_seconds, &mut report).await;
                    report.outcome(Part::Stall, r);
                }
                drop(cluster);
            }
        }
    }
    if wants(Part::Fanout) || wants(Part::Memory) {
        fleet_parts(options, agent, controller, &say, &mut report).await;
    }
    if wants(Part::Flush) {
        say("5. flush cost: a Redis primary, RDB only and AOF, 10k and 1M keys");
        let r = flush(agent, options.runs, &mut report).await;
        report.outcome(Part::Flush, r);
    }
    if wants(Part::Kube) {
        say(&format!(
            "6. Kubernetes: the window in the lab, {} backups per arm",
            options.kube_runs
        ));
        let r = kube(options.kube_runs, &mut report).await;
        report.outcome(Part::Kube, r);
    }
    report
}

/// Part 6: runs the test suite's `kube_window` bench through cargo (the
/// lab is part of the test harness, built from a checkout) and takes its
/// tables and JSON.
async fn kube(runs: usize, report: &mut Report) -> Result<()> {
    let cargo = std::env::var("CARGO").context(
        "the Kubernetes part runs from a checkout: `cargo run --release -p stillpoint-lab -- bench --parts kube`",
    )?;
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let json_path =
        std::env::temp_dir().join(format!("stillpoint-kube-{}.json", std::process::id()));
    let out = tokio::process::Command::new(cargo)
        .args([
            "bench",
            "-q",
            "-p",
            "stillpoint-tests",
            "--bench",
            "kube_window",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env("STILLPOINT_BENCH_RUNS", runs.to_string())
        .env("STILLPOINT_BENCH_JSON", &json_path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("running the kube_window bench")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let json: Value = std::fs::read(&json_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&json_path);
    if !out.status.success() || json.is_null() {
        bail!(
            "the kube_window bench failed ({}): {}",
            out.status,
            text.trim()
        );
    }
    let failed = json["failed"].as_array().is_some_and(|f| !f.is_empty());
    report.sections.push(("6. Kubernetes".into(), text));
    report.json.insert("kube".into(), json);
    if failed {
        bail!("some arms of the Kubernetes part failed (see its table)");
    }
    Ok(())
}

/// Parts 2 and 4, on one fleet of noop agents.
async fn fleet_parts(
    options: &Options,
    agent: &Path,
    controller: &Path,
    say: &impl Fn(&str),
    report: &mut Report,
) {
    let wants = |p: Part| options.parts.contains(&p);
    let mut fleet = match NoopFleet::new(agent) {
        Ok(f) => f,
        Err(e) => {
            for p in [Part::Fanout, Part::Memory]
                .into_iter()
                .filter(|p| wants(*p))
            {
                report.outcome(p, Err(anyhow::anyhow!("starting noop agents: {e:#}")));
            }
            return;
        }
    };
    if wants(Part::Fanout) {
        say(&format!("2. fan-out: {:?} noop agents", options.fanout));
        let r = fanout(&mut fleet, &options.fanout, options.runs, report).await;
        report.outcome(Part::Fanout, r);
    }
    if wants(Part::Memory) {
        say(&format!(
            "4. controller memory: {} agent channels",
            options.channels
        ));
        let r = memory(&mut fleet, controller, options.channels, report).await;
        report.outcome(Part::Memory, r);
    }
}

/// What the figures were measured on.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "cpu": model,
        "cores": cores,
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}
