//! One cluster of each kind per test binary, started on first use and torn
//! down when the binary exits (even after failed tests). Tests isolate
//! themselves by database, table or key prefix.

use std::sync::{Once, OnceLock};

use super::mariadb::MariaPair;
use super::postgres::PgPair;
use super::redis::RedisPair;

static POSTGRES: OnceLock<PgPair> = OnceLock::new();
static MARIADB: OnceLock<MariaPair> = OnceLock::new();
static REDIS: OnceLock<RedisPair> = OnceLock::new();
static AT_EXIT: Once = Once::new();

/// The binary's PostgreSQL primary + replica.
pub fn postgres() -> &'static PgPair {
    register_teardown();
    POSTGRES.get_or_init(|| PgPair::start().expect("starting the shared PostgreSQL pair"))
}

/// The binary's MariaDB primary + replica.
pub fn mariadb() -> &'static MariaPair {
    register_teardown();
    MARIADB.get_or_init(|| MariaPair::start().expect("starting the shared MariaDB pair"))
}

/// The binary's Redis primary + replica.
pub fn redis() -> &'static RedisPair {
    register_teardown();
    REDIS.get_or_init(|| RedisPair::start().expect("starting the shared Redis pair"))
}

extern "C" fn teardown() {
    // Statics are never dropped: stop the servers and remove their dirs here.
    let _ = std::panic::catch_unwind(|| {
        if let Some(pair) = POSTGRES.get() {
            pair.teardown();
        }
        if let Some(pair) = MARIADB.get() {
            pair.teardown();
        }
        if let Some(pair) = REDIS.get() {
            pair.teardown();
        }
    });
}

#[allow(unsafe_code)]
fn register_teardown() {
    AT_EXIT.call_once(|| {
        // SAFETY: `teardown` is a plain `extern "C" fn()` that catches its own
        // panics; atexit only stores the pointer and calls it from exit().
        unsafe {
            libc::atexit(teardown);
        }
    });
}

/// Serializes the tests of one binary that freeze a whole server
/// (Redis `CLIENT PAUSE`, MariaDB `BACKUP STAGE`): such a freeze is
/// server-wide, so key or database prefixes cannot isolate them.
pub async fn server_wide_freeze() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
