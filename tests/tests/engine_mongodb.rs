//! The MongoDB engine against a MongoDB wire-protocol peer (mockupdb):
//! the exact commands sent, the lock count, error replies, start-up undo.

use std::time::{Duration, Instant};

use serde_json::json;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;
use stillpoint_proto::position::make;
use stillpoint_tests::harness::fleet::{Agent, Fleet, assert_wait_hit_its_bound};
use stillpoint_tests::harness::mongo::MongoPeer;
use stillpoint_tests::harness::wait_for;

async fn agent(fleet: &Fleet, member: &str, peer: &MongoPeer) -> Agent {
    let spec = fleet
        .spec(member, "mongodb")
        .unwrap()
        .with("STILLPOINT_DSN", &peer.url())
        .with("STILLPOINT_LOCK_TIMEOUT", "2s");
    fleet.start(&spec).await.unwrap()
}

fn fsync_commands(peer: &MongoPeer) -> Vec<serde_json::Value> {
    peer.commands_named(&["fsync", "fsyncUnlock"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_locks_with_a_bounded_acquisition_and_thaw_unlocks_to_zero() {
    let fleet = Fleet::new().unwrap();
    let peer = MongoPeer::start(&["--version", "7.0.14"]).unwrap();
    let mut a = agent(&fleet, "mongo-lock", &peer).await;
    let d = a.describe().await.unwrap();
    assert_eq!(d.engine, pb::Engine::Mongodb as i32);
    assert_eq!(d.server_version, "MongoDB 7.0.14");
    assert_eq!(d.role, pb::Role::Primary as i32);
    let mut hold = a.freeze("b-lock", Duration::from_secs(30)).await.unwrap();
    assert_eq!(hold.frozen.position, Some(make::mongo(1_700_000_000, 1, 1)));
    assert!(
        a.state_dir.join("mongodb.fsynclock").exists(),
        "the lock is on record"
    );
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    assert_eq!(result.artefacts["fsync_unlocks"], "1");
    assert_eq!(
        fsync_commands(&peer),
        vec![
            json!({"fsync": 1, "lock": true, "fsyncLockAcquisitionTimeoutMillis": 2000}),
            json!({"fsyncUnlock": 1}),
        ]
    );
    assert!(!a.state_dir.join("mongodb.fsynclock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_before_7_0_2_get_no_acquisition_timeout() {
    let fleet = Fleet::new().unwrap();
    let peer = MongoPeer::start(&["--version", "6.0.5"]).unwrap();
    let mut a = agent(&fleet, "mongo-six", &peer).await;
    let hold = a.freeze("b-six", Duration::from_secs(30)).await.unwrap();
    drop(hold);
    wait_for("unlock", Duration::from_secs(3), || {
        Ok(fsync_commands(&peer).len() == 2)
    })
    .unwrap();
    assert_eq!(fsync_commands(&peer)[0], json!({"fsync": 1, "lock": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thaw_unlocks_until_the_count_reaches_zero() {
    let fleet = Fleet::new().unwrap();
    // Someone else already holds one lock: the count must still reach 0.
    let peer = MongoPeer::start(&["--initial-locks", "1"]).unwrap();
    let mut a = agent(&fleet, "mongo-count", &peer).await;
    let mut hold = a.freeze("b-count", Duration::from_secs(30)).await.unwrap();
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert_eq!(result.artefacts["fsync_unlocks"], "2");
    let unlocks = fsync_commands(&peer)
        .iter()
        .filter(|c| c.get("fsyncUnlock").is_some())
        .count();
    assert_eq!(unlocks, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_fails_the_freeze_with_the_servers_message() {
    let fleet = Fleet::new().unwrap();
    let peer =
        MongoPeer::start(&["--fail-fsync", "fsync lock not permitted on this node"]).unwrap();
    let mut a = agent(&fleet, "mongo-error", &peer).await;
    let err = a
        .freeze("b-error", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let message = err.message();
    assert!(
        message.contains("fsync lock not permitted on this node"),
        "{message}"
    );
    assert!(
        message.contains("mongo-error (mongodb): freeze failed"),
        "{message}"
    );
    assert!(
        !a.state_dir.join("mongodb.fsynclock").exists(),
        "nothing locked, nothing recorded"
    );
    assert_eq!(
        fsync_commands(&peer).len(),
        1,
        "no unlock for a lock never taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_unlocks_within_ttl() {
    let fleet = Fleet::new().unwrap();
    let peer = MongoPeer::start(&[]).unwrap();
    let mut a = agent(&fleet, "mongo-lease", &peer).await;
    let ttl = Duration::from_secs(1);
    let started = Instant::now();
    let _hold = a.freeze("b-lease", ttl).await.unwrap();
    wait_for(
        "fsyncUnlock after the lease",
        ttl + Duration::from_secs(1),
        || Ok(fsync_commands(&peer).len() == 2),
    )
    .unwrap();
    assert!(started.elapsed() >= ttl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_a_sigkilled_agent_is_undone_at_restart() {
    let fleet = Fleet::new().unwrap();
    let peer = MongoPeer::start(&[]).unwrap();
    let spec = fleet
        .spec("mongo-crash", "mongodb")
        .unwrap()
        .with("STILLPOINT_DSN", &peer.url());
    let mut a = fleet.start(&spec).await.unwrap();
    let _hold = a.freeze("b-crash", Duration::from_secs(60)).await.unwrap();
    a.proc.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fsync_commands(&peer).len(), 1, "a dead agent cannot unlock");
    let record = a.state_dir.join("mongodb.fsynclock");
    assert!(record.exists());
    let b = fleet.start(&spec).await.unwrap();
    wait_for("unlock at start-up", Duration::from_secs(5), || {
        Ok(fsync_commands(&peer).len() == 2)
    })
    .unwrap();
    assert_eq!(fsync_commands(&peer)[1], json!({"fsyncUnlock": 1}));
    b.proc
        .wait_log(
            "undid the fsyncLock left by backup 'b-crash'",
            Duration::from_secs(2),
        )
        .unwrap();
    assert!(!record.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_waits_for_the_primary_optime_within_its_bound() {
    let fleet = Fleet::new().unwrap();
    let primary_peer = MongoPeer::start(&["--role", "primary"]).unwrap();
    let secondary_peer = MongoPeer::start(&["--role", "secondary"]).unwrap();
    primary_peer.set_optime(1_700_000_100, 5, 3);
    secondary_peer.set_optime(1_700_000_090, 1, 3);
    let mut primary = agent(&fleet, "mongo-primary", &primary_peer).await;
    let mut secondary = agent(&fleet, "mongo-secondary", &secondary_peer).await;
    let d = secondary.describe().await.unwrap();
    assert_eq!(d.role, pb::Role::Replica as i32);
    assert_eq!(d.upstream, "db-0.example:27017");

    let target = primary.position().await.unwrap();
    let started = Instant::now();
    let err = secondary
        .wait_for(&target, Duration::from_millis(600))
        .await
        .unwrap_err();
    assert_wait_hit_its_bound(&err, started.elapsed(), Duration::from_millis(600));

    // Replication catches up while the secondary waits.
    let waiting =
        tokio::spawn(async move { secondary.wait_for(&target, Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    secondary_peer.set_optime(1_700_000_100, 7, 3);
    let reached = waiting.await.unwrap().unwrap().reached.unwrap();
    assert!(reached.reached(&make::mongo(1_700_000_100, 5, 3)).unwrap());
}
