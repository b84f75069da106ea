//! stillpoint: the controller and its CLI.
//!
//! - [`core`]: the group backup protocol and its model, independent of any
//!   mode — agents, held freezes, the timeline, records, recovery plans,
//!   retention rules, the snapshotter and store traits.
//! - [`local`]: local mode — the TOML file, the JSON catalog, the host
//!   snapshotters (btrfs, copy, exec), local restores and schedules.
//! - [`certs`]: the CA and identities (`stillpoint certs`).
//! - [`cli`]: the command line, one file per command group.
//! - [`metrics`]: what the controller counts.
//! - [`servers`], [`demo`], [`bench`]: real database servers run locally,
//!   the demo cluster and the benchmarks (`stillpoint demo|bench`, tests).
//!
//! The modules at the top level below `core` and `local` (`catalog`,
//! `config`, `orchestrator`, ...) are the paths earlier versions used.
#![forbid(unsafe_code)]

pub mod bench;
pub mod certs;
pub mod cli;
pub mod core;
pub mod demo;
pub mod kube;
pub mod local;
pub mod metrics;
pub mod rlimit;
pub mod servers;

pub use crate::core::{agents, holder, plan, timeline};
pub use crate::local::serve as scheduler;
pub use crate::local::{catalog, config, orchestrator, restore, retention, snapshot};
