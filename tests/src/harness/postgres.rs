//! Re-exported from `stillpoint_controller::servers::postgres`, which `stillpoint demo` shares.
pub use stillpoint_controller::servers::postgres::*;
