//! The custom resources, group `stillpoint.dev`, version `v1alpha1`. The
//! YAML in `deploy/crds/` is generated from these types
//! (`stillpoint crds > deploy/crds/stillpoint.dev.yaml`); a test fails when
//! it drifts.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Stillpoint resource.
pub const GROUP: &str = "stillpoint.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";
/// The finalizer a GroupBackup carries while it owns snapshots.
pub const FINALIZER: &str = "stillpoint.dev/snapshots";
/// The label the controller puts on the PVCs (and snapshots) of a backup.
pub const BACKUP_LABEL: &str = "stillpoint.dev/backup";
/// The label on objects a backup of a group made.
pub const GROUP_LABEL: &str = "stillpoint.dev/group";
/// The label on a PVC that says which cut of its backup takes it
/// (`csi-group`: one VolumeGroupSnapshot selects each cut's PVCs).
pub const CUT_LABEL: &str = "stillpoint.dev/cut";

/// A set of database pods backed up together, at one consistent cut.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "ConsistencyGroup",
    namespaced,
    status = "ConsistencyGroupStatus",
    shortname = "cgroup",
    category = "stillpoint",
    printcolumn = r#"{"name":"Protectable","type":"string","jsonPath":".status.conditions[?(@.type==\"Protectable\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Protectable\")].reason"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.resolvedMembers"}"#,
    printcolumn = r#"{"name":"Last Backup","type":"string","jsonPath":".status.lastSuccessfulBackup"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupSpec {
    /// The members: each selects pods (every matching pod is one member
    /// instance, named after its pod). At most 64.
    #[schemars(length(min = 1, max = 64))]
    pub members: Vec<MemberTemplate>,
    /// How the group's volumes are cut.
    pub snapshot: SnapshotSettings,
    /// Bound on the freeze window (first freeze to last thaw), e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_budget: Option<String>,
    /// The lease given to the agents: a frozen member thaws by itself this
    /// long after the controller stops renewing it, e.g. `30s`.
    #[serde(rename = "leaseTTL", default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<String>,
    /// Bound on a replica's wait to reach its primary's position, e.g. `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align_timeout: Option<String>,
    /// Bound on dialling one agent, e.g. `5s` (default 5s, at most 1m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Bound on each request to an agent outside the freeze's own budgets
    /// (describe, position, prepare, the answer to a thaw), e.g. `30s`
    /// (default 30s, at most 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_timeout: Option<String>,
}

/// Which pods a member is, and what of them to protect.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberTemplate {
    /// The member's name (a replica's `primary` names another member). At
    /// most 63 characters.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The pods of this member, by label (`matchLabels`, all must match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PodSelector>,
    /// Or one pod of a StatefulSet, by ordinal (`<statefulSet>-<ordinal>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful_set: Option<StatefulSetOrdinal>,
    /// The role the member's agent must report: `primary`, `replica` or
    /// `standalone`. Unset: whatever it reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<MemberRole>,
    /// For a replica: the member it replicates from. Unset: the member
    /// whose pod address matches the replica's reported upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The pod volumes (by volume name in the pod spec) to snapshot; each
    /// must be a PersistentVolumeClaim. Unset: every PVC-backed volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub volumes: Option<Vec<String>>,
    /// Restore stage (lower first). Unset: by engine class (databases 2,
    /// caches 3, the rest 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_stage: Option<u32>,
    /// The agent freezes the member's mount (needed for InnoDB on a class
    /// whose snapshots are not atomic).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fsfreeze: bool,
    /// Paths the member's server uses that are knowingly not on its
    /// snapshotted volumes; a restore lacks them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub accept_uncovered: Vec<String>,
}

/// Pods by label.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    pub match_labels: BTreeMap<String, String>,
}

/// One pod of a StatefulSet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSetOrdinal {
    pub name: String,
    pub ordinal: u32,
}

/// A member's expected role.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Primary,
    Replica,
    Standalone,
}

/// How the group's volumes are cut.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSettings {
    /// `csi-group`: one VolumeGroupSnapshot over the group's PVCs (per
    /// cut: replicas are cut before their primaries; never assumed to be
    /// one instant); `csi`: one VolumeSnapshot per PVC.
    #[serde(default)]
    pub driver: SnapshotDriver,
    /// The VolumeGroupSnapshotClass (`csi-group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
    /// The VolumeSnapshotClass (`csi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// Whether the class's snapshots are point-in-time (true for most block
    /// storage; false for drivers that copy files, such as hostpath). Not
    /// atomic: PostgreSQL is cut in backup mode and InnoDB only with its
    /// mount frozen, as with the local `copy` snapshotter. Unset: what the
    /// class says in its annotation `stillpoint.dev/atomic` ("true" or
    /// "false"); a class that says neither is never trusted, and the group
    /// is not Protectable (`AtomicityUnknown`) until one of them does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atomic: Option<bool>,
}

/// The annotation by which a snapshot class says whether its snapshots are
/// point-in-time (`"true"`) or copies (`"false"`).
pub const ATOMIC_ANNOTATION: &str = "stillpoint.dev/atomic";

/// The snapshotters of Kubernetes mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SnapshotDriver {
    #[default]
    #[serde(rename = "csi-group")]
    CsiGroup,
    #[serde(rename = "csi")]
    Csi,
}

/// What the controller found for a group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Resolved` (every member found) and `Protectable` (a backup can run
    /// now), each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many member instances (pods) were resolved.
    #[serde(default)]
    pub resolved_members: u32,
    /// The member instances (at most 256: a group of more pods does not
    /// resolve).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<ResolvedMember>,
    /// The newest GroupBackup of the group that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
}

/// One member instance as resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedMember {
    /// The member (spec) it belongs to.
    pub name: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The agent's address and the identity it must present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// For a replica: the pod it replicates from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The server's position when last described.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub pvcs: Vec<String>,
    /// The CSI driver of its PVCs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The StatefulSet or Deployment that runs the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
}

/// The StatefulSet or Deployment that runs a pod (from its owner
/// references).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `StatefulSet` or `Deployment`.
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One backup of a ConsistencyGroup.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "GroupBackup",
    namespaced,
    status = "GroupBackupStatus",
    shortname = "gbackup",
    category = "stillpoint",
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Window","type":"string","jsonPath":".status.freezeWindow"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.error"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a GroupBackup's spec cannot be changed; create another GroupBackup"))]
pub struct GroupBackupSpec {
    /// The ConsistencyGroup (same namespace).
    pub group: String,
    /// What happens to the backup's VolumeSnapshots when it is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// `Delete` (default): deleting the GroupBackup deletes its snapshots;
/// `Retain`: they stay (without their owner).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// A GroupBackup's phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    #[default]
    Pending,
    Running,
    Finalizing,
    Succeeded,
    Failed,
    Aborted,
}

impl BackupPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BackupPhase::Succeeded | BackupPhase::Failed | BackupPhase::Aborted
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackupPhase::Pending => "Pending",
            BackupPhase::Running => "Running",
            BackupPhase::Finalizing => "Finalizing",
            BackupPhase::Succeeded => "Succeeded",
            BackupPhase::Failed => "Failed",
            BackupPhase::Aborted => "Aborted",
        }
    }
}

/// What a backup did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupBackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// `Completed` (with the outcome's reason) and, when the spec was
    /// edited while the backup ran, `SpecIgnored`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The backup id (also the prefix of its VolumeSnapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Which controller replica runs (ran) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<MicroTime>,
    /// First freeze request to last thaw acknowledgement, e.g. `7.4ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window: Option<String>,
    /// The same, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_microseconds: Option<u64>,
    /// The snapshotter: `csi` or `csi-group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
    /// The VolumeGroupSnapshot of the first cut (`csi-group`). A group
    /// with replicas is cut in several, replicas before their primaries:
    /// the later ones are named `<this>.2`, `<this>.3`, ….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<BackupMember>,
    /// The Secret (owned by this backup) with the members' artefacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artefacts_secret: Option<String>,
    /// Its GroupBackupContent (cluster-scoped), once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Each member's phases, µs from `timelineStart`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeline: BTreeMap<String, BTreeMap<String, u64>>,
    /// The instant the timeline counts from (the protocol's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline_start: Option<MicroTime>,
    /// At most 64 (the first ones; condition `Truncated` says how many more
    /// there were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub warnings: Vec<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One member of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupMember {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned_to: Option<String>,
    /// `frozen`, `crash-consistent`, `backup-label` or `frozen-copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    #[serde(default)]
    pub restore_stage: u32,
    /// The StatefulSet or Deployment that ran the pod (a GroupRestore
    /// scales it, or its copy, up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// The server's data directory, as its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_directory: Option<String>,
    /// The VolumeSnapshots of its PVCs, in the order of its volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub volume_snapshots: Vec<VolumeSnapshotRef>,
    /// The names of its artefacts (kept in the backup's Secret, as
    /// `<pod>.<name>`), e.g. PostgreSQL's `backup_label`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub artefacts: Vec<String>,
}

/// A member's VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotRef {
    pub pvc: String,
    pub name: String,
    /// Where the member's server has the PVC mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Set on a later snapshot of the same PVC that holds only this path
    /// (relative to the volume) up to date: PostgreSQL's `pg_wal` up to
    /// the backup stop, on a class whose snapshots are not atomic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

/// On a GroupBackupContent: its snapshot contents are released (deleted,
/// with `deletionPolicy: Delete`) before it goes.
pub const CONTENT_FINALIZER: &str = "stillpoint.dev/snapshot-contents";

/// The label on the GroupBackups a BackupSchedule made (its name).
pub const SCHEDULE_LABEL: &str = "stillpoint.dev/schedule";

/// The label that says which BackupSchedule made a GroupBackup (its uid):
/// retention prunes only backups of its group that carry its own uid, so
/// neither a hand-made backup with a copied `stillpoint.dev/schedule`
/// label nor one made by an earlier schedule of the same name is touched.
pub const SCHEDULE_UID_LABEL: &str = "stillpoint.dev/schedule-uid";

/// The annotation on a GroupBackup a BackupSchedule made: the scheduled
/// time (RFC 3339, UTC) of the run it was taken for, which also names it.
/// The schedule counts its runs from the newest of these as well as from
/// its `status.lastScheduleTime`, so a run whose status write was lost is
/// neither taken again nor counted as missed.
pub const SCHEDULED_TIME_ANNOTATION: &str = "stillpoint.dev/scheduled-time";

/// GroupBackups of a group at cron times, with retention.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "BackupSchedule",
    namespaced,
    status = "BackupScheduleStatus",
    shortname = "gschedule",
    category = "stillpoint",
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Last Success","type":"string","jsonPath":".status.lastSuccessfulBackup"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleSpec {
    /// The ConsistencyGroup (same namespace).
    pub group: String,
    /// A cron expression; a sixth, leading field gives seconds
    /// (`0 */15 * * * *`: every quarter hour).
    pub schedule: String,
    /// The IANA time zone the expression is read in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Take no backups (retention still applies).
    #[serde(default)]
    pub suspend: bool,
    /// Take the first backup at once, not at the first scheduled time.
    #[serde(default)]
    pub immediate: bool,
    /// Keep this many of the schedule's newest backups (of each outcome;
    /// default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Delete the schedule's backups older than this (e.g. `7d`); the
    /// newest successful one is never deleted for its age alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// Runs missed while no controller led: `run-once` (default: one backup
    /// at once) or `skip`.
    #[serde(default)]
    pub missed: crate::core::schedule::Missed,
    /// The `deletionPolicy` of the GroupBackups it creates.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What a schedule did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid` (False with the reason when the spec cannot be read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When it last fired (a backup taken, or a run skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<MicroTime>,
    /// The newest of its GroupBackups that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    /// Its GroupBackups that have not ended (at most 64 listed).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub active: Vec<String>,
}

/// The finalizer a GroupQuiesce carries while it holds its members.
pub const QUIESCE_FINALIZER: &str = "stillpoint.dev/thaw";

/// A manual freeze of a group, or of one member of it, for a while: the
/// controller freezes, holds (renewing the agents' lease) and thaws when
/// the duration ends or the resource is deleted; if the controller dies,
/// the agents thaw by themselves when the lease runs out. Who may quiesce
/// is decided by RBAC on this resource.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "GroupQuiesce",
    namespaced,
    status = "GroupQuiesceStatus",
    shortname = "gquiesce",
    category = "stillpoint",
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"Member","type":"string","jsonPath":".spec.member"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Until","type":"date","jsonPath":".status.until"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.error"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a GroupQuiesce's spec cannot be changed; delete it (which thaws) and create another"))]
pub struct GroupQuiesceSpec {
    /// The ConsistencyGroup (same namespace).
    pub group: String,
    /// Only this member: a member name of the group (every pod it
    /// selects) or one pod's name. Default: the whole group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// How long to hold, e.g. `5m` (at most 24h).
    pub duration: String,
    /// The lease given to the agents, renewed every third of it (default:
    /// the group's leaseTTL): how long members stay frozen after the
    /// controller died.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A GroupQuiesce's phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuiescePhase {
    #[default]
    Pending,
    Frozen,
    Thawed,
    Failed,
}

impl QuiescePhase {
    pub fn is_final(self) -> bool {
        matches!(self, QuiescePhase::Thawed | QuiescePhase::Failed)
    }
}

/// What a quiesce holds, or held.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupQuiesceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<QuiescePhase>,
    /// `Frozen` (True while held; its reason says how it ended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Which controller replica holds (held) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_at: Option<MicroTime>,
    /// When the hold ends by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thawed_at: Option<MicroTime>,
    /// The frozen members and the positions they were frozen at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<QuiescedMember>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One frozen member.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuiescedMember {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

/// The label on the PVCs (and preparation pods) a GroupRestore made (its
/// name).
pub const RESTORE_LABEL: &str = "stillpoint.dev/restore";

/// The label that says which GroupRestore made a PVC or pod (its uid):
/// what a restore takes as its own. The name alone outlives the restore,
/// and a later one of the same name must never take the earlier one's
/// PVCs (or the original data under their names) as restored.
pub const RESTORE_UID_LABEL: &str = "stillpoint.dev/restore-uid";

/// A restore of a GroupBackup, stage by stage, as `stillpoint plan` orders
/// it: PVCs from the backup's VolumeSnapshots, PostgreSQL volumes cut by a
/// class that copies prepared (WAL and `backup_label`) before PostgreSQL
/// starts, and the workloads scaled up one stage after another, each only
/// when every member of the previous one is Ready.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "GroupRestore",
    namespaced,
    status = "GroupRestoreStatus",
    shortname = "grestore",
    category = "stillpoint",
    printcolumn = r#"{"name":"Backup","type":"string","jsonPath":".spec.backup"}"#,
    printcolumn = r#"{"name":"Content","type":"string","jsonPath":".spec.content","priority":1}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Stage","type":"integer","jsonPath":".status.stage"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.error"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a GroupRestore's spec cannot be changed; create another GroupRestore"))]
#[x_kube(validation = Rule::new("has(self.backup) != has(self.content)").message("name exactly one of backup (a GroupBackup of this namespace) and content (a GroupBackupContent)"))]
#[x_kube(validation = Rule::new("!has(self.content) || !(has(self.inPlace) && self.inPlace)").message("a restore of a content makes the application under its original names, in a namespace that has none of them, or with pvcPrefix under new names: inPlace is for a restore of a GroupBackup"))]
pub struct GroupRestoreSpec {
    /// The GroupBackup to restore (same namespace; it must have succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Or the GroupBackupContent to restore, from nothing: the
    /// application's kept objects are created in this namespace (those
    /// that exist are left as they are), its snapshots are bound here
    /// again by their handles, and its members restored under their
    /// original names, or with `pvcPrefix` under new ones. The namespace
    /// may be the original one (re-created) or any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New names (the default mode): a PVC `<name>` is restored as
    /// `<pvcPrefix><name>`, except a StatefulSet's claim `<template>-<sts>-<n>`,
    /// restored as `<template>-<pvcPrefix><sts>-<n>` so that a copy of the
    /// StatefulSet named `<pvcPrefix><sts>` claims it. The workloads scaled
    /// up are those copies (`<pvcPrefix><workload>`): one that does not
    /// exist is made from the workload the backup kept, with its Services
    /// and ConfigMaps, the labels of its pods prefixed and the originals'
    /// host names renamed. Default `restored-` for a backup; a content is
    /// restored under new names only with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc_prefix: Option<String>,
    /// Replace the originals instead: each member's workload is scaled to
    /// zero, its PVCs are deleted and made again, under the same names,
    /// from the snapshots, and it is scaled up again stage by stage. What
    /// the original volumes held is lost (with a `Delete` reclaim policy,
    /// the volumes themselves).
    #[serde(default)]
    pub in_place: bool,
    /// Only make the PVCs (and prepare the PostgreSQL ones that need it);
    /// start no workload. For members no StatefulSet or Deployment ran.
    #[serde(default)]
    pub volumes_only: bool,
    /// How long one stage may take to become Ready (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_timeout: Option<String>,
}

impl GroupRestoreSpec {
    /// What it restores, for messages: `GroupBackup <name>` or
    /// `GroupBackupContent <name>`.
    pub fn source(&self) -> String {
        match (&self.content, &self.backup) {
            (Some(c), _) => format!("GroupBackupContent {c}"),
            (None, b) => format!("GroupBackup {}", b.as_deref().unwrap_or_default()),
        }
    }
}

/// A GroupRestore's phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    #[default]
    Pending,
    Restoring,
    Succeeded,
    Failed,
}

impl RestorePhase {
    pub fn is_final(self) -> bool {
        matches!(self, RestorePhase::Succeeded | RestorePhase::Failed)
    }
}

/// What a restore did, and is doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// `Completed` (with the outcome's reason).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<MicroTime>,
    /// The uid of the GroupBackup being restored: a backup deleted and made
    /// again under its name is not the one this restore began with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_uid: Option<String>,
    /// The stage being started (or that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    /// Each stage, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub stages: Vec<RestoreStage>,
    /// Each member (pod) of the backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<RestoredMember>,
    /// The PVCs made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2048))]
    pub pvcs: Vec<String>,
    /// The uid of each PVC made, by name: a PVC of that name with another
    /// uid is not this restore's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pvc_uids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One restore stage (members of one `restoreStage`; primaries start
/// before their replicas within it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStage {
    pub stage: u32,
    /// What the stage number stands for (`databases`, ...).
    pub class: String,
    /// `Waiting`, `Starting`, `Ready`, `Failed` or `Held` (not started
    /// because an earlier stage failed).
    pub phase: String,
    /// The pods (of the backup) it restores.
    #[schemars(length(max = 256))]
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<MicroTime>,
}

/// One member of a restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredMember {
    /// The backed-up pod.
    pub pod: String,
    /// The pod that runs it again (`<workload>-<n>` of a StatefulSet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    pub stage: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `Pending`, `VolumesCreated`, `Prepared`, `Starting`, `Ready` or
    /// `Failed`.
    pub phase: String,
    /// Its restored PVCs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub pvcs: Vec<String>,
    /// The restored server's position once Ready (through its agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// The check of that position against the backup's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A GroupBackup's record kept outside its namespace: everything a
/// restore needs to bring the backup back, bound to its GroupBackup both
/// ways (`spec.source` here, `status.content` there), as a
/// VolumeSnapshotContent is to its VolumeSnapshot. Cluster-scoped, named
/// `<source namespace>.gbc-<GroupBackup uid>` (its name must begin with
/// its source namespace and a dot: admission of a restore reads where a
/// content came from in its name); written when the backup succeeds (the
/// backup fails if it cannot be).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stillpoint.dev",
    version = "v1alpha1",
    kind = "GroupBackupContent",
    status = "GroupBackupContentStatus",
    shortname = "gbcontent",
    category = "stillpoint",
    validation = Rule::new("self.metadata.name.startsWith(self.spec.source.__namespace__ + '.')").message("a GroupBackupContent's name begins with its source namespace and a dot (<namespace>.<name>)"),
    printcolumn = r#"{"name":"Source Namespace","type":"string","jsonPath":".spec.source.namespace"}"#,
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GroupBackupContentSpec {
    /// The GroupBackup it records.
    pub source: BackupSource,
    /// The ConsistencyGroup that was backed up.
    pub group: String,
    /// The GroupBackup's deletion policy when the content was written.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// `csi` or `csi-group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshotter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<MicroTime>,
    /// First freeze request to last thaw acknowledgement, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_microseconds: Option<u64>,
    /// The volumes' restore sizes together, e.g. `3Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The Secret with the members' artefacts (namespace and name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artefacts_secret: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<ContentMember>,
    /// `csi-group`: the VolumeGroupSnapshotContent of each cut.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub volume_group_snapshot_contents: Vec<String>,
    /// The application's objects, read when the backup succeeded, in the
    /// order a restore creates them: ServiceAccounts, ConfigMaps, Secrets
    /// (without their data), Services, PVCs, the workloads, the
    /// ConsistencyGroup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub objects: Vec<CapturedObject>,
    /// The Secret, in the controller's namespace, that keeps the captured
    /// Secrets' data (key `secret.<name>`) and the members' artefacts (key
    /// `artefact.<pod>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_secret: Option<ObjectRef>,
}

/// One of the application's objects as a backup keeps it: cleaned of what
/// the cluster sets (uid, resourceVersion, status, managedFields, owners,
/// a Service's cluster IPs, a PVC's volume), so that it applies cleanly.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapturedObject {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// The object as a restore applies it (a Secret's without its data).
    #[schemars(schema_with = "preserved_object")]
    pub manifest: serde_json::Value,
}

/// An object whose fields the API server keeps as they are.
fn preserved_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The GroupBackup a content records.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSource {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A namespaced object's namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// One member as its content records it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentMember {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Its position when frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// A replica's: the primary's position it was aligned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned_to: Option<String>,
    /// `frozen`, `crash-consistent`, `backup-label` or `frozen-copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    #[serde(default)]
    pub restore_stage: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_directory: Option<String>,
    /// The names of its artefacts in the artefacts Secret (`<pod>.<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub artefacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub volumes: Vec<ContentVolume>,
}

/// One snapshot of a member's volume, down to the storage's own handle.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentVolume {
    /// The PVC it is a snapshot of.
    pub pvc: String,
    pub volume_snapshot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content: Option<String>,
    /// The CSI driver's handle of the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// `csi-group`: the driver's handle of the group snapshot it is a
    /// member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// The PVC's storage class, access modes and volume mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// Where the member's server had it mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Set on a snapshot that holds only this path up to date (PostgreSQL's
    /// `pg_wal` on a class that copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

/// A content's state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupBackupContentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: every snapshot it names was recorded ready to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Every CRD, as one multi-document YAML (what `deploy/crds/` holds).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    [
        ConsistencyGroup::crd(),
        GroupBackup::crd(),
        GroupQuiesce::crd(),
        BackupSchedule::crd(),
        GroupRestore::crd(),
        GroupBackupContent::crd(),
    ]
    .iter()
    .map(|crd| serde_yaml::to_string(crd).expect("CRDs serialize"))
    .collect::<Vec<_>>()
    .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs are what the types generate
    /// (regenerate: `cargo run -p stillpoint-controller -- crds > deploy/crds/stillpoint.dev.yaml`).
    #[test]
    fn the_checked_in_crds_match_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/crds/stillpoint.dev.yaml"
        );
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == crds_yaml(),
            "{path} is out of date: run `cargo run -p stillpoint-controller -- crds > \
             deploy/crds/stillpoint.dev.yaml`"
        );
    }

    #[test]
    fn a_group_reads_as_the_docs_write_it() {
        let group: ConsistencyGroupSpec = serde_yaml::from_str(
            "members:\n- {name: pg, selector: {matchLabels: {app: pg}}, volumes: [data]}\n\
             snapshot: {driver: csi, volumeSnapshotClassName: fast, atomic: false}\n\
             leaseTTL: 10s\n",
        )
        .unwrap();
        assert_eq!(group.snapshot.driver, SnapshotDriver::Csi);
        assert_eq!(group.snapshot.atomic, Some(false));
        assert_eq!(group.lease_ttl.as_deref(), Some("10s"));
        let defaults: SnapshotSettings = serde_yaml::from_str("{}").unwrap();
        assert_eq!(
            defaults.atomic, None,
            "the class decides unless the group says"
        );
        assert_eq!(defaults.driver, SnapshotDriver::CsiGroup);
    }
}
