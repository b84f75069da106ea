//! Kubernetes mode: the protocol run by custom resources.
//!
//! - [`crd`]: ConsistencyGroup and GroupBackup (`stillpoint.dev/v1alpha1`).
//! - [`resolve`]: a group's pods, agents, identities, PVCs and snapshot
//!   class, or why it cannot be protected.
//! - [`csi`]: the `csi` and `csi-group` snapshotters.
//! - [`store`]: the GroupBackup status as the backup's store.
//! - [`controller`]: the reconcilers and leader election
//!   (`stillpoint controller`).

pub mod controller;
pub mod crd;
pub mod csi;
pub mod resolve;
pub mod store;
