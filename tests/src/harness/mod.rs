//! The shared test harness.
//!
//! - [`postgres`], [`mariadb`], [`redis`]: primary + replica pairs of real servers.
//! - [`agent`]: the `stillpoint-agent` binary as a child process.
//! - [`pki`]: throwaway CAs and identities.
//! - [`shared`]: one cluster per test binary, torn down at exit.
//!
//! Servers run as their Debian service users (`postgres`, `mysql`,
//! `redis`) when the tests run as root: PostgreSQL refuses root outright.

pub mod agent;
pub mod fleet;
pub mod group;
pub mod kube;
pub mod loopfs;
pub mod mariadb;
pub mod mongo;
pub mod pki;
pub mod postgres;
pub mod prometheus;
pub mod redis;
pub mod shared;

// The server-running code lives in the lab crate (`stillpoint demo` uses it
// too); the tests reach it through here.
pub use stillpoint_lab::servers::{
    Pair, Scratch, Server, ServerProcess, ServiceUser, command_as, free_port, http_get, is_btrfs,
    is_root, kill_and_wait, log_tail, metric_sum, pid_alive, remove_tree, require, run,
    service_user, signal, wait_for,
};
