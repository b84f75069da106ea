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
use futures_util::StreamExt;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::runtime::{WatchStreamExt, watcher};
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

/// How often the snapshots a group snapshot made are listed while waiting
/// for them, and a snapshot being deleted is read.
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

/// Where a snapshot's content is, and how it names the snapshot it is
/// bound to: the earliest record that the storage fixed a cut.
///
/// The CSI spec has the driver's `CreateSnapshot` (and
/// `CreateVolumeGroupSnapshot`) return once the snapshot is cut, with its
/// creation time; the csi-snapshotter writes that into the content's
/// `status.creationTime` as soon as the call returns, and the snapshot
/// controller copies it to the snapshot's status only after it has seen
/// that update. A dynamically provisioned content is named by the
/// external-snapshotter's convention (`snapcontent-<uid>`,
/// `groupsnapcontent-<uid>`) and bound to its snapshot's uid; a content
/// that is not (or a cluster that names contents otherwise) only means the
/// snapshot's own `creationTime` is waited for.
#[derive(Clone)]
struct ContentOf {
    api: Api<DynamicObject>,
    name: String,
    /// The spec field naming the snapshot (`volumeSnapshotRef`, …).
    reference: &'static str,
    uid: String,
}

impl ContentOf {
    fn snapshot(client: &kube::Client, uid: &str) -> ContentOf {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
            "volumesnapshotcontents",
        );
        ContentOf {
            api: Api::all_with(client.clone(), &resource),
            name: format!("snapcontent-{uid}"),
            reference: "volumeSnapshotRef",
            uid: uid.to_string(),
        }
    }

    fn group(client: &kube::Client, groups: &ApiResource, uid: &str) -> ContentOf {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&groups.group, &groups.version, "VolumeGroupSnapshotContent"),
            "volumegroupsnapshotcontents",
        );
        ContentOf {
            api: Api::all_with(client.clone(), &resource),
            name: format!("groupsnapcontent-{uid}"),
            reference: "volumeGroupSnapshotRef",
            uid: uid.to_string(),
        }
    }

    /// Whether `content` is this one and records the cut (its
    /// `creationTime`: nanoseconds on a VolumeSnapshotContent, a timestamp
    /// on a VolumeGroupSnapshotContent).
    fn cut(&self, content: &DynamicObject) -> bool {
        records_cut(content, self.reference, &self.uid)
    }
}

/// Whether `content` is bound (by `reference`) to the snapshot of `uid`
/// and has its `creationTime`.
fn records_cut(content: &DynamicObject, reference: &str, uid: &str) -> bool {
    content.data["spec"][reference]["uid"].as_str() == Some(uid)
        && !content.data["status"]["creationTime"].is_null()
}

/// What a watched snapshot told.
enum Seen {
    Done,
    Failing(String),
    Progressing,
    Gone,
    /// The watch itself failed (it is retried): why.
    Unwatched(String),
}

/// One object's states, by name, through a watch (re-listed and resumed by
/// the watcher, with its backoff, on errors): `Ok(None)` once it is gone
/// (or was not there when listed), `Err` when the watch failed. Its lists
/// are consistent reads: one served from the API server's watch cache may
/// not hold yet an object just created, which would read as gone.
fn watch_one(
    api: Api<DynamicObject>,
    name: &str,
) -> impl futures_util::Stream<Item = Result<Option<DynamicObject>, String>> + Send + use<> {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .list_semantic(watcher::ListSemantic::MostRecent);
    let mut listed = false;
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let item = match event {
                Ok(watcher::Event::Init) => {
                    listed = false;
                    None
                }
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    listed = true;
                    Some(Ok(Some(o)))
                }
                Ok(watcher::Event::InitDone) => (!listed).then_some(Ok(None)),
                Ok(watcher::Event::Delete(_)) => Some(Ok(None)),
                Err(e) => Some(Err(e.to_string())),
            };
            std::future::ready(item)
        })
}

/// Waits (through watches, never polls) until `done` says snapshot `name`
/// is done, or, given `content`, until its content records the cut,
/// whichever is first. Its `status.error` fails it once it has stood for
/// [`ERROR_GRACE`].
async fn wait_for(
    driver: &'static str,
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    bound: Duration,
    done: fn(&DynamicObject) -> bool,
    content: Option<ContentOf>,
) -> Result<(), SnapshotError> {
    let snapshot = watch_one(api.clone(), name).map(move |o| match o {
        Err(e) => Seen::Unwatched(e),
        Ok(None) => Seen::Gone,
        Ok(Some(o)) if done(&o) => Seen::Done,
        Ok(Some(o)) => progress(&o).2.map_or(Seen::Progressing, Seen::Failing),
    });
    let content = match content {
        Some(c) => watch_one(c.api.clone(), &c.name)
            .filter_map(move |o| {
                let cut = o.is_ok_and(|o| o.is_some_and(|o| c.cut(&o)));
                std::future::ready(cut.then_some(Seen::Done))
            })
            .boxed(),
        None => futures_util::stream::pending().boxed(),
    };
    let mut events = futures_util::stream::select(snapshot.boxed(), content);
    let deadline = tokio::time::Instant::now() + bound;
    let mut failing: Option<(tokio::time::Instant, String)> = None;
    let mut unwatched: Option<String> = None;
    loop {
        let grace = failing.as_ref().map(|(since, _)| *since + ERROR_GRACE);
        let seen = tokio::select! {
            seen = events.next() => seen.unwrap_or(Seen::Gone),
            _ = tokio::time::sleep_until(grace.unwrap_or(deadline).min(deadline)) => {
                let standing = grace.is_some_and(|g| g <= deadline);
                return Err(match failing {
                    Some((_, e)) if standing => err(driver, format!("{name}: {e}")),
                    failing => err(driver, format!(
                        "{name}: no {what} within {} s{}{}",
                        bound.as_secs(),
                        failing.map(|(_, e)| format!("; its last error: {e}")).unwrap_or_default(),
                        unwatched.map(|e| format!("; watching it failed: {e}")).unwrap_or_default(),
                    )),
                });
            }
        };
        match seen {
            Seen::Done => return Ok(()),
            Seen::Gone => return Err(err(driver, format!("{name} disappeared before {what}"))),
            Seen::Failing(e) => {
                let since = failing.map_or_else(tokio::time::Instant::now, |(since, _)| since);
                failing = Some((since, e));
            }
            Seen::Progressing => failing = None,
            Seen::Unwatched(e) => {
                tracing::debug!("watching {name}: {e}");
                unwatched = Some(e);
            }
        }
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

    /// Creates VolumeSnapshot `name` of `claim`; returns its uid.
    async fn create(&self, name: &str, claim: &str) -> Result<String, SnapshotError> {
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
        .await
    }

    /// Waits until snapshot `name` (of `uid`) is cut.
    async fn cut_of(&self, name: &str, uid: &str) -> Result<(), SnapshotError> {
        let content = ContentOf::snapshot(&self.client, uid);
        let created = |o: &DynamicObject| progress(o).0;
        wait_for(
            "csi",
            &self.api(),
            name,
            "creationTime",
            READY_TIMEOUT,
            created,
            Some(content),
        )
        .await
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
            let uid = self.create(&name, claim).await?;
            made.record(SnapshotHandle::new(
                backup_id,
                v.clone(),
                name.clone(),
                "csi",
            ));
            self.cut_of(&name, &uid).await
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
        let uid = self.create(&name, &claim).await?;
        let mut part = handle.clone();
        part.handle = name.clone();
        part.volume = handle.volume.join(relative);
        part.part = Some(relative.to_string());
        made.record(part);
        self.cut_of(&name, &uid).await
    }

    async fn ready(&self, handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        let api = self.api();
        let results = join_all(handles.iter().map(|h| {
            let api = api.clone();
            async move {
                let ready = |o: &DynamicObject| progress(o).1;
                wait_for(
                    "csi",
                    &api,
                    &h.handle,
                    "readyToUse",
                    READY_TIMEOUT,
                    ready,
                    None,
                )
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
) -> Result<String, SnapshotError> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": owner.namespace, "labels": owner.labels() },
        "spec": spec,
    }))
    .expect("a snapshot object");
    let made = api
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|e| err(driver, format!("creating {what}: {e}")))?;
    Ok(made.metadata.uid.unwrap_or_default())
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
    /// Cuts whose per-PVC VolumeSnapshots are still to be recorded.
    later: std::sync::Arc<std::sync::Mutex<Vec<Cut>>>,
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
            later: Default::default(),
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

/// One batch of a group snapshot: its VolumeGroupSnapshot and volumes.
#[derive(Debug, Clone)]
struct Cut {
    backup_id: String,
    name: String,
    uid: String,
    volumes: Vec<VolumeRef>,
}

impl CsiGroup {
    /// Waits for the VolumeSnapshots the group snapshot of `cut` owns, one
    /// per PVC, and returns their handles.
    async fn members_of(&self, cut: &Cut) -> Result<Vec<SnapshotHandle>, SnapshotError> {
        let by_claim: BTreeMap<&str, &VolumeRef> = cut
            .volumes
            .iter()
            .filter_map(|v| v.claim.as_deref().map(|c| (c, v)))
            .collect();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let owned = self.owned_by(&cut.uid).await?;
            if owned.len() >= by_claim.len() {
                return Ok(owned
                    .into_iter()
                    .filter_map(|(claim, snapshot)| {
                        let v = by_claim.get(claim.as_str())?;
                        let driver = "csi-group";
                        Some(SnapshotHandle::new(
                            &cut.backup_id,
                            (*v).clone(),
                            snapshot,
                            driver,
                        ))
                    })
                    .collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(err(
                    "csi-group",
                    format!(
                        "VolumeGroupSnapshot {} has {} of its {} VolumeSnapshots",
                        cut.name,
                        owned.len(),
                        by_claim.len()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The (PVC, VolumeSnapshot) pairs the group snapshot of `uid` owns.
    async fn owned_by(&self, uid: &str) -> Result<Vec<(String, String)>, SnapshotError> {
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
        Ok(list
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
    /// `<name>.2`, … for later cuts), over exactly the batch's PVCs. Its
    /// per-PVC VolumeSnapshots are recorded in `ready`.
    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        _made: &Made,
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
        let uid = create_labelled(
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
        let content = ContentOf::group(&self.client, &self.resource, &uid);
        wait_for(
            "csi-group",
            &self.groups(),
            &name,
            "creationTime",
            READY_TIMEOUT,
            |o| progress(o).0,
            Some(content),
        )
        .await?;
        let cut = Cut {
            backup_id: backup_id.to_string(),
            name,
            uid,
            volumes: volumes.to_vec(),
        };
        // The cut point is fixed. Its per-PVC VolumeSnapshots, which the
        // snapshot controller makes afterwards, are waited for after the
        // thaw, in `ready`: a refresh during the thaw (a class that
        // copies) needs only the PVC (see `refresh`).
        self.later.lock().unwrap().push(cut);
        Ok(())
    }

    fn handles_after_cut(&self) -> bool {
        true
    }

    /// A VolumeSnapshot of the PVC (see [`Csi::refresh`]), named after the
    /// backup and the PVC: the group's own snapshot of it may not exist
    /// yet, and is not needed.
    async fn refresh(
        &self,
        handle: &SnapshotHandle,
        relative: &str,
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let claim = handle.claim.clone().unwrap_or_default();
        let base = SnapshotHandle {
            handle: snapshot_name(&handle.backup, &claim),
            ..handle.clone()
        };
        Csi::new(self.client.clone(), self.owner.clone(), None, self.atomic)
            .refresh(&base, relative, made)
            .await
    }

    async fn ready(&self, handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        let later = std::mem::take(&mut *self.later.lock().unwrap());
        for cut in &later {
            handles.extend(self.members_of(cut).await?);
        }
        for name in self.backup_groups().await? {
            wait_for(
                "csi-group",
                &self.groups(),
                &name,
                "readyToUse",
                READY_TIMEOUT,
                |o| progress(o).1,
                None,
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
                None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn content(reference: &str, uid: &str, status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": { "name": format!("snapcontent-{uid}") },
            "spec": { reference: { "uid": uid } },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_content_records_the_cut_once_it_has_a_creation_time_in_either_form() {
        let vsc = "volumeSnapshotRef";
        // A VolumeSnapshotContent's is nanoseconds; a group content's a time.
        let nanos = content(
            vsc,
            "u1",
            json!({ "creationTime": 1_765_000_000_123_456_789_i64 }),
        );
        assert!(records_cut(&nanos, vsc, "u1"));
        let group = "volumeGroupSnapshotRef";
        let time = content(
            group,
            "g1",
            json!({ "creationTime": "2026-12-07T05:00:00Z" }),
        );
        assert!(records_cut(&time, group, "g1"));
        // Not cut yet, or another snapshot's.
        let pending = content(vsc, "u1", json!({ "readyToUse": false }));
        assert!(!records_cut(&pending, vsc, "u1"));
        assert!(!records_cut(&nanos, vsc, "u2"));
        assert!(!records_cut(&nanos, group, "u1"));
    }
}
