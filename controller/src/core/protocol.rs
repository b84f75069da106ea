//! The group backup protocol: resolve → prepare → freeze primaries → align
//! replicas → flush → cut → thaw → finalize.
//!
//! Fan-out is parallel over channels opened at resolve. The freeze window
//! (first freeze request to last thaw acknowledgement) is bounded by the
//! group's freeze budget; any failure after the first freeze aborts: every
//! member is thawed, partial snapshots are deleted, and the manifest records
//! the cause. Every snapshot is recorded (in memory at once, in the
//! manifest moments later, off the freeze's path) the moment it exists, so
//! nothing cut before an abort is left behind.
//!
//! Resolve refuses, before anything freezes, a member whose server keeps
//! something crash recovery needs outside the member's volumes (unless the
//! member accepts that gap). Once every member is frozen, each agent
//! flushes: what its engine acknowledged is made durable on its volumes, so
//! that a block-level snapshot holds it. The CLI and (later) the Kubernetes reconciler call this same
//! code; it never knows which engine or snapshotter it drives beyond what
//! the agents describe.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb::{self, agent_client::AgentClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::core::agents::{ControllerTls, OpenFreeze};
use crate::core::error::{ErrorKind, Phase, Problem, Problems};
use crate::core::holder::{Holder, thaw_accepted};
use crate::core::model::{Engine, GroupSpec, MemberSpec, Role};
use crate::core::record::{Consistency, Manifest, MemberRecord, Outcome, ServerPath};
use crate::core::snapshot::{Made, SnapshotHandle, Snapshotter, VolumeRef};
use crate::core::store::BackupStore;
use crate::core::timeline::{Clock, Timeline};
use crate::metrics::{Metrics, ResultLabels};

/// A backup that did not complete; its record (outcome `failed` or
/// `aborted`) is in the store.
#[derive(Debug, thiserror::Error)]
#[error("backup {id} of group {group} failed: {cause}")]
pub struct BackupError {
    pub id: String,
    pub group: String,
    /// Every problem, as one sentence (what the manifest's `error` says).
    pub cause: String,
    /// The problems by phase, member and kind; the first is the cause.
    pub problems: Problems,
    pub manifest: Box<Manifest>,
}

impl BackupError {
    /// What went wrong first (a Condition reason, a metric label).
    pub fn kind(&self) -> ErrorKind {
        self.problems.kind()
    }
}

/// The engine name as the manifest records it.
pub fn engine_name(engine: i32) -> &'static str {
    Engine::from_pb(engine).name()
}

/// The default restore stage of an engine class: databases before
/// everything that depends on them.
pub fn default_stage(engine: Engine) -> u32 {
    engine.default_stage()
}

/// How a member's cut is made consistent.
pub fn consistency(engine: Engine, blocks_writes: bool, atomic: bool) -> Consistency {
    match (atomic, blocks_writes, engine) {
        (true, true, _) => Consistency::Frozen,
        (true, false, _) => Consistency::CrashConsistent,
        (false, _, Engine::Postgres) => Consistency::BackupLabel,
        (false, _, _) => Consistency::FrozenCopy,
    }
}

/// Whether a member may be cut by a non-atomic copy at all (the local
/// `copy` snapshotter, a CSI class whose snapshots are not atomic); `fix`
/// says what to change, in the words of the mode the group is in
/// ([`Snapshotter::copy_fix`]).
pub fn copy_refusal(member: &MemberSpec, engine: Engine, fix: &str) -> Option<String> {
    match engine {
        Engine::Mysql | Engine::Mariadb if !member.fsfreeze => Some(format!(
            "member {} ({engine}, InnoDB) cannot be cut by a snapshot that is not atomic (a copy \
             of its files): InnoDB is consistent in one only while its mount is frozen. {}",
            member.name,
            fix.replace("{member}", &member.name)
        )),
        _ => None,
    }
}

/// The part of `path` below `base`, when it is below (component-wise).
fn is_below(path: &std::path::Path, base: &std::path::Path) -> bool {
    let canon = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    path.starts_with(base) || canon(path).starts_with(canon(base))
}

/// Server paths that are on none of the volumes' `roots` (where their
/// files are): those refused, and those the member accepts
/// (`accept_uncovered`).
pub fn uncovered<'p>(
    paths: &'p [ServerPath],
    roots: &[std::path::PathBuf],
    accepted: &[std::path::PathBuf],
) -> (Vec<&'p ServerPath>, Vec<&'p ServerPath>) {
    paths
        .iter()
        .filter(|p| !roots.iter().any(|v| is_below(&p.path, v)))
        .partition(|p| !accepted.iter().any(|a| is_below(&p.path, a)))
}

/// Where each of a member's volumes has its files: as its agent reports
/// them (`agent`: a block device or an image is wherever it is mounted),
/// or the volume itself when the agent said nothing of it.
pub fn volume_roots(
    volumes: &[std::path::PathBuf],
    agent: &[pb::VolumeRoots],
) -> Vec<std::path::PathBuf> {
    volumes
        .iter()
        .flat_map(
            |v| match agent.iter().find(|r| std::path::Path::new(&r.volume) == v) {
                Some(r) => r.roots.iter().map(std::path::PathBuf::from).collect(),
                None => vec![v.clone()],
            },
        )
        .collect()
}

/// Checks that a member's volumes hold what its server needs; returns the
/// warnings for accepted gaps, or why the member cannot be backed up.
/// `agent_roots`: where its agent found each volume mounted; `accept`:
/// how the member accepts a gap, in the words of its mode (`{path}`,
/// `{member}`: see [`Snapshotter::accept_gap`]).
pub fn coverage(
    member: &MemberSpec,
    engine: Engine,
    paths: &[ServerPath],
    agent_roots: &[pb::VolumeRoots],
    accept: &str,
) -> Result<Vec<String>, String> {
    if member.volumes.is_empty() {
        return Ok(match paths.is_empty() {
            true => Vec::new(),
            false => vec![format!(
                "member {}: lists no volumes, so whether its snapshots hold its server's files \
                 could not be checked",
                member.name
            )],
        });
    }
    let volumes = member
        .volumes
        .iter()
        .map(|v| v.describe())
        .collect::<Vec<_>>()
        .join(", ");
    let volume_paths: Vec<std::path::PathBuf> = member
        .volumes
        .iter()
        .filter_map(|v| v.root().map(std::path::Path::to_path_buf))
        .collect();
    let roots = volume_roots(&volume_paths, agent_roots);
    let (refused, accepted) = uncovered(paths, &roots, &member.accept_uncovered);
    if let Some(first) = refused.first() {
        let all: Vec<String> = refused
            .iter()
            .map(|p| format!("{} {}", p.what, p.path.display()))
            .collect();
        let mounted = match roots.iter().any(|r| !volume_paths.contains(r)) {
            true => format!(
                ", mounted at {}",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            false if roots.len() < volume_paths.len() => {
                ", which its agent finds mounted nowhere".to_string()
            }
            false => String::new(),
        };
        return Err(format!(
            "member {} ({engine}): its server keeps {} outside the member's volumes ({volumes}{mounted}), \
             so a restore from the snapshots would lack {}. Move it onto a snapshotted volume, \
             add its volume to the member, or accept the gap with {}",
            member.name,
            all.join(", "),
            if all.len() == 1 { "it" } else { "them" },
            accept
                .replace("{path}", &first.path.display().to_string())
                .replace("{member}", &member.name)
        ));
    }
    Ok(accepted
        .iter()
        .map(|p| {
            format!(
                "member {}: {} {} is not on the member's volumes ({volumes}); accepted by \
                 accept_uncovered, so a restore from this backup lacks it",
                member.name,
                p.what,
                p.path.display()
            )
        })
        .collect())
}

/// Which cut takes each member (0 first): a primary after every replica
/// of it, a replica of a replica before that one; members without
/// replicas in the group go with the first. See `Run::cut_plan`.
pub fn cut_batches(members: &[&MemberSpec]) -> Vec<usize> {
    // How many primaries up its chain a member is; bounded, so that a
    // cycle in a bad configuration cannot loop.
    let depth = |name: &str| {
        let mut depth = 0;
        let mut at = name;
        while let Some(up) = members
            .iter()
            .find(|m| m.name == at)
            .and_then(|m| m.primary.as_deref())
            .filter(|_| depth < members.len())
        {
            depth += 1;
            at = up;
        }
        depth
    };
    let max = members.iter().map(|m| depth(&m.name)).max().unwrap_or(0);
    members
        .iter()
        .map(|m| {
            let has_replica = members
                .iter()
                .any(|r| r.primary.as_deref() == Some(m.name.as_str()));
            match has_replica {
                true => max - depth(&m.name),
                false => 0,
            }
        })
        .collect()
}

struct Member<'g> {
    config: &'g MemberSpec,
    client: AgentClient<Channel>,
    describe: pb::DescribeResponse,
    /// The freeze stream, opened at prepare.
    open: Option<OpenFreeze>,
    holder: Option<Holder>,
    /// `Some(sync_volumes)`: the member flushes right after its own freeze,
    /// in the same round trip (its freeze blocks every write), set at
    /// prepare.
    flush_at_freeze: Option<bool>,
    /// That flush under way since the freeze was acknowledged.
    early_flush: Option<EarlyFlushing>,
    record: MemberRecord,
}

/// A flush asked for with the freeze: since when (the controller's clock,
/// the freeze acknowledged), and its answer with when it arrived.
struct EarlyFlushing {
    since: u64,
    answer: EarlyAnswer,
}

enum EarlyAnswer {
    /// It came with `frozen`.
    Came(Result<pb::Flushed, String>, u64),
    /// Awaited by the flush phase itself, no task of its own in between;
    /// marked when it arrived at the hold.
    Awaited(crate::core::holder::EarlyFlush, Clock),
}

impl EarlyFlushing {
    fn new(since: u64, clock: Clock, mut answer: crate::core::holder::EarlyFlush) -> Self {
        let answer = match answer.ready() {
            Some((result, at)) => EarlyAnswer::Came(result, clock.us_at(at)),
            None => EarlyAnswer::Awaited(answer, clock),
        };
        EarlyFlushing { since, answer }
    }

    /// The answer: (asked, answered) on the controller's clock, and what
    /// the agent did.
    async fn answered(self) -> ((u64, u64), Result<pb::Flushed, String>) {
        match self.answer {
            EarlyAnswer::Came(result, at) => ((self.since, at), result),
            EarlyAnswer::Awaited(answer, clock) => {
                let (result, at) = answer.answer().await;
                let at = clock.us_at(at);
                ((self.since, at), result)
            }
        }
    }
}

impl Member<'_> {
    fn engine(&self) -> Engine {
        Engine::from_pb(self.describe.engine)
    }

    fn blocks_writes(&self) -> bool {
        self.describe
            .capabilities
            .as_ref()
            .is_some_and(|c| c.blocks_writes)
    }
}

/// Runs group backups: the client identity it dials agents with, and
/// where it counts what it does.
#[derive(Debug, Clone)]
pub struct Protocol {
    pub tls: ControllerTls,
    pub metrics: &'static Metrics,
}

/// One backup to run: of which group, cut by what, recorded where.
pub struct BackupJob<'a> {
    pub group: &'a GroupSpec,
    pub id: &'a str,
    /// The id the agents know its hold by ([`hold_id`]): never one that
    /// another backup or quiesce could also use.
    pub hold: String,
    /// The schedule that started it, if any.
    pub schedule: Option<&'a str>,
    pub snapshotter: Box<dyn Snapshotter>,
    pub store: Arc<dyn BackupStore>,
}

impl std::fmt::Debug for BackupJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupJob")
            .field("group", &self.group.name)
            .field("id", &self.id)
            .field("hold", &self.hold)
            .field("snapshotter", &self.snapshotter)
            .finish_non_exhaustive()
    }
}

/// A backup id: group, UTC time to the millisecond.
pub fn new_backup_id(group: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{group}-{:04}{:02}{:02}-{:02}{:02}{:02}-{:03}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
/// Dials member `m`'s agent with the controller's identity and asks it
/// to describe its server (and which of its volumes hold what).
async fn dial<'g>(
    tls: &ControllerTls,
    group: &GroupSpec,
    m: &'g MemberSpec,
) -> Result<(&'g MemberSpec, AgentClient<Channel>, pb::DescribeResponse), Problem> {
    let mut client = tls
        .connect(&m.agent.addr, &m.agent.identity)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let kind = match text.contains(" presented ") {
                true => ErrorKind::WrongIdentity,
                false => ErrorKind::AgentUnreachable,
            };
            Problem::new(
                Phase::Resolve,
                kind,
                Some(&m.name),
                format!("member {} is not reachable: {text}", m.name),
            )
        })?;
    let request = pb::DescribeRequest {
        volumes: m
            .volumes
            .iter()
            .filter_map(|v| v.root())
            .map(|p| p.display().to_string())
            .collect(),
    };
    let describe =
        crate::core::agents::answer(group.rpc_timeout, "describe", client.describe(request))
            .await
            .map_err(|e| {
                Problem::new(
                    Phase::Resolve,
                    ErrorKind::ServerUnavailable,
                    Some(&m.name),
                    format!("member {}: describe failed: {}", m.name, e.message()),
                )
            })?;
    Ok((m, client, describe))
}

struct Run<'a, 'g> {
    group: &'g GroupSpec,
    metrics: &'static Metrics,
    id: &'a str,
    /// What the agents know the hold by.
    hold: String,
    clock: Clock,
    timeline: Timeline,
    snapshotter: Box<dyn Snapshotter>,
    members: Vec<Member<'g>>,
    /// Every snapshot made, recorded the moment it exists.
    made: Made,
    window_deadline: Option<Instant>,
    cut_us: Option<u64>,
    warnings: Vec<String>,
    /// Writes the manifest (with the snapshots made so far) as members
    /// resolve and snapshots appear.
    recorder: Option<Recorder>,
}

/// Keeps the catalog's running manifest current with the snapshots made,
/// off the freeze's path (the cut does not wait for the write).
struct Recorder {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn spawn(store: Arc<dyn BackupStore>, base: Manifest, made: Made) -> Recorder {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = made.changed() => {}
                }
                let mut manifest = base.clone();
                with_snapshots(&mut manifest, &made);
                if let Err(e) = store.save(&manifest).await {
                    tracing::warn!(backup_id = %base.id, "recording the snapshots made so far: {e}");
                }
            }
        });
        Recorder { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Puts every snapshot made into its member's record, in the order of
/// the member's volumes (snapshots are made in parallel, in any order).
fn with_snapshots(manifest: &mut Manifest, made: &Made) {
    let handles = made.handles();
    for m in &mut manifest.members {
        m.snapshots = handles
            .iter()
            .filter(|h| h.member == m.name)
            .cloned()
            .collect();
        m.snapshots.sort_by_key(|h| h.index);
    }
}

impl Protocol {
    /// A protocol that counts into the process's metrics.
    pub fn new(tls: ControllerTls) -> Self {
        Protocol {
            tls,
            metrics: crate::metrics::metrics(),
        }
    }

    /// Takes one backup, and aborts it (thawing every member, deleting
    /// what was cut, outcome `aborted`) as soon as `cancel` completes.
    /// Always leaves a record in the job's store.
    pub async fn run(
        &self,
        job: BackupJob<'_>,
        cancel: impl Future<Output = String>,
    ) -> Result<Manifest, BackupError> {
        let BackupJob {
            group,
            id,
            hold,
            schedule,
            snapshotter,
            store,
        } = job;
        let ns = group.namespace.as_deref();
        let mut manifest = Manifest::running(id, &group.name, schedule, snapshotter.name());
        if let Err(e) = store.save(&manifest).await {
            let problems = Problems::one(Phase::Record, ErrorKind::StoreFailed, None, e.0);
            return Err(self.failed(&*store, ns, manifest, problems).await);
        }
        let mut run = Run::new(group, self.metrics, id, hold, snapshotter);
        let result = tokio::select! {
            result = run.execute(&self.tls, &store, &manifest) => result,
            reason = cancel => {
                manifest.outcome = Outcome::Aborted;
                Err(Problems::one(Phase::Thaw, ErrorKind::Aborted, None, format!("aborted: {reason}")))
            }
        };
        if result.is_err() {
            run.abort().await;
        }
        run.settle(&mut manifest).await;
        let problems = match result {
            Ok(()) => match self.succeed(&*store, &mut run, &mut manifest).await {
                Ok(()) => return Ok(manifest),
                Err(problems) => problems,
            },
            Err(problems) => {
                tracing::warn!(backup_id = id, cause = %problems, "backup aborted; every member thawed");
                problems
            }
        };
        Err(self.failed(&*store, ns, manifest, problems).await)
    }

    /// Records a backup that succeeded, and counts it. A record that cannot
    /// be written fails the backup and deletes its snapshots (no record
    /// would hold them).
    async fn succeed(
        &self,
        store: &dyn BackupStore,
        run: &mut Run<'_, '_>,
        manifest: &mut Manifest,
    ) -> Result<(), Problems> {
        manifest.outcome = Outcome::Succeeded;
        let Err(e) = store.save(manifest).await else {
            self.count(run.group.namespace.as_deref(), manifest);
            tracing::info!(
                backup_id = run.id,
                window_us = manifest.freeze_window_us.unwrap_or(0),
                "backup succeeded"
            );
            return Ok(());
        };
        manifest.outcome = Outcome::Failed;
        run.abort().await;
        with_snapshots(manifest, &run.made);
        Err(Problems::one(
            Phase::Record,
            ErrorKind::StoreFailed,
            None,
            format!(
                "the manifest could not be written ({}); the backup's snapshots were deleted",
                e.0
            ),
        ))
    }

    /// Records a backup that did not succeed (outcome `failed` unless it
    /// was `aborted`), counts it, and makes its error.
    async fn failed(
        &self,
        store: &dyn BackupStore,
        ns: Option<&str>,
        mut manifest: Manifest,
        problems: Problems,
    ) -> BackupError {
        if matches!(manifest.outcome, Outcome::Running | Outcome::Succeeded) {
            manifest.outcome = Outcome::Failed;
        }
        let cause = match problems.0.first().map(|p| p.phase) {
            Some(Phase::Resolve) => format!("resolve: {problems}"),
            _ => problems.to_string(),
        };
        manifest.error = Some(cause.clone());
        if let Some(first) = problems.0.first() {
            self.metrics
                .backup_failures
                .get_or_create(&crate::metrics::FailureLabels {
                    namespace: crate::metrics::Namespace::of(ns),
                    group: manifest.group.clone(),
                    phase: first.phase.name().to_string(),
                    reason: first.kind.reason().to_string(),
                })
                .inc();
        }
        if let Err(e) = store.save(&manifest).await {
            tracing::error!(backup_id = %manifest.id, "recording the failure: {e}");
        }
        self.count(ns, &manifest);
        BackupError {
            id: manifest.id.clone(),
            group: manifest.group.clone(),
            cause,
            problems,
            manifest: Box::new(manifest),
        }
    }

    /// Counts a finished backup by its outcome.
    fn count(&self, ns: Option<&str>, manifest: &Manifest) {
        self.metrics
            .backups
            .get_or_create(&ResultLabels {
                namespace: crate::metrics::Namespace::of(ns),
                group: manifest.group.clone(),
                result: manifest.outcome.as_str().to_string(),
            })
            .inc();
    }
}

/// One member's freeze (and, for a replica, alignment) as it happened.
struct Frozen {
    name: String,
    requested: u64,
    frozen: u64,
    aligned: Option<u64>,
    error: Option<Problem>,
}

impl Frozen {
    fn failed(name: String, aligned: Option<u64>, error: Problem) -> Frozen {
        Frozen {
            name,
            requested: 0,
            frozen: 0,
            aligned,
            error: Some(error),
        }
    }
}

impl Manifest {
    /// The record of backup `id` of group `group` as it starts.
    fn running(id: &str, group: &str, schedule: Option<&str>, snapshotter: &str) -> Self {
        Manifest {
            id: id.to_string(),
            group: group.to_string(),
            schedule: schedule.map(str::to_string),
            created_at: rfc3339_now(),
            outcome: Outcome::Running,
            error: None,
            snapshotter: snapshotter.to_string(),
            freeze_window_us: None,
            cut_us: None,
            members: Vec::new(),
            timeline: Timeline::default(),
            warnings: Vec::new(),
        }
    }
}

impl<'a, 'g> Run<'a, 'g> {
    fn new(
        group: &'g GroupSpec,
        metrics: &'static Metrics,
        id: &'a str,
        hold: String,
        snapshotter: Box<dyn Snapshotter>,
    ) -> Self {
        Run {
            group,
            metrics,
            id,
            hold,
            clock: Clock::default(),
            timeline: Timeline::default(),
            snapshotter,
            members: Vec::new(),
            made: Made::default(),
            window_deadline: None,
            cut_us: None,
            warnings: Vec::new(),
            recorder: None,
        }
    }

    /// The run over (succeeded or not): what it did goes into `manifest`
    /// (the freeze window, counted, the members, the snapshots, the cut,
    /// the timeline, the warnings).
    async fn settle(&mut self, manifest: &mut Manifest) {
        if let Some(recorder) = self.recorder.take() {
            recorder.stop().await;
        }
        self.release_kept().await;
        self.timeline.origin_unix_us = Some(self.clock.origin_unix_us());
        manifest.freeze_window_us = self.timeline.compute_window();
        if let Some(us) = manifest.freeze_window_us {
            let group = Metrics::group(self.group.namespace.as_deref(), &self.group.name);
            self.metrics
                .freeze_window
                .get_or_create(&group)
                .observe(us as f64 / 1e6);
        }
        manifest.members = self.members.iter().map(|m| m.record.clone()).collect();
        with_snapshots(manifest, &self.made);
        manifest.cut_us = self.cut_us;
        manifest.timeline = self.timeline.clone();
        manifest.warnings = std::mem::take(&mut self.warnings);
    }

    fn mark(&mut self, member: &str, phase: &str) {
        let at = self.clock.now_us();
        self.timeline.mark(member, phase, at);
    }

    fn budget_left(&self, phase: Phase, step: &str) -> Result<Duration, Problems> {
        match self.window_deadline {
            None => Ok(self.group.freeze_budget),
            Some(deadline) => deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| self.over_budget(phase, step).into()),
        }
    }

    fn over_budget(&self, phase: Phase, step: &str) -> Problem {
        Problem::new(
            phase,
            ErrorKind::BudgetExceeded,
            None,
            format!(
                "the freeze budget of {} ms was exceeded during {step}",
                self.group.freeze_budget.as_millis()
            ),
        )
    }

    /// Fails if any hold was lost.
    fn check_holds(&self, phase: Phase, step: &str) -> Result<(), Problems> {
        for m in &self.members {
            if let Some(reason) = m.holder.as_ref().and_then(Holder::lost) {
                return Err(Problems::one(
                    phase,
                    ErrorKind::HoldLost,
                    Some(&m.config.name),
                    format!(
                        "member {} lost its hold before {step}: {reason}",
                        m.config.name
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn execute(
        &mut self,
        tls: &ControllerTls,
        store: &Arc<dyn BackupStore>,
        manifest: &Manifest,
    ) -> Result<(), Problems> {
        self.resolve(tls).await?;
        // From here on, the manifest lists the members and (as they appear)
        // their snapshots.
        let mut running = manifest.clone();
        running.members = self.members.iter().map(|m| m.record.clone()).collect();
        running.warnings = self.warnings.clone();
        self.recorder = Some(Recorder::spawn(store.clone(), running, self.made.clone()));
        self.made.set(Vec::new());
        self.prepare().await?;
        self.freeze().await?;
        self.flush().await?;
        self.check_holds(Phase::Cut, "the cut")?;
        self.cut().await?;
        self.check_holds(Phase::Thaw, "the thaw")?;
        self.thaw().await?;
        self.finalize().await
    }

    async fn resolve(&mut self, tls: &ControllerTls) -> Result<(), Problems> {
        let group = self.group;
        let mut tls = tls.clone();
        tls.connect_timeout = group.connect_timeout;
        let tls = &tls;
        let resolved = join_all(group.members.iter().map(|m| dial(tls, group, m))).await;
        let mut problems = Vec::new();
        for result in resolved {
            match result {
                Ok((config, client, describe)) => {
                    let member = self.admit(config, client, describe, &mut problems);
                    self.members.push(member);
                }
                Err(e) => problems.push(e),
            }
        }
        for warning in &self.warnings {
            tracing::warn!(backup_id = self.id, "{warning}");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(problems))
        }
    }

    /// Member `config` as its agent described it: what keeps it from being
    /// backed up goes to `problems` (its role, a copying snapshotter, its
    /// volumes' coverage), its warnings to the run's.
    fn admit(
        &mut self,
        config: &'g MemberSpec,
        client: AgentClient<Channel>,
        describe: pb::DescribeResponse,
        problems: &mut Vec<Problem>,
    ) -> Member<'g> {
        let engine = Engine::from_pb(describe.engine);
        let role = Role::from_pb(describe.role);
        let expected = config.role;
        let at = |kind, text| Problem::new(Phase::Resolve, kind, Some(&config.name), text);
        if !role.meets(expected) {
            problems.push(at(
                ErrorKind::RoleMismatch,
                format!(
                    "member {} is configured as {expected} but its agent reports {role}",
                    config.name
                ),
            ));
        }
        if !self.snapshotter.atomic()
            && let Some(why) = copy_refusal(config, engine, self.snapshotter.copy_fix())
        {
            problems.push(at(ErrorKind::CopyRefused, why));
        }
        let paths: Vec<ServerPath> = describe
            .paths
            .iter()
            .map(|p| ServerPath {
                what: p.what.clone(),
                path: p.path.clone().into(),
            })
            .collect();
        let accept = self.snapshotter.accept_gap();
        match coverage(config, engine, &paths, &describe.volume_roots, accept) {
            Ok(warnings) => self.warnings.extend(warnings),
            Err(why) => problems.push(at(ErrorKind::NotCovered, why)),
        }
        self.warnings.extend(
            describe
                .warnings
                .iter()
                .map(|w| format!("member {}: {w}", config.name)),
        );
        let record = MemberRecord {
            name: config.name.clone(),
            engine,
            server_version: describe.server_version.clone(),
            role,
            primary: config.primary.clone(),
            position: None,
            aligned_to: None,
            consistency: None,
            restore_stage: config
                .restore_stage
                .unwrap_or_else(|| engine.default_stage()),
            restore_stage_explicit: config.restore_stage.is_some(),
            snapshots: Vec::new(),
            artefacts: BTreeMap::new(),
            freeze_us: None,
            thaw_us: None,
            flush: None,
            flush_us: None,
            paths,
        };
        Member {
            config,
            client,
            describe,
            open: None,
            holder: None,
            flush_at_freeze: None,
            early_flush: None,
            record,
        }
    }

    async fn prepare(&mut self) -> Result<(), Problems> {
        let id = self.hold.as_str();
        let start = self.clock.now_us();
        for m in &self.members {
            self.timeline.mark(&m.config.name, "prepare", start);
        }
        let atomic_cut = self.snapshotter.atomic();
        let bound = self.group.rpc_timeout;
        let results = join_all(self.members.iter_mut().map(|m| async move {
            let request = pb::PrepareRequest {
                backup_id: id.into(),
                atomic_cut,
            };
            crate::core::agents::answer(bound, "prepare", m.client.prepare(request))
                .await
                .map_err(|e| {
                    Problem::new(
                        Phase::Prepare,
                        ErrorKind::PrepareFailed,
                        Some(&m.config.name),
                        format!("member {}: prepare failed: {}", m.config.name, e.message()),
                    )
                })
        }))
        .await;
        let failed: Vec<Problem> = results.into_iter().filter_map(Result::err).collect();
        if !failed.is_empty() {
            return Err(Problems(failed));
        }
        let sync_volumes = !self.snapshotter.sees_page_cache();
        for m in &mut self.members {
            m.open = Some(OpenFreeze::open(&m.client));
            // Nothing such a member acknowledges after its freeze can be
            // missing from a flush made right after it; a member whose
            // writes flow flushes once every member is frozen.
            m.flush_at_freeze = m.blocks_writes().then_some(sync_volumes);
        }
        // Last, so as little as possible is written between it and the cut.
        let volumes: Vec<VolumeRef> = self.cut_plan().into_iter().flatten().collect();
        self.snapshotter.prepare(&volumes).await.map_err(|e| {
            self.metrics.snapshot_failure(
                self.group.namespace.as_deref(),
                &self.group.name,
                e.driver,
                "prepare",
            );
            Problems::one(
                Phase::Prepare,
                ErrorKind::PrepareFailed,
                None,
                format!("preparing the cut: {e}"),
            )
        })?;
        let names: Vec<String> = self.members.iter().map(|m| m.config.name.clone()).collect();
        for name in &names {
            self.mark(name, "prepared");
        }
        Ok(())
    }

    /// Freezes one member (a replica once it reached `align`); returns when
    /// the freeze was requested and when it was acknowledged.
    async fn freeze_one(
        metrics: &Metrics,
        clock: &Clock,
        m: &mut Member<'g>,
        id: &str,
        ttl: Duration,
        bound: Duration,
        align: Option<(pb::Position, Duration)>,
    ) -> Result<(u64, u64, u64), Problem> {
        let requested = clock.now_us();
        let open = m.open.take().unwrap_or_else(|| OpenFreeze::open(&m.client));
        let aligning = align.is_some();
        let held = open.start(id, ttl, align, m.flush_at_freeze);
        let name = m.config.name.as_str();
        let held = tokio::time::timeout(bound, held)
            .await
            .map_err(|_| {
                let kind = match aligning {
                    true => ErrorKind::AlignmentTimeout,
                    false => ErrorKind::BudgetExceeded,
                };
                Problem::new(
                    Phase::Freeze,
                    kind,
                    Some(name),
                    format!(
                        "member {name}: no freeze within the budget ({} ms left)",
                        bound.as_millis()
                    ),
                )
            })?
            .map_err(|e| {
                let kind = match e.code() {
                    tonic::Code::DeadlineExceeded if aligning => ErrorKind::AlignmentTimeout,
                    _ => ErrorKind::FreezeFailed,
                };
                Problem::new(
                    Phase::Freeze,
                    kind,
                    Some(name),
                    format!("member {name}: freeze failed: {}", e.message()),
                )
            })?;
        let frozen = clock.now_us();
        let aligned_us = held.frozen.aligned_us;
        metrics
            .agent_freeze
            .get_or_create(&Metrics::engine(m.engine().name()))
            .observe(held.frozen.freeze_duration_us as f64 / 1e6);
        m.record.freeze_us = Some(held.frozen.freeze_duration_us);
        m.record.position = held.frozen.position.as_ref().map(PositionExt::display);
        m.holder = Some(match m.flush_at_freeze {
            Some(_) => {
                let (holder, answer) = Holder::spawn_flushing(held, ttl);
                m.early_flush = Some(EarlyFlushing::new(frozen, clock.clone(), answer));
                holder
            }
            None => Holder::spawn(held, ttl),
        });
        Ok((requested, frozen, aligned_us))
    }

    /// Freezes every primary (and standalone member) in parallel; each
    /// replica is aligned to its own primary's frozen position and frozen
    /// as soon as that primary is frozen, without waiting for the others.
    async fn freeze(&mut self) -> Result<(), Problems> {
        self.window_deadline = Some(Instant::now() + self.group.freeze_budget);
        let deadline = self.window_deadline.expect("just set");
        let bound = self.budget_left(Phase::Freeze, "the freeze")?;
        let (id, ttl, clock, group, metrics) = (
            self.hold.as_str(),
            self.group.lease_ttl,
            self.clock.clone(),
            self.group,
            self.metrics,
        );
        let align_timeout = group.align_timeout.min(bound);
        let mut primaries = Vec::new();
        let mut replicas: BTreeMap<String, Vec<&mut Member<'g>>> = BTreeMap::new();
        for m in self.members.iter_mut() {
            match (&m.config.role, &m.config.primary) {
                (Role::Replica, Some(p)) => replicas.entry(p.clone()).or_default().push(m),
                _ => primaries.push(m),
            }
        }
        let chains = primaries.into_iter().map(|p| {
            let followers = replicas.remove(&p.config.name).unwrap_or_default();
            let clock = clock.clone();
            async move {
                let mut out = Vec::new();
                let name = p.config.name.clone();
                match Self::freeze_one(metrics, &clock, p, id, ttl, bound, None).await {
                    Ok((requested, frozen, _)) => out.push(Frozen {
                        name,
                        requested,
                        frozen,
                        aligned: None,
                        error: None,
                    }),
                    Err(e) => {
                        out.push(Frozen::failed(name, None, e));
                        return out;
                    }
                }
                let target = p.holder.as_ref().and_then(|h| h.frozen.position.clone());
                let aligned = join_all(followers.into_iter().map(|r| {
                    let (clock, target) = (clock.clone(), target.clone());
                    async move {
                        Self::align_and_freeze(
                            metrics,
                            &clock,
                            r,
                            target,
                            align_timeout,
                            deadline,
                            id,
                            ttl,
                            &Metrics::group(group.namespace.as_deref(), &group.name),
                        )
                        .await
                    }
                }))
                .await;
                out.extend(aligned);
                out
            }
        });
        let results: Vec<Frozen> = join_all(chains).await.into_iter().flatten().collect();
        let mut errors: Vec<Problem> = replicas
            .iter()
            .flat_map(|(p, rs)| {
                rs.iter().map(move |r| {
                    Problem::new(
                        Phase::Freeze,
                        ErrorKind::ReplicaWithoutPrimary,
                        Some(&r.config.name),
                        format!("primary {p} is not a member of the group"),
                    )
                })
            })
            .collect();
        for r in results {
            if let Some(at) = r.aligned {
                self.timeline.mark(&r.name, "aligned", at);
            }
            match r.error {
                None => {
                    self.timeline.mark(&r.name, "freeze_requested", r.requested);
                    self.timeline.mark(&r.name, "frozen", r.frozen);
                }
                Some(e) => errors.push(e),
            }
        }
        if Instant::now() > deadline {
            errors.push(self.over_budget(Phase::Freeze, "the freeze"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Problems(errors))
        }
    }

    /// Waits until replica `m` reaches `target` (its primary's frozen
    /// position), then freezes it.
    #[allow(clippy::too_many_arguments)]
    async fn align_and_freeze(
        metrics: &Metrics,
        clock: &Clock,
        m: &mut Member<'g>,
        target: Option<pb::Position>,
        align_timeout: Duration,
        deadline: Instant,
        id: &str,
        ttl: Duration,
        group: &crate::metrics::GroupLabel,
    ) -> Frozen {
        let name = m.config.name.clone();
        let Some(target) = target else {
            return Frozen::failed(
                name.clone(),
                None,
                Problem::new(
                    Phase::Freeze,
                    ErrorKind::FreezeFailed,
                    Some(&name),
                    format!("member {name}: its primary has no frozen position"),
                ),
            );
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let align = Some((target.clone(), align_timeout.min(left)));
        let bound = left.max(Duration::from_millis(1));
        match Self::freeze_one(metrics, clock, m, id, ttl, bound, align).await {
            Ok((requested, frozen, aligned_us)) => {
                metrics
                    .alignment_wait
                    .get_or_create(group)
                    .observe(aligned_us as f64 / 1e6);
                m.record.aligned_to = Some(target.display());
                // The agent froze right after the wait: on this clock, the
                // freeze was requested when the alignment ended.
                let aligned = (requested + aligned_us).min(frozen);
                Frozen {
                    name,
                    requested: aligned,
                    frozen,
                    aligned: Some(aligned),
                    error: None,
                }
            }
            Err(e) => Frozen::failed(name, None, e),
        }
    }

    /// Once every member is frozen: each agent has made (or now makes)
    /// what its engine acknowledged durable (in parallel) — and on its
    /// volumes (`syncfs`) unless the snapshot sees the page cache — so
    /// that the snapshot holds it. A member whose freeze blocks every
    /// write flushed right after its own freeze (`flush_at_freeze`): only
    /// its answer is awaited here. Any other not before the last freeze:
    /// a member whose writes still flow (PostgreSQL in backup mode) could
    /// otherwise acknowledge, after its flush, a write that a member
    /// frozen later depends on.
    async fn flush(&mut self) -> Result<(), Problems> {
        let bound = self.budget_left(Phase::Flush, "the flush")?;
        let (clock, metrics) = (self.clock.clone(), self.metrics);
        let sync_volumes = !self.snapshotter.sees_page_cache();
        let flushes = join_all(self.members.iter_mut().map(|m| {
            let clock = clock.clone();
            async move {
                let (times, result) = match (m.early_flush.take(), m.holder.as_ref()) {
                    (Some(early), _) => early.answered().await,
                    (None, Some(holder)) => {
                        let requested = clock.now_us();
                        let result = holder.flush(sync_volumes).await;
                        ((requested, clock.now_us()), result)
                    }
                    (None, None) => return (m.config.name.clone(), None, Ok(())),
                };
                let result = result.map(|f| {
                    let us = f.engine_us + f.sync_us;
                    metrics
                        .agent_flush
                        .get_or_create(&Metrics::engine(m.engine().name()))
                        .observe(us as f64 / 1e6);
                    m.record.flush = Some(f.detail);
                    m.record.flush_us = Some(us);
                });
                (
                    m.config.name.clone(),
                    Some(times),
                    Self::flush_problem(m, result),
                )
            }
        }));
        let results = tokio::time::timeout(bound, flushes)
            .await
            .map_err(|_| Problems::from(self.over_budget(Phase::Flush, "the flush")))?;
        let mut errors = Vec::new();
        for (name, times, result) in results {
            if let Some((requested, flushed)) = times {
                self.timeline.mark(&name, "flush_requested", requested);
                self.timeline.mark(&name, "flushed", flushed);
            }
            errors.extend(result.err());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Problems(errors))
        }
    }

    /// A member's failed flush as a problem; the agent's errors name the
    /// member and the step already.
    fn flush_problem(m: &Member<'_>, result: Result<(), String>) -> Result<(), Problem> {
        let name = &m.config.name;
        result.map_err(|e| {
            let text = match e.starts_with("member ") {
                true => e,
                false => format!("member {name}: flush failed: {e}"),
            };
            Problem::new(Phase::Flush, ErrorKind::FlushFailed, Some(name), text)
        })
    }

    /// The order of the cut, as batches of volumes cut one after another:
    /// every replica's volumes, their cut point fixed, before its
    /// primary's (deepest replicas of a cascade first), and every other
    /// member with the first batch.
    ///
    /// Whatever the storage does, a member must be static in what its
    /// restore depends on from its freeze (a replica: its alignment) until
    /// its cut is fixed. A primary need not be: PostgreSQL in `backup`
    /// mode takes writes through the cut, and even a fenced or frozen
    /// primary's replication stream moves (PostgreSQL's running-xacts and
    /// checkpoint records and the flush's own commit, Redis's pings). Its
    /// replica receives that stream into its own volume, so a replica cut
    /// after its primary would restore ahead of it, diverged. Cut first,
    /// the replica's volume holds only what its primary had flushed
    /// before, so the primary's later cut holds all of it. A group
    /// snapshot is one request, not one instant, so this order is never
    /// left to the storage: each batch is a request of its own.
    fn cut_plan(&self) -> Vec<Vec<VolumeRef>> {
        let specs: Vec<&MemberSpec> = self.members.iter().map(|m| m.config).collect();
        let batches = cut_batches(&specs);
        let mut plan: Vec<Vec<VolumeRef>> =
            vec![Vec::new(); batches.iter().max().map_or(0, |b| b + 1)];
        for (m, batch) in specs.iter().zip(batches) {
            plan[batch].extend(VolumeRef::of(m).into_iter().map(|mut v| {
                v.batch = batch;
                v
            }));
        }
        plan.retain(|b| !b.is_empty());
        for (i, batch) in plan.iter_mut().enumerate() {
            batch.iter_mut().for_each(|v| v.batch = i);
        }
        plan
    }

    async fn cut(&mut self) -> Result<(), Problems> {
        let bound = self.budget_left(Phase::Cut, "the cut")?;
        let batches = self.cut_plan();
        let over = self.over_budget(Phase::Cut, "the cut");
        let started = self.clock.now_us();
        let (clock, snapshotter, made, id) = (&self.clock, &self.snapshotter, &self.made, self.id);
        let mut marks = Vec::new();
        let cutting = async {
            for batch in batches.iter().filter(|b| !b.is_empty()) {
                let requested = clock.now_us();
                marks.extend(
                    batch
                        .iter()
                        .map(|v| (v.member.clone(), "cut_requested", requested)),
                );
                if let Err(e) = snapshotter.cut(id, batch, made).await {
                    self.metrics.snapshot_failure(
                        self.group.namespace.as_deref(),
                        &self.group.name,
                        e.driver,
                        "cut",
                    );
                    return Err(Problems::one(
                        Phase::Cut,
                        ErrorKind::CutFailed,
                        None,
                        e.to_string(),
                    ));
                }
                let at = clock.now_us();
                marks.extend(batch.iter().map(|v| (v.member.clone(), "cut", at)));
            }
            Ok(())
        };
        let result = tokio::time::timeout(bound, cutting).await;
        // Each member's cut was requested with its batch and is when its
        // batch was done.
        for (member, phase, at) in marks {
            self.timeline.mark(&member, phase, at);
        }
        result.map_err(|_| Problems::from(over))??;
        let end = self.clock.now_us();
        self.cut_us = Some(end.saturating_sub(started));
        // Members without volumes: the cut point is fixed now.
        let names: Vec<String> = self.members.iter().map(|m| m.config.name.clone()).collect();
        for name in names {
            let phases = self.timeline.members.entry(name).or_default();
            phases.entry("cut".into()).or_insert(end);
        }
        Ok(())
    }

    /// After a cut that copies, tells each PostgreSQL member's agent that
    /// the backup is over (a `Thaw` of its hold, thawed already): the
    /// backup session it kept, whose temporary slot holds the WAL up to
    /// the backup stop, ends now rather than when the agent's own bound
    /// (`STILLPOINT_PG_WAL_RETAIN`) runs out. The WAL is in the copy (or
    /// not needed), and a slot kept per backup would use up
    /// `max_replication_slots` when backups come more often than that.
    async fn release_kept(&self) {
        if self.snapshotter.atomic() {
            return;
        }
        let bound = self.group.rpc_timeout;
        let postgres = self
            .members
            .iter()
            .filter(|m| m.engine() == Engine::Postgres);
        join_all(postgres.map(|m| {
            let mut client = m.client.clone();
            let request = pb::ThawRequest {
                backup_id: self.hold.clone(),
            };
            async move {
                let released = crate::core::agents::answer(bound, "thaw", client.thaw(request));
                if let Err(e) = released.await {
                    let name = &m.config.name;
                    tracing::warn!(
                        backup_id = self.id,
                        "member {name}: releasing the WAL kept for the cut: {e}"
                    );
                }
            }
        }))
        .await;
    }

    /// Thaws the members `which` selects; `completed`: the cut is complete
    /// (agents keep what a restore needs, PostgreSQL's WAL).
    async fn thaw_members(
        &mut self,
        completed: bool,
        which: &(dyn Fn(&Member<'_>) -> bool + Sync),
    ) -> Vec<Problem> {
        let (clock, metrics) = (self.clock.clone(), self.metrics);
        let results = join_all(self.members.iter_mut().filter(|m| which(m)).map(|m| {
            let clock = clock.clone();
            async move {
                let Some(holder) = m.holder.take() else {
                    return (m.config.name.clone(), None, None);
                };
                let requested = clock.now_us();
                let result = holder.thaw(completed).await;
                let thawed = clock.now_us();
                match result {
                    Ok(r) => {
                        metrics
                            .agent_thaw
                            .get_or_create(&Metrics::engine(m.engine().name()))
                            .observe(r.thaw_duration_us as f64 / 1e6);
                        m.record.thaw_us = Some(r.thaw_duration_us);
                        let name = &m.config.name;
                        let err = thaw_accepted(&r).err().map(|e| {
                            Problem::new(
                                Phase::Thaw,
                                ErrorKind::HoldLost,
                                Some(name),
                                format!("member {name}: {e}"),
                            )
                        });
                        m.record.artefacts = r.artefacts.into_iter().collect();
                        (m.config.name.clone(), Some((requested, thawed)), err)
                    }
                    Err(e) => (
                        m.config.name.clone(),
                        Some((requested, thawed)),
                        Some(Problem::new(
                            Phase::Thaw,
                            ErrorKind::ThawFailed,
                            Some(&m.config.name),
                            format!("member {}: thaw failed: {e}", m.config.name),
                        )),
                    ),
                }
            }
        }))
        .await;
        let mut errors = Vec::new();
        for (name, times, err) in results {
            if let Some((requested, thawed)) = times {
                self.timeline.mark(&name, "thaw_requested", requested);
                self.timeline.mark(&name, "thawed", thawed);
            }
            errors.extend(err);
        }
        errors
    }

    /// Copies the WAL up to the backup stop of the members `which`
    /// selects into the cut, every volume at once.
    async fn copy_wal(&self, which: &(dyn Fn(&Member<'_>) -> bool + Sync)) -> Vec<Problem> {
        let (snapshotter, into) = (&self.snapshotter, &self.made);
        let handles = self.wal_copy_handles(which);
        let copies = handles.iter().map(|h| async move {
            let copied = snapshotter.refresh(h, "pg_wal", into).await;
            copied.err().map(|e| {
                let name = &h.member;
                let message = format!("member {name}: copying the WAL: {e}");
                Problem::new(Phase::Thaw, ErrorKind::CutFailed, Some(name), message)
            })
        });
        join_all(copies).await.into_iter().flatten().collect()
    }

    /// The snapshot of each volume of the members `which` selects, to copy
    /// their WAL into: as recorded, or — for a snapshotter whose volume
    /// snapshots are known only after the cut (a group snapshot's, which
    /// the storage's controller makes) — made of the volume alone, its
    /// `handle` empty.
    fn wal_copy_handles(
        &self,
        which: &(dyn Fn(&Member<'_>) -> bool + Sync),
    ) -> Vec<SnapshotHandle> {
        let made = self.made.handles();
        let chosen: BTreeSet<&str> = self
            .members
            .iter()
            .filter(|m| which(m))
            .map(|m| m.config.name.as_str())
            .collect();
        self.cut_plan()
            .into_iter()
            .flatten()
            .filter(|v| chosen.contains(v.member.as_str()))
            .filter_map(|v| {
                let recorded = made
                    .iter()
                    .find(|h| h.member == v.member && h.index == v.index && h.part.is_none());
                match (recorded, self.snapshotter.handles_after_cut()) {
                    (Some(h), _) => Some(h.clone()),
                    (None, true) => Some(SnapshotHandle::new(
                        self.id,
                        v,
                        String::new(),
                        self.snapshotter.name(),
                    )),
                    (None, false) => None,
                }
            })
            .collect()
    }

    async fn thaw(&mut self) -> Result<(), Problems> {
        let mut errors = Vec::new();
        if !self.snapshotter.atomic() {
            // The backup stop is part of a non-atomic cut: it runs before any
            // other member thaws, then the WAL it wrote joins the copy.
            // Every PostgreSQL member holds a backup session; on a copy its
            // consistency point is the backup stop, whatever the mode.
            let backup_mode = |m: &Member<'_>| m.engine() == Engine::Postgres;
            errors.extend(self.thaw_members(true, &backup_mode).await);
            errors.extend(self.copy_wal(&backup_mode).await);
        }
        errors.extend(self.thaw_members(true, &|_| true).await);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Problems(errors))
        }
    }

    async fn finalize(&mut self) -> Result<(), Problems> {
        let mut handles = self.made.handles();
        self.snapshotter.ready(&mut handles).await.map_err(|e| {
            self.metrics.snapshot_failure(
                self.group.namespace.as_deref(),
                &self.group.name,
                e.driver,
                "ready",
            );
            Problems::one(Phase::Finalize, ErrorKind::NotReady, None, e.to_string())
        })?;
        self.made.set(handles);
        let atomic = self.snapshotter.atomic();
        for m in &mut self.members {
            m.record.consistency = Some(consistency(m.engine(), m.blocks_writes(), atomic));
        }
        Ok(())
    }

    /// Thaws every member still held and deletes what was cut. Idempotent.
    async fn abort(&mut self) {
        let errors = self.thaw_members(false, &|_| true).await;
        for e in errors {
            tracing::warn!(backup_id = self.id, "during abort: {e}");
        }
        let made = self.made.handles();
        if !made.is_empty() {
            match self.snapshotter.delete(&made).await {
                Ok(()) => self.made.set(Vec::new()),
                Err(e) => {
                    self.metrics.snapshot_failure(
                        self.group.namespace.as_deref(),
                        &self.group.name,
                        e.driver,
                        "delete",
                    );
                    tracing::warn!(backup_id = self.id, "deleting partial snapshots: {e}");
                }
            }
        }
        if let Err(e) = self.snapshotter.delete_backup(self.id).await {
            self.metrics.snapshot_failure(
                self.group.namespace.as_deref(),
                &self.group.name,
                e.driver,
                "delete",
            );
            tracing::warn!(backup_id = self.id, "deleting partial snapshots: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const LOCAL_ACCEPT: &str = crate::local::config::ACCEPT_GAP;

    fn path(what: &str, path: &str) -> ServerPath {
        ServerPath {
            what: what.into(),
            path: path.into(),
        }
    }

    #[test]
    fn coverage_is_by_whole_path_components_and_acceptance_covers_below() {
        let paths = vec![
            path("datadir", "/srv/maria/data"),
            path("log_bin_basename", "/srv/maria-binlog/binlog"),
            path("relay_log_basename", "/var/log/relay/relay"),
        ];
        let volumes = vec![PathBuf::from("/srv/maria")];
        let (refused, accepted) = uncovered(&paths, &volumes, &[PathBuf::from("/var/log")]);
        // `/srv/maria-binlog` is not below `/srv/maria`.
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].what, "log_bin_basename");
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].what, "relay_log_basename");
    }

    fn spec(name: &str, primary: Option<&str>) -> MemberSpec {
        MemberSpec {
            name: name.into(),
            agent: crate::core::model::AgentEndpoint {
                addr: "127.0.0.1:1".into(),
                identity: "spiffe://x/ns/a/sa/b".into(),
            },
            role: match primary {
                Some(_) => Role::Replica,
                None => Role::Primary,
            },
            primary: primary.map(str::to_string),
            volumes: Vec::new(),
            restore_stage: None,
            fsfreeze: false,
            accept_uncovered: Vec::new(),
        }
    }

    #[test]
    fn replicas_are_cut_before_their_primaries_whatever_else_is_in_the_group() {
        let members = [
            spec("pg-0", None),
            spec("pg-1", Some("pg-0")),
            spec("cache", None),
            spec("maria-0", None),
            spec("maria-1", Some("maria-0")),
            spec("maria-2", Some("maria-1")),
        ];
        let refs: Vec<&MemberSpec> = members.iter().collect();
        let batches = cut_batches(&refs);
        let at = |name: &str| batches[members.iter().position(|m| m.name == name).unwrap()];
        assert!(at("pg-1") < at("pg-0"));
        assert!(at("maria-2") < at("maria-1") && at("maria-1") < at("maria-0"));
        assert_eq!(at("cache"), 0, "a member without replicas goes first");
        // No replicas: one cut.
        let alone = [spec("a", None), spec("b", None)];
        let refs: Vec<&MemberSpec> = alone.iter().collect();
        assert_eq!(cut_batches(&refs), vec![0, 0]);
        // A cycle (a bad configuration) ends.
        let cycle = [spec("x", Some("y")), spec("y", Some("x"))];
        let refs: Vec<&MemberSpec> = cycle.iter().collect();
        assert_eq!(cut_batches(&refs).len(), 2);
    }

    #[test]
    fn a_refusal_names_the_member_the_path_and_the_way_out() {
        let member = MemberSpec {
            name: "pg-0".into(),
            agent: crate::core::model::AgentEndpoint {
                addr: "127.0.0.1:1".into(),
                identity: "spiffe://x/ns/a/sa/b".into(),
            },
            role: Role::Primary,
            primary: None,
            volumes: vec![crate::core::model::VolumeId::Path("/srv/pg".into())],
            restore_stage: None,
            fsfreeze: false,
            accept_uncovered: Vec::new(),
        };
        let err = coverage(
            &member,
            Engine::Postgres,
            &[path("pg_wal", "/wal/pg")],
            &[],
            LOCAL_ACCEPT,
        )
        .unwrap_err();
        for needle in [
            "member pg-0 (postgres)",
            "pg_wal /wal/pg",
            "/srv/pg",
            "accept_uncovered",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
