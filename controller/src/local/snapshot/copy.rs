//! copy: a plain file copy per volume (extents shared where the filesystem can),
//! with a SHA-256 over the copy recorded. Not atomic: allowed only where the
//! engine makes a copy consistent (see the orchestrator's checks).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{
    Made, SnapshotError, SnapshotHandle, Snapshotter, VolumeRef, backup_dir, cut_all, volume_name,
};

#[derive(Debug)]
pub struct Copy {
    dir: PathBuf,
}

impl Copy {
    pub fn new(dir: PathBuf) -> Self {
        Copy { dir }
    }
}

fn error(message: String) -> SnapshotError {
    SnapshotError::new("copy", message)
}

/// Copies a live directory tree: owners and modes kept, file data copied
/// with `copy_file_range` (which shares extents where the filesystem can).
/// Files that vanish while the tree is copied (a database's temporary
/// files) are skipped: they were never part of any consistent state.
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let vanished = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let meta = std::fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        std::os::unix::fs::symlink(target, dst)?;
        let _ = std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()));
        return Ok(());
    }
    if meta.is_dir() {
        std::fs::create_dir(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            match copy_tree(&entry.path(), &dst.join(entry.file_name())) {
                Err(e) if vanished(&e) => {}
                other => other?,
            }
        }
    } else if meta.is_file() {
        std::fs::copy(src, dst)?;
    } else {
        // Sockets, fifos: nothing to copy.
        return Ok(());
    }
    std::os::unix::fs::chown(dst, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    Ok(())
}

async fn copy_live(src: PathBuf, dst: PathBuf) -> Result<(), String> {
    let what = format!("copying {} to {}", src.display(), dst.display());
    tokio::task::spawn_blocking(move || copy_tree(&src, &dst))
        .await
        .map_err(|e| format!("{what}: {e}"))?
        .map_err(|e| format!("{what}: {e}"))
}

/// SHA-256 over every regular file's relative path and contents, in order.
pub fn checksum(root: &Path) -> std::io::Result<String> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&entry.path(), files)?;
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, &mut files)?;
    files.sort();
    let mut hash = Sha256::new();
    for file in files {
        hash.update(
            file.strip_prefix(root)
                .unwrap_or(&file)
                .to_string_lossy()
                .as_bytes(),
        );
        hash.update(std::fs::read(&file)?);
    }
    Ok(format!("sha256:{:x}", hash.finalize()))
}

#[async_trait]
impl Snapshotter for Copy {
    fn name(&self) -> &'static str {
        "copy"
    }

    fn sees_page_cache(&self) -> bool {
        true
    }

    fn atomic(&self) -> bool {
        false
    }

    fn accept_gap(&self) -> &'static str {
        crate::local::config::ACCEPT_GAP
    }

    fn copy_fix(&self) -> &'static str {
        crate::local::config::COPY_FIX
    }

    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let dest = backup_dir("copy", &self.dir, backup_id).await?;
        cut_all("copy", volumes, made, |v| {
            let target = dest.join(volume_name(&v));
            async move {
                copy_live(v.path.clone(), target.clone()).await?;
                Ok(SnapshotHandle::new(
                    backup_id,
                    v,
                    target.display().to_string(),
                    "copy",
                ))
            }
        })
        .await
    }

    async fn refresh(
        &self,
        handle: &SnapshotHandle,
        relative: &str,
        _made: &Made,
    ) -> Result<(), SnapshotError> {
        let from = handle.volume.join(relative);
        let to = Path::new(&handle.handle).join(relative);
        let _ = tokio::fs::remove_dir_all(&to).await;
        copy_live(from, to).await.map_err(error)
    }

    async fn ready(&self, handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        for h in handles.iter_mut() {
            let root = PathBuf::from(&h.handle);
            let sum = tokio::task::spawn_blocking(move || checksum(&root))
                .await
                .map_err(|e| error(e.to_string()))?
                .map_err(|e| error(format!("checksumming {}: {e}", h.handle)))?;
            h.checksum = Some(sum);
        }
        Ok(())
    }

    async fn delete_backup(&self, backup_id: &str) -> Result<(), SnapshotError> {
        let dir = self.dir.join(backup_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(error(format!("deleting {}: {e}", dir.display())))
            }
            _ => Ok(()),
        }
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        for h in handles {
            let path = Path::new(&h.handle);
            if path.exists() {
                tokio::fs::remove_dir_all(path)
                    .await
                    .map_err(|e| error(format!("deleting {}: {e}", h.handle)))?;
            }
            if let Some(parent) = path.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}
