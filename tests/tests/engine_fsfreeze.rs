//! The fsfreeze engine and layer on a loop-mounted ext4 image.
//!
//! A writer blocked on a frozen filesystem cannot be killed, so every test
//! keeps the mount in a guard that thaws on drop, even when it panics.

use std::process::Child;
use std::time::{Duration, Instant};

use stillpoint_proto::pb;
use stillpoint_tests::harness::fleet::{Agent, Fleet};
use stillpoint_tests::harness::loopfs::LoopMount;
use stillpoint_tests::harness::wait_for;

fn finished(writer: &mut Child) -> bool {
    writer.try_wait().unwrap().is_some()
}

fn finishes_within(writer: &mut Child, bound: Duration) -> bool {
    wait_for("writer", bound, || Ok(finished(writer))).is_ok()
}

async fn agent(fleet: &Fleet, member: &str, engine: &str, mount: &LoopMount) -> Agent {
    let spec = fleet
        .spec(member, engine)
        .unwrap()
        .with("STILLPOINT_FSFREEZE_MOUNTS", mount.path().to_str().unwrap());
    fleet.start(&spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_mount_blocks_writers_until_the_thaw() {
    let fleet = Fleet::new().unwrap();
    let mount = LoopMount::ext4(32).unwrap();
    let mut a = agent(&fleet, "fs-writes", "fsfreeze", &mount).await;
    assert_eq!(
        a.describe().await.unwrap().role,
        pb::Role::Standalone as i32
    );
    let mut hold = a.freeze("b-fs", Duration::from_secs(30)).await.unwrap();
    let mut writer = mount.writer("during");
    assert!(
        !finishes_within(&mut writer, Duration::from_millis(500)),
        "a write went through FIFREEZE"
    );
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    assert!(finishes_within(&mut writer, Duration::from_secs(5)));
    assert!(writer.wait().unwrap().success());
    assert_eq!(
        std::fs::metadata(mount.path().join("during"))
            .unwrap()
            .len(),
        16384
    );
    assert!(
        !a.state_dir.join("fsfreeze.frozen").exists(),
        "no frozen mount left on record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_thaws_the_mount_within_ttl() {
    let fleet = Fleet::new().unwrap();
    let mount = LoopMount::ext4(32).unwrap();
    let mut a = agent(&fleet, "fs-lease", "fsfreeze", &mount).await;
    let ttl = Duration::from_secs(1);
    let started = Instant::now();
    let _hold = a.freeze("b-lease", ttl).await.unwrap();
    let mut writer = mount.writer("lease");
    assert!(
        finishes_within(&mut writer, ttl + Duration::from_secs(1)),
        "writer still blocked"
    );
    assert!(started.elapsed() >= ttl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_thaws_when_the_agent_is_sigkilled_and_a_restart_clears_the_record() {
    let fleet = Fleet::new().unwrap();
    let mount = LoopMount::ext4(32).unwrap();
    let spec = fleet
        .spec("fs-kill", "fsfreeze")
        .unwrap()
        .with("STILLPOINT_FSFREEZE_MOUNTS", mount.path().to_str().unwrap());
    let mut a = fleet.start(&spec).await.unwrap();
    let _hold = a.freeze("b-kill", Duration::from_secs(60)).await.unwrap();
    let record = a.state_dir.join("fsfreeze.frozen");
    assert!(record.exists());
    let mut writer = mount.writer("kill");
    assert!(!finishes_within(&mut writer, Duration::from_millis(300)));
    a.proc.kill();
    assert!(
        finishes_within(&mut writer, Duration::from_secs(3)),
        "the watchdog did not thaw"
    );
    // The dead agent could not clear its record; the next start does.
    let b = fleet.start(&spec).await.unwrap();
    assert!(!record.exists(), "{}", b.proc.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_thaws_what_the_state_file_says_was_frozen() {
    let fleet = Fleet::new().unwrap();
    let mount = LoopMount::ext4(32).unwrap();
    let spec = fleet
        .spec("fs-recover", "fsfreeze")
        .unwrap()
        .with("STILLPOINT_FSFREEZE_MOUNTS", mount.path().to_str().unwrap());
    // A crash of everything (agent and watchdog) while frozen:
    std::fs::write(
        fleet.state_dir("fs-recover").join("fsfreeze.frozen"),
        format!("{}\n", mount.path().display()),
    )
    .unwrap();
    let frozen = std::process::Command::new("fsfreeze")
        .arg("-f")
        .arg(mount.path())
        .status()
        .unwrap();
    assert!(frozen.success());
    let mut writer = mount.writer("recover");
    assert!(!finishes_within(&mut writer, Duration::from_millis(300)));
    let a = fleet.start(&spec).await.unwrap();
    assert!(
        finishes_within(&mut writer, Duration::from_secs(3)),
        "start-up did not thaw"
    );
    a.proc
        .wait_log("recovered at start-up: thawed", Duration::from_secs(2))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_layer_over_another_engine() {
    let fleet = Fleet::new().unwrap();
    let mount = LoopMount::ext4(32).unwrap();
    let mut a = agent(&fleet, "fs-layer", "noop", &mount).await;
    let d = a.describe().await.unwrap();
    assert_eq!(d.engine, pb::Engine::Noop as i32);
    assert!(
        d.capabilities.unwrap().blocks_writes,
        "the layer blocks writes"
    );
    let mut hold = a.freeze("b-layer", Duration::from_secs(30)).await.unwrap();
    assert!(matches!(
        hold.frozen.position.as_ref().unwrap().kind,
        Some(pb::position::Kind::Counter(_))
    ));
    let mut writer = mount.writer("layer");
    assert!(!finishes_within(&mut writer, Duration::from_millis(300)));
    hold.request_thaw(true).await.unwrap();
    hold.thawed().await.unwrap();
    assert!(finishes_within(&mut writer, Duration::from_secs(3)));
}
