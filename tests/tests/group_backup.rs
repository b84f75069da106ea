//! The group backup protocol through the `stillpoint` orchestrator: real
//! agents over mTLS, the catalog, the freeze budget and the abort paths.

use std::path::Path;
use std::time::Duration;

use stillpoint_controller::local::catalog::{Consistency, Outcome};
use stillpoint_controller::local::config::Config;
use stillpoint_proto::position::parse_lsn;
use stillpoint_tests::harness::group::{Setup, is_frozen, member};
use stillpoint_tests::harness::pki::CONTROLLER_IDENTITY;
use stillpoint_tests::harness::postgres::fresh_database;
use stillpoint_tests::harness::shared;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_and_redis_group_is_cut_aligned_and_recorded() {
    let pg = shared::postgres();
    let mut s = Setup::new();
    let pg0 = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    let pg1 = s.agent(
        "pg-1",
        "postgres",
        &[("STILLPOINT_DSN", pg.replica.conninfo("postgres"))],
    );
    let redis_members = s.redis_pair_members("");
    let body = format!(
        "snapshotter = \"copy\"\nfreeze_budget = \"20s\"\n{}{}{redis_members}",
        member("pg-0", &pg0, "primary", None, &[&pg.primary.data]),
        member("pg-1", &pg1, "replica", Some("pg-0"), &[&pg.replica.data]),
    );
    let config = s.config("g", &body);
    let orchestrator = s.orchestrator(&config);
    let manifest = orchestrator
        .backup(config.group("g").unwrap(), "g-1")
        .await
        .unwrap();

    assert_eq!(manifest.outcome, Outcome::Succeeded);
    let window = manifest
        .freeze_window_us
        .expect("the freeze window is measured");
    assert!(window > 0);
    let get = |n: &str| {
        manifest
            .members
            .iter()
            .find(|m| m.name == n)
            .unwrap()
            .clone()
    };
    let (p0, p1, q0, q1) = (get("pg-0"), get("pg-1"), get("redis-0"), get("redis-1"));
    // Replicas were aligned to their primary's frozen position, then frozen at or past it.
    assert_eq!(p1.aligned_to, p0.position);
    assert_eq!(q1.aligned_to, q0.position);
    let lsn = |s: &Option<String>| parse_lsn(s.as_deref().unwrap()).unwrap();
    assert!(lsn(&p1.position) >= lsn(&p0.position));
    // The copy of a PostgreSQL member in backup mode restores with its label.
    assert_eq!(p0.consistency, Some(Consistency::BackupLabel));
    assert!(p0.artefacts["backup_label"].contains("LABEL: stillpoint backup:g-1"));
    assert_eq!(q0.consistency, Some(Consistency::FrozenCopy));
    for m in &manifest.members {
        assert_eq!(m.snapshots.len(), 1, "{}", m.name);
        assert!(
            m.snapshots[0]
                .checksum
                .as_deref()
                .unwrap()
                .starts_with("sha256:")
        );
        assert!(Path::new(&m.snapshots[0].handle).is_dir());
        for phase in ["prepared", "freeze_requested", "frozen", "cut", "thawed"] {
            assert!(
                manifest.timeline.members[&m.name].contains_key(phase),
                "{} {phase}",
                m.name
            );
        }
    }
    // A member whose freeze blocks its writes (Redis) flushed in its
    // freeze's round trip, asked as its freeze was acknowledged; PostgreSQL
    // in backup mode, whose writes flow, only once every member was frozen.
    let marks = &manifest.timeline.members;
    let last_frozen = marks.values().map(|p| p["frozen"]).max().unwrap();
    for name in ["redis-0", "redis-1"] {
        assert_eq!(
            marks[name]["flush_requested"], marks[name]["frozen"],
            "{name}: {:?}",
            marks[name]
        );
    }
    assert!(marks["pg-0"]["flush_requested"] >= last_frozen, "{marks:?}");
    assert!(p0.flush.is_some() && q0.flush.is_some() && q1.flush.is_some());
    // The backup stop's WAL is in the copy.
    let wal = Path::new(&p0.snapshots[0].handle).join("pg_wal");
    assert!(std::fs::read_dir(wal).unwrap().count() > 1);
    // Recorded, and nothing is left frozen.
    assert_eq!(orchestrator.catalog.get("g-1").unwrap(), manifest);
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
    let _ = std::fs::remove_dir_all(s.snapshots());
}

/// The slots of PostgreSQL backup sessions whose backup id contains `tag`.
async fn slots_of(client: &tokio_postgres::Client, tag: &str) -> Vec<String> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE slot_name::text LIKE 'stillpoint%' AND strpos(slot_name::text, $1) > 0",
            &[&tag],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// A backup on a copy keeps its PostgreSQL member's backup session (and
/// the temporary slot that holds the WAL up to the backup stop) only until
/// the backup is over, not for the agent's whole retention (300 s): a slot
/// per backup kept that long used up `max_replication_slots` once backups
/// came more often, and every later backup failed in prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_on_a_copy_release_postgresqls_wal_slot_when_over_and_never_run_out_of_slots() {
    let pg = shared::postgres();
    let (admin, connection) =
        tokio_postgres::connect(&pg.primary.conninfo("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let max: String = admin
        .query_one("SHOW max_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    let mut s = Setup::new();
    let pg0 = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    let body = format!(
        "snapshotter = \"copy\"\nfreeze_budget = \"20s\"\n{}",
        member("pg-0", &pg0, "primary", None, &[&pg.primary.data]),
    );
    let config = s.config("g", &body);
    let orchestrator = s.orchestrator(&config);
    // More backups than there are slots.
    for i in 0..max.parse::<usize>().unwrap() + 2 {
        let id = format!("walslot-{i}");
        let manifest = orchestrator.backup(config.group("g").unwrap(), &id).await;
        let manifest = manifest.unwrap_or_else(|e| panic!("backup {i}: {}", e.cause));
        assert_eq!(manifest.outcome, Outcome::Succeeded);
        // Its WAL is in the copy; its slot goes with the backup session.
        let handle = &manifest.members[0].snapshots[0].handle;
        assert!(
            std::fs::read_dir(Path::new(handle).join("pg_wal"))
                .unwrap()
                .count()
                > 1
        );
        let tag = format!("walslot_{i}_");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !slots_of(&admin, &tag).await.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "backup {i}'s slot is still kept: {:?}",
                slots_of(&admin, &tag).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_dir_all(handle);
    }
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
    let _ = std::fs::remove_dir_all(s.snapshots());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn innodb_on_the_copy_snapshotter_is_refused_before_anything_freezes() {
    let maria = shared::mariadb();
    let mut s = Setup::new();
    let url = format!("mysql://root@127.0.0.1:{}/", maria.primary.port);
    let m0 = s.agent("maria-0", "mariadb", &[("STILLPOINT_DSN", url)]);
    let body = format!(
        "snapshotter = \"copy\"\n{}",
        member("maria-0", &m0, "primary", None, &[&maria.primary.data])
    );
    let config = s.config("g", &body);
    let err = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-innodb")
        .await
        .unwrap_err();
    assert!(
        err.cause
            .contains("cannot be cut by a snapshot that is not atomic"),
        "{}",
        err.cause
    );
    // The fix, in local mode's words.
    for needle in [
        "`fsfreeze = true` for member maria-0",
        "STILLPOINT_FSFREEZE_MOUNTS",
        "btrfs, exec",
    ] {
        assert!(err.cause.contains(needle), "{needle}: {}", err.cause);
    }
    assert!(!err.cause.contains("annotate"), "{}", err.cause);
    assert_eq!(err.manifest.outcome, Outcome::Failed);
    assert!(
        s.agents[0].logs().find("freeze requested").is_none(),
        "nothing was frozen"
    );
}

fn noop_group(s: &mut Setup, members: &[(&str, &[(&str, String)])], extra: &str) -> Config {
    let volume = s.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("data"), b"x").unwrap();
    let mut body = format!("snapshotter = \"copy\"\n{extra}\n");
    for (name, env) in members {
        let addr = s.agent(name, "noop", env);
        body.push_str(&member(name, &addr, "primary", None, &[&volume]));
    }
    s.config("g", &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_fails_the_backup_at_resolve() {
    let mut s = Setup::new();
    let mut config = noop_group(&mut s, &[("n-0", &[])], "");
    let dead = format!("127.0.0.1:{}", stillpoint_tests::harness::free_port());
    let mut ghost = config.groups["g"].members[0].clone();
    ghost.name = "n-ghost".into();
    ghost.agent = dead.clone();
    config.groups.get_mut("g").unwrap().members.push(ghost);
    let err = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-unreachable")
        .await
        .unwrap_err();
    assert!(err.cause.starts_with("resolve:"), "{}", err.cause);
    assert!(
        err.cause.contains("n-ghost is not reachable"),
        "{}",
        err.cause
    );
    assert!(!is_frozen(&s.agents[0]));
    assert!(!s.snapshots().join("g-unreachable").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_over_budget_aborts_and_thaws_everyone() {
    let mut s = Setup::new();
    let slow = [("STILLPOINT_NOOP_FREEZE_LATENCY", "1500ms".to_string())];
    let config = noop_group(
        &mut s,
        &[("n-fast", &[]), ("n-slow", &slow)],
        "freeze_budget = \"500ms\"",
    );
    let orchestrator = s.orchestrator(&config);
    let err = orchestrator
        .backup(config.group("g").unwrap(), "g-budget")
        .await
        .unwrap_err();
    assert!(err.cause.contains("n-slow"), "{}", err.cause);
    assert!(err.cause.contains("budget"), "{}", err.cause);
    let recorded = orchestrator.catalog.get("g-budget").unwrap();
    assert_eq!(recorded.outcome, Outcome::Failed);
    assert!(recorded.error.unwrap().contains("budget"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(s.agents.iter().all(|a| !is_frozen(a)), "everything thawed");
    assert!(!s.snapshots().join("g-budget").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_snapshotter_aborts_and_deletes_what_was_made() {
    let mut s = Setup::new();
    let marker = s.dir.path().join("made");
    let extra = format!(
        "snapshotter = \"exec\"\n[groups.g.exec]\nsnapshot = \"touch {m}-{{member}}; test {{member}} != n-1\"\ndelete = \"rm -f {m}-{{member}}\"",
        m = marker.display()
    );
    let members = s.noop_members(&["n-0", "n-1"]);
    let config = s.config("g", &format!("{extra}\n{members}"));
    let err = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-snap")
        .await
        .unwrap_err();
    assert!(err.cause.contains("exec snapshotter"), "{}", err.cause);
    assert!(
        !Path::new(&format!("{}-n-0", marker.display())).exists(),
        "the partial snapshot was deleted"
    );
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
}

/// A member whose lease ran out during a slow cut (its agent stalled, so
/// no renewal reached it) was not held for the whole cut: the backup fails
/// and says why, even though the agent's thaw itself reports no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expired_during_the_cut_fails_the_backup() {
    let mut s = Setup::new();
    let volume = s.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let a = s.agent("n-0", "noop", &[]);
    let pid = s.agents[0].pid();
    let config = s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\nlease_ttl = \"1s\"\nfreeze_budget = \"20s\"\n[groups.g.exec]\n\
             snapshot = \"kill -STOP {pid}; sleep 2; kill -CONT {pid}; sleep 1\"\ndelete = \"true\"\n{}",
            member("n-0", &a, "primary", None, &[&volume])
        ),
    );
    let err = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-stalled")
        .await
        .unwrap_err();
    assert!(err.cause.contains("lease expired"), "{}", err.cause);
    assert_eq!(err.manifest.outcome, Outcome::Failed);
    assert!(!is_frozen(&s.agents[0]));
}

/// PostgreSQL in backup mode keeps writing while frozen: its replica is cut
/// first, so the replica in the backup is never ahead of its primary, even
/// with a snapshotter that is atomic per volume (each volume is still cut at
/// its own instant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_primary_is_cut_after_its_replica() {
    let pg = shared::postgres();
    let mut s = Setup::new();
    let order = s.dir.path().join("order");
    let pg0 = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    let pg1 = s.agent(
        "pg-1",
        "postgres",
        &[("STILLPOINT_DSN", pg.replica.conninfo("postgres"))],
    );
    let config = s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\n[groups.g.exec]\nsnapshot = \"echo {{member}} >> {o}\"\ndelete = \"true\"\n{}{}",
            member("pg-0", &pg0, "primary", None, &[&pg.primary.data]),
            member("pg-1", &pg1, "replica", Some("pg-0"), &[&pg.replica.data]),
            o = order.display()
        ),
    );
    let manifest = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-order")
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "pg-1\npg-0\n");
    let cut = |m: &str| manifest.timeline.members[m]["cut"];
    assert!(cut("pg-1") < cut("pg-0"), "{:?}", manifest.timeline);
}

/// The freeze budget runs out during the cut: the snapshot already made is
/// in the manifest while the cut goes on, and the abort deletes it (with
/// the whole backup id in `{backup}`); the command still cutting is ended
/// with its whole process group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_cut_before_an_abort_are_recorded_at_once_and_deleted() {
    let mut s = Setup::new();
    let dir = s.dir.path().join("lvm");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let extra = format!(
        "snapshotter = \"exec\"\nfreeze_budget = \"3s\"\n[groups.g.exec]\n\
         snapshot = \"case {{member}} in slow) sleep 60 & echo $! > {d}/sleep.pid; wait;; \
         *) touch {d}/{{snapshot}};; esac\"\n\
         delete = \"rm {d}/{{snapshot}} && echo {{backup}} >> {d}/deleted\"\n"
    );
    let members = s.noop_members(&["fast", "slow"]);
    let config = s.config("g", &format!("{extra}{members}"));
    let id = "g-orphan-20261124-101500-001";
    let orchestrator = s.orchestrator(&config);
    let group = config.group("g").unwrap().clone();
    let backup = tokio::spawn(async move { orchestrator.backup(&group, id).await });
    // While the slow volume is still being cut, the manifest already lists
    // the fast one's snapshot.
    let made = dir.join(format!("{id}-fast-0"));
    let catalog =
        stillpoint_controller::local::catalog::Catalog::open(&s.dir.path().join("catalog"))
            .unwrap();
    stillpoint_tests::harness::wait_for(
        "the fast snapshot in the manifest",
        Duration::from_secs(2),
        || {
            let listed = catalog.get(id).ok().is_some_and(|m| {
                m.members.iter().any(|r| {
                    r.name == "fast" && r.snapshots.iter().any(|h| h.handle.ends_with("fast-0"))
                })
            });
            Ok(made.exists() && listed)
        },
    )
    .unwrap();
    let err = backup.await.unwrap().unwrap_err();
    assert!(err.cause.contains("freeze budget"), "{}", err.cause);
    assert!(
        !made.exists(),
        "the snapshot made before the abort was deleted"
    );
    let deleted = std::fs::read_to_string(dir.join("deleted")).unwrap();
    assert_eq!(deleted.trim(), id, "{{backup}} is the whole backup id");
    let sleeper: u32 = std::fs::read_to_string(dir.join("sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    stillpoint_tests::harness::wait_for(
        "the cut's process group ended",
        Duration::from_secs(2),
        || Ok(!stillpoint_tests::harness::pid_alive(sleeper)),
    )
    .unwrap();
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
}

/// The catalog cannot record a successful backup: it is failed (in the
/// metrics too) and its snapshots are deleted, never left without a manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_cannot_be_written_fails_the_backup_and_deletes_its_snapshots() {
    let mut s = Setup::new();
    let dir = s.dir.path().join("lvm");
    std::fs::create_dir_all(&dir).unwrap();
    let catalog = s.dir.path().join("catalog");
    let id = "g-nomanifest";
    // The cut puts a directory where the manifest goes, so its last write fails.
    let extra = format!(
        "snapshotter = \"exec\"\n[groups.g.exec]\n\
         snapshot = \"touch {d}/{{snapshot}}; rm -f {c}/{{backup}}.json; mkdir -p {c}/{{backup}}.json\"\n\
         delete = \"rm {d}/{{snapshot}}\"\n",
        d = dir.display(),
        c = catalog.display()
    );
    let volume = s.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let a = s.agent("n-0", "noop", &[]);
    s.config(
        "g",
        &format!("{extra}{}", member("n-0", &a, "primary", None, &[&volume])),
    );
    let metrics = s.dir.path().join("backup.prom");
    let out = s.stillpoint(&[
        "--metrics-file",
        metrics.to_str().unwrap(),
        "backup",
        "create",
        "g",
        "--id",
        id,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("manifest could not be written"), "{stderr}");
    assert!(
        !dir.join(format!("{id}-n-0-0")).exists(),
        "its snapshot was deleted"
    );
    let exposition = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        exposition.contains("stillpoint_backups_total{group=\"g\",result=\"failed\"} 1"),
        "{exposition}"
    );
    assert!(!exposition.contains("result=\"succeeded\""), "{exposition}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_primary_is_not_in_the_group_is_refused_by_the_config() {
    let s = Setup::new();
    s.pki.issue("controller", CONTROLLER_IDENTITY).unwrap();
    let text = format!(
        "catalog = \"c\"\n[tls]\ndir = \"t\"\n[groups.g]\nsnapshot_dir = \"/s\"\n{}",
        member(
            "r",
            "127.0.0.1:1",
            "replica",
            Some("elsewhere"),
            &[Path::new("/v")]
        )
    );
    let err = Config::parse(Path::new("x.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("groups.g.members[0].primary: 'elsewhere' is not a member of group g"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_database_killed_mid_freeze_aborts_the_backup() {
    let redis = tokio::task::spawn_blocking(stillpoint_tests::harness::redis::RedisPair::start)
        .await
        .unwrap()
        .unwrap();
    let mut s = Setup::new();
    let volume = s.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let r0 = s.agent(
        "redis-0",
        "redis",
        &[
            ("STILLPOINT_DSN", redis.primary.url()),
            ("STILLPOINT_HOLD_CHECK_INTERVAL", "100ms".into()),
        ],
    );
    let n0 = s.agent("n-0", "noop", &[]);
    // A slow cut, so the database dies while the group is frozen.
    let config = s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\nfreeze_budget = \"20s\"\n[groups.g.exec]\nsnapshot = \"sleep 2\"\ndelete = \"true\"\n{}{}",
            member("redis-0", &r0, "primary", None, &[&redis.primary.dir]),
            member("n-0", &n0, "primary", None, &[&volume])
        ),
    );
    let orchestrator = s.orchestrator(&config);
    let group = config.group("g").unwrap().clone();
    let backup = tokio::spawn(async move { orchestrator.backup(&group, "g-dbkill").await });
    stillpoint_tests::harness::wait_for("frozen", Duration::from_secs(10), || {
        Ok(is_frozen(&s.agents[1]))
    })
    .unwrap();
    let pid = redis.primary.pid().unwrap();
    stillpoint_tests::harness::kill_and_wait(pid);
    let err = backup.await.unwrap().unwrap_err();
    // Killed while frozen: the hold is lost (before the cut, or during the
    // flush, which then fails).
    assert!(
        err.cause.contains("redis-0 lost its hold")
            || err.cause.contains("redis-0 (redis): flush failed"),
        "{}",
        err.cause
    );
    assert_eq!(err.manifest.outcome, Outcome::Failed);
    assert!(!is_frozen(&s.agents[1]), "the other members were thawed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_controller_leaves_the_leases_to_thaw_everything() {
    let pg = shared::postgres();
    let db = fresh_database(&pg.primary, "ctl_kill", "CREATE TABLE t (id int)").await;

    let mut s = Setup::new();
    let a = s.agent(
        "pg-k",
        "postgres",
        &[
            ("STILLPOINT_DSN", pg.primary.conninfo("ctl_kill")),
            ("STILLPOINT_PG_MODE", "fence".into()),
        ],
    );
    let ttl = Duration::from_secs(2);
    s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\nfreeze_budget = \"60s\"\nlease_ttl = \"2s\"\n[groups.g.exec]\nsnapshot = \"sleep 10\"\ndelete = \"true\"\n{}",
            member("pg-k", &a, "primary", None, &[&pg.primary.data])
        ),
    );
    let mut controller =
        std::process::Command::new(stillpoint_tests::harness::agent::controller_binary().unwrap())
            .arg("--config")
            .arg(s.config_path())
            .args(["backup", "create", "g", "--id", "g-ctlkill"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    stillpoint_tests::harness::wait_for("frozen", Duration::from_secs(15), || {
        Ok(is_frozen(&s.agents[0]))
    })
    .unwrap();
    controller.kill().unwrap();
    let killed = std::time::Instant::now();
    let _ = controller.wait();
    // An external write probe: it goes through once the lease has thawed the fence.
    db.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    assert!(
        killed.elapsed() < ttl + Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    // (The backup stop may still be finishing right after the fence lifts.)
    stillpoint_tests::harness::wait_for("thawed", Duration::from_secs(1), || {
        Ok(!is_frozen(&s.agents[0]))
    })
    .unwrap();
    let manifest =
        stillpoint_controller::local::catalog::Catalog::open(&s.dir.path().join("catalog"))
            .unwrap()
            .get("g-ctlkill")
            .unwrap();
    assert_eq!(
        manifest.outcome,
        Outcome::Running,
        "never reads as complete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_copy_in_backup_mode_restores_with_its_label_and_keeps_acknowledged_rows() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    let pg = shared::postgres();
    let conninfo = pg.primary.conninfo("restore_copy");
    let db = fresh_database(
        &pg.primary,
        "restore_copy",
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    .await;
    let acked = Arc::new(AtomicI64::new(0));
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            for id in 1..i32::MAX {
                if db
                    .execute("INSERT INTO t VALUES ($1)", &[&id])
                    .await
                    .is_err()
                {
                    return;
                }
                acked.store(i64::from(id), Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut s = Setup::new();
    let a = s.agent("pg-r", "postgres", &[("STILLPOINT_DSN", conninfo.clone())]);
    let config = s.config(
        "g",
        &format!(
            "snapshotter = \"copy\"\nfreeze_budget = \"30s\"\n{}",
            member("pg-r", &a, "primary", None, &[&pg.primary.data])
        ),
    );
    let before = acked.load(Ordering::SeqCst);
    let manifest = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-restore")
        .await
        .unwrap();
    writer.abort();
    let restored_to = s.dir.path().join("restored");
    let restored =
        stillpoint_controller::local::restore::restore_files(&manifest, &restored_to).unwrap();
    assert_eq!(restored.len(), 1);
    let data = &restored[0].path;
    assert!(
        data.join("backup_label").exists(),
        "the backup-label method writes the label"
    );

    let server = stillpoint_tests::harness::postgres::PgRestored::new().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(data)
        .arg(server.data_dir())
        .status()
        .unwrap();
    assert!(copied.success());
    server.start().unwrap();
    let (r, conn) = tokio_postgres::connect(
        &server.server.conninfo("restore_copy"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let present: i64 = r
        .query_one("SELECT count(*) FROM t WHERE id <= $1", &[&(before as i32)])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        present, before,
        "every row acknowledged before the backup is restored"
    );
    let log = std::fs::read_to_string(&server.server.log).unwrap();
    assert!(log.contains("starting backup recovery"), "{log}");
    let _ = std::fs::remove_dir_all(s.snapshots());
}

/// The loop device an image is attached to (`losetup -j`).
fn loop_device_of(image: &Path) -> std::path::PathBuf {
    let out = std::process::Command::new("losetup")
        .arg("-j")
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let device = text
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(device.starts_with("/dev/loop"), "losetup -j: {text}");
    device.into()
}

/// A member's volume named as a block storage user names it: the
/// filesystem image, the loop device it is attached to, or the mount
/// point. The agent resolves each to where it is mounted, so the coverage
/// check passes, and the exec snapshotter cuts the image (a block-level
/// copy) whatever the volume is called. An image mounted nowhere covers
/// nothing, and the refusal says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_may_be_devices_images_or_mount_points() {
    use stillpoint_lab::servers::Setup as Layout;
    use stillpoint_lab::servers::loopfs::LoopMount;
    use stillpoint_lab::servers::postgres::PgPair;
    let pg = tokio::task::spawn_blocking(|| {
        PgPair::start_with(&Layout {
            block: true,
            ..Layout::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let mount = pg.volume_of(&pg.primary.data);
    let image = std::path::PathBuf::from(format!("{}.img", mount.display()));
    let device = loop_device_of(&image);
    let snapshots = tempfile::tempdir().unwrap();
    let snapdir = snapshots.path().display().to_string();
    for (what, volume, source) in [
        ("image", image.clone(), "{volume}".to_string()),
        (
            "device",
            device.clone(),
            "$(losetup -nO BACK-FILE {volume})".to_string(),
        ),
        ("mount", mount.clone(), "{volume}.img".to_string()),
    ] {
        let mut s = Setup::new();
        let addr = s.agent(
            "pg-0",
            "postgres",
            &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
        );
        let body = format!(
            "snapshotter = \"exec\"\n[groups.g.exec]\nsnapshot = \"cp --reflink=auto {source} {snapdir}/{{snapshot}}.img\"\n\
             delete = \"rm -f {snapdir}/{{snapshot}}.img\"\n{}",
            member("pg-0", &addr, "primary", None, &[&volume])
        );
        let config = s.config("g", &body);
        let id = format!("blk-{what}");
        let manifest = s
            .orchestrator(&config)
            .backup(config.group("g").unwrap(), &id)
            .await
            .unwrap_or_else(|e| panic!("{what}: {}", e.cause));
        assert_eq!(manifest.outcome, Outcome::Succeeded, "{what}");
        // The cut is a copy of the device: it holds the data directory.
        let handle = &manifest.members[0].snapshots[0].handle;
        let cut = snapshots.path().join(format!("{handle}.img"));
        let copy = snapshots.path().join(format!("{handle}-copy.img"));
        std::fs::copy(&cut, &copy).unwrap();
        let opened =
            LoopMount::image(&copy, &snapshots.path().join(format!("{handle}-m"))).unwrap();
        assert!(
            opened.path().join("data/PG_VERSION").exists(),
            "{what}: the cut holds the data directory"
        );
        drop(opened);
    }

    // An image attached nowhere covers nothing.
    let stray = snapshots.path().join("stray.img");
    std::fs::File::create(&stray)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut s = Setup::new();
    let addr = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    let body = format!(
        "snapshotter = \"exec\"\n[groups.g.exec]\nsnapshot = \"true\"\ndelete = \"true\"\n{}",
        member("pg-0", &addr, "primary", None, &[&stray])
    );
    let config = s.config("g", &body);
    let err = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "blk-stray")
        .await
        .unwrap_err();
    for needle in ["data_directory", "stray.img", "mounted nowhere"] {
        assert!(err.cause.contains(needle), "{needle}: {}", err.cause);
    }
    assert!(s.agents[0].logs().find("freeze requested").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_answering_fails_the_backup_within_the_rpc_timeout() {
    let mut s = Setup::new();
    // A server that stopped answering its agent: describe never returns.
    let stalled = [("STILLPOINT_NOOP_DESCRIBE_LATENCY", "1h".to_string())];
    let config = noop_group(
        &mut s,
        &[("n-0", &[]), ("n-stalled", &stalled)],
        "rpc_timeout = \"2s\"",
    );
    let orchestrator = s.orchestrator(&config);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        orchestrator.backup(config.group("g").unwrap(), "g-stalled"),
    )
    .await;
    let waited = started.elapsed();
    let err = outcome
        .expect("the backup ends instead of hanging")
        .unwrap_err();
    assert!(
        err.cause.contains("n-stalled") && err.cause.contains("no answer to describe within 2s"),
        "{}",
        err.cause
    );
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert!(s.agents.iter().all(|a| !is_frozen(a)), "nothing froze");
    // Bounds over their maximum are refused by the configuration.
    let volume = s.dir.path().join("volume");
    let problems = s
        .config_result(
            "g",
            &format!(
                "snapshotter = \"copy\"\nrpc_timeout = \"1h\"\nconnect_timeout = \"2m\"\n{}",
                member("n-0", "127.0.0.1:1", "primary", None, &[&volume]),
            ),
        )
        .unwrap_err();
    assert!(
        problems.contains("groups.g.rpc_timeout 1h is outside its range")
            && problems.contains("groups.g.connect_timeout 2m is outside its range"),
        "{problems}"
    );
}
