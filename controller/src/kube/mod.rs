//! Kubernetes mode: the protocol run by custom resources.
//!
//! - [`crd`]: ConsistencyGroup and GroupBackup (`stillpoint.dev/v1alpha1`).
//! - [`resolve`]: a group's pods, agents, identities, PVCs and snapshot
//!   class, or why it cannot be protected.
//! - [`content`]: GroupBackupContent, a backup's record outside its namespace.
//! - [`csi`]: the `csi` and `csi-group` snapshotters.
//! - [`store`]: the GroupBackup status as the backup's store.
//! - [`controller`]: the reconcilers and leader election
//!   (`stillpoint controller`).
//! - [`schedule`]: BackupSchedule, backups at cron times with retention.
//! - [`quiesce`]: GroupQuiesce, a manual freeze held by the controller.
//! - [`reason`]: every Condition and Event reason, as one type.
//! - [`restore`]: GroupRestore, a backup restored stage by stage.
//! - [`inject`]: what the sidecar-injecting webhook does to a pod.
//! - [`pki`]: the in-cluster CA (a Secret) and the trust bundle's upkeep.
//! - [`webhook`]: the HTTPS endpoint serving the webhook and the agents'
//!   certificate requests (TokenReview-authenticated).

pub mod capture;
pub mod content;
pub mod controller;
pub mod crd;
pub mod csi;
pub mod inject;
pub mod leader;
pub mod pki;
pub mod quiesce;
pub mod reason;
pub mod resolve;
pub mod restore;
pub mod schedule;
pub mod state;
pub mod store;
pub mod transfer;
pub mod webhook;
