//! `stillpoint restore ID --to DIR [--start]` (local mode); in Kubernetes
//! mode `stillpoint restore BACKUP [--prefix P | --in-place]` creates a
//! GroupRestore and follows it (`cli::kube`).

use std::any::Any;
use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::Args;

use super::output::table;
use super::{Global, Local};
use crate::local::catalog::{Consistency, MemberRecord};
use crate::local::restore::{restore_files, restored_data_dir, restored_path, stage_class};
use crate::local::servers::mariadb::MariaRestored;
use crate::local::servers::postgres::PgRestored;
use crate::local::servers::redis::RedisRestored;
use crate::metrics::metrics;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup to restore (in Kubernetes mode: a GroupBackup).
    pub id: String,
    /// Local mode: where to put every member's volumes
    /// (`DIR/<member>/<volume index>`).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Then start every restored server on a free local port, following
    /// the recovery plan (`stillpoint plan`): a stage starts only once every
    /// member of the previous stage is healthy (started and answering). If
    /// one is not, no later stage is started and the command fails. The
    /// servers run until Ctrl-C.
    #[arg(long)]
    pub start: bool,
    /// Kubernetes mode: restore PVCs under new names with this prefix, into
    /// copies of the workloads named `<prefix><name>` (default `restored-`).
    #[arg(long, conflicts_with = "in_place")]
    pub prefix: Option<String>,
    /// Kubernetes mode: replace the original PVCs (workloads scaled to zero
    /// first). What the original volumes held is lost.
    #[arg(long)]
    pub in_place: bool,
    /// Kubernetes mode: only make (and prepare) the PVCs; start nothing.
    #[arg(long)]
    pub volumes_only: bool,
    /// Kubernetes mode: how long one stage may take to become Ready.
    #[arg(long)]
    pub stage_timeout: Option<String>,
    /// Kubernetes mode: the GroupRestore's name (default `<backup>-restore-<time>`).
    #[arg(long)]
    pub name: Option<String>,
}

/// Starts one restored member and checks it answers; returns the running
/// server (stopped when dropped) and its address.
fn start_member(record: &MemberRecord, to: &Path) -> anyhow::Result<(Box<dyn Any>, String)> {
    let path = &restored_data_dir(record, to)
        .ok_or_else(|| anyhow::anyhow!("its data directory is not in the restore"))?;
    Ok(match record.engine.as_str() {
        "postgres" => {
            let s = PgRestored::at(path.to_path_buf())?;
            s.start()?;
            let address = format!("postgresql://postgres@127.0.0.1:{}/", s.server.port);
            (Box::new(s), address)
        }
        "mysql" | "mariadb" => {
            let s = MariaRestored::at(path.to_path_buf())?.with_log_bin(restored_path(
                record,
                to,
                "log_bin_basename",
            ));
            s.start()?;
            let address = format!("mysql://127.0.0.1:{}/", s.server.port);
            (Box::new(s), address)
        }
        "redis" => {
            let s = RedisRestored::at(path.to_path_buf())?;
            s.start()?;
            let address = format!("redis://127.0.0.1:{}/", s.server.port);
            (Box::new(s), address)
        }
        other => bail!(
            "a restored {other} member cannot be started locally; its files are in {}",
            path.display()
        ),
    })
}

pub fn run(args: RestoreArgs, global: &Global) -> anyhow::Result<()> {
    let Some(to) = args.to.clone() else {
        bail!("--to DIR is required in local mode: where to put every member's volumes");
    };
    let local = Local::load(global)?;
    let manifest = local.catalog()?.get(&args.id)?;
    let restored = restore_files(&manifest, &to)?;
    let rows: Vec<Vec<String>> = restored
        .iter()
        .map(|r| {
            vec![
                r.stage.to_string(),
                r.member.clone(),
                r.path.display().to_string(),
                r.consistency
                    .map(Consistency::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ]
        })
        .collect();
    let paths: Vec<String> = restored
        .iter()
        .map(|r| r.path.display().to_string())
        .collect();
    global.output.print(&paths, || {
        table(&["STAGE", "MEMBER", "RESTORED TO", "CONSISTENCY"], &rows)
    });
    if !args.start {
        return Ok(());
    }
    // Members in plan order (restore_files restored them in it).
    let members = crate::local::restore::order(&manifest);
    let mut stages: Vec<u32> = members.iter().map(|m| m.restore_stage).collect();
    stages.dedup();
    let mut running: Vec<Box<dyn Any>> = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let mut unhealthy = Vec::new();
        for record in members.iter().filter(|m| m.restore_stage == *stage) {
            match start_member(record, &to) {
                Ok((server, address)) => {
                    println!(
                        "stage {stage} ({}): {} ({}) started and answering at {address}",
                        stage_class(*stage),
                        record.name,
                        record.engine
                    );
                    running.push(server);
                }
                Err(e) => {
                    println!(
                        "stage {stage} ({}): {} ({}) failed its health check: {e:#}",
                        stage_class(*stage),
                        record.name,
                        record.engine
                    );
                    unhealthy.push(record.name.clone());
                }
            }
        }
        if !unhealthy.is_empty() {
            for later in &stages[i + 1..] {
                metrics().order_violation(None, &args.id);
                println!(
                    "stage {later} ({}): not started, because stage {stage} is not healthy ({})",
                    stage_class(*later),
                    unhealthy.join(", ")
                );
            }
            drop(running);
            bail!(
                "restore of {} stopped at stage {stage}: {} failed its health check; the restored \
                 files stay in {}",
                manifest.id,
                unhealthy.join(", "),
                to.display()
            );
        }
    }
    println!(
        "{} server(s) running; Ctrl-C stops them (the restored files stay)",
        running.len()
    );
    super::runtime()?.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    drop(running);
    Ok(())
}
