//! The harness itself: each pair replicates, and teardown leaves nothing.

use std::time::Duration;

use anyhow::Result;
use mysql_async::prelude::Queryable;
use stillpoint_tests::harness::mariadb::MariaPair;
use stillpoint_tests::harness::postgres::PgPair;
use stillpoint_tests::harness::redis::RedisPair;
use stillpoint_tests::harness::{pid_alive, wait_for};

const REPLICATION_BOUND: Duration = Duration::from_secs(10);

async fn pg_client(conninfo: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn postgres_replicates(pair: &PgPair) -> Result<()> {
    let primary = pg_client(&pair.primary.conninfo("postgres")).await?;
    primary
        .batch_execute("CREATE TABLE harness_probe (id int PRIMARY KEY, note text)")
        .await?;
    primary
        .execute(
            "INSERT INTO harness_probe VALUES (1, $1)",
            &[&"from the primary"],
        )
        .await?;
    let replica = pg_client(&pair.replica.conninfo("postgres")).await?;
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    assert!(in_recovery, "the replica must be a standby");
    let deadline = tokio::time::Instant::now() + REPLICATION_BOUND;
    loop {
        let rows = replica
            .query("SELECT note FROM harness_probe WHERE id = 1", &[])
            .await
            .unwrap_or_default();
        if let Some(row) = rows.first() {
            assert_eq!(row.get::<_, String>(0), "from the primary");
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "row never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mariadb_replicates(pair: &MariaPair) -> Result<()> {
    let mut primary = mysql_async::Conn::from_url(pair.primary.url("mysql")).await?;
    primary
        .query_drop(
            "CREATE DATABASE harness_probe; \
             CREATE TABLE harness_probe.t (id INT PRIMARY KEY, note TEXT) ENGINE=InnoDB; \
             INSERT INTO harness_probe.t VALUES (1, 'from the primary')",
        )
        .await?;
    let mut replica = mysql_async::Conn::from_url(pair.replica.url("mysql")).await?;
    let deadline = tokio::time::Instant::now() + REPLICATION_BOUND;
    loop {
        let note: Option<String> = replica
            .query_first("SELECT note FROM harness_probe.t WHERE id = 1")
            .await
            .unwrap_or(None);
        if let Some(note) = note {
            assert_eq!(note, "from the primary");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "row never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.disconnect().await?;
    replica.disconnect().await?;
    Ok(())
}

async fn redis_replicates(pair: &RedisPair) -> Result<()> {
    let primary = redis::Client::open(pair.primary.url())?;
    let mut primary = primary.get_multiplexed_async_connection().await?;
    let () = redis::cmd("SET")
        .arg("harness:probe")
        .arg("from the primary")
        .query_async(&mut primary)
        .await?;
    let replica = redis::Client::open(pair.replica.url())?;
    let mut replica = replica.get_multiplexed_async_connection().await?;
    let deadline = tokio::time::Instant::now() + REPLICATION_BOUND;
    loop {
        let value: Option<String> = redis::cmd("GET")
            .arg("harness:probe")
            .query_async(&mut replica)
            .await?;
        if let Some(value) = value {
            assert_eq!(value, "from the primary");
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that after `teardown` no server process and no temp dir remain.
fn assert_gone(pids: Vec<u32>, dir: std::path::PathBuf, what: &str) {
    assert_eq!(
        pids.len(),
        2,
        "{what}: both servers should have been running"
    );
    wait_for("server processes gone", Duration::from_secs(10), || {
        Ok(pids.iter().all(|pid| !pid_alive(*pid)))
    })
    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(!dir.exists(), "{what}: {} still exists", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pair_replicates_and_leaves_nothing_behind() {
    let pair = tokio::task::spawn_blocking(PgPair::start)
        .await
        .unwrap()
        .unwrap();
    postgres_replicates(&pair).await.unwrap();
    // A copy of the live data directory carries the primary's pid file:
    // dropping it unstarted must not stop the primary.
    tokio::task::block_in_place(|| {
        let copy = stillpoint_tests::harness::postgres::PgRestored::new().unwrap();
        stillpoint_controller::local::snapshot::copy::copy_tree(
            &pair.primary.data,
            copy.data_dir(),
        )
        .unwrap();
        assert!(copy.data_dir().join("postmaster.pid").exists());
        drop(copy);
    });
    assert!(
        pair.primary.pid().is_some() && pair.primary.psql("SELECT 1").unwrap() == "1",
        "the primary still runs"
    );
    let (pids, dir) = (pair.pids(), pair.dir().to_path_buf());
    tokio::task::spawn_blocking(move || drop(pair))
        .await
        .unwrap();
    assert_gone(pids, dir, "PostgreSQL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_pair_replicates_and_leaves_nothing_behind() {
    let pair = tokio::task::spawn_blocking(MariaPair::start)
        .await
        .unwrap()
        .unwrap();
    mariadb_replicates(&pair).await.unwrap();
    let (pids, dir) = (pair.pids(), pair.dir().to_path_buf());
    tokio::task::spawn_blocking(move || drop(pair))
        .await
        .unwrap();
    assert_gone(pids, dir, "MariaDB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pair_replicates_and_leaves_nothing_behind() {
    let pair = tokio::task::spawn_blocking(RedisPair::start)
        .await
        .unwrap()
        .unwrap();
    redis_replicates(&pair).await.unwrap();
    let (pids, dir) = (pair.pids(), pair.dir().to_path_buf());
    tokio::task::spawn_blocking(move || drop(pair))
        .await
        .unwrap();
    assert_gone(pids, dir, "Redis");
}

#[test]
fn a_panicking_test_still_tears_down() {
    let dir = std::panic::catch_unwind(|| {
        let pair = RedisPair::start().unwrap();
        let dir = pair.dir().to_path_buf();
        let pids = pair.pids();
        std::panic::panic_any((dir, pids));
    })
    .unwrap_err();
    let (dir, pids) = *dir.downcast::<(std::path::PathBuf, Vec<u32>)>().unwrap();
    assert_gone(pids, dir, "Redis after a panic");
}
