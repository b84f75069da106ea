//! The flush's second half: what the engine acknowledged and wrote is made
//! durable on the member's volumes with `syncfs(2)`, once per filesystem,
//! so that a block-level snapshot (which does not see the page cache)
//! holds it.
//!
//! The volumes are `STILLPOINT_VOLUMES` when set (the paths where the agent
//! sees the member's volumes); otherwise the paths the server itself
//! reports at `Describe` (its data directory, WAL, binlog, ... locations),
//! which is right whenever the agent sees the server's files at the same
//! paths (a local agent, or a sidecar with the volumes mounted where the
//! database has them).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use stillpoint_proto::pb;

use crate::config::ENV_VOLUMES;
use crate::engine::sys;

/// Where the agent syncs at the flush.
#[derive(Debug, Default)]
pub struct Volumes {
    configured: Vec<PathBuf>,
    /// The server's own paths, from its last `Describe`.
    learnt: Mutex<Vec<PathBuf>>,
}

impl Volumes {
    pub fn new(configured: Vec<PathBuf>) -> Self {
        Volumes {
            configured,
            learnt: Mutex::new(Vec::new()),
        }
    }

    /// Remembers the server's paths (used when none are configured).
    pub fn learn(&self, paths: &[pb::ServerPath]) {
        *self.learnt.lock().unwrap() = paths.iter().map(|p| PathBuf::from(&p.path)).collect();
    }

    /// The paths to sync: the configured ones, or else the learnt ones.
    pub fn list(&self) -> Vec<PathBuf> {
        if self.configured.is_empty() {
            self.learnt.lock().unwrap().clone()
        } else {
            self.configured.clone()
        }
    }

    /// Whether the list comes from `STILLPOINT_VOLUMES`.
    pub fn configured(&self) -> bool {
        !self.configured.is_empty()
    }
}

/// The nearest existing path at or above `path` (a binlog basename names
/// files, not a directory), stopping at the first parent.
fn existing(path: &Path) -> Option<&Path> {
    if path.exists() {
        return Some(path);
    }
    path.parent().filter(|p| p.exists())
}

/// Syncs the filesystem of every path, once per filesystem. Returns the
/// paths synced (one per filesystem) or what could not be synced.
pub fn sync_all(paths: &[PathBuf], configured: bool) -> Result<Vec<PathBuf>, String> {
    let mut devices = BTreeSet::new();
    let mut synced = Vec::new();
    for path in paths {
        let Some(found) = existing(path) else {
            let hint = if configured {
                format!("check {ENV_VOLUMES}")
            } else {
                format!(
                    "the server reports it, but the agent does not see it: set {ENV_VOLUMES} \
                     to where the agent sees the member's volumes"
                )
            };
            return Err(format!(
                "cannot sync {}: no such path ({hint})",
                path.display()
            ));
        };
        let device = std::fs::metadata(found)
            .map_err(|e| format!("cannot sync {}: {e}", found.display()))?
            .dev();
        if !devices.insert(device) {
            continue;
        }
        sys::syncfs(found).map_err(|e| format!("syncfs {}: {e}", found.display()))?;
        synced.push(found.to_path_buf());
    }
    Ok(synced)
}

/// Writes a whole file so that no reader (PostgreSQL, the TLS reloader)
/// ever sees half of it: beside the target with `mode` (and `owner`), synced,
/// then renamed into place.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("stillpoint-new");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sync_per_filesystem_and_missing_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let basename = a.join("binlog");
        let synced = sync_all(&[a.clone(), basename, dir.path().into()], true).unwrap();
        assert_eq!(synced, vec![a], "one filesystem, synced once");
        let missing = dir.path().join("nope/deeper");
        let err = sync_all(&[missing], false).unwrap_err();
        assert!(
            err.contains("nope/deeper") && err.contains(ENV_VOLUMES),
            "{err}"
        );
    }

    #[test]
    fn configured_volumes_win_over_learnt_paths() {
        let v = Volumes::new(vec![]);
        v.learn(&[pb::ServerPath {
            what: "dir".into(),
            path: "/srv/redis".into(),
        }]);
        assert_eq!(v.list(), vec![PathBuf::from("/srv/redis")]);
        let v = Volumes::new(vec!["/mnt/data".into()]);
        v.learn(&[pb::ServerPath {
            what: "dir".into(),
            path: "/srv/redis".into(),
        }]);
        assert_eq!(v.list(), vec![PathBuf::from("/mnt/data")]);
    }
}
