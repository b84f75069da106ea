//! The catalog: one JSON manifest per backup in a directory, written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash
//! mid-write never leaves a manifest that reads as complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::snapshot::SnapshotHandle;
use crate::timeline::Timeline;

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
    pub engine: String,
    pub server_version: String,
    pub role: String,
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

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path} is not readable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no backup '{id}' in the catalog {dir}")]
    NotFound { id: String, dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Catalog {
    dir: PathBuf,
}

impl Catalog {
    /// Opens (creating) the catalog directory and checks it is writable.
    pub fn open(dir: &Path) -> Result<Self, CatalogError> {
        let io = |source| CatalogError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"").map_err(io)?;
        let _ = std::fs::remove_file(probe);
        Ok(Catalog {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a manifest atomically.
    pub fn write(&self, manifest: &Manifest) -> Result<(), CatalogError> {
        let io = |source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        };
        let target = self.path(&manifest.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", manifest.id));
        let json = serde_json::to_vec_pretty(manifest).expect("manifests serialize");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &target).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Manifest, CatalogError> {
        let path = self.path(id);
        let text = std::fs::read(&path).map_err(|_| CatalogError::NotFound {
            id: id.to_string(),
            dir: self.dir.clone(),
        })?;
        serde_json::from_slice(&text).map_err(|e| CatalogError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Every manifest, oldest first. Unreadable files are reported, not hidden.
    pub fn list(&self) -> Result<Vec<Manifest>, CatalogError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            {
                out.push(self.get(id)?);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn remove(&self, id: &str) -> Result<(), CatalogError> {
        std::fs::remove_file(self.path(id)).map_err(|source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        })
    }
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
