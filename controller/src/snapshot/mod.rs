//! Snapshotters: one trait, a driver per kind of storage. Each reports the
//! cut (the point is fixed) and readiness separately and can delete what it
//! made.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{Driver, Group};

pub mod btrfs;
pub mod copy;
pub mod exec;

/// One volume of one member, to be cut.
#[derive(Debug, Clone)]
pub struct VolumeRef {
    pub member: String,
    pub index: usize,
    pub path: PathBuf,
}

/// The volumes of `members`, as the snapshotters take them.
pub fn volumes_of<'a>(
    members: impl IntoIterator<Item = &'a crate::config::MemberFile>,
) -> Vec<VolumeRef> {
    members
        .into_iter()
        .flat_map(|m| {
            m.volumes.iter().enumerate().map(|(index, path)| VolumeRef {
                member: m.name.clone(),
                index,
                path: path.clone(),
            })
        })
        .collect()
}

/// What a snapshotter made for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHandle {
    pub member: String,
    pub volume: PathBuf,
    /// Where (or what) the snapshot is: a path for btrfs and copy, the
    /// `{snapshot}` name for exec.
    pub handle: String,
    pub driver: String,
    /// Content checksum, for drivers that can take one (copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

impl SnapshotHandle {
    /// The handle of `volume`'s snapshot, made by `driver`.
    pub fn new(volume: VolumeRef, handle: String, driver: &str) -> Self {
        SnapshotHandle {
            member: volume.member,
            volume: volume.path,
            handle,
            driver: driver.into(),
            checksum: None,
        }
    }
}

/// A failed snapshot step, with whatever was made before it failed (so an
/// abort can delete it).
#[derive(Debug, thiserror::Error)]
#[error("{driver} snapshotter: {message}")]
pub struct SnapshotError {
    pub driver: &'static str,
    pub message: String,
    pub made: Vec<SnapshotHandle>,
}

#[async_trait]
pub trait Snapshotter: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// Whether each volume's snapshot is one atomic, crash-consistent image
    /// (btrfs, LVM/ZFS). A copy is not.
    fn atomic(&self) -> bool;

    /// Runs before the freeze, while writes still flow: whatever makes
    /// the cut itself shorter (btrfs commits the filesystem's dirty data,
    /// so the snapshot has little left to write while members are frozen).
    async fn prepare(&self, _volumes: &[VolumeRef]) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// Cuts every volume (in parallel where it can). Returns when the cut
    /// point is fixed.
    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
    ) -> Result<Vec<SnapshotHandle>, SnapshotError>;

    /// Refreshes one relative path of a cut from the live volume (PostgreSQL
    /// backup mode: the WAL written up to the backup stop). Only copies do.
    async fn refresh(
        &self,
        _handle: &SnapshotHandle,
        _relative: &str,
    ) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// Waits until the snapshots are usable and records checksums.
    async fn ready(&self, handles: &mut [SnapshotHandle]) -> Result<(), SnapshotError>;

    /// Deletes snapshots (abort, `backup delete`, retention).
    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError>;

    /// Deletes whatever a backup left, including snapshots whose cut was cut
    /// short (abort). Idempotent.
    async fn delete_backup(&self, _backup_id: &str) -> Result<(), SnapshotError> {
        Ok(())
    }
}

/// The snapshotter a group is configured with.
pub fn for_group(group: &Group) -> Box<dyn Snapshotter> {
    match group.driver {
        Driver::Btrfs => Box::new(btrfs::Btrfs::new(group.snapshot_dir.clone())),
        Driver::Copy => Box::new(copy::Copy::new(group.snapshot_dir.clone())),
        Driver::Exec => Box::new(exec::Exec::new(group.exec.clone().expect("validated"))),
        Driver::None => Box::new(NoCut),
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

    async fn cut(&self, _: &str, _: &[VolumeRef]) -> Result<Vec<SnapshotHandle>, SnapshotError> {
        Ok(Vec::new())
    }

    async fn ready(&self, _: &mut [SnapshotHandle]) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn delete(&self, _: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        Ok(())
    }
}

/// The snapshotter that made a handle (for deleting from the catalog).
pub fn for_handle(handle: &SnapshotHandle, group: Option<&Group>) -> Option<Box<dyn Snapshotter>> {
    match handle.driver.as_str() {
        "btrfs" => Some(Box::new(btrfs::Btrfs::new(PathBuf::new()))),
        "copy" => Some(Box::new(copy::Copy::new(PathBuf::new()))),
        "exec" => group
            .and_then(|g| g.exec.clone())
            .map(|t| Box::new(exec::Exec::new(t)) as Box<dyn Snapshotter>),
        _ => None,
    }
}

/// The directory name of one volume's snapshot.
pub fn volume_name(v: &VolumeRef) -> String {
    format!("{}-{}", v.member, v.index)
}

/// Creates `<dir>/<backup_id>`, where one backup's snapshots go.
pub(crate) async fn backup_dir(
    driver: &'static str,
    dir: &std::path::Path,
    backup_id: &str,
) -> Result<PathBuf, SnapshotError> {
    let dest = dir.join(backup_id);
    tokio::fs::create_dir_all(&dest)
        .await
        .map_err(|e| SnapshotError {
            driver,
            message: format!("cannot create {}: {e}", dest.display()),
            made: vec![],
        })?;
    Ok(dest)
}

/// Runs a command; a failure carries its stderr.
pub(crate) async fn run(
    driver: &'static str,
    cmd: &mut tokio::process::Command,
) -> Result<(), String> {
    // An aborted backup drops this future: the command must not outlive it.
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.as_std().get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{driver}: {:?} failed ({}): {}",
            cmd.as_std().get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs one job per volume in parallel; on failure returns the handles that
/// were made.
pub(crate) async fn cut_all<F, Fut>(
    driver: &'static str,
    volumes: &[VolumeRef],
    job: F,
) -> Result<Vec<SnapshotHandle>, SnapshotError>
where
    F: Fn(VolumeRef) -> Fut,
    Fut: std::future::Future<Output = Result<SnapshotHandle, String>>,
{
    let results = futures_util::future::join_all(volumes.iter().cloned().map(job)).await;
    let mut made = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(handle) => made.push(handle),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(made)
    } else {
        Err(SnapshotError {
            driver,
            message: errors.join("; "),
            made,
        })
    }
}
