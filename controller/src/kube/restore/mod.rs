//! The GroupRestore reconciler: a GroupBackup restored stage by stage, as
//! `stillpoint plan` orders it.
//!
//! 0. **A content** (`spec.content`) is made again first: the
//!    application's kept objects, its artefacts and its snapshots bound
//!    here by their handles (see `content.rs`); it is then restored as the
//!    backup it records, under the original names.
//! 1. **Copies** under new names: where a member's copy
//!    `<pvcPrefix><workload>` does not exist, it is made from the objects
//!    the backup kept, with its Services and ConfigMaps (see `copies.rs`).
//!    **Checks** before anything else changes: the backup succeeded, every
//!    VolumeSnapshot is there, every member has its workload (the original
//!    in place, the copy otherwise), a copy claims the restored PVCs, and
//!    no PVC of the restore's names exists already.
//! 2. **Down**: the workloads are scaled to zero and their pods waited out
//!    (in place, the originals; otherwise the copies, which must not start
//!    on empty volumes of their own).
//! 3. **Volumes**: in place, the original PVCs are deleted; the PVCs are
//!    made from the snapshots (labelled `stillpoint.dev/restore`, owned by
//!    nobody: restored data outlives its GroupRestore).
//! 4. **Prepare**: a PostgreSQL member whose consistency method is
//!    `backup-label` gets its WAL and `backup_label` (and
//!    `tablespace_map`), and a replica in a copy the restore made gets the
//!    originals' hosts renamed in its replication settings, by the agent
//!    in restore mode, run as a pod on its restored volumes (and the WAL
//!    part's) before its workload starts.
//! 5. **Stages**: in order, primaries before their replicas within a
//!    stage; each workload is scaled to the pods the backup holds of it up
//!    to that point, and the next step starts only when every member pod
//!    of this one is Ready, within `stageTimeout`. A stage that is not
//!    Ready in time fails the restore and holds every later stage (Event,
//!    `stillpoint_restore_order_violations_total`), as does a later stage's
//!    workload found already started.
//! 6. **Positions**: a restored PostgreSQL or MariaDB member with an agent
//!    is asked its position: a primary must hold the position it was
//!    frozen at, a replica the position it was aligned to and no more than
//!    its restored primary.
//!
//! Every step can run again: a restore whose controller stopped is taken
//! up by the next leader from the start, keeping what exists.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use tokio::sync::watch;

use crate::kube::controller::{Context, Live, ReconcileError, now};
use crate::kube::crd::{GroupRestore, RestorePhase};
use crate::kube::reason::Reason;
use crate::kube::store::{Fence, set_condition};
use run::Run;
use workloads::Workloads;

pub use plan::restored_pvc;

/// Checks a GroupRestore's spec alone: its stage timeout, or why it is
/// refused.
pub fn check_spec(spec: &crate::kube::crd::GroupRestoreSpec) -> Result<Duration, String> {
    plan::validate(spec).map_err(|s| s.message)
}

mod check;
mod content;
mod copies;
mod groups;
mod plan;
mod positions;
mod prepare;
mod run;
mod stages;
#[cfg(test)]
mod tests;
mod volumes;
mod workloads;

/// The prefix of restored PVCs (and workload copies) by default.
pub const DEFAULT_PREFIX: &str = "restored-";
/// How long a stage may take to become Ready by default.
pub const DEFAULT_STAGE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often progress is looked at.
const POLL: Duration = Duration::from_millis(500);
/// How long a restored server may take to replay up to its recorded
/// position once Ready.
const POSITION_BOUND: Duration = Duration::from_secs(30);
/// The preparation pod's CPU request: it copies WAL files and writes two.
const PREPARE_CPU_REQUEST: &str = "50m";
/// The preparation pod's memory request and limit (the agent in restore
/// mode streams files; its resident size stays near its own ~10 MiB).
const PREPARE_MEMORY: &str = "64Mi";
/// Where the preparation pod mounts what it reads.
const PREPARE_WAL: &str = "/stillpoint/wal";
const PREPARE_ARTEFACTS: &str = "/stillpoint/artefacts";

/// Why a restore stopped: its `Completed` reason and message.
#[derive(Debug)]
struct Stop {
    reason: Reason,
    message: String,
}

fn stop(reason: Reason, message: impl Into<String>) -> Stop {
    Stop {
        reason,
        message: message.into(),
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        stop(Reason::APIError, e.to_string())
    }
}

async fn finish(run: &mut Run, outcome: Result<usize, Stop>) -> Result<(), kube::Error> {
    let generation = run.restore.metadata.generation;
    let (phase, reason, message) = match outcome {
        Ok(n) => {
            let spec = &run.restore.spec;
            let renamed = run.new_names().is_some();
            let mode = match (spec.volumes_only, spec.content.is_some(), renamed) {
                (true, _, _) => "their PVCs made (volumesOnly: nothing started)",
                (false, true, false) => "restored from nothing under their names, stage by stage",
                (false, true, true) => "restored from nothing under new names, stage by stage",
                (false, false, false) => "restored in place, stage by stage",
                (false, false, true) => "restored under new names, stage by stage",
            };
            (
                RestorePhase::Succeeded,
                Reason::Succeeded,
                format!("{n} members of {} {mode}", run.restore.spec.source()),
            )
        }
        Err(s) => (RestorePhase::Failed, s.reason, s.message),
    };
    if phase == RestorePhase::Failed {
        let failed = run.status.stage;
        for s in &mut run.status.stages {
            match failed {
                Some(f) if s.stage == f && s.phase != "Ready" => s.phase = "Failed".into(),
                Some(f) if s.stage > f => s.phase = "Held".into(),
                None => s.phase = "Held".into(),
                _ => {}
            }
        }
        run.status.error = Some(message.clone());
    }
    run.status.phase = Some(phase);
    run.status.completion_time = Some(now());
    set_condition(
        &mut run.status.conditions,
        "Completed",
        phase == RestorePhase::Succeeded,
        reason,
        &message,
        generation,
    );
    run.save().await?;
    crate::metrics::metrics().restore_ended(Some(&run.ns), phase == RestorePhase::Succeeded);
    run.ctx
        .event(&run.restore, phase == RestorePhase::Failed, reason, message)
        .await;
    Ok(())
}

pub async fn reconcile(r: Arc<GroupRestore>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let uid = r.uid().unwrap_or_default();
    let phase = r.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    if r.metadata.deletion_timestamp.is_some() {
        if let Some(l) = ctx.live.lock().unwrap().get(&uid) {
            let why = format!("GroupRestore {} was deleted", r.name_any());
            let _ = l.cancel.send(Some(why));
        }
        return Ok(Action::await_change());
    }
    if phase.is_final() || ctx.live.lock().unwrap().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    let (run, cancelled, finished) = begin(&r, &ctx).await?;
    tokio::spawn(go(run, cancelled, finished));
    Ok(Action::await_change())
}

/// The restore recorded as `Restoring` and as a run of this process; the
/// run, its cancel receiver and the sender that says it is over.
async fn begin(
    r: &Arc<GroupRestore>,
    ctx: &Arc<Context>,
) -> Result<(Run, watch::Receiver<Option<String>>, watch::Sender<bool>), ReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let uid = r.uid().unwrap_or_default();
    let mut status = r.status.clone().unwrap_or_default();
    let resumed = status.phase == Some(RestorePhase::Restoring);
    status.phase = Some(RestorePhase::Restoring);
    if status.start_time.is_none() {
        status.start_time = Some(now());
    }
    let (cancel, cancelled) = watch::channel(None::<String>);
    let (finished, done) = watch::channel(false);
    let live = Live {
        group: (ns.clone(), format!("restore:{name}")),
        cancel,
        done,
    };
    ctx.live.lock().unwrap().insert(uid.clone(), live);
    let mut run = Run {
        ctx: ctx.clone(),
        restore: (**r).clone(),
        api: Api::namespaced(ctx.client.clone(), &ns),
        status,
        fence: Fence::new(r.resource_version(), r.status.clone()),
        w: Workloads {
            sts: Api::namespaced(ctx.client.clone(), &ns),
            deploy: Api::namespaced(ctx.client.clone(), &ns),
            pods: Api::namespaced(ctx.client.clone(), &ns),
        },
        pvcs: Api::namespaced(ctx.client.clone(), &ns),
        artefacts_secret: match &r.spec.content {
            Some(_) => format!("{name}-artefacts"),
            None => format!("{}-artefacts", r.spec.backup.as_deref().unwrap_or_default()),
        },
        recorded: Default::default(),
        captured: Vec::new(),
        renames: None,
        ns,
        name,
    };
    if let Err(e) = run.save().await {
        ctx.live.lock().unwrap().remove(&uid);
        let _ = finished.send(true);
        return Err(e.into());
    }
    let note = match resumed {
        true => format!("taking up the restore of {} where it was", r.spec.source()),
        false => format!("restoring {}", r.spec.source()),
    };
    ctx.event(&**r, false, Reason::Restoring, note).await;
    Ok((run, cancelled, finished))
}

/// The run, to its outcome or until it is stopped: cancelled (the
/// controller is shutting down, or the restore was deleted) or found gone.
async fn go(
    mut run: Run,
    mut cancelled: watch::Receiver<Option<String>>,
    finished: watch::Sender<bool>,
) {
    let uid = run.uid();
    let gone = gone(run.api.clone(), run.name.clone(), uid.clone());
    let outcome = tokio::select! {
        o = run.run() => Some(o),
        _ = cancelled.wait_for(|c| c.is_some()) => None,
        _ = gone => {
            tracing::warn!(restore = %run.name, namespace = %run.ns, "GroupRestore deleted: stopped where it was; the PVCs it made stay");
            None
        }
    };
    match outcome {
        // Stopped (deleted, or the controller is shutting down): the
        // next leader takes it up; a deleted one is gone.
        None => tracing::info!(restore = %run.name, "restore interrupted"),
        Some(o) => {
            run.release_snapshots().await;
            if let Err(e) = finish(&mut run, o).await {
                tracing::warn!(restore = %run.name, "recording the outcome: {e}");
            }
        }
    }
    run.ctx.live.lock().unwrap().remove(&uid);
    let _ = finished.send(true);
}

/// Returns once GroupRestore `name` (this object: `uid`) is deleted. A
/// GroupRestore has no finalizer (what it made outlives it): its deletion
/// is seen by looking, and stops the run where it is.
async fn gone(api: Api<GroupRestore>, name: String, uid: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match api.get_opt(&name).await {
            Ok(Some(r))
                if r.uid().as_deref() == Some(uid.as_str())
                    && r.metadata.deletion_timestamp.is_none() => {}
            Ok(_) => return,
            Err(e) => tracing::debug!(restore = %name, "looking for the GroupRestore: {e}"),
        }
    }
}
