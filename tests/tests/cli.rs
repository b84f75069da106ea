//! `stillpoint` as an operator runs it: quiesce, thaw, status, backups, and
//! bad input that must fail clearly and leave nothing frozen.

use std::process::Output;
use std::time::{Duration, Instant};

use stillpoint_tests::harness::group::{Setup, is_frozen, member};
use stillpoint_tests::harness::postgres::{PgServer, fresh_database};
use stillpoint_tests::harness::{free_port, shared, signal, wait_for};
use tokio_postgres::NoTls;

fn stillpoint(s: &Setup, args: &[&str]) -> Output {
    s.stillpoint(args)
}

fn spawn_stillpoint(s: &Setup, args: &[&str]) -> std::process::Child {
    s.spawn_stillpoint(args)
}

/// Waits until the setup's first agent holds a freeze.
fn wait_frozen(s: &Setup) {
    wait_for("frozen", Duration::from_secs(10), || {
        Ok(is_frozen(&s.agents[0]))
    })
    .unwrap();
}

/// A database `name` with table `t` on the shared primary.
async fn database(server: &PgServer, name: &str) {
    fresh_database(server, name, "CREATE TABLE t (id int)").await;
}

/// Inserts one row; returns how long it took.
fn timed_insert(server: &PgServer, db: &str) -> tokio::task::JoinHandle<Duration> {
    let conninfo = server.conninfo(db);
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
        tokio::spawn(conn);
        let started = Instant::now();
        c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
        started.elapsed()
    })
}

async fn fenced_pg(s: &mut Setup, db: &str) -> String {
    database(&shared::postgres().primary, db).await;
    pg_group(s, db, "fence")
}

/// Group `q` of one PostgreSQL member `pg-q` on database `db` (which must
/// exist), its agent in `mode`.
fn pg_group(s: &mut Setup, db: &str, mode: &str) -> String {
    let pg = shared::postgres();
    let addr = s.agent(
        "pg-q",
        "postgres",
        &[
            ("STILLPOINT_DSN", pg.primary.conninfo(db)),
            ("STILLPOINT_PG_MODE", mode.into()),
        ],
    );
    s.config(
        "q",
        &format!(
            "snapshotter = \"copy\"\n{}",
            member("pg-q", &addr, "primary", None, &[&pg.primary.data])
        )
        .replace("groups.g.", "groups.q."),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_for_two_seconds_blocks_writes_then_thaws() {
    let mut s = Setup::new();
    fenced_pg(&mut s, "cli_quiesce").await;
    let mut quiesce = spawn_stillpoint(&s, &["quiesce", "q", "--for", "2s"]);
    wait_frozen(&s);
    let started = Instant::now();
    let blocked = timed_insert(&shared::postgres().primary, "cli_quiesce")
        .await
        .unwrap();
    let status = quiesce.wait().unwrap();
    assert!(status.success());
    assert!(
        blocked >= Duration::from_millis(1500),
        "writes were blocked for ~2 s, not {blocked:?}:\n{}",
        s.agents[0].logs()
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(!is_frozen(&s.agents[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesce_stops_postgres_writes_in_backup_mode_too_or_refuses() {
    let mut s = Setup::new();
    database(&shared::postgres().primary, "cli_backup_mode").await;
    pg_group(&mut s, "cli_backup_mode", "backup");
    let mut quiesce = spawn_stillpoint(&s, &["quiesce", "q", "--for", "2s"]);
    wait_frozen(&s);
    let blocked = timed_insert(&shared::postgres().primary, "cli_backup_mode")
        .await
        .unwrap();
    assert!(quiesce.wait().unwrap().success());
    assert!(
        blocked >= Duration::from_millis(1500),
        "a write went through a quiesce of PostgreSQL in backup mode after {blocked:?}:\n{}",
        s.agents[0].logs()
    );
    assert!(!is_frozen(&s.agents[0]));

    // Nothing to fence: refused, with the setting to change, and nothing held.
    let mut s = Setup::new();
    fresh_database(&shared::postgres().primary, "cli_no_tables", "SELECT 1").await;
    pg_group(&mut s, "cli_no_tables", "backup");
    let out = stillpoint(&s, &["quiesce", "q", "--for", "1s"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "quiesce must stop every write",
        "STILLPOINT_PG_FENCE_SCHEMAS",
        "nothing is left frozen",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!is_frozen(&s.agents[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_thaws_a_quiesce_at_once() {
    let mut s = Setup::new();
    fenced_pg(&mut s, "cli_interrupt").await;
    let mut quiesce = spawn_stillpoint(&s, &["quiesce", "pg-q"]);
    wait_frozen(&s);
    let insert = timed_insert(&shared::postgres().primary, "cli_interrupt");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let interrupted = Instant::now();
    signal(quiesce.id(), "INT");
    assert!(quiesce.wait().unwrap().success());
    insert.await.unwrap();
    assert!(
        interrupted.elapsed() < Duration::from_secs(1),
        "{:?}",
        interrupted.elapsed()
    );
    assert!(!is_frozen(&s.agents[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_thaw_and_backups_from_the_command_line() {
    let mut s = Setup::new();
    fenced_pg(&mut s, "cli_backup").await;
    let out = stillpoint(&s, &["status", "q"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pg-q") && text.contains("postgres") && text.contains("primary"),
        "{text}"
    );

    let out = stillpoint(&s, &["backup", "create", "q", "--id", "q-1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("freeze window"));
    let out = stillpoint(&s, &["-o", "json", "backup", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "q-1");
    assert_eq!(list[0]["outcome"], "succeeded");
    let out = stillpoint(&s, &["backup", "describe", "q-1", "--timeline"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("freeze window marked |") && text.contains("backup-label"),
        "{text}"
    );
    let out = stillpoint(&s, &["-o", "yaml", "backup", "describe", "q-1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("outcome: succeeded"));

    let snapshot = s.snapshots().join("q-1");
    assert!(snapshot.exists());
    let out = stillpoint(&s, &["backup", "delete", "q-1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !snapshot.join("pg-q-0").exists(),
        "snapshots go with the backup"
    );
    let out = stillpoint(&s, &["backup", "describe", "q-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backup 'q-1'"));

    // `thaw` breaks a hold whoever owns it.
    let mut quiesce = spawn_stillpoint(&s, &["quiesce", "q", "--ttl", "60s"]);
    wait_frozen(&s);
    let out = stillpoint(&s, &["thaw", "pg-q"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("thawed member pg-q"));
    assert!(!is_frozen(&s.agents[0]));
    signal(quiesce.id(), "INT");
    let _ = quiesce.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_clearly_and_freezes_nothing() {
    let mut s = Setup::new();
    fenced_pg(&mut s, "cli_bad").await;
    let fail = |args: &[&str], needle: &str| {
        let out = stillpoint(&s, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in:\n{stderr}"
        );
    };
    fail(&["backup", "create", "nope"], "no group 'nope'");
    fail(
        &["quiesce", "nobody", "--for", "1s"],
        "'nobody' is neither a group nor a member",
    );
    fail(
        &["thaw", "nobody"],
        "'nobody' is neither a group nor a member",
    );

    // An invalid config: each error names its field.
    let config = s.config_path();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("role = \"primary\"", "role = \"leader\""),
    )
    .unwrap();
    fail(&["config", "check"], "role");
    fail(&["backup", "create", "q"], "leader");
    std::fs::write(
        &config,
        good.replace("identity = \"spiffe:", "identity = \"nope:"),
    )
    .unwrap();
    fail(&["config", "check"], "groups.q.members[0].identity");

    // Missing certificates.
    std::fs::write(
        &config,
        good.replace("[tls]\ndir = \"", "[tls]\ndir = \"/nonexistent"),
    )
    .unwrap();
    fail(&["backup", "create", "q"], "certificates are not usable");

    // An unreachable catalog.
    std::fs::write(
        &config,
        good.lines()
            .map(|l| {
                if l.starts_with("catalog") {
                    "catalog = \"/proc/stillpoint-catalog\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    fail(&["backup", "create", "q"], "catalog");

    // An unreachable agent.
    let dead = format!("127.0.0.1:{}", free_port());
    let addr = s.agents[0].grpc_addr();
    std::fs::write(&config, good.replace(&addr, &dead)).unwrap();
    fail(&["backup", "create", "q"], "not reachable");
    fail(&["status"], "not reachable");
    std::fs::write(&config, &good).unwrap();
    assert!(stillpoint(&s, &["config", "check"]).status.success());
    assert!(!is_frozen(&s.agents[0]), "nothing was left frozen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_start_brings_the_servers_up_stage_by_stage() {
    use std::io::{BufRead, BufReader};
    let mut s = Setup::new();
    fenced_pg(&mut s, "cli_restore").await;
    timed_insert(&shared::postgres().primary, "cli_restore")
        .await
        .unwrap();
    let out = stillpoint(&s, &["backup", "create", "q", "--id", "q-r"]);
    assert!(out.status.success(), "{out:?}");
    let to = s.dir.path().join("restored");
    /// Interrupts the restore (stopping its servers) even if the test fails.
    struct Interrupt(std::process::Child);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            signal(self.0.id(), "INT");
            let _ = self.0.wait();
        }
    }
    let mut restore = Interrupt(spawn_stillpoint(
        &s,
        &["restore", "q-r", "--to", to.to_str().unwrap(), "--start"],
    ));
    let mut lines = BufReader::new(restore.0.stdout.take().unwrap()).lines();
    let mut address = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(a) = line.split("answering at ").nth(1) {
            address = Some(a.trim().to_string());
        }
        if line.contains("server(s) running") {
            break;
        }
    }
    let address = address.expect("the restored server's address");
    // Recovery used the label (and renamed it when done).
    assert!(
        to.join("pg-q/0/backup_label.old").exists(),
        "the copy restores with its label"
    );
    let port = address.rsplit(':').next().unwrap().trim_end_matches('/');
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=cli_restore"),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let n: i64 = c
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the acknowledged row is in the restored server");
    signal(restore.0.id(), "INT");
    assert!(restore.0.wait().unwrap().success());
    assert!(
        to.join("pg-q/0/PG_VERSION").exists(),
        "the restored files stay"
    );
}

/// `stillpoint demo|bench` run the lab program beside `stillpoint`, with
/// their own options; where it is missing, they say how to get it.
#[test]
fn demo_and_bench_are_the_lab_programs() {
    let bin = stillpoint_tests::harness::agent::controller_binary().unwrap();
    for (command, option) in [("demo", "--backups"), ("bench", "--pgbench-seconds")] {
        let out = std::process::Command::new(&bin)
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command} --help: {out:?}");
        assert!(
            help.contains(&format!("stillpoint-lab {command}")) && help.contains(option),
            "{command} --help is the lab's: {help}"
        );
    }
    // A `stillpoint` installed alone (as the controller image has it).
    let alone = tempfile::tempdir().unwrap();
    let copy = alone.path().join("stillpoint");
    std::fs::copy(&bin, &copy).unwrap();
    let out = std::process::Command::new(&copy)
        .arg("demo")
        .env("PATH", alone.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("stillpoint-lab") && err.contains("cargo build -p stillpoint-lab"),
        "{err}"
    );
}
