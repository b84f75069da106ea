//! btrfs: a read-only subvolume snapshot per volume (atomic per subvolume,
//! milliseconds). The local default. Each volume must be a subvolume.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::process::Command;

use super::{
    Made, SnapshotError, SnapshotHandle, Snapshotter, VolumeRef, backup_dir, cut_all, each_volume,
    run, volume_name,
};

#[derive(Debug)]
pub struct Btrfs {
    dir: PathBuf,
}

impl Btrfs {
    pub fn new(dir: PathBuf) -> Self {
        Btrfs { dir }
    }
}

#[async_trait]
impl Snapshotter for Btrfs {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn sees_page_cache(&self) -> bool {
        true
    }

    fn atomic(&self) -> bool {
        true
    }

    fn accept_gap(&self) -> &'static str {
        crate::local::config::ACCEPT_GAP
    }

    async fn prepare(&self, volumes: &[VolumeRef]) -> Result<(), SnapshotError> {
        each_volume("btrfs", volumes, |v| async move {
            run(
                "btrfs",
                Command::new("btrfs")
                    .args(["filesystem", "sync"])
                    .arg(&v.path),
            )
            .await
        })
        .await
    }

    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let dest = backup_dir("btrfs", &self.dir, backup_id).await?;
        cut_all("btrfs", volumes, made, |v| {
            let target = dest.join(volume_name(&v));
            async move {
                run(
                    "btrfs",
                    Command::new("btrfs")
                        .args(["subvolume", "snapshot", "-r"])
                        .arg(&v.path)
                        .arg(&target),
                )
                .await?;
                Ok(SnapshotHandle::new(
                    backup_id,
                    v,
                    target.display().to_string(),
                    "btrfs",
                ))
            }
        })
        .await
    }

    async fn ready(&self, _handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn delete_backup(&self, backup_id: &str) -> Result<(), SnapshotError> {
        let dir = self.dir.join(backup_id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let handles: Vec<SnapshotHandle> = entries
            .flatten()
            .map(|e| SnapshotHandle {
                claim: None,
                backup: backup_id.to_string(),
                member: String::new(),
                index: 0,
                volume: PathBuf::new(),
                handle: e.path().display().to_string(),
                driver: "btrfs".into(),
                checksum: None,
                part: None,
            })
            .collect();
        self.delete(&handles).await?;
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        let mut errors = Vec::new();
        for h in handles {
            if !std::path::Path::new(&h.handle).exists() {
                continue;
            }
            if let Err(e) = run(
                "btrfs",
                Command::new("btrfs")
                    .args(["subvolume", "delete"])
                    .arg(&h.handle),
            )
            .await
            {
                errors.push(e);
            }
            if let Some(parent) = std::path::Path::new(&h.handle).parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::new("btrfs", errors.join("; ")))
        }
    }
}
