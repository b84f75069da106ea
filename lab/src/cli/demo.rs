//! `stillpoint-lab demo` (`stillpoint demo`): the whole product on this machine in one command.

use anyhow::anyhow;
use clap::Args;

use crate::demo::Cluster;
use crate::servers::agent::agent_binary;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many group backups to take while the workload runs.
    #[arg(long, default_value_t = 3)]
    pub backups: usize,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !crate::servers::is_root() {
        anyhow::bail!(
            "the demo loop-mounts a btrfs image and runs database servers as their service users: run it as root"
        );
    }
    let agent = agent_binary()?;
    stillpoint_controller::cli::runtime()?.block_on(async {
        tokio::select! {
            result = demo(&agent, args.backups.max(1)) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted: everything was stopped and removed")),
        }
    })
}

async fn demo(agent: &std::path::Path, backups: usize) -> anyhow::Result<()> {
    let say = |m: &str| println!("==> {m}");
    let cluster = Cluster::start(agent, say).await?;
    say("writing causal chains: PostgreSQL → MariaDB → Redis, and Redis → MariaDB → PostgreSQL");
    let workload = cluster.workload().await?;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let mut manifests = Vec::new();
    for n in 1..=backups {
        let id = format!("demo-{n}");
        let before = workload.acked();
        let m = cluster.backup(&id).await?;
        println!(
            "    backup {id}: six members frozen, aligned, cut (btrfs) and thawed; freeze window {:.1} ms",
            m.freeze_window_us.unwrap_or(0) as f64 / 1000.0
        );
        manifests.push((m, before));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let acked = workload.stop().await?;
    println!(
        "    the workload saw {} + {} causal chains acknowledged",
        acked.a.len(),
        acked.b.len()
    );
    say("restoring every backup, starting all six restored servers, checking the cut");
    for (m, before) in &manifests {
        let v = cluster.verify(m, before).await?;
        println!(
            "    {}: consistent cut ({} + {} chains); every replica holds exactly its primary's data",
            v.backup, v.chain_a, v.chain_b
        );
    }
    cluster.nothing_lost(&acked).await?;
    println!(
        "    nothing lost: every acknowledged write is in the live databases, and every chain \
         acknowledged before a backup started is in that backup"
    );
    let (last, _) = manifests.last().expect("at least one backup");
    println!(
        "\n{}",
        stillpoint_controller::cli::backup::members_table(last)
    );
    println!("timeline of {}:\n{}", last.id, last.timeline.gantt(64));
    say("cleaning up: agents, servers, snapshots and the btrfs image");
    drop(cluster);
    println!("done");
    Ok(())
}
