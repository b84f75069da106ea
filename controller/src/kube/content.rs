//! GroupBackupContent: a GroupBackup's record outside its namespace.
//!
//! When a backup succeeds, the controller writes its content (cluster-
//! scoped, `<namespace>.gbc-<GroupBackup uid>`) from the GroupBackup's status and what
//! the storage says of each snapshot: its VolumeSnapshotContent, the CSI
//! driver's snapshot handle, the restore size, and the source PVC's class,
//! access modes and volume mode. The content and the GroupBackup name each
//! other (`spec.source` with the backup's uid; `status.content`). A backup
//! whose content cannot be written fails, and its snapshots are deleted.
//!
//! The content also keeps the application's own objects (see
//! [`capture`]). What must not go into a custom resource — the captured
//! Secrets' data and the members' artefacts — goes into a Secret in the
//! controller's namespace (`spec.keptSecret`, named like the content and
//! owned by it, so the garbage collector removes it with the content).
//!
//! Every VolumeSnapshotContent (and `csi-group`'s VolumeGroupSnapshotContent)
//! the backup made is patched to `deletionPolicy: Retain` as the content is
//! written, so the data outlives the VolumeSnapshots, the GroupBackup and
//! the namespace. What deletes it is a deletion on purpose:
//!
//! - the GroupBackup deleted with `deletionPolicy: Delete` (not as part of
//!   its namespace's deletion): its snapshot contents are set back to
//!   `Delete`, its VolumeSnapshots deleted, then its content;
//! - the content deleted: its finalizer deletes its snapshot contents when
//!   its `deletionPolicy` is `Delete` (and waits while its GroupBackup
//!   still exists: delete that instead).
//!
//! A namespace's deletion deletes neither: its backups' contents stay, and
//! with them their snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::kube::capture;
use crate::kube::controller::{Context, ReconcileError};
use crate::kube::crd::{
    BACKUP_LABEL, BackupMember, BackupSource, CONTENT_FINALIZER, ContentMember, ContentVolume,
    DeletionPolicy, GroupBackup, GroupBackupContent, GroupBackupContentSpec,
    GroupBackupContentStatus, GroupBackupStatus, ObjectRef, VolumeSnapshotRef,
};
use crate::kube::reason::Reason;
use crate::kube::store::{FIELD_MANAGER, apply_status, set_condition};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;

/// On a content: the namespace of its GroupBackup (a controller confined
/// to one namespace watches only its own contents).
pub const SOURCE_NAMESPACE_LABEL: &str = "stillpoint.dev/source-namespace";

/// In a content's kept Secret: the prefix of a captured Secret's data.
pub const SECRET_KEY: &str = "secret.";
/// In a content's kept Secret: the prefix of a member's artefact.
pub const ARTEFACT_KEY: &str = "artefact.";

/// The name of the content of the GroupBackup with `uid` in namespace
/// `ns`: `<ns>.gbc-<uid>`. A namespace's name has no dot, so the name
/// says which namespace a content came from, and the CRD holds every
/// content to it; the admission policy of restores reads it
/// (`deploy/restore-policy.yaml`).
pub fn content_name(ns: &str, uid: &str) -> String {
    format!("{ns}.gbc-{uid}")
}

/// The name of `backup`'s content.
pub fn name_of(backup: &GroupBackup) -> String {
    content_name(
        backup.metadata.namespace.as_deref().unwrap_or_default(),
        &uid_of(backup),
    )
}

pub(crate) fn volume_snapshot_contents() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent"),
        "volumesnapshotcontents",
    )
}

/// Where a content keeps what must not go into a custom resource: the
/// controller's namespace, and the members' artefacts (`<pod>.<name>`).
#[derive(Debug, Clone, Default)]
pub struct Keep {
    pub namespace: String,
    pub artefacts: BTreeMap<String, ByteString>,
}

/// Writes the content of `backup`, which succeeded with `status`, with the
/// application's objects; returns its name.
pub async fn record(
    client: &kube::Client,
    backup: &GroupBackup,
    status: &GroupBackupStatus,
    keep: Keep,
) -> Result<String, kube::Error> {
    let ns = backup.metadata.namespace.clone().unwrap_or_default();
    let name = name_of(backup);
    let captured = capture::capture(client, &ns, &backup.spec.group, &status.members).await?;
    let mut spec = spec_of(client, backup, status).await?;
    spec.objects = captured.objects;
    let kept = kept_data(captured.secret_data, keep.artefacts)?;
    spec.kept_secret = (!kept.is_empty()).then(|| ObjectRef {
        namespace: keep.namespace.clone(),
        name: name.clone(),
    });
    let api: Api<GroupBackupContent> = Api::all(client.clone());
    let content = json!({
        "apiVersion": "stillpoint.dev/v1alpha1",
        "kind": "GroupBackupContent",
        "metadata": {
            "name": name,
            "finalizers": [CONTENT_FINALIZER],
            "labels": {SOURCE_NAMESPACE_LABEL: ns},
        },
        "spec": spec,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let made = api.patch(&name, &params, &Patch::Apply(&content)).await?;
    if let Some(at) = &made.spec.kept_secret {
        keep_secret(client, &made, at, kept).await?;
    }
    set_policy(client, &made.spec, DeletionPolicy::Retain).await?;
    mark_ready(&api, &made).await?;
    Ok(name)
}

/// Content `made`, written in full, Ready.
pub(crate) async fn mark_ready(
    api: &Api<GroupBackupContent>,
    made: &GroupBackupContent,
) -> Result<(), kube::Error> {
    let status = GroupBackupContentStatus {
        observed_generation: made.metadata.generation,
        phase: Some("Ready".into()),
        conditions: Vec::new(),
    };
    apply_status(api, &made.name_any(), "GroupBackupContent", &status).await
}

/// The kept Secret's data: each captured Secret's data as JSON under
/// `secret.<name>`, each artefact under `artefact.<pod>.<name>`.
fn kept_data(
    secrets: BTreeMap<String, BTreeMap<String, ByteString>>,
    artefacts: BTreeMap<String, ByteString>,
) -> Result<BTreeMap<String, ByteString>, kube::Error> {
    let mut data = BTreeMap::new();
    for (name, d) in secrets {
        let json = serde_json::to_vec(&d).map_err(kube::Error::SerdeError)?;
        data.insert(format!("{SECRET_KEY}{name}"), ByteString(json));
    }
    for (name, v) in artefacts {
        data.insert(format!("{ARTEFACT_KEY}{name}"), v);
    }
    Ok(data)
}

/// Writes the Secret `at` a content keeps, owned by the content (so it
/// goes when the content goes, by the garbage collector).
pub(crate) async fn keep_secret(
    client: &kube::Client,
    content: &GroupBackupContent,
    at: &ObjectRef,
    data: BTreeMap<String, ByteString>,
) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &at.namespace);
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": at.name,
            "labels": {SOURCE_NAMESPACE_LABEL: content.spec.source.namespace},
            "ownerReferences": [content.controller_owner_ref(&())],
        },
        "type": "Opaque",
        "data": data,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    secrets
        .patch(&at.name, &params, &Patch::Apply(&secret))
        .await?;
    Ok(())
}

/// The content of `backup`, which succeeded with `status`.
async fn spec_of(
    client: &kube::Client,
    backup: &GroupBackup,
    status: &GroupBackupStatus,
) -> Result<GroupBackupContentSpec, kube::Error> {
    let ns = backup.metadata.namespace.clone().unwrap_or_default();
    let uid = uid_of(backup);
    let snapshots = Snapshots::new(client, &ns);
    let mut members = Vec::new();
    let mut bytes = 0u64;
    for m in &status.members {
        let mut volumes = Vec::new();
        for v in &m.volume_snapshots {
            let (volume, size) = snapshots.volume(v).await?;
            bytes += size;
            volumes.push(volume);
        }
        members.push(member(m, volumes));
    }
    Ok(GroupBackupContentSpec {
        source: BackupSource {
            namespace: ns.clone(),
            name: backup.metadata.name.clone().unwrap_or_default(),
            uid: uid.clone(),
        },
        group: backup.spec.group.clone(),
        deletion_policy: backup.spec.deletion_policy,
        snapshotter: status.snapshotter.clone(),
        start_time: status.start_time.clone(),
        completion_time: status
            .completion_time
            .clone()
            .or_else(|| Some(crate::kube::controller::now())),
        freeze_window_microseconds: status.freeze_window_microseconds,
        size: (bytes > 0).then(|| human_bytes(bytes)),
        artefacts_secret: status.artefacts_secret.clone().map(|name| ObjectRef {
            namespace: ns.clone(),
            name,
        }),
        members,
        volume_group_snapshot_contents: group_contents(client, &ns, &uid).await?,
        objects: Vec::new(),
        kept_secret: None,
    })
}

fn uid_of(backup: &GroupBackup) -> String {
    backup.metadata.uid.clone().unwrap_or_default()
}

pub(crate) fn volume_group_snapshot_contents(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(
            "groupsnapshot.storage.k8s.io",
            version,
            "VolumeGroupSnapshotContent",
        ),
        "volumegroupsnapshotcontents",
    )
}

/// The VolumeGroupSnapshotContents of the backup with `uid` (`csi-group`;
/// none where group snapshots are not served).
async fn group_contents(
    client: &kube::Client,
    ns: &str,
    uid: &str,
) -> Result<Vec<String>, kube::Error> {
    let Ok(resource) = crate::kube::csi::volume_group_snapshot_resource(client).await else {
        return Ok(Vec::new());
    };
    let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let labelled = ListParams::default().labels(&format!("{BACKUP_LABEL}={uid}"));
    Ok(groups
        .list(&labelled)
        .await?
        .items
        .iter()
        .filter_map(|g| {
            g.data["status"]["boundVolumeGroupSnapshotContentName"]
                .as_str()
                .map(String::from)
        })
        .collect())
}

/// Every snapshot content a content names: (resource, name).
async fn snapshot_contents(
    client: &kube::Client,
    spec: &GroupBackupContentSpec,
) -> Vec<(ApiResource, String)> {
    let mut out: Vec<(ApiResource, String)> = spec
        .members
        .iter()
        .flat_map(|m| m.volumes.iter())
        .filter_map(|v| v.volume_snapshot_content.clone())
        .map(|name| (volume_snapshot_contents(), name))
        .collect();
    if !spec.volume_group_snapshot_contents.is_empty()
        && let Ok(groups) = crate::kube::csi::volume_group_snapshot_resource(client).await
    {
        let resource = volume_group_snapshot_contents(&groups.version);
        out.extend(
            spec.volume_group_snapshot_contents
                .iter()
                .map(|name| (resource.clone(), name.clone())),
        );
    }
    out
}

/// Sets the `deletionPolicy` of every snapshot content `spec` names (those
/// gone are fine).
async fn set_policy(
    client: &kube::Client,
    spec: &GroupBackupContentSpec,
    policy: DeletionPolicy,
) -> Result<(), kube::Error> {
    let patch = json!({"spec": {"deletionPolicy": policy}});
    for (resource, name) in snapshot_contents(client, spec).await {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The content of `backup`, if it has one.
pub async fn of(
    client: &kube::Client,
    backup: &GroupBackup,
) -> Result<Option<GroupBackupContent>, kube::Error> {
    let api: Api<GroupBackupContent> = Api::all(client.clone());
    api.get_opt(&name_of(backup)).await
}

/// A backup deleted on purpose: its snapshot contents go with its
/// VolumeSnapshots from now on (set back to `Delete`).
pub async fn release(client: &kube::Client, backup: &GroupBackup) -> Result<(), kube::Error> {
    match of(client, backup).await? {
        Some(content) => set_policy(client, &content.spec, DeletionPolicy::Delete).await,
        None => Ok(()),
    }
}

/// Deletes the content of `backup` (none is fine); its finalizer deletes
/// what is left of its snapshot contents.
pub async fn delete(client: &kube::Client, backup: &GroupBackup) -> Result<(), kube::Error> {
    let api: Api<GroupBackupContent> = Api::all(client.clone());
    match api.delete(&name_of(backup), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Undoes a content whose writing failed (its backup fails, and its
/// snapshots are deleted): its snapshot contents back to `Delete`, and the
/// content gone without waiting for its finalizer.
pub async fn discard(client: &kube::Client, backup: &GroupBackup) -> Result<(), kube::Error> {
    let Some(content) = of(client, backup).await? else {
        return Ok(());
    };
    set_policy(client, &content.spec, DeletionPolicy::Delete).await?;
    let api: Api<GroupBackupContent> = Api::all(client.clone());
    let name = name_of(backup);
    let unfinalized = json!({"metadata": {"finalizers": null}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&unfinalized))
        .await?;
    delete(client, backup).await
}

/// Whether namespace `ns` is being deleted (or gone).
pub async fn namespace_terminating(client: &kube::Client, ns: &str) -> Result<bool, kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    Ok(api
        .get_opt(ns)
        .await?
        .is_none_or(|n| n.metadata.deletion_timestamp.is_some()))
}

/// A GroupBackupContent's reconcile, on kube-rs's finalizer: while it
/// exists, its `Bound` condition says whether its GroupBackup does;
/// deleted, it releases its snapshot contents.
pub async fn reconcile(
    content: Arc<GroupBackupContent>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let api: Api<GroupBackupContent> = Api::all(ctx.client.clone());
    finalizer(&api, CONTENT_FINALIZER, content, |event| async {
        match event {
            Finalizer::Apply(c) => bind(&c, &ctx).await,
            Finalizer::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(ReconcileError::from)
}

/// The `Bound` condition: whether the GroupBackup it records (that object:
/// its uid) still exists. An Event when that changes.
async fn bind(content: &GroupBackupContent, ctx: &Context) -> Result<Action, ReconcileError> {
    let source = &content.spec.source;
    let backups: Api<GroupBackup> = Api::namespaced(ctx.client.clone(), &source.namespace);
    let bound = backups
        .get_opt(&source.name)
        .await?
        .is_some_and(|b| b.metadata.uid.as_deref() == Some(source.uid.as_str()));
    let at = format!("{}/{}", source.namespace, source.name);
    let (reason, message) = match bound {
        true => (Reason::Bound, format!("the record of GroupBackup {at}")),
        false => (
            Reason::SourceDeleted,
            format!(
                "GroupBackup {at} is gone; this content keeps its data (deleting the content \
                 deletes the data when its deletionPolicy is Delete)"
            ),
        ),
    };
    let mut status = content.status.clone().unwrap_or_default();
    let before = status.clone();
    let generation = content.metadata.generation;
    set_condition(
        &mut status.conditions,
        "Bound",
        bound,
        reason,
        &message,
        generation,
    );
    status.observed_generation = generation;
    // Written whole by one field manager: what this write leaves out, it
    // removes. A content exists only once written in full.
    status.phase = Some("Ready".into());
    if status != before {
        let api: Api<GroupBackupContent> = Api::all(ctx.client.clone());
        apply_status(&api, &content.name_any(), "GroupBackupContent", &status).await?;
        ctx.event(content, !bound, reason, message).await;
    }
    Ok(Action::await_change())
}

/// Deleted: waits while its GroupBackup exists; then, with
/// `deletionPolicy: Delete`, deletes its snapshot contents (the storage's
/// snapshots with them).
async fn cleanup(content: &GroupBackupContent, ctx: &Context) -> Result<Action, ReconcileError> {
    let source = &content.spec.source;
    let backups: Api<GroupBackup> = Api::namespaced(ctx.client.clone(), &source.namespace);
    if let Some(b) = backups.get_opt(&source.name).await?
        && b.metadata.uid.as_deref() == Some(source.uid.as_str())
        && b.metadata.deletion_timestamp.is_none()
    {
        return Err(ReconcileError::ContentInUse {
            content: content.metadata.name.clone().unwrap_or_default(),
            backup: format!("{}/{}", source.namespace, source.name),
        });
    }
    if content.spec.deletion_policy == DeletionPolicy::Delete {
        set_policy(&ctx.client, &content.spec, DeletionPolicy::Delete).await?;
        for (resource, name) in snapshot_contents(&ctx.client, &content.spec).await {
            let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &resource);
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Action::await_change())
}

/// A member of the backup's status as its content records it.
fn member(m: &BackupMember, volumes: Vec<ContentVolume>) -> ContentMember {
    ContentMember {
        pod: m.pod.clone(),
        member: m.member.clone(),
        engine: m.engine.clone(),
        role: m.role.clone(),
        primary: m.primary.clone(),
        position: m.position.clone(),
        aligned_to: m.aligned_to.clone(),
        consistency: m.consistency.clone(),
        restore_stage: m.restore_stage,
        workload: m.workload.clone(),
        data_directory: m.data_directory.clone(),
        artefacts: m.artefacts.clone(),
        volumes,
    }
}

/// What the storage says of a backup's snapshots.
struct Snapshots {
    snapshots: Api<DynamicObject>,
    contents: Api<DynamicObject>,
    pvcs: Api<PersistentVolumeClaim>,
}

impl Snapshots {
    fn new(client: &kube::Client, ns: &str) -> Self {
        Snapshots {
            snapshots: Api::namespaced_with(
                client.clone(),
                ns,
                &crate::kube::csi::volume_snapshot_resource(),
            ),
            contents: Api::all_with(client.clone(), &volume_snapshot_contents()),
            pvcs: Api::namespaced(client.clone(), ns),
        }
    }

    /// Snapshot `v` down to its handle, and its size in bytes.
    async fn volume(&self, v: &VolumeSnapshotRef) -> Result<(ContentVolume, u64), kube::Error> {
        let snapshot = self.snapshots.get(&v.name).await?;
        let bound = snapshot.data["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .map(String::from);
        let content = match &bound {
            Some(c) => Some(self.contents.get(c).await?),
            None => None,
        };
        let field = |path: &[&str]| {
            let mut at = &content.as_ref()?.data;
            for p in path {
                at = &at[*p];
            }
            Some(at.clone())
        };
        let pvc = self.pvcs.get_opt(&v.pvc).await?.and_then(|p| p.spec);
        // The driver's restore size, else what the PVC asked for (what a
        // restore asks for again).
        let requested = pvc
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone());
        let restore_size = snapshot.data["status"]["restoreSize"]
            .as_str()
            .map(String::from)
            .or(requested);
        let bytes = field(&["status", "restoreSize"])
            .and_then(|s| s.as_u64())
            .or_else(|| restore_size.as_deref().and_then(quantity_bytes))
            .unwrap_or(0);
        let volume = ContentVolume {
            pvc: v.pvc.clone(),
            volume_snapshot: v.name.clone(),
            volume_snapshot_content: bound,
            snapshot_handle: field(&["status", "snapshotHandle"])
                .and_then(|s| s.as_str().map(String::from)),
            group_snapshot_handle: field(&["status", "volumeGroupSnapshotHandle"])
                .and_then(|s| s.as_str().map(String::from)),
            driver: field(&["spec", "driver"]).and_then(|s| s.as_str().map(String::from)),
            restore_size,
            storage_class_name: pvc.as_ref().and_then(|s| s.storage_class_name.clone()),
            access_modes: pvc
                .as_ref()
                .and_then(|s| s.access_modes.clone())
                .unwrap_or_default(),
            volume_mode: pvc.as_ref().and_then(|s| s.volume_mode.clone()),
            mount_path: v.mount_path.clone(),
            part: v.part.clone(),
        };
        Ok((volume, bytes))
    }
}

/// The bytes of a Kubernetes quantity such as `1Gi`, `500M` or `1073741824`
/// (none for what it cannot read, such as a fraction of a byte).
fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let unit: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(unit)
}

/// Bytes in binary units, e.g. `1.5Gi`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match value.fract() == 0.0 {
        true => format!("{value:.0}{}", UNITS[unit]),
        false => format!("{value:.1}{}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(512), "512");
        assert_eq!(human_bytes(1024 * 1024), "1Mi");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5Gi");
    }

    #[test]
    fn quantities_read_as_bytes() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1073741824"), Some(1 << 30));
        assert_eq!(quantity_bytes("1.5Gi"), None);
        assert_eq!(quantity_bytes("3Xi"), None);
    }
}
