//! The consistent-cut claim, end to end: a causal workload across
//! PostgreSQL, MariaDB and Redis (primary + replica each) runs through
//! consecutive group backups; every backup restores into six servers where
//! "step n+1 present ⇒ step n present" holds for every chain, every replica
//! holds exactly its primary's data, and every chain acknowledged before the
//! backup started is whole in it; and nothing the workload saw acknowledged
//! is lost.
//!
//! Four setups: Redis on AOF with btrfs subvolume snapshots (the demo);
//! Redis with RDB persistence only; block-level snapshots of members
//! that acknowledge writes before they are durable (each data directory on
//! its own loop device, cut as a reflink copy of the device's image, which
//! holds nothing of the page cache); and the worst order (PostgreSQL's
//! writes flowing through a cut that takes primaries first, replicas
//! later), where a replica holds only what its primary holds.

use std::process::Command;

use stillpoint_controller::local::catalog::Outcome;
use stillpoint_lab::demo::{Cluster, Options};
use stillpoint_lab::servers::redis::Persistence;
use stillpoint_tests::harness::agent::{agent_binary, controller_binary};

/// Runs `backups` backups under the causal workload and verifies each.
async fn consistent_cuts(options: Options, backups: usize) {
    // One demo-sized cluster at a time on a 2-core machine.
    let _serial = stillpoint_tests::harness::shared::server_wide_freeze().await;
    let cluster = Cluster::start_with(&agent_binary().unwrap(), options, |m| eprintln!("==> {m}"))
        .await
        .unwrap();
    let workload = cluster.workload().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut manifests = Vec::new();
    for n in 0..backups {
        let before = workload.acked();
        let m = cluster.backup(&format!("cut-{n:02}")).await.unwrap();
        assert_eq!(m.outcome, Outcome::Succeeded);
        assert!(m.freeze_window_us.unwrap() > 0);
        for r in &m.members {
            // Replicas were aligned to their primary's frozen position.
            if r.role == "replica" {
                let primary = m
                    .members
                    .iter()
                    .find(|p| Some(&p.name) == r.primary.as_ref())
                    .unwrap();
                assert_eq!(r.aligned_to, primary.position, "{}", r.name);
            }
            // Every member flushed before the cut, and it is on the timeline.
            assert!(r.flush.is_some(), "{} has no flush", r.name);
            let phases = &m.timeline.members[&r.name];
            assert!(phases["flushed"] <= phases["cut"], "{}: {phases:?}", r.name);
        }
        manifests.push((m, before));
        // Let the workload run at full speed into the next backup's prepare.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let acked = workload.stop().await.unwrap();
    assert!(
        acked.a.len() > backups,
        "the workload kept writing through the backups"
    );
    let mut last = 0;
    for (m, before) in &manifests {
        let verified = cluster.verify(m, before).await.unwrap();
        assert!(verified.chain_a >= last, "backups only move forward");
        assert!(
            verified.chain_a >= before.a.len(),
            "{}: holds {} chains, {} were acknowledged before it started",
            m.id,
            verified.chain_a,
            before.a.len()
        );
        last = verified.chain_a;
    }
    assert!(last > 0, "the backups hold the workload's data");
    cluster.nothing_lost(&acked).await.unwrap();
    for agent in cluster.agents() {
        assert!(!agent.admin_get("/healthz").unwrap().1.contains("frozen by"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_backups_under_a_causal_workload_are_all_consistent_cuts() {
    consistent_cuts(Options::default(), 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_rdb_persistence_only_is_saved_while_paused() {
    let options = Options {
        redis: Persistence::Rdb,
        ..Options::default()
    };
    consistent_cuts(options, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_level_snapshots_hold_every_write_acknowledged_before_the_freeze() {
    let options = Options {
        redis: Persistence::Aof,
        relaxed: true,
        block: true,
        ..Options::default()
    };
    consistent_cuts(options, 10).await;
}

/// The worst order, locally: PostgreSQL in `backup` mode (writes flow
/// through the cut) and a cut that takes each primary's volume at once and
/// every other volume 300 ms later. No replica restores ahead of its
/// primary (by rows and by where its WAL ends), and every cut is causal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_replica_is_ahead_of_its_primary_when_the_storage_cuts_primaries_first() {
    let options = Options {
        worst_order: Some(std::time::Duration::from_millis(300)),
        ..Options::default()
    };
    consistent_cuts(options, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_command_runs_and_cleans_up() {
    let _serial = stillpoint_tests::harness::shared::server_wide_freeze().await;
    let before = std::fs::read_to_string("/proc/mounts").unwrap();
    let out = tokio::task::spawn_blocking(|| {
        Command::new(controller_binary().unwrap())
            .args(["demo", "--backups", "1"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("consistent cut"), "{stdout}");
    assert!(stdout.contains("freeze window"), "{stdout}");
    assert!(stdout.contains("nothing lost"), "{stdout}");
    let after = std::fs::read_to_string("/proc/mounts").unwrap();
    assert_eq!(
        before.lines().filter(|l| l.contains("stillpoint")).count(),
        after.lines().filter(|l| l.contains("stillpoint")).count(),
        "the demo's btrfs mount is gone"
    );
}
