//! `stillpoint restore ID --to DIR`.

use std::path::PathBuf;

use clap::Args;

use super::output::table;
use super::{Global, Local};
use crate::restore::restore_files;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup to restore.
    pub id: String,
    /// Where to put every member's volumes (`DIR/<member>/<volume index>`).
    #[arg(long)]
    pub to: PathBuf,
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
    Ok(())
}
