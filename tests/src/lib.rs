//! End-to-end tests for Stillpoint and the harness they share.
//!
//! [`harness`] starts **real** servers (PostgreSQL, MariaDB, Redis, each a
//! primary plus a replica) on free ports in their own temp dirs, the agent
//! binary, and throwaway PKI; everything is stopped and removed on drop, and
//! the clusters shared by a test binary are torn down when it exits.
#![deny(unsafe_code)]

pub mod chart;
pub mod docs;
pub mod harness;
