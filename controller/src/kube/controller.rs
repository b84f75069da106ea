//! `stillpoint controller`: the reconcilers of ConsistencyGroups and
//! GroupBackups, run by the replica that holds the leader Lease.
//!
//! - ConsistencyGroup: resolves its members from pods (and keeps the status
//!   current as pods come and go): conditions `Resolved` and `Protectable`.
//! - GroupBackup: runs the protocol exactly once. A backup found `Running`
//!   with no live run (its controller died) is marked Failed and its
//!   partial snapshots are deleted; its agents thawed by their lease.
//!   Backups of one group run one at a time: a second waits (`Pending`,
//!   condition `Waiting`) until the first ends.
//! - Leader election by a `coordination.k8s.io` Lease (`leader.rs`); on
//!   SIGTERM, or when no renewal succeeded within the renew deadline,
//!   every backup in flight is aborted (its members thawed, its snapshots
//!   deleted), the reconcilers stop, the Lease is released (if it is still
//!   ours), and the process exits.
//! - Reconcile errors are retried with per-object exponential backoff
//!   (1 s doubling, at most 2 min).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::core::agents::ControllerTls;
use crate::core::error::ErrorKind;
use crate::core::holder::hold_id;
use crate::core::protocol::{BackupJob, Protocol};
use crate::core::snapshot::SnapshotError;
use crate::core::snapshot::Snapshotter;
use crate::kube::crd::{
    BackupPhase, BackupSchedule, ConsistencyGroup, ConsistencyGroupStatus, DeletionPolicy,
    FINALIZER, GroupBackup, GroupBackupContent, GroupQuiesce, GroupRestore, SnapshotDriver,
};
use crate::kube::csi::{Csi, CsiGroup, Owner};
use crate::kube::leader::{Backoff, LeaderLease, Timing};
use crate::kube::reason::Reason;
use crate::kube::resolve::{Resolution, Resolver};
use crate::kube::store::{ArtefactsSecretError, FIELD_MANAGER, StatusWriter, set_condition};

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name (the Lease holder, `runBy`, Events' instance).
    pub identity: String,
    /// Where the leader Lease is.
    pub lease_namespace: String,
    pub lease_name: String,
    /// How long leadership lasts and is renewed.
    pub timing: Timing,
    /// The trust domain of the agents' SPIFFE IDs.
    pub trust_domain: String,
    /// How often a group is resolved again without any change.
    pub resync: Duration,
    /// The most reconciles of one kind at once (0: no bound).
    pub max_concurrent_reconciles: u16,
    /// Only this namespace's groups and backups (default: every namespace).
    pub namespace: Option<String>,
    /// The agent image (GroupRestore runs it in restore mode).
    pub agent_image: String,
    /// The shortest interval a BackupSchedule may fire at.
    pub min_schedule_interval: Duration,
}

impl Settings {
    /// The API of `K` in the namespace watched (or in all).
    fn api<K>(&self, client: &kube::Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("lost the leader Lease {0}; every backup in flight was aborted")]
    LostLease(String),
    #[error(
        "the reconcilers stopped ({0}): every backup in flight was aborted and the leader Lease \
         given up, so another replica leads; this one exits to be restarted"
    )]
    ReconcilersStopped(String),
    #[error(
        "lost the leader Lease {0}, and not every run and reconcile stopped within {1:?} (the \
         Lease's duration less its renew deadline): this replica exits, which ends every agent stream it holds and \
         so thaws each hold, before another replica can lead"
    )]
    RunsOutlivedLease(String, Duration),
    #[error("this controller context already ran; a process leads once")]
    AlreadyRan,
    #[error("{0}")]
    Kube(#[from] kube::Error),
}

/// The error a reconcile returns (retried). What ends a backup, quiesce
/// or restore is not one: it is written in the object's status with its
/// [`Reason`].
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A request to the API server failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// Adding or removing the finalizer failed, or the step it wraps did.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<ReconcileError>>),
    /// The GroupBackup watch that readers wait on is not running.
    #[error("the GroupBackup watch is not running")]
    WatchStopped,
    /// A GroupBackupContent deleted while its GroupBackup still exists.
    #[error(
        "GroupBackupContent {content} is still the record of GroupBackup {backup}: delete that instead"
    )]
    ContentInUse { content: String, backup: String },
    /// Stopped (deleted, shutdown, the Lease lost) while recording what it
    /// froze; everything it froze was thawed.
    #[error("stopped before its status was written ({0}); everything it froze was thawed")]
    Cancelled(String),
    /// A backup's snapshots could not be deleted.
    #[error("deleting the snapshots of {backup}: {source}")]
    Snapshots {
        backup: String,
        #[source]
        source: SnapshotError,
    },
}

impl From<kube::runtime::finalizer::Error<ReconcileError>> for ReconcileError {
    fn from(e: kube::runtime::finalizer::Error<ReconcileError>) -> Self {
        ReconcileError::Finalizer(Box::new(e))
    }
}

/// One backup (or quiesce) this process runs.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) group: (String, String),
    pub(crate) cancel: watch::Sender<Option<String>>,
    pub(crate) done: watch::Receiver<bool>,
}

/// What the reconcilers share.
pub struct Context {
    pub client: kube::Client,
    pub resolver: Resolver,
    pub protocol: Protocol,
    pub settings: Settings,
    recorder: Recorder,
    /// Backups and quiesces running in this process, by uid.
    pub(crate) live: Mutex<BTreeMap<String, Live>>,
    /// Every GroupBackup, as the backup reconciler's watch sees them:
    /// groups, backups and schedules read a namespace's backups here
    /// instead of listing them on every reconcile. Set by the one
    /// leadership term of the process.
    backups: std::sync::OnceLock<BackupCache>,
    /// Reconcile errors in a row, per object.
    backoff: Backoff,
    /// When each group's status was last written, by uid (see
    /// [`positions_only`]).
    group_writes: Mutex<BTreeMap<String, std::time::Instant>>,
}

/// A reflector's store of GroupBackups whose readiness any number of
/// readers may await.
///
/// A reflector of its own, ready when its stream says `InitDone`, not the
/// backup Controller's store and not `Store::wait_until_ready`:
/// kube-runtime's `DelayedInit` polls one `futures` oneshot receiver,
/// which keeps only the waker of its latest poll, so of several waiting at
/// once only the last is woken. The Controller's own runner waits on its
/// store that way, so any reader waiting beside it could leave the
/// Controller held for good; and reconciles waiting on a store of their
/// own lost their wakeups likewise. Both were seen: a controller started
/// over 1,000 GroupBackups (a first list of about a second) reconciled
/// nothing. A `tokio::sync::watch` wakes every reader.
#[derive(Debug, Clone)]
pub(crate) struct BackupCache {
    store: Store<GroupBackup>,
    ready: watch::Receiver<bool>,
}

impl BackupCache {
    /// The cache, and the future that fills it from `events` (a watcher's
    /// stream), to be driven beside the reconcilers.
    pub(crate) fn reflect(
        events: impl futures_util::Stream<Item = watcher::Result<watcher::Event<GroupBackup>>>
        + Send
        + 'static,
    ) -> (BackupCache, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let (tx, ready) = watch::channel(false);
        let driver = reflector::reflector(writer, events).for_each(move |event| {
            match event {
                Ok(watcher::Event::InitDone) => {
                    let _ = tx.send(true);
                }
                Err(e) => tracing::warn!("watching GroupBackups: {e}"),
                Ok(_) => {}
            }
            std::future::ready(())
        });
        (BackupCache { store, ready }, driver)
    }

    /// Waits for the first full list; fails if the watch ended before it.
    pub(crate) async fn ready(&self) -> Result<(), watch::error::RecvError> {
        self.ready.clone().wait_for(|r| *r).await.map(|_| ())
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: kube::Client, tls: ControllerTls, settings: Settings) -> Arc<Context> {
        let reporter = Reporter {
            controller: "stillpoint-controller".into(),
            instance: Some(settings.identity.clone()),
        };
        Arc::new(Context {
            backups: std::sync::OnceLock::new(),
            resolver: Resolver {
                client: client.clone(),
                tls: tls.clone(),
                trust_domain: settings.trust_domain.clone(),
            },
            protocol: Protocol::new(tls),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            live: Mutex::new(BTreeMap::new()),
            backoff: Backoff::default(),
            group_writes: Mutex::new(BTreeMap::new()),
        })
    }

    /// The GroupBackups of namespace `ns` from the watch cache (waits for
    /// its first full list). The cache may lag the API by a watch event:
    /// callers decide nothing irreversible from an object's absence.
    pub(crate) async fn backups_in(
        &self,
        ns: &str,
    ) -> Result<Vec<Arc<GroupBackup>>, ReconcileError> {
        let cache = self.backups.get().ok_or(ReconcileError::WatchStopped)?;
        cache
            .ready()
            .await
            .map_err(|_| ReconcileError::WatchStopped)?;
        Ok(cache
            .store
            .state_filter(|b| b.metadata.namespace.as_deref() == Some(ns)))
    }

    /// Cancels what this process runs for `uid` (a backup, a quiesce)
    /// with `why`, and waits until it has ended.
    pub(crate) async fn stop_live(&self, uid: &str, why: String) {
        let live = self.live.lock().unwrap().get(uid).map(|l| {
            let _ = l.cancel.send(Some(why));
            l.done.clone()
        });
        if let Some(mut done) = live {
            let _ = done.wait_for(|d| *d).await;
        }
    }

    pub(crate) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: Reason,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.as_str().into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!("publishing event {reason}: {e}");
        }
    }

    /// Aborts every backup this process runs and waits until each thawed.
    pub async fn abort_all(&self, reason: &str) {
        let waits: Vec<watch::Receiver<bool>> = {
            let live = self.live.lock().unwrap();
            live.values()
                .map(|l| {
                    let _ = l.cancel.send(Some(reason.to_string()));
                    l.done.clone()
                })
                .collect()
        };
        for mut done in waits {
            let _ = done.wait_for(|d| *d).await;
        }
    }
}

/// Now, to the microsecond (backups of a group end within one second).
pub(crate) fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Resolves a group and applies its status.
async fn reconcile_group(
    group: Arc<ConsistencyGroup>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = group.namespace().unwrap_or_default();
    let name = group.name_any();
    let resolution: Resolution = ctx.resolver.resolve(&group).await;
    // The newest successful backup of the group.
    let last = ctx
        .backups_in(&ns)
        .await?
        .into_iter()
        .filter(|b| b.spec.group == name)
        .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Succeeded))
        .max_by_key(|b| {
            b.status
                .as_ref()
                .and_then(|s| s.completion_time.clone())
                .map(|t| t.0)
        })
        .map(|b| b.name_any());
    let old = group.status.clone().unwrap_or_default();
    let generation = group.metadata.generation;
    let mut conditions = old.conditions.clone();
    let r = &resolution.resolved;
    set_condition(
        &mut conditions,
        "Resolved",
        r.ok,
        r.reason,
        &r.message,
        generation,
    );
    let p = &resolution.protectable;
    set_condition(
        &mut conditions,
        "Protectable",
        p.ok,
        p.reason,
        &p.message,
        generation,
    );
    let mut status = ConsistencyGroupStatus {
        observed_generation: generation,
        conditions,
        resolved_members: resolution.members.len() as u32,
        members: resolution.members.clone(),
        last_successful_backup: last,
    };
    crate::kube::store::fit(&mut status, generation);
    let was = old
        .conditions
        .iter()
        .find(|c| c.type_ == "Protectable")
        .map(|c| (c.status.clone(), c.reason.clone()));
    let is = Some((
        if p.ok { "True" } else { "False" }.to_string(),
        p.reason.as_str().to_string(),
    ));
    if status != old && !ctx.position_write_too_soon(&group, &old, &status) {
        let api: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({ "apiVersion": "stillpoint.dev/v1alpha1", "kind": "ConsistencyGroup", "status": status });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    if was != is {
        ctx.event(&*group, !p.ok, p.reason, p.message.clone()).await;
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// Whether two statuses of a group differ only in their members'
/// positions.
fn positions_only(old: &ConsistencyGroupStatus, new: &ConsistencyGroupStatus) -> bool {
    let without = |s: &ConsistencyGroupStatus| {
        let mut s = s.clone();
        for m in &mut s.members {
            m.position = None;
        }
        s
    };
    without(old) == without(new)
}

impl Context {
    /// A group's status that changed only in its members' positions is
    /// written at most once per resync period. Positions move with every
    /// write a database takes (a noop agent's with every Describe), and
    /// each status write is a watch event that reconciles the group again:
    /// written every time, a group of busy members reconciled itself in a
    /// loop, describing its agents and writing its status as fast as it
    /// could, and at 100 groups with 200 agents a spec change waited over
    /// two minutes for its turn.
    fn position_write_too_soon(
        &self,
        group: &ConsistencyGroup,
        old: &ConsistencyGroupStatus,
        new: &ConsistencyGroupStatus,
    ) -> bool {
        let uid = group.uid().unwrap_or_default();
        let mut writes = self.group_writes.lock().unwrap();
        let now = std::time::Instant::now();
        let soon = positions_only(old, new)
            && writes
                .get(&uid)
                .is_some_and(|at| now.duration_since(*at) < self.settings.resync);
        if !soon {
            writes.insert(uid, now);
        }
        soon
    }
}

/// The snapshotter of a group.
async fn snapshotter(
    ctx: &Context,
    group: &ConsistencyGroup,
    owner: Owner,
    atomic: bool,
) -> Result<Box<dyn Snapshotter>, String> {
    let s = &group.spec.snapshot;
    Ok(match s.driver {
        SnapshotDriver::Csi => Box::new(Csi::new(
            ctx.client.clone(),
            owner,
            s.volume_snapshot_class_name.clone(),
            atomic,
        )),
        SnapshotDriver::CsiGroup => Box::new(
            CsiGroup::new(
                ctx.client.clone(),
                owner,
                s.volume_group_snapshot_class_name.clone(),
                atomic,
            )
            .await?,
        ),
    })
}

/// Deletes whatever snapshots a backup made (by their label).
async fn delete_snapshots(ctx: &Context, backup: &GroupBackup) -> Result<(), ReconcileError> {
    let failed = |source| ReconcileError::Snapshots {
        backup: backup.name_any(),
        source,
    };
    let owner = Owner {
        namespace: backup.namespace().unwrap_or_default(),
        backup: backup.name_any(),
        group: backup.spec.group.clone(),
        uid: backup.uid().unwrap_or_default(),
    };
    let id = backup.name_any();
    Csi::new(ctx.client.clone(), owner.clone(), None, true)
        .delete_backup(&id)
        .await
        .map_err(failed)?;
    if let Ok(group) = CsiGroup::new(ctx.client.clone(), owner, None, true).await {
        group.delete_backup(&id).await.map_err(failed)?;
    }
    Ok(())
}

/// Ends a backup that never ran (or whose run is gone) with a reason.
async fn fail(
    ctx: &Context,
    backup: &GroupBackup,
    reason: Reason,
    message: String,
) -> Result<Action, ReconcileError> {
    let writer = StatusWriter::new(ctx.client.clone(), backup);
    let generation = backup.metadata.generation;
    writer
        .update(|s| failed(s, reason, &message, generation))
        .await?;
    ctx.event(backup, true, reason, message).await;
    Ok(Action::await_change())
}

/// A status changed to `Failed` with `reason` and `message`.
fn failed(
    s: &mut crate::kube::crd::GroupBackupStatus,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
) {
    s.phase = Some(BackupPhase::Failed);
    s.error = Some(message.to_string());
    s.completion_time = Some(now());
    set_condition(
        &mut s.conditions,
        "Completed",
        false,
        reason,
        message,
        generation,
    );
    s.conditions.retain(|c| c.type_ != "Waiting");
}

/// A GroupBackup's reconcile, on kube-rs's finalizer (added before
/// anything is made; removed once what the backup made is gone).
async fn reconcile_backup(
    backup: Arc<GroupBackup>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let api: Api<GroupBackup> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, backup, |event| async {
        match event {
            FinalizerEvent::Apply(backup) => backup_step(backup, &ctx).await,
            FinalizerEvent::Cleanup(backup) => cleanup_backup(&backup, &ctx).await,
        }
    })
    .await
    .map_err(ReconcileError::from)
}

/// The backup's state machine: an ended backup rests; one running here is
/// left to its task; one that was running elsewhere is failed (its
/// controller is gone); a pending one is taken.
async fn backup_step(
    backup: Arc<GroupBackup>,
    ctx: &Arc<Context>,
) -> Result<Action, ReconcileError> {
    let phase = backup
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default();
    let uid = backup.uid().unwrap_or_default();
    if phase.is_final() && partial_snapshots_left(&backup) {
        return delete_partial_snapshots(
            ctx,
            &backup,
            &StatusWriter::new(ctx.client.clone(), &backup),
        )
        .await;
    }
    if phase.is_final() || ctx.live.lock().unwrap().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    if matches!(phase, BackupPhase::Running | BackupPhase::Finalizing) {
        return orphaned(&backup, ctx).await;
    }
    take(backup, ctx).await
}

/// Deleted: stops a run of it here, then deletes its snapshots (policy
/// `Delete`).
async fn cleanup_backup(backup: &GroupBackup, ctx: &Context) -> Result<Action, ReconcileError> {
    let why = format!("GroupBackup {} was deleted", backup.name_any());
    ctx.stop_live(&backup.uid().unwrap_or_default(), why).await;
    let ns = backup.namespace().unwrap_or_default();
    // A namespace's deletion is not a deletion of its backups: their
    // contents (and retained snapshot contents) stay.
    if backup.spec.deletion_policy == DeletionPolicy::Delete
        && !crate::kube::content::namespace_terminating(&ctx.client, &ns).await?
    {
        crate::kube::content::release(&ctx.client, backup).await?;
        delete_snapshots(ctx, backup).await?;
        crate::kube::content::delete(&ctx.client, backup).await?;
    }
    Ok(Action::await_change())
}

/// Running, but not here: the controller that ran it is gone. Failed
/// first, over the status seen: if that view is stale (the run ended and
/// recorded it since), the write is refused and nothing is deleted.
async fn orphaned(backup: &GroupBackup, ctx: &Context) -> Result<Action, ReconcileError> {
    let by = backup
        .status
        .as_ref()
        .and_then(|s| s.run_by.clone())
        .unwrap_or_default();
    let message = format!(
        "the controller running this backup ({by}) stopped before it ended; its members thawed \
         when their lease ran out, and its partial snapshots are deleted"
    );
    let writer = StatusWriter::new(ctx.client.clone(), backup);
    let generation = backup.metadata.generation;
    writer
        .update(|s| {
            failed(s, Reason::ControllerRestarted, &message, generation);
            set_condition(
                &mut s.conditions,
                SNAPSHOTS_DELETED,
                false,
                Reason::ControllerRestarted,
                "its partial snapshots are being deleted",
                generation,
            );
        })
        .await?;
    ctx.event(backup, true, Reason::ControllerRestarted, message)
        .await;
    delete_partial_snapshots(ctx, backup, &writer).await
}

/// The condition of a backup failed as orphaned that says whether its
/// partial snapshots are deleted.
const SNAPSHOTS_DELETED: &str = "SnapshotsDeleted";

/// Whether an ended backup's partial snapshots are still to be deleted
/// (its `SnapshotsDeleted` condition is `False`).
fn partial_snapshots_left(backup: &GroupBackup) -> bool {
    backup.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == SNAPSHOTS_DELETED && c.status == "False")
    })
}

/// Deletes the partial snapshots of a backup failed as orphaned and says
/// so (`SnapshotsDeleted`: `True`). An error is retried by the next
/// reconcile, which finds the condition still `False`.
async fn delete_partial_snapshots(
    ctx: &Context,
    backup: &GroupBackup,
    writer: &StatusWriter,
) -> Result<Action, ReconcileError> {
    delete_snapshots(ctx, backup).await?;
    let generation = backup.metadata.generation;
    writer
        .update(|s| {
            set_condition(
                &mut s.conditions,
                SNAPSHOTS_DELETED,
                true,
                Reason::ControllerRestarted,
                "its partial snapshots were deleted",
                generation,
            )
        })
        .await?;
    Ok(Action::await_change())
}

/// Whether another backup of the same group is running (here, or by its
/// status).
async fn group_busy(backup: &GroupBackup, ctx: &Context) -> Result<bool, ReconcileError> {
    let ns = backup.namespace().unwrap_or_default();
    let key = (ns.clone(), backup.spec.group.clone());
    let others = ctx.backups_in(&ns).await?;
    let running_elsewhere = others.iter().any(|b| {
        b.uid() != backup.uid()
            && b.spec.group == backup.spec.group
            && b.metadata.deletion_timestamp.is_none()
            && matches!(
                b.status.as_ref().and_then(|s| s.phase),
                Some(BackupPhase::Running | BackupPhase::Finalizing)
            )
    });
    Ok(running_elsewhere || ctx.live.lock().unwrap().values().any(|l| l.group == key))
}

/// Says once that the backup waits for another of its group.
async fn wait_for_group(backup: &GroupBackup, ctx: &Context) -> Result<Action, ReconcileError> {
    let message = format!(
        "another backup of group {} is running; this one starts when it ends",
        backup.spec.group
    );
    let waiting = backup
        .status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Waiting"));
    if !waiting {
        let generation = backup.metadata.generation;
        StatusWriter::new(ctx.client.clone(), backup)
            .update(|s| {
                s.phase = Some(BackupPhase::Pending);
                set_condition(
                    &mut s.conditions,
                    "Waiting",
                    true,
                    Reason::GroupBusy,
                    &message,
                    generation,
                );
            })
            .await?;
        ctx.event(backup, false, Reason::Waiting, message).await;
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// A pending backup: checks its group, waits its turn, makes its
/// artefacts' Secret, resolves the group, then starts it.
async fn take(backup: Arc<GroupBackup>, ctx: &Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = backup.namespace().unwrap_or_default();
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(group) = groups.get_opt(&backup.spec.group).await? else {
        let message = format!(
            "ConsistencyGroup {} does not exist in namespace {ns}",
            backup.spec.group
        );
        return fail(ctx, &backup, Reason::GroupNotFound, message).await;
    };
    if group_busy(&backup, ctx).await? {
        return wait_for_group(&backup, ctx).await;
    }
    // Before anything freezes: the artefacts' Secret is this backup's to
    // create, never a stranger's to adopt.
    let writer =
        StatusWriter::new(ctx.client.clone(), &backup).keeping_in(&ctx.settings.lease_namespace);
    match writer.create_artefacts_secret().await {
        Ok(()) => {}
        Err(e @ ArtefactsSecretError::Exists(_)) => {
            return fail(ctx, &backup, Reason::ArtefactsSecretExists, e.to_string()).await;
        }
        Err(ArtefactsSecretError::Api(e)) => return Err(e.into()),
    }
    let resolution = ctx.resolver.resolve(&group).await;
    let Some(spec) = resolution.spec.clone() else {
        let p = &resolution.protectable;
        let message = format!(
            "group {} cannot be protected: {}",
            group.name_any(),
            p.message
        );
        return fail(ctx, &backup, p.reason, message).await;
    };
    let owner = Owner {
        namespace: ns,
        backup: backup.name_any(),
        group: backup.spec.group.clone(),
        uid: backup.uid().unwrap_or_default(),
    };
    let snapshotter = match snapshotter(ctx, &group, owner, resolution.atomic).await {
        Ok(s) => s,
        Err(e) => return fail(ctx, &backup, Reason::NoSnapshotClass, e).await,
    };
    let run = Run::new(&backup, spec, snapshotter, writer);
    start(backup, ctx, resolution, run).await
}

/// Registers the run here, records `Running` with its members, and runs
/// the protocol in a task of its own.
async fn start(
    backup: Arc<GroupBackup>,
    ctx: &Arc<Context>,
    resolution: Resolution,
    run: Run,
) -> Result<Action, ReconcileError> {
    let key = (
        backup.namespace().unwrap_or_default(),
        backup.spec.group.clone(),
    );
    let uid = backup.uid().unwrap_or_default();
    {
        let mut live = ctx.live.lock().unwrap();
        if live.values().any(|l| l.group == key) {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let group = key.clone();
        let (cancel, done) = (run.cancel.clone(), run.done.clone());
        live.insert(
            uid,
            Live {
                group,
                cancel,
                done,
            },
        );
    }
    run.record_running(ctx, &resolution).await?;
    let count = resolution.members.len();
    let message = format!("backing up {count} members of group {}", key.1);
    ctx.event(&*backup, false, Reason::Running, message).await;
    tokio::spawn(run.go(ctx.clone()));
    Ok(Action::await_change())
}

/// A backup's protocol run, in its own task.
struct Run {
    backup: GroupBackup,
    spec: crate::core::model::GroupSpec,
    snapshotter: Box<dyn Snapshotter>,
    writer: StatusWriter,
    /// Cancels the run (deletion, shutdown) with why.
    cancel: watch::Sender<Option<String>>,
    cancelled: watch::Receiver<Option<String>>,
    finished: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

impl Run {
    fn new(
        backup: &GroupBackup,
        spec: crate::core::model::GroupSpec,
        snapshotter: Box<dyn Snapshotter>,
        writer: StatusWriter,
    ) -> Run {
        let (cancel, cancelled) = watch::channel(None::<String>);
        let (finished, done) = watch::channel(false);
        let backup = backup.clone();
        Run {
            backup,
            spec,
            snapshotter,
            writer,
            cancel,
            cancelled,
            finished,
            done,
        }
    }

    /// Records `Running`: who runs it, its snapshotter and its members.
    async fn record_running(
        &self,
        ctx: &Context,
        resolution: &Resolution,
    ) -> Result<(), ReconcileError> {
        let (name, snapshotter) = (self.backup.name_any(), &self.snapshotter);
        self.writer.set_members(
            resolution
                .members
                .iter()
                .map(|m| (m.pod.clone(), (m.name.clone(), m.workload.clone())))
                .collect(),
        );
        self.writer
            .update(|s| {
                s.phase = Some(BackupPhase::Running);
                s.backup_id = Some(name.clone());
                s.run_by = Some(ctx.settings.identity.clone());
                s.start_time = Some(now());
                s.snapshotter = Some(snapshotter.name().to_string());
                if snapshotter.name() == "csi-group" {
                    s.volume_group_snapshot = Some(name.clone());
                }
                s.conditions.retain(|c| c.type_ != "Waiting");
                s.members = resolution
                    .members
                    .iter()
                    .map(|m| crate::kube::crd::BackupMember {
                        pod: m.pod.clone(),
                        member: Some(m.name.clone()),
                        workload: m.workload.clone(),
                        ..Default::default()
                    })
                    .collect();
            })
            .await?;
        Ok(())
    }

    /// Runs the protocol, records the outcome and its Event, and leaves.
    async fn go(self, ctx: Arc<Context>) {
        let Run {
            backup,
            spec,
            snapshotter,
            writer,
            mut cancelled,
            finished,
            ..
        } = self;
        let (ns, name) = (backup.namespace().unwrap_or_default(), backup.name_any());
        let uid = backup.uid().unwrap_or_default();
        let cancel = async move {
            let _ = cancelled.wait_for(|c| c.is_some()).await;
            cancelled.borrow().clone().unwrap_or_default()
        };
        let job = BackupJob {
            group: &spec,
            id: &name,
            hold: hold_id("GroupBackup", &format!("{ns}/{name}"), Some(&uid)),
            schedule: None,
            snapshotter,
            store: Arc::new(writer.clone()),
        };
        let result = ctx.protocol.run(job, cancel).await;
        let (phase, reason, message) = outcome(&result);
        let generation = backup.metadata.generation;
        let applied = writer
            .update(|s| {
                s.phase = Some(phase);
                s.completion_time = Some(now());
                let ok = phase == BackupPhase::Succeeded;
                set_condition(
                    &mut s.conditions,
                    "Completed",
                    ok,
                    reason,
                    &message,
                    generation,
                );
            })
            .await;
        if let Err(e) = applied {
            tracing::error!(backup = %name, "recording the outcome: {e}");
        }
        let failed = phase != BackupPhase::Succeeded;
        let reason = match phase {
            BackupPhase::Succeeded => Reason::Succeeded,
            BackupPhase::Aborted => Reason::Run(ErrorKind::Aborted),
            _ => Reason::Failed,
        };
        ctx.event(&backup, failed, reason, message).await;
        ctx.live.lock().unwrap().remove(&uid);
        let _ = finished.send(true);
    }
}

/// A run's phase, reason and message.
fn outcome(
    result: &Result<crate::core::record::Manifest, crate::core::protocol::BackupError>,
) -> (BackupPhase, Reason, String) {
    match result {
        Ok(m) => (
            BackupPhase::Succeeded,
            Reason::Succeeded,
            format!(
                "{} members cut at one consistent point; freeze window {}",
                m.members.len(),
                m.freeze_window_us
                    .map(crate::kube::store::format_us)
                    .unwrap_or_default()
            ),
        ),
        Err(e) => (
            match e.manifest.outcome {
                crate::core::record::Outcome::Aborted => BackupPhase::Aborted,
                _ => BackupPhase::Failed,
            },
            Reason::Run(e.kind()),
            e.cause.clone(),
        ),
    }
}

/// A reconcile error: `object` is retried after its backoff.
fn retry<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let key = object_key(&*object);
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("reconcile of {key} failed (retried in {wait:?}): {error}");
    Action::requeue(wait)
}

/// `kind/namespace/name` of `object`.
fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// `reconcile` of `object`, its backoff forgotten when it succeeds.
async fn backed_off<K, F, Fut>(
    reconcile: F,
    object: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, ReconcileError>>,
{
    let key = object_key(&*object);
    let outcome = reconcile(object, ctx.clone()).await;
    if outcome.is_ok() {
        ctx.backoff.succeeded(&key);
    }
    outcome
}

/// Runs the controller until `shutdown` says why to stop: waits for the
/// Lease, runs the reconcilers while it holds it, and on shutdown aborts
/// what it runs, releases the Lease and returns. `ready` is set while
/// this replica leads.
pub async fn run(
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<Option<String>>,
    ready: watch::Sender<bool>,
) -> Result<(), ControllerError> {
    if ctx.backups.get().is_some() {
        return Err(ControllerError::AlreadyRan);
    }
    let settings = &ctx.settings;
    let lease = LeaderLease::new(
        Api::namespaced(ctx.client.clone(), &settings.lease_namespace),
        &settings.lease_name,
        &settings.identity,
        settings.timing,
    );
    let Some(renewed) = wait_to_lead(&lease, &mut shutdown).await else {
        return Ok(());
    };
    tracing::info!(identity = %ctx.settings.identity, "leading");
    crate::metrics::metrics().leader.set(1);
    let _ = ready.send(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut reconcilers = start_reconcilers(&ctx, stop_rx)?;
    let outcome = keep_leading(&ctx, &lease, renewed, &mut shutdown, &mut reconcilers).await;
    let _ = ready.send(false);
    crate::metrics::metrics().leader.set(0);
    crate::metrics::metrics().state.set(None);
    let reason = match &outcome {
        Ok(()) => shutdown
            .borrow()
            .clone()
            .unwrap_or_else(|| "shutdown".into()),
        Err(e) => e.to_string(),
    };
    tracing::warn!("{reason}: aborting every backup in flight");
    let _ = stop_tx.send(true);
    if let Err(ControllerError::LostLease(lost)) = &outcome {
        // Another replica may lead once the Lease has gone unrenewed for
        // its duration: nothing of this one may still hold by then.
        let timing = lease.timing();
        let grace = timing.lease_duration.saturating_sub(timing.renew_deadline);
        let stopped = tokio::time::timeout(grace, async {
            ctx.abort_all(&reason).await;
            let _ = (&mut reconcilers).await;
        });
        if stopped.await.is_err() {
            reconcilers.abort();
            return Err(ControllerError::RunsOutlivedLease(lost.clone(), grace));
        }
        return outcome;
    }
    ctx.abort_all(&reason).await;
    if !reconcilers.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(10), reconcilers).await;
    }
    if !matches!(outcome, Err(ControllerError::LostLease(_))) {
        lease.release().await;
    }
    outcome
}

/// Tries for the Lease every retry period until this replica leads
/// (`Some(when its winning request was sent)`) or is told to shut down.
async fn wait_to_lead(
    lease: &LeaderLease,
    shutdown: &mut watch::Receiver<Option<String>>,
) -> Option<tokio::time::Instant> {
    let timing = lease.timing();
    loop {
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(timing.renew_deadline, lease.try_acquire()).await {
            Ok(Ok(true)) => return Some(sent),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!("acquiring the leader Lease: {e}"),
            Err(_) => {
                tracing::warn!("acquiring the leader Lease: no answer within the renew deadline")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.retry_period) => {}
            _ = shutdown.wait_for(|s| s.is_some()) => return None,
        }
    }
}

/// Renews the Lease every retry period while the reconcilers run; returns
/// why this replica stops leading (`Ok`: it was told to shut down): no
/// renewal within the renew deadline of the last one (`renewed`: when it
/// was sent), or another replica holds the Lease.
async fn keep_leading(
    ctx: &Context,
    lease: &LeaderLease,
    mut renewed: tokio::time::Instant,
    shutdown: &mut watch::Receiver<Option<String>>,
    reconcilers: &mut tokio::task::JoinHandle<()>,
) -> Result<(), ControllerError> {
    let timing = lease.timing();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(timing.retry_period) => {}
            _ = shutdown.wait_for(|s| s.is_some()) => return Ok(()),
            ended = &mut *reconcilers => return Err(ControllerError::ReconcilersStopped(stopped_because(ended))),
        }
        let renewal = tokio::select! {
            r = lease.renew_by_deadline(renewed) => r,
            _ = shutdown.wait_for(|s| s.is_some()) => return Ok(()),
        };
        match renewal {
            Some(sent) => renewed = sent,
            None => return Err(ControllerError::LostLease(ctx.settings.lease_name.clone())),
        }
    }
}

/// How each reconciler runs: at most `--max-concurrent-reconciles` at once.
fn reconciles(ctx: &Context) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(ctx.settings.max_concurrent_reconciles)
}

/// A future that ends once `stop` says so.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Every reconciler and the GroupBackup cache, in one task, until `stop`.
fn start_reconcilers(
    ctx: &Arc<Context>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ControllerError> {
    let (groups, group_controller) = group_controller(ctx, stop.clone());
    let backups: Api<GroupBackup> = ctx.settings.api(&ctx.client);
    let (cache, backup_cache) = BackupCache::reflect(
        watcher(backups.clone(), watcher::Config::default())
            .default_backoff()
            .take_until(stopped(stop.clone())),
    );
    let backup_store = cache.store.clone();
    ctx.backups
        .set(cache)
        .map_err(|_| ControllerError::AlreadyRan)?;
    let backup_controller = Controller::new(backups, watcher::Config::default())
        .with_config(reconciles(ctx))
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(reconcile_backup, retry, ctx.clone())
        .for_each(|_| async {});
    let quiesces: Api<GroupQuiesce> = ctx.settings.api(&ctx.client);
    let quiesce_controller = Controller::new(quiesces, watcher::Config::default())
        .with_config(reconciles(ctx))
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            |o, c| backed_off(crate::kube::quiesce::reconcile, o, c),
            retry,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let schedules: Api<BackupSchedule> = ctx.settings.api(&ctx.client);
    let schedule_controller =
        Controller::new(schedules, watcher::Config::default()).with_config(reconciles(ctx));
    let schedule_store = schedule_controller.store();
    let schedule_controller = schedule_controller
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            |o, c| backed_off(crate::kube::schedule::reconcile, o, c),
            retry,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let contents: Api<GroupBackupContent> = Api::all(ctx.client.clone());
    let own = match &ctx.settings.namespace {
        Some(ns) => watcher::Config::default().labels(&format!(
            "{}={ns}",
            crate::kube::content::SOURCE_NAMESPACE_LABEL
        )),
        None => watcher::Config::default(),
    };
    let content_controller = Controller::new(contents, own)
        .with_config(reconciles(ctx))
        .watches(
            ctx.settings.api::<GroupBackup>(&ctx.client),
            watcher::Config::default(),
            |b| {
                b.uid()
                    .map(|_| ObjectRef::new(&crate::kube::content::name_of(&b)))
            },
        )
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            |o, c| backed_off(crate::kube::content::reconcile, o, c),
            retry,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let restores: Api<GroupRestore> = ctx.settings.api(&ctx.client);
    let restore_controller =
        Controller::new(restores, watcher::Config::default()).with_config(reconciles(ctx));
    crate::metrics::metrics()
        .state
        .set(Some(Arc::new(crate::kube::state::LeaderState {
            groups,
            schedules: schedule_store,
            backups: backup_store,
            restores: restore_controller.store(),
            min_schedule_interval: ctx.settings.min_schedule_interval,
        })));
    let restore_controller = restore_controller
        .graceful_shutdown_on(stopped(stop))
        .run(
            |o, c| backed_off(crate::kube::restore::reconcile, o, c),
            retry,
            ctx.clone(),
        )
        .for_each(|_| async {});
    Ok(tokio::spawn(async move {
        tokio::join!(
            backup_cache,
            group_controller,
            backup_controller,
            quiesce_controller,
            schedule_controller,
            restore_controller,
            content_controller
        );
    }))
}

/// The ConsistencyGroup reconciler: a group is reconciled again when a pod
/// of its namespace or one of its GroupBackups changes.
fn group_controller(
    ctx: &Arc<Context>,
    stop: watch::Receiver<bool>,
) -> (
    Store<ConsistencyGroup>,
    impl std::future::Future<Output = ()> + use<>,
) {
    let groups: Api<ConsistencyGroup> = ctx.settings.api(&ctx.client);
    let group_controller =
        Controller::new(groups, watcher::Config::default()).with_config(reconciles(ctx));
    let store = group_controller.store();
    let pod_store = store.clone();
    let backup_store = store.clone();
    let run = group_controller
        .watches(
            ctx.settings.api::<Pod>(&ctx.client),
            watcher::Config::default(),
            move |pod| groups_of_pod(&pod_store.state(), &pod),
        )
        .watches(
            ctx.settings.api::<GroupBackup>(&ctx.client),
            watcher::Config::default(),
            move |b| {
                let ns = b.namespace();
                backup_store
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace() == ns && g.name_any() == b.spec.group)
                    .map(|g| ObjectRef::from_obj(&*g))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile_group, retry, ctx.clone())
        .for_each(|_| async {});
    (store, run)
}

/// The groups a pod's change reconciles: those of its namespace that
/// select it, or whose status has it (it was relabelled away). Otherwise
/// every group of the namespace would reconcile, describing its agents
/// over mTLS, at every event of any pod there.
fn groups_of_pod(groups: &[Arc<ConsistencyGroup>], pod: &Pod) -> Vec<ObjectRef<ConsistencyGroup>> {
    let name = pod.name_any();
    let had = |g: &ConsistencyGroup| {
        let members = g.status.iter().flat_map(|s| &s.members);
        members.into_iter().any(|m| m.pod == name)
    };
    groups
        .iter()
        .filter(|g| g.namespace() == pod.namespace())
        .filter(|g| crate::kube::resolve::group_selects(g, pod) || had(g))
        .map(|g| ObjectRef::from_obj(&**g))
        .collect()
}

/// Why the reconcilers' task ended while this replica led: they run until
/// shutdown, so any end is a failure — a panic in one of them ends them
/// all, and a leader left without them would hold the Lease doing nothing.
pub fn stopped_because(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "they ended on their own".into(),
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            format!("a reconciler panicked: {message}")
        }
        Err(e) => format!("their task was cancelled: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_that_moved_only_in_positions_is_told_apart() {
        use crate::kube::crd::ResolvedMember;
        let member = |position: &str| ResolvedMember {
            name: "db".into(),
            pod: "db-0".into(),
            position: Some(position.into()),
            ..Default::default()
        };
        let status = |position: &str, resolved: u32| super::ConsistencyGroupStatus {
            resolved_members: resolved,
            members: vec![member(position)],
            ..Default::default()
        };
        assert!(super::positions_only(
            &status("lsn 1", 1),
            &status("lsn 2", 1)
        ));
        assert!(!super::positions_only(
            &status("lsn 1", 1),
            &status("lsn 2", 2)
        ));
        assert!(!super::positions_only(
            &status("lsn 1", 1),
            &status("lsn 1", 0)
        ));
    }

    use super::*;

    #[test]
    fn a_pods_change_reconciles_only_the_groups_of_its_namespace_that_select_it() {
        let group = |ns: &str, name: &str, members: serde_json::Value| {
            let g: ConsistencyGroup = serde_json::from_value(serde_json::json!({
                "apiVersion": "stillpoint.dev/v1alpha1", "kind": "ConsistencyGroup",
                "metadata": { "name": name, "namespace": ns },
                "spec": { "members": members, "snapshot": { "driver": "csi" } },
            }))
            .unwrap();
            Arc::new(g)
        };
        let by_label = |app: &str| serde_json::json!([{ "name": "m", "selector": { "matchLabels": { "app": app } } }]);
        let groups = vec![
            group("shop", "pg", by_label("pg")),
            group("shop", "cache", by_label("redis")),
            group(
                "shop",
                "ordinal",
                serde_json::json!([{ "name": "m", "statefulSet": { "name": "db", "ordinal": 0 } }]),
            ),
            group("other", "pg", by_label("pg")),
        ];
        let pod = |name: &str, app: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "shop", "labels": { "app": app } },
            }))
            .unwrap()
        };
        let names = |pod: &Pod| -> Vec<String> {
            groups_of_pod(&groups, pod)
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        assert_eq!(names(&pod("pg-0", "pg")), ["pg"]);
        assert_eq!(names(&pod("db-0", "other")), ["ordinal"]);
        assert!(names(&pod("web-0", "web")).is_empty());
        // A pod relabelled away still reconciles the group that had it.
        let mut had = (*groups[1]).clone();
        had.status = Some(
            serde_json::from_value(serde_json::json!({
                "members": [{ "name": "m", "pod": "redis-0" }],
            }))
            .unwrap(),
        );
        let groups = vec![Arc::new(had)];
        let refs = groups_of_pod(&groups, &pod("redis-0", "gone"));
        assert_eq!(
            refs.into_iter().map(|r| r.name).collect::<Vec<_>>(),
            ["cache"]
        );
    }

    /// How many of `readers` waiting at once are woken by a first list.
    async fn woken_of<F: Future<Output = ()> + Send + 'static>(
        readers: usize,
        wait: impl Fn(Store<GroupBackup>, BackupCache) -> F,
    ) -> usize {
        // kube's own store, filled by hand.
        let (store, mut writer) = reflector::store::<GroupBackup>();
        // The cache, filled from a stream fed here.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let events = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        });
        let (cache, driver) = BackupCache::reflect(events);
        tokio::spawn(driver);
        let waiting: Vec<_> = (0..readers)
            .map(|_| tokio::spawn(wait(store.clone(), cache.clone())))
            .collect();
        // Every reader has polled (and parked) before the list comes in.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for event in [watcher::Event::Init, watcher::Event::InitDone] {
            writer.apply_watcher_event(&event);
            tx.send(Ok(event)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        waiting.iter().filter(|w| w.is_finished()).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kube_store_wakes_only_the_last_of_readers_waiting_at_once() {
        // Why `BackupCache` exists: if this ever wakes them all, it may go.
        let woken = woken_of(20, |store, _| async move {
            let _ = store.wait_until_ready().await;
        })
        .await;
        assert!(woken < 20, "kube's store woke all of 20 waiting readers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_reader_waiting_for_the_backup_cache_is_woken() {
        let woken = woken_of(20, |_, cache| async move {
            cache.ready().await.unwrap();
        })
        .await;
        assert_eq!(woken, 20, "readers woken when the first list came in");
    }

    #[tokio::test]
    async fn a_panic_in_one_reconciler_ends_them_all_and_says_why() {
        let quiet = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        };
        let failing = async {
            tokio::task::yield_now().await;
            let members: Vec<u32> = Vec::new();
            let _ = members
                .iter()
                .position(|m| *m == 1)
                .expect("a status for every member");
        };
        let reconcilers = tokio::spawn(async move {
            tokio::join!(quiet, failing);
        });
        let ended = tokio::time::timeout(Duration::from_secs(10), reconcilers)
            .await
            .expect("the task ends at the panic, not when the quiet reconciler would");
        let why = stopped_because(ended);
        assert!(
            why.contains("a reconciler panicked: a status for every member"),
            "{why}"
        );
    }
}
