//! Re-exported from `stillpoint_lab::servers::redis`, which `stillpoint demo` shares.
pub use stillpoint_lab::servers::redis::*;
