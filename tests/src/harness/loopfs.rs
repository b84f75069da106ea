//! Re-exported from `stillpoint_controller::servers::loopfs`, which `stillpoint demo` shares.
pub use stillpoint_controller::servers::loopfs::*;
