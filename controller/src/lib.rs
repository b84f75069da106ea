//! stillpoint: the controller and its CLI.
//!
//! - [`core`]: the group backup protocol and its model, independent of any
//!   mode — agents, held freezes, the timeline, records, recovery plans,
//!   retention rules, the snapshotter and store traits.
//! - [`local`]: local mode — the TOML file, the JSON catalog, the host
//!   snapshotters (btrfs, copy, exec), local restores (and the restored
//!   servers `restore --start` runs) and schedules.
//! - [`kube`]: Kubernetes mode — the custom resources, discovery from pods,
//!   the CSI snapshotters, the reconcilers and their leader Lease.
//! - [`certs`]: the CA and identities (`stillpoint certs`).
//! - [`cli`]: the command line, one file per command group.
//! - [`metrics`]: what the controller counts.
//!
//! The demo, the benchmarks and the server pairs the tests run are not
//! here: they are the `stillpoint-lab` crate (`stillpoint demo|bench` run
//! its `stillpoint-lab` program).
#![forbid(unsafe_code)]

pub mod certs;
pub mod cli;
pub mod core;
pub mod kube;
pub mod local;
pub mod metrics;
pub mod rlimit;
