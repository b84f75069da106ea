//! What the restore does, from the backup and the spec alone.

use std::time::Duration;

use super::{DEFAULT_PREFIX, DEFAULT_STAGE_TIMEOUT, Stop, stop};
use crate::kube::crd::{
    BackupMember, GroupBackup, GroupRestoreSpec, VolumeSnapshotRef, WorkloadRef,
};
use crate::kube::reason::Reason;

/// One member of the backup, as the restore treats it.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub(super) rec: BackupMember,
    /// The workload to scale (none with `volumesOnly`).
    pub(super) target: Option<WorkloadRef>,
    /// Its ordinal, for a StatefulSet's pod.
    pub(super) ordinal: Option<u32>,
    /// The pod that runs it again (a StatefulSet's; a Deployment's pods
    /// have no fixed names).
    pub(super) restored_pod: Option<String>,
    /// Its snapshots (the whole volume) and the PVC each becomes.
    pub(super) volumes: Vec<(VolumeSnapshotRef, String)>,
    /// The snapshot of its WAL part (PostgreSQL on a class that copies).
    pub(super) wal_part: Option<VolumeSnapshotRef>,
}

impl Planned {
    pub(super) fn is_replica(&self) -> bool {
        self.rec.role.as_deref() == Some("replica")
    }

    pub(super) fn needs_label(&self) -> bool {
        self.rec.consistency.as_deref() == Some("backup-label")
    }

    /// The step of the plan it starts in: its stage, primaries first.
    pub(super) fn step(&self) -> (u32, bool) {
        (self.rec.restore_stage, self.is_replica())
    }
}

/// The ordinal of a StatefulSet's pod.
pub(super) fn ordinal(pod: &str, sts: &str) -> Option<u32> {
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
pub(super) fn plan(backup: &GroupBackup, spec: &GroupRestoreSpec) -> Result<Vec<Planned>, Stop> {
    let s = backup.status.clone().unwrap_or_default();
    // A content is restored under the original names (into a namespace
    // without them), as in place, unless it is given a prefix.
    let renamed = !spec.in_place && (spec.content.is_none() || spec.pvc_prefix.is_some());
    let prefix = renamed.then(|| spec.pvc_prefix.as_deref().unwrap_or(DEFAULT_PREFIX));
    let mut planned = s
        .members
        .iter()
        .map(|m| plan_member(m, spec, prefix))
        .collect::<Result<Vec<_>, _>>()?;
    planned.sort_by(|a, b| {
        a.step()
            .cmp(&b.step())
            .then_with(|| a.rec.pod.cmp(&b.rec.pod))
    });
    Ok(planned)
}

/// Member `m` of the backup as the restore treats it.
fn plan_member(
    m: &BackupMember,
    spec: &GroupRestoreSpec,
    prefix: Option<&str>,
) -> Result<Planned, Stop> {
    let ordinal = m
        .workload
        .as_ref()
        .filter(|w| w.kind == "StatefulSet")
        .and_then(|w| ordinal(&m.pod, &w.name));
    let target = match (&m.workload, spec.volumes_only) {
        (_, true) => None,
        (None, false) => {
            return Err(stop(
                Reason::NoWorkload,
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
            Reason::NotRestorable,
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
    Ok(Planned {
        rec: m.clone(),
        target,
        ordinal,
        restored_pod,
        volumes,
        wal_part,
    })
}

/// How many pods `workload` runs once every step up to `step` started.
pub(super) fn replicas_up_to(
    planned: &[Planned],
    workload: &WorkloadRef,
    step: Option<(u32, bool)>,
) -> i32 {
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

/// What the spec asks, checked alone: the stage bound.
pub(super) fn validate(spec: &GroupRestoreSpec) -> Result<Duration, Stop> {
    if spec.backup.is_some() == spec.content.is_some() {
        return Err(stop(
            Reason::InvalidSpec,
            "name exactly one of spec.backup (a GroupBackup of this namespace) and spec.content \
             (a GroupBackupContent)",
        ));
    }
    if spec.content.is_some() && spec.in_place {
        return Err(stop(
            Reason::InvalidSpec,
            "a restore of a content makes the application under its original names, in a namespace \
             that has none of them, or with pvcPrefix under new names: inPlace is for a restore of a \
             GroupBackup",
        ));
    }
    if spec.in_place && spec.volumes_only {
        return Err(stop(
            Reason::InvalidSpec,
            "inPlace with volumesOnly would delete PVCs that running pods still use; scale the workloads \
             to zero yourself and restore inPlace without volumesOnly, or restore under new names",
        ));
    }
    if !spec.in_place && spec.pvc_prefix.as_deref() == Some("") {
        return Err(stop(
            Reason::InvalidSpec,
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
                    Reason::InvalidSpec,
                    format!("spec.stageTimeout {t:?} is not a duration longer than zero"),
                )
            }),
    }
}
