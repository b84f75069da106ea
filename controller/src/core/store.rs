//! Where a backup's record is kept. The protocol saves it when it starts,
//! as members resolve and snapshots appear, and when it ends; local mode
//! keeps it in the JSON catalog, Kubernetes mode in the GroupBackup.

use async_trait::async_trait;

use crate::core::record::Manifest;

/// Why a record could not be saved.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

#[async_trait]
pub trait BackupStore: Send + Sync {
    /// Saves the backup's current record (creating or replacing it).
    async fn save(&self, manifest: &Manifest) -> Result<(), StoreError>;
}
