//! Snapshotters: one trait, a driver per kind of storage. Each reports the
//! cut (the point is fixed) and readiness separately and can delete what it
//! made. Every snapshot is handed to a [`Made`] recorder the moment it
//! exists, so a cut that is cut short (the freeze budget ran out) still
//! leaves a record of what to delete.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One volume of one member, to be cut.
#[derive(Debug, Clone)]
pub struct VolumeRef {
    pub member: String,
    pub index: usize,
    /// Its path (local mode), or where its member's server has it mounted
    /// (a PVC), or empty.
    pub path: PathBuf,
    /// The PersistentVolumeClaim (Kubernetes mode).
    pub claim: Option<String>,
    /// Which of the backup's cuts takes it (0 first): every replica's
    /// volumes are cut before its primary's (see the protocol's cut).
    pub batch: usize,
}

impl VolumeRef {
    /// The volumes of one member, in its order.
    pub fn of(member: &crate::core::model::MemberSpec) -> Vec<VolumeRef> {
        use crate::core::model::VolumeId;
        member
            .volumes
            .iter()
            .enumerate()
            .map(|(index, v)| VolumeRef {
                member: member.name.clone(),
                index,
                path: v.root().map(Path::to_path_buf).unwrap_or_default(),
                claim: match v {
                    VolumeId::Pvc { claim, .. } => Some(claim.clone()),
                    VolumeId::Path(_) => None,
                },
                batch: 0,
            })
            .collect()
    }
}

/// What a snapshotter made for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHandle {
    /// The backup it belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup: String,
    pub member: String,
    /// Which of the member's volumes (their order in its configuration).
    #[serde(default)]
    pub index: usize,
    pub volume: PathBuf,
    /// The PersistentVolumeClaim it is of (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// Where (or what) the snapshot is: a path for btrfs and copy, the
    /// `{snapshot}` name for exec.
    pub handle: String,
    pub driver: String,
    /// Content checksum, for drivers that can take one (copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Set on a later snapshot of the same volume that holds only this
    /// path (relative to the volume) up to date: a restore takes that path
    /// from it (PostgreSQL's WAL up to the backup stop, on a CSI class
    /// whose snapshots are not atomic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

impl SnapshotHandle {
    /// The handle of `volume`'s snapshot for `backup`, made by `driver`.
    pub fn new(backup: &str, volume: VolumeRef, handle: String, driver: &str) -> Self {
        SnapshotHandle {
            backup: backup.to_string(),
            member: volume.member,
            index: volume.index,
            volume: volume.path,
            claim: volume.claim,
            handle,
            driver: driver.into(),
            checksum: None,
            part: None,
        }
    }
}

/// A failed snapshot step. What was made before it failed is already in
/// the cut's [`Made`].
#[derive(Debug, thiserror::Error)]
#[error("{driver} snapshotter: {message}")]
pub struct SnapshotError {
    pub driver: &'static str,
    pub message: String,
}

impl SnapshotError {
    pub fn new(driver: &'static str, message: impl Into<String>) -> Self {
        SnapshotError {
            driver,
            message: message.into(),
        }
    }
}

/// The snapshots of one backup, recorded the moment each exists.
#[derive(Debug, Clone, Default)]
pub struct Made {
    handles: Arc<Mutex<Vec<SnapshotHandle>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Made {
    pub fn record(&self, handle: SnapshotHandle) {
        self.handles.lock().unwrap().push(handle);
        self.changed.notify_one();
    }

    /// Every snapshot recorded so far.
    pub fn handles(&self) -> Vec<SnapshotHandle> {
        self.handles.lock().unwrap().clone()
    }

    /// Replaces the list (after `ready` filled in checksums; after a delete).
    pub fn set(&self, handles: Vec<SnapshotHandle>) {
        *self.handles.lock().unwrap() = handles;
        self.changed.notify_one();
    }

    /// Resolves after the next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[async_trait]
pub trait Snapshotter: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// Whether each volume's snapshot is one atomic, crash-consistent image
    /// (btrfs, LVM/ZFS). A copy is not.
    fn atomic(&self) -> bool;

    /// What an operator changes so that an InnoDB member can be cut when
    /// this snapshotter's snapshots are not atomic (`{member}`: its name),
    /// in the words of the mode it runs in.
    fn copy_fix(&self) -> &'static str {
        "Freeze the member's mount for the cut (fsfreeze), or use an atomic snapshotter"
    }

    /// How a member accepts a path its volumes do not hold (`{path}`,
    /// `{member}`), in the words of the mode this snapshotter runs in.
    fn accept_gap(&self) -> &'static str {
        "listing {path} among member {member}'s accepted gaps"
    }

    /// Whether the snapshot holds what is still in the page cache (btrfs
    /// writes dirty data into the snapshot; a copy reads through the cache).
    /// Block-level snapshots (LVM, cloud disks, CSI) do not: before them the
    /// agents `syncfs` the members' volumes.
    fn sees_page_cache(&self) -> bool {
        false
    }

    /// Runs before the freeze, while writes still flow: whatever makes
    /// the cut itself shorter (btrfs commits the filesystem's dirty data,
    /// so the snapshot has little left to write while members are frozen).
    /// Every volume of the backup is given, each with the cut (`batch`)
    /// that will take it.
    async fn prepare(&self, _volumes: &[VolumeRef]) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// Cuts every volume of one batch (in parallel where it can, in any
    /// order), recording each snapshot in `made` as soon as it exists (or
    /// in `ready`, if only the storage's controller makes it, after the
    /// cut). Returns when the cut point of every one is fixed. A backup may be
    /// cut in several batches, one after another.
    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError>;

    /// Whether the snapshots of a cut's volumes become known only after
    /// the cut returned (in [`Snapshotter::ready`]): then
    /// [`Snapshotter::refresh`] may be given a handle made of the volume
    /// alone, its `handle` empty.
    fn handles_after_cut(&self) -> bool {
        false
    }

    /// Refreshes one relative path of a cut from the live volume (PostgreSQL
    /// backup mode: the WAL written up to the backup stop). Only copies do.
    /// A snapshotter that cannot refresh in place records a second
    /// snapshot (its `part` set) in `made`.
    async fn refresh(
        &self,
        _handle: &SnapshotHandle,
        _relative: &str,
        _made: &Made,
    ) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// Waits until the snapshots are usable and records checksums; adds
    /// those a cut made that become known only after it (a group
    /// snapshot's per-volume snapshots, made by the storage's controller
    /// once the cut point is fixed).
    async fn ready(&self, handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError>;

    /// Deletes snapshots (abort, `backup delete`, retention).
    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError>;

    /// Deletes whatever a backup left, including snapshots whose cut was cut
    /// short (abort). Idempotent.
    async fn delete_backup(&self, _backup_id: &str) -> Result<(), SnapshotError> {
        Ok(())
    }
}

/// A cut that makes nothing, at once: what the benchmarks use to measure
/// the freeze window without any storage in it.
#[derive(Debug)]
pub struct NoCut;

#[async_trait]
impl Snapshotter for NoCut {
    fn name(&self) -> &'static str {
        "none"
    }

    fn atomic(&self) -> bool {
        true
    }

    /// Nothing is cut, so nothing needs syncing for it.
    fn sees_page_cache(&self) -> bool {
        true
    }

    async fn cut(&self, _: &str, _: &[VolumeRef], _: &Made) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn ready(&self, _: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn delete(&self, _: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        Ok(())
    }
}
