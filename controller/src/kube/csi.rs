//! The snapshotters of Kubernetes mode.
//!
//! - `csi`: one VolumeSnapshot per PVC, created in parallel while the group
//!   is frozen. The cut point is fixed once every snapshot has
//!   `status.creationTime` (the driver took it); members thaw then, and
//!   `readyToUse` is awaited afterwards (Finalizing).
//! - `csi-group`: one VolumeGroupSnapshot per cut over labels the
//!   controller puts on exactly the group's PVCs before the freeze (a group
//!   with replicas is cut in two or more, replicas first: see the
//!   protocol's cut). The driver may cut a group's volumes in any order,
//!   one after another; nothing here relies on one instant. Its per-PVC
//!   VolumeSnapshots (owned by it) are recorded.
//!
//! A snapshot's `status.error` is the last error the snapshot controller
//! saw; it keeps retrying and clears it on success (external-snapshotter's
//! API says so), and storage that is busy for a moment, or a conflict of
//! the controller's own writes, sets it briefly. So an error ends the cut
//! (or the wait) only once it has stood for [`ERROR_GRACE`] — the freeze
//! budget bounds the cut before that — and then with its message.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use crate::core::snapshot::{Made, SnapshotError, SnapshotHandle, Snapshotter, VolumeRef};
use crate::kube::crd::{BACKUP_LABEL, CUT_LABEL, GROUP_LABEL};

/// What makes an InnoDB member cuttable on a class that copies files, in
/// Kubernetes mode's words.
pub const COPY_FIX: &str = "Set `fsfreeze: true` on member {member} in the ConsistencyGroup and \
     annotate its pods `stillpoint.dev/fsfreeze: \"true\"` (the agent then freezes its mount), or \
     use a VolumeSnapshotClass whose snapshots are point-in-time (`spec.snapshot.atomic: true`)";

/// How a member accepts a path its volumes do not hold, in Kubernetes
/// mode's words.
pub const ACCEPT_GAP: &str =
    "`acceptUncovered: [\"{path}\"]` on member {member} in the ConsistencyGroup";

/// How often a snapshot's status is read while waiting for it.
const POLL: Duration = Duration::from_millis(20);
/// How long a snapshot's `status.error` must stand before it is taken as
/// the snapshot's failure.
pub const ERROR_GRACE: Duration = Duration::from_secs(10);
/// Bound on `readyToUse` after the cut.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// The API resource of VolumeSnapshots.
pub fn volume_snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

/// The served version of VolumeGroupSnapshots: `v1`, else `v1beta2`.
pub async fn volume_group_snapshot_resource(client: &kube::Client) -> Result<ApiResource, String> {
    for version in ["v1", "v1beta2"] {
        let gvk = GroupVersionKind::gvk(
            "groupsnapshot.storage.k8s.io",
            version,
            "VolumeGroupSnapshot",
        );
        if let Ok((resource, _)) = kube::discovery::pinned_kind(client, &gvk).await {
            return Ok(resource);
        }
    }
    Err(
        "the API server serves no VolumeGroupSnapshot (groupsnapshot.storage.k8s.io v1 or \
         v1beta2): install the external-snapshotter's group snapshot CRDs and controller, or \
         use `snapshot.driver: csi`"
            .into(),
    )
}

/// What every snapshot of one backup carries.
#[derive(Debug, Clone)]
pub struct Owner {
    pub namespace: String,
    /// The GroupBackup (its name is the backup id).
    pub backup: String,
    pub group: String,
    /// The GroupBackup's uid: the value of the label that selects the
    /// PVCs of a group snapshot.
    pub uid: String,
}

impl Owner {
    fn labels(&self) -> Value {
        json!({ BACKUP_LABEL: self.uid, GROUP_LABEL: self.group })
    }
}

fn err(driver: &'static str, message: impl Into<String>) -> SnapshotError {
    SnapshotError::new(driver, message)
}

/// The name of a PVC's VolumeSnapshot in a backup (at most 253 characters).
pub fn snapshot_name(backup: &str, claim: &str) -> String {
    let mut name = format!("{backup}-{claim}");
    name.truncate(253);
    name
}

/// Reads `status.creationTime` / `readyToUse` / `error` of a snapshot.
fn progress(obj: &DynamicObject) -> (bool, bool, Option<String>) {
    let status = &obj.data["status"];
    let created = status["creationTime"].is_string();
    let ready = status["readyToUse"] == json!(true);
    let error = status["error"]["message"].as_str().map(str::to_string);
    (created, ready, error)
}

/// Waits until `check` says a snapshot is done (or failed).
async fn wait_for(
    driver: &'static str,
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    bound: Duration,
    done: fn(&DynamicObject) -> bool,
) -> Result<DynamicObject, SnapshotError> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut failing: Option<(tokio::time::Instant, String)> = None;
    loop {
        match api.get_opt(name).await {
            Ok(Some(obj)) => {
                if done(&obj) {
                    return Ok(obj);
                }
                match progress(&obj).2 {
                    Some(e) => {
                        let since =
                            failing.get_or_insert_with(|| (tokio::time::Instant::now(), e.clone()));
                        since.1 = e;
                        if since.0.elapsed() >= ERROR_GRACE {
                            return Err(err(driver, format!("{name}: {}", since.1)));
                        }
                    }
                    None => failing = None,
                }
            }
            Ok(None) => return Err(err(driver, format!("{name} disappeared before {what}"))),
            Err(e) => tracing::debug!("reading {name}: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            let last = failing.map(|(_, e)| format!("; its last error: {e}"));
            return Err(err(
                driver,
                format!(
                    "{name}: no {what} within {} s{}",
                    bound.as_secs(),
                    last.unwrap_or_default()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One VolumeSnapshot per PVC.
#[derive(Clone)]
pub struct Csi {
    client: kube::Client,
    owner: Owner,
    class: Option<String>,
    atomic: bool,
}

impl std::fmt::Debug for Csi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csi")
            .field("owner", &self.owner)
            .field("class", &self.class)
            .field("atomic", &self.atomic)
            .finish_non_exhaustive()
    }
}

impl Csi {
    pub fn new(client: kube::Client, owner: Owner, class: Option<String>, atomic: bool) -> Self {
        Csi {
            client,
            owner,
            class,
            atomic,
        }
    }

    fn api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.owner.namespace,
            &volume_snapshot_resource(),
        )
    }

    async fn create(&self, name: &str, claim: &str) -> Result<(), SnapshotError> {
        let mut spec = json!({ "source": { "persistentVolumeClaimName": claim } });
        if let Some(class) = &self.class {
            spec["volumeSnapshotClassName"] = json!(class);
        }
        let what = format!("VolumeSnapshot {name} of PVC {claim}");
        let api_version = "snapshot.storage.k8s.io/v1";
        create_labelled(
            &self.api(),
            api_version,
            "VolumeSnapshot",
            name,
            &self.owner,
            spec,
            "csi",
            &what,
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Snapshotter for Csi {
    fn name(&self) -> &'static str {
        "csi"
    }

    fn copy_fix(&self) -> &'static str {
        COPY_FIX
    }

    fn accept_gap(&self) -> &'static str {
        ACCEPT_GAP
    }

    fn atomic(&self) -> bool {
        self.atomic
    }

    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let results = join_all(volumes.iter().map(|v| async move {
            let claim = v.claim.as_deref().ok_or_else(|| {
                err(
                    "csi",
                    format!("member {}: volume {} is no PVC", v.member, v.index),
                )
            })?;
            let name = snapshot_name(backup_id, claim);
            self.create(&name, claim).await?;
            made.record(SnapshotHandle::new(
                backup_id,
                v.clone(),
                name.clone(),
                "csi",
            ));
            wait_for(
                "csi",
                &self.api(),
                &name,
                "creationTime",
                READY_TIMEOUT,
                |o| progress(o).0,
            )
            .await?;
            Ok::<_, SnapshotError>(())
        }))
        .await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err())
            .map(|e| e.message)
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(err("csi", errors.join("; "))),
        }
    }

    async fn refresh(
        &self,
        handle: &SnapshotHandle,
        relative: &str,
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let claim = handle.claim.clone().unwrap_or_default();
        let suffix: String = relative
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = snapshot_name(&handle.handle, &suffix);
        self.create(&name, &claim).await?;
        let mut part = handle.clone();
        part.handle = name.clone();
        part.volume = handle.volume.join(relative);
        part.part = Some(relative.to_string());
        made.record(part);
        wait_for(
            "csi",
            &self.api(),
            &name,
            "creationTime",
            READY_TIMEOUT,
            |o| progress(o).0,
        )
        .await?;
        Ok(())
    }

    async fn ready(&self, handles: &mut [SnapshotHandle]) -> Result<(), SnapshotError> {
        let api = self.api();
        let results = join_all(handles.iter().map(|h| {
            let api = api.clone();
            async move {
                wait_for("csi", &api, &h.handle, "readyToUse", READY_TIMEOUT, |o| {
                    progress(o).1
                })
                .await
            }
        }))
        .await;
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err())
            .map(|e| e.message)
            .collect();
        match errors.is_empty() {
            true => Ok(()),
            false => Err(err("csi", errors.join("; "))),
        }
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        delete_snapshots(
            "csi",
            &self.api(),
            handles.iter().map(|h| h.handle.as_str()),
        )
        .await
    }

    async fn delete_backup(&self, _backup_id: &str) -> Result<(), SnapshotError> {
        delete_labelled("csi", &self.api(), &self.owner.uid).await
    }
}

/// Bound on waiting for a snapshot being cut to be cut before deleting it.
const SETTLE: Duration = Duration::from_secs(60);

/// Creates a snapshot object labelled with its backup and group.
#[allow(clippy::too_many_arguments)]
async fn create_labelled(
    api: &Api<DynamicObject>,
    api_version: &str,
    kind: &str,
    name: &str,
    owner: &Owner,
    spec: Value,
    driver: &'static str,
    what: &str,
) -> Result<(), SnapshotError> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": owner.namespace, "labels": owner.labels() },
        "spec": spec,
    }))
    .expect("a snapshot object");
    api.create(&PostParams::default(), &obj)
        .await
        .map_err(|e| err(driver, format!("creating {what}: {e}")))?;
    Ok(())
}

/// Deletes snapshots by name; those already gone are fine. A snapshot
/// the storage is still cutting is deleted once cut (or failed): the
/// snapshot controller can lose track of one deleted mid-creation and
/// leave it (and its content) terminating for good.
async fn delete_snapshots<'a>(
    driver: &'static str,
    api: &Api<DynamicObject>,
    names: impl Iterator<Item = &'a str>,
) -> Result<(), SnapshotError> {
    let mut errors = Vec::new();
    let names: Vec<&str> = names.collect();
    join_all(names.iter().map(|name| async move {
        let deadline = tokio::time::Instant::now() + SETTLE;
        while let Ok(Some(obj)) = api.get_opt(name).await {
            let (created, _, error) = progress(&obj);
            if created || error.is_some() || obj.metadata.deletion_timestamp.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    "{name} is still being cut after {} s; deleting it anyway",
                    SETTLE.as_secs()
                );
                break;
            }
            tokio::time::sleep(POLL * 5).await;
        }
    }))
    .await;
    for name in names {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => errors.push(format!("deleting {name}: {e}")),
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(err(driver, errors.join("; "))),
    }
}

/// Deletes every object labelled with a backup's uid.
async fn delete_labelled(
    driver: &'static str,
    api: &Api<DynamicObject>,
    uid: &str,
) -> Result<(), SnapshotError> {
    let list = api
        .list(&ListParams::default().labels(&format!("{BACKUP_LABEL}={uid}")))
        .await
        .map_err(|e| err(driver, format!("listing what the backup left: {e}")))?;
    let names: Vec<String> = list
        .items
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    delete_snapshots(driver, api, names.iter().map(String::as_str)).await
}

/// One VolumeGroupSnapshot over the group's PVCs.
#[derive(Clone)]
pub struct CsiGroup {
    client: kube::Client,
    owner: Owner,
    class: Option<String>,
    atomic: bool,
    resource: ApiResource,
}

impl std::fmt::Debug for CsiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsiGroup")
            .field("owner", &self.owner)
            .field("class", &self.class)
            .field("atomic", &self.atomic)
            .field("version", &self.resource.version)
            .finish_non_exhaustive()
    }
}

impl CsiGroup {
    /// Finds the served VolumeGroupSnapshot version first.
    pub async fn new(
        client: kube::Client,
        owner: Owner,
        class: Option<String>,
        atomic: bool,
    ) -> Result<Self, String> {
        let resource = volume_group_snapshot_resource(&client).await?;
        Ok(CsiGroup {
            client,
            owner,
            class,
            atomic,
            resource,
        })
    }

    fn groups(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.owner.namespace, &self.resource)
    }

    fn snapshots(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.owner.namespace,
            &volume_snapshot_resource(),
        )
    }

    /// The VolumeGroupSnapshot of the first cut: the backup's name.
    pub fn group_name(&self) -> &str {
        &self.owner.backup
    }

    /// The VolumeGroupSnapshot of cut `batch` (0 first).
    fn batch_name(&self, batch: usize) -> String {
        match batch {
            0 => self.owner.backup.clone(),
            n => format!("{}.{}", self.owner.backup, n + 1),
        }
    }

    /// The backup's VolumeGroupSnapshots (every cut's), by its label.
    async fn backup_groups(&self) -> Result<Vec<String>, SnapshotError> {
        let list = self
            .groups()
            .list(&ListParams::default().labels(&format!("{BACKUP_LABEL}={}", self.owner.uid)))
            .await
            .map_err(|e| {
                err(
                    "csi-group",
                    format!("listing the backup's VolumeGroupSnapshots: {e}"),
                )
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|g| g.metadata.name)
            .collect())
    }
}

#[async_trait]
impl Snapshotter for CsiGroup {
    fn name(&self) -> &'static str {
        "csi-group"
    }

    fn copy_fix(&self) -> &'static str {
        COPY_FIX
    }

    fn accept_gap(&self) -> &'static str {
        ACCEPT_GAP
    }

    fn atomic(&self) -> bool {
        self.atomic
    }

    /// Labels exactly the group's PVCs, each with the cut that takes it
    /// (before the freeze).
    async fn prepare(&self, volumes: &[VolumeRef]) -> Result<(), SnapshotError> {
        let pvcs: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &self.owner.namespace);
        for v in volumes {
            let Some(claim) = v.claim.as_deref() else {
                continue;
            };
            let labels = json!({ BACKUP_LABEL: self.owner.uid, CUT_LABEL: v.batch.to_string() });
            let patch = json!({ "metadata": { "labels": labels } });
            pvcs.patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| err("csi-group", format!("labelling PVC {claim}: {e}")))?;
        }
        Ok(())
    }

    /// One VolumeGroupSnapshot per batch (the backup's name, then
    /// `<name>.2`, … for later cuts), over exactly the batch's PVCs.
    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let batch = volumes.first().map_or(0, |v| v.batch);
        let name = self.batch_name(batch);
        let selector = json!({ BACKUP_LABEL: self.owner.uid, CUT_LABEL: batch.to_string() });
        let mut spec = json!({ "source": { "selector": { "matchLabels": selector } } });
        if let Some(class) = &self.class {
            spec["volumeGroupSnapshotClassName"] = json!(class);
        }
        let what = format!("VolumeGroupSnapshot {name}");
        let api_version = &self.resource.api_version;
        create_labelled(
            &self.groups(),
            api_version,
            "VolumeGroupSnapshot",
            &name,
            &self.owner,
            spec,
            "csi-group",
            &what,
        )
        .await?;
        let group = wait_for(
            "csi-group",
            &self.groups(),
            &name,
            "creationTime",
            READY_TIMEOUT,
            |o| progress(o).0,
        )
        .await?;
        let uid = group.metadata.uid.clone().unwrap_or_default();
        // Its members: the VolumeSnapshots it owns, one per PVC.
        let by_claim: BTreeMap<&str, &VolumeRef> = volumes
            .iter()
            .filter_map(|v| v.claim.as_deref().map(|c| (c, v)))
            .collect();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let list = self
                .snapshots()
                .list(&ListParams::default())
                .await
                .map_err(|e| {
                    err(
                        "csi-group",
                        format!("listing the group's VolumeSnapshots: {e}"),
                    )
                })?;
            let owned: Vec<(String, String)> = list
                .items
                .iter()
                .filter(|s| {
                    s.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == uid)
                })
                .filter_map(|s| {
                    let claim = s.data["spec"]["source"]["persistentVolumeClaimName"].as_str()?;
                    Some((claim.to_string(), s.metadata.name.clone()?))
                })
                .collect();
            if owned.len() >= by_claim.len() {
                for (claim, snapshot) in owned {
                    if let Some(v) = by_claim.get(claim.as_str()) {
                        made.record(SnapshotHandle::new(
                            backup_id,
                            (*v).clone(),
                            snapshot,
                            "csi-group",
                        ));
                    }
                }
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(err(
                    "csi-group",
                    format!(
                        "VolumeGroupSnapshot {name} has {} of its {} VolumeSnapshots",
                        owned.len(),
                        by_claim.len()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn refresh(
        &self,
        handle: &SnapshotHandle,
        relative: &str,
        made: &Made,
    ) -> Result<(), SnapshotError> {
        Csi::new(self.client.clone(), self.owner.clone(), None, self.atomic)
            .refresh(handle, relative, made)
            .await
    }

    async fn ready(&self, handles: &mut [SnapshotHandle]) -> Result<(), SnapshotError> {
        for name in self.backup_groups().await? {
            wait_for(
                "csi-group",
                &self.groups(),
                &name,
                "readyToUse",
                READY_TIMEOUT,
                |o| progress(o).1,
            )
            .await?;
        }
        let api = self.snapshots();
        for h in handles.iter() {
            wait_for(
                "csi-group",
                &api,
                &h.handle,
                "readyToUse",
                READY_TIMEOUT,
                |o| progress(o).1,
            )
            .await?;
        }
        Ok(())
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        delete_snapshots(
            "csi-group",
            &self.snapshots(),
            handles.iter().map(|h| h.handle.as_str()),
        )
        .await?;
        let groups = self.backup_groups().await?;
        delete_snapshots(
            "csi-group",
            &self.groups(),
            groups.iter().map(String::as_str),
        )
        .await
    }

    async fn delete_backup(&self, _backup_id: &str) -> Result<(), SnapshotError> {
        delete_labelled("csi-group", &self.groups(), &self.owner.uid).await?;
        delete_labelled("csi-group", &self.snapshots(), &self.owner.uid).await
    }
}
