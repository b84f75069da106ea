//! Step 0 of a restore of a `csi-group` content, before its snapshots are
//! bound: each snapshot is a member of a group snapshot, and the snapshot
//! controller binds a member only once it finds a VolumeGroupSnapshotContent
//! whose status carries that group's handle. In the cluster that took the
//! backup, the retained one does. Elsewhere (the content was imported) the
//! restore pre-provisions one per group: `<restore uid>-g<n>`, `Retain`,
//! with the group's and its members' handles, labelled with the restore,
//! waited for until the storage has answered for it, and deleted when the
//! restore ends (the data stays).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use serde_json::json;

use super::run::Run;
use super::{Stop, stop};
use crate::kube::content::volume_group_snapshot_contents;
use crate::kube::crd::{GroupBackupContent, RESTORE_UID_LABEL};
use crate::kube::reason::Reason;

/// A group snapshot of a content: its driver and its members' handles.
type Groups = BTreeMap<String, (String, Vec<String>)>;

/// The group snapshots `content`'s volumes are members of, by handle.
fn groups_of(content: &GroupBackupContent) -> Groups {
    let mut groups = Groups::new();
    let volumes = content.spec.members.iter().flat_map(|m| m.volumes.iter());
    for v in volumes {
        if let (Some(group), Some(handle), Some(driver)) =
            (&v.group_snapshot_handle, &v.snapshot_handle, &v.driver)
        {
            let entry = groups
                .entry(group.clone())
                .or_insert_with(|| (driver.clone(), Vec::new()));
            entry.1.push(handle.clone());
        }
    }
    groups
}

impl Run {
    /// The VolumeGroupSnapshotContent API and its apiVersion, if group
    /// snapshots are served.
    async fn group_contents(&self) -> Option<(Api<DynamicObject>, String)> {
        let groups = crate::kube::csi::volume_group_snapshot_resource(&self.ctx.client)
            .await
            .ok()?;
        let resource = volume_group_snapshot_contents(&groups.version);
        let api = Api::all_with(self.ctx.client.clone(), &resource);
        Some((api, resource.api_version))
    }

    /// Pre-provisions a group snapshot content for each of `content`'s
    /// groups this cluster has none of; ready within `bound`.
    pub(super) async fn anchor_groups(
        &self,
        content: &GroupBackupContent,
        bound: Duration,
    ) -> Result<(), Stop> {
        let groups = groups_of(content);
        if groups.is_empty() {
            return Ok(());
        }
        let Some((api, api_version)) = self.group_contents().await else {
            return Err(stop(
                Reason::NotRestorable,
                "the content was cut as a group snapshot, and this cluster serves no \
                 VolumeGroupSnapshotContent to bind its members through"
                    .to_string(),
            ));
        };
        let known: BTreeSet<String> = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|c| {
                c.data["status"]["volumeGroupSnapshotHandle"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        let mut made = Vec::new();
        for (n, (handle, (driver, members))) in groups.iter().enumerate() {
            if known.contains(handle) {
                continue;
            }
            let name = format!("{}-g{}", self.uid(), n + 1);
            let anchor = json!({
                "apiVersion": api_version,
                "kind": "VolumeGroupSnapshotContent",
                "metadata": {"name": name, "labels": {RESTORE_UID_LABEL: self.uid()}},
                "spec": {
                    "deletionPolicy": "Retain",
                    "driver": driver,
                    "source": {"groupSnapshotHandles": {
                        "volumeGroupSnapshotHandle": handle,
                        "volumeSnapshotHandles": members,
                    }},
                    "volumeGroupSnapshotRef": {"name": format!("{}-g{}", self.name, n + 1), "namespace": self.ns},
                },
            });
            super::content::create_kept(&api, anchor).await?;
            made.push((name, handle.clone()));
        }
        self.anchors_ready(&api, &made, bound).await
    }

    /// Waits until the storage has answered for each anchor (its status
    /// carries the group's handle).
    async fn anchors_ready(
        &self,
        api: &Api<DynamicObject>,
        made: &[(String, String)],
        bound: Duration,
    ) -> Result<(), Stop> {
        let waiting = self
            .wait(bound, || {
                let (api, made) = (api.clone(), made.to_vec());
                async move {
                    for (name, handle) in &made {
                        let c = api.get(name).await?;
                        if c.data["status"]["volumeGroupSnapshotHandle"].as_str() != Some(handle) {
                            return Ok(Some(name.clone()));
                        }
                    }
                    Ok(None)
                }
            })
            .await?;
        match waiting {
            None => Ok(()),
            Some(name) => Err(stop(
                Reason::SnapshotNotReady,
                format!(
                    "VolumeGroupSnapshotContent {name}, which binds the content's group snapshot \
                     here, was not answered for by the storage within {}s",
                    bound.as_secs()
                ),
            )),
        }
    }

    /// Deletes the group snapshot contents this restore made (the data
    /// stays: they are `Retain`).
    pub(super) async fn release_anchors(&self) {
        let Some((api, _)) = self.group_contents().await else {
            return;
        };
        let ours = ListParams::default().labels(&format!("{RESTORE_UID_LABEL}={}", self.uid()));
        let Ok(list) = api.list(&ours).await else {
            return;
        };
        for c in list.items {
            let name = c.metadata.name.unwrap_or_default();
            if let Err(e) = api.delete(&name, &DeleteParams::background()).await {
                tracing::warn!(restore = %self.name, "deleting VolumeGroupSnapshotContent {name}: {e}");
            }
        }
    }
}
