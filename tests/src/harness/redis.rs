//! Re-exported from `stillpoint_controller::servers::redis`, which `stillpoint demo` shares.
pub use stillpoint_controller::servers::redis::*;
