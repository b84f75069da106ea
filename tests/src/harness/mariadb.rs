//! Re-exported from `stillpoint_lab::servers::mariadb`, which `stillpoint demo` shares.
pub use stillpoint_lab::servers::mariadb::*;
