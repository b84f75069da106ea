//! exec: command templates for LVM/ZFS (or anything) on hosts without
//! Kubernetes. Placeholders: `{volume}`, `{snapshot}` (unique per backup,
//! member and volume), `{backup}`, `{member}`. Examples in `deploy/local/`.

use async_trait::async_trait;
use tokio::process::Command;

use super::{SnapshotError, SnapshotHandle, Snapshotter, VolumeRef, cut_all, run, volume_name};
use crate::config::ExecTemplates;

#[derive(Debug)]
pub struct Exec {
    templates: ExecTemplates,
}

impl Exec {
    pub fn new(templates: ExecTemplates) -> Self {
        Exec { templates }
    }
}

/// Fills a template's placeholders.
pub fn render(template: &str, volume: &str, snapshot: &str, backup: &str, member: &str) -> String {
    template
        .replace("{volume}", volume)
        .replace("{snapshot}", snapshot)
        .replace("{backup}", backup)
        .replace("{member}", member)
}

#[async_trait]
impl Snapshotter for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn atomic(&self) -> bool {
        // LVM and ZFS snapshots are atomic per volume.
        true
    }

    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
    ) -> Result<Vec<SnapshotHandle>, SnapshotError> {
        cut_all("exec", volumes, |v| {
            let snapshot = format!("{backup_id}-{}", volume_name(&v));
            let command = render(
                &self.templates.snapshot,
                &v.path.display().to_string(),
                &snapshot,
                backup_id,
                &v.member,
            );
            async move {
                run("exec", Command::new("sh").args(["-c", &command])).await?;
                Ok(SnapshotHandle::new(v, snapshot, "exec"))
            }
        })
        .await
    }

    async fn ready(&self, _handles: &mut [SnapshotHandle]) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        let mut errors = Vec::new();
        for h in handles {
            let backup = h.handle.split('-').next().unwrap_or_default();
            let command = render(
                &self.templates.delete,
                &h.volume.display().to_string(),
                &h.handle,
                backup,
                &h.member,
            );
            if let Err(e) = run("exec", Command::new("sh").args(["-c", &command])).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError {
                driver: "exec",
                message: errors.join("; "),
                made: vec![],
            })
        }
    }
}
