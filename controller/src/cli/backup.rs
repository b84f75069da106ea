//! `stillpoint backup create|list|describe|delete`.

use anyhow::bail;
use clap::{Args, Subcommand};

use super::output::{Output, table};
use super::{Global, Local};
use crate::local::catalog::{Consistency, Manifest};
use crate::local::orchestrator::new_backup_id;
use crate::local::retention::delete_backup;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a group backup now (local mode runs it in this process and waits; Kubernetes mode creates a GroupBackup and follows it).
    Create(CreateArgs),
    /// List the backups in the catalog.
    List,
    /// Show one backup: members, positions, snapshots, artefacts.
    Describe(DescribeArgs),
    /// Delete a backup: its snapshots, then its manifest (Kubernetes mode:
    /// the GroupBackup, then waits until its snapshots are gone).
    Delete(IdArgs),
    /// Kubernetes mode: write a backup's GroupBackupContent (and its kept
    /// Secret) as one YAML document, to import into another cluster that
    /// reaches the same storage.
    Export(ExportArgs),
    /// Kubernetes mode: create an exported GroupBackupContent in this
    /// cluster (always deletionPolicy Retain), ready for a GroupRestore.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The GroupBackup (of the namespace) whose content to export, or with
    /// --content the GroupBackupContent itself.
    pub name: String,
    /// NAME is a GroupBackupContent (e.g. after its namespace was deleted).
    #[arg(long)]
    pub content: bool,
    /// Also export the data of the application's Secrets the backup kept
    /// (without it, only the members' artefacts; the importing side then
    /// creates those Secrets itself before it restores).
    #[arg(long)]
    pub include_secrets: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'f')]
    pub file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A file `backup export` wrote (`-` for standard input).
    pub file: std::path::PathBuf,
    /// The controller's namespace, where the content's kept Secret goes.
    #[arg(long, default_value = "stillpoint-system")]
    pub controller_namespace: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The group to back up.
    pub group: String,
    /// Wait for the backup to finish (local and Kubernetes mode always do).
    #[arg(long)]
    pub wait: bool,
    /// Use this backup id instead of `<group>-<UTC time>`.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    pub id: String,
    /// Show each member's phases as a Gantt chart with the freeze window.
    #[arg(long)]
    pub timeline: bool,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    pub id: String,
}

fn ms(us: Option<u64>) -> String {
    us.map(|us| format!("{:.1} ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn outcome(m: &Manifest) -> &'static str {
    m.outcome.as_str()
}

/// The members table of a manifest.
pub fn members_table(m: &Manifest) -> String {
    let rows: Vec<Vec<String>> = m
        .members
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.engine.to_string(),
                r.role.to_string(),
                r.position.clone().unwrap_or_else(|| "-".into()),
                r.aligned_to.clone().unwrap_or_else(|| "-".into()),
                Consistency::name_or_dash(r.consistency).to_string(),
                r.restore_stage.to_string(),
                r.snapshots.len().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "MEMBER",
            "ENGINE",
            "ROLE",
            "POSITION",
            "ALIGNED TO",
            "CONSISTENCY",
            "STAGE",
            "SNAPSHOTS",
        ],
        &rows,
    )
}

pub fn run(command: BackupCommand, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    match command {
        BackupCommand::Create(args) => create(&local, args, global),
        BackupCommand::List => list(&local, global),
        BackupCommand::Describe(args) => describe(&local, args, global),
        BackupCommand::Delete(args) => delete(&local, args),
        BackupCommand::Export(_) | BackupCommand::Import(_) => anyhow::bail!(
            "export and import carry a GroupBackupContent between clusters: Kubernetes mode \
             (--kube); a local backup is the catalog's manifest and its snapshots"
        ),
    }
}

/// `backup create`: one backup of a group, now.
fn create(local: &Local, args: CreateArgs, global: &Global) -> anyhow::Result<()> {
    let group = local
        .config
        .group(&args.group)
        .map_err(anyhow::Error::msg)?
        .clone();
    let id = args.id.unwrap_or_else(|| new_backup_id(&group.name));
    let runtime = super::runtime()?;
    let spinner = global.output.interactive().then(|| {
        let s = indicatif::ProgressBar::new_spinner();
        s.set_message(format!("backing up group {} ({id})", group.name));
        s.enable_steady_tick(std::time::Duration::from_millis(100));
        s
    });
    let result = runtime.block_on(async {
        let orchestrator = local.orchestrator()?;
        Ok::<_, anyhow::Error>(orchestrator.backup(&group, &id).await)
    })?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    match result {
        Ok(manifest) => {
            global.output.print(&manifest, || {
                format!(
                    "backup {} of group {} succeeded; freeze window {}\n\n{}",
                    manifest.id,
                    manifest.group,
                    ms(manifest.freeze_window_us),
                    members_table(&manifest)
                )
            });
            Ok(())
        }
        Err(e) => {
            if global.output != Output::Table {
                global.output.print(&e.manifest, String::new);
            }
            bail!("{e}; every member was thawed and partial snapshots were deleted")
        }
    }
}

/// `backup list`: the catalog's backups.
fn list(local: &Local, global: &Global) -> anyhow::Result<()> {
    let manifests = local.catalog()?.list()?;
    global.output.print(&manifests, || {
        let rows: Vec<Vec<String>> = manifests
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.group.clone(),
                    outcome(m).into(),
                    ms(m.freeze_window_us),
                    m.created_at.clone(),
                    m.error
                        .clone()
                        .unwrap_or_default()
                        .chars()
                        .take(80)
                        .collect(),
                ]
            })
            .collect();
        table(
            &["ID", "GROUP", "OUTCOME", "WINDOW", "CREATED", "ERROR"],
            &rows,
        )
    });
    Ok(())
}

/// `backup describe`: a backup, its members (and its timeline).
fn describe(local: &Local, args: DescribeArgs, global: &Global) -> anyhow::Result<()> {
    let m = local.catalog()?.get(&args.id)?;
    global.output.print(&m, || {
        let mut out = format!(
            "backup {}\n  group:         {}\n  created:       {}\n  outcome:       {}\n  snapshotter:   {}\n  freeze window: {}\n",
            m.id,
            m.group,
            m.created_at,
            outcome(&m),
            m.snapshotter,
            ms(m.freeze_window_us)
        );
        if let Some(e) = &m.error {
            out.push_str(&format!("  error:         {e}\n"));
        }
        out.push('\n');
        out.push_str(&members_table(&m));
        if args.timeline {
            out.push('\n');
            out.push_str(&m.timeline.gantt(60));
        }
        out
    });
    Ok(())
}

/// `backup delete`: a backup's snapshots, then its record.
fn delete(local: &Local, args: IdArgs) -> anyhow::Result<()> {
    let catalog = local.catalog()?;
    let m = catalog.get(&args.id)?;
    let group = local.config.groups.get(&m.group);
    let runtime = super::runtime()?;
    let deleted = runtime.block_on(delete_backup(&catalog, &m, group))?;
    println!("deleted backup {} and its {deleted} snapshot(s)", m.id);
    Ok(())
}
