//! `stillpoint quiesce GROUP|MEMBER [--for DURATION]`: freeze, keep renewing
//! and print positions; Ctrl-C or the end of the duration thaws.

use anyhow::bail;
use clap::Args;
use stillpoint_proto::PositionExt;

use super::status::targets;
use super::{Global, Local};
use crate::core::holder::freeze_all;
use crate::core::model::AgentEndpoint;
use crate::local::config::parse_duration;

#[derive(Debug, Args)]
pub struct QuiesceArgs {
    /// A group name, or a member name.
    pub target: String,
    /// Thaw after this long (e.g. 30s, 5m); without it, hold until Ctrl-C
    /// (in Kubernetes mode: a GroupQuiesce of at most 1h).
    #[arg(long = "for", value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// The lease given to the agents (renewed every third of it).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub ttl: std::time::Duration,
}

pub fn run(args: QuiesceArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let members = targets(&local, &args.target)?;
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let tls = local.tls()?;
        let id = crate::core::holder::hold_id(
            "quiesce",
            &crate::local::orchestrator::new_backup_id(&args.target),
            None,
        );
        let agents: Vec<(String, AgentEndpoint)> = members
            .iter()
            .map(|(_, m)| {
                let endpoint = AgentEndpoint {
                    addr: m.agent.clone(),
                    identity: m.identity.clone(),
                };
                (m.name.clone(), endpoint)
            })
            .collect();
        let holders = freeze_all(
            &tls,
            &agents,
            |name| format!("member {name}"),
            &id,
            args.ttl,
        )
        .await
        .map_err(|errors| {
            anyhow::anyhow!(
                "quiesce refused; nothing is left frozen: {}",
                errors.join("; ")
            )
        })?;
        for (name, h) in &holders {
            println!(
                "frozen {name} at {}",
                h.frozen
                    .position
                    .as_ref()
                    .map(PositionExt::display)
                    .unwrap_or_else(|| "-".into())
            );
        }
        match args.duration {
            Some(d) => {
                println!("holding for {d:?} (Ctrl-C thaws now)");
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = tokio::signal::ctrl_c() => println!("interrupted"),
                }
            }
            None => {
                println!("holding until Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let mut lost = Vec::new();
        for (name, h) in holders {
            if let Some(reason) = h.lost() {
                lost.push(format!("{name}: {reason}"));
            }
            match h.thaw(false).await {
                Ok(_) => println!("thawed {name}"),
                Err(e) => eprintln!("thawing {name}: {e} (its lease thaws it)"),
            }
        }
        if !lost.is_empty() {
            bail!("some holds were lost while quiesced: {}", lost.join("; "));
        }
        Ok(())
    })
}
