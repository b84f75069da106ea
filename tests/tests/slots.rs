//! PostgreSQL replication slots: a hold that does not end in a completed
//! cut releases its backup session and temporary slot at once, so killed
//! controllers never use `max_replication_slots` up; and when the slots are
//! all taken, prepare says which ones hold them.
//!
//! Its own binary (and shared PostgreSQL pair): these tests fill the slots.

use std::time::Duration;

use stillpoint_tests::harness::fleet::Fleet;
use stillpoint_tests::harness::group::{Setup, is_frozen, member};
use stillpoint_tests::harness::postgres::fresh_database;
use stillpoint_tests::harness::{shared, wait_for};

/// One test at a time: both count the primary's slots.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    shared::server_wide_freeze().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_killed_quiesces_leak_no_slot_and_a_backup_still_succeeds() {
    let _serial = serial().await;
    let pg = shared::postgres();
    fresh_database(&pg.primary, "slots", "CREATE TABLE t (id int)").await;
    let mut s = Setup::new();
    let addr = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("slots"))],
    );
    s.config(
        "g",
        &format!(
            "snapshotter = \"copy\"\nfreeze_budget = \"20s\"\n{}",
            member("pg-0", &addr, "primary", None, &[&pg.primary.data])
        ),
    );
    let slots = || {
        pg.primary
            .psql("SELECT count(*) FROM pg_replication_slots")
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    let before = slots();
    for n in 0..20 {
        let mut quiesce = s.spawn_stillpoint(&["quiesce", "pg-0", "--ttl", "30s"]);
        wait_for("frozen", Duration::from_secs(10), || {
            Ok(is_frozen(&s.agents[0]))
        })
        .unwrap_or_else(|e| panic!("quiesce {n}: {e}"));
        quiesce.kill().unwrap();
        let _ = quiesce.wait();
        // The stream closed with the process: the agent thaws at once.
        wait_for("thawed", Duration::from_secs(5), || {
            Ok(!is_frozen(&s.agents[0]))
        })
        .unwrap();
    }
    wait_for(
        "every slot of a killed hold released",
        Duration::from_secs(5),
        || Ok(slots() == before),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            pg.primary
                .psql("SELECT string_agg(slot_name, ', ') FROM pg_replication_slots")
                .unwrap()
        )
    });
    let out = s.stillpoint(&["backup", "create", "g", "--id", "g-after-kills"]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_slot_is_taken_prepare_says_which_slots_hold_them() {
    let _serial = serial().await;
    let pg = shared::postgres();
    let free: u32 = pg
        .primary
        .psql(
            "SELECT current_setting('max_replication_slots')::int - count(*) FROM pg_replication_slots",
        )
        .unwrap()
        .parse()
        .unwrap();
    pg.primary
        .psql(&format!(
            "SELECT pg_create_physical_replication_slot('filler_' || i) FROM generate_series(1, {free}) i"
        ))
        .unwrap();
    let fleet = Fleet::new().unwrap();
    let spec = fleet
        .spec("pg-full", "postgres")
        .unwrap()
        .with("STILLPOINT_DSN", &pg.primary.conninfo("postgres"));
    let mut agent = fleet.start(&spec).await.unwrap();
    let err = agent.prepare("b-full").await.unwrap_err();
    pg.primary
        .psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'filler_%'")
        .unwrap();
    let message = err.message();
    assert!(
        message.contains("pg-full (postgres): prepare failed"),
        "{message}"
    );
    assert!(message.contains("53400"), "{message}");
    assert!(
        message.contains("filler_1 (physical, not in use)"),
        "{message}"
    );
    assert!(
        message.contains("stillpoint_replica (physical, held by backend pid"),
        "{message}"
    );
    assert!(message.contains("max_replication_slots"), "{message}");
}
