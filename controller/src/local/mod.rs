//! Local mode: groups in a TOML file, agents at fixed addresses, snapshots
//! on the host (btrfs, copy, exec), manifests in a JSON catalog.
//!
//! - [`config`]: the TOML file; [`orchestrator`]: backups of its groups.
//! - [`catalog`]: the manifests; [`retention`]: deleting backups.
//! - [`snapshot`]: the host snapshotters; [`restore`]: restoring their files.
//! - [`serve`]: the schedules (`stillpoint serve`).

pub mod catalog;
pub mod config;
pub mod orchestrator;
pub mod restore;
pub mod retention;
pub mod serve;
pub mod servers;
pub mod snapshot;
