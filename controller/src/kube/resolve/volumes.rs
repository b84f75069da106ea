//! The members' PVCs: bound, and provisioned by a CSI driver.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;

use super::{Resolver, Verdict};
use crate::kube::crd::ResolvedMember;
use crate::kube::reason::Reason;

impl Resolver {
    /// Every PVC of `members` is Bound to a CSI volume: each member's
    /// driver recorded; returns the drivers.
    pub(super) async fn bind(
        &self,
        ns: &str,
        members: &mut [ResolvedMember],
    ) -> Result<BTreeSet<String>, Verdict> {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut drivers = BTreeSet::new();
        for m in members.iter_mut() {
            for claim in &m.pvcs {
                let volume = bound(&pvcs, &m.pod, claim).await?;
                let driver = driver(&pvs, &volume)
                    .await?
                    .ok_or_else(|| {
                        Verdict::no(
                            Reason::NotCSI,
                            format!(
                                "pod {}: PVC {claim} is not provisioned by a CSI driver, so it cannot be snapshotted",
                                m.pod
                            ),
                        )
                    })?;
                drivers.insert(driver.clone());
                m.driver = Some(driver);
            }
        }
        Ok(drivers)
    }
}

/// The volume PVC `claim` of `pod` is Bound to.
async fn bound(
    pvcs: &Api<PersistentVolumeClaim>,
    pod: &str,
    claim: &str,
) -> Result<String, Verdict> {
    let pvc = match pvcs.get_opt(claim).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Err(Verdict::no(
                Reason::PVCNotFound,
                format!("pod {pod}: PVC {claim} does not exist"),
            ));
        }
        Err(e) => {
            return Err(Verdict::no(
                Reason::APIError,
                format!("reading PVC {claim}: {e}"),
            ));
        }
    };
    let phase = pvc
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let volume = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
    match (volume, phase.as_str()) {
        (Some(volume), "Bound") => Ok(volume),
        _ => Err(Verdict::no(
            Reason::PVCUnbound,
            format!(
                "pod {pod}: PVC {claim} is {} (not Bound)",
                if phase.is_empty() { "Pending" } else { &phase }
            ),
        )),
    }
}

/// The CSI driver of PersistentVolume `volume` (none if not CSI).
async fn driver(pvs: &Api<PersistentVolume>, volume: &str) -> Result<Option<String>, Verdict> {
    match pvs.get_opt(volume).await {
        Ok(pv) => Ok(pv.and_then(|pv| pv.spec?.csi.map(|c| c.driver))),
        Err(e) => Err(Verdict::no(
            Reason::APIError,
            format!("reading PersistentVolume {volume}: {e}"),
        )),
    }
}
