//! `stillpoint-lab bench` (`stillpoint bench`): the benchmark suite (see `crate::bench`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bench::{self, Options, Part};
use crate::servers::agent::{agent_binary, controller_binary};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backups per arm and per fan-out size (at least 30 for a p99).
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Fan-out sizes (noop agents).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub fanout: Vec<usize>,
    /// Agent channels the controller holds for the memory figure.
    #[arg(long, default_value_t = 1000)]
    pub channels: usize,
    /// Length of each pgbench run.
    #[arg(long, default_value_t = 20)]
    pub pgbench_seconds: u64,
    /// Backups per arm of the Kubernetes part (`kube`).
    #[arg(long, default_value_t = 10)]
    pub kube_runs: usize,
    /// Which parts to run (`kube` is not run unless named: it starts the
    /// Kubernetes lab).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "window,fanout,stall,memory,flush"
    )]
    pub parts: Vec<Part>,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/stillpoint-bench.json")]
    pub json: PathBuf,
}

/// Under `cargo run`, (re)builds the agent and the `stillpoint` CLI (whose
/// memory part 4 measures) beside this binary first, so that one command
/// runs the suite on a fresh clone.
fn build_under_cargo() -> anyhow::Result<()> {
    let Ok(cargo) = std::env::var("CARGO") else {
        return Ok(());
    };
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n != "debug");
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "stillpoint-agent",
        "-p",
        "stillpoint-controller",
        "--bins",
        "--manifest-path",
    ])
    .arg(&manifest);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("building stillpoint-agent and stillpoint")?;
    anyhow::ensure!(
        status.success(),
        "building stillpoint-agent and stillpoint failed"
    );
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !crate::servers::is_root() {
        anyhow::bail!(
            "the benchmarks loop-mount btrfs and run database servers as their service users: run as root"
        );
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build; figures from `cargo run --release -p stillpoint-lab -- bench` are the ones to quote"
        );
    }
    build_under_cargo()?;
    let agent = agent_binary()?;
    let controller = controller_binary()?;
    let options = Options {
        runs: args.runs.max(1),
        fanout: args.fanout.clone(),
        channels: args.channels,
        pgbench_seconds: args.pgbench_seconds.max(1),
        parts: args.parts.clone(),
        kube_runs: args.kube_runs.max(1),
    };
    let report = stillpoint_controller::cli::runtime()?.block_on(async {
        tokio::select! {
            r = bench::run(&options, &agent, &controller, |m| eprintln!("==> {m}")) => Ok(r),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted: everything was stopped and removed")),
        }
    })?;
    let machine = report.json.get("machine").cloned().unwrap_or_default();
    println!(
        "Stillpoint benchmarks on {} ({} cores, {} GiB, Linux {}, {} build)\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["profile"].as_str().unwrap_or("?"),
    );
    for (title, text) in &report.sections {
        println!("{title}\n{text}");
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.json,
        serde_json::to_vec_pretty(&serde_json::Value::Object(report.json))?,
    )
    .with_context(|| format!("writing {}", args.json.display()))?;
    println!("JSON written to {}", args.json.display());
    if !report.failed.is_empty() {
        let parts: Vec<&str> = report.failed.iter().map(|(p, _)| p.name()).collect();
        anyhow::bail!(
            "{} part(s) failed: {} (the others' tables and JSON are above)",
            parts.len(),
            parts.join(", ")
        );
    }
    Ok(())
}
