//! stillpoint: the controller and its CLI.
//!
//! - [`agents`]: mTLS channels to agents, checking each agent's identity.
//! - [`certs`]: the CA and identities (`stillpoint certs`).
//! - [`cli`]: the command line, one file per command group.
//! - [`config`]: the local-mode TOML file.
//! - [`orchestrator`]: the group backup protocol; [`holder`] keeps each
//!   freeze renewed; [`timeline`] records the phases and the freeze window.
//! - [`snapshot`]: the snapshotters (btrfs, copy, exec).
//! - [`catalog`]: the manifests; [`restore`]: restoring them locally.
//! - [`servers`]: real database servers run locally (`stillpoint demo`, tests);
//!   [`demo`]: the demo cluster, its causal workload and its verification.
#![forbid(unsafe_code)]

pub mod agents;
pub mod bench;
pub mod catalog;
pub mod certs;
pub mod cli;
pub mod config;
pub mod demo;
pub mod holder;
pub mod metrics;
pub mod orchestrator;
pub mod restore;
pub mod retention;
pub mod rlimit;
pub mod scheduler;
pub mod servers;
pub mod snapshot;
pub mod timeline;
