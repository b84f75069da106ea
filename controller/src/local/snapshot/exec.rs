//! exec: command templates for LVM/ZFS (or anything) on hosts without
//! Kubernetes. Placeholders: `{volume}`, `{snapshot}` (unique per backup,
//! member and volume), `{backup}`, `{member}`. Examples in `deploy/local/`.
//!
//! Each command runs in its own process group, bounded by the templates'
//! `timeout`; whatever of the group outlives the command (or a command
//! that was cut short) is killed.

use async_trait::async_trait;
use tokio::process::Command;

use super::{
    Made, SnapshotError, SnapshotHandle, Snapshotter, VolumeRef, cut_all, run_bounded, volume_name,
};
use crate::local::config::ExecTemplates;

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

/// The snapshot name of one volume: `<backup>-<member>-<index>`.
fn snapshot_name(backup_id: &str, v: &VolumeRef) -> String {
    format!("{backup_id}-{}", volume_name(v))
}

/// The backup a handle belongs to. Handles recorded before the backup id
/// was kept in them are named `<backup>-<member>-<index>`: the id is what
/// is left without that suffix (ids contain `-` themselves).
pub fn backup_of(handle: &SnapshotHandle) -> String {
    if !handle.backup.is_empty() {
        return handle.backup.clone();
    }
    let without_index = handle
        .handle
        .rsplit_once('-')
        .filter(|(_, index)| index.chars().all(|c| c.is_ascii_digit()))
        .map_or(handle.handle.as_str(), |(rest, _)| rest);
    without_index
        .strip_suffix(&format!("-{}", handle.member))
        .unwrap_or(without_index)
        .to_string()
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

    fn accept_gap(&self) -> &'static str {
        crate::local::config::ACCEPT_GAP
    }

    async fn cut(
        &self,
        backup_id: &str,
        volumes: &[VolumeRef],
        made: &Made,
    ) -> Result<(), SnapshotError> {
        let bound = Some(self.templates.timeout());
        cut_all("exec", volumes, made, |v| {
            let snapshot = snapshot_name(backup_id, &v);
            let command = render(
                &self.templates.snapshot,
                &v.path.display().to_string(),
                &snapshot,
                backup_id,
                &v.member,
            );
            async move {
                run_bounded("exec", Command::new("sh").args(["-c", &command]), bound).await?;
                Ok(SnapshotHandle::new(backup_id, v, snapshot, "exec"))
            }
        })
        .await
    }

    async fn ready(&self, _handles: &mut Vec<SnapshotHandle>) -> Result<(), SnapshotError> {
        Ok(())
    }

    async fn delete(&self, handles: &[SnapshotHandle]) -> Result<(), SnapshotError> {
        let mut errors = Vec::new();
        for h in handles {
            let command = render(
                &self.templates.delete,
                &h.volume.display().to_string(),
                &h.handle,
                &backup_of(h),
                &h.member,
            );
            let bound = Some(self.templates.timeout());
            if let Err(e) =
                run_bounded("exec", Command::new("sh").args(["-c", &command]), bound).await
            {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::new("exec", errors.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backup_of_a_handle_keeps_every_dash_of_its_id() {
        let v = VolumeRef {
            member: "pg-0".into(),
            index: 1,
            path: "/srv/pg".into(),
            claim: None,
            batch: 0,
        };
        let id = "shop-20261124-081500-123";
        let name = snapshot_name(id, &v);
        let mut h = SnapshotHandle::new(id, v, name, "exec");
        assert_eq!(backup_of(&h), id);
        // A handle recorded without its backup id: parsed from the name.
        h.backup.clear();
        assert_eq!(backup_of(&h), id);
    }
}
