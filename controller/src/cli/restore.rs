//! `stillpoint restore ID --to DIR [--start]`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::output::table;
use super::{Global, Local};
use crate::restore::restore_files;
use crate::servers::mariadb::MariaRestored;
use crate::servers::postgres::PgRestored;
use crate::servers::redis::RedisRestored;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup to restore.
    pub id: String,
    /// Where to put every member's volumes (`DIR/<member>/<volume index>`).
    #[arg(long)]
    pub to: PathBuf,
    /// Then start every restored server on a free local port, stage by
    /// stage (each stage only once the previous one answers), check it, and
    /// keep them running until Ctrl-C.
    #[arg(long)]
    pub start: bool,
}

pub fn run(args: RestoreArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let manifest = local.catalog()?.get(&args.id)?;
    let restored = restore_files(&manifest, &args.to)?;
    let rows: Vec<Vec<String>> = restored
        .iter()
        .map(|r| {
            vec![
                r.stage.to_string(),
                r.member.clone(),
                r.path.display().to_string(),
                r.consistency
                    .map(|c| {
                        serde_json::to_value(c)
                            .unwrap()
                            .as_str()
                            .unwrap_or("")
                            .to_string()
                    })
                    .unwrap_or_default(),
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
    // Stage by stage (restore_files returns them in order): each server
    // must answer before the next is started.
    let mut running: Vec<Box<dyn std::any::Any>> = Vec::new();
    for r in restored.iter().filter(|r| r.path.ends_with("0")) {
        let record = manifest
            .members
            .iter()
            .find(|m| m.name == r.member)
            .expect("restored from this manifest");
        let (server, address): (Box<dyn std::any::Any>, String) = match record.engine.as_str() {
            "postgres" => {
                let s = PgRestored::at(r.path.clone())?;
                s.start()?;
                let address = format!("postgresql://postgres@127.0.0.1:{}/", s.server.port);
                (Box::new(s), address)
            }
            "mysql" | "mariadb" => {
                let s = MariaRestored::at(r.path.clone())?;
                s.start()?;
                let address = format!("mysql://127.0.0.1:{}/", s.server.port);
                (Box::new(s), address)
            }
            "redis" => {
                let s = RedisRestored::at(r.path.clone())?;
                s.start()?;
                let address = format!("redis://127.0.0.1:{}/", s.server.port);
                (Box::new(s), address)
            }
            other => bail!(
                "member {}: a restored {other} member cannot be started locally; its files are in {}",
                r.member,
                r.path.display()
            ),
        };
        println!(
            "stage {}: {} ({}) started and answering at {address}",
            r.stage, r.member, record.engine
        );
        running.push(server);
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
