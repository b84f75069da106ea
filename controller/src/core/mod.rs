//! The group backup protocol and its model — independent of any mode: it
//! knows nothing of TOML files, catalogs on disk or Kubernetes objects.
//!
//! - [`model`]: the group it runs on (members, agents, roles, volumes, budgets).
//! - [`protocol`]: resolve → prepare → freeze → align → flush → cut → thaw → finalize.
//! - [`error`]: why a backup failed, by phase, member and kind.
//! - [`store`]: where the backup's record goes; [`record`]: that record.
//! - [`snapshot`]: the snapshotter trait, passed in by the caller.
//! - [`agents`], [`holder`]: mTLS channels to agents and held freezes.
//! - [`timeline`], [`plan`], [`retention`]: the timeline, recovery plans and
//!   retention rules (pure logic).

pub mod agents;
pub mod error;
pub mod holder;
pub mod model;
pub mod plan;
pub mod protocol;
pub mod record;
pub mod retention;
pub mod schedule;
pub mod snapshot;
pub mod store;
pub mod timeline;
