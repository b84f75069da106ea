//! `stillpoint plan ID`: the recovery plan of a backup.

use clap::Args;

use super::output::table;
use super::{Global, Local};
use crate::local::catalog::{Consistency, Manifest};
use crate::local::restore::{PlanStep, plan};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The backup to plan the restore of.
    pub id: String,
}

/// The plan as the table `plan` prints.
pub fn plan_table(steps: &[PlanStep]) -> String {
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|s| {
            vec![
                format!("{} {}", s.stage, s.class),
                s.member.clone(),
                s.engine.clone(),
                s.role.clone(),
                s.stage_from.to_string(),
                Consistency::name_or_dash(s.consistency).to_string(),
                match (&s.must_reach, &s.position) {
                    (Some(p), _) => format!("must reach {p}"),
                    (None, Some(p)) => format!("frozen at {p}"),
                    (None, None) => "-".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "STAGE",
            "MEMBER",
            "ENGINE",
            "ROLE",
            "STAGE FROM",
            "CONSISTENCY",
            "POSITION",
        ],
        &rows,
    )
}

pub fn run(args: PlanArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let manifest = local.catalog()?.get(&args.id)?;
    print(&manifest, "backup", manifest.outcome.as_str(), global);
    Ok(())
}

/// Prints the recovery plan of `manifest` (a `what`, whose state is `state`).
pub fn print(manifest: &Manifest, what: &str, state: &str, global: &Global) {
    let steps = plan(manifest);
    global.output.print(&steps, || {
        let mut out = format!(
            "recovery plan of {what} {} (group {}, {}, {state})\n\
             each stage starts only once every member of the one before is healthy;\n\
             within a stage, primaries start before their replicas\n\n",
            manifest.id, manifest.group, manifest.snapshotter,
        );
        out.push_str(&plan_table(&steps));
        out
    });
}
