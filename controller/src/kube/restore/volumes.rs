//! Steps 2 and 3, down and volumes: the workloads scaled to zero, the PVCs made
//! from the snapshots.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::DeleteParams;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::plan::Planned;
use super::run::Run;
use super::{Stop, stop};
use crate::kube::crd::{VolumeSnapshotRef, WorkloadRef};
use crate::kube::reason::Reason;

impl Run {
    /// 2. Every workload down, and its pods gone.
    pub(super) async fn down(&mut self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
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
                Reason::ScaleDownTimedOut,
                format!("scaled to zero, but pods {left} are still there after {bound:?}"),
            ));
        }
        Ok(())
    }

    /// 3. The PVCs, from the snapshots.
    pub(super) async fn volumes(
        &mut self,
        planned: &[Planned],
        bound: Duration,
    ) -> Result<(), Stop> {
        if self.restore.spec.in_place {
            self.delete_originals(planned, bound).await?;
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

    /// In place, the original PVCs deleted, and gone within `bound`.
    async fn delete_originals(&self, planned: &[Planned], bound: Duration) -> Result<(), Stop> {
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
                Reason::PVCNotDeleted,
                format!(
                    "the original PVCs {left} are still there after {bound:?} (a pod still uses them?)"
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn wal_claim(&self, p: &Planned) -> String {
        format!("{}-wal-{}", self.name, p.rec.pod)
    }

    /// A PVC from snapshot `v`, sized and classed as the original was;
    /// returns its uid.
    pub(super) async fn make_pvc(
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
                Reason::PVCExists,
                format!("PVC {claim} exists and was not made by this restore"),
            ));
        }
        let spec = self.claim_spec(v).await?;
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
            serde_json::from_value(pvc).map_err(|e| stop(Reason::InvalidSpec, e.to_string()))?;
        let made = self.pvcs.create(&Default::default(), &pvc).await?;
        Ok(made.uid().unwrap_or_default())
    }

    /// The spec of a PVC from snapshot `v`: the original's class, access
    /// modes and size; what the content recorded when the original is
    /// gone; the snapshot's restore size.
    async fn claim_spec(&self, v: &VolumeSnapshotRef) -> Result<serde_json::Value, Stop> {
        let original = self.pvcs.get_opt(&v.pvc).await?.and_then(|p| p.spec);
        let recorded = self.recorded.get(&v.name);
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
            .or_else(|| recorded.and_then(|r| r.restore_size.clone()))
            .unwrap_or_else(|| "1Gi".into());
        let access_modes = original
            .as_ref()
            .and_then(|s| s.access_modes.clone())
            .or_else(|| {
                recorded
                    .map(|r| r.access_modes.clone())
                    .filter(|m| !m.is_empty())
            })
            .unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
        let mut spec = json!({
            "accessModes": access_modes,
            "resources": {"requests": {"storage": size}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": v.name},
        });
        let class = original
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .or_else(|| recorded.and_then(|r| r.storage_class_name.clone()));
        if let Some(class) = class {
            spec["storageClassName"] = json!(class);
        }
        let mode = original
            .as_ref()
            .and_then(|s| s.volume_mode.clone())
            .or_else(|| recorded.and_then(|r| r.volume_mode.clone()));
        if let Some(mode) = mode {
            spec["volumeMode"] = json!(mode);
        }
        Ok(spec)
    }
}
