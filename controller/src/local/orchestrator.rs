//! Local mode's way into the protocol: a group from the TOML file, the
//! snapshotter it names, and the JSON catalog as the backup's store.

use std::future::Future;
use std::sync::Arc;

use crate::core::agents::ControllerTls;
use crate::core::protocol::{BackupJob, Protocol};
use crate::local::catalog::{Catalog, Manifest};
use crate::local::config::Group;
use crate::local::snapshot;

pub use crate::core::protocol::{
    BackupError, consistency, copy_refusal, default_stage, engine_name, new_backup_id, uncovered,
};

/// Runs group backups of local groups into a catalog.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    pub tls: ControllerTls,
    pub catalog: Catalog,
}

impl Orchestrator {
    /// Takes one backup of `group` with id `id`. Always leaves a manifest.
    pub async fn backup(&self, group: &Group, id: &str) -> Result<Manifest, BackupError> {
        self.backup_until(group, id, None, std::future::pending())
            .await
    }

    /// Takes one backup, recording the schedule that started it, and
    /// aborts it (thawing every member, deleting what was cut, outcome
    /// `aborted`) as soon as `cancel` completes.
    pub async fn backup_until(
        &self,
        group: &Group,
        id: &str,
        schedule: Option<&str>,
        cancel: impl Future<Output = String>,
    ) -> Result<Manifest, BackupError> {
        let spec = group.spec();
        let job = BackupJob {
            group: &spec,
            id,
            hold: crate::core::holder::hold_id("backup", id, None),
            schedule,
            snapshotter: snapshot::for_group(group),
            store: Arc::new(self.catalog.clone()),
        };
        Protocol::new(self.tls.clone()).run(job, cancel).await
    }
}
