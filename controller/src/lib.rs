//! stillpoint: the controller and its CLI.
//!
//! - [`agents`]: mTLS channels to agents, checking each agent's identity.
//! - [`certs`]: the CA and identities (`stillpoint certs`).
//! - [`cli`]: the command line, one file per command group.
#![forbid(unsafe_code)]

pub mod agents;
pub mod certs;
pub mod cli;
