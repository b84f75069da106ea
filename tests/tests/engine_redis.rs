//! The Redis engine against a real primary + replica.

use std::time::{Duration, Instant};

use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;
use stillpoint_tests::harness::fleet::{Agent, Fleet, assert_wait_hit_its_bound, finishes_within};
use stillpoint_tests::harness::redis::RedisServer;
use stillpoint_tests::harness::shared;

async fn conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn agent(fleet: &Fleet, member: &str, server: &RedisServer) -> Agent {
    let spec = fleet
        .spec(member, "redis")
        .unwrap()
        .with("STILLPOINT_DSN", &server.url())
        .with("STILLPOINT_HOLD_CHECK_INTERVAL", "100ms");
    fleet.start(&spec).await.unwrap()
}

/// SET from its own connection; returns when the server answered.
fn set(server: &RedisServer, key: &str) -> tokio::task::JoinHandle<Result<(), String>> {
    let url = server.url();
    let key = key.to_string();
    tokio::spawn(async move {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    })
}

async fn get(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_blocks_writes_keeps_reads_and_loses_nothing() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    let mut c = conn(&r.primary).await;
    redis::cmd("SET")
        .arg("writes:before")
        .arg("1")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let mut a = agent(&fleet, "redis-writes", &r.primary).await;
    let d = a.describe().await.unwrap();
    assert!(
        d.server_version.starts_with("Redis 7"),
        "{}",
        d.server_version
    );
    let mut hold = a.freeze("b-writes", Duration::from_secs(30)).await.unwrap();
    let frozen_at = hold.frozen.position.clone().unwrap();
    assert!(matches!(frozen_at.kind, Some(pb::position::Kind::Redis(_))));

    let mut blocked = set(&r.primary, "writes:during");
    assert!(
        finishes_within(Duration::from_millis(500), &mut blocked)
            .await
            .is_none()
    );
    let read = finishes_within(Duration::from_secs(2), get(&mut c, "writes:before")).await;
    assert_eq!(read, Some(Some("1".into())), "reads go on while paused");

    hold.request_thaw(true).await.unwrap();
    assert!(hold.thawed().await.unwrap().unwrap().error.is_empty());
    finishes_within(Duration::from_secs(3), blocked)
        .await
        .expect("the blocked write completes after the thaw")
        .unwrap()
        .unwrap();
    assert_eq!(get(&mut c, "writes:during").await.as_deref(), Some("v"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_extend_the_pause_and_without_them_it_ends_within_ttl() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    let mut a = agent(&fleet, "redis-lease", &r.primary).await;
    let ttl = Duration::from_millis(800);
    let hold = a.freeze("b-renew", ttl).await.unwrap();
    let mut blocked = set(&r.primary, "lease:renewed");
    // Renewed for 3 x TTL: the pause is extended on the server each time.
    for _ in 0..9 {
        tokio::time::sleep(ttl / 3).await;
        hold.renew().await.unwrap();
    }
    assert!(
        finishes_within(Duration::from_millis(10), &mut blocked)
            .await
            .is_none(),
        "the pause must be extended by renewals"
    );
    // Renewals stop: within TTL + 1 s writes resume.
    let started = Instant::now();
    finishes_within(ttl + Duration::from_secs(1), blocked)
        .await
        .expect("writes resume within TTL + 1 s")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < ttl + Duration::from_secs(1));
    drop(hold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_ends_by_itself_when_the_agent_is_sigkilled() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    let mut a = agent(&fleet, "redis-kill", &r.primary).await;
    let ttl = Duration::from_secs(1);
    let started = Instant::now();
    let _hold = a.freeze("b-kill", ttl).await.unwrap();
    let mut blocked = set(&r.primary, "kill:after");
    assert!(
        finishes_within(Duration::from_millis(200), &mut blocked)
            .await
            .is_none()
    );
    a.proc.kill();
    finishes_within(ttl + Duration::from_secs(1), blocked)
        .await
        .expect("the pause expired by itself")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < ttl + Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_offsets_align_and_the_wait_fails_at_its_bound_when_replication_stops() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    let mut primary = agent(&fleet, "redis-primary", &r.primary).await;
    let mut replica = agent(&fleet, "redis-replica", &r.replica).await;
    assert_eq!(
        primary.describe().await.unwrap().role,
        pb::Role::Primary as i32
    );
    let d = replica.describe().await.unwrap();
    assert_eq!(d.role, pb::Role::Replica as i32);
    assert_eq!(d.upstream, format!("127.0.0.1:{}", r.primary.port));

    let mut c = conn(&r.primary).await;
    for i in 0..100 {
        redis::cmd("SET")
            .arg(format!("pos:{i}"))
            .arg(i)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    // Freeze the primary: the offset captured with the pause is the target.
    let hold = primary
        .freeze("b-align", Duration::from_secs(10))
        .await
        .unwrap();
    let target = hold.frozen.position.clone().unwrap();
    let reached = replica
        .wait_for(&target, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reached.reached.unwrap().reached(&target).unwrap());
    drop(hold);

    // Point the replica at a dead port: its replid and offset stay, and stall.
    let dead = stillpoint_tests::harness::free_port().to_string();
    r.replica.cli(&["replicaof", "127.0.0.1", &dead]).unwrap();
    redis::cmd("SET")
        .arg("pos:late")
        .arg(1)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let target = primary.position().await.unwrap();
    let started = Instant::now();
    let err = replica
        .wait_for(&target, Duration::from_millis(700))
        .await
        .unwrap_err();
    r.replica
        .cli(&["replicaof", "127.0.0.1", &r.primary.port.to_string()])
        .unwrap();
    assert_wait_hit_its_bound(&err, started.elapsed(), Duration::from_millis(700));
    replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
}

/// RDB persistence only: the flush makes a save while writes are paused
/// (BGSAVE is accepted during a WRITE pause) and waits for it, so the RDB
/// holds every write acknowledged before the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rdb_only_the_flush_saves_while_paused() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    // RDB on for this test only.
    r.primary.cli(&["config", "set", "save", "3600 1"]).unwrap();
    let mut a = agent(&fleet, "redis-rdb", &r.primary).await;
    let prepared = a.prepare("b-rdb").await.unwrap();
    assert!(prepared.detail.contains("AOF off"), "{}", prepared.detail);
    let mut c = conn(&r.primary).await;
    let saves = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(&mut c)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("rdb_saves:"))
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        }
    };
    redis::cmd("SET")
        .arg("rdb:acked")
        .arg(1)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let before = saves(&mut c).await;
    let mut hold = a.freeze("b-rdb", Duration::from_secs(10)).await.unwrap();
    let flushed = hold.flush(true).await.unwrap();
    let during = saves(&mut c).await;
    let pending_write = {
        let mut c = c.clone();
        tokio::spawn(async move {
            redis::cmd("SET")
                .arg("rdb:late")
                .arg(1)
                .query_async::<()>(&mut c)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let still_paused = !pending_write.is_finished();
    hold.request_thaw(true).await.unwrap();
    hold.thawed().await.unwrap();
    pending_write.await.unwrap().unwrap();
    r.primary.cli(&["config", "set", "save", ""]).unwrap();
    assert!(flushed.error.is_empty(), "{}", flushed.error);
    assert!(
        flushed.detail.contains("RDB saved while paused"),
        "{}",
        flushed.detail
    );
    assert!(flushed.engine_us > 0);
    assert_eq!(during, before + 1, "one save, made during the pause");
    assert!(still_paused, "writes stay paused through the flush");
}

/// AOF on: the flush waits until the AOF buffer is written out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_aof_the_flush_writes_the_aof_buffer() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let r = shared::redis();
    r.primary
        .cli(&["config", "set", "appendonly", "yes"])
        .unwrap();
    let mut a = agent(&fleet, "redis-aof", &r.primary).await;
    let mut hold = a.freeze("b-aof", Duration::from_secs(10)).await.unwrap();
    let flushed = hold.flush(true).await;
    hold.request_thaw(true).await.unwrap();
    hold.thawed().await.unwrap();
    r.primary
        .cli(&["config", "set", "appendonly", "no"])
        .unwrap();
    let flushed = flushed.unwrap();
    assert!(
        flushed.detail.contains("AOF buffer written"),
        "{}",
        flushed.detail
    );
    assert!(flushed.detail.contains("synced"), "{}", flushed.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let port = stillpoint_tests::harness::free_port();
    let mut a = fleet
        .start(
            &fleet
                .spec("redis-nowhere", "redis")
                .unwrap()
                .with("STILLPOINT_DSN", &format!("redis://127.0.0.1:{port}/"))
                .with("STILLPOINT_CONNECT_TIMEOUT", "1s"),
        )
        .await
        .unwrap();
    let err = a.freeze("b-x", Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(
        err.message()
            .contains("redis-nowhere (redis): freeze failed"),
        "{}",
        err.message()
    );
    assert!(a.proc.admin_get("/healthz").unwrap().0.contains("200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_mid_hold_fails_it_within_the_lease() {
    use stillpoint_lab::servers::Pair;
    let fleet = Fleet::new().unwrap();
    // A pair of its own: its primary is stopped.
    let pair = tokio::task::block_in_place(Pair::<RedisServer>::start).unwrap();
    let mut a = agent(&fleet, "redis-stop", &pair.primary).await;
    let ttl = Duration::from_secs(1);
    let mut hold = a.freeze("b-stop", ttl).await.unwrap();
    let pid = pair.primary.pid().unwrap();
    let stopped = Instant::now();
    stillpoint_tests::harness::signal(pid, "STOP");
    // The renewal cannot be confirmed: the hold fails by the lease's end,
    // not whenever the server answers again.
    hold.renew().await.unwrap();
    let failed = Agent::failure(&mut hold, Duration::from_secs(5)).await;
    let after = stopped.elapsed();
    // Its thaw waits on the stopped server: the hold is past its lease,
    // and the agent says so (what StillpointMemberFrozenPastLease reads).
    let overdue = a
        .proc
        .metric("stillpoint_agent_hold_overdue_seconds")
        .unwrap();
    let held = a.proc.metric("stillpoint_agent_frozen_seconds ").unwrap();
    stillpoint_tests::harness::signal(pid, "CONT");
    let failed = failed.expect("the hold failed");
    assert!(overdue > 0.0, "overdue {overdue} s while the thaw waits");
    assert!(
        held >= ttl.as_secs_f64(),
        "held {held} s, past a {ttl:?} lease"
    );
    assert!(
        after <= ttl + Duration::from_millis(500),
        "failed {after:?} after the server stopped; the lease is {ttl:?}"
    );
    assert!(
        failed.reason.contains("did not confirm") || failed.reason.contains("did not answer"),
        "{}",
        failed.reason
    );
    // Answering again, the server is thawed and takes writes.
    let mut blocked = set(&pair.primary, "stop:after");
    finishes_within(Duration::from_secs(3), &mut blocked)
        .await
        .expect("writes go through once the server answers")
        .unwrap()
        .unwrap();
    // Thawed, nothing is held or overdue.
    wait_until(Duration::from_secs(5), || {
        a.proc.metric("stillpoint_agent_frozen ").unwrap() == 0.0
    })
    .await;
    for gauge in [
        "stillpoint_agent_hold_overdue_seconds",
        "stillpoint_agent_frozen_seconds ",
    ] {
        assert_eq!(a.proc.metric(gauge).unwrap(), 0.0, "{gauge}");
    }
}

/// Waits up to `bound` for `check`.
async fn wait_until(bound: Duration, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < bound, "not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
