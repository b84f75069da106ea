//! The GroupRestore reconciler: a GroupBackup restored stage by stage, as
//! `stillpoint plan` orders it.
//!
//! 1. **Checks** before anything changes: the backup succeeded, every
//!    VolumeSnapshot is there, every member has its workload (the original
//!    in place, the copy `<pvcPrefix><name>` otherwise), a copy claims the
//!    restored PVCs, and no PVC of the restore's names exists already.
//! 2. **Down**: the workloads are scaled to zero and their pods waited out
//!    (in place, the originals; otherwise the copies, which must not start
//!    on empty volumes of their own).
//! 3. **Volumes**: in place, the original PVCs are deleted; the PVCs are
//!    made from the snapshots (labelled `stillpoint.dev/restore`, owned by
//!    nobody: restored data outlives its GroupRestore).
//! 4. **Prepare**: a PostgreSQL member whose consistency method is
//!    `backup-label` gets its WAL and `backup_label` (and
//!    `tablespace_map`) by the agent in restore mode, run as a pod on its
//!    restored volumes (and the WAL part's) before its workload starts.
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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodSecurityContext, SecurityContext};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::core::plan::stage_class;
use crate::kube::controller::{Context, Live, ReconcileError, now};
use crate::kube::crd::{
    BackupMember, BackupPhase, GroupBackup, GroupRestore, GroupRestoreStatus, RESTORE_LABEL,
    RESTORE_UID_LABEL, RestorePhase, RestoreStage, RestoredMember, VolumeSnapshotRef, WorkloadRef,
};
use crate::kube::resolve::{agent_port, pod_identity, workload_of};
use crate::kube::store::{apply_status, set_condition};

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
    reason: &'static str,
    message: String,
}

fn stop(reason: &'static str, message: impl Into<String>) -> Stop {
    Stop {
        reason,
        message: message.into(),
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        stop("APIError", e.to_string())
    }
}

/// One member of the backup, as the restore treats it.
#[derive(Debug, Clone)]
struct Planned {
    rec: BackupMember,
    /// The workload to scale (none with `volumesOnly`).
    target: Option<WorkloadRef>,
    /// Its ordinal, for a StatefulSet's pod.
    ordinal: Option<u32>,
    /// The pod that runs it again (a StatefulSet's; a Deployment's pods
    /// have no fixed names).
    restored_pod: Option<String>,
    /// Its snapshots (the whole volume) and the PVC each becomes.
    volumes: Vec<(VolumeSnapshotRef, String)>,
    /// The snapshot of its WAL part (PostgreSQL on a class that copies).
    wal_part: Option<VolumeSnapshotRef>,
}

impl Planned {
    fn is_replica(&self) -> bool {
        self.rec.role.as_deref() == Some("replica")
    }

    fn needs_label(&self) -> bool {
        self.rec.consistency.as_deref() == Some("backup-label")
    }

    /// The step of the plan it starts in: its stage, primaries first.
    fn step(&self) -> (u32, bool) {
        (self.rec.restore_stage, self.is_replica())
    }
}

/// The ordinal of a StatefulSet's pod.
fn ordinal(pod: &str, sts: &str) -> Option<u32> {
    pod.strip_prefix(sts)?.strip_prefix('-')?.parse().ok()
}

/// The name a PVC is restored as (see `GroupRestoreSpec::pvc_prefix`).
pub fn restored_pvc(
    pvc: &str,
    workload: Option<&WorkloadRef>,
    ordinal: Option<u32>,
    prefix: Option<&str>,
) -> String {
    let Some(prefix) = prefix else {
        return pvc.to_string();
    };
    if let (Some(w), Some(n)) = (workload, ordinal)
        && w.kind == "StatefulSet"
        && let Some(template) = pvc.strip_suffix(&format!("-{}-{n}", w.name))
    {
        return format!("{template}-{prefix}{}-{n}", w.name);
    }
    format!("{prefix}{pvc}")
}

/// The members of `backup` in the order the restore starts them.
fn plan(
    backup: &GroupBackup,
    spec: &crate::kube::crd::GroupRestoreSpec,
) -> Result<Vec<Planned>, Stop> {
    let s = backup.status.clone().unwrap_or_default();
    let prefix = (!spec.in_place).then(|| spec.pvc_prefix.as_deref().unwrap_or(DEFAULT_PREFIX));
    let mut planned = Vec::new();
    for m in &s.members {
        let ordinal = m
            .workload
            .as_ref()
            .filter(|w| w.kind == "StatefulSet")
            .and_then(|w| ordinal(&m.pod, &w.name));
        let target = match (&m.workload, spec.volumes_only) {
            (_, true) => None,
            (None, false) => {
                return Err(stop(
                    "NoWorkload",
                    format!(
                        "pod {} was not run by a StatefulSet or Deployment, so there is nothing to scale up; \
                         restore with volumesOnly: true and start it on its PVCs yourself",
                        m.pod
                    ),
                ));
            }
            (Some(w), false) => Some(WorkloadRef {
                kind: w.kind.clone(),
                name: format!("{}{}", prefix.unwrap_or(""), w.name),
            }),
        };
        let restored_pod = match (&target, ordinal) {
            (Some(t), Some(n)) if t.kind == "StatefulSet" => Some(format!("{}-{n}", t.name)),
            _ => None,
        };
        if m.volume_snapshots.iter().all(|v| v.part.is_some()) {
            return Err(stop(
                "NotRestorable",
                format!("pod {} has no VolumeSnapshot in the backup", m.pod),
            ));
        }
        let volumes = m
            .volume_snapshots
            .iter()
            .filter(|v| v.part.is_none())
            .map(|v| {
                let name = restored_pvc(&v.pvc, m.workload.as_ref(), ordinal, prefix);
                (v.clone(), name)
            })
            .collect();
        let wal_part = m
            .volume_snapshots
            .iter()
            .find(|v| v.part.is_some())
            .cloned();
        planned.push(Planned {
            rec: m.clone(),
            target,
            ordinal,
            restored_pod,
            volumes,
            wal_part,
        });
    }
    planned.sort_by(|a, b| {
        a.step()
            .cmp(&b.step())
            .then_with(|| a.rec.pod.cmp(&b.rec.pod))
    });
    Ok(planned)
}

/// How many pods `workload` runs once every step up to `step` started.
fn replicas_up_to(planned: &[Planned], workload: &WorkloadRef, step: Option<(u32, bool)>) -> i32 {
    let of: Vec<&Planned> = planned
        .iter()
        .filter(|p| p.target.as_ref() == Some(workload))
        .filter(|p| step.is_some_and(|s| p.step() <= s))
        .collect();
    match workload.kind.as_str() {
        "StatefulSet" => of
            .iter()
            .filter_map(|p| p.ordinal)
            .map(|n| n as i32 + 1)
            .max()
            .unwrap_or(0),
        _ => of.len() as i32,
    }
}

/// The workload APIs of a namespace.
#[derive(Clone)]
struct Workloads {
    sts: Api<StatefulSet>,
    deploy: Api<Deployment>,
    pods: Api<Pod>,
}

/// What the restore needs of a workload: its replicas, pod selector,
/// template and the claim templates of a StatefulSet.
struct WorkloadInfo {
    replicas: i32,
    selector: BTreeMap<String, String>,
    template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>,
    claim_templates: Vec<String>,
}

impl Workloads {
    async fn get(&self, w: &WorkloadRef) -> Result<Option<WorkloadInfo>, kube::Error> {
        Ok(match w.kind.as_str() {
            "StatefulSet" => self.sts.get_opt(&w.name).await?.map(|s| {
                let spec = s.spec.unwrap_or_default();
                WorkloadInfo {
                    replicas: spec.replicas.unwrap_or(1),
                    selector: spec.selector.match_labels.unwrap_or_default(),
                    template: Some(spec.template),
                    claim_templates: spec
                        .volume_claim_templates
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|c| c.metadata.name)
                        .collect(),
                }
            }),
            _ => self.deploy.get_opt(&w.name).await?.map(|d| {
                let spec = d.spec.unwrap_or_default();
                WorkloadInfo {
                    replicas: spec.replicas.unwrap_or(1),
                    selector: spec.selector.match_labels.unwrap_or_default(),
                    template: Some(spec.template),
                    claim_templates: Vec::new(),
                }
            }),
        })
    }

    async fn scale(&self, w: &WorkloadRef, replicas: i32) -> Result<(), kube::Error> {
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        match w.kind.as_str() {
            "StatefulSet" => self.sts.patch_scale(&w.name, &params, &patch).await?,
            _ => self.deploy.patch_scale(&w.name, &params, &patch).await?,
        };
        Ok(())
    }

    /// The pods `w` runs now.
    async fn pods(&self, w: &WorkloadRef, info: &WorkloadInfo) -> Result<Vec<Pod>, kube::Error> {
        let selector = info
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|p| workload_of(p).as_ref() == Some(w))
            .collect())
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is not Ready, from its status.
fn not_ready_because(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "it has no status yet".into();
    };
    let mut why = Vec::new();
    for c in status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
    {
        if c.ready {
            continue;
        }
        let state = c.state.clone().unwrap_or_default();
        let text = if let Some(w) = state.waiting {
            format!(
                "waiting ({}{})",
                w.reason.unwrap_or_default(),
                w.message.map(|m| format!(": {m}")).unwrap_or_default()
            )
        } else if let Some(t) = state.terminated {
            format!(
                "terminated ({}, exit code {})",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        } else {
            "running but not ready (its readiness probe fails)".into()
        };
        let restarts = match c.restart_count {
            0 => String::new(),
            n => format!(", {n} restarts"),
        };
        why.push(format!("container {} {text}{restarts}", c.name));
    }
    if why.is_empty() {
        for c in status.conditions.iter().flatten() {
            if c.status != "True" {
                why.push(format!(
                    "{} is {}{}",
                    c.type_,
                    c.status,
                    c.message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if why.is_empty() {
        format!("phase {}", status.phase.clone().unwrap_or_default())
    } else {
        why.join("; ")
    }
}

/// The preparation pod's security contexts: who the database runs as (so
/// the restored files are its), and what Pod Security `restricted` asks:
/// not root, no privilege escalation, no capability, the runtime's seccomp
/// profile, a read-only root filesystem.
fn restricted(
    pod: Option<PodSecurityContext>,
    container: Option<SecurityContext>,
) -> (Value, Value) {
    let object = |v: Result<Value, serde_json::Error>| {
        v.ok().filter(Value::is_object).unwrap_or_else(|| json!({}))
    };
    let mut pod = object(serde_json::to_value(pod));
    pod["runAsNonRoot"] = json!(true);
    pod["seccompProfile"] = json!({"type": "RuntimeDefault"});
    let mut container = object(serde_json::to_value(container));
    container["runAsNonRoot"] = json!(true);
    container["allowPrivilegeEscalation"] = json!(false);
    container["readOnlyRootFilesystem"] = json!(true);
    container["capabilities"] = json!({"drop": ["ALL"]});
    (pod, container)
}

/// How restored position `a` stands to recorded position `b`, by engine
/// (`None`: not comparable: GTID sets that each lack what the other has,
/// or an engine whose positions do not survive a restart).
fn compare(engine: &str, a: &str, b: &str) -> Option<std::cmp::Ordering> {
    use stillpoint_proto::PositionExt;
    use stillpoint_proto::pb::GtidFlavor;
    use stillpoint_proto::position::{gtid_from_display, parse_lsn};
    let flavor = match engine {
        "postgres" => return Some(parse_lsn(a)?.cmp(&parse_lsn(b)?)),
        "mariadb" => GtidFlavor::Mariadb,
        "mysql" => GtidFlavor::Mysql,
        _ => return None,
    };
    gtid_from_display(flavor, a)
        .compare(&gtid_from_display(flavor, b))
        .ok()
}

/// Whether a restored server of `engine` must be exactly at the position
/// the backup recorded. A MySQL or MariaDB member was frozen with its
/// commits blocked, so its restored GTID set is the recorded one; a
/// PostgreSQL member's crash recovery writes WAL of its own (and in
/// `backup` mode writes flowed through the cut), so it is at or past it.
fn exact(engine: &str) -> bool {
    matches!(engine, "mariadb" | "mysql")
}

/// Whether restored position `a` is at or past `b` (`None`: not known).
fn reached(engine: &str, a: &str, b: &str) -> Option<bool> {
    match (compare(engine, a, b), exact(engine)) {
        (Some(o), _) => Some(o != std::cmp::Ordering::Less),
        // GTID sets that are not comparable: `a` lacks some of `b`.
        (None, true) => Some(false),
        (None, false) => None,
    }
}

/// What the spec asks, checked alone: the stage bound.
fn validate(spec: &crate::kube::crd::GroupRestoreSpec) -> Result<Duration, Stop> {
    if spec.in_place && spec.volumes_only {
        return Err(stop(
            "InvalidSpec",
            "inPlace with volumesOnly would delete PVCs that running pods still use; scale the workloads \
             to zero yourself and restore inPlace without volumesOnly, or restore under new names",
        ));
    }
    if !spec.in_place && spec.pvc_prefix.as_deref() == Some("") {
        return Err(stop(
            "InvalidSpec",
            "spec.pvcPrefix is empty: that would be the originals' names; use inPlace: true to replace them",
        ));
    }
    match &spec.stage_timeout {
        None => Ok(DEFAULT_STAGE_TIMEOUT),
        Some(t) => stillpoint_proto::duration::parse_duration(t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                stop(
                    "InvalidSpec",
                    format!("spec.stageTimeout {t:?} is not a duration longer than zero"),
                )
            }),
    }
}

/// The running restore: its resource, status and what it works with.
struct Run {
    ctx: Arc<Context>,
    restore: GroupRestore,
    api: Api<GroupRestore>,
    status: GroupRestoreStatus,
    w: Workloads,
    pvcs: Api<PersistentVolumeClaim>,
    ns: String,
    name: String,
}

impl Run {
    async fn save(&mut self) -> Result<(), kube::Error> {
        self.status.observed_generation = self.restore.metadata.generation;
        apply_status(&self.api, &self.name, "GroupRestore", &self.status).await
    }

    /// The status of member `pod` (made if the status lacks it: the
    /// status is read from the API and may have been written by anyone).
    fn member(&mut self, pod: &str) -> &mut RestoredMember {
        let members = &mut self.status.members;
        let i = match members.iter().position(|m| m.pod == pod) {
            Some(i) => i,
            None => {
                members.push(RestoredMember {
                    pod: pod.to_string(),
                    ..Default::default()
                });
                members.len() - 1
            }
        };
        &mut members[i]
    }

    /// The status of `stage` (made if the status lacks it, as above).
    fn stage(&mut self, stage: u32) -> &mut RestoreStage {
        let stages = &mut self.status.stages;
        let i = match stages.iter().position(|s| s.stage == stage) {
            Some(i) => i,
            None => {
                stages.push(RestoreStage {
                    stage,
                    class: stage_class(stage).into(),
                    ..Default::default()
                });
                stages.len() - 1
            }
        };
        &mut stages[i]
    }

    /// A restore taken up again (by a new leader, after a restart) must be
    /// restoring the backup it began with: the same object (uid), planned
    /// into the same members.
    fn same_backup(&self, backup: &GroupBackup, planned: &[Planned]) -> Result<(), Stop> {
        let uid = backup.uid();
        let recorded_uid = self.status.backup_uid.as_ref();
        let pods: BTreeSet<&str> = planned.iter().map(|p| p.rec.pod.as_str()).collect();
        let recorded: BTreeSet<&str> = self.status.members.iter().map(|m| m.pod.as_str()).collect();
        if recorded_uid.is_some_and(|r| Some(r) != uid.as_ref()) || pods != recorded {
            return Err(stop(
                "BackupReplaced",
                format!(
                    "GroupBackup {} is not the backup this restore began with (it was deleted \
                     and made again under its name: uid {} then {}; members {} then {}): \
                     delete this GroupRestore and create a new one",
                    backup.name_any(),
                    recorded_uid.map(String::as_str).unwrap_or("unrecorded"),
                    uid.as_deref().unwrap_or("none"),
                    recorded.into_iter().collect::<Vec<_>>().join(", "),
                    pods.into_iter().collect::<Vec<_>>().join(", "),
                ),
            ));
        }
        Ok(())
    }

    fn snapshots(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.ctx.client.clone(),
            &self.ns,
            &crate::kube::csi::volume_snapshot_resource(),
        )
    }

    fn uid(&self) -> String {
        self.restore.uid().unwrap_or_default()
    }

    fn labels(&self) -> serde_json::Value {
        json!({ RESTORE_LABEL: self.name, RESTORE_UID_LABEL: self.uid() })
    }

    /// Made by this restore (this object, not an earlier one of its name):
    /// its uid label, and the PVC's own uid where it was recorded.
    fn ours(&self, pvc: &PersistentVolumeClaim) -> bool {
        let uid = self.uid();
        let name = pvc.name_any();
        !uid.is_empty()
            && pvc.labels().get(RESTORE_UID_LABEL) == Some(&uid)
            && self
                .status
                .pvc_uids
                .get(&name)
                .is_none_or(|recorded| pvc.uid().as_ref() == Some(recorded))
    }

    /// Waits for `check` (returning why not yet) within `bound`.
    async fn wait<F, Fut>(&self, bound: Duration, mut check: F) -> Result<Option<String>, Stop>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<String>, Stop>>,
    {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let why = check().await?;
            if why.is_none() || tokio::time::Instant::now() >= deadline {
                return Ok(why);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// 1. Everything is checked before anything changes.
    async fn check(&self, planned: &[Planned]) -> Result<(), Stop> {
        let spec = &self.restore.spec;
        let snapshots = self.snapshots();
        for p in planned {
            for v in p.rec.volume_snapshots.iter() {
                let Some(s) = snapshots.get_opt(&v.name).await? else {
                    return Err(stop(
                        "SnapshotNotFound",
                        format!(
                            "VolumeSnapshot {} (PVC {} of pod {}) does not exist",
                            v.name, v.pvc, p.rec.pod
                        ),
                    ));
                };
                if s.data["status"]["readyToUse"] != json!(true) {
                    return Err(stop(
                        "SnapshotNotReady",
                        format!("VolumeSnapshot {} is not ready to use", v.name),
                    ));
                }
            }
            if p.needs_label() && p.rec.data_directory.is_none() {
                return Err(stop(
                    "NotRestorable",
                    format!(
                        "pod {} was cut with a backup_label, but the backup does not record its data directory",
                        p.rec.pod
                    ),
                ));
            }
            if let Some(t) = &p.target {
                let Some(info) = self.w.get(t).await? else {
                    let message = match spec.in_place {
                        true => format!(
                            "{t}, which ran pod {}, does not exist; restore it under new names (without inPlace) into a copy",
                            p.rec.pod
                        ),
                        false => format!(
                            "{t} does not exist: create it as a copy of {} (replicas: 0, labels its group does not \
                             select) to have pod {} restored into it, or restore with volumesOnly: true",
                            p.rec
                                .workload
                                .as_ref()
                                .map(ToString::to_string)
                                .unwrap_or_default(),
                            p.rec.pod
                        ),
                    };
                    return Err(stop("WorkloadNotFound", message));
                };
                for (v, claim) in &p.volumes {
                    let by_name = info
                        .template
                        .iter()
                        .flat_map(|t| t.spec.iter())
                        .flat_map(|s| s.volumes.iter().flatten())
                        .any(|vol| {
                            vol.persistent_volume_claim
                                .as_ref()
                                .is_some_and(|c| &c.claim_name == claim)
                        });
                    let by_template = t.kind == "StatefulSet"
                        && p.restored_pod.as_ref().is_some_and(|pod| {
                            claim
                                .strip_suffix(&format!("-{pod}"))
                                .is_some_and(|tmpl| info.claim_templates.iter().any(|c| c == tmpl))
                        });
                    let claimed = by_name || by_template;
                    if !claimed {
                        return Err(stop(
                            "WorkloadMismatch",
                            format!(
                                "{t} would not mount PVC {claim} (restored from {} of pod {}): give it the volume \
                                 claim template (or claimName) the original has for it",
                                v.pvc, p.rec.pod
                            ),
                        ));
                    }
                }
            }
            if !spec.in_place {
                for (_, claim) in &p.volumes {
                    if let Some(pvc) = self.pvcs.get_opt(claim).await?
                        && !self.ours(&pvc)
                    {
                        return Err(stop(
                            "PVCExists",
                            format!(
                                "PVC {claim} exists and was not made by this restore; delete it or choose another pvcPrefix"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// 2. Every workload down, and its pods gone.
    async fn down(&mut self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
        let targets: BTreeSet<WorkloadRef> =
            planned.iter().filter_map(|p| p.target.clone()).collect();
        for t in &targets {
            self.w.scale(t, 0).await?;
        }
        let w = self.w.clone();
        let left = self
            .wait(bound, || {
                let (w, targets) = (w.clone(), targets.clone());
                async move {
                    let mut left = Vec::new();
                    for t in &targets {
                        if let Some(info) = w.get(t).await? {
                            left.extend(w.pods(t, &info).await?.into_iter().map(|p| p.name_any()));
                        }
                    }
                    Ok((!left.is_empty()).then(|| left.join(", ")))
                }
            })
            .await?;
        if let Some(left) = left {
            return Err(stop(
                "ScaleDownTimedOut",
                format!("scaled to zero, but pods {left} are still there after {bound:?}"),
            ));
        }
        Ok(())
    }

    /// 3. The PVCs, from the snapshots.
    async fn volumes(&mut self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
        let in_place = self.restore.spec.in_place;
        if in_place {
            let mut deleting = Vec::new();
            for p in planned {
                for (_, claim) in &p.volumes {
                    if let Some(pvc) = self.pvcs.get_opt(claim).await?
                        && !self.ours(&pvc)
                    {
                        if pvc.metadata.deletion_timestamp.is_none() {
                            self.pvcs.delete(claim, &DeleteParams::default()).await?;
                        }
                        deleting.push(claim.clone());
                    }
                }
            }
            let pvcs = self.pvcs.clone();
            let left = self
                .wait(bound, || {
                    let (pvcs, deleting) = (pvcs.clone(), deleting.clone());
                    async move {
                        let mut left = Vec::new();
                        for c in &deleting {
                            if pvcs.get_opt(c).await?.is_some() {
                                left.push(c.clone());
                            }
                        }
                        Ok((!left.is_empty()).then(|| left.join(", ")))
                    }
                })
                .await?;
            if let Some(left) = left {
                return Err(stop(
                    "PVCNotDeleted",
                    format!(
                        "the original PVCs {left} are still there after {bound:?} (a pod still uses them?)"
                    ),
                ));
            }
        }
        for p in planned {
            let mut made = Vec::new();
            for (v, claim) in &p.volumes {
                let uid = self.make_pvc(claim, v, false).await?;
                self.status.pvc_uids.insert(claim.clone(), uid);
                made.push(claim.clone());
            }
            if let Some(wal) = &p.wal_part {
                let claim = self.wal_claim(p);
                let uid = self.make_pvc(&claim, wal, true).await?;
                self.status.pvc_uids.insert(claim, uid);
            }
            for c in &made {
                if !self.status.pvcs.contains(c) {
                    self.status.pvcs.push(c.clone());
                }
            }
            let m = self.member(&p.rec.pod);
            m.pvcs = made;
            if m.phase == "Pending" {
                m.phase = "VolumesCreated".into();
            }
        }
        self.save().await?;
        Ok(())
    }

    fn wal_claim(&self, p: &Planned) -> String {
        format!("{}-wal-{}", self.name, p.rec.pod)
    }

    /// A PVC from snapshot `v`, sized and classed as the original was;
    /// returns its uid.
    async fn make_pvc(
        &self,
        claim: &str,
        v: &VolumeSnapshotRef,
        owned: bool,
    ) -> Result<String, Stop> {
        if let Some(pvc) = self.pvcs.get_opt(claim).await? {
            if self.ours(&pvc) {
                return Ok(pvc.uid().unwrap_or_default());
            }
            return Err(stop(
                "PVCExists",
                format!("PVC {claim} exists and was not made by this restore"),
            ));
        }
        // The original's class, access modes and size; the snapshot's
        // restore size when the original is gone.
        let original = self.pvcs.get_opt(&v.pvc).await?.and_then(|p| p.spec);
        let restore_size = self
            .snapshots()
            .get_opt(&v.name)
            .await?
            .and_then(|s| s.data["status"]["restoreSize"].as_str().map(String::from));
        let size = original
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .or(restore_size)
            .unwrap_or_else(|| "1Gi".into());
        let mut spec = json!({
            "accessModes": original.as_ref().and_then(|s| s.access_modes.clone()).unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "resources": {"requests": {"storage": size}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": v.name},
        });
        if let Some(class) = original.as_ref().and_then(|s| s.storage_class_name.clone()) {
            spec["storageClassName"] = json!(class);
        }
        if let Some(mode) = original.as_ref().and_then(|s| s.volume_mode.clone()) {
            spec["volumeMode"] = json!(mode);
        }
        let owners: Vec<_> = match owned {
            true => self.restore.controller_owner_ref(&()).into_iter().collect(),
            false => Vec::new(),
        };
        let pvc = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "labels": self.labels(), "ownerReferences": owners},
            "spec": spec,
        });
        let pvc: PersistentVolumeClaim =
            serde_json::from_value(pvc).map_err(|e| stop("InvalidSpec", e.to_string()))?;
        let made = self.pvcs.create(&Default::default(), &pvc).await?;
        Ok(made.uid().unwrap_or_default())
    }

    /// 4. WAL and `backup_label` in before PostgreSQL starts.
    async fn prepare(&mut self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
        for p in planned.iter().filter(|p| p.needs_label()) {
            // Prepared by an earlier run of this restore: never twice.
            let phase = self.member(&p.rec.pod).phase.as_str();
            if matches!(phase, "Prepared" | "Starting" | "Ready") {
                continue;
            }
            let pod = self.prepare_pod(p).await?;
            let name = pod.name_any();
            let pods = self.w.pods.clone();
            match pods.get_opt(&name).await? {
                // An earlier restore's pod of that name is not this one's:
                // wait for it to go (it goes with its restore).
                Some(old) if old.labels().get(RESTORE_UID_LABEL) != Some(&self.uid()) => {
                    return Err(stop(
                        "PodExists",
                        format!(
                            "pod {name} exists and was not made by this restore (an earlier one of the same \
                             name?); it goes with its own restore: delete it, or retry in a moment"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    pods.create(&Default::default(), &pod).await?;
                }
            }
            let outcome = self
                .wait(bound, || {
                    let (pods, name) = (pods.clone(), name.clone());
                    async move {
                        let pod = pods.get(&name).await?;
                        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                        match phase.as_str() {
                            "Succeeded" => Ok(None),
                            "Failed" => Err(stop(
                                "PrepareFailed",
                                format!(
                                    "preparing a restored data directory: the agent in restore mode failed \
                                     ({}); see `kubectl logs {name}`",
                                    not_ready_because(&pod)
                                ),
                            )),
                            _ => Ok(Some(not_ready_because(&pod))),
                        }
                    }
                })
                .await?;
            if let Some(why) = outcome {
                return Err(stop(
                    "PrepareTimedOut",
                    format!("pod {name} did not finish preparing within {bound:?}: {why}"),
                ));
            }
            let _ = pods.delete(&name, &DeleteParams::default()).await;
            let _ = self
                .pvcs
                .delete(&self.wal_claim(p), &DeleteParams::default())
                .await;
            let m = self.member(&p.rec.pod);
            m.phase = "Prepared".into();
            m.message = Some("WAL and backup_label written by the agent in restore mode".into());
            self.save().await?;
            let note = format!(
                "pod {}: restored data directory prepared to start from its backup_label",
                p.rec.pod
            );
            self.ctx.event(&self.restore, false, "Prepared", note).await;
        }
        Ok(())
    }

    /// The pod that runs the agent in restore mode on `p`'s volumes.
    async fn prepare_pod(&self, p: &Planned) -> Result<Pod, Stop> {
        let data_dir = p.rec.data_directory.clone().unwrap_or_default();
        // The volume holding the data directory, and the directory in it.
        let (holder, relative) = p
            .volumes
            .iter()
            .filter_map(|(v, claim)| {
                let mount = v.mount_path.clone()?;
                let rel = std::path::Path::new(&data_dir).strip_prefix(&mount).ok()?;
                Some(((v.clone(), claim.clone()), rel.display().to_string()))
            })
            .max_by_key(|((v, _), _)| v.mount_path.clone().unwrap_or_default().len())
            .ok_or_else(|| {
                stop(
                    "NotRestorable",
                    format!(
                        "pod {}: no restored volume holds its data directory {data_dir}",
                        p.rec.pod
                    ),
                )
            })?;
        // Who the database runs as (the restored files must be its).
        let template = match &p.target {
            Some(t) => self.w.get(t).await?.and_then(|i| i.template),
            None => None,
        };
        let pod_security: Option<PodSecurityContext> = template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.security_context.clone());
        let container_security: Option<SecurityContext> = template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| {
                        c.volume_mounts
                            .iter()
                            .flatten()
                            .any(|m| Some(&m.mount_path) == holder.0.mount_path.as_ref())
                    })
                    .and_then(|c| c.security_context.clone())
            })
            .map(|c| SecurityContext {
                run_as_user: c.run_as_user,
                run_as_group: c.run_as_group,
                run_as_non_root: c.run_as_non_root,
                ..Default::default()
            });
        let wal_from = p
            .wal_part
            .as_ref()
            .map(|_| format!("{PREPARE_WAL}/{}/pg_wal", relative).replace("//", "/"));
        let secret = format!("{}-artefacts", self.restore.spec.backup);
        let mut env = vec![
            json!({"name": "STILLPOINT_RESTORE_DATA_DIR", "value": data_dir}),
            json!({"name": "STILLPOINT_RESTORE_FROM", "value": PREPARE_ARTEFACTS}),
            json!({"name": "STILLPOINT_RESTORE_MEMBER", "value": p.rec.pod}),
        ];
        if let Some(w) = &wal_from {
            env.push(json!({"name": "STILLPOINT_RESTORE_WAL_FROM", "value": w}));
        }
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        for (i, (v, claim)) in p.volumes.iter().enumerate() {
            let Some(mount) = &v.mount_path else { continue };
            mounts.push(json!({"name": format!("data-{i}"), "mountPath": mount}));
            volumes.push(
                json!({"name": format!("data-{i}"), "persistentVolumeClaim": {"claimName": claim}}),
            );
        }
        if p.wal_part.is_some() {
            mounts.push(json!({"name": "wal", "mountPath": PREPARE_WAL, "readOnly": true}));
            volumes.push(json!({"name": "wal", "persistentVolumeClaim": {"claimName": self.wal_claim(p), "readOnly": true}}));
        }
        mounts.push(json!({"name": "artefacts", "mountPath": PREPARE_ARTEFACTS, "readOnly": true}));
        volumes.push(
            json!({"name": "artefacts", "secret": {"secretName": secret, "defaultMode": 0o444}}),
        );
        let (pod_security, container_security) = restricted(pod_security, container_security);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("{}-prepare-{}", self.name, p.rec.pod),
                "labels": self.labels(),
                "ownerReferences": self.restore.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": pod_security,
                "containers": [{
                    "name": "restore",
                    "image": self.ctx.settings.agent_image,
                    "args": ["restore"],
                    "env": env,
                    "securityContext": container_security,
                    "resources": {
                        "requests": {"cpu": PREPARE_CPU_REQUEST, "memory": PREPARE_MEMORY},
                        "limits": {"memory": PREPARE_MEMORY},
                    },
                    "volumeMounts": mounts,
                }],
                "volumes": volumes,
            },
        });
        serde_json::from_value(pod).map_err(|e| stop("InvalidSpec", e.to_string()))
    }

    /// 5 and 6. The stages, in order.
    async fn stages(&mut self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
        let steps: BTreeSet<(u32, bool)> = planned.iter().map(Planned::step).collect();
        let targets: BTreeSet<WorkloadRef> =
            planned.iter().filter_map(|p| p.target.clone()).collect();
        let mut previous: Option<(u32, bool)> = None;
        for step in steps {
            let (stage, _) = step;
            // A workload of a later step found started breaks the order.
            for t in &targets {
                let allowed = replicas_up_to(planned, t, previous);
                if let Some(info) = self.w.get(t).await?
                    && info.replicas > allowed
                {
                    crate::metrics::metrics().restore_order_violations.inc();
                    return Err(stop(
                        "OrderViolation",
                        format!(
                            "{t} runs {} pods before its stage: at most {allowed} may run before stage {stage} starts \
                             (was it scaled by hand?)",
                            info.replicas
                        ),
                    ));
                }
            }
            self.status.stage = Some(stage);
            let s = self.stage(stage);
            if s.phase == "Waiting" {
                s.phase = "Starting".into();
                s.started_at = Some(now());
            }
            let members: Vec<&Planned> = planned.iter().filter(|p| p.step() == step).collect();
            for p in &members {
                self.member(&p.rec.pod).phase = "Starting".into();
            }
            self.save().await?;
            for t in &targets {
                let want = replicas_up_to(planned, t, Some(step));
                if want > replicas_up_to(planned, t, previous) {
                    self.w.scale(t, want).await?;
                }
            }
            let note = format!(
                "stage {stage} ({}): starting {}",
                stage_class(stage),
                members
                    .iter()
                    .map(|p| p.restored_pod.clone().unwrap_or_else(|| p.rec.pod.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.ctx
                .event(&self.restore, false, "StageStarting", note)
                .await;
            // Every member pod of the step Ready.
            let w = self.w.clone();
            let wanted: Vec<(String, Option<String>, Option<WorkloadRef>, i32)> = members
                .iter()
                .map(|p| {
                    let t = p.target.clone();
                    let n = t
                        .as_ref()
                        .map(|t| replicas_up_to(planned, t, Some(step)))
                        .unwrap_or(0);
                    (p.rec.pod.clone(), p.restored_pod.clone(), t, n)
                })
                .collect();
            let why = self
                .wait(bound, || {
                    let (w, wanted) = (w.clone(), wanted.clone());
                    async move {
                        let mut why = Vec::new();
                        for (pod, restored, t, n) in &wanted {
                            let Some(t) = t else { continue };
                            match restored {
                                Some(name) => match w.pods.get_opt(name).await? {
                                    None => why.push(format!(
                                        "pod {name} ({pod} restored) has not been created"
                                    )),
                                    Some(p) if !is_ready(&p) => why.push(format!(
                                        "pod {name} ({pod} restored) is not Ready: {}",
                                        not_ready_because(&p)
                                    )),
                                    Some(_) => {}
                                },
                                None => {
                                    let Some(info) = w.get(t).await? else {
                                        why.push(format!("{t} is gone"));
                                        continue;
                                    };
                                    let pods = w.pods(t, &info).await?;
                                    let ready = pods.iter().filter(|p| is_ready(p)).count() as i32;
                                    if ready < *n {
                                        let detail = pods
                                            .iter()
                                            .filter(|p| !is_ready(p))
                                            .map(|p| {
                                                format!(
                                                    "{}: {}",
                                                    p.name_any(),
                                                    not_ready_because(p)
                                                )
                                            })
                                            .collect::<Vec<_>>()
                                            .join("; ");
                                        why.push(
                                            format!("{t} has {ready} of {n} pods Ready {detail}")
                                                .trim()
                                                .to_string(),
                                        );
                                    }
                                }
                            }
                        }
                        Ok((!why.is_empty()).then(|| why.join("; ")))
                    }
                })
                .await?;
            if let Some(why) = why {
                for p in &members {
                    let m = self.member(&p.rec.pod);
                    m.phase = "Failed".into();
                }
                let later: Vec<String> = self
                    .status
                    .stages
                    .iter()
                    .filter(|s| s.stage > stage)
                    .map(|s| format!("{} ({})", s.stage, s.class))
                    .collect();
                crate::metrics::metrics().restore_order_violations.inc();
                let held = match later.is_empty() {
                    true => String::new(),
                    false => format!("; later stages {} were not started", later.join(", ")),
                };
                return Err(stop(
                    "StageNotReady",
                    format!(
                        "stage {stage} ({}) is not Ready after {bound:?}: {why}{held}",
                        stage_class(stage)
                    ),
                ));
            }
            for p in &members {
                let m = self.member(&p.rec.pod);
                m.phase = "Ready".into();
            }
            self.save().await?;
            self.check_positions(planned, &members).await?;
            previous = Some(step);
            let last_of_stage = !planned
                .iter()
                .any(|p| p.rec.restore_stage == stage && p.step() > step);
            if last_of_stage {
                let s = self.stage(stage);
                s.phase = "Ready".into();
                s.ready_at = Some(now());
                self.save().await?;
                let note = format!("stage {stage} ({}) is Ready", stage_class(stage));
                self.ctx
                    .event(&self.restore, false, "StageReady", note)
                    .await;
            }
        }
        Ok(())
    }

    /// The restored server's position, through its agent (if it has one).
    async fn position_of(&self, pod: &str) -> Result<Option<String>, String> {
        let Some(p) = self.w.pods.get_opt(pod).await.map_err(|e| e.to_string())? else {
            return Err(format!("pod {pod} is gone"));
        };
        let (Some(port), Some(ip)) = (
            agent_port(&p),
            p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        ) else {
            return Ok(None);
        };
        let identity = pod_identity(&self.ctx.settings.trust_domain, &p);
        let d = self
            .ctx
            .resolver
            .describe(
                &format!("{ip}:{port}"),
                &identity,
                Duration::from_secs(5),
                crate::core::agents::DEFAULT_RPC_TIMEOUT,
            )
            .await
            .map_err(|v| v.message)?;
        Ok(d.position)
    }

    /// 6. Restored servers hold what the backup recorded for them.
    async fn check_positions(
        &mut self,
        planned: &[Planned],
        members: &[&Planned],
    ) -> Result<(), Stop> {
        for p in members {
            let engine = p.rec.engine.clone().unwrap_or_default();
            if !matches!(engine.as_str(), "postgres" | "mariadb" | "mysql") {
                self.member(&p.rec.pod).check = Some(format!(
                    "not checked: {engine} positions do not survive a restart"
                ));
                continue;
            }
            let Some(pod) = p.restored_pod.clone() else {
                self.member(&p.rec.pod).check =
                    Some("not checked: a Deployment's pods have no fixed names".into());
                continue;
            };
            let (must, what) = match (p.is_replica(), exact(&engine)) {
                (true, false) => (
                    p.rec.aligned_to.clone().or(p.rec.position.clone()),
                    "the position it was aligned to",
                ),
                _ => (p.rec.position.clone(), "the position it was frozen at"),
            };
            let Some(must) = must else {
                self.member(&p.rec.pod).check =
                    Some("not checked: the backup recorded no position".into());
                continue;
            };
            // Replay may still be going on once Ready: wait for it, bounded.
            let deadline = tokio::time::Instant::now() + POSITION_BOUND;
            let position = loop {
                match self.position_of(&pod).await {
                    Err(e) => {
                        return Err(stop(
                            "PositionCheckFailed",
                            format!("asking pod {pod}'s agent its position: {e}"),
                        ));
                    }
                    Ok(None) => break None,
                    Ok(Some(at)) => {
                        if reached(&engine, &at, &must) != Some(false)
                            || tokio::time::Instant::now() >= deadline
                        {
                            break Some(at);
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            };
            let Some(at) = position else {
                self.member(&p.rec.pod).check =
                    Some("not checked: the restored pod has no agent".into());
                continue;
            };
            self.member(&p.rec.pod).position = Some(at.clone());
            if reached(&engine, &at, &must) == Some(false) {
                return Err(stop(
                    "PositionCheckFailed",
                    format!(
                        "restored pod {pod} is at {at}, short of {what} ({must}) within {POSITION_BOUND:?}: the restored data lacks what the backup promised"
                    ),
                ));
            }
            if exact(&engine) && compare(&engine, &at, &must) != Some(std::cmp::Ordering::Equal) {
                return Err(stop(
                    "PositionCheckFailed",
                    format!(
                        "restored pod {pod} is at {at}, past {what} ({must}): it holds transactions \
                         the backup did not record, so its data is not this backup's"
                    ),
                ));
            }
            let mut check = match exact(&engine) {
                true => format!("ok: {at} is exactly {what}"),
                false => format!("ok: {at} holds {what} ({must})"),
            };
            if p.is_replica()
                && let Some(primary) = planned
                    .iter()
                    .find(|q| Some(&q.rec.pod) == p.rec.primary.as_ref())
                && let Some(primary_pod) = &primary.restored_pod
                && let Ok(Some(theirs)) = self.position_of(primary_pod).await
            {
                if reached(&engine, &theirs, &at) == Some(false) {
                    return Err(stop(
                        "PositionCheckFailed",
                        format!(
                            "restored replica {pod} is at {at}, ahead of its restored primary {primary_pod} at {theirs}"
                        ),
                    ));
                }
                check.push_str(&format!(", not ahead of {primary_pod} ({theirs})"));
            }
            self.member(&p.rec.pod).check = Some(check);
        }
        self.save().await?;
        Ok(())
    }

    async fn run(&mut self) -> Result<usize, Stop> {
        let spec = self.restore.spec.clone();
        let bound = validate(&spec)?;
        let backups: Api<GroupBackup> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(backup) = backups.get_opt(&spec.backup).await? else {
            return Err(stop(
                "BackupNotFound",
                format!(
                    "GroupBackup {} does not exist in namespace {}",
                    spec.backup, self.ns
                ),
            ));
        };
        let phase = backup
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        if phase != BackupPhase::Succeeded {
            return Err(stop(
                "BackupNotRestorable",
                format!(
                    "GroupBackup {} is {}; only a backup that succeeded can be restored",
                    spec.backup,
                    phase.as_str()
                ),
            ));
        }
        let planned = plan(&backup, &spec)?;
        if !self.status.members.is_empty() {
            self.same_backup(&backup, &planned)?;
        } else {
            self.status.backup_uid = backup.uid();
            self.status.members = planned
                .iter()
                .map(|p| RestoredMember {
                    pod: p.rec.pod.clone(),
                    restored_pod: p.restored_pod.clone(),
                    workload: p.target.clone(),
                    stage: p.rec.restore_stage,
                    engine: p.rec.engine.clone(),
                    role: p.rec.role.clone(),
                    phase: "Pending".into(),
                    ..Default::default()
                })
                .collect();
            let mut stages: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            for p in &planned {
                stages
                    .entry(p.rec.restore_stage)
                    .or_default()
                    .push(p.rec.pod.clone());
            }
            self.status.stages = stages
                .into_iter()
                .map(|(stage, members)| RestoreStage {
                    stage,
                    class: stage_class(stage).into(),
                    phase: "Waiting".into(),
                    members,
                    ..Default::default()
                })
                .collect();
            self.save().await?;
        }
        self.check(&planned).await?;
        if !spec.volumes_only {
            self.down(&planned, bound).await?;
        }
        self.volumes(&planned, bound).await?;
        self.prepare(&planned, bound).await?;
        if !spec.volumes_only {
            self.stages(&planned, bound).await?;
        }
        Ok(planned.len())
    }
}

async fn finish(run: &mut Run, outcome: Result<usize, Stop>) -> Result<(), kube::Error> {
    let generation = run.restore.metadata.generation;
    let (phase, reason, message) = match outcome {
        Ok(n) => {
            let mode = match (run.restore.spec.in_place, run.restore.spec.volumes_only) {
                (_, true) => "their PVCs made (volumesOnly: nothing started)",
                (true, false) => "restored in place, stage by stage",
                (false, false) => "restored under new names, stage by stage",
            };
            (
                RestorePhase::Succeeded,
                "Succeeded",
                format!(
                    "{n} members of GroupBackup {} {mode}",
                    run.restore.spec.backup
                ),
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
    run.ctx
        .event(&run.restore, phase == RestorePhase::Failed, reason, message)
        .await;
    Ok(())
}

pub async fn reconcile(r: Arc<GroupRestore>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let uid = r.uid().unwrap_or_default();
    let phase = r.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    if r.metadata.deletion_timestamp.is_some() {
        if let Some(l) = ctx.live.lock().unwrap().get(&uid) {
            let _ = l
                .cancel
                .send(Some(format!("GroupRestore {name} was deleted")));
        }
        return Ok(Action::await_change());
    }
    if phase.is_final() || ctx.live.lock().unwrap().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    let api: Api<GroupRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = r.status.clone().unwrap_or_default();
    let resumed = phase == RestorePhase::Restoring;
    status.phase = Some(RestorePhase::Restoring);
    if status.start_time.is_none() {
        status.start_time = Some(now());
    }
    let (cancel, mut cancelled) = watch::channel(None::<String>);
    let (finished, done) = watch::channel(false);
    ctx.live.lock().unwrap().insert(
        uid.clone(),
        Live {
            group: (ns.clone(), format!("restore:{name}")),
            cancel,
            done,
        },
    );
    let mut run = Run {
        ctx: ctx.clone(),
        restore: (*r).clone(),
        api,
        status,
        w: Workloads {
            sts: Api::namespaced(ctx.client.clone(), &ns),
            deploy: Api::namespaced(ctx.client.clone(), &ns),
            pods: Api::namespaced(ctx.client.clone(), &ns),
        },
        pvcs: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        name: name.clone(),
    };
    if let Err(e) = run.save().await {
        ctx.live.lock().unwrap().remove(&uid);
        let _ = finished.send(true);
        return Err(e.into());
    }
    let note = match resumed {
        true => format!(
            "taking up the restore of GroupBackup {} where it was",
            r.spec.backup
        ),
        false => format!("restoring GroupBackup {}", r.spec.backup),
    };
    ctx.event(&*r, false, "Restoring", note).await;
    // A GroupRestore has no finalizer (what it made outlives it): its
    // deletion is seen by looking, and stops the run where it is.
    let gone = {
        let (api, name, uid) = (run.api.clone(), run.name.clone(), uid.clone());
        async move {
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
    };
    tokio::spawn(async move {
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
                if let Err(e) = finish(&mut run, o).await {
                    tracing::warn!(restore = %run.name, "recording the outcome: {e}");
                }
            }
        }
        run.ctx.live.lock().unwrap().remove(&uid);
        let _ = finished.send(true);
    });
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(name: &str) -> WorkloadRef {
        WorkloadRef {
            kind: "StatefulSet".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_statefulsets_claims_are_renamed_for_its_copy() {
        let w = sts("pg");
        assert_eq!(
            restored_pvc("data-pg-0", Some(&w), Some(0), Some("restored-")),
            "data-restored-pg-0"
        );
        assert_eq!(
            restored_pvc("wal-pg-12", Some(&w), Some(12), Some("r-")),
            "wal-r-pg-12"
        );
        // Not a claim of its templates: prefixed.
        assert_eq!(
            restored_pvc("shared", Some(&w), Some(0), Some("restored-")),
            "restored-shared"
        );
        assert_eq!(
            restored_pvc("data-app", None, None, Some("restored-")),
            "restored-data-app"
        );
        // In place: the same names.
        assert_eq!(
            restored_pvc("data-pg-0", Some(&w), Some(0), None),
            "data-pg-0"
        );
        assert_eq!(ordinal("pg-replica-3", "pg-replica"), Some(3));
        assert_eq!(ordinal("pg-replica-3", "pg"), None);
    }

    fn member(pod: &str, stage: u32, role: &str, w: &WorkloadRef) -> Planned {
        Planned {
            rec: BackupMember {
                pod: pod.into(),
                role: Some(role.into()),
                restore_stage: stage,
                workload: Some(w.clone()),
                ..Default::default()
            },
            target: Some(w.clone()),
            ordinal: ordinal(pod, &w.name),
            restored_pod: None,
            volumes: Vec::new(),
            wal_part: None,
        }
    }

    #[test]
    fn a_workload_grows_step_by_step() {
        // One StatefulSet: its primary (0) starts before its replica (1).
        let pg = sts("pg");
        let cache = WorkloadRef {
            kind: "Deployment".into(),
            name: "cache".into(),
        };
        let planned = vec![
            member("pg-0", 2, "primary", &pg),
            member("pg-1", 2, "replica", &pg),
            member("cache-abc", 3, "standalone", &cache),
        ];
        assert_eq!(replicas_up_to(&planned, &pg, None), 0);
        assert_eq!(replicas_up_to(&planned, &pg, Some((2, false))), 1);
        assert_eq!(replicas_up_to(&planned, &pg, Some((2, true))), 2);
        assert_eq!(replicas_up_to(&planned, &cache, Some((2, true))), 0);
        assert_eq!(replicas_up_to(&planned, &cache, Some((3, false))), 1);
    }

    #[test]
    fn the_deploy_example_reads_as_a_group_restore() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/restore.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let restore = text
            .split("\n---\n")
            .find(|d| d.contains("kind: GroupRestore"))
            .unwrap();
        let r: GroupRestore = serde_yaml::from_str(restore).unwrap();
        assert_eq!(r.spec.pvc_prefix.as_deref(), Some(DEFAULT_PREFIX));
        assert!(!r.spec.in_place && !r.spec.volumes_only);
        let sts: StatefulSet = serde_yaml::from_str(text.split("\n---\n").next().unwrap()).unwrap();
        assert_eq!(sts.metadata.name.as_deref(), Some("restored-pg"));
        assert_eq!(sts.spec.unwrap().replicas, Some(0));
    }

    #[test]
    fn a_spec_that_cannot_be_meant_is_refused_with_why() {
        let spec = |yaml: &str| -> crate::kube::crd::GroupRestoreSpec {
            serde_yaml::from_str(yaml).unwrap()
        };
        assert_eq!(
            validate(&spec("{backup: b}")).unwrap(),
            DEFAULT_STAGE_TIMEOUT
        );
        assert_eq!(
            validate(&spec("{backup: b, stageTimeout: 90s}")).unwrap(),
            Duration::from_secs(90)
        );
        for (yaml, says) in [
            (
                "{backup: b, inPlace: true, volumesOnly: true}",
                "running pods still use",
            ),
            ("{backup: b, pvcPrefix: ''}", "pvcPrefix is empty"),
            ("{backup: b, stageTimeout: 0s}", "longer than zero"),
            ("{backup: b, stageTimeout: soon}", "stageTimeout \"soon\""),
        ] {
            let e = validate(&spec(yaml)).unwrap_err();
            assert_eq!(e.reason, "InvalidSpec");
            assert!(e.message.contains(says), "{yaml}: {}", e.message);
        }
        // In place, an empty prefix is beside the point.
        assert!(validate(&spec("{backup: b, inPlace: true, pvcPrefix: ''}")).is_ok());
    }

    #[test]
    fn the_preparation_pod_is_restricted_and_runs_as_the_database() {
        let (pod, container) = restricted(
            Some(PodSecurityContext {
                fs_group: Some(999),
                ..Default::default()
            }),
            Some(SecurityContext {
                run_as_user: Some(999),
                ..Default::default()
            }),
        );
        assert_eq!(pod["fsGroup"], 999);
        assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(container["runAsUser"], 999);
        assert_eq!(container["allowPrivilegeEscalation"], false);
        assert_eq!(container["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(container["runAsNonRoot"], true);
        let (pod, container) = restricted(None, None);
        assert_eq!(pod["runAsNonRoot"], true);
        assert_eq!(container["readOnlyRootFilesystem"], true);
    }

    #[test]
    fn positions_are_compared_by_engine() {
        assert_eq!(reached("postgres", "0/3000060", "0/3000060"), Some(true));
        assert_eq!(reached("postgres", "0/2FFFFFF", "0/3000060"), Some(false));
        assert_eq!(reached("postgres", "1/0", "0/FFFFFFFF"), Some(true));
        assert_eq!(reached("mariadb", "0-1-10,1-2-5", "0-1-9"), Some(true));
        assert_eq!(reached("mariadb", "0-1-8", "0-1-9"), Some(false));
        assert_eq!(reached("redis", "x", "y"), None);
        // As the agents show them: with binlog coordinates.
        let shown = "gtid '0-1-10' (binlog.000002:4)";
        assert_eq!(
            reached("mariadb", shown, "gtid '0-1-9' (binlog.000002:1)"),
            Some(true)
        );
        assert_eq!(
            compare("mariadb", shown, "0-1-10"),
            Some(std::cmp::Ordering::Equal)
        );
        let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let other = "4e11fa47-71ca-11e1-9e33-c80aa9429562";
        let set = |s: &str| format!("gtid '{s}' (binlog.000001:4)");
        assert_eq!(
            reached(
                "mysql",
                &set(&format!("{uuid}:1-9")),
                &format!("{uuid}:1-5")
            ),
            Some(true)
        );
        // Each lacks what the other has: not at the recorded position.
        assert_eq!(
            reached(
                "mysql",
                &set(&format!("{uuid}:1-9")),
                &format!("{uuid}:1-5,{other}:1")
            ),
            Some(false)
        );
        assert!(exact("mariadb") && exact("mysql") && !exact("postgres"));
    }
}
