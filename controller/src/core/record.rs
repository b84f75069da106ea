//! What a backup records: its manifest (members, positions, snapshots,
//! artefacts, the timeline, the outcome), whichever store keeps it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::core::model::{Engine, Role};
use crate::core::snapshot::SnapshotHandle;
use crate::core::timeline::Timeline;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Written before the first freeze; a crash leaves this, never "succeeded".
    Running,
    Succeeded,
    Failed,
    /// Stopped on purpose (the controller was shutting down): every member
    /// was thawed and whatever was cut deleted.
    Aborted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

/// How a member's snapshot was made consistent, which restore follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Writes were frozen during an atomic snapshot: restores as is.
    Frozen,
    /// An atomic snapshot of a member whose writes kept flowing (PostgreSQL
    /// backup mode): a crash-consistent image; restore by crash recovery,
    /// with no backup_label.
    CrashConsistent,
    /// A non-atomic copy in PostgreSQL backup mode: restore needs the
    /// backup_label (and tablespace_map) and the WAL up to the stop LSN.
    BackupLabel,
    /// A copy taken while writes were frozen (Redis, MongoDB, fsfrozen mounts).
    FrozenCopy,
}

impl Consistency {
    /// The name manifests and tables use (`backup-label`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Frozen => "frozen",
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::BackupLabel => "backup-label",
            Consistency::FrozenCopy => "frozen-copy",
        }
    }

    /// The name of an optional method, `-` when there is none.
    pub fn name_or_dash(method: Option<Consistency>) -> &'static str {
        method.map_or("-", Consistency::as_str)
    }
}

/// A path a member's server needs for crash recovery, as its agent
/// reported it (`data_directory`, `pg_wal`, `log_bin_basename`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPath {
    pub what: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    pub engine: Engine,
    pub server_version: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// The position captured at the freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// For a replica: the primary position it was aligned to before its freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    pub restore_stage: u32,
    /// Time the member's engine took to freeze and to thaw, as its agent
    /// measured it (µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw_us: Option<u64>,
    /// Whether `restore_stage` was set on the member (otherwise it is the
    /// engine class's default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restore_stage_explicit: bool,
    /// What the flush did on this member (its engine's flush and the
    /// filesystems synced) and how long it took (µs, on the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_us: Option<u64>,
    /// Where the server keeps what crash recovery needs; a restore rewrites
    /// whatever in the volumes points at these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<ServerPath>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotHandle>,
    #[serde(default)]
    pub artefacts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub group: String,
    /// The schedule that started it (absent for a backup taken by hand);
    /// retention only ever deletes its own schedule's backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub snapshotter: String,
    /// First freeze request to last thaw acknowledgement, in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_us: Option<u64>,
    /// How long the cut took (µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_us: Option<u64>,
    pub members: Vec<MemberRecord>,
    pub timeline: Timeline,
    /// What the operator should know about this backup: paths knowingly
    /// left off the volumes (`accept_uncovered`), agents' setup warnings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_names_are_the_manifest_names() {
        for c in [
            Consistency::Frozen,
            Consistency::CrashConsistent,
            Consistency::BackupLabel,
            Consistency::FrozenCopy,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert_eq!(Consistency::name_or_dash(None), "-");
    }
}
