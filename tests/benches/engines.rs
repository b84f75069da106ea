//! Agent benchmark: freeze and thaw latency per engine on real servers
//! (p50/p99 over many cycles), the agent's idle RSS and its binary size.
//!
//! Run with:
//!   cargo build --release -p stillpoint-agent
//!   cargo bench -p stillpoint-tests --bench engines
//! Prints a table and writes JSON to `target/bench/agent-engines.json`
//! (`STILLPOINT_BENCH_CYCLES` sets the cycles per engine, default 200).

use std::time::{Duration, Instant};

use serde_json::json;
use stillpoint_tests::harness::agent::agent_binary;
use stillpoint_tests::harness::fleet::{Agent, Fleet};
use stillpoint_tests::harness::loopfs::LoopMount;
use stillpoint_tests::harness::mariadb::MariaPair;
use stillpoint_tests::harness::mongo::MongoPeer;
use stillpoint_tests::harness::postgres::PgPair;
use stillpoint_tests::harness::redis::RedisPair;

struct Row {
    engine: String,
    freeze_engine_us: Vec<u64>,
    thaw_engine_us: Vec<u64>,
    freeze_rtt_us: Vec<u64>,
    thaw_rtt_us: Vec<u64>,
    idle_rss_kib: u64,
}

fn percentile(values: &[u64], p: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `prepare`: `Some(atomic_cut)` runs the prepare step (untimed) before each freeze.
async fn cycles(engine: &str, agent: &mut Agent, n: usize, prepare: Option<bool>) -> Row {
    // Settle, then measure the idle footprint before the first freeze.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss_kib = rss_kib(agent.proc.pid());
    let mut row = Row {
        engine: engine.to_string(),
        freeze_engine_us: Vec::with_capacity(n),
        thaw_engine_us: Vec::with_capacity(n),
        freeze_rtt_us: Vec::with_capacity(n),
        thaw_rtt_us: Vec::with_capacity(n),
        idle_rss_kib,
    };
    for i in 0..n {
        let id = format!("bench-{engine}-{i}");
        if let Some(atomic_cut) = prepare {
            agent.prepare_for(&id, atomic_cut).await.expect("prepare");
        }
        let started = Instant::now();
        let mut hold = agent
            .freeze(&id, Duration::from_secs(30))
            .await
            .expect("freeze");
        row.freeze_rtt_us.push(started.elapsed().as_micros() as u64);
        row.freeze_engine_us.push(hold.frozen.freeze_duration_us);
        let started = Instant::now();
        hold.request_thaw(true).await.expect("thaw request");
        let result = hold.thawed().await.expect("thaw").expect("thawed event");
        row.thaw_rtt_us.push(started.elapsed().as_micros() as u64);
        assert!(result.error.is_empty(), "{engine}: {}", result.error);
        row.thaw_engine_us.push(result.thaw_duration_us);
    }
    row
}

fn main() {
    let n: usize = std::env::var("STILLPOINT_BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let binary = agent_binary().expect("build it first: cargo build --release -p stillpoint-agent");
    let binary_bytes = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    eprintln!("starting real servers ...");
    let pg = PgPair::start().expect("PostgreSQL pair");
    let maria = MariaPair::start().expect("MariaDB pair");
    let redis = RedisPair::start().expect("Redis pair");
    let mongo = MongoPeer::start(&[]).expect("MongoDB peer");
    let mount = LoopMount::ext4(64).ok();
    // The fenced database has tables, as a real one does.
    pg.primary
        .psql("CREATE TABLE bench_a (id int); CREATE TABLE bench_b (id int)")
        .expect("tables to fence");
    let rows = runtime.block_on(async {
        let fleet = Fleet::new().unwrap();
        let mut rows = Vec::new();
        let mut run =
            async |member: &str, engine: &str, env: Vec<(&str, String)>, prepare: Option<bool>| {
                let mut spec = fleet.spec(member, engine).unwrap();
                for (k, v) in env {
                    spec = spec.with(k, &v);
                }
                let mut agent = fleet.start(&spec).await.unwrap();
                eprintln!("{member}: {n} cycles ...");
                let row = cycles(member, &mut agent, n, prepare).await;
                rows.push(row);
            };
        run("noop", "noop", vec![], None).await;
        run(
            "postgres-backup",
            "postgres",
            vec![
                ("STILLPOINT_DSN", pg.primary.conninfo("postgres")),
                ("STILLPOINT_PG_WAL_RETAIN", "0s".into()),
            ],
            Some(false),
        )
        .await;
        run(
            "postgres-fence",
            "postgres",
            vec![
                ("STILLPOINT_DSN", pg.primary.conninfo("postgres")),
                ("STILLPOINT_PG_MODE", "fence".into()),
                ("STILLPOINT_PG_WAL_RETAIN", "0s".into()),
            ],
            Some(false),
        )
        .await;
        run(
            "postgres-fence (atomic)",
            "postgres",
            vec![
                ("STILLPOINT_DSN", pg.primary.conninfo("postgres")),
                ("STILLPOINT_PG_MODE", "fence".into()),
            ],
            Some(true),
        )
        .await;
        run(
            "mariadb",
            "mariadb",
            vec![("STILLPOINT_DSN", maria.primary.url(""))],
            Some(false),
        )
        .await;
        run(
            "redis",
            "redis",
            vec![("STILLPOINT_DSN", redis.primary.url())],
            None,
        )
        .await;
        run(
            "mongodb (wire peer)",
            "mongodb",
            vec![("STILLPOINT_DSN", mongo.url())],
            None,
        )
        .await;
        if let Some(mount) = &mount {
            run(
                "fsfreeze (loop ext4)",
                "fsfreeze",
                vec![(
                    "STILLPOINT_FSFREEZE_MOUNTS",
                    mount.path().display().to_string(),
                )],
                None,
            )
            .await;
        }
        rows
    });

    println!();
    println!(
        "stillpoint-agent: {n} freeze/thaw cycles per engine (µs; engine = time inside the agent, rtt = as the controller sees it)"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "engine",
        "frz p50",
        "frz p99",
        "thaw p50",
        "thaw p99",
        "frz rtt50",
        "frz rtt99",
        "thw rtt50",
        "thw rtt99",
        "idle RSS"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        println!(
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7} KiB",
            r.engine,
            percentile(&r.freeze_engine_us, 50.0),
            percentile(&r.freeze_engine_us, 99.0),
            percentile(&r.thaw_engine_us, 50.0),
            percentile(&r.thaw_engine_us, 99.0),
            percentile(&r.freeze_rtt_us, 50.0),
            percentile(&r.freeze_rtt_us, 99.0),
            percentile(&r.thaw_rtt_us, 50.0),
            percentile(&r.thaw_rtt_us, 99.0),
            r.idle_rss_kib
        );
        json_rows.push(json!({
            "engine": r.engine,
            "cycles": r.freeze_engine_us.len(),
            "freeze_us": {"p50": percentile(&r.freeze_engine_us, 50.0), "p99": percentile(&r.freeze_engine_us, 99.0)},
            "thaw_us": {"p50": percentile(&r.thaw_engine_us, 50.0), "p99": percentile(&r.thaw_engine_us, 99.0)},
            "freeze_rtt_us": {"p50": percentile(&r.freeze_rtt_us, 50.0), "p99": percentile(&r.freeze_rtt_us, 99.0)},
            "thaw_rtt_us": {"p50": percentile(&r.thaw_rtt_us, 50.0), "p99": percentile(&r.thaw_rtt_us, 99.0)},
            "idle_rss_kib": r.idle_rss_kib,
        }));
    }
    let max_rss = rows.iter().map(|r| r.idle_rss_kib).max().unwrap_or(0);
    println!();
    println!(
        "agent binary: {} ({:.1} MiB, target ≤ 20 MiB); idle RSS max {:.1} MiB (target ≤ 12 MiB)",
        binary.display(),
        binary_bytes as f64 / 1048576.0,
        max_rss as f64 / 1024.0
    );
    if mount.is_none() {
        println!("fsfreeze skipped: loop-mounting needs root");
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("agent-engines.json");
    let report = json!({
        "cycles_per_engine": n,
        "binary": binary.display().to_string(),
        "binary_bytes": binary_bytes,
        "idle_rss_kib_max": max_rss,
        "engines": json_rows,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("JSON: {}", path.display());
    drop((pg, maria, redis, mongo, mount));
}
