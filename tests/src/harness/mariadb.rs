//! Re-exported from `stillpoint_controller::servers::mariadb`, which `stillpoint demo` shares.
pub use stillpoint_controller::servers::mariadb::*;
