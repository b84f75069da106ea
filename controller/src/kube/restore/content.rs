//! Step 0 of a restore of a GroupBackupContent: the application made again
//! from its record, so that the steps after it find what a restore of a
//! GroupBackup finds in the backup's namespace.
//!
//! 1. **Objects**: each kept object (but the PVCs, which step 3 makes from
//!    the snapshots) is created in the restore's namespace, labelled with
//!    the restore; the workloads with `replicas: 0` (the stages scale them
//!    up), a Secret with its data from the content's kept Secret. One that
//!    exists already is left as it is (a restore never overwrites). Under
//!    new names (`pvcPrefix`), only the ServiceAccounts and Secrets: the
//!    rest is copied under the new names (`copies.rs`).
//! 2. **Artefacts**: the members' artefacts go into `<restore>-artefacts`,
//!    owned by the GroupRestore, for the preparation pods.
//! 3. **Snapshots**: each retained snapshot is bound here again, as
//!    Kubernetes binds a pre-provisioned snapshot: a VolumeSnapshotContent
//!    `<restore uid>-<n>` with the storage's `snapshotHandle` and
//!    `deletionPolicy: Retain`, and a VolumeSnapshot `<restore>-<original
//!    VolumeSnapshot>` naming it; ready within the stage timeout. They are
//!    deleted when the restore ends ([`Run::release_snapshots`]); the
//!    data stays with the content's own snapshot contents.
//!
//! A content taken in another namespace is restored only if the admission
//! policy that asks for the `restore` verb (deploy/restore-policy.yaml)
//! was bound before the GroupRestore was created.
//!
//! The content is then restored as the backup it records, under its
//! original names or, with `pvcPrefix`, under new ones.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::run::Run;
use super::{Stop, stop};
use crate::kube::content::{ARTEFACT_KEY, SECRET_KEY, volume_snapshot_contents};
use crate::kube::crd::{
    BackupMember, CapturedObject, ContentMember, ContentVolume, GroupBackup, GroupBackupContent,
    RESTORE_UID_LABEL, VolumeSnapshotRef,
};
use crate::kube::reason::Reason;

/// The admission policy binding that asks for the `restore` verb on a
/// content from another namespace (deploy/restore-policy.yaml).
pub const RESTORE_POLICY: &str = "stillpoint-restore-content";

/// How long the restore's own VolumeSnapshots may take to go when it ends.
const RELEASE_BOUND: Duration = Duration::from_secs(30);

impl Run {
    /// Step 0: content `name` made again here. Returns the backup it
    /// records, with the snapshots bound here.
    pub(super) async fn rebuild(
        &mut self,
        name: &str,
        bound: Duration,
    ) -> Result<GroupBackup, Stop> {
        let content = self.content(name).await?;
        let kept = self.kept(&content).await?;
        self.captured = content.spec.objects.clone();
        self.objects(&content.spec.objects, &kept).await?;
        self.artefacts(&kept).await?;
        let members = self.bind_snapshots(&content, bound).await?;
        let source = &content.spec.source;
        let backup = json!({
            "apiVersion": "stillpoint.dev/v1alpha1",
            "kind": "GroupBackup",
            "metadata": {"name": source.name, "namespace": self.ns, "uid": source.uid},
            "spec": {"group": content.spec.group},
            "status": {"phase": "Succeeded", "members": members},
        });
        serde_json::from_value(backup).map_err(|e| stop(Reason::NotRestorable, e.to_string()))
    }

    /// The content: it exists and is ready.
    async fn content(&self, name: &str) -> Result<GroupBackupContent, Stop> {
        let api: Api<GroupBackupContent> = Api::all(self.ctx.client.clone());
        let Some(content) = api.get_opt(name).await? else {
            return Err(stop(
                Reason::ContentNotFound,
                format!("GroupBackupContent {name} does not exist"),
            ));
        };
        let phase = content.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Ready") {
            return Err(stop(
                Reason::BackupNotRestorable,
                format!("GroupBackupContent {name} is not Ready"),
            ));
        }
        if content.spec.source.namespace != self.ns {
            self.admitted_elsewhere(&content).await?;
        }
        Ok(content)
    }

    /// A content from another namespace is restored only if the admission
    /// policy that asks for the `restore` verb was bound before this
    /// GroupRestore was created: otherwise nobody checked who asked.
    async fn admitted_elsewhere(&self, content: &GroupBackupContent) -> Result<(), Stop> {
        let api: Api<ValidatingAdmissionPolicyBinding> = Api::all(self.ctx.client.clone());
        let bound = api.get_opt(RESTORE_POLICY).await?;
        if policy_in_place(bound.map(|b| b.metadata).as_ref(), &self.restore.metadata) {
            Ok(())
        } else {
            Err(stop(
                Reason::RestorePolicyMissing,
                format!(
                    "GroupBackupContent {} was taken in namespace {}; restoring it here needs \
                     ValidatingAdmissionPolicyBinding {RESTORE_POLICY} \
                     (deploy/restore-policy.yaml) to have been in place when this GroupRestore \
                     was created: install it, then create the GroupRestore again",
                    content.name_any(),
                    content.spec.source.namespace
                ),
            ))
        }
    }

    /// The data of the content's kept Secret (none if it has none).
    async fn kept(
        &self,
        content: &GroupBackupContent,
    ) -> Result<BTreeMap<String, ByteString>, Stop> {
        let Some(at) = &content.spec.kept_secret else {
            return Ok(BTreeMap::new());
        };
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &at.namespace);
        match secrets.get_opt(&at.name).await? {
            Some(s) => Ok(s.data.unwrap_or_default()),
            None => Err(stop(
                Reason::NotRestorable,
                format!(
                    "Secret {}/{}, which keeps the content's Secrets and artefacts, is gone",
                    at.namespace, at.name
                ),
            )),
        }
    }

    /// Creates each kept object but the PVCs; leaves those that exist.
    async fn objects(
        &self,
        objects: &[CapturedObject],
        kept: &BTreeMap<String, ByteString>,
    ) -> Result<(), Stop> {
        let (mut made, mut left) = (Vec::new(), Vec::new());
        // Under new names, the rest are copied (see `copies.rs`).
        let shared = self.new_names().is_some();
        let made_here = |o: &&CapturedObject| match shared {
            true => matches!(o.kind.as_str(), "ServiceAccount" | "Secret"),
            false => o.kind != "PersistentVolumeClaim",
        };
        for o in objects.iter().filter(made_here) {
            let Some(resource) = resource_of(&o.api_version, &o.kind) else {
                continue;
            };
            let what = format!("{} {}", o.kind, o.name);
            if o.kind == "Secret" && !kept.contains_key(&format!("{SECRET_KEY}{}", o.name)) {
                self.secret_made_by_hand(&o.name).await?;
                left.push(what);
                continue;
            }
            let object = self.manifest(o, kept)?;
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.ctx.client.clone(), &self.ns, &resource);
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => made.push(what),
                Err(kube::Error::Api(e)) if e.code == 409 => left.push(what),
                Err(e) => return Err(e.into()),
            }
        }
        if made.is_empty() && left.is_empty() {
            return Ok(());
        }
        let mut note = format!("created {}", list_or_none(&made));
        if !left.is_empty() {
            note.push_str(&format!("; left as they are: {}", left.join(", ")));
        }
        self.ctx
            .event(&self.restore, false, Reason::Restoring, note)
            .await;
        Ok(())
    }

    /// A kept Secret whose data did not come with the content (an import
    /// without `--include-secrets`) must have been made here by hand.
    async fn secret_made_by_hand(&self, name: &str) -> Result<(), Stop> {
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        match secrets.get_opt(name).await? {
            Some(_) => Ok(()),
            None => Err(stop(
                Reason::NotRestorable,
                format!(
                    "Secret {name}, which the application uses, came without its data (exported \
                     without --include-secrets): create it in namespace {}, then create the \
                     GroupRestore again",
                    self.ns
                ),
            )),
        }
    }

    /// Kept object `o` as it is created here.
    fn manifest(
        &self,
        o: &CapturedObject,
        kept: &BTreeMap<String, ByteString>,
    ) -> Result<DynamicObject, Stop> {
        let mut m = o.manifest.clone();
        m["apiVersion"] = json!(o.api_version);
        m["kind"] = json!(o.kind);
        m["metadata"]["namespace"] = json!(self.ns);
        if !m["metadata"]["labels"].is_object() {
            m["metadata"]["labels"] = json!({});
        }
        for (k, v) in self.labels().as_object().into_iter().flatten() {
            m["metadata"]["labels"][k] = v.clone();
        }
        match o.kind.as_str() {
            "StatefulSet" | "Deployment" => m["spec"]["replicas"] = json!(0),
            "Secret" => m["data"] = secret_data(kept, &o.name)?,
            _ => {}
        }
        serde_json::from_value(m).map_err(|e| stop(Reason::NotRestorable, e.to_string()))
    }

    /// The artefacts' Secret of the preparation pods, owned by the restore.
    async fn artefacts(&self, kept: &BTreeMap<String, ByteString>) -> Result<(), Stop> {
        let data: BTreeMap<&str, &ByteString> = kept
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(ARTEFACT_KEY)?, v)))
            .collect();
        if data.is_empty() {
            return Ok(());
        }
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.artefacts_secret,
                "labels": self.labels(),
                "ownerReferences": self.restore.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
            },
            "type": "Opaque",
            "data": data,
        });
        let secret: Secret = serde_json::from_value(secret)
            .map_err(|e| stop(Reason::NotRestorable, e.to_string()))?;
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let there = secrets.get(&self.artefacts_secret).await?;
                match there.labels().get(RESTORE_UID_LABEL) == Some(&self.uid()) {
                    true => Ok(()),
                    false => Err(stop(
                        Reason::ArtefactsSecretExists,
                        format!(
                            "Secret {} exists and was not made by this restore, which keeps the \
                             artefacts there; delete it or name the restore otherwise",
                            self.artefacts_secret
                        ),
                    )),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Binds each of the content's snapshots here, ready within `bound`;
    /// returns the members as a backup records them, with these snapshots.
    async fn bind_snapshots(
        &mut self,
        content: &GroupBackupContent,
        bound: Duration,
    ) -> Result<Vec<BackupMember>, Stop> {
        self.anchor_groups(content, bound).await?;
        let mut members = Vec::new();
        let mut n = 0;
        for m in &content.spec.members {
            let mut refs = Vec::new();
            for v in &m.volumes {
                n += 1;
                let vs = format!("{}-{}", self.name, v.volume_snapshot);
                self.bind(v, &vs, &self.binding(n)).await?;
                self.recorded.insert(vs.clone(), v.clone());
                refs.push(VolumeSnapshotRef {
                    pvc: v.pvc.clone(),
                    name: vs,
                    mount_path: v.mount_path.clone(),
                    part: v.part.clone(),
                });
            }
            members.push(backup_member(m, refs));
        }
        self.bound_ready(bound).await?;
        Ok(members)
    }

    /// A VolumeSnapshotContent `vsc` of `v`'s handle and VolumeSnapshot
    /// `vs` naming it (either made before is kept).
    async fn bind(&self, v: &ContentVolume, vs: &str, vsc: &str) -> Result<(), Stop> {
        let (Some(handle), Some(driver)) = (&v.snapshot_handle, &v.driver) else {
            return Err(stop(
                Reason::NotRestorable,
                format!(
                    "the content does not record the storage's handle of VolumeSnapshot {}",
                    v.volume_snapshot
                ),
            ));
        };
        let content = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": vsc, "labels": {RESTORE_UID_LABEL: self.uid()}},
            "spec": {
                "deletionPolicy": "Retain",
                "driver": driver,
                "source": {"snapshotHandle": handle},
                "sourceVolumeMode": v.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
                "volumeSnapshotRef": {"name": vs, "namespace": self.ns},
            },
        });
        let contents: Api<DynamicObject> =
            Api::all_with(self.ctx.client.clone(), &volume_snapshot_contents());
        create_kept(&contents, content).await?;
        let snapshot = json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": vs, "labels": self.labels()},
            "spec": {"source": {"volumeSnapshotContentName": vsc}},
        });
        create_kept(&self.snapshots(), snapshot).await
    }

    /// Every VolumeSnapshot this restore bound is ready within `bound`.
    async fn bound_ready(&self, bound: Duration) -> Result<(), Stop> {
        let names: Vec<String> = self.recorded.keys().cloned().collect();
        let snapshots = self.snapshots();
        let left = self
            .wait(bound, || {
                let (snapshots, names) = (snapshots.clone(), names.clone());
                async move {
                    let mut left = Vec::new();
                    for n in &names {
                        let ready = snapshots
                            .get_opt(n)
                            .await?
                            .is_some_and(|s| s.data["status"]["readyToUse"] == json!(true));
                        if !ready {
                            left.push(n.clone());
                        }
                    }
                    Ok((!left.is_empty()).then(|| left.join(", ")))
                }
            })
            .await?;
        match left {
            None => Ok(()),
            Some(left) => Err(stop(
                Reason::SnapshotNotReady,
                format!(
                    "VolumeSnapshots {left}, bound to the content's snapshots by their handles, \
                     are not ready to use after {bound:?} (does this cluster's CSI driver reach \
                     the storage that holds them?)"
                ),
            )),
        }
    }

    /// The restore over: the VolumeSnapshots and VolumeSnapshotContents it
    /// bound go (the data stays, with the content's own). Best effort: what
    /// cannot be deleted is logged.
    pub(super) async fn release_snapshots(&self) {
        if self.recorded.is_empty() {
            return;
        }
        let snapshots = self.snapshots();
        for name in self.recorded.keys() {
            if let Err(e) = snapshots.delete(name, &DeleteParams::background()).await {
                tracing::warn!(restore = %self.name, "deleting VolumeSnapshot {name}: {e}");
            }
        }
        let names: Vec<String> = self.recorded.keys().cloned().collect();
        let gone = self
            .wait(RELEASE_BOUND, || {
                let (snapshots, names) = (snapshots.clone(), names.clone());
                async move {
                    for n in &names {
                        if snapshots.get_opt(n).await?.is_some() {
                            return Ok(Some(n.clone()));
                        }
                    }
                    Ok(None)
                }
            })
            .await;
        if !matches!(gone, Ok(None)) {
            tracing::warn!(restore = %self.name, "its VolumeSnapshots are not gone; their contents stay");
            self.release_anchors().await;
            return;
        }
        let contents: Api<DynamicObject> =
            Api::all_with(self.ctx.client.clone(), &volume_snapshot_contents());
        for n in 1..=self.recorded.len() {
            let name = self.binding(n);
            match contents.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    tracing::warn!(restore = %self.name, "deleting VolumeSnapshotContent {name}: {e}")
                }
            }
        }
        self.release_anchors().await;
    }
}

impl Run {
    /// The name of the VolumeSnapshotContent that binds the content's
    /// `n`th snapshot (from 1) for this restore.
    fn binding(&self, n: usize) -> String {
        format!("{}-{n}", self.uid())
    }
}

/// Creates `object` with `api`; one of its name made before is kept.
pub(super) async fn create_kept(api: &Api<DynamicObject>, object: Value) -> Result<(), Stop> {
    let object: DynamicObject =
        serde_json::from_value(object).map_err(|e| stop(Reason::NotRestorable, e.to_string()))?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The data of kept Secret `name`, as the Secret's `data`.
fn secret_data(kept: &BTreeMap<String, ByteString>, name: &str) -> Result<Value, Stop> {
    let missing = || {
        stop(
            Reason::NotRestorable,
            format!("the content's kept Secret has no data of Secret {name}"),
        )
    };
    let raw = kept
        .get(&format!("{SECRET_KEY}{name}"))
        .ok_or_else(missing)?;
    serde_json::from_slice(&raw.0).map_err(|_| missing())
}

/// The API resource of a kept object's kind.
pub(super) fn resource_of(api_version: &str, kind: &str) -> Option<ApiResource> {
    let plural = match kind {
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "Secret" => "secrets",
        "Service" => "services",
        "StatefulSet" => "statefulsets",
        "Deployment" => "deployments",
        "ConsistencyGroup" => "consistencygroups",
        _ => return None,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some(ApiResource::from_gvk_with_plural(&gvk, plural))
}

/// A content's member as its backup recorded it, with snapshots `refs`.
fn backup_member(m: &ContentMember, refs: Vec<VolumeSnapshotRef>) -> BackupMember {
    BackupMember {
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
        volume_snapshots: refs,
        artefacts: m.artefacts.clone(),
    }
}

/// Whether the policy binding (`policy`, if it exists) was in place when
/// `restore` was created.
fn policy_in_place(policy: Option<&ObjectMeta>, restore: &ObjectMeta) -> bool {
    let since = |m: &ObjectMeta| m.creation_timestamp.clone().map(|t| t.0);
    match (policy.and_then(since), since(restore)) {
        (Some(p), Some(r)) => p <= r,
        _ => false,
    }
}

fn list_or_none(items: &[String]) -> String {
    match items.is_empty() {
        true => "nothing".into(),
        false => items.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(seconds: i64) -> ObjectMeta {
        ObjectMeta {
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn a_cross_namespace_restore_runs_only_under_a_policy_older_than_it() {
        assert!(policy_in_place(Some(&at(10)), &at(20)));
        assert!(policy_in_place(Some(&at(20)), &at(20)));
        assert!(!policy_in_place(Some(&at(21)), &at(20)), "bound after");
        assert!(!policy_in_place(None, &at(20)), "not bound");
        assert!(!policy_in_place(Some(&ObjectMeta::default()), &at(20)));
    }
}
