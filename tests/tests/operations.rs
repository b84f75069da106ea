//! Operating Stillpoint over time: `stillpoint serve` running schedules
//! (no overlaps, retention, SIGTERM), and recovery plans that `restore`
//! follows stage by stage. Black-box runs of the binary against real
//! servers and agents.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use stillpoint_controller::local::catalog::{Catalog, Manifest, Outcome};
use stillpoint_tests::harness::group::{Setup, is_frozen, member};
use stillpoint_tests::harness::postgres::fresh_database;
use stillpoint_tests::harness::{free_port, http_get, metric_sum, shared, signal, wait_for};
use tokio_postgres::NoTls;

/// A running `stillpoint serve`, stopped (SIGTERM) when dropped.
struct Serve {
    child: Child,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(s: &Setup) -> Serve {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = s.dir.path().join("serve.log");
        let child = s
            .command(&[
                "--log",
                "info",
                "serve",
                "--metrics-listen",
                &metrics.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            metrics,
            log,
        };
        wait_for("serve's /healthz", Duration::from_secs(10), || {
            Ok(http_get(serve.metrics, "/healthz").is_ok())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", serve.logs()));
        serve
    }

    fn metric(&self, prefix: &str) -> f64 {
        metric_sum(&http_get(self.metrics, "/metrics").unwrap().1, prefix)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The backup ids the log says were started, in order.
    fn started(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains("scheduled backup starting"))
            .filter_map(|l| l.split("backup_id=").nth(1))
            .map(|id| id.split_whitespace().next().unwrap().to_string())
            .collect()
    }

    /// SIGTERM; waits for the exit (bounded) and returns whether it was clean.
    fn terminate(&mut self) -> bool {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), "TERM");
            let _ = self.child.wait();
        }
    }
}

/// Records the current checksums of a copy backup's snapshots, as if they
/// had been cut that way.
fn rechecksum(s: &Setup, id: &str) {
    let catalog = Catalog::open(&s.dir.path().join("catalog")).unwrap();
    let mut manifest = catalog.get(id).unwrap();
    for m in &mut manifest.members {
        for h in &mut m.snapshots {
            h.checksum = Some(
                stillpoint_controller::local::snapshot::copy::checksum(Path::new(&h.handle))
                    .unwrap(),
            );
        }
    }
    catalog.write(&manifest).unwrap();
}

fn manifests(s: &Setup) -> Vec<Manifest> {
    Catalog::open(&s.dir.path().join("catalog"))
        .unwrap()
        .list()
        .unwrap()
}

/// The Redis pair as a group: primary and replica, on the copy snapshotter.
fn redis_group(s: &mut Setup, extra: &str) {
    let members = s.redis_pair_members("");
    s.config("g", &format!("snapshotter = \"copy\"\n{extra}\n{members}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_every_second_backs_up_and_retention_keeps_the_newest() {
    let _redis = shared::server_wide_freeze().await;
    let mut s = Setup::new();
    redis_group(&mut s, "");
    s.append_config("[schedules.every]\ngroup = \"g\"\ncron = \"* * * * * *\"\nkeep_last = 3\n");
    let mut serve = Serve::start(&s);
    let redis = shared::redis();
    for i in 0..60 {
        redis
            .primary
            .cli(&["SET", &format!("sched:{i}"), "x"])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serve.terminate(), "a clean exit:\n{}", serve.logs());

    let started = serve.started();
    assert!(
        started.len() >= 5,
        "one run a second: {started:?}\n{}",
        serve.logs()
    );
    let all = manifests(&s);
    let succeeded: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.outcome == Outcome::Succeeded)
        .collect();
    assert!(all.iter().all(|m| m.schedule.as_deref() == Some("every")));
    // The newest three succeeded runs remain; every older one is gone,
    // manifest and snapshot.
    let kept: BTreeSet<&str> = succeeded.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(kept.len(), 3, "{kept:?}\n{}", serve.logs());
    let aborted: BTreeSet<&str> = all
        .iter()
        .filter(|m| m.outcome != Outcome::Succeeded)
        .map(|m| m.id.as_str())
        .collect();
    let newest: Vec<&str> = started
        .iter()
        .map(String::as_str)
        .filter(|id| !aborted.contains(id))
        .rev()
        .take(3)
        .collect();
    assert_eq!(kept, newest.into_iter().collect(), "{}", serve.logs());
    for id in &started {
        let snapshot = s.snapshots().join(id);
        assert_eq!(
            snapshot.exists(),
            kept.contains(id.as_str()),
            "{id}: snapshots exist only for the kept backups"
        );
    }
    for m in &succeeded {
        for member in &m.members {
            assert!(Path::new(&member.snapshots[0].handle).is_dir());
        }
        let r1 = m.members.iter().find(|r| r.name == "redis-1").unwrap();
        let r0 = m.members.iter().find(|r| r.name == "redis-0").unwrap();
        assert_eq!(
            r1.aligned_to, r0.position,
            "the replica is aligned each time"
        );
    }
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_group_never_overlap_and_an_overlapping_run_is_skipped() {
    let mut s = Setup::new();
    let log = s.dir.path().join("cuts.log");
    // Each cut takes 1.5 s, so a schedule firing every second would overlap.
    noop_group(
        &mut s,
        &format!(
            "echo start $(date +%s.%N) >> {log}; sleep 1.5; echo end $(date +%s.%N) >> {log}",
            log = log.display()
        ),
        "freeze_budget = \"10s\"",
    );
    // Two schedules of the same group: they exclude each other too.
    s.append_config(
        "[schedules.a]\ngroup = \"g\"\ncron = \"* * * * * *\"\n\
         [schedules.b]\ngroup = \"g\"\ncron = \"*/2 * * * * *\"\n",
    );
    let mut serve = Serve::start(&s);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let skips = serve.metric("stillpoint_schedule_skips_total{");
    let runs = serve.metric("stillpoint_schedule_runs_total{");
    assert!(serve.terminate(), "{}", serve.logs());
    assert!(runs >= 2.0, "runs: {runs}\n{}", serve.logs());
    assert!(skips >= 2.0, "skips: {skips}\n{}", serve.logs());
    assert!(
        serve
            .logs()
            .contains("skipped: the group is still being backed up")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let mut intervals = Vec::new();
    let mut open = None;
    for line in text.lines() {
        let (what, at) = line.split_once(' ').unwrap();
        let at: f64 = at.parse().unwrap();
        match what {
            "start" => {
                assert!(open.is_none(), "a cut started while another ran:\n{text}");
                open = Some(at);
            }
            _ => intervals.push((open.take().unwrap(), at)),
        }
    }
    assert!(intervals.len() >= 2, "{text}");
    assert!(intervals.windows(2).all(|w| w[0].1 <= w[1].0), "{text}");
}

/// A group of one noop agent on the exec snapshotter, whose cut runs
/// `snapshot` (`sh -c`).
fn noop_group(s: &mut Setup, snapshot: &str, extra: &str) {
    let a0 = s.agent("n-0", "noop", &[]);
    let volume = s.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\n{extra}\n[groups.g.exec]\nsnapshot = {snapshot:?}\ndelete = \"true\"\n{}",
            member("n-0", &a0, "primary", None, &[&volume])
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_missed_while_down_are_counted_and_run_once_or_skipped() {
    for (policy, backups) in [("run-once", 1), ("skip", 0)] {
        let mut s = Setup::new();
        noop_group(&mut s, "true", "");
        // Midnight every New Year: nothing falls due during the test, but
        // the last firing on record was two years ago.
        s.append_config(&format!(
            "[schedules.yearly]\ngroup = \"g\"\ncron = \"0 0 0 1 1 *\"\nmissed = \"{policy}\"\n"
        ));
        let catalog = s.dir.path().join("catalog");
        std::fs::create_dir_all(&catalog).unwrap();
        let two_years_ago = time::OffsetDateTime::now_utc() - time::Duration::days(800);
        std::fs::write(
            catalog.join(".schedules.json"),
            format!(
                "{{\"yearly\": \"{}\"}}",
                two_years_ago
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            ),
        )
        .unwrap();
        let mut serve = Serve::start(&s);
        wait_for("the missed runs counted", Duration::from_secs(10), || {
            Ok(serve.metric("stillpoint_schedule_missed_total{") >= 2.0)
        })
        .unwrap_or_else(|e| panic!("{policy}: {e}\n{}", serve.logs()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(serve.terminate(), "{}", serve.logs());
        let taken: Vec<Manifest> = manifests(&s);
        assert_eq!(
            taken.len(),
            backups,
            "{policy}: {taken:?}\n{}",
            serve.logs()
        );
        assert!(taken.iter().all(|m| m.outcome == Outcome::Succeeded));
        assert!(
            serve.logs().contains("runs were missed"),
            "{}",
            serve.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_scheduled_freeze_thaws_everyone_within_a_second() {
    let _redis = shared::server_wide_freeze().await;
    let pg = shared::postgres();
    let redis = shared::redis();
    fresh_database(&pg.primary, "sched_term", "CREATE TABLE t (id int)").await;
    let mut s = Setup::new();
    let p0 = s.agent(
        "pg-0",
        "postgres",
        &[
            ("STILLPOINT_DSN", pg.primary.conninfo("sched_term")),
            ("STILLPOINT_PG_MODE", "fence".into()),
        ],
    );
    let r0 = s.agent(
        "redis-0",
        "redis",
        &[("STILLPOINT_DSN", redis.primary.url())],
    );
    // A cut that takes 30 s: the freeze is in force when SIGTERM comes.
    s.config(
        "g",
        &format!(
            "snapshotter = \"exec\"\nfreeze_budget = \"60s\"\n[groups.g.exec]\n\
             snapshot = \"sleep 30\"\ndelete = \"true\"\n{}{}",
            member("pg-0", &p0, "primary", None, &[&pg.primary.data]),
            member("redis-0", &r0, "primary", None, &[&redis.primary.dir]),
        ),
    );
    s.append_config("[schedules.often]\ngroup = \"g\"\ncron = \"* * * * * *\"\n");
    let mut serve = Serve::start(&s);
    wait_for("the scheduled freeze", Duration::from_secs(10), || {
        Ok(s.agents.iter().all(is_frozen))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", serve.logs()));

    // Writes on both members wait for the freeze.
    let (c, conn) = tokio_postgres::connect(&pg.primary.conninfo("sched_term"), NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let pg_write = tokio::spawn(async move {
        c.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
        Instant::now()
    });
    let url = redis.primary.url();
    let redis_write = tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _: () = redis::cmd("SET")
            .arg("sched:term")
            .arg("1")
            .query(&mut conn)
            .unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pg_write.is_finished() && !redis_write.is_finished(),
        "writes are frozen"
    );

    let terminated = Instant::now();
    signal(serve.child.id(), "TERM");
    let pg_done = pg_write.await.unwrap();
    let redis_done = redis_write.await.unwrap();
    for (what, done) in [("postgres", pg_done), ("redis", redis_done)] {
        let after = done.saturating_duration_since(terminated);
        assert!(
            after < Duration::from_secs(1),
            "{what} writable {after:?} after SIGTERM"
        );
    }
    assert!(serve.terminate(), "a clean exit:\n{}", serve.logs());
    assert!(s.agents.iter().all(|a| !is_frozen(a)));
    let all = manifests(&s);
    let last = all.last().expect("the run is recorded");
    assert_eq!(last.outcome, Outcome::Aborted, "{last:?}");
    assert!(
        last.error.as_deref().unwrap().contains("SIGTERM"),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_follows_the_plan_and_never_starts_a_stage_after_an_unhealthy_one() {
    let pg = shared::postgres();
    let mut s = Setup::new();
    let p0 = s.agent(
        "pg-0",
        "postgres",
        &[("STILLPOINT_DSN", pg.primary.conninfo("postgres"))],
    );
    // Redis is infrastructure here (stage 1, set explicitly); PostgreSQL
    // keeps its default stage (2, databases).
    let redis_members = s.redis_pair_members("restore_stage = 1\n");
    s.config(
        "g",
        &format!(
            "snapshotter = \"copy\"\nfreeze_budget = \"20s\"\n{}{redis_members}",
            member("pg-0", &p0, "primary", None, &[&pg.primary.data]),
        ),
    );
    let out = {
        let _redis = shared::server_wide_freeze().await;
        s.stillpoint(&["backup", "create", "g", "--id", "plan-1"])
    };
    assert!(out.status.success(), "{out:?}");

    let out = s.stillpoint(&["plan", "plan-1"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle}:\n{text}"))
    };
    assert!(
        at("redis-0") < at("redis-1") && at("redis-1") < at("pg-0"),
        "{text}"
    );
    assert!(
        text.contains("1 infrastructure") && text.contains("2 databases"),
        "{text}"
    );
    let out = s.stillpoint(&["-o", "json", "plan", "plan-1"]);
    let steps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = &manifests(&s)[0];
    let position = |n: &str| {
        manifest
            .members
            .iter()
            .find(|m| m.name == n)
            .unwrap()
            .position
            .clone()
    };
    assert_eq!(steps[0]["member"], "redis-0");
    assert_eq!(steps[0]["stage_from"], "explicit");
    assert_eq!(steps[1]["member"], "redis-1");
    assert_eq!(steps[1]["must_reach"], position("redis-0").unwrap());
    assert_eq!(steps[1]["consistency"], "frozen-copy");
    assert_eq!(steps[2]["member"], "pg-0");
    assert_eq!(steps[2]["stage"], 2);
    assert_eq!(steps[2]["stage_from"], "default");
    assert_eq!(steps[2]["consistency"], "backup-label");

    // Stage 1's primary cannot start: its snapshot's dump is corrupt (as
    // if the server had written a bad one; the checksum is of that).
    let snap = s.snapshots().join("plan-1");
    let r0_snap = snap.join("redis-0-0");
    let _ = std::fs::remove_dir_all(r0_snap.join("appendonlydir"));
    std::fs::write(r0_snap.join("dump.rdb"), b"REDIS0011 this is not a dump").unwrap();
    // postmaster.opts is written by every postmaster start.
    let _ = std::fs::remove_file(snap.join("pg-0-0/postmaster.opts"));
    rechecksum(&s, "plan-1");
    let to = s.dir.path().join("restored");
    let metrics = s.dir.path().join("restore.prom");
    let out = s.stillpoint(&[
        "--metrics-file",
        metrics.to_str().unwrap(),
        "restore",
        "plan-1",
        "--to",
        to.to_str().unwrap(),
        "--start",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("stage 1 (infrastructure): redis-0 (redis) failed its health check"),
        "{stdout}"
    );
    assert!(stdout.contains("redis-1 (redis) started"), "{stdout}");
    assert!(
        stdout
            .contains("stage 2 (databases): not started, because stage 1 is not healthy (redis-0)"),
        "{stdout}"
    );
    assert!(!stdout.contains("pg-0 (postgres) started"), "{stdout}");
    assert!(stderr.contains("stopped at stage 1"), "{stderr}");
    let pg_dir = to.join("pg-0/0");
    assert!(
        pg_dir.join("PG_VERSION").exists(),
        "stage 2's files are restored"
    );
    assert!(
        !pg_dir.join("postmaster.opts").exists() && !pg_dir.join("postmaster.pid").exists(),
        "stage 2's server was never started"
    );
    let exposition = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(
        metric_sum(&exposition, "stillpoint_restore_order_violations_total"),
        1.0,
        "{exposition}"
    );
}
