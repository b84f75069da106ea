//! Deleting local backups (snapshots first, then the manifest) and applying
//! a schedule's retention to the catalog.

use anyhow::Context;

pub use crate::core::retention::*;
use crate::local::catalog::{Catalog, Manifest};
use crate::local::config::Group;
use crate::local::snapshot;

/// Deletes one backup: every snapshot it lists (by the driver that made
/// it), whatever the group's snapshotter left under the backup's id, then
/// the manifest. A snapshot that cannot be deleted keeps the manifest, so
/// nothing is orphaned.
pub async fn delete_backup(
    catalog: &Catalog,
    manifest: &Manifest,
    group: Option<&Group>,
) -> anyhow::Result<usize> {
    let handles: Vec<_> = manifest
        .members
        .iter()
        .flat_map(|r| r.snapshots.clone())
        .collect();
    for h in &handles {
        let driver = snapshot::for_handle(h, group)
            .with_context(|| format!("no snapshotter can delete {} ({})", h.handle, h.driver))?;
        driver
            .delete(std::slice::from_ref(h))
            .await
            .with_context(|| format!("deleting snapshot {} of {}", h.handle, manifest.id))?;
    }
    if let Some(group) = group {
        snapshot::for_group(group)
            .delete_backup(&manifest.id)
            .await
            .with_context(|| format!("deleting what backup {} left", manifest.id))?;
    }
    catalog.remove(&manifest.id)?;
    Ok(handles.len())
}

/// Applies `policy` to `schedule`'s backups of `group`; returns the deleted
/// ids. A backup that cannot be deleted is logged and left for the next run.
pub async fn apply(
    catalog: &Catalog,
    group: &Group,
    schedule: &str,
    policy: Retention,
) -> anyhow::Result<Vec<String>> {
    if policy == Retention::default() {
        return Ok(Vec::new());
    }
    let manifests = catalog.list()?;
    let mut deleted = Vec::new();
    for id in select(
        &manifests,
        schedule,
        policy,
        time::OffsetDateTime::now_utc(),
    ) {
        let manifest = manifests.iter().find(|m| m.id == id).expect("selected");
        match delete_backup(catalog, manifest, Some(group)).await {
            Ok(_) => {
                tracing::info!(schedule, backup_id = %id, "retention deleted the backup");
                deleted.push(id);
            }
            Err(e) => tracing::warn!(schedule, backup_id = %id, "retention: {e:#}"),
        }
    }
    Ok(deleted)
}
