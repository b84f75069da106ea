//! The MySQL/MariaDB engine against a real MariaDB primary + GTID replica,
//! with a least-privilege agent user.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;
use stillpoint_tests::harness::fleet::{Agent, Fleet, assert_wait_hit_its_bound, finishes_within};
use stillpoint_tests::harness::mariadb::MariaServer;
use stillpoint_tests::harness::shared;

const AGENT_USER: &str = "stillpoint";
const AGENT_PASSWORD: &str = "agent-secret-9f2c";

/// The agent's user, with only what the engine needs (created once, replicated).
fn agent_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        shared::mariadb()
            .primary
            .sql(&format!(
                "CREATE USER IF NOT EXISTS '{AGENT_USER}'@'127.0.0.1' IDENTIFIED BY '{AGENT_PASSWORD}'; \
                 GRANT RELOAD, BINLOG MONITOR, SLAVE MONITOR ON *.* TO '{AGENT_USER}'@'127.0.0.1';"
            ))
            .unwrap();
    });
}

fn agent_url(server: &MariaServer) -> String {
    format!(
        "mysql://{AGENT_USER}:{AGENT_PASSWORD}@127.0.0.1:{}/",
        server.port
    )
}

async fn root(server: &MariaServer) -> mysql_async::Conn {
    mysql_async::Conn::from_url(server.url("mysql"))
        .await
        .unwrap()
}

/// A fresh database `name` with table `t(id)` on the shared primary.
async fn database(name: &str) -> mysql_async::Conn {
    agent_user();
    let mut c = root(&shared::mariadb().primary).await;
    c.query_drop(format!(
        "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}; \
         CREATE TABLE {name}.t (id INT PRIMARY KEY) ENGINE=InnoDB"
    ))
    .await
    .unwrap();
    c
}

async fn agent(fleet: &Fleet, member: &str, server: &MariaServer) -> Agent {
    agent_user();
    let spec = fleet
        .spec(member, "mariadb")
        .unwrap()
        .with("STILLPOINT_DSN", &agent_url(server))
        .with("STILLPOINT_LOCK_TIMEOUT", "2s");
    fleet.start(&spec).await.unwrap()
}

fn insert(server: &MariaServer, db: &str, id: i32) -> tokio::task::JoinHandle<Result<(), String>> {
    let url = server.url(db);
    tokio::spawn(async move {
        let mut c = mysql_async::Conn::from_url(url)
            .await
            .map_err(|e| e.to_string())?;
        c.exec_drop("INSERT INTO t VALUES (?)", (id,))
            .await
            .map_err(|e| e.to_string())?;
        c.disconnect().await.map_err(|e| e.to_string())
    })
}

async fn count(c: &mut mysql_async::Conn, db: &str) -> i64 {
    c.query_first(format!("SELECT COUNT(*) FROM {db}.t"))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_commit_blocks_writes_keeps_reads_and_loses_nothing() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let mut c = database("m_writes").await;
    c.query_drop("INSERT INTO m_writes.t VALUES (1)")
        .await
        .unwrap();
    let mut a = agent(&fleet, "maria-writes", &maria.primary).await;
    let d = a.describe().await.unwrap();
    assert_eq!(
        d.engine,
        pb::Engine::Mariadb as i32,
        "MariaDB is named as such"
    );
    assert!(
        d.server_version.starts_with("MariaDB 10."),
        "{}",
        d.server_version
    );
    a.prepare("b-m").await.unwrap();
    let mut hold = a.freeze("b-m", Duration::from_secs(30)).await.unwrap();
    assert!(matches!(
        hold.frozen.position.as_ref().unwrap().kind,
        Some(pb::position::Kind::Gtid(_))
    ));

    let mut blocked = insert(&maria.primary, "m_writes", 2);
    assert!(
        finishes_within(Duration::from_millis(500), &mut blocked)
            .await
            .is_none()
    );
    let read = finishes_within(Duration::from_secs(2), count(&mut c, "m_writes")).await;
    assert_eq!(read, Some(1), "reads go on while frozen");

    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    finishes_within(Duration::from_secs(5), blocked)
        .await
        .expect("the blocked write completes after the thaw")
        .unwrap()
        .unwrap();
    assert_eq!(count(&mut c, "m_writes").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_releases_the_lock_within_ttl() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let _c = database("m_lease").await;
    let mut a = agent(&fleet, "maria-lease", &maria.primary).await;
    let ttl = Duration::from_secs(1);
    let _hold = a.freeze("b-lease", ttl).await.unwrap();
    finishes_within(
        ttl + Duration::from_secs(1),
        insert(&maria.primary, "m_lease", 1),
    )
    .await
    .expect("writes resume within TTL + 1 s")
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_leaves_nothing_locked() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let _c = database("m_kill").await;
    let mut a = agent(&fleet, "maria-kill", &maria.primary).await;
    let _hold = a.freeze("b-kill", Duration::from_secs(60)).await.unwrap();
    let mut blocked = insert(&maria.primary, "m_kill", 1);
    assert!(
        finishes_within(Duration::from_millis(300), &mut blocked)
            .await
            .is_none()
    );
    a.proc.kill();
    finishes_within(Duration::from_secs(3), blocked)
        .await
        .expect("the server released the dead agent's lock")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_cannot_keep_the_lock_past_its_lease_and_renewals_keep_it() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let _c = database("m_stop").await;
    let mut a = agent(&fleet, "maria-stop", &maria.primary).await;
    let ttl = Duration::from_secs(1);
    let hold = a.freeze("b-stop", ttl).await.unwrap();
    // Renewed past the server's own bound (the lease + 1 s, whole seconds).
    let mut blocked = insert(&maria.primary, "m_stop", 1);
    for _ in 0..10 {
        tokio::time::sleep(ttl / 3).await;
        hold.renew().await.unwrap();
    }
    assert!(
        finishes_within(Duration::from_millis(10), &mut blocked)
            .await
            .is_none(),
        "a renewed freeze let a write through"
    );
    hold.request_thaw(false).await.unwrap();
    finishes_within(Duration::from_secs(3), blocked)
        .await
        .expect("the write goes through after the thaw")
        .unwrap()
        .unwrap();
    drop(hold);
    // The agent stopped mid-hold, before any renewal: the server ends the
    // held session itself.
    let _hold = a.freeze("b-stopped", ttl).await.unwrap();
    let stopped = Instant::now();
    stillpoint_tests::harness::signal(a.proc.pid(), "STOP");
    let blocked = insert(&maria.primary, "m_stop", 2);
    let resumed = finishes_within(Duration::from_secs(10), blocked).await;
    let after = stopped.elapsed();
    stillpoint_tests::harness::signal(a.proc.pid(), "CONT");
    resumed
        .expect("the server released the stopped agent's lock")
        .unwrap()
        .unwrap();
    assert!(
        after <= ttl + Duration::from_secs(3),
        "released {after:?} after the stop; the bound is the lease ({ttl:?}) + 1 s, in whole seconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_held_session_fails_the_hold_promptly() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let _c = database("m_loss").await;
    let mut a = agent(&fleet, "maria-loss", &maria.primary).await;
    let mut hold = a.freeze("b-loss", Duration::from_secs(60)).await.unwrap();
    a.proc
        .wait_log("lock held by this session", Duration::from_secs(2))
        .unwrap();
    let logs = a.proc.logs();
    let id: u32 = logs
        .split("connection_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the agent logs its held session's id");
    let mut admin = root(&maria.primary).await;
    admin.query_drop(format!("KILL {id}")).await.unwrap();
    let started = Instant::now();
    let failed = Agent::failure(&mut hold, Duration::from_secs(3))
        .await
        .expect("the hold reports its failure");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        failed.reason.contains(&format!("connection id {id}")),
        "{}",
        failed.reason
    );
    assert!(failed.reason.contains("maria-loss"), "{}", failed.reason);
    // And the database is writable again.
    finishes_within(Duration::from_secs(2), insert(&maria.primary, "m_loss", 7))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The GTID set and binary log coordinates a server reports now.
async fn reported(server: &MariaServer, gtid: &str) -> (String, String, u64) {
    let mut c = root(server).await;
    let set: String = c
        .query_first(format!("SELECT {gtid}"))
        .await
        .unwrap()
        .unwrap();
    let row: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    (set, row.get("File").unwrap(), row.get("Position").unwrap())
}

/// The freeze's position as (GTID set, file, position).
fn gtid_of(hold: &stillpoint_controller::core::agents::HeldFreeze) -> (String, String, u64) {
    match hold
        .frozen
        .position
        .as_ref()
        .unwrap()
        .kind
        .as_ref()
        .unwrap()
    {
        pb::position::Kind::Gtid(g) => (g.gtid_set.clone(), g.binlog_file.clone(), g.binlog_pos),
        other => panic!("not a GTID position: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_freeze_reads_its_position_in_its_round_trip_once_commits_are_blocked() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let mut c = database("m_read").await;
    for id in 1..=20 {
        c.exec_drop("INSERT INTO m_read.t VALUES (?)", (id,))
            .await
            .unwrap();
    }
    let mut primary = agent(&fleet, "maria-read-primary", &maria.primary).await;
    let mut replica = agent(&fleet, "maria-read-replica", &maria.replica).await;
    let target = primary.position().await.unwrap();
    replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
    for (a, server, gtid) in [
        (&mut primary, &maria.primary, "@@gtid_binlog_pos"),
        (&mut replica, &maria.replica, "@@gtid_slave_pos"),
    ] {
        a.prepare("b-read").await.unwrap();
        let mut hold = a.freeze("b-read", Duration::from_secs(30)).await.unwrap();
        // Commits are blocked: what the server reports now is where the
        // freeze stood.
        let (set, file, pos) = gtid_of(&hold);
        assert!(!set.is_empty(), "the freeze read the GTID set");
        assert_eq!((set, file, pos), reported(server, gtid).await);
        let flushed = hold.flush(false).await.unwrap();
        assert!(flushed.error.is_empty(), "{}", flushed.error);
        assert!(
            ["redo log already flushed", "FLUSH ENGINE LOGS"]
                .iter()
                .any(|d| flushed.detail.starts_with(d)),
            "{}",
            flushed.detail
        );
        hold.request_thaw(true).await.unwrap();
        let result = hold.thawed().await.unwrap().unwrap();
        assert!(result.error.is_empty(), "{}", result.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_waits_for_the_primary_gtid_and_fails_at_its_bound_when_stopped() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let mut c = database("m_positions").await;
    let mut primary = agent(&fleet, "maria-primary", &maria.primary).await;
    let mut replica = agent(&fleet, "maria-replica", &maria.replica).await;
    assert_eq!(
        primary.describe().await.unwrap().role,
        pb::Role::Primary as i32
    );
    let r = replica.describe().await.unwrap();
    assert_eq!(r.role, pb::Role::Replica as i32);
    assert_eq!(r.upstream, format!("127.0.0.1:{}", maria.primary.port));

    for id in 1..=50 {
        c.exec_drop("INSERT INTO m_positions.t VALUES (?)", (id,))
            .await
            .unwrap();
    }
    let target = primary.position().await.unwrap();
    let reached = replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
    let reached = reached.reached.unwrap();
    assert!(reached.reached(&target).unwrap());
    // Read in the wait's own round trip: where the replica stood (idle now).
    let Some(pb::position::Kind::Gtid(g)) = reached.kind else {
        panic!("not a GTID position: {reached:?}");
    };
    assert_eq!(
        (g.gtid_set, g.binlog_file, g.binlog_pos),
        reported(&maria.replica, "@@gtid_slave_pos").await
    );

    maria.replica.sql("STOP SLAVE").unwrap();
    c.query_drop("INSERT INTO m_positions.t VALUES (1000)")
        .await
        .unwrap();
    let target = primary.position().await.unwrap();
    let started = Instant::now();
    let err = replica
        .wait_for(&target, Duration::from_secs(1))
        .await
        .unwrap_err();
    maria.replica.sql("START SLAVE").unwrap();
    assert_wait_hit_its_bound(&err, started.elapsed(), Duration::from_secs(1));
    replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_unreachable_servers_are_clear_errors_and_the_agent_stays_up() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    agent_user();
    let wrong = format!(
        "mysql://{AGENT_USER}:not-the-password@127.0.0.1:{}/",
        maria.primary.port
    );
    let mut a = fleet
        .start(
            &fleet
                .spec("maria-wrong", "mysql")
                .unwrap()
                .with("STILLPOINT_DSN", &wrong),
        )
        .await
        .unwrap();
    let err = a.describe().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("Access denied"), "{}", err.message());
    assert!(
        !err.message().contains("not-the-password"),
        "{}",
        err.message()
    );
    let err = a
        .freeze("b-wrong", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.message().contains("maria-wrong"), "{}", err.message());
    assert!(!a.proc.logs().contains("not-the-password"));
    assert!(
        a.proc.admin_get("/healthz").unwrap().0.contains("200"),
        "agent stays up"
    );

    let port = stillpoint_tests::harness::free_port();
    let mut b = fleet
        .start(
            &fleet
                .spec("maria-nowhere", "mysql")
                .unwrap()
                .with("STILLPOINT_DSN", &format!("mysql://root@127.0.0.1:{port}/"))
                .with("STILLPOINT_CONNECT_TIMEOUT", "1s"),
        )
        .await
        .unwrap();
    let err = b.position().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("cannot connect"),
        "{}",
        err.message()
    );
    // Still serving.
    assert!(b.freeze("b-nowhere", Duration::from_secs(5)).await.is_err());
    assert!(b.proc.admin_get("/healthz").unwrap().0.contains("200"));
}

/// A freeze whose backup stage cannot be had (another session holds one)
/// fails at the lock bound naming the member, holds nothing and leaves the
/// agent free; once the other stage ends, a freeze holds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_that_cannot_get_its_backup_stage_fails_at_the_lock_timeout_holding_nothing() {
    let _serial = shared::server_wide_freeze().await;
    let fleet = Fleet::new().unwrap();
    let maria = shared::mariadb();
    let mut a = agent(&fleet, "maria-stage", &maria.primary).await;
    a.prepare("b-stage").await.unwrap();
    let mut other = root(&maria.primary).await;
    other.query_drop("BACKUP STAGE START").await.unwrap();
    let started = Instant::now();
    let err = a
        .freeze("b-stage", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.message().contains("maria-stage"), "{}", err.message());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !a.proc
            .admin_get("/healthz")
            .unwrap()
            .1
            .contains("frozen by")
    );
    other.query_drop("BACKUP STAGE END").await.unwrap();
    let mut hold = a
        .freeze("b-stage-2", Duration::from_secs(30))
        .await
        .unwrap();
    hold.request_thaw(false).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
}
