//! Re-exported from `stillpoint_lab::servers::loopfs`, which `stillpoint demo` shares.
pub use stillpoint_lab::servers::loopfs::*;
