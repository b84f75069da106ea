//! Step 1, checks: everything is checked before anything changes.

use serde_json::json;

use super::plan::Planned;
use super::run::Run;
use super::workloads::WorkloadInfo;
use super::{Stop, stop};
use crate::kube::crd::WorkloadRef;
use crate::kube::reason::Reason;

impl Run {
    /// 1. Everything is checked before anything changes.
    pub(super) async fn check(&self, planned: &[Planned]) -> Result<(), Stop> {
        for p in planned {
            self.snapshots_ready(p).await?;
            if p.needs_label() && p.rec.data_directory.is_none() {
                return Err(stop(
                    Reason::NotRestorable,
                    format!(
                        "pod {} was cut with a backup_label, but the backup does not record its data directory",
                        p.rec.pod
                    ),
                ));
            }
            if let Some(t) = &p.target {
                self.workload_claims(p, t).await?;
            }
            if !self.restore.spec.in_place {
                self.names_free(p).await?;
            }
        }
        Ok(())
    }

    /// Every VolumeSnapshot of `p` exists and is ready to use.
    async fn snapshots_ready(&self, p: &Planned) -> Result<(), Stop> {
        let snapshots = self.snapshots();
        for v in p.rec.volume_snapshots.iter() {
            let Some(s) = snapshots.get_opt(&v.name).await? else {
                return Err(stop(
                    Reason::SnapshotNotFound,
                    format!(
                        "VolumeSnapshot {} (PVC {} of pod {}) does not exist",
                        v.name, v.pvc, p.rec.pod
                    ),
                ));
            };
            if s.data["status"]["readyToUse"] != json!(true) {
                return Err(stop(
                    Reason::SnapshotNotReady,
                    format!("VolumeSnapshot {} is not ready to use", v.name),
                ));
            }
        }
        Ok(())
    }

    /// `p`'s workload `t` exists and would mount each of its restored PVCs.
    async fn workload_claims(&self, p: &Planned, t: &WorkloadRef) -> Result<(), Stop> {
        let Some(info) = self.w.get(t).await? else {
            let message = match self.restore.spec.in_place {
                true => format!(
                    "{t}, which ran pod {}, does not exist; restore it under new names (without inPlace) into a copy",
                    p.rec.pod
                ),
                false => format!(
                    "{t} does not exist and the backup keeps no workload to copy it from (it was taken \
                     before backups kept their application): create it as a copy of {} (replicas: 0, \
                     labels its group does not select) to have pod {} restored into it, or restore with \
                     volumesOnly: true",
                    p.rec
                        .workload
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    p.rec.pod
                ),
            };
            return Err(stop(Reason::WorkloadNotFound, message));
        };
        for (v, claim) in &p.volumes {
            if !claims(&info, t, p, claim) {
                return Err(stop(
                    Reason::WorkloadMismatch,
                    format!(
                        "{t} would not mount PVC {claim} (restored from {} of pod {}): give it the volume \
                         claim template (or claimName) the original has for it",
                        v.pvc, p.rec.pod
                    ),
                ));
            }
        }
        Ok(())
    }

    /// No PVC of `p`'s restored names exists but this restore's own.
    async fn names_free(&self, p: &Planned) -> Result<(), Stop> {
        for (_, claim) in &p.volumes {
            if let Some(pvc) = self.pvcs.get_opt(claim).await?
                && !self.ours(&pvc)
            {
                return Err(stop(
                    Reason::PVCExists,
                    format!(
                        "PVC {claim} exists and was not made by this restore; delete it or choose another pvcPrefix"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether workload `t` mounts `claim` for `p`: by name in its template, or
/// through a StatefulSet's claim template for the restored pod.
fn claims(info: &WorkloadInfo, t: &WorkloadRef, p: &Planned, claim: &str) -> bool {
    let by_name = info
        .template
        .iter()
        .flat_map(|t| t.spec.iter())
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|vol| {
            vol.persistent_volume_claim
                .as_ref()
                .is_some_and(|c| c.claim_name == claim)
        });
    let by_template = t.kind == "StatefulSet"
        && p.restored_pod.as_ref().is_some_and(|pod| {
            claim
                .strip_suffix(&format!("-{pod}"))
                .is_some_and(|tmpl| info.claim_templates.iter().any(|c| c == tmpl))
        });
    by_name || by_template
}
