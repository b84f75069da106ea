//! The consistent-cut claim, end to end: a causal workload across
//! PostgreSQL, MariaDB and Redis (primary + replica each, on btrfs) runs
//! through 20 consecutive group backups; every backup restores into six
//! servers where "step n+1 present ⇒ step n present" holds for every chain
//! and every replica holds exactly its primary's data; and nothing the
//! workload saw acknowledged is lost.

use std::process::Command;

use stillpoint_controller::catalog::Outcome;
use stillpoint_controller::demo::Cluster;
use stillpoint_tests::harness::agent::{agent_binary, controller_binary};

const BACKUPS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_backups_under_a_causal_workload_are_all_consistent_cuts() {
    // One demo-sized cluster at a time on a 2-core machine.
    let _serial = stillpoint_tests::harness::shared::server_wide_freeze().await;
    let cluster = Cluster::start(&agent_binary().unwrap(), |m| eprintln!("==> {m}"))
        .await
        .unwrap();
    let workload = cluster.workload().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut manifests = Vec::new();
    for n in 0..BACKUPS {
        let before = workload.acked();
        let m = cluster.backup(&format!("cut-{n:02}")).await.unwrap();
        assert_eq!(m.outcome, Outcome::Succeeded);
        assert!(m.freeze_window_us.unwrap() > 0);
        // Replicas were aligned to their primary's frozen position.
        for r in m.members.iter().filter(|r| r.role == "replica") {
            let primary = m
                .members
                .iter()
                .find(|p| Some(&p.name) == r.primary.as_ref())
                .unwrap();
            assert_eq!(r.aligned_to, primary.position, "{}", r.name);
        }
        assert!(before.a.len() <= workload.acked().a.len());
        manifests.push(m);
    }
    let acked = workload.stop().await.unwrap();
    assert!(
        acked.a.len() > BACKUPS,
        "the workload kept writing through the backups"
    );
    let mut last = 0;
    for m in &manifests {
        let verified = cluster.verify(m).await.unwrap();
        assert!(verified.chain_a >= last, "backups only move forward");
        last = verified.chain_a;
    }
    assert!(last > 0, "the backups hold the workload's data");
    cluster.nothing_lost(&acked).await.unwrap();
    for agent in cluster.agents() {
        assert!(!agent.admin_get("/healthz").unwrap().1.contains("frozen by"));
    }
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
