//! The running restore: its status and the steps in order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use serde_json::json;

use super::plan::{Planned, plan, validate};
use super::workloads::Workloads;
use super::{POLL, Stop, stop};
use crate::core::plan::stage_class;
use crate::kube::controller::Context;
use crate::kube::crd::{
    BackupPhase, CapturedObject, ContentVolume, GroupBackup, GroupBackupContent, GroupRestore,
    GroupRestoreStatus, RESTORE_LABEL, RESTORE_UID_LABEL, RestoreStage, RestoredMember,
    WorkloadRef,
};
use crate::kube::reason::Reason;
use crate::kube::store::Fence;
use stillpoint_proto::hosts::HostRenames;

/// The running restore: its resource, status and what it works with.
pub(super) struct Run {
    pub(super) ctx: Arc<Context>,
    pub(super) restore: GroupRestore,
    pub(super) api: Api<GroupRestore>,
    pub(super) status: GroupRestoreStatus,
    /// What this run last saw of the status on the server: it writes only
    /// over that (a new leader's write is never written over).
    pub(super) fence: Fence<GroupRestoreStatus>,
    pub(super) w: Workloads,
    pub(super) pvcs: Api<PersistentVolumeClaim>,
    pub(super) ns: String,
    pub(super) name: String,
    /// The Secret its preparation pods read artefacts from: the backup's
    /// (`<backup>-artefacts`), or for a content its own
    /// (`<restore>-artefacts`).
    pub(super) artefacts_secret: String,
    /// A content's restore: each VolumeSnapshot it bound, and what the
    /// content records of it (class, access modes, size).
    pub(super) recorded: BTreeMap<String, ContentVolume>,
    /// The application's objects the backup kept (none if it kept none).
    pub(super) captured: Vec<CapturedObject>,
    /// Under new names: the copies this restore made and their hosts.
    pub(super) renames: Option<Renamed>,
}

/// The copies a restore under new names made, and the renames of their
/// hosts.
#[derive(Debug, Clone)]
pub(super) struct Renamed {
    pub(super) hosts: HostRenames,
    pub(super) copies: Vec<WorkloadRef>,
}

impl Run {
    pub(super) async fn save(&mut self) -> Result<(), kube::Error> {
        self.status.observed_generation = self.restore.metadata.generation;
        let (api, name) = (&self.api, &self.name);
        self.fence
            .apply(api, name, "GroupRestore", &self.status, |r| r.status)
            .await
    }

    /// The status of member `pod` (made if the status lacks it: the
    /// status is read from the API and may have been written by anyone).
    pub(super) fn member(&mut self, pod: &str) -> &mut RestoredMember {
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
    pub(super) fn stage(&mut self, stage: u32) -> &mut RestoreStage {
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
    pub(super) fn same_backup(
        &self,
        backup: &GroupBackup,
        planned: &[Planned],
    ) -> Result<(), Stop> {
        let uid = backup.uid();
        let recorded_uid = self.status.backup_uid.as_ref();
        let pods: BTreeSet<&str> = planned.iter().map(|p| p.rec.pod.as_str()).collect();
        let recorded: BTreeSet<&str> = self.status.members.iter().map(|m| m.pod.as_str()).collect();
        if recorded_uid.is_some_and(|r| Some(r) != uid.as_ref()) || pods != recorded {
            return Err(stop(
                Reason::BackupReplaced,
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

    pub(super) fn snapshots(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.ctx.client.clone(),
            &self.ns,
            &crate::kube::csi::volume_snapshot_resource(),
        )
    }

    pub(super) fn uid(&self) -> String {
        self.restore.uid().unwrap_or_default()
    }

    pub(super) fn labels(&self) -> serde_json::Value {
        json!({ RESTORE_LABEL: self.name, RESTORE_UID_LABEL: self.uid() })
    }

    /// Made by this restore (this object, not an earlier one of its name):
    /// its uid label, and the PVC's own uid where it was recorded.
    pub(super) fn ours(&self, pvc: &PersistentVolumeClaim) -> bool {
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
    pub(super) async fn wait<F, Fut>(
        &self,
        bound: Duration,
        mut check: F,
    ) -> Result<Option<String>, Stop>
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

    /// The restore, step by step; returns how many members it restored.
    pub(super) async fn run(&mut self) -> Result<usize, Stop> {
        let spec = self.restore.spec.clone();
        let bound = validate(&spec)?;
        let backup = match spec.content.as_deref() {
            Some(content) => self.rebuild(content, bound).await?,
            None => self.restorable_backup().await?,
        };
        let group = backup.spec.group.clone();
        let planned = plan(&backup, &spec)?;
        match self.status.members.is_empty() {
            true => self.record_plan(&backup, &planned).await?,
            false => self.same_backup(&backup, &planned)?,
        }
        if !spec.volumes_only {
            self.copies(&planned, &group).await?;
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

    /// The backup to restore: it exists and succeeded.
    async fn restorable_backup(&mut self) -> Result<GroupBackup, Stop> {
        let name = self.restore.spec.backup.as_deref().unwrap_or_default();
        let backups: Api<GroupBackup> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(backup) = backups.get_opt(name).await? else {
            return Err(stop(
                Reason::BackupNotFound,
                format!("GroupBackup {name} does not exist in namespace {}", self.ns),
            ));
        };
        let phase = backup
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        if phase != BackupPhase::Succeeded {
            return Err(stop(
                Reason::BackupNotRestorable,
                format!(
                    "GroupBackup {name} is {}; only a backup that succeeded can be restored",
                    phase.as_str()
                ),
            ));
        }
        self.captured = self.kept_objects(&backup).await?;
        Ok(backup)
    }

    /// The objects kept by `backup`'s content, if it has one.
    async fn kept_objects(&self, backup: &GroupBackup) -> Result<Vec<CapturedObject>, Stop> {
        let Some(name) = backup.status.as_ref().and_then(|s| s.content.clone()) else {
            return Ok(Vec::new());
        };
        let api: Api<GroupBackupContent> = Api::all(self.ctx.client.clone());
        Ok(api
            .get_opt(&name)
            .await?
            .map(|c| c.spec.objects)
            .unwrap_or_default())
    }

    /// A new restore's plan in its status: the backup's uid, every member
    /// `Pending` and every stage `Waiting`.
    async fn record_plan(&mut self, backup: &GroupBackup, planned: &[Planned]) -> Result<(), Stop> {
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
        for p in planned {
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
        Ok(())
    }
}
