//! The PostgreSQL engine against a real primary + streaming replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;
use stillpoint_tests::harness::fleet::{Agent, Fleet, assert_wait_hit_its_bound, finishes_within};
use stillpoint_tests::harness::postgres::{PgRestored, PgServer, fresh_database};
use stillpoint_tests::harness::shared;
use tokio_postgres::{Client, NoTls};

async fn client(server: &PgServer, db: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(&server.conninfo(db), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// A fresh database on the shared primary with one table `t`.
async fn database(name: &str) -> Client {
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, note text)";
    fresh_database(&shared::postgres().primary, name, ddl).await
}

/// Waits until database `name`, new on the shared primary, has reached
/// its standby, before an agent of the standby uses it.
fn on_the_standby(name: &str) {
    let pg = shared::postgres();
    let query = format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'");
    stillpoint_tests::harness::wait_for("database on the standby", Duration::from_secs(10), || {
        Ok(pg.replica.psql(&query)? == "1")
    })
    .unwrap();
}

async fn agent(fleet: &Fleet, member: &str, server: &PgServer, db: &str, mode: &str) -> Agent {
    let spec = fleet
        .spec(member, "postgres")
        .unwrap()
        .with("STILLPOINT_DSN", &server.conninfo(db))
        .with("STILLPOINT_PG_MODE", mode)
        .with("STILLPOINT_LOCK_TIMEOUT", "2s")
        .with("STILLPOINT_PG_WAL_RETAIN", "30s");
    fleet.start(&spec).await.unwrap()
}

/// Inserts `id` from its own connection; returns when the insert commits.
fn insert(server: &PgServer, db: &str, id: i32) -> tokio::task::JoinHandle<Result<(), String>> {
    let conninfo = server.conninfo(db);
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&conninfo, NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        c.execute("INSERT INTO t VALUES ($1, 'w')", &[&id])
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_blocks_writes_keeps_reads_and_loses_nothing() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("fence_writes").await;
    db.execute("INSERT INTO t VALUES (1, 'before')", &[])
        .await
        .unwrap();
    let mut a = agent(&fleet, "pg-fence", &pg.primary, "fence_writes", "fence").await;
    assert!(
        a.describe()
            .await
            .unwrap()
            .capabilities
            .unwrap()
            .blocks_writes
    );
    a.prepare("b-fence").await.unwrap();
    let mut hold = a.freeze("b-fence", Duration::from_secs(30)).await.unwrap();

    let mut blocked = insert(&pg.primary, "fence_writes", 2);
    assert!(
        finishes_within(Duration::from_millis(500), &mut blocked)
            .await
            .is_none(),
        "a write went through a fence"
    );
    let read = finishes_within(
        Duration::from_secs(2),
        db.query_one("SELECT count(*) FROM t", &[]),
    )
    .await
    .expect("reads must not block")
    .unwrap();
    assert_eq!(read.get::<_, i64>(0), 1);

    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    finishes_within(Duration::from_secs(5), blocked)
        .await
        .expect("the blocked write completes after the thaw")
        .unwrap()
        .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the blocked write's row is there");
    let metrics = a.proc.admin_get("/metrics").unwrap().1;
    assert!(
        metrics.contains("stillpoint_agent_freeze_duration_seconds_count{engine=\"postgres\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stillpoint_agent_thaw_duration_seconds_count{engine=\"postgres\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_locks_tables_created_or_dropped_after_prepare() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("fence_changed").await;
    db.batch_execute("CREATE TABLE gone (id int)")
        .await
        .unwrap();
    let mut a = agent(&fleet, "pg-changed", &pg.primary, "fence_changed", "fence").await;
    a.prepare_for("b-changed", true).await.unwrap();
    // The table list read at prepare is stale by the freeze.
    db.batch_execute("CREATE TABLE late (id int); DROP TABLE gone")
        .await
        .unwrap();
    let mut hold = a
        .freeze("b-changed", Duration::from_secs(30))
        .await
        .unwrap();
    let conninfo = pg.primary.conninfo("fence_changed");
    let mut blocked = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
        tokio::spawn(conn);
        c.execute("INSERT INTO late VALUES (1)", &[]).await.unwrap();
    });
    assert!(
        finishes_within(Duration::from_millis(300), &mut blocked)
            .await
            .is_none(),
        "a table created after prepare is fenced too"
    );
    hold.request_thaw(true).await.unwrap();
    assert!(hold.thawed().await.unwrap().unwrap().error.is_empty());
    finishes_within(Duration::from_secs(5), blocked)
        .await
        .expect("the write completes after the thaw")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_cut_needs_no_backup_session_and_the_fence_still_holds() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("fence_atomic").await;
    let mut a = agent(&fleet, "pg-atomic", &pg.primary, "fence_atomic", "fence").await;
    let prepared = a.prepare_for("b-atomic", true).await.unwrap();
    assert!(
        prepared.detail.contains("atomic cut"),
        "{}",
        prepared.detail
    );
    let backups = async || -> i64 {
        // No backup is in progress and no slot of this backup exists (its
        // name ends in the agent's pid, which this process does not know).
        db.query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots \
                      WHERE slot_name LIKE 'stillpoint\\_b\\_atomic\\_%') \
             + (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                AND query ILIKE '%pg_backup_start%' AND pid <> pg_backend_pid())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    let mut hold = a.freeze("b-atomic", Duration::from_secs(30)).await.unwrap();
    assert_eq!(backups().await, 0, "an atomic cut opens no backup session");
    let mut blocked = insert(&pg.primary, "fence_atomic", 1);
    assert!(
        finishes_within(Duration::from_millis(300), &mut blocked)
            .await
            .is_none(),
        "the fence holds writes"
    );
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    assert!(
        !result.artefacts.contains_key("backup_label"),
        "an atomic cut has no label: {:?}",
        result.artefacts
    );
    finishes_within(Duration::from_secs(5), blocked)
        .await
        .expect("the write completes after the thaw")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_mode_copy_with_its_wal_and_label_recovers_as_a_real_server() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("backup_copy").await;
    let mut a = agent(&fleet, "pg-backup", &pg.primary, "backup_copy", "backup").await;
    assert!(
        !a.describe()
            .await
            .unwrap()
            .capabilities
            .unwrap()
            .blocks_writes
    );

    // A writer keeps committing through the whole backup.
    let acked = Arc::new(AtomicI64::new(0));
    let writer = {
        let acked = acked.clone();
        let conninfo = pg.primary.conninfo("backup_copy");
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
            tokio::spawn(conn);
            for id in 1..i32::MAX {
                if c.execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
                    .await
                    .is_err()
                {
                    return;
                }
                acked.store(i64::from(id), Ordering::SeqCst);
                if id % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let prepared = a.prepare("b-copy").await.unwrap();
    assert!(
        prepared.detail.contains("backup started"),
        "{}",
        prepared.detail
    );
    let hold = a.freeze("b-copy", Duration::from_secs(60)).await.unwrap();
    let mut hold = hold;
    assert!(acked.load(Ordering::SeqCst) > 0);
    let before_freeze_ok = acked.load(Ordering::SeqCst);

    // Writes keep flowing in backup mode.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        acked.load(Ordering::SeqCst) > before_freeze_ok,
        "backup mode must not block writes"
    );

    let restored = PgRestored::new().unwrap();
    // A live tree: files the server removes mid-copy are skipped.
    stillpoint_controller::local::snapshot::copy::copy_tree(&pg.primary.data, restored.data_dir())
        .unwrap();

    let acked_before_stop = acked.load(Ordering::SeqCst);
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    let label = result
        .artefacts
        .get("backup_label")
        .expect("backup_label returned");
    assert!(label.contains("LABEL: stillpoint b-copy"), "{label}");
    let stop = result.stop_position.clone().expect("stop LSN");
    assert!(
        stop.reached(hold.frozen.position.as_ref().unwrap())
            .unwrap()
    );
    writer.abort();

    // The WAL from start to stop is still there: the slot keeps it. The
    // server still runs, so a segment it does not need can be recycled
    // (renamed) while `cp` reads the directory: copy again then.
    let wal_copy = (0..5).any(|_| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "rm -rf '{dst}/pg_wal' && cp -a '{src}/pg_wal' '{dst}/pg_wal'",
                src = pg.primary.data.display(),
                dst = restored.data_dir().display()
            ))
            .status()
            .unwrap()
            .success()
    });
    assert!(wal_copy, "pg_wal could not be copied");
    std::fs::write(restored.data_dir().join("backup_label"), label).unwrap();
    if let Some(map) = result.artefacts.get("tablespace_map") {
        std::fs::write(restored.data_dir().join("tablespace_map"), map).unwrap();
    }
    restored.start().unwrap();
    let r = client(&restored.server, "backup_copy").await;
    let rows: Vec<i32> = r
        .query(
            "SELECT id FROM t WHERE id <= $1 ORDER BY id",
            &[&(acked_before_stop as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        rows.len() as i64,
        acked_before_stop,
        "every write acknowledged before the backup stop is in the restored server"
    );
    let log = std::fs::read_to_string(&restored.server.log).unwrap_or_default();
    assert!(
        log.contains("starting backup recovery") && log.contains("completed backup recovery"),
        "recovery ran from the backup label to its end:\n{log}"
    );
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_releases_the_fence_within_ttl() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let _db = database("fence_lease").await;
    let mut a = agent(&fleet, "pg-lease", &pg.primary, "fence_lease", "fence").await;
    let ttl = Duration::from_secs(1);
    let started = Instant::now();
    let _hold = a.freeze("b-lease", ttl).await.unwrap();
    let mut blocked = insert(&pg.primary, "fence_lease", 1);
    assert!(
        finishes_within(Duration::from_millis(300), &mut blocked)
            .await
            .is_none()
    );
    finishes_within(ttl + Duration::from_secs(1), blocked)
        .await
        .expect("writes resume within TTL + 1 s")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= ttl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_cannot_keep_the_fence_past_its_lease_and_renewals_keep_it() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let _db = database("fence_stopped").await;
    let mut a = agent(&fleet, "pg-stop", &pg.primary, "fence_stopped", "fence").await;
    let ttl = Duration::from_secs(1);
    let hold = a.freeze("b-renewed", ttl).await.unwrap();
    // Renewed, the fence holds well past the server's own bound (the lease
    // plus one second): each renewal restarts it.
    let mut blocked = insert(&pg.primary, "fence_stopped", 1);
    for _ in 0..8 {
        tokio::time::sleep(ttl / 3).await;
        hold.renew().await.unwrap();
    }
    assert!(
        finishes_within(Duration::from_millis(10), &mut blocked)
            .await
            .is_none(),
        "a renewed fence let a write through"
    );
    hold.request_thaw(false).await.unwrap();
    finishes_within(Duration::from_secs(3), blocked)
        .await
        .expect("the write goes through after the thaw")
        .unwrap()
        .unwrap();
    drop(hold);

    // The agent stopped mid-hold (as a frozen process or a partition
    // inside the pod leaves it): the server ends the fence by itself.
    let _hold = a.freeze("b-stopped", ttl).await.unwrap();
    let stopped = Instant::now();
    stillpoint_tests::harness::signal(a.proc.pid(), "STOP");
    let blocked = insert(&pg.primary, "fence_stopped", 2);
    let resumed = finishes_within(Duration::from_secs(10), blocked).await;
    let after = stopped.elapsed();
    stillpoint_tests::harness::signal(a.proc.pid(), "CONT");
    resumed
        .expect("the server released the stopped agent's fence")
        .unwrap()
        .unwrap();
    assert!(after >= ttl, "released before the lease: {after:?}");
    assert!(
        after <= ttl + Duration::from_secs(2),
        "released {after:?} after the stop; the bound is the lease ({ttl:?}) + 1 s"
    );
    // Woken, the agent finds its lease run out, ends the hold (its session
    // is gone already) and takes the next one.
    let woken = Instant::now();
    while a.proc.admin_get("/healthz").unwrap().1 != "ok\n" {
        assert!(
            woken.elapsed() < Duration::from_secs(5),
            "the woken agent still holds: {}",
            a.proc.admin_get("/healthz").unwrap().1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut next = a.freeze("b-after", ttl).await.unwrap();
    next.request_thaw(false).await.unwrap();
    let result = next.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_leaves_nothing_locked() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let _db = database("fence_kill").await;
    let mut a = agent(&fleet, "pg-kill", &pg.primary, "fence_kill", "fence").await;
    let _hold = a.freeze("b-kill", Duration::from_secs(60)).await.unwrap();
    let mut blocked = insert(&pg.primary, "fence_kill", 1);
    assert!(
        finishes_within(Duration::from_millis(300), &mut blocked)
            .await
            .is_none()
    );
    a.proc.kill();
    finishes_within(Duration::from_secs(3), blocked)
        .await
        .expect("the server released the locks of the dead agent")
        .unwrap()
        .unwrap();
    let admin = client(&pg.primary, "postgres").await;
    let slots: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'stillpoint_b_kill%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the temporary slot ended with the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_held_session_fails_the_hold_promptly() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let _db = database("session_loss").await;
    let mut a = agent(&fleet, "pg-loss", &pg.primary, "session_loss", "backup").await;
    let mut hold = a.freeze("b-loss", Duration::from_secs(60)).await.unwrap();
    let admin = client(&pg.primary, "postgres").await;
    let terminated: bool = admin
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name LIKE 'stillpoint_b_loss%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated);
    let started = Instant::now();
    let failed = Agent::failure(&mut hold, Duration::from_secs(3))
        .await
        .expect("the hold reports its failure");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        failed.reason.contains("backup session ended"),
        "{}",
        failed.reason
    );
    assert!(
        failed.reason.contains("pg-loss"),
        "names the member: {}",
        failed.reason
    );
    let result = hold.thawed().await.unwrap().unwrap();
    assert_eq!(result.cause, pb::ThawCause::HoldLost as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_waits_for_the_primary_position_and_fails_at_its_bound_when_stopped() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("positions").await;
    on_the_standby("positions");
    let mut primary = agent(&fleet, "pg-primary", &pg.primary, "positions", "backup").await;
    let mut replica = agent(&fleet, "pg-replica", &pg.replica, "positions", "backup").await;

    let p = primary.describe().await.unwrap();
    assert_eq!(p.role, pb::Role::Primary as i32);
    let r = replica.describe().await.unwrap();
    assert_eq!(r.role, pb::Role::Replica as i32);
    assert_eq!(r.upstream, format!("127.0.0.1:{}", pg.primary.port));
    assert!(
        r.server_version.starts_with("PostgreSQL 15"),
        "{}",
        r.server_version
    );

    for id in 1..=100 {
        db.execute("INSERT INTO t VALUES ($1, 'p')", &[&id])
            .await
            .unwrap();
    }
    let target = primary.position().await.unwrap();
    let reached = replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(reached.reached.unwrap().reached(&target).unwrap());
    // The same alignment and the freeze in one round trip.
    let mut hold = replica
        .freeze_aligned(
            "b-aligned",
            Duration::from_secs(30),
            &target,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(
        hold.frozen
            .position
            .as_ref()
            .unwrap()
            .reached(&target)
            .unwrap()
    );
    hold.request_thaw(true).await.unwrap();
    hold.thawed().await.unwrap().unwrap();

    // Replication stopped: the wait fails at its bound, clearly.
    let replica_admin = client(&pg.replica, "postgres").await;
    replica_admin
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    db.execute("INSERT INTO t VALUES (1000, 'after pause')", &[])
        .await
        .unwrap();
    let target = primary.position().await.unwrap();
    let started = Instant::now();
    let err = replica
        .wait_for(&target, Duration::from_millis(700))
        .await
        .unwrap_err();
    // An aligned freeze that cannot align is refused and holds nothing.
    let refused = replica
        .freeze_aligned(
            "b-unaligned",
            Duration::from_secs(30),
            &target,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("pg-replica"),
        "{}",
        refused.message()
    );
    assert!(
        !replica
            .proc
            .admin_get("/healthz")
            .unwrap()
            .1
            .contains("frozen by")
    );
    replica_admin
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_wait_hit_its_bound(&err, started.elapsed(), Duration::from_millis(700));
    assert!(err.message().contains("pg-replica"), "{}", err.message());
    replica
        .wait_for(&target, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_can_hold_a_backup_too() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let _db = database("standby_backup").await;
    let mut replica = agent(&fleet, "pg-standby", &pg.replica, "postgres", "fence").await;
    replica.prepare("b-standby").await.unwrap();
    let mut hold = replica
        .freeze("b-standby", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(
        hold.frozen.position.as_ref().unwrap().kind,
        Some(pb::position::Kind::Pg(_))
    ));
    hold.request_thaw(true).await.unwrap();
    let result = hold.thawed().await.unwrap().unwrap();
    assert!(result.error.is_empty(), "{}", result.error);
    assert!(
        result.artefacts["backup_label"].contains("FROM: standby"),
        "{:?}",
        result.artefacts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_that_cannot_get_its_locks_fails_at_the_lock_timeout() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("fence_timeout").await;
    // A long transaction holds a conflicting lock.
    db.batch_execute("BEGIN; LOCK TABLE t IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let spec = fleet
        .spec("pg-timeout", "postgres")
        .unwrap()
        .with("STILLPOINT_DSN", &pg.primary.conninfo("fence_timeout"))
        .with("STILLPOINT_PG_MODE", "fence")
        .with("STILLPOINT_LOCK_TIMEOUT", "400ms");
    let mut a = fleet.start(&spec).await.unwrap();
    a.prepare("b-timeout").await.unwrap();
    let started = Instant::now();
    let err = a
        .freeze("b-timeout", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("lock timeout"), "{}", err.message());
    assert!(
        err.message().contains("STILLPOINT_LOCK_TIMEOUT"),
        "{}",
        err.message()
    );
    db.batch_execute("COMMIT").await.unwrap();
    // Nothing was left locked or held: writes and a new freeze both work.
    insert(&pg.primary, "fence_timeout", 5)
        .await
        .unwrap()
        .unwrap();
    let hold = a
        .freeze("b-timeout-2", Duration::from_secs(30))
        .await
        .unwrap();
    drop(hold);
}

/// A primary whose WAL ends exactly at a page boundary (here: a segment
/// switch, then nothing) reports the end of that WAL, which its standby
/// reaches. Its insert pointer lies past the next page's header, where no
/// record ends: a standby waiting for it waited for the primary's next
/// write — none while the group is frozen — and the backup failed at its
/// budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_wal_ends_at_a_page_boundary_reports_a_position_its_standby_reaches() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("page_boundary").await;
    on_the_standby("page_boundary");
    let mut primary = agent(&fleet, "pg-primary", &pg.primary, "page_boundary", "fence").await;
    let mut replica = agent(&fleet, "pg-replica", &pg.replica, "page_boundary", "fence").await;
    for round in 0..3 {
        db.execute("INSERT INTO t VALUES ($1, 'before the switch')", &[&round])
            .await
            .unwrap();
        db.batch_execute("SELECT pg_switch_wal()").await.unwrap();
        let target = primary.position().await.unwrap();
        let reached = replica.wait_for(&target, Duration::from_secs(3)).await;
        assert!(
            reached.is_ok(),
            "round {round}: the standby did not reach {}: {:?}",
            target.display(),
            reached.err()
        );
    }
}

/// A primary whose last record was continued onto a page that does not
/// start a segment, and ends 40 bytes into it (a 24-byte page header,
/// then the record's last 16 bytes), reports that end: a segment's long
/// header is 40 bytes too, but only at a segment's start. Taken for a
/// header, the position was 40 bytes short of the WAL the primary wrote,
/// and a restored standby that replayed all of it looked ahead of its
/// restored primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_wal_ends_forty_bytes_into_a_page_reports_that_end() {
    let fleet = Fleet::new().unwrap();
    let pg = shared::postgres();
    let db = database("forty_bytes").await;
    on_the_standby("forty_bytes");
    let mut primary = agent(&fleet, "pg-primary", &pg.primary, "forty_bytes", "fence").await;
    let mut replica = agent(&fleet, "pg-replica", &pg.replica, "forty_bytes", "fence").await;
    let mut placed = 0;
    for _ in 0..200 {
        let Some(end) = end_forty_bytes_into_a_page(&db).await else {
            continue;
        };
        let reported = primary.position().await.unwrap();
        if insert_lsn(&db).await != end {
            continue; // another test wrote: the WAL moved on
        }
        assert_eq!(
            reported.display(),
            stillpoint_proto::position::format_lsn(end),
            "the WAL ends 40 bytes into a page that does not start a segment"
        );
        replica
            .wait_for(&reported, Duration::from_secs(5))
            .await
            .unwrap();
        placed += 1;
        if placed == 3 {
            return;
        }
    }
    panic!("the WAL could be made to end 40 bytes into a page only {placed} times in 200");
}

const PAGE: u64 = 8192;

async fn insert_lsn(db: &Client) -> u64 {
    let row = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap();
    stillpoint_proto::position::parse_lsn(row.get(0)).unwrap()
}

/// Writes one non-transactional logical message sized to end 40 bytes
/// into a page that does not start a segment (16 MiB here); the end, if
/// it landed there (another test's WAL in between moves it).
async fn end_forty_bytes_into_a_page(db: &Client) -> Option<u64> {
    const SEGMENT: u64 = 16 << 20;
    // A message's record: about 70 bytes besides its payload; one short
    // page header when it crosses a page. Measured, then corrected.
    let mut overhead: i64 = 70;
    for _ in 0..4 {
        let start = insert_lsn(db).await;
        let mut page = (start / PAGE + 2) * PAGE;
        if page.is_multiple_of(SEGMENT) {
            page += PAGE;
        }
        let target = page + 40;
        let payload = (target - start) as i64 - 24 - overhead;
        let sql = format!("SELECT pg_logical_emit_message(false, 'p', repeat('x', {payload}))");
        db.batch_execute(&sql).await.unwrap();
        let end = insert_lsn(db).await;
        if end == target {
            return Some(end);
        }
        overhead += end as i64 - target as i64;
    }
    None
}
