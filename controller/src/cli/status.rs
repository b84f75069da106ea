//! `stillpoint status` and `stillpoint thaw`.

use crate::core::agents::{ControllerTls, DEFAULT_RPC_TIMEOUT, answer};
use anyhow::bail;
use clap::Args;
use futures_util::future::join_all;
use serde::Serialize;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;

use super::output::table;
use super::{Global, Local};
use crate::local::config::MemberFile;
use crate::local::orchestrator::engine_name;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A group (default: every group).
    pub group: Option<String>,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A group name, or a member name.
    pub target: String,
}

#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub group: String,
    pub member: String,
    pub reachable: bool,
    pub engine: String,
    pub role: String,
    pub position: String,
    /// Replica only: how far behind its primary (bytes for PostgreSQL,
    /// offset for Redis; `caught up` / `behind` otherwise).
    pub lag: String,
    pub held_by: String,
    pub error: String,
}

/// The members a group-or-member argument names, with their group.
pub fn targets<'c>(
    local: &'c Local,
    target: &str,
) -> anyhow::Result<Vec<(String, &'c MemberFile)>> {
    if let Some(group) = local.config.groups.get(target) {
        return Ok(group
            .members
            .iter()
            .map(|m| (group.name.clone(), m))
            .collect());
    }
    let found: Vec<_> = local
        .config
        .groups
        .values()
        .flat_map(|g| g.members.iter().map(move |m| (g.name.clone(), m)))
        .filter(|(_, m)| m.name == target)
        .collect();
    if found.is_empty() {
        bail!(
            "'{target}' is neither a group nor a member in {} (groups: {})",
            local.config.path.display(),
            local
                .config
                .groups
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(found)
}

fn lag(replica: &pb::Position, primary: &pb::Position) -> String {
    use pb::position::Kind;
    match (&replica.kind, &primary.kind) {
        (Some(Kind::Pg(r)), Some(Kind::Pg(p))) => format!("{} bytes", p.lsn.saturating_sub(r.lsn)),
        (Some(Kind::Redis(r)), Some(Kind::Redis(p))) if r.replid == p.replid => {
            format!("{} bytes", p.offset.saturating_sub(r.offset))
        }
        _ => match replica.reached(primary) {
            Ok(true) => "caught up".into(),
            Ok(false) => "behind".into(),
            Err(e) => e.0,
        },
    }
}

pub fn run(args: StatusArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let members = members_of(&local, args.group.as_deref())?;
    let runtime = super::runtime()?;
    let statuses = runtime.block_on(async {
        let tls = local.tls()?;
        let probed = join_all(members.iter().map(|(group, m)| probe(&tls, group, m))).await;
        Ok::<_, anyhow::Error>(with_lags(probed))
    })?;
    global.output.print(&statuses, || status_table(&statuses));
    if statuses.iter().any(|s| !s.reachable) {
        bail!("some agents are not reachable");
    }
    Ok(())
}

/// The members of `group` (every group's when none), each with its group.
fn members_of<'l>(
    local: &'l Local,
    group: Option<&str>,
) -> anyhow::Result<Vec<(String, &'l MemberFile)>> {
    Ok(match group {
        Some(g) => {
            let group = local.config.group(g).map_err(anyhow::Error::msg)?;
            group
                .members
                .iter()
                .map(|m| (group.name.clone(), m))
                .collect()
        }
        None => local
            .config
            .groups
            .values()
            .flat_map(|g| g.members.iter().map(move |m| (g.name.clone(), m)))
            .collect(),
    })
}

/// What member `m`'s agent says: reachable, its engine, who holds it, its
/// role and position (and the position itself, for the lag).
async fn probe(
    tls: &ControllerTls,
    group: &str,
    m: &MemberFile,
) -> (MemberStatus, MemberFile, Option<pb::Position>) {
    let mut s = MemberStatus {
        group: group.to_string(),
        member: m.name.clone(),
        reachable: false,
        engine: "-".into(),
        role: "-".into(),
        position: "-".into(),
        lag: "-".into(),
        held_by: String::new(),
        error: String::new(),
    };
    let mut position = None;
    match tls.connect(&m.agent, &m.identity).await {
        Err(e) => s.error = e.to_string(),
        Ok(mut client) => {
            s.reachable = true;
            let describe = client.describe(pb::DescribeRequest::default());
            match answer(DEFAULT_RPC_TIMEOUT, "describe", describe).await {
                Ok(d) => {
                    s.engine = engine_name(d.engine).into();
                    s.held_by = d.holder;
                }
                Err(e) => s.error = e.message().to_string(),
            }
            let position_of = client.position(pb::PositionRequest {});
            match answer(DEFAULT_RPC_TIMEOUT, "position", position_of).await {
                Ok(p) => {
                    s.role = match pb::Role::try_from(p.role).unwrap_or_default() {
                        pb::Role::Replica => "replica".into(),
                        pb::Role::Primary => "primary".into(),
                        _ => "standalone".into(),
                    };
                    s.position = p
                        .position
                        .as_ref()
                        .map(PositionExt::display)
                        .unwrap_or_default();
                    position = p.position;
                }
                Err(e) if s.error.is_empty() => s.error = e.message().to_string(),
                Err(_) => {}
            }
        }
    }
    (s, m.clone(), position)
}

/// The statuses, each replica's with its lag behind its primary.
fn with_lags(probed: Vec<(MemberStatus, MemberFile, Option<pb::Position>)>) -> Vec<MemberStatus> {
    let positions: std::collections::BTreeMap<String, pb::Position> = probed
        .iter()
        .filter_map(|(s, _, p)| Some((s.member.clone(), p.clone()?)))
        .collect();
    probed
        .into_iter()
        .map(|(mut s, m, p)| {
            if let (Some(primary), Some(p)) = (m.primary.as_ref().and_then(|n| positions.get(n)), p)
            {
                s.lag = lag(&p, primary);
            }
            s
        })
        .collect()
}

fn status_table(statuses: &[MemberStatus]) -> String {
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.group.clone(),
                s.member.clone(),
                if s.reachable {
                    "yes".into()
                } else {
                    "NO".into()
                },
                s.engine.clone(),
                s.role.clone(),
                s.position.clone(),
                s.lag.clone(),
                s.held_by.clone(),
                s.error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "GROUP",
            "MEMBER",
            "REACHABLE",
            "ENGINE",
            "ROLE",
            "POSITION",
            "LAG",
            "HELD BY",
            "ERROR",
        ],
        &rows,
    )
}

pub fn thaw(args: TargetArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let members = targets(&local, &args.target)?;
    let runtime = super::runtime()?;
    let results = runtime.block_on(async {
        let tls = local.tls()?;
        Ok::<_, anyhow::Error>(
            join_all(members.iter().map(|(_, m)| {
                let tls = tls.clone();
                async move {
                    let mut client = tls
                        .connect(&m.agent, &m.identity)
                        .await
                        .map_err(|e| e.to_string())?;
                    let describe = client.describe(pb::DescribeRequest::default());
                    let holder = answer(DEFAULT_RPC_TIMEOUT, "describe", describe)
                        .await
                        .map_err(|e| e.message().to_string())?
                        .holder;
                    if holder.is_empty() {
                        return Ok(format!("{}: not frozen", m.name));
                    }
                    let thaw = client.thaw(pb::ThawRequest {
                        backup_id: holder.clone(),
                    });
                    let r = answer(DEFAULT_RPC_TIMEOUT, "thaw", thaw)
                        .await
                        .map_err(|e| e.message().to_string())?;
                    Ok::<_, String>(format!("{}: {} (hold of '{holder}')", m.name, r.message))
                }
            }))
            .await,
        )
    })?;
    let mut failed = false;
    for r in results {
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    if failed {
        bail!("some members could not be thawed");
    }
    Ok(())
}
