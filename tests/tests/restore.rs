//! Restores that never need, read or touch the source, and groups that are
//! only protectable when their volumes hold everything recovery needs.
//!
//! The servers here keep their logs apart from their data (PostgreSQL's
//! `pg_wal` a link to a directory of its own, MariaDB's binlog in one), as
//! operators do with separate disks; every directory is a btrfs subvolume.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use stillpoint_controller::local::catalog::{Catalog, Manifest, Outcome};
use stillpoint_lab::servers::Setup as Layout;
use stillpoint_lab::servers::loopfs::LoopMount;
use stillpoint_lab::servers::mariadb::{MariaPair, MariaRestored};
use stillpoint_lab::servers::postgres::PgPair;
use stillpoint_lab::servers::redis::{Persistence, RedisPair};
use stillpoint_tests::harness::group::{Setup, member};
use stillpoint_tests::harness::postgres::fresh_database;
use stillpoint_tests::harness::{shared, signal};

/// Real servers on a btrfs mount, logs apart.
struct Lab {
    pg: PgPair,
    maria: MariaPair,
    redis: RedisPair,
    s: Setup,
    /// Last: unmounted after the servers are gone.
    mount: LoopMount,
}

impl Lab {
    async fn start() -> Lab {
        let mount = tokio::task::spawn_blocking(|| LoopMount::btrfs(2048))
            .await
            .unwrap()
            .unwrap();
        let base = mount.path().to_path_buf();
        let (b1, b2, b3) = (base.clone(), base.clone(), base.clone());
        fn layout(base: &Path) -> Layout<'_> {
            Layout {
                base: Some(base),
                logs_apart: true,
                ..Layout::default()
            }
        }
        let pg = tokio::task::spawn_blocking(move || PgPair::start_with(&layout(&b1)));
        let maria = tokio::task::spawn_blocking(move || MariaPair::start_with(&layout(&b2)));
        let redis = tokio::task::spawn_blocking(move || {
            RedisPair::start_with(&layout(&b3), Persistence::Aof)
        });
        Lab {
            pg: pg.await.unwrap().unwrap(),
            maria: maria.await.unwrap().unwrap(),
            redis: redis.await.unwrap().unwrap(),
            s: Setup::new(),
            mount,
        }
    }

    fn wal_dir(&self) -> PathBuf {
        std::fs::read_link(self.pg.primary.data.join("pg_wal")).unwrap()
    }

    fn binlog_dir(&self) -> PathBuf {
        let basename = self.maria.primary.log_bin.clone().unwrap();
        basename.parent().unwrap().to_path_buf()
    }

    fn snapshots(&self) -> PathBuf {
        self.mount.path().join("snapshots")
    }

    /// Agents for the PostgreSQL, MariaDB and Redis primaries; returns
    /// their addresses.
    fn agents(&mut self) -> (String, String, String) {
        let pg = self.s.agent(
            "pg-0",
            "postgres",
            &[("STILLPOINT_DSN", self.pg.primary.conninfo("postgres"))],
        );
        let maria = self.s.agent(
            "maria-0",
            "mariadb",
            &[(
                "STILLPOINT_DSN",
                format!("mysql://root@127.0.0.1:{}/", self.maria.primary.port),
            )],
        );
        let redis = self.s.agent(
            "redis-0",
            "redis",
            &[("STILLPOINT_DSN", self.redis.primary.url())],
        );
        (pg, maria, redis)
    }

    fn manifest(&self, id: &str) -> Manifest {
        Catalog::open(&self.s.dir.path().join("catalog"))
            .unwrap()
            .get(id)
            .unwrap()
    }
}

/// One lab at a time: each is six real servers.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    shared::server_wide_freeze().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_outside_a_members_volumes_are_refused_before_anything_freezes_unless_accepted() {
    let _serial = serial().await;
    let mut lab = Lab::start().await;
    let (pg, maria, _) = lab.agents();
    let (wal, binlog) = (lab.wal_dir(), lab.binlog_dir());
    let members = |extra_pg: &str, extra_maria: &str| {
        format!(
            "{}{extra_pg}{}{extra_maria}",
            member("pg-0", &pg, "primary", None, &[&lab.pg.primary.data]),
            member(
                "maria-0",
                &maria,
                "primary",
                None,
                &[&lab.maria.primary.data]
            ),
        )
    };
    lab.s.config_in("g", &lab.snapshots(), &members("", ""));
    let out = lab
        .s
        .stillpoint(&["backup", "create", "g", "--id", "g-refused"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for needle in [
        format!("pg_wal {}", wal.display()),
        format!("log_bin_basename {}", binlog.join("binlog").display()),
        "accept_uncovered".to_string(),
    ] {
        assert!(stderr.contains(&needle), "{needle} missing from: {stderr}");
    }
    let refused = lab.manifest("g-refused");
    assert_eq!(refused.outcome, Outcome::Failed);
    assert!(refused.error.unwrap().starts_with("resolve:"));
    assert!(
        refused
            .timeline
            .members
            .values()
            .all(|phases| !phases.contains_key("freeze_requested")),
        "nothing froze: {:?}",
        refused.timeline
    );

    // Accepted gaps go through, with a warning in the manifest.
    let accept = |path: &Path| format!("accept_uncovered = [\"{}\"]\n", path.display());
    lab.s.config_in(
        "g",
        &lab.snapshots(),
        &members(&accept(&wal), &accept(&binlog)),
    );
    let out = lab
        .s
        .stillpoint(&["backup", "create", "g", "--id", "g-accepted"]);
    assert!(out.status.success(), "{out:?}");
    let accepted = lab.manifest("g-accepted");
    assert_eq!(accepted.outcome, Outcome::Succeeded);
    for path in [&wal, &binlog] {
        assert!(
            accepted
                .warnings
                .iter()
                .any(|w| w.contains(&path.display().to_string()) && w.contains("accept_uncovered")),
            "{path:?}: {:?}",
            accepted.warnings
        );
    }
}

/// Reads `stillpoint restore --start` output until its servers run;
/// returns each member's address.
fn started(child: &mut std::process::Child) -> Vec<(String, String)> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lines = Vec::new();
    let mut addresses = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "restore --start did not get its servers running:\n{}",
                lines.join("\n")
            )
        });
        if let Some((_, rest)) = line.split_once("): ")
            && let Some((member, address)) = rest.split_once(" started and answering at ")
        {
            let name = member.split_whitespace().next().unwrap().to_string();
            addresses.push((name, address.to_string()));
        }
        let done = line.contains("server(s) running");
        lines.push(line);
        if done {
            return addresses;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_restores_and_starts_after_its_source_is_deleted() {
    let _serial = serial().await;
    let mut lab = Lab::start().await;
    let (pg, maria, redis) = lab.agents();
    let db = fresh_database(&lab.pg.primary, "disaster", "CREATE TABLE t (id int)").await;
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    lab.maria
        .primary
        .sql(
            "CREATE DATABASE disaster; CREATE TABLE disaster.t (id INT PRIMARY KEY) ENGINE=InnoDB; \
             INSERT INTO disaster.t VALUES (1), (2), (3)",
        )
        .unwrap();
    lab.redis
        .primary
        .cli(&["set", "disaster:key", "kept"])
        .unwrap();
    let body = format!(
        "{}{}{}",
        member(
            "pg-0",
            &pg,
            "primary",
            None,
            &[&lab.pg.primary.data, &lab.wal_dir()]
        ),
        member(
            "maria-0",
            &maria,
            "primary",
            None,
            &[&lab.maria.primary.data, &lab.binlog_dir()]
        ),
        member(
            "redis-0",
            &redis,
            "primary",
            None,
            &[&lab.redis.primary.dir]
        ),
    );
    lab.s.config_in("g", &lab.snapshots(), &body);
    let out = lab
        .s
        .stillpoint(&["backup", "create", "g", "--id", "g-disaster"]);
    assert!(out.status.success(), "{out:?}");
    let sources = [
        lab.pg.dir().to_path_buf(),
        lab.maria.dir().to_path_buf(),
        lab.redis.dir().to_path_buf(),
    ];

    // The disaster: every source server stopped and its files deleted.
    drop(db);
    for agent in lab.s.agents.drain(..) {
        drop(agent);
    }
    lab.pg.teardown();
    lab.maria.teardown();
    lab.redis.teardown();
    for dir in &sources {
        assert!(!dir.exists(), "{} was deleted", dir.display());
    }

    let to = lab.mount.path().join("restored");
    let mut restore = lab
        .s
        .command(&[
            "restore",
            "g-disaster",
            "--to",
            to.to_str().unwrap(),
            "--start",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addresses = started(&mut restore);
    let address = |name: &str| {
        addresses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("{name} not started: {addresses:?}"))
    };
    let (pgc, conn) = tokio_postgres::connect(
        &format!("{}disaster", address("pg-0")),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let rows: i64 = pgc
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    let mut mc = mysql_async::Conn::from_url(format!(
        "mysql://root@{}disaster",
        address("maria-0").trim_start_matches("mysql://")
    ))
    .await
    .unwrap();
    let ids: Vec<i32> = mc.query("SELECT id FROM t ORDER BY id").await.unwrap();
    mc.disconnect().await.unwrap();
    let mut rc = redis::Client::open(address("redis-0"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let kept: Option<String> = redis::cmd("GET")
        .arg("disaster:key")
        .query_async(&mut rc)
        .await
        .unwrap();
    signal(restore.id(), "INT");
    let _ = restore.wait();

    assert_eq!(rows, 100);
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(kept.as_deref(), Some("kept"));
    // What pointed at the source points into the restore.
    let pg_wal = std::fs::read_link(to.join("pg-0/0/pg_wal")).unwrap();
    assert_eq!(pg_wal, to.join("pg-0/1"));
    let index = std::fs::read_to_string(to.join("maria-0/1/binlog.index")).unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} / {:?}",
            std::fs::read_dir(to.join("maria-0/1"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            std::fs::read_dir(to.join("maria-0/0"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        )
    });
    assert!(
        index
            .lines()
            .all(|l| l.starts_with(&to.join("maria-0/1").display().to_string())),
        "{index}"
    );
}

/// Every file under `dir` that was opened while the watch ran.
struct OpenWatch {
    inotify: inotify::Inotify,
    dirs: Vec<PathBuf>,
}

impl OpenWatch {
    fn new(roots: &[&Path]) -> OpenWatch {
        let inotify = inotify::Inotify::init().unwrap();
        let mut dirs = Vec::new();
        let mut stack: Vec<PathBuf> = roots.iter().map(|r| r.to_path_buf()).collect();
        while let Some(dir) = stack.pop() {
            inotify
                .watches()
                .add(&dir, inotify::WatchMask::OPEN | inotify::WatchMask::ACCESS)
                .unwrap();
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                }
            }
            dirs.push(dir);
        }
        let mut watch = OpenWatch { inotify, dirs };
        // Setting up opened the directories: not what is watched for.
        watch.opened();
        watch
    }

    /// The names of the files opened or read since the watch began.
    fn opened(&mut self) -> BTreeSet<String> {
        let mut buffer = [0u8; 65536];
        let mut names = BTreeSet::new();
        loop {
            match self.inotify.read_events(&mut buffer) {
                Ok(events) => {
                    let mut any = false;
                    for e in events {
                        any = true;
                        names.insert(
                            e.name
                                .map(|n| n.to_string_lossy().to_string())
                                .unwrap_or_else(|| "(a watched directory)".into()),
                        );
                    }
                    if !any {
                        return names;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return names,
                Err(e) => panic!("reading inotify events: {e} (watching {:?})", self.dirs),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_mariadb_never_opens_a_file_of_the_source() {
    let _serial = serial().await;
    let mount = tokio::task::spawn_blocking(|| LoopMount::btrfs(1024))
        .await
        .unwrap()
        .unwrap();
    // The default layout: the binlog (and its index of absolute paths) in
    // the data directory.
    let base = mount.path().to_path_buf();
    let maria = tokio::task::spawn_blocking(move || MariaPair::start_in(Some(&base)))
        .await
        .unwrap()
        .unwrap();
    maria
        .primary
        .sql(
            "CREATE DATABASE untouched; CREATE TABLE untouched.t (id INT PRIMARY KEY) ENGINE=InnoDB; \
             INSERT INTO untouched.t VALUES (7)",
        )
        .unwrap();
    let mut s = Setup::new();
    let a = s.agent(
        "maria-0",
        "mariadb",
        &[(
            "STILLPOINT_DSN",
            format!("mysql://root@127.0.0.1:{}/", maria.primary.port),
        )],
    );
    let snapshots = mount.path().join("snapshots");
    let config = s.config_in(
        "g",
        &snapshots,
        &member("maria-0", &a, "primary", None, &[&maria.primary.data]),
    );
    let manifest = s
        .orchestrator(&config)
        .backup(config.group("g").unwrap(), "g-untouched")
        .await
        .unwrap();
    // The source stays where it is, stopped: whatever opens its files now
    // is the restored server.
    maria.primary.stop();
    maria.replica.stop();
    let mut watch = OpenWatch::new(&[&maria.primary.data]);
    let to = mount.path().join("restored");
    stillpoint_controller::local::restore::restore_files(&manifest, &to).unwrap();
    let record = &manifest.members[0];
    let restored = MariaRestored::at(
        stillpoint_controller::local::restore::restored_data_dir(record, &to).unwrap(),
    )
    .unwrap()
    .with_log_bin(stillpoint_controller::local::restore::restored_path(
        record,
        &to,
        "log_bin_basename",
    ));
    tokio::task::block_in_place(|| restored.start()).unwrap();
    let held = restored.server.sql("SELECT id FROM untouched.t").unwrap();
    drop(restored);
    let opened = watch.opened();
    assert_eq!(held, "7");
    assert!(
        opened.is_empty(),
        "the restored server opened files of the source: {opened:?}"
    );
    drop(maria);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_copy_snapshot_is_refused_before_anything_is_copied() {
    let pg = shared::postgres();
    let mut s = Setup::new();
    let p0 = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    let redis_members = {
        let _redis = shared::server_wide_freeze().await;
        s.redis_pair_members("")
    };
    s.config(
        "g",
        &format!(
            "snapshotter = \"copy\"\nfreeze_budget = \"20s\"\n{}{redis_members}",
            member("pg-0", &p0, "primary", None, &[&pg.primary.data]),
        ),
    );
    let out = {
        let _redis = shared::server_wide_freeze().await;
        s.stillpoint(&["backup", "create", "g", "--id", "g-tampered"])
    };
    assert!(out.status.success(), "{out:?}");
    // Stage 3 (Redis) is changed after the backup; stage 2 (PostgreSQL) comes first.
    let snapshot = s.snapshots().join("g-tampered/redis-1-0");
    std::fs::write(snapshot.join("dump.rdb"), b"not what was backed up").unwrap();
    let to = s.dir.path().join("restored");
    let out = s.stillpoint(&["restore", "g-tampered", "--to", to.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("member redis-1") && stderr.contains("has changed since the backup"),
        "{stderr}"
    );
    assert!(
        !to.exists(),
        "nothing was copied: {:?}",
        std::fs::read_dir(&to).ok().map(|d| d.count())
    );
}
