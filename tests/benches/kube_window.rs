//! The freeze window in a cluster, in the Kubernetes lab, and where it
//! goes (`stillpoint bench --parts kube` runs this).
//!
//! The shop's six members (PostgreSQL, MariaDB and Redis, a primary and a
//! replica each, as StatefulSets with injected-style agent sidecars) in one
//! ConsistencyGroup, a light write load on the three primaries, and one
//! controller replica under `deploy/`'s RBAC with the deployed Lease and
//! resync settings. Then, one after another, `STILLPOINT_BENCH_RUNS`
//! (default 10) GroupBackups per arm:
//!
//! - `csi` and `csi-group` on the lab driver's atomic class (per-volume
//!   btrfs snapshots), six members;
//! - `csi` and `csi-group` on its copy class (a live copy of the files, as
//!   csi-driver-host-path makes): PostgreSQL and Redis only, four members
//!   (MariaDB's InnoDB needs `fsfreeze` or an atomic class there, and the
//!   lab's volumes share one filesystem, which `fsfreeze` would freeze
//!   whole);
//! - the baseline, what exec-hook frameworks do (Velero's per-pod hooks
//!   around per-volume snapshots): one member at a time, a pre hook, a
//!   VolumeSnapshot of its PVC on the atomic class, waiting (through a
//!   watch) for its `creationTime`, a post hook. The hooks are the client
//!   processes the local bench runs (`psql`, `mariadb`, `redis-cli`),
//!   started on this machine against the pods: the lab has no `kubectl
//!   exec` streaming, so the baseline leaves out exec's own round trips
//!   through the API server and the kubelet, which only makes it faster.
//!
//! For each backup: the freeze window (first freeze request to last thaw
//! acknowledgement), the total (the GroupBackup's creation, as this
//! process made it, to `Succeeded` seen), the longest write of the load
//! that started during it, and the window broken down. The controller's
//! phases come from the GroupBackup's `status.timeline` (µs from
//! `status.timelineStart`); the CSI chain's steps, per batch of the cut,
//! from this process's watches of the snapshot objects (when each was seen
//! created, and seen with `status.creationTime`) and from the lab driver's
//! log of its calls (called, returned). The CSI chain's own time for a cut
//! is, per batch, the first snapshot object seen created to the last
//! snapshot content seen with `status.creationTime` (the earliest record
//! in the API that the storage fixed the cut), summed over the batches,
//! plus, on a class that copies, the chain of the copies of PostgreSQL's
//! WAL up to its backup stop (taken before the other members thaw).
//!
//! Run with:
//!   cargo build --release -p stillpoint-controller -p stillpoint-agent
//!   cargo bench -p stillpoint-tests --bench kube_window
//! Prints tables and writes JSON to `target/bench/kube-window.json`
//! (`STILLPOINT_BENCH_JSON` to change it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use serde_json::{Value, json};
use stillpoint_controller::kube::crd::{BackupPhase, GroupBackup};
use stillpoint_controller::kube::csi::{volume_group_snapshot_resource, volume_snapshot_resource};
use stillpoint_tests::harness::kube::shop::{
    Space, maria_connect, pg_connect, redis_connect, shop_with_settings,
};
use stillpoint_tests::harness::kube::stillpoint::ControllerProc;
use stillpoint_tests::harness::kube::{self as lab, KubeLab, pod_ip, wait_async};

const BOUND: Duration = Duration::from_secs(180);

fn micros(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as f64
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn main() -> Result<()> {
    if !stillpoint_controller::local::servers::is_root() {
        bail!("the Kubernetes lab runs pods as the databases' service users: run as root");
    }
    let runs: usize = std::env::var("STILLPOINT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let json_path = std::env::var("STILLPOINT_BENCH_JSON").map_or_else(
        |_| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bench/kube-window.json")
        },
        std::path::PathBuf::from,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench(runs.max(1)))?;
    println!("{}", report.text);
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report.json)?)?;
    println!("JSON written to {}", json_path.display());
    Ok(())
}

/// One arm of the bench.
#[derive(Debug, Clone, Copy)]
struct Arm {
    name: &'static str,
    driver: &'static str,
    class: &'static str,
    /// All six members (else PostgreSQL and Redis only).
    six: bool,
}

const ARMS: &[Arm] = &[
    Arm {
        name: "csi, atomic class",
        driver: "csi",
        class: lab::ATOMIC_SNAPSHOT_CLASS,
        six: true,
    },
    Arm {
        name: "csi-group, atomic class",
        driver: "csi-group",
        class: lab::ATOMIC_SNAPSHOT_CLASS,
        six: true,
    },
    Arm {
        name: "csi, copy class",
        driver: "csi",
        class: lab::SNAPSHOT_CLASS,
        six: false,
    },
    Arm {
        name: "csi-group, copy class",
        driver: "csi-group",
        class: lab::SNAPSHOT_CLASS,
        six: false,
    },
];

struct Report {
    text: String,
    json: Value,
}

async fn bench(runs: usize) -> Result<Report> {
    let started = Instant::now();
    let kube_lab: &'static KubeLab = Box::leak(Box::new(KubeLab::start()?));
    let space = Space::with_lab(kube_lab, "window").await;
    let [pg, maria, redis] = shop_with_settings(&space).await;
    let load = Load::start(&pg, &maria, &redis).await?;
    let controller = ControllerProc::start_with(
        kube_lab,
        space.installed,
        &space.ns,
        "bench-0",
        "bench-window",
        &[
            "--resync",
            "30s",
            "--lease-duration",
            "15s",
            "--renew-deadline",
            "10s",
            "--retry-period",
            "2s",
        ],
    )
    .await?;
    let seen = Seen::start(&space.admin, &space.ns).await?;
    eprintln!(
        "lab and shop up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let chosen = chosen_arms();
    let mut arms = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for arm in ARMS.iter().filter(|a| chosen.contains(&a.key())) {
        use_arm(&space, arm).await;
        match arm_backups(&space, arm, runs, &seen, &load).await {
            Ok(samples) => arms.push((arm.name, samples)),
            Err(e) => {
                eprintln!("{}: FAILED: {e:#}", arm.name);
                failed.push((arm.name.to_string(), format!("{e:#}")));
            }
        }
    }
    let hooks = match chosen.iter().any(|k| k == "exec-hooks") {
        false => None,
        true => match hook_backups(&space, runs, &seen, &load).await {
            Ok(h) => Some(h),
            Err(e) => {
                failed.push(("exec hooks".into(), format!("{e:#}")));
                None
            }
        },
    };
    drop(controller);
    let mut text = tables(&arms, hooks.as_ref());
    for (arm, e) in &failed {
        text.push_str(&format!("{arm}: FAILED: {e}\n"));
    }
    let json = json!({
        "runs": runs,
        "members": { "atomic": 6, "copy": 4 },
        "arms": arms.iter().map(|(name, s)| json!({ "arm": name, "summary": summary(s), "samples": s.iter().map(Sample::json).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "exec_hooks": hooks.as_ref().map(Hooks::json),
        "failed": failed.iter().map(|(arm, e)| json!({ "arm": arm, "error": e })).collect::<Vec<_>>(),
    });
    Ok(Report { text, json })
}

/// The arms `STILLPOINT_BENCH_ARMS` names (comma-separated keys), or all:
/// `csi-atomic`, `csi-group-atomic`, `csi-copy`, `csi-group-copy`,
/// `exec-hooks`.
fn chosen_arms() -> Vec<String> {
    let all: Vec<String> = ARMS
        .iter()
        .map(Arm::key)
        .chain(["exec-hooks".to_string()])
        .collect();
    match std::env::var("STILLPOINT_BENCH_ARMS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|k| k.trim().to_string()).collect(),
        _ => all,
    }
}

impl Arm {
    fn key(&self) -> String {
        format!("{}-{}", self.driver, short(self.class))
    }
}

/// `runs` backups of one arm; a failed one ends the arm (and is deleted).
async fn arm_backups(
    space: &Space,
    arm: &Arm,
    runs: usize,
    seen: &Seen,
    load: &Load,
) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for i in 0..runs {
        let name = format!("{}-{i}", arm.key());
        match stillpoint_backup(space, &name, seen, load).await {
            Ok(sample) => samples.push(sample),
            Err(e) => {
                if let Ok(b) = space.backups().get(&name).await {
                    let _ = delete_and_wait(&space.backups(), &b).await;
                }
                return Err(e.context(format!("backup {} of {runs}", i + 1)));
            }
        }
    }
    eprintln!("{}: {} backups", arm.name, samples.len());
    Ok(samples)
}

fn short(class: &str) -> &'static str {
    match class == lab::ATOMIC_SNAPSHOT_CLASS {
        true => "atomic",
        false => "copy",
    }
}

/// Points the group at the arm's driver, class and members, and waits
/// until it is Protectable so.
async fn use_arm(space: &Space, arm: &Arm) {
    let all = [
        ("pg", "pg"),
        ("pg-replica", "pg-replica"),
        ("maria", "maria"),
        ("maria-replica", "maria-replica"),
        ("cache", "redis"),
        ("cache-replica", "redis-replica"),
    ];
    let members: Vec<Value> = all
        .into_iter()
        .filter(|(name, _)| arm.six || !name.starts_with("maria"))
        .map(|(name, app)| json!({"name": name, "selector": {"matchLabels": {"app": app}}}))
        .collect();
    space
        .groups()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "members": members,
                "snapshot": {
                    "driver": arm.driver,
                    "volumeSnapshotClassName": arm.class,
                    "volumeGroupSnapshotClassName": arm.class,
                },
            }})),
        )
        .await
        .unwrap();
    space.protectable("shop", "True").await;
}

/// A light write load on the three primaries: one write every 20 ms on
/// each, each write's start and latency kept.
struct Load {
    writes: Arc<Mutex<Vec<(f64, f64)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl Load {
    async fn start(pg: &Pod, maria: &Pod, redis: &Pod) -> Result<Load> {
        use mysql_async::prelude::Queryable;
        let pg = pg_connect(pg).await;
        pg.batch_execute("CREATE TABLE IF NOT EXISTS load (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
            .await?;
        let mut maria = maria_connect(maria).await;
        maria
            .query_drop("CREATE DATABASE IF NOT EXISTS app")
            .await?;
        maria
            .query_drop("CREATE TABLE IF NOT EXISTS app.load (id BIGINT AUTO_INCREMENT PRIMARY KEY, at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)")
            .await?;
        let redis = redis_connect(redis).await;
        let writes = Arc::new(Mutex::new(Vec::new()));
        let pg = Arc::new(pg);
        let maria = Arc::new(tokio::sync::Mutex::new(maria));
        let tasks = vec![
            Self::spawn(writes.clone(), move || {
                let pg = pg.clone();
                async move {
                    pg.execute("INSERT INTO load DEFAULT VALUES", &[])
                        .await
                        .map(drop)
                        .map_err(anyhow::Error::from)
                }
            }),
            Self::spawn(writes.clone(), move || {
                let maria = maria.clone();
                async move {
                    maria
                        .lock()
                        .await
                        .query_drop("INSERT INTO app.load () VALUES ()")
                        .await
                        .map_err(anyhow::Error::from)
                }
            }),
            Self::spawn(writes.clone(), move || {
                let mut redis = redis.clone();
                async move {
                    redis::cmd("INCR")
                        .arg("load")
                        .query_async::<i64>(&mut redis)
                        .await
                        .map(drop)
                        .map_err(anyhow::Error::from)
                }
            }),
        ];
        Ok(Load { writes, tasks })
    }

    fn spawn<F, Fut>(
        writes: Arc<Mutex<Vec<(f64, f64)>>>,
        mut write: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send,
    {
        tokio::spawn(async move {
            loop {
                let (at, clock) = (micros(SystemTime::now()), Instant::now());
                if let Err(e) = write().await {
                    eprintln!("a write of the load failed: {e}");
                }
                let took = clock.elapsed().as_micros() as f64;
                writes.lock().unwrap().push((at, took));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    /// The longest write that started in `[from, to]` (µs since the epoch), in ms.
    fn longest(&self, from: f64, to: f64) -> f64 {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| (from..=to).contains(at))
            .map(|(_, took)| took / 1000.0)
            .fold(0.0, f64::max)
    }
}

/// One snapshot object as this process's watches saw it.
#[derive(Debug, Clone, Default)]
struct Obj {
    uid: String,
    /// A content's: the uid of the snapshot it is bound to.
    bound_to: Option<String>,
    /// When it was first seen, and first seen with `status.creationTime`
    /// (µs since the epoch).
    added: f64,
    created: Option<f64>,
}

/// Watches of VolumeSnapshots, VolumeSnapshotContents,
/// VolumeGroupSnapshots and VolumeGroupSnapshotContents.
struct Seen {
    objects: Arc<Mutex<BTreeMap<(&'static str, String), Obj>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Seen {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl Seen {
    async fn start(client: &kube::Client, ns: &str) -> Result<Seen> {
        let vgs = volume_group_snapshot_resource(client)
            .await
            .map_err(anyhow::Error::msg)?;
        let vgsc = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&vgs.group, &vgs.version, "VolumeGroupSnapshotContent"),
            "volumegroupsnapshotcontents",
        );
        let vsc = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
            "volumesnapshotcontents",
        );
        let objects = Arc::new(Mutex::new(BTreeMap::new()));
        let synced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let apis = [
            (
                "vs",
                Api::namespaced_with(client.clone(), ns, &volume_snapshot_resource()),
                "volumeSnapshotRef",
            ),
            (
                "vsc",
                Api::all_with(client.clone(), &vsc),
                "volumeSnapshotRef",
            ),
            (
                "vgs",
                Api::namespaced_with(client.clone(), ns, &vgs),
                "volumeGroupSnapshotRef",
            ),
            (
                "vgsc",
                Api::all_with(client.clone(), &vgsc),
                "volumeGroupSnapshotRef",
            ),
        ];
        let tasks = apis
            .into_iter()
            .map(|(kind, api, reference)| {
                let (objects, synced) = (objects.clone(), synced.clone());
                tokio::spawn(async move {
                    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
                    while let Some(event) = events.next().await {
                        match event {
                            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                                Self::saw(&objects, kind, reference, &o)
                            }
                            Ok(watcher::Event::InitDone) => {
                                synced.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        let seen = Seen { objects, tasks };
        wait_async("the snapshot watches synced", BOUND, || {
            let synced = synced.clone();
            async move { Ok(synced.load(std::sync::atomic::Ordering::SeqCst) >= 4) }
        })
        .await?;
        Ok(seen)
    }

    fn saw(
        objects: &Mutex<BTreeMap<(&'static str, String), Obj>>,
        kind: &'static str,
        reference: &str,
        o: &DynamicObject,
    ) {
        let now = micros(SystemTime::now());
        let mut objects = objects.lock().unwrap();
        let entry = objects.entry((kind, o.name_any())).or_insert_with(|| Obj {
            uid: o.uid().unwrap_or_default(),
            added: now,
            ..Default::default()
        });
        if entry.uid != o.uid().unwrap_or_default() {
            // A new object of an old name.
            *entry = Obj {
                uid: o.uid().unwrap_or_default(),
                added: now,
                ..Default::default()
            };
        }
        entry.bound_to = o.data["spec"][reference]["uid"]
            .as_str()
            .map(str::to_string);
        if entry.created.is_none() && !o.data["status"]["creationTime"].is_null() {
            entry.created = Some(now);
        }
    }

    fn get(&self, kind: &'static str, name: &str) -> Option<Obj> {
        self.objects
            .lock()
            .unwrap()
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// The content (`vsc` or `vgsc`) bound to the snapshot of `uid`.
    fn content_of(&self, kind: &'static str, uid: &str) -> Option<Obj> {
        self.objects
            .lock()
            .unwrap()
            .iter()
            .find(|((k, _), o)| *k == kind && o.bound_to.as_deref() == Some(uid))
            .map(|(_, o)| o.clone())
    }
}

/// The steps of one batch of the cut, in the order the CSI chain takes
/// them.
const STEPS: &[&str] = &[
    "snapshot object seen",
    "content seen",
    "driver called",
    "driver returned",
    "content creationTime seen",
    "snapshot creationTime seen",
    "controller saw the cut",
];

/// The phases of the window, in order.
const PHASES: &[&str] = &[
    "freeze",
    "align and flush",
    "cut",
    "cut to thaw sent",
    "thaw",
];

/// One backup measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    window_ms: f64,
    total_ms: f64,
    /// The CSI chain's own time for the cut (its WAL copy included).
    chain_ms: f64,
    /// On a class that copies: the chain of the copies of PostgreSQL's WAL
    /// up to the backup stop (during the thaw, before the others thaw).
    wal_copy_ms: f64,
    longest_write_ms: f64,
    phases: BTreeMap<&'static str, f64>,
    /// Per batch of the cut: each step's time from the batch's request, ms.
    batches: Vec<BTreeMap<&'static str, f64>>,
}

impl Sample {
    fn json(&self) -> Value {
        json!({
            "window_ms": self.window_ms,
            "total_ms": self.total_ms,
            "csi_chain_ms": self.chain_ms,
            "wal_copy_chain_ms": self.wal_copy_ms,
            "longest_write_ms": self.longest_write_ms,
            "phases_ms": self.phases,
            "batches_ms": self.batches,
        })
    }
}

/// Takes GroupBackup `name` of the shop, waits for `Succeeded` (through a
/// watch), measures it, and deletes it (waiting until it is gone, with
/// its snapshots).
async fn stillpoint_backup(space: &Space, name: &str, seen: &Seen, load: &Load) -> Result<Sample> {
    let ns = &space.ns;
    let api: Api<GroupBackup> = space.backups();
    let created = micros(SystemTime::now());
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: shop}}"
        ))
        .await;
    let done = tokio::time::timeout(
        BOUND,
        kube::runtime::wait::await_condition(api.clone(), name, |b: Option<&GroupBackup>| {
            b.and_then(|b| b.status.as_ref()?.phase)
                .is_some_and(BackupPhase::is_final)
        }),
    )
    .await
    .context("the backup did not end in time")??
    .context("the backup went")?;
    let ended = micros(SystemTime::now());
    let status = done.status.clone().unwrap_or_default();
    if status.phase != Some(BackupPhase::Succeeded) {
        bail!("backup {name} did not succeed: {:?}", status.error);
    }
    // Let the watches catch up with the last objects' updates.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sample = measure(&done, seen, space.lab.csi().calls())?;
    sample.total_ms = (ended - created) / 1000.0;
    let (from, to) = window_abs(&done).unwrap_or((created, ended));
    sample.longest_write_ms = load.longest(from, to);
    delete_and_wait(&api, &done).await?;
    Ok(sample)
}

async fn delete_and_wait<K>(api: &Api<K>, o: &K) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let (name, uid) = (o.name_any(), o.uid().unwrap_or_default());
    api.delete(&name, &DeleteParams::background()).await?;
    tokio::time::timeout(
        BOUND,
        kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::conditions::is_deleted(&uid),
        ),
    )
    .await
    .with_context(|| format!("{name} still there"))??;
    Ok(())
}

/// A member's phase, in µs since the epoch.
fn at(b: &GroupBackup, member: &str, phase: &str) -> Option<f64> {
    let s = b.status.as_ref()?;
    let origin = s.timeline_start.as_ref()?.0.as_microsecond() as f64;
    s.timeline
        .get(member)?
        .get(phase)
        .map(|us| origin + *us as f64)
}

/// The first (or last) of a phase over the members, µs since the epoch.
fn first(b: &GroupBackup, phase: &str) -> Option<f64> {
    members(b)
        .iter()
        .filter_map(|m| at(b, m, phase))
        .reduce(f64::min)
}

fn last(b: &GroupBackup, phase: &str) -> Option<f64> {
    members(b)
        .iter()
        .filter_map(|m| at(b, m, phase))
        .reduce(f64::max)
}

fn members(b: &GroupBackup) -> Vec<String> {
    b.status
        .as_ref()
        .map(|s| s.timeline.keys().cloned().collect())
        .unwrap_or_default()
}

fn window_abs(b: &GroupBackup) -> Option<(f64, f64)> {
    Some((first(b, "freeze_requested")?, last(b, "thawed")?))
}

/// The backup's batches of the cut: the members of each, by the instant
/// they were requested.
fn batches(b: &GroupBackup) -> Vec<(f64, Vec<String>)> {
    let mut by: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for m in members(b) {
        if let Some(t) = at(b, &m, "cut_requested") {
            by.entry(t as u64).or_default().push(m);
        }
    }
    by.into_iter().map(|(t, ms)| (t as f64, ms)).collect()
}

/// The window and its breakdown, from the status, the watches and the
/// driver's log.
fn measure(b: &GroupBackup, seen: &Seen, calls: Vec<lab::csi::Call>) -> Result<Sample> {
    let ms = |a: Option<f64>, z: Option<f64>| match (a, z) {
        (Some(a), Some(z)) => (z - a) / 1000.0,
        _ => f64::NAN,
    };
    let status = b.status.clone().unwrap_or_default();
    let mut sample = Sample {
        window_ms: status.freeze_window_microseconds.unwrap_or_default() as f64 / 1000.0,
        ..Default::default()
    };
    let phases = [
        ms(first(b, "freeze_requested"), last(b, "frozen")),
        ms(last(b, "frozen"), first(b, "cut_requested")),
        ms(first(b, "cut_requested"), last(b, "cut")),
        ms(last(b, "cut"), first(b, "thaw_requested")),
        ms(first(b, "thaw_requested"), last(b, "thawed")),
    ];
    sample.phases = PHASES.iter().copied().zip(phases).collect();
    let group = status.snapshotter.as_deref() == Some("csi-group");
    for (i, (requested, batch)) in batches(b).into_iter().enumerate() {
        let objects = batch_objects(b, &batch, i, group, seen);
        if objects.is_empty() {
            bail!(
                "backup {}: no snapshot object of batch {i} was seen",
                b.name_any()
            );
        }
        let content_kind = if group { "vgsc" } else { "vsc" };
        let prefix = if group { "groupsnapshot-" } else { "snapshot-" };
        let contents: Vec<Obj> = objects
            .iter()
            .filter_map(|o| seen.content_of(content_kind, &o.uid))
            .collect();
        let call = |o: &Obj| {
            calls
                .iter()
                .filter(|c| c.name == format!("{prefix}{}", o.uid))
                .cloned()
                .collect::<Vec<_>>()
        };
        let called: Vec<f64> = objects
            .iter()
            .filter_map(|o| call(o).first().map(|c| micros(c.called)))
            .collect();
        let returned: Vec<f64> = objects
            .iter()
            .filter_map(|o| {
                call(o)
                    .iter()
                    .rev()
                    .find(|c| c.ok)
                    .map(|c| micros(c.returned))
            })
            .collect();
        let max = |v: Vec<Option<f64>>| -> Option<f64> {
            v.iter()
                .copied()
                .collect::<Option<Vec<f64>>>()?
                .into_iter()
                .reduce(f64::max)
        };
        let steps = [
            max(objects.iter().map(|o| Some(o.added)).collect()),
            max(contents.iter().map(|o| Some(o.added)).collect()),
            called.iter().copied().reduce(f64::max),
            returned.iter().copied().reduce(f64::max),
            max(contents.iter().map(|o| o.created).collect()),
            max(objects.iter().map(|o| o.created).collect()),
            batch
                .iter()
                .filter_map(|m| at(b, m, "cut"))
                .reduce(f64::max),
        ];
        let first_object = objects.iter().map(|o| o.added).reduce(f64::min);
        sample.chain_ms += ms(first_object, steps[4]);
        sample.batches.push(
            STEPS
                .iter()
                .copied()
                .zip(steps.map(|s| ms(Some(requested), s)))
                .collect(),
        );
    }
    sample.wal_copy_ms = wal_copy(b, seen);
    sample.chain_ms += sample.wal_copy_ms;
    Ok(sample)
}

/// The chain of the WAL copies (snapshots of a part of a volume), ms:
/// the first seen created to the last content seen with its creationTime.
fn wal_copy(b: &GroupBackup, seen: &Seen) -> f64 {
    let status = b.status.clone().unwrap_or_default();
    let parts: Vec<Obj> = status
        .members
        .iter()
        .flat_map(|m| m.volume_snapshots.iter().filter(|v| v.part.is_some()))
        .filter_map(|v| seen.get("vs", &v.name))
        .collect();
    let first = parts.iter().map(|o| o.added).reduce(f64::min);
    let cut = parts
        .iter()
        .map(|o| seen.content_of("vsc", &o.uid).and_then(|c| c.created))
        .collect::<Option<Vec<f64>>>()
        .and_then(|v| v.into_iter().reduce(f64::max));
    match (first, cut) {
        (Some(a), Some(z)) => (z - a) / 1000.0,
        _ => 0.0,
    }
}

/// The snapshot objects (VolumeSnapshots, or the VolumeGroupSnapshot) of
/// batch `i` of the cut, as seen.
fn batch_objects(
    b: &GroupBackup,
    batch: &[String],
    i: usize,
    group: bool,
    seen: &Seen,
) -> Vec<Obj> {
    let status = b.status.clone().unwrap_or_default();
    if group {
        let name = match (i, status.volume_group_snapshot) {
            (0, Some(n)) => n,
            (i, Some(n)) => format!("{n}.{}", i + 1),
            _ => return Vec::new(),
        };
        return seen.get("vgs", &name).into_iter().collect();
    }
    status
        .members
        .iter()
        .filter(|m| batch.contains(&m.pod))
        .flat_map(|m| m.volume_snapshots.iter().filter(|v| v.part.is_none()))
        .filter_map(|v| seen.get("vs", &v.name))
        .collect()
}

/// An exec hook: a client process against a member's pod.
fn hook(program: &str, args: &[String]) -> Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The pre and post hooks of a member (as the local bench's): its client
/// program and arguments.
fn hooks_of(pod: &str, ip: &str) -> (&'static str, Vec<String>, Vec<String>) {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let psql = |sql: &str| {
        strings(&[
            "-X", "-q", "-h", ip, "-U", "postgres", "-d", "postgres", "-c", sql,
        ])
    };
    let maria = |sql: &str| strings(&["-h", ip, "-u", "root", "-e", sql]);
    let redis = |cmd: &[&str]| strings(&[&["-h", ip], cmd].concat());
    match pod {
        "pg-0" => (
            "psql",
            psql("BEGIN; LOCK TABLE load IN EXCLUSIVE MODE; COMMIT"),
            psql("SELECT pg_current_wal_lsn()"),
        ),
        "pg-replica-0" => (
            "psql",
            psql("SELECT pg_wal_replay_pause()"),
            psql("SELECT pg_wal_replay_resume()"),
        ),
        "maria-0" | "maria-replica-0" => (
            "mariadb",
            maria("FLUSH TABLES WITH READ LOCK"),
            maria("UNLOCK TABLES"),
        ),
        _ => (
            "redis-cli",
            redis(&["CLIENT", "PAUSE", "30000", "WRITE"]),
            redis(&["CLIENT", "UNPAUSE"]),
        ),
    }
}

/// The exec-hook baseline's backups.
#[derive(Debug, Default)]
struct Hooks {
    window_ms: Vec<f64>,
    chain_ms: Vec<f64>,
    member_frozen_ms: Vec<f64>,
    longest_write_ms: Vec<f64>,
}

impl Hooks {
    fn json(&self) -> Value {
        json!({
            "window_ms": stats(&self.window_ms),
            "csi_chain_ms": stats(&self.chain_ms),
            "member_frozen_ms": stats(&self.member_frozen_ms),
            "longest_write_ms": stats(&self.longest_write_ms),
        })
    }
}

/// One member after another: pre hook, a VolumeSnapshot of its PVC,
/// waiting for its `creationTime`, post hook.
async fn hook_backups(space: &Space, runs: usize, seen: &Seen, load: &Load) -> Result<Hooks> {
    let pods = [
        "pg-0",
        "pg-replica-0",
        "maria-0",
        "maria-replica-0",
        "redis-0",
        "redis-replica-0",
    ];
    let mut ips = Vec::new();
    for pod in pods {
        ips.push(pod_ip(&space.ready(pod).await)?.to_string());
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(space.admin.clone(), &space.ns, &volume_snapshot_resource());
    let mut out = Hooks::default();
    for i in 0..runs {
        let start = micros(SystemTime::now());
        let mut made = Vec::new();
        for (pod, ip) in pods.iter().zip(&ips) {
            let (program, pre, post) = hooks_of(pod, ip);
            let frozen = Instant::now();
            tokio::task::block_in_place(|| hook(program, &pre))?;
            let name = format!("hk-{i}-{pod}");
            let vs = snapshot_of(space, &api, &name, &format!("data-{pod}")).await?;
            tokio::task::block_in_place(|| hook(program, &post))?;
            out.member_frozen_ms
                .push(frozen.elapsed().as_micros() as f64 / 1000.0);
            made.push((name, vs));
        }
        let end = micros(SystemTime::now());
        out.window_ms.push((end - start) / 1000.0);
        // The watches' record of each member's chain, read once the window
        // is over (they may trail the creationTime the hook waited for).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let chain: f64 = made
            .iter()
            .filter_map(|(name, _)| {
                let o = seen.get("vs", name)?;
                let c = seen.content_of("vsc", &o.uid)?.created?;
                Some((c - o.added) / 1000.0)
            })
            .sum();
        out.chain_ms.push(chain);
        out.longest_write_ms.push(load.longest(start, end));
        for (_, vs) in made {
            delete_and_wait(&api, &vs).await?;
        }
    }
    eprintln!("exec hooks: {runs} backups");
    Ok(out)
}

/// Creates VolumeSnapshot `name` of `claim` on the atomic class and waits
/// (through a watch) for its `creationTime`.
async fn snapshot_of(
    space: &Space,
    api: &Api<DynamicObject>,
    name: &str,
    claim: &str,
) -> Result<DynamicObject> {
    let ns = &space.ns;
    let class = lab::ATOMIC_SNAPSHOT_CLASS;
    space
        .apply(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{volumeSnapshotClassName: {class}, source: {{persistentVolumeClaimName: {claim}}}}}"
        ))
        .await;
    tokio::time::timeout(
        BOUND,
        kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&DynamicObject>| {
            o.is_some_and(|o| !o.data["status"]["creationTime"].is_null())
        }),
    )
    .await
    .context("no creationTime in time")??
    .context("the snapshot went")
}

fn stats(v: &[f64]) -> Value {
    json!({ "n": v.len(), "p50": percentile(v, 50.0), "p99": percentile(v, 99.0), "max": percentile(v, 100.0) })
}

/// An arm's figures: p50/p99 of the window, total, chain and their ratio,
/// the median of each phase and of each batch's steps.
fn summary(samples: &[Sample]) -> Value {
    let of = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let ratio: Vec<f64> = samples.iter().map(|s| s.window_ms / s.chain_ms).collect();
    let phases: BTreeMap<&str, f64> = PHASES
        .iter()
        .map(|p| {
            (
                *p,
                percentile(
                    &samples
                        .iter()
                        .filter_map(|s| s.phases.get(p).copied())
                        .collect::<Vec<_>>(),
                    50.0,
                ),
            )
        })
        .collect();
    let batches = samples.iter().map(|s| s.batches.len()).max().unwrap_or(0);
    let steps: Vec<BTreeMap<&str, f64>> = (0..batches)
        .map(|i| {
            STEPS
                .iter()
                .map(|step| {
                    let v: Vec<f64> = samples
                        .iter()
                        .filter_map(|s| s.batches.get(i)?.get(step).copied())
                        .collect();
                    (*step, percentile(&v, 50.0))
                })
                .collect()
        })
        .collect();
    json!({
        "window_ms": stats(&of(|s| s.window_ms)),
        "total_ms": stats(&of(|s| s.total_ms)),
        "csi_chain_ms": stats(&of(|s| s.chain_ms)),
        "wal_copy_chain_ms": stats(&of(|s| s.wal_copy_ms)),
        "window_over_chain": stats(&ratio),
        "longest_write_ms": stats(&of(|s| s.longest_write_ms)),
        "phases_p50_ms": phases,
        "batches_p50_ms_from_request": steps,
    })
}

fn tables(arms: &[(&str, Vec<Sample>)], hooks: Option<&Hooks>) -> String {
    let empty = Hooks::default();
    let hooks = hooks.unwrap_or(&empty);
    let mut out = String::from(
        "Freeze window in the lab (ms)\n\
         arm                        window p50   p99   total p50   CSI chain p50  window/chain p50  longest write p50\n",
    );
    let hook_p50 = percentile(&hooks.window_ms, 50.0);
    for (name, samples) in arms {
        let s = summary(samples);
        let p = |k: &str, q: &str| s[k][q].as_f64().unwrap_or(f64::NAN);
        out.push_str(&format!(
            "{name:<26} {:>10.1} {:>6.1} {:>11.1} {:>14.1} {:>17.2} {:>18.1}\n",
            p("window_ms", "p50"),
            p("window_ms", "p99"),
            p("total_ms", "p50"),
            p("csi_chain_ms", "p50"),
            p("window_over_chain", "p50"),
            p("longest_write_ms", "p50"),
        ));
    }
    out.push_str(&format!(
        "{:<26} {:>10.1} {:>6.1} {:>11} {:>14.1} {:>17} {:>18.1}\n",
        "exec hooks, atomic class",
        hook_p50,
        percentile(&hooks.window_ms, 99.0),
        "-",
        percentile(&hooks.chain_ms, 50.0),
        "-",
        percentile(&hooks.longest_write_ms, 50.0),
    ));
    out.push_str(&format!(
        "exec hooks: each member frozen p50 {:.1} ms, one after another; the CSI chain is \
         the six snapshots' own, summed\n\n",
        percentile(&hooks.member_frozen_ms, 50.0)
    ));
    for (name, samples) in arms {
        let s = summary(samples);
        out.push_str(&format!(
            "{name}: exec hooks' window / this window, p50: {:.1}x\n  phases (p50 ms):",
            hook_p50 / s["window_ms"]["p50"].as_f64().unwrap_or(f64::NAN)
        ));
        for p in PHASES {
            out.push_str(&format!(
                " {p} {:.1};",
                s["phases_p50_ms"][p].as_f64().unwrap_or(f64::NAN)
            ));
        }
        let wal = s["wal_copy_chain_ms"]["p50"].as_f64().unwrap_or(0.0);
        if wal > 0.0 {
            out.push_str(&format!(" (the thaw holds the WAL copy's chain, {wal:.1})"));
        }
        out.push('\n');
        for (i, batch) in s["batches_p50_ms_from_request"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            out.push_str(&format!("  batch {} (p50 ms from its request):", i + 1));
            for step in STEPS {
                out.push_str(&format!(
                    " {step} {:.1};",
                    batch[step].as_f64().unwrap_or(f64::NAN)
                ));
            }
            out.push('\n');
        }
    }
    out
}
