//! Snapshotters: one trait, a driver per kind of storage. Each reports the
//! cut (the point is fixed) and readiness separately and can delete what it
//! made. Every snapshot is handed to a [`Made`] recorder the moment it
//! exists, so a cut that is cut short (the freeze budget ran out) still
//! leaves a record of what to delete.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    /// The backup it belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup: String,
    pub member: String,
    /// Which of the member's volumes (their order in its configuration).
    #[serde(default)]
    pub index: usize,
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
    /// The handle of `volume`'s snapshot for `backup`, made by `driver`.
    pub fn new(backup: &str, volume: VolumeRef, handle: String, driver: &str) -> Self {
        SnapshotHandle {
            backup: backup.to_string(),
            member: volume.member,
            index: volume.index,
            volume: volume.path,
            handle,
            driver: driver.into(),
            checksum: None,
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

    /// Whether every volume of a cut is snapshotted at one instant (a
    /// group snapshot); per-volume snapshots taken in parallel are not.
    fn one_instant(&self) -> bool {
        false
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
    async fn prepare(&self, _volumes: &[VolumeRef]) -> Result<(), SnapshotError> {
        Ok(())
    }

    /// Cuts every volume (in parallel where it can), recording each
    /// snapshot in `made` as soon as it exists. Returns when the cut point
    /// is fixed.
    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError>;

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

    /// Nothing is cut, so nothing needs syncing for it.
    fn sees_page_cache(&self) -> bool {
        true
    }

    async fn cut(&self, _: &str, _: &[VolumeRef], _: &Made) -> Result<(), SnapshotError> {
        Ok(())
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
    tokio::fs::create_dir_all(&dest).await.map_err(|e| {
        SnapshotError::new(driver, format!("cannot create {}: {e}", dest.display()))
    })?;
    Ok(dest)
}

/// A command's process group, killed (SIGKILL) when this drops: a command
/// that is cut short (its future dropped by a budget) or that left
/// background children behind ends entirely.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let group = self
            .0
            .and_then(|id| rustix::process::Pid::from_raw(id as i32));
        if let Some(group) = group {
            // ESRCH: the group is already gone.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

/// Runs a command in its own process group, at most `bound`; a failure
/// carries its stderr. Whatever of the group is left when it ends (or is
/// cancelled) is killed.
pub(crate) async fn run_bounded(
    driver: &'static str,
    cmd: &mut tokio::process::Command,
    bound: Option<std::time::Duration>,
) -> Result<(), String> {
    let program = format!("{:?}", cmd.as_std().get_program());
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let _group = ProcessGroup(child.id());
    let waiting = child.wait_with_output();
    let out = match bound {
        Some(bound) => tokio::time::timeout(bound, waiting).await.map_err(|_| {
            format!(
                "{driver}: {program} did not finish within {} s",
                bound.as_secs()
            )
        })?,
        None => waiting.await,
    }
    .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{driver}: {program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command (see [`run_bounded`]); the caller bounds it.
pub(crate) async fn run(
    driver: &'static str,
    cmd: &mut tokio::process::Command,
) -> Result<(), String> {
    run_bounded(driver, cmd, None).await
}

/// Runs one job per volume in parallel; each result is handed to `made`
/// as soon as it exists.
pub(crate) async fn cut_all<F, Fut>(
    driver: &'static str,
    volumes: &[VolumeRef],
    made: &Made,
    job: F,
) -> Result<(), SnapshotError>
where
    F: Fn(VolumeRef) -> Fut,
    Fut: std::future::Future<Output = Result<SnapshotHandle, String>>,
{
    let results = futures_util::future::join_all(volumes.iter().cloned().map(|v| {
        let job = job(v);
        async move {
            let handle = job.await?;
            made.record(handle);
            Ok::<(), String>(())
        }
    }))
    .await;
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::new(driver, errors.join("; ")))
    }
}

/// Runs one job per volume in parallel (not a cut: nothing is recorded).
pub(crate) async fn each_volume<F, Fut>(
    driver: &'static str,
    volumes: &[VolumeRef],
    job: F,
) -> Result<(), SnapshotError>
where
    F: Fn(VolumeRef) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let results = futures_util::future::join_all(volumes.iter().cloned().map(job)).await;
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::new(driver, errors.join("; ")))
    }
}
