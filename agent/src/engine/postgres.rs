//! PostgreSQL (12–17) over tokio-postgres.
//!
//! PostgreSQL has no native write freeze. The hold is a **backup session**:
//! `pg_backup_start(label, fast)` (`pg_start_backup(label, fast, false)` up
//! to 14) plus a temporary physical replication slot that reserves WAL from
//! the start, both in one session that the agent keeps open until the thaw
//! runs `pg_backup_stop` in that same session and returns the stop LSN,
//! `backup_label` and `tablespace_map`. Both are started in **Prepare**
//! (after a `CHECKPOINT`), so the fast checkpoint stays out of the freeze
//! window; a freeze without a prepare starts them itself.
//!
//! Mode `fence` also opens, per configured database, one transaction that
//! takes `LOCK TABLE … IN EXCLUSIVE MODE` on every table of the configured
//! schemas: writes wait, reads go on, and `lock_timeout` bounds the wait for
//! the locks. A standby is read-only, so it is never fenced.
//!
//! After a thaw that ends a completed cut, the session (and so the slot)
//! stays open for `STILLPOINT_PG_WAL_RETAIN`, so the WAL up to the stop LSN
//! can still be copied, or until the controller says it has copied it (a
//! `Thaw` of the hold already thawed: [`release`]): a slot kept the whole
//! while by every backup would use up `max_replication_slots` when backups
//! come more often than that. A hold that ends any other way (an abort, lease
//! expiry, a lost stream, shutdown, a manual thaw) closes its session at
//! once: the backup is aborted and the temporary slot dropped, so killed
//! controllers never use up `max_replication_slots`.
//!
//! Flush (before the cut): on a primary, one commit with
//! `synchronous_commit = on` (of a transactional logical message), which
//! flushes the WAL of every asynchronous commit acknowledged before it; a
//! standby replays only flushed WAL. A primary's position is its insert
//! LSN, so a replica aligned to it holds every acknowledged commit.
//!
//! A fence also bounds itself on the server: its transaction sets
//! `idle_in_transaction_session_timeout` to the lease plus
//! [`SERVER_GRACE`], and every renewal of the lease runs a statement in it
//! (which restarts that timer and proves the session answers). An agent
//! cut off from its server, or stopped, cannot keep the tables locked: the
//! server ends the fence's session by itself soon after the lease.
//!
//! When the controller's cut is atomic (`PrepareRequest.atomic_cut`: btrfs,
//! LVM/ZFS, CSI snapshots) the image is crash-consistent and restores by
//! crash recovery without a `backup_label`, so no backup session or slot is
//! opened at all: the hold is the fences (mode `fence`) or nothing (mode
//! `backup`, writes flowing), and the thaw is a `ROLLBACK`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_proto::pb;
use stillpoint_proto::position::{make, parse_lsn};
use tokio::sync::{Mutex, oneshot};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, Frozen, SERVER_GRACE, Step, Thawed,
};
use crate::config::{
    ENV_LOCK_TIMEOUT, ENV_PG_FENCE_DATABASES, ENV_PG_FENCE_SCHEMAS, EngineConfig, PgConfig, PgMode,
    Secret,
};

/// The fence transaction's `idle_in_transaction_session_timeout` for a
/// lease of `ttl`, as a `SET LOCAL` statement.
fn fence_guard(ttl: Duration) -> String {
    format!(
        "SET LOCAL idle_in_transaction_session_timeout = '{}ms';",
        (ttl + SERVER_GRACE).as_millis()
    )
}

/// Parses a libpq-style DSN (`host=… user=…` or `postgresql://…`).
pub fn parse_dsn(dsn: &str) -> Result<tokio_postgres::Config, String> {
    dsn.parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string())
}

/// The statements that start and stop a non-exclusive backup, by server version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupStatements {
    pub start: &'static str,
    pub stop: &'static str,
}

/// Chooses the backup functions for `server_version_num`.
pub fn backup_statements(server_version_num: i32) -> Result<BackupStatements, String> {
    match server_version_num {
        v if v < 120_000 => Err(format!(
            "PostgreSQL {} is not supported (12 or newer is needed)",
            v / 10_000
        )),
        v if v < 150_000 => Ok(BackupStatements {
            start: "SELECT pg_start_backup($1, true, false)::text",
            stop: "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)",
        }),
        _ => Ok(BackupStatements {
            start: "SELECT pg_backup_start($1, true)::text",
            stop: "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
        }),
    }
}

/// A replication slot name for a backup id (lowercase, digits, `_`, ≤ 63).
/// The backup sessions kept after completed thaws, by slot name, each
/// with what ends it early. Process-wide: a kept session outlives its hold,
/// the only owner the engine has, and a later `Thaw` call names it only by
/// its backup id.
static RETAINED: std::sync::LazyLock<std::sync::Mutex<HashMap<String, oneshot::Sender<()>>>> =
    std::sync::LazyLock::new(Default::default);

/// Keeps `session` (and its temporary slot `slot`, which holds the WAL up
/// to the backup stop) open for `bound`, or until [`release`]d.
fn retain(session: Session, slot: String, bound: Duration) {
    let (release, released) = oneshot::channel();
    RETAINED.lock().unwrap().insert(slot.clone(), release);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(bound) => {}
            _ = released => {}
        }
        RETAINED.lock().unwrap().remove(&slot);
        drop(session);
    });
}

/// Ends the backup session kept for `backup_id`'s WAL now, dropping its
/// slot: the controller has copied the WAL. Whether one was kept.
pub fn release(backup_id: &str) -> bool {
    let release = RETAINED.lock().unwrap().remove(&slot_name(backup_id));
    release.is_some_and(|r| r.send(()).is_ok())
}

/// The replication slot of `backup_id` on this agent: readable (the id's
/// first 32 characters, lowercased, others as `_`), unique (a hash of the
/// whole id: ids that differ only past those characters, as a long
/// group's backups do, get slots of their own) and within PostgreSQL's 63
/// bytes.
pub fn slot_name(backup_id: &str) -> String {
    use sha2::Digest;
    let clean: String = backup_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let digest = sha2::Sha256::digest(backup_id.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("stillpoint_{clean}_{hash}_{}", std::process::id())
}

/// What holds the replication slots, for the error when none is left.
async fn slots_in_use(c: &Client) -> String {
    let rows = c
        .query(
            "SELECT slot_name::text, slot_type, temporary, active_pid, \
                    current_setting('max_replication_slots') \
               FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )
        .await;
    let Ok(rows) = rows else {
        return "the slots in use could not be listed".into();
    };
    let max: String = rows.first().map(|r| r.get(4)).unwrap_or_default();
    let slots: Vec<String> = rows
        .iter()
        .map(|r| {
            let (name, kind, temporary, pid): (String, String, bool, Option<i32>) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let temporary = if temporary { ", temporary" } else { "" };
            match pid {
                Some(pid) => format!("{name} ({kind}{temporary}, held by backend pid {pid})"),
                None => format!("{name} ({kind}{temporary}, not in use)"),
            }
        })
        .collect();
    format!(
        "the {} slot(s) (max_replication_slots = {max}) are: {}. Drop unused slots \
         (pg_drop_replication_slot) or raise max_replication_slots",
        slots.len(),
        slots.join(", ")
    )
}

/// The standbys streaming from this primary without a replication slot,
/// when nothing else keeps WAL for them (`wal_keep_size`, or up to 12
/// `wal_keep_segments`, is 0).
const UNSLOTTED_STANDBYS_SQL: &str = "SELECT coalesce(nullif(r.application_name, ''), 'a standby') \
            || coalesce(' at ' || host(r.client_addr), '') \
       FROM pg_stat_replication r \
      WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid) \
        AND coalesce(pg_size_bytes(current_setting('wal_keep_size', true)), \
                     current_setting('wal_keep_segments', true)::bigint) = 0";

/// One open session and a signal that fires when its connection ends.
struct Session {
    client: Client,
    closed: oneshot::Receiver<String>,
    what: String,
    /// A fence session: the fenced tables as read at prepare (a `LOCK
    /// TABLE` list), `None` when there were none.
    tables: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

/// A started backup, waiting for (or inside) a freeze.
#[derive(Debug)]
struct Backup {
    backup_id: String,
    session: Session,
    /// The backup session's stop (absent for an atomic cut, which needs none).
    stop: Option<BackupStop>,
    /// Fence sessions opened ahead of the freeze (mode `fence`).
    fences: Vec<Session>,
}

/// What ends a started `pg_backup_start`.
#[derive(Debug)]
struct BackupStop {
    stop_sql: &'static str,
    start_lsn: String,
    slot: String,
}

#[derive(Debug)]
pub struct Postgres {
    ctx: Ctx,
    dsn: Option<Secret>,
    pg: PgConfig,
    connect_timeout: Duration,
    lock_timeout: Duration,
    poll_interval: Duration,
    prepared_expiry: Duration,
    control: Mutex<Option<Session>>,
    /// The session replica waits poll on, kept open between backups (and
    /// opened at prepare) so an alignment costs no connection.
    wait: Mutex<Option<Session>>,
    prepared: Arc<Mutex<Option<Backup>>>,
}

fn db_error(e: &tokio_postgres::Error) -> (Cause, String) {
    if let Some(db) = e.as_db_error() {
        let cause = match db.code().code() {
            // lock_not_available, query_canceled (statement/lock timeout)
            "55P03" | "57014" => Cause::Timeout,
            // admin_shutdown and friends: the session was killed
            "57P01" | "57P02" | "57P03" => Cause::Lost,
            // invalid_password, invalid_authorization_specification
            "28P01" | "28000" | "3D000" => Cause::Unavailable,
            _ => Cause::Refused,
        };
        return (
            cause,
            format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        );
    }
    if e.is_closed() {
        return (Cause::Lost, format!("connection closed: {e}"));
    }
    (Cause::Unavailable, e.to_string())
}

impl Postgres {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        Postgres {
            ctx,
            dsn: config.dsn.clone(),
            pg: config.pg.clone(),
            connect_timeout: config.connect_timeout,
            lock_timeout: config.lock_timeout,
            poll_interval: config.poll_interval,
            prepared_expiry: config.prepared_expiry,
            control: Mutex::new(None),
            wait: Mutex::new(None),
            prepared: Arc::new(Mutex::new(None)),
        }
    }

    fn err(&self, step: Step, e: &tokio_postgres::Error) -> EngineError {
        let (cause, message) = db_error(e);
        self.ctx.err(step, cause, message)
    }

    async fn connect(
        &self,
        dbname: Option<&str>,
        step: Step,
        what: &str,
    ) -> Result<Session, EngineError> {
        let dsn = self.dsn.as_ref().ok_or_else(|| {
            self.ctx.err(
                Step::Connect,
                Cause::Invalid,
                "no connection string configured",
            )
        })?;
        let mut config =
            parse_dsn(dsn.expose()).map_err(|e| self.ctx.err(Step::Connect, Cause::Invalid, e))?;
        config.connect_timeout(self.connect_timeout);
        config.application_name("stillpoint-agent");
        if let Some(db) = dbname {
            config.dbname(db);
        }
        let connecting = tokio::time::timeout(self.connect_timeout, config.connect(NoTls));
        let (client, connection) = connecting
            .await
            .map_err(|_| {
                self.ctx.err(
                    step,
                    Cause::Unavailable,
                    format!(
                        "cannot connect within {} ms (STILLPOINT_CONNECT_TIMEOUT)",
                        self.connect_timeout.as_millis()
                    ),
                )
            })?
            .map_err(|e| {
                let (_, message) = db_error(&e);
                self.ctx.err(
                    step,
                    Cause::Unavailable,
                    format!("cannot connect: {message}"),
                )
            })?;
        let (tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let reason = match connection.await {
                Ok(()) => "the server closed the connection".to_string(),
                Err(e) => db_error(&e).1,
            };
            let _ = tx.send(reason);
        });
        Ok(Session {
            client,
            closed,
            what: what.to_string(),
            tables: None,
        })
    }

    /// Runs `f` on the shared control session, reconnecting if it died.
    /// Runs `f` on the shared control session. A session found closed (the
    /// server ended it while idle) is replaced and `f` runs once more: the
    /// control session holds no state.
    async fn with_control<T>(
        &self,
        step: Step,
        f: impl AsyncFn(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, EngineError> {
        let mut guard = self.control.lock().await;
        for attempt in 0..2 {
            if guard.as_ref().is_none_or(|s| s.client.is_closed()) {
                *guard = Some(self.connect(None, step, "control session").await?);
            }
            let session = guard.as_ref().expect("just connected");
            match f(&session.client).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_closed() && attempt == 0 => {
                    tracing::debug!(error = %e, "control session was closed; reconnecting");
                    *guard = None;
                }
                Err(e) => {
                    if e.is_closed() {
                        *guard = None;
                    }
                    return Err(self.err(step, &e));
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// The wait session, (re)opened if it is not open.
    async fn wait_session(
        &self,
        step: Step,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Session>>, EngineError> {
        let mut guard = self.wait.lock().await;
        if guard.as_ref().is_none_or(|s| s.client.is_closed()) {
            *guard = Some(self.connect(None, step, "wait session").await?);
        }
        Ok(guard)
    }

    /// Opens the session a freeze holds. For a non-atomic cut it runs
    /// `pg_backup_start` with a temporary slot reserving the WAL; an atomic
    /// cut restores by crash recovery and needs neither.
    async fn start_backup(
        &self,
        backup_id: &str,
        step: Step,
        atomic_cut: bool,
    ) -> Result<Backup, EngineError> {
        if atomic_cut {
            let session = self.connect(None, step, "hold session").await?;
            let fences = self.open_fences(step).await?;
            return Ok(Backup {
                backup_id: backup_id.to_string(),
                session,
                stop: None,
                fences,
            });
        }
        let session = self.connect(None, step, "backup session").await?;
        let c = &session.client;
        let version: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| self.err(step, &e))?
            .get(0);
        let statements =
            backup_statements(version).map_err(|e| self.ctx.err(step, Cause::Refused, e))?;
        let slot = slot_name(backup_id);
        if let Err(e) = c
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                &[&slot],
            )
            .await
        {
            let mut err = self.err(step, &e);
            if e.code() == Some(&tokio_postgres::error::SqlState::CONFIGURATION_LIMIT_EXCEEDED) {
                err.message = format!("{}; {}", err.message, slots_in_use(c).await);
            }
            return Err(err);
        }
        let label = format!("stillpoint {backup_id}");
        let start_lsn: String = c
            .query_one(statements.start, &[&label])
            .await
            .map_err(|e| self.err(step, &e))?
            .get(0);
        let fences = self.open_fences(step).await?;
        Ok(Backup {
            backup_id: backup_id.to_string(),
            session,
            stop: Some(BackupStop {
                stop_sql: statements.stop,
                start_lsn,
                slot,
            }),
            fences,
        })
    }

    /// Opens one session per fenced database (none on a standby: it is
    /// read-only). Done in prepare, so the freeze only has to lock.
    async fn open_fences(&self, step: Step) -> Result<Vec<Session>, EngineError> {
        if self.pg.mode != PgMode::Fence {
            return Ok(Vec::new());
        }
        self.open_fence_sessions(step).await
    }

    /// Opens the fence sessions whatever the mode (a manual quiesce fences
    /// PostgreSQL in `backup` mode too).
    async fn open_fence_sessions(&self, step: Step) -> Result<Vec<Session>, EngineError> {
        let databases: Vec<Option<&str>> = if self.pg.fence_databases.is_empty() {
            vec![None]
        } else {
            self.pg
                .fence_databases
                .iter()
                .map(|d| Some(d.as_str()))
                .collect()
        };
        let opened = futures_util::future::join_all(databases.into_iter().map(async |db| {
            let what = format!("fence on database {}", db.unwrap_or("(default)"));
            let mut session = self.connect(db, step, &what).await?;
            let row = session
                .client
                .query_one(
                    &format!("SELECT pg_is_in_recovery(), ({})", self.fence_tables_sql()),
                    &[],
                )
                .await
                .map_err(|e| self.err(step, &e))?;
            let standby: bool = row.get(0);
            session.tables = row.get(1);
            if let (false, Some(tables)) = (standby, &session.tables) {
                // Warm this session's caches with the freeze's own statements
                // (ACCESS SHARE conflicts only with ACCESS EXCLUSIVE), so the
                // freeze itself pays for neither planning nor cache loads.
                let warm = format!(
                    "BEGIN; SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {tables} IN ACCESS SHARE MODE; {}; ROLLBACK;",
                    self.lock_timeout.as_millis(),
                    self.fence_tables_sql()
                );
                session
                    .client
                    .batch_execute(&warm)
                    .await
                    .map_err(|e| self.err(step, &e))?;
            }
            Ok::<_, EngineError>((!standby).then_some(session))
        }))
        .await;
        let mut fences = Vec::new();
        for result in opened {
            fences.extend(result?);
        }
        Ok(fences)
    }

    /// The fenced tables as one `LOCK TABLE` list (NULL when there are none).
    fn fence_tables_sql(&self) -> String {
        let schemas: Vec<String> = self
            .pg
            .fence_schemas
            .iter()
            .map(|s| format!("'{}'", s.replace('\'', "''")))
            .collect();
        format!(
            "SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY n.nspname, c.relname) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(ARRAY[{}]::text[])",
            schemas.join(", ")
        )
    }

    /// Takes `LOCK TABLE … IN EXCLUSIVE MODE` on every table of the fenced
    /// schemas, in one open transaction. The list read at prepare is locked
    /// in one round trip, which also re-reads the list: if tables came or
    /// went since, the transaction locks the tables as they are now.
    async fn lock_fence(
        &self,
        session: &Session,
        with_position: bool,
        ttl: Duration,
    ) -> Result<Option<pb::Position>, EngineError> {
        let begin = format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms'; {}",
            self.lock_timeout.as_millis(),
            fence_guard(ttl)
        );
        let current = self.fence_tables_sql();
        let locks = match &session.tables {
            Some(tables) => format!("LOCK TABLE {tables} IN EXCLUSIVE MODE;"),
            None => String::new(),
        };
        let position = if with_position { POSITION_SQL } else { "" };
        let sql = format!("{begin} {locks} {current}; {position}");
        let fast = match session.client.simple_query(&sql).await {
            Ok(messages) => {
                let mut rows = messages.iter().filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                });
                let now = rows.next().map(|row| row.get(0).map(str::to_string));
                if now == Some(session.tables.clone()) {
                    // A fence is only ever on a primary.
                    let position = rows.next().and_then(|row| {
                        let primary = row.get(0) == Some("f");
                        let lsn = parse_lsn(row.get(1)?)?;
                        let sizes = wal_sizes(row.get(2), row.get(3));
                        primary.then(|| make::lsn(wal_end(lsn, sizes)))
                    });
                    return Ok(position);
                }
                // The tables changed since prepare: lock them as they are,
                // in this same transaction.
                Some(())
            }
            // A listed table was dropped: start over.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                let _ = session.client.batch_execute("ROLLBACK").await;
                None
            }
            Err(e) => return Err(self.fence_error(session, &e)),
        };
        let lock = format!(
            "{} DO $stillpoint$ DECLARE t text; BEGIN \
               {current} INTO t; \
               IF t IS NOT NULL THEN EXECUTE 'LOCK TABLE ' || t || ' IN EXCLUSIVE MODE'; END IF; \
             END $stillpoint$;",
            if fast.is_some() { "" } else { begin.as_str() },
        );
        session
            .client
            .batch_execute(&lock)
            .await
            .map_err(|e| self.fence_error(session, &e))?;
        Ok(None)
    }

    /// Locks the fences (if any), reads the position and holds `backup`.
    async fn hold(
        &self,
        mut backup: Backup,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let fences = std::mem::take(&mut backup.fences);
        // With one fence, its round trip also reads the position (after the
        // locks); with several, the position is read once all are locked.
        let single = fences.len() == 1;
        let locked =
            futures_util::future::join_all(fences.iter().map(|f| self.lock_fence(f, single, ttl)))
                .await;
        // On an error the fences drop here, which ends their transactions:
        // nothing stays locked.
        let read = locked.into_iter().collect::<Result<Vec<_>, _>>()?;
        let (position, primary) = match read.into_iter().flatten().next() {
            // A fence is only ever on a primary.
            Some(position) => (position, true),
            None => {
                let (position, role) = self
                    .read_position(&backup.session.client, Step::Freeze)
                    .await?;
                (position, role == pb::Role::Primary)
            }
        };
        Ok(Box::new(PgHold {
            ctx: self.ctx.clone(),
            backup,
            fences,
            position,
            primary,
            wal_retain: self.pg.wal_retain,
        }))
    }

    /// Why a quiesce of this primary is refused: its fence would lock nothing.
    fn nothing_to_fence(&self) -> EngineError {
        let databases = match self.pg.fence_databases.is_empty() {
            true => "the DSN's database".to_string(),
            false => self.pg.fence_databases.join(", "),
        };
        self.ctx.err(
            Step::Freeze,
            Cause::Refused,
            format!(
                "a quiesce must stop every write, but the fence finds no table to lock in schema(s) {} \
                 of {databases}; name the schemas and databases that hold the data in \
                 {ENV_PG_FENCE_SCHEMAS} and {ENV_PG_FENCE_DATABASES} (injected agents: the pod \
                 annotations stillpoint.dev/pg-fence-schemas and stillpoint.dev/pg-fence-databases)",
                self.pg.fence_schemas.join(", ")
            ),
        )
    }

    fn fence_error(&self, session: &Session, e: &tokio_postgres::Error) -> EngineError {
        let mut err = self.err(Step::Freeze, e);
        err.message = format!("{}: {}", session.what, err.message);
        if err.cause == Cause::Timeout {
            err.message = format!(
                "{} (the table locks were not granted within {} ms, {ENV_LOCK_TIMEOUT})",
                err.message,
                self.lock_timeout.as_millis()
            );
        }
        err
    }

    /// The role and position, in one round trip: a simple query, which
    /// tokio-postgres sends without preparing a statement first.
    async fn read_position(
        &self,
        client: &Client,
        step: Step,
    ) -> Result<(pb::Position, pb::Role), EngineError> {
        let messages = client
            .simple_query(POSITION_SQL)
            .await
            .map_err(|e| self.err(step, &e))?;
        self.position_from(&messages, step)
    }

    /// The role and position in the answer to [`POSITION_SQL`].
    fn position_from(
        &self,
        messages: &[tokio_postgres::SimpleQueryMessage],
        step: Step,
    ) -> Result<(pb::Position, pb::Role), EngineError> {
        let row = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let field = |i: usize| row.and_then(|r| r.get(i));
        let (standby, lsn_text) = (field(0) == Some("t"), field(1).unwrap_or_default());
        let lsn = parse_lsn(lsn_text).ok_or_else(|| {
            self.ctx
                .err(step, Cause::Refused, format!("unparsable LSN '{lsn_text}'"))
        })?;
        let (lsn, role) = match standby {
            true => (lsn, pb::Role::Replica),
            false => {
                let sizes = wal_sizes(field(2), field(3));
                (wal_end(lsn, sizes), pb::Role::Primary)
            }
        };
        Ok((make::lsn(lsn), role))
    }
}

/// The paths recovery needs: the data directory, where `pg_wal` really is
/// (when the agent can see it is a link), and every tablespace. Returns
/// them and what could not be checked.
pub fn data_paths(
    data: &str,
    tablespaces: &[(String, String)],
) -> (Vec<pb::ServerPath>, Vec<String>) {
    let mut paths = vec![super::server_path("data_directory", data)];
    let mut warnings = Vec::new();
    let wal = std::path::Path::new(data).join("pg_wal");
    match std::fs::read_link(&wal) {
        Ok(target) => {
            let target = std::path::Path::new(data).join(target);
            paths.push(super::server_path("pg_wal", target.display().to_string()));
        }
        // Not a link: it is inside the data directory.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
        Err(e) => warnings.push(format!(
            "cannot tell whether {} is a link to another volume ({e}); if it is, its \
             target must be on a snapshotted volume too",
            wal.display()
        )),
    }
    for (name, location) in tablespaces {
        paths.push(super::server_path(format!("tablespace {name}"), location));
    }
    (paths, warnings)
}

/// The role and the position: replay LSN on a standby; on a primary the
/// insert LSN, which covers every commit it acknowledged (with
/// `synchronous_commit = off`, the write LSN can be behind them), taken to
/// the end of the written WAL by [`wal_end`] with the WAL page and segment
/// sizes (in bytes).
const POSITION_SQL: &str = "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() \
     THEN COALESCE(pg_last_wal_replay_lsn(), '0/0') ELSE pg_current_wal_insert_lsn() END)::text, \
     current_setting('wal_block_size'), pg_size_bytes(current_setting('wal_segment_size'))";

/// The sizes [`wal_end`] needs, from the third and fourth columns of
/// [`POSITION_SQL`] (0 where unreadable: [`wal_end`] then leaves the
/// pointer as it is).
fn wal_sizes(page: Option<&str>, segment: Option<&str>) -> WalSizes {
    let bytes = |v: Option<&str>| v.and_then(|v| v.parse().ok()).unwrap_or(0);
    WalSizes {
        page: bytes(page),
        segment: bytes(segment),
    }
}

/// A server's WAL page (`wal_block_size`) and segment (`wal_segment_size`)
/// sizes, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct WalSizes {
    pub page: u64,
    pub segment: u64,
}

/// The end of the WAL a primary wrote, from its insert pointer (`insert`).
/// When the last record ended exactly at a page boundary (a segment
/// switch, or by chance), the insert pointer lies past the next page's
/// header — 40 bytes at a segment's start, 24 on every other page — where
/// no record can end: a standby that replayed everything stands at the
/// boundary itself, and would wait for the header's end until the primary
/// writes again. Anywhere else the pointer is where a record ended — also
/// 40 bytes into a page that does not start a segment, where a record
/// continued from the page before ends.
pub fn wal_end(insert: u64, sizes: WalSizes) -> u64 {
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    match (
        insert.checked_rem(sizes.segment),
        insert.checked_rem(sizes.page),
    ) {
        (Some(LONG_HEADER), _) => insert - LONG_HEADER,
        (_, Some(SHORT_HEADER)) => insert - SHORT_HEADER,
        _ => insert,
    }
}

/// Flushes the WAL of every commit acknowledged so far (see `PgHold::flush`),
/// unless all of it is flushed already (then it costs no commit and no fsync).
const FLUSH_SQL: &str = "BEGIN; SET LOCAL synchronous_commit = on; \
     SELECT pg_logical_emit_message(true, 'stillpoint', 'flush') \
      WHERE pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn(); COMMIT;";

#[async_trait]
impl Engine for Postgres {
    fn kind(&self) -> super::EngineKind {
        super::EngineKind::Postgres
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        let (version, standby, upstream, data, tablespaces, unslotted) = self
            .with_control(Step::Describe, async |c| {
                let row = c
                    .query_one(
                        "SELECT current_setting('server_version'), pg_is_in_recovery(), \
                         (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver LIMIT 1), \
                         current_setting('data_directory')",
                        &[],
                    )
                    .await?;
                let tablespaces: Vec<(String, String)> = c
                    .query(
                        "SELECT spcname::text, pg_tablespace_location(oid) FROM pg_tablespace \
                          WHERE pg_tablespace_location(oid) <> '' ORDER BY spcname",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                let standby: bool = row.get(1);
                let unslotted: Vec<String> = if standby {
                    Vec::new()
                } else {
                    c.query(UNSLOTTED_STANDBYS_SQL, &[])
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect()
                };
                Ok((
                    row.get::<_, String>(0),
                    standby,
                    row.get::<_, Option<String>>(2),
                    row.get::<_, String>(3),
                    tablespaces,
                    unslotted,
                ))
            })
            .await?;
        let (paths, mut warnings) = data_paths(&data, &tablespaces);
        warnings.extend(unslotted.iter().map(|standby| {
            format!(
                "{standby} streams from this primary without a replication slot and \
                 wal_keep_size is 0: checkpoints (which every backup forces) can remove WAL \
                 it still needs, and it stops replicating. Give it a slot (primary_slot_name) \
                 or set wal_keep_size"
            )
        }));
        Ok(Description {
            server_version: format!("PostgreSQL {version}"),
            role: if standby {
                pb::Role::Replica
            } else {
                pb::Role::Primary
            },
            upstream: upstream.unwrap_or_default(),
            capabilities: pb::Capabilities {
                blocks_writes: self.pg.mode == PgMode::Fence,
                wait_for_position: true,
                thaw_artefacts: true,
            },
            paths,
            warnings,
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        let messages = self
            .with_control(Step::Position, async |c| c.simple_query(POSITION_SQL).await)
            .await?;
        self.position_from(&messages, Step::Position)
    }

    async fn prepare(&self, backup_id: &str, atomic_cut: bool) -> Result<String, EngineError> {
        {
            let prepared = self.prepared.lock().await;
            if let Some(b) = prepared.as_ref().filter(|b| b.backup_id == backup_id) {
                return Ok(match &b.stop {
                    Some(stop) => format!(
                        "backup already started at {} (slot {})",
                        stop.start_lsn, stop.slot
                    ),
                    None => "already prepared for an atomic cut".to_string(),
                });
            }
        }
        let started = Instant::now();
        self.with_control(Step::Prepare, async |c| c.batch_execute("CHECKPOINT").await)
            .await?;
        let checkpoint = started.elapsed();
        let backup = self
            .start_backup(backup_id, Step::Prepare, atomic_cut)
            .await?;
        // A replica's alignment follows: have its session ready.
        drop(self.wait_session(Step::Prepare).await?);
        let detail = match &backup.stop {
            Some(stop) => format!(
                "CHECKPOINT in {} ms; backup started at {} with slot {}",
                checkpoint.as_millis(),
                stop.start_lsn,
                stop.slot
            ),
            None => format!(
                "CHECKPOINT in {} ms; atomic cut: no backup session needed",
                checkpoint.as_millis()
            ),
        };
        // A prepared backup that no freeze claims is ended after the
        // agent's longest lease, so a vanished controller leaks nothing.
        let previous = self.prepared.lock().await.replace(backup);
        drop(previous);
        let prepared = self.prepared.clone();
        let id = backup_id.to_string();
        let expiry = self.prepared_expiry;
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            let mut slot = prepared.lock().await;
            if slot.as_ref().is_some_and(|b| b.backup_id == id) {
                tracing::warn!(backup_id = %id, "prepared backup never frozen; ending it");
                *slot = None;
            }
        });
        Ok(detail)
    }

    async fn freeze(&self, backup_id: &str, ttl: Duration) -> Result<Box<dyn Frozen>, EngineError> {
        let prepared = {
            let mut slot = self.prepared.lock().await;
            match slot.take() {
                Some(b) if b.backup_id == backup_id && !b.session.client.is_closed() => Some(b),
                _ => None,
            }
        };
        let backup = match prepared {
            Some(b) => b,
            // Unprepared: the safe default is a backup session.
            None => self.start_backup(backup_id, Step::Freeze, false).await?,
        };
        self.hold(backup, ttl).await
    }

    /// A quiesce: no backup session (nothing is cut), and the fences taken
    /// whatever the mode, since every write must wait. A primary with
    /// nothing to fence is refused: a hold that lets writes through would
    /// be a lie. A standby accepts no writes, so it needs no fence.
    async fn freeze_writes(
        &self,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let session = self.connect(None, Step::Freeze, "hold session").await?;
        let standby: bool = session
            .client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| self.err(Step::Freeze, &e))?
            .get(0);
        let fences = match standby {
            true => Vec::new(),
            false => self.open_fence_sessions(Step::Freeze).await?,
        };
        if !standby && fences.iter().all(|f| f.tables.is_none()) {
            return Err(self.nothing_to_fence());
        }
        let backup = Backup {
            backup_id: backup_id.to_string(),
            session,
            stop: None,
            fences,
        };
        self.hold(backup, ttl).await
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        let Some(pb::position::Kind::Pg(_)) = &target.kind else {
            return Err(self.ctx.err(
                Step::Wait,
                Cause::Invalid,
                "a PostgreSQL member can only wait for a PostgreSQL LSN".to_string(),
            ));
        };
        let mut guard = self.wait_session(Step::Wait).await?;
        let session = guard.as_ref().expect("just opened");
        let result =
            super::poll_position(&self.ctx, target, timeout, self.poll_interval, async || {
                Ok(self.read_position(&session.client, Step::Wait).await?.0)
            })
            .await;
        if session.client.is_closed() {
            *guard = None;
        }
        result
    }
}

/// Drops `what` (closing its sessions) a moment later, off the thaw's path.
fn close_later<T: Send + 'static>(what: T) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(what);
    });
}

#[derive(Debug)]
struct PgHold {
    ctx: Ctx,
    backup: Backup,
    fences: Vec<Session>,
    position: pb::Position,
    /// Not a standby: commits may be acknowledged before their WAL is
    /// flushed (`synchronous_commit = off`).
    primary: bool,
    wal_retain: Duration,
}

#[async_trait]
impl Frozen for PgHold {
    fn position(&self) -> pb::Position {
        self.position.clone()
    }

    async fn lost(&mut self) -> EngineError {
        let mut watched: Vec<(&String, &mut oneshot::Receiver<String>)> = Vec::new();
        watched.push((&self.backup.session.what, &mut self.backup.session.closed));
        for fence in &mut self.fences {
            watched.push((&fence.what, &mut fence.closed));
        }
        let (names, receivers): (Vec<_>, Vec<_>) = watched.into_iter().unzip();
        let (reason, index, _) = futures_util::future::select_all(receivers).await;
        let reason = reason.unwrap_or_else(|_| "connection task ended".into());
        self.ctx.err(
            Step::Hold,
            Cause::Lost,
            format!("the held {} ended: {reason}", names[index]),
        )
    }

    /// Restarts each fence's server-side timer for the new lease; a fence
    /// that does not answer loses the hold (the supervisor bounds the wait
    /// by the lease).
    async fn renewed(&mut self, ttl: Duration) -> Result<(), EngineError> {
        let guard = fence_guard(ttl);
        let renewed = futures_util::future::join_all(
            self.fences
                .iter()
                .map(async |f| (f, f.client.batch_execute(&guard).await)),
        )
        .await;
        for (fence, result) in renewed {
            if let Err(e) = result {
                let (cause, message) = db_error(&e);
                let cause = match cause {
                    Cause::Unavailable => Cause::Lost,
                    other => other,
                };
                return Err(self.ctx.err(
                    Step::Hold,
                    cause,
                    format!("renewing the {}: {message}", fence.what),
                ));
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        if !self.primary {
            // A standby replays only WAL it has already flushed.
            return Ok(String::new());
        }
        // A commit with synchronous_commit on flushes the WAL up to its own
        // record, and so every asynchronous commit acknowledged before it.
        // It must have written WAL to flush: a transactional logical message
        // (any wal_level, executable by PUBLIC) is the smallest such write.
        self.backup
            .session
            .client
            .batch_execute(FLUSH_SQL)
            .await
            .map_err(|e| {
                let (cause, message) = db_error(&e);
                self.ctx.err(Step::Flush, cause, message)
            })?;
        Ok("WAL flushed".into())
    }

    async fn thaw(self: Box<Self>, ending: Ending) -> Result<Thawed, EngineError> {
        let PgHold {
            ctx,
            backup,
            fences,
            wal_retain,
            ..
        } = *self;
        // Writes first: end the fence transactions.
        futures_util::future::join_all(fences.iter().map(async |fence| {
            if let Err(e) = fence.client.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %e, "{} did not roll back cleanly; closing it", fence.what);
            }
        }))
        .await;
        // The sessions close once the thaw is acknowledged: their server
        // processes exiting would otherwise compete with the reply for CPU.
        close_later(fences);
        let Some(stop) = backup.stop else {
            // An atomic cut: nothing was started, nothing to stop.
            close_later(backup.session);
            return Ok(Thawed::default());
        };
        if ending == Ending::Abandoned {
            // No cut needs this backup: ending its session aborts it and
            // drops its temporary slot, so nothing holds WAL or a slot.
            drop(backup.session);
            let mut thawed = Thawed::default();
            thawed
                .artefacts
                .insert("released_slot".into(), stop.slot.clone());
            return Ok(thawed);
        }
        let row = backup
            .session
            .client
            .query_one(stop.stop_sql, &[])
            .await
            .map_err(|e| {
                let (cause, message) = db_error(&e);
                ctx.err(Step::Thaw, cause, format!("backup stop failed: {message}"))
            })?;
        let stop_lsn: String = row.get(0);
        let label: String = row.get(1);
        let tablespace_map: Option<String> = row.get(2);
        let mut thawed = Thawed {
            stop_position: parse_lsn(&stop_lsn).map(make::lsn),
            ..Default::default()
        };
        let a = &mut thawed.artefacts;
        a.insert("start_lsn".into(), stop.start_lsn.clone());
        a.insert("stop_lsn".into(), stop_lsn);
        a.insert("backup_label".into(), label);
        if let Some(map) = tablespace_map.filter(|m| !m.is_empty()) {
            a.insert("tablespace_map".into(), map);
        }
        a.insert("wal_slot".into(), stop.slot.clone());
        a.insert("wal_retained_ms".into(), wal_retain.as_millis().to_string());
        retain(backup.session, stop.slot.clone(), wal_retain);
        Ok(thawed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_follow_the_server_version() {
        assert!(backup_statements(110_000).is_err());
        for v in [120_000, 130_005, 140_010] {
            let s = backup_statements(v).unwrap();
            assert!(s.start.contains("pg_start_backup($1, true, false)"), "{v}");
            assert!(s.stop.contains("pg_stop_backup(false, false)"), "{v}");
        }
        for v in [150_000, 160_004, 170_002] {
            let s = backup_statements(v).unwrap();
            assert!(s.start.contains("pg_backup_start($1, true)"), "{v}");
            assert!(s.stop.contains("pg_backup_stop(false)"), "{v}");
        }
    }

    #[test]
    fn a_primarys_position_is_where_its_written_wal_ends() {
        let sizes = |page, segment| WalSizes { page, segment };
        let default = sizes(8192, 16 << 20);
        // Past a page's header with nothing after it: the boundary.
        assert_eq!(wal_end(0x0300_2000 + 24, default), 0x0300_2000);
        // Past a segment's long header: the segment's start.
        assert_eq!(wal_end(0x0400_0000 + 40, default), 0x0400_0000);
        // Inside a page, where records end: as it is. 40 bytes into a page
        // that does not start a segment is where a record continued from
        // the page before ends (16 bytes after the short header).
        for lsn in [
            0x0302_a000 + 40,
            0x0400_0000 + 48,
            0x0300_2000 + 32,
            0x0300_2000,
            0x0300_1ff8,
        ] {
            assert_eq!(wal_end(lsn, default), lsn, "{lsn:#x}");
        }
        // Other sizes.
        assert_eq!(wal_end(0x1_0000 + 24, sizes(32768, 16 << 20)), 0x1_0000);
        assert_eq!(wal_end(0x0010_0000 + 40, sizes(8192, 1 << 20)), 0x0010_0000);
        assert_eq!(
            wal_end(0x0200_0000 + 40, sizes(8192, 1 << 30)),
            0x0200_0000 + 40
        );
        // An unknown size (0) leaves what it decides as it is.
        assert_eq!(
            wal_end(0x0300_2000 + 24, sizes(0, 16 << 20)),
            0x0300_2000 + 24
        );
        assert_eq!(wal_end(0x0300_2000 + 24, sizes(8192, 0)), 0x0300_2000);
        assert_eq!(wal_end(0x0400_0000 + 40, sizes(8192, 0)), 0x0400_0000 + 40);
    }

    #[test]
    fn backups_whose_ids_differ_only_at_the_end_get_slots_of_their_own() {
        let group = "shop/orders-database-consistency-group-with-a-long-name";
        let a = slot_name(&format!("{group}-20261207t101500z"));
        let b = slot_name(&format!("{group}-20261207t103000z"));
        assert_ne!(a, b);
        assert_eq!(a, slot_name(&format!("{group}-20261207t101500z")));
        for name in [a, b] {
            assert!(name.len() <= 63, "{name}");
        }
    }

    #[test]
    fn slot_names_are_valid() {
        let name = slot_name("Backup-2026-11-24T01:02:03Z/Group.A");
        assert!(name.len() <= 63);
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn dsn_errors_do_not_echo_the_password() {
        let err = parse_dsn("host=db password=hunter2 port=notaport").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
