//! The local snapshotters (btrfs, copy, exec) and what they share: running
//! commands in their own process group, one job per volume.

use std::path::PathBuf;

pub use crate::core::snapshot::*;
use crate::local::config::{Driver, Group};

pub mod btrfs;
pub mod copy;
pub mod exec;

/// The volumes of `members`, as the snapshotters take them.
pub fn volumes_of<'a>(
    members: impl IntoIterator<Item = &'a crate::local::config::MemberFile>,
) -> Vec<VolumeRef> {
    members
        .into_iter()
        .flat_map(|m| {
            m.volumes.iter().enumerate().map(|(index, path)| VolumeRef {
                member: m.name.clone(),
                index,
                path: path.clone(),
                claim: None,
                batch: 0,
            })
        })
        .collect()
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
