//! A GroupBackup's status as the backup's store: the protocol's record,
//! applied (server-side apply, one field manager) as members resolve,
//! snapshots appear and the backup ends. Artefacts (PostgreSQL's
//! `backup_label`, `tablespace_map`) go into a Secret the backup owns.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;

use crate::core::model::{Engine, Role};
use crate::core::record::{Consistency, Manifest, MemberRecord, Outcome, ServerPath};
use crate::core::snapshot::SnapshotHandle;
use crate::core::store::{BackupStore, StoreError};
use crate::core::timeline::Timeline;
use crate::kube::content::{self, Keep};
use crate::kube::crd::{
    BACKUP_LABEL, BackupMember, BackupPhase, GROUP_LABEL, GroupBackup, GroupBackupStatus,
    VolumeSnapshotRef, WorkloadRef,
};
use crate::kube::reason::Reason;

/// What agents call the server's data directory among the paths they report.
const DATA_DIRECTORY: &str = "data_directory";

/// The field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "stillpoint-controller";

/// Formats a duration in µs the way `kubectl get` shows it (`7.4ms`).
pub fn format_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Sets (or replaces) a condition, keeping its transition time when the
/// status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let old = conditions.iter().position(|c| c.type_ == type_);
    let transition = match old.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now,
    };
    let condition = Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.as_str().into(),
        message: message.chars().take(32_000).collect(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match old {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// Why a backup's artefacts Secret was not created.
#[derive(Debug, thiserror::Error)]
pub enum ArtefactsSecretError {
    /// A Secret of its name exists and is not this backup's.
    #[error(
        "Secret {0} exists and was not made by this backup, which keeps its artefacts \
         under that name; delete or rename that Secret, or give the backup another name"
    )]
    Exists(String),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// Each pod's member (of the group's spec) and the workload that runs it.
pub type MemberOf = BTreeMap<String, (String, Option<WorkloadRef>)>;

/// A writer's status and what it last saw of the object on the server.
#[derive(Debug)]
struct Written {
    /// The status it writes (whole).
    status: GroupBackupStatus,
    fence: Fence<GroupBackupStatus>,
}

/// How often a status write refused for a change of the object that left
/// its status alone (labels, annotations, the spec) is tried again.
const CONFLICT_RETRIES: usize = 5;

/// What a status writer last saw of its object on the server, and the
/// write made over it: each apply of the whole status has the object's
/// `resourceVersion` as it was after the writer's last write (or when the
/// writer was made) as its precondition. Refused because the object
/// changed, it is tried again if the status is still the one last seen
/// (the labels, annotations or spec changed), and otherwise not at all:
/// another controller replica (a new leader), or an earlier reconcile seen
/// through a stale cache, wrote the status since. So a write that a
/// partition delayed past a new leader's is refused, not applied over it.
///
/// kube-rs has no fenced apply of its own: `Api::replace_status` fences on
/// the version but replaces the whole status, other field managers' fields
/// too, and refuses a change of the labels alike. The precondition here is
/// the API server's own (`metadata.resourceVersion` in the applied object).
#[derive(Debug, Clone)]
pub struct Fence<S> {
    /// The object's `resourceVersion` after the last write (or when seen).
    version: String,
    /// The object's status at `version`.
    seen: Option<S>,
}

impl<S> Fence<S>
where
    S: Clone + PartialEq + serde::Serialize,
{
    /// The fence of an object as seen at `version` with status `seen`.
    pub fn new(version: Option<String>, seen: Option<S>) -> Self {
        Fence {
            version: version.unwrap_or_default(),
            seen,
        }
    }

    /// Applies `status` (whole) to object `name` of `kind` over the status
    /// last seen; `status_of` reads an object's status. A 409 Conflict,
    /// with a message saying so, when another wrote the status since.
    pub async fn apply<K>(
        &mut self,
        api: &Api<K>,
        name: &str,
        kind: &str,
        status: &S,
        status_of: fn(K) -> Option<S>,
    ) -> Result<(), kube::Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let mut retries = CONFLICT_RETRIES;
        loop {
            match apply_status_if(api, name, kind, Some(&self.version), status).await {
                Ok(applied) => {
                    self.version = applied.resource_version().unwrap_or_default();
                    self.seen = status_of(applied);
                    return Ok(());
                }
                Err(kube::Error::Api(refused)) if refused.code == 409 && retries > 0 => {
                    retries -= 1;
                    let now = api.get(name).await?;
                    let version = now.resource_version().unwrap_or_default();
                    if status_of(now) != self.seen {
                        return Err(superseded(kind, name, refused));
                    }
                    self.version = version;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The API server's refusal, saying why the write is not tried again.
fn superseded(kind: &str, name: &str, mut refused: Box<kube::core::Status>) -> kube::Error {
    let what = match kind {
        "GroupBackup" => "the backup",
        "GroupRestore" => "the restore",
        _ => "it",
    };
    refused.message = format!(
        "{kind} {name}: its status was written by another since this controller \
         replica last saw it (another replica leads, or {what} ended); this \
         replica's write is dropped: {}",
        refused.message
    );
    kube::Error::Api(refused)
}

/// Writes one GroupBackup's status: always all of it, as one field manager,
/// and only over the status it last saw (a [`Fence`]).
#[derive(Debug, Clone)]
pub struct StatusWriter {
    api: Api<GroupBackup>,
    secrets: Api<Secret>,
    backup: GroupBackup,
    status: Arc<Mutex<Written>>,
    /// Which member (of the group's spec) each pod is, and its workload.
    member_of: Arc<std::sync::Mutex<MemberOf>>,
    /// The controller's namespace, where a content keeps its Secret.
    keep_in: String,
}

impl StatusWriter {
    pub fn new(client: kube::Client, backup: &GroupBackup) -> Self {
        let ns = backup.metadata.namespace.clone().unwrap_or_default();
        StatusWriter {
            api: Api::namespaced(client.clone(), &ns),
            secrets: Api::namespaced(client, &ns),
            backup: backup.clone(),
            status: Arc::new(Mutex::new(Written {
                status: backup.status.clone().unwrap_or_default(),
                fence: Fence::new(backup.resource_version(), backup.status.clone()),
            })),
            member_of: Arc::default(),
            keep_in: String::new(),
        }
    }

    /// A writer whose backup's content keeps its Secret in namespace `ns`
    /// (the controller's).
    pub fn keeping_in(mut self, ns: &str) -> Self {
        self.keep_in = ns.to_string();
        self
    }

    /// Records which member each pod is and what runs it (shown with the
    /// pod's record).
    pub fn set_members(&self, member_of: MemberOf) {
        *self.member_of.lock().unwrap() = member_of;
    }

    fn name(&self) -> String {
        self.backup.metadata.name.clone().unwrap_or_default()
    }

    /// The status as last written.
    pub async fn current(&self) -> GroupBackupStatus {
        self.status.lock().await.status.clone()
    }

    /// Changes the status and applies it over the status last seen (see
    /// [`StatusWriter`]); a 409 Conflict when another wrote it since.
    pub async fn update(
        &self,
        change: impl FnOnce(&mut GroupBackupStatus),
    ) -> Result<(), kube::Error> {
        let mut written = self.status.lock().await;
        let w = &mut *written;
        change(&mut w.status);
        w.status.observed_generation = self.backup.metadata.generation;
        let generation = w.status.observed_generation;
        fit(&mut w.status, generation);
        let name = self.name();
        w.fence
            .apply(&self.api, &name, "GroupBackup", &w.status, |b| b.status)
            .await
    }

    /// The owner reference of what the backup owns.
    fn owner(&self) -> Option<OwnerReference> {
        self.backup.controller_owner_ref(&())
    }

    /// The name of the Secret that keeps the backup's artefacts.
    pub fn artefacts_secret(&self) -> String {
        format!("{}-artefacts", self.name())
    }

    /// Creates the (empty) Secret that will keep the backup's artefacts,
    /// before anything freezes, and names it in the status first. A Secret
    /// of that name that exists already is never adopted (it would be
    /// garbage-collected with the backup): `Exists` — unless the
    /// status already named it before this attempt, which means an earlier
    /// reconcile of this backup (a requeue, another leader) created it.
    /// (The controller may create and patch Secrets, not read them.)
    pub async fn create_artefacts_secret(&self) -> Result<(), ArtefactsSecretError> {
        let name = self.artefacts_secret();
        let claimed = self.current().await.artefacts_secret.as_deref() == Some(name.as_str());
        if !claimed {
            self.update(|s| s.artefacts_secret = Some(name.clone()))
                .await?;
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(self.artefact_labels()),
                owner_references: self.owner().map(|o| vec![o]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.secrets.create(&params, &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && claimed => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.update(|s| s.artefacts_secret = None).await?;
                Err(ArtefactsSecretError::Exists(name))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The backup's GroupBackupContent, written from its status and named
    /// in it: a succeeded backup without its record outside the namespace
    /// is not recorded.
    async fn record_content(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let client = self.api.clone().into_client();
        let status = self.current().await;
        let keep = Keep {
            namespace: self.keep_in.clone(),
            artefacts: artefacts_of(manifest),
        };
        let name = match content::record(&client, &self.backup, &status, keep).await {
            Ok(name) => name,
            Err(e) => {
                // Half written, it would record snapshots about to go.
                let _ = content::discard(&client, &self.backup).await;
                return Err(StoreError(format!("writing the GroupBackupContent: {e}")));
            }
        };
        self.update(|s| s.content = Some(name.clone()))
            .await
            .map_err(|e| StoreError(format!("writing GroupBackup {} status: {e}", self.name())))
    }

    fn artefact_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (GROUP_LABEL.to_string(), self.backup.spec.group.clone()),
            (
                BACKUP_LABEL.to_string(),
                self.backup.metadata.uid.clone().unwrap_or_default(),
            ),
        ])
    }

    /// Keeps the members' artefacts in the backup's Secret: created by
    /// the backup, never adopted.
    async fn save_artefacts(&self, manifest: &Manifest) -> Result<Option<String>, StoreError> {
        let data = artefacts_of(manifest);
        if data.is_empty() {
            return Ok(None);
        }
        let name = self.artefacts_secret();
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "labels": self.artefact_labels(),
                "ownerReferences": self.owner().into_iter().collect::<Vec<_>>(),
            },
            "type": "Opaque",
            "data": data,
        });
        // The backup created it before anything froze: it is its own.
        self.secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| StoreError(format!("keeping the artefacts in Secret {name}: {e}")))?;
        Ok(Some(name))
    }
}

/// The members' artefacts, by `<pod>.<name>`.
fn artefacts_of(manifest: &Manifest) -> BTreeMap<String, ByteString> {
    manifest
        .members
        .iter()
        .flat_map(|m| {
            m.artefacts.iter().map(move |(k, v)| {
                (
                    format!("{}.{k}", m.name),
                    ByteString(v.clone().into_bytes()),
                )
            })
        })
        .collect()
}

/// The status fields a manifest fills in.
pub fn apply_manifest(status: &mut GroupBackupStatus, manifest: &Manifest) {
    status.backup_id = Some(manifest.id.clone());
    status.snapshotter = Some(manifest.snapshotter.clone());
    status.freeze_window = manifest.freeze_window_us.map(format_us);
    status.freeze_window_microseconds = manifest.freeze_window_us;
    status.warnings = manifest.warnings.clone();
    status.error = manifest.error.clone();
    status.timeline = manifest.timeline.members.clone();
    status.timeline_start = manifest
        .timeline
        .origin_unix_us
        .and_then(|us| k8s_openapi::jiff::Timestamp::from_microsecond(us as i64).ok())
        .map(MicroTime);
    status.members = manifest
        .members
        .iter()
        .map(|m| BackupMember {
            pod: m.name.clone(),
            member: None,
            engine: Some(m.engine.to_string()),
            role: Some(m.role.to_string()),
            primary: m.primary.clone(),
            position: m.position.clone(),
            aligned_to: m.aligned_to.clone(),
            consistency: m.consistency.map(|c: Consistency| c.as_str().to_string()),
            restore_stage: m.restore_stage,
            workload: None,
            data_directory: m
                .paths
                .iter()
                .find(|p| p.what == DATA_DIRECTORY || p.what == "datadir")
                .map(|p| p.path.display().to_string()),
            volume_snapshots: m
                .snapshots
                .iter()
                .map(|h| VolumeSnapshotRef {
                    pvc: h.claim.clone().unwrap_or_default(),
                    name: h.handle.clone(),
                    mount_path: Some(h.volume.display().to_string()).filter(|p| !p.is_empty()),
                    part: h.part.clone(),
                })
                .collect(),
            artefacts: m.artefacts.keys().cloned().collect(),
        })
        .collect();
    let thawed = !manifest.members.is_empty()
        && manifest.members.iter().all(|m| {
            manifest
                .timeline
                .members
                .get(&m.name)
                .is_some_and(|p| p.contains_key("thawed"))
        });
    status.phase = Some(match manifest.outcome {
        Outcome::Running if thawed => BackupPhase::Finalizing,
        Outcome::Running => BackupPhase::Running,
        Outcome::Succeeded => BackupPhase::Succeeded,
        Outcome::Failed => BackupPhase::Failed,
        Outcome::Aborted => BackupPhase::Aborted,
    });
}

#[async_trait]
impl BackupStore for StatusWriter {
    async fn save(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let secret = self.save_artefacts(manifest).await?;
        let member_of = self.member_of.lock().unwrap().clone();
        self.update(|s| {
            apply_manifest(s, manifest);
            for m in &mut s.members {
                if let Some((member, workload)) = member_of.get(&m.pod) {
                    m.member = Some(member.clone());
                    m.workload = workload.clone();
                }
            }
            if secret.is_some() {
                s.artefacts_secret = secret;
            }
            // The final phase is the reconciler's to set, with its condition.
            if matches!(
                s.phase,
                Some(BackupPhase::Succeeded | BackupPhase::Failed | BackupPhase::Aborted)
            ) {
                s.phase = Some(BackupPhase::Finalizing);
            }
        })
        .await
        .map_err(|e| StoreError(format!("writing GroupBackup {} status: {e}", self.name())))?;
        if manifest.outcome == Outcome::Succeeded {
            self.record_content(manifest).await?;
        }
        Ok(())
    }
}

/// Applies a whole status of a Stillpoint resource `kind` (server-side
/// apply with the controller's one field manager).
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    status: &impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    apply_status_if(api, name, kind, None, status).await?;
    Ok(())
}

/// [`apply_status`] only if the object is still at `resource_version`
/// (the apply's precondition; a 409 Conflict otherwise): a write that a
/// partition delayed past another replica's writes is refused, not applied
/// over them.
pub async fn apply_status_at<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    resource_version: &str,
    status: &impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    apply_status_if(api, name, kind, Some(resource_version), status).await?;
    Ok(())
}

async fn apply_status_if<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    resource_version: Option<&str>,
    status: &impl serde::Serialize,
) -> Result<K, kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut patch = json!({
        "apiVersion": "stillpoint.dev/v1alpha1",
        "kind": kind,
        "status": status,
    });
    if let Some(version) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// A name as the enum it names (`postgres`, `replica`, `backup-label`).
fn parse<T: serde::de::DeserializeOwned>(text: &Option<String>) -> Option<T> {
    text.as_ref()
        .and_then(|t| serde_json::from_value(serde_json::json!(t)).ok())
}

/// A GroupBackup as a manifest (what the tables and plans of local mode take).
pub fn manifest_of(b: &GroupBackup) -> Manifest {
    let s = b.status.clone().unwrap_or_default();
    let snapshotter = s.snapshotter.clone().unwrap_or_default();
    Manifest {
        id: b.name_any(),
        group: b.spec.group.clone(),
        schedule: b.labels().get(crate::kube::crd::SCHEDULE_LABEL).cloned(),
        created_at: b
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        outcome: match s.phase.unwrap_or_default() {
            BackupPhase::Succeeded => Outcome::Succeeded,
            BackupPhase::Failed => Outcome::Failed,
            BackupPhase::Aborted => Outcome::Aborted,
            _ => Outcome::Running,
        },
        error: s.error.clone(),
        snapshotter: snapshotter.clone(),
        freeze_window_us: s.freeze_window_microseconds,
        cut_us: None,
        members: s
            .members
            .iter()
            .map(|m| MemberRecord {
                name: m.pod.clone(),
                engine: parse(&m.engine).unwrap_or(Engine::Unknown),
                server_version: String::new(),
                role: parse(&m.role).unwrap_or(Role::Unknown),
                primary: m.primary.clone(),
                position: m.position.clone(),
                aligned_to: m.aligned_to.clone(),
                consistency: parse::<Consistency>(&m.consistency),
                restore_stage: m.restore_stage,
                freeze_us: None,
                thaw_us: None,
                restore_stage_explicit: false,
                flush: None,
                flush_us: None,
                paths: m
                    .data_directory
                    .iter()
                    .map(|d| ServerPath {
                        what: DATA_DIRECTORY.into(),
                        path: d.into(),
                    })
                    .collect(),
                snapshots: m
                    .volume_snapshots
                    .iter()
                    .enumerate()
                    .map(|(index, v)| SnapshotHandle {
                        backup: b.name_any(),
                        member: m.pod.clone(),
                        index,
                        volume: v.mount_path.clone().unwrap_or_default().into(),
                        claim: Some(v.pvc.clone()),
                        handle: v.name.clone(),
                        driver: snapshotter.clone(),
                        checksum: None,
                        part: v.part.clone(),
                    })
                    .collect(),
                artefacts: m
                    .artefacts
                    .iter()
                    .map(|a| (a.clone(), String::new()))
                    .collect(),
            })
            .collect(),
        timeline: Timeline {
            members: s.timeline.clone(),
            window: None,
            origin_unix_us: s
                .timeline_start
                .as_ref()
                .map(|t| t.0.as_microsecond() as u64),
        },
        warnings: s.warnings.clone(),
    }
}

/// The most bytes a status is written with. The API server keeps objects
/// of up to 1.5 MiB (etcd's default request limit), spec and metadata
/// included: a status over it is refused, and refused again on every
/// retry.
pub const STATUS_BUDGET: usize = 1024 * 1024;

/// A status whose lists that only inform (never what a restore or a
/// resumed run reads) may be shortened so that it fits.
pub trait Bounded: serde::Serialize {
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
    /// Keeps each informative list within its CRD `maxItems` halved
    /// `level` times; returns how many entries it left out.
    fn shorten(&mut self, level: u32) -> usize;
}

/// Fits `status` to its CRD's `maxItems` and under [`STATUS_BUDGET`],
/// shortening its informative lists as far as needed, and says so in
/// condition `Truncated` (removed once nothing is left out).
pub fn fit<S: Bounded>(status: &mut S, generation: Option<i64>) {
    let size = |s: &S| serde_json::to_vec(s).map(|v| v.len()).unwrap_or(0);
    let mut level = 0;
    let mut left_out = status.shorten(level);
    while size(status) > STATUS_BUDGET && level < 16 {
        level += 1;
        left_out += status.shorten(level);
    }
    let conditions = status.conditions_mut();
    if left_out == 0 {
        conditions.retain(|c| c.type_ != "Truncated");
        return;
    }
    let message = format!(
        "{left_out} list entries are left out of this status to keep it within its bounds \
         (the CRD's maxItems, {} KiB in all)",
        STATUS_BUDGET / 1024
    );
    set_condition(
        conditions,
        "Truncated",
        true,
        Reason::StatusTooLarge,
        &message,
        generation,
    );
}

/// Truncates `list` to `max` halved `level` times; how many it removed.
fn keep<T>(list: &mut Vec<T>, max: usize, level: u32) -> usize {
    let bound = max.checked_shr(level).unwrap_or(0);
    let removed = list.len().saturating_sub(bound);
    list.truncate(bound);
    removed
}

impl Bounded for crate::kube::crd::ConsistencyGroupStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn shorten(&mut self, level: u32) -> usize {
        // `resolvedMembers` keeps the whole count.
        keep(&mut self.members, 256, level)
    }
}

impl Bounded for GroupBackupStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn shorten(&mut self, level: u32) -> usize {
        let mut left_out = keep(&mut self.warnings, 64, level);
        if level >= 2 && !self.timeline.is_empty() {
            left_out += self.timeline.len();
            self.timeline.clear();
        }
        left_out
    }
}

impl Bounded for crate::kube::crd::BackupScheduleStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
    fn shorten(&mut self, level: u32) -> usize {
        keep(&mut self.active, 64, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_read_as_kubectl_shows_them() {
        assert_eq!(format_us(740), "740µs");
        assert_eq!(format_us(7_400), "7.4ms");
        assert_eq!(format_us(2_500_000), "2.50s");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut c = Vec::new();
        set_condition(&mut c, "Protectable", false, Reason::NoAgent, "a", Some(1));
        let first = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(
            &mut c,
            "Protectable",
            false,
            Reason::PVCUnbound,
            "b",
            Some(2),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, first);
        assert_eq!(c[0].reason, "PVCUnbound");
        assert_eq!(c[0].observed_generation, Some(2));
        set_condition(&mut c, "Protectable", true, Reason::Ready, "c", Some(2));
        assert_ne!(c[0].last_transition_time, first);
    }

    #[test]
    fn a_status_over_its_bounds_is_shortened_with_a_note_and_the_note_goes_when_it_fits() {
        use crate::kube::crd::{ConsistencyGroupStatus, ResolvedMember};
        let member = |i: usize| ResolvedMember {
            name: "db".into(),
            pod: format!("db-{i}"),
            // Long enough that 256 of them exceed the byte budget.
            position: Some("0/".to_string() + &"F".repeat(8_000)),
            ..Default::default()
        };
        let mut status = ConsistencyGroupStatus {
            resolved_members: 300,
            members: (0..300).map(member).collect(),
            ..Default::default()
        };
        fit(&mut status, Some(3));
        assert!(serde_json::to_vec(&status).unwrap().len() <= STATUS_BUDGET);
        assert!(status.members.len() < 256, "{}", status.members.len());
        assert_eq!(status.members[0].pod, "db-0", "the first entries are kept");
        assert_eq!(status.resolved_members, 300);
        let note = status.conditions.iter().find(|c| c.type_ == "Truncated");
        let note = note.expect("a Truncated condition");
        assert_eq!(
            (note.status.as_str(), note.reason.as_str()),
            ("True", "StatusTooLarge")
        );
        assert!(
            note.message
                .contains(&(300 - status.members.len()).to_string())
        );
        assert_eq!(note.observed_generation, Some(3));

        status.members.truncate(2);
        fit(&mut status, Some(4));
        assert_eq!(status.members.len(), 2);
        assert!(status.conditions.iter().all(|c| c.type_ != "Truncated"));
    }

    #[test]
    fn a_backups_record_is_never_shortened_only_its_warnings_and_timeline() {
        let mut status = GroupBackupStatus {
            members: (0..256)
                .map(|i| BackupMember {
                    pod: format!("db-{i}"),
                    ..Default::default()
                })
                .collect(),
            warnings: (0..100).map(|i| format!("warning {i}")).collect(),
            ..Default::default()
        };
        fit(&mut status, None);
        assert_eq!(status.members.len(), 256);
        assert_eq!(status.warnings.len(), 64);
        assert_eq!(status.warnings[63], "warning 63");
        assert!(status.conditions.iter().any(|c| c.type_ == "Truncated"));
    }
}
