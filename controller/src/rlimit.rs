//! Raises the open-file limit to its hard maximum at start-up: a controller
//! keeps one connection per agent, and the usual soft limit of 1024 is far
//! below a large fleet.

/// Raises `RLIMIT_NOFILE`'s soft limit as far as the hard limit allows;
/// returns the limit now in force.
pub fn raise_open_files() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::debug!("cannot raise the open-file limit: {e}");
            None
        }
    }
}
