//! The Stillpoint agent API.
//!
//! - [`pb`]: the generated gRPC types, client and server for
//!   `stillpoint/agent/v1/agent.proto`.
//! - [`position`]: how replication positions of each engine are ordered,
//!   parsed and shown.
//! - [`tls`]: mutual TLS with SPIFFE-style identities, shared by both ends.
#![forbid(unsafe_code)]

pub mod admin;
pub mod duration;
pub mod hosts;
pub mod position;
pub mod tls;

/// Generated protobuf types and the tonic client/server for `stillpoint.agent.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("stillpoint.agent.v1");
}

pub use position::{Incomparable, PositionExt};
