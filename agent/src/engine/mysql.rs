//! MySQL 8 and MariaDB ≥ 10.4 over mysql_async; the flavour is detected at
//! connect.
//!
//! - MariaDB: `BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT` … `BACKUP STAGE
//!   END`. Position `@@gtid_binlog_pos` (primary) / `@@gtid_slave_pos`
//!   (replica); replica wait `MASTER_GTID_WAIT`.
//! - MySQL 8: `FLUSH TABLES WITH READ LOCK` … `UNLOCK TABLES`. Position from
//!   `performance_schema.log_status` (falling back to `gtid_executed` and
//!   `SHOW BINARY LOG STATUS` on 8.2+ / `SHOW MASTER STATUS` before);
//!   replica wait `WAIT_FOR_EXECUTED_GTID_SET`.
//!
//! Every lock request is bounded by `lock_wait_timeout` (and MariaDB's
//! `max_statement_time`). The lock belongs to the held session: if the
//! agent dies the server releases it. A monitor checks that the session is
//! still in the process list, so a `KILL` is reported at once.

use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Row};
use stillpoint_proto::pb;
use stillpoint_proto::position::{PositionExt, make};
use tokio::sync::{Mutex, oneshot};
use tokio::time::Instant;

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, EngineKind, Frozen, HoldMonitor,
    SERVER_GRACE, Step, Thawed,
};
use crate::config::{ENV_LOCK_TIMEOUT, EngineConfig, Secret};

/// Parses a `mysql://user:password@host:port/db` URL.
pub fn parse_dsn(dsn: &str) -> Result<Opts, String> {
    Opts::from_url(dsn).map_err(|e| match e {
        // This variant repeats a value from the URL; keep it out.
        mysql_async::UrlError::InvalidParamValue { param, .. } => {
            format!("invalid value for URL parameter '{param}'")
        }
        other => other.to_string(),
    })
}

/// The server's flavour and version, from `SELECT VERSION()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Mariadb { major: u16, minor: u16 },
    Mysql { major: u16, minor: u16, patch: u16 },
}

impl Flavor {
    pub fn detect(version: &str) -> Flavor {
        let mut numbers = version
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u16>().unwrap_or(0));
        let (major, minor, patch) = (
            numbers.next().unwrap_or(0),
            numbers.next().unwrap_or(0),
            numbers.next().unwrap_or(0),
        );
        if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::Mariadb { major, minor }
        } else {
            Flavor::Mysql {
                major,
                minor,
                patch,
            }
        }
    }

    pub fn gtid_flavor(self) -> pb::GtidFlavor {
        match self {
            Flavor::Mariadb { .. } => pb::GtidFlavor::Mariadb,
            Flavor::Mysql { .. } => pb::GtidFlavor::Mysql,
        }
    }
}

/// The `wait_timeout` of a held session for a lease of `ttl`: the server
/// ends it (and its lock) that long after the agent last spoke.
fn wait_timeout(ttl: Duration) -> String {
    let seconds = (ttl + SERVER_GRACE).as_secs_f64().ceil() as u64;
    format!("SET SESSION wait_timeout = {seconds}")
}

/// The statements used for one flavour and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements {
    /// Session settings of the freeze session (run when it is opened,
    /// ahead of the freeze): the bounds on the lock wait.
    pub session: Vec<String>,
    /// Run in order on the held session to freeze.
    pub freeze: Vec<String>,
    pub thaw: &'static str,
    /// Replica status; empty result = not a replica.
    pub replica_status: &'static str,
    /// Upstream host and port columns of `replica_status`.
    pub upstream_columns: (&'static str, &'static str),
    /// Binlog coordinates (File, Position).
    pub binlog_status: &'static str,
    /// `SELECT f(?, ?)`: wait for a GTID set with a timeout in seconds.
    pub wait: &'static str,
    /// The wait function's result on success.
    pub wait_ok: i64,
}

/// Chooses the statements for a server, with the lock bound in seconds.
pub fn statements(flavor: Flavor, lock_wait_seconds: u64) -> Result<Statements, String> {
    let lock_wait = lock_wait_seconds.max(1);
    match flavor {
        Flavor::Mariadb { major, minor } => {
            if (major, minor) < (10, 4) {
                return Err(format!(
                    "MariaDB {major}.{minor} is not supported (BACKUP STAGE needs 10.4 or newer)"
                ));
            }
            Ok(Statements {
                session: vec![
                    format!("SET SESSION lock_wait_timeout = {lock_wait}"),
                    format!("SET SESSION max_statement_time = {lock_wait}"),
                ],
                freeze: vec![
                    "BACKUP STAGE START".into(),
                    "BACKUP STAGE BLOCK_COMMIT".into(),
                ],
                thaw: "BACKUP STAGE END",
                replica_status: "SHOW SLAVE STATUS",
                upstream_columns: ("Master_Host", "Master_Port"),
                binlog_status: "SHOW MASTER STATUS",
                wait: "SELECT MASTER_GTID_WAIT(?, ?)",
                wait_ok: 0,
            })
        }
        Flavor::Mysql {
            major,
            minor,
            patch,
        } => {
            if major < 8 {
                return Err(format!(
                    "MySQL {major}.{minor} is not supported (8.0 or newer is needed)"
                ));
            }
            let new_replica_words = (major, minor, patch) >= (8, 0, 22);
            Ok(Statements {
                session: vec![format!("SET SESSION lock_wait_timeout = {lock_wait}")],
                freeze: vec!["FLUSH TABLES WITH READ LOCK".into()],
                thaw: "UNLOCK TABLES",
                replica_status: if new_replica_words {
                    "SHOW REPLICA STATUS"
                } else {
                    "SHOW SLAVE STATUS"
                },
                upstream_columns: if new_replica_words {
                    ("Source_Host", "Source_Port")
                } else {
                    ("Master_Host", "Master_Port")
                },
                binlog_status: if (major, minor) >= (8, 2) {
                    "SHOW BINARY LOG STATUS"
                } else {
                    "SHOW MASTER STATUS"
                },
                wait: "SELECT WAIT_FOR_EXECUTED_GTID_SET(?, ?)",
                wait_ok: 0,
            })
        }
    }
}

/// The server variables naming where it keeps what crash recovery needs.
pub const PATH_VARIABLES: &[&str] = &[
    "datadir",
    "log_bin_basename",
    "log_bin_index",
    "relay_log_basename",
    "relay_log_index",
    "innodb_log_group_home_dir",
    "innodb_data_home_dir",
    "innodb_undo_directory",
];

/// Absolute server paths from the values of [`PATH_VARIABLES`] (in order;
/// `None`: the feature is off). Relative values are relative to `datadir`;
/// an empty one means `datadir` itself.
pub fn server_paths(values: &[Option<String>]) -> Vec<pb::ServerPath> {
    let datadir = values
        .first()
        .cloned()
        .flatten()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    PATH_VARIABLES
        .iter()
        .zip(values)
        .filter_map(|(name, value)| {
            let value = value.as_deref()?.trim();
            let path = match value.trim_end_matches('/') {
                _ if value.starts_with('/') => value.trim_end_matches('/').to_string(),
                "" | "." => datadir.clone(),
                relative => format!(
                    "{datadir}/{}",
                    relative.trim_start_matches("./").trim_end_matches('/')
                ),
            };
            Some(super::server_path(*name, path))
        })
        .collect()
}

/// Reads `gtid_executed`, `binary_log_file` and `binary_log_position` from
/// the `LOCAL` column of `performance_schema.log_status`.
pub fn parse_log_status(local: &str) -> Result<(String, String, u64), String> {
    let value: serde_json::Value =
        serde_json::from_str(local).map_err(|e| format!("log_status.LOCAL is not JSON: {e}"))?;
    let gtid = value["gtid_executed"].as_str().unwrap_or_default();
    // MySQL prints long sets over several lines.
    let gtid: String = gtid.split_whitespace().collect();
    let file = value["binary_log_file"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pos = value["binary_log_position"].as_u64().unwrap_or(0);
    Ok((gtid, file, pos))
}

fn my_error(e: &mysql_async::Error) -> (Cause, String) {
    match e {
        mysql_async::Error::Server(s) => {
            let cause = match s.code {
                // lock wait timeout, statement time exceeded (MariaDB, MySQL)
                1205 | 1969 | 3024 => Cause::Timeout,
                // access denied, unknown database
                1044 | 1045 | 1049 => Cause::Unavailable,
                _ => Cause::Refused,
            };
            (
                cause,
                format!("ERROR {} ({}): {}", s.code, s.state, s.message),
            )
        }
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => (Cause::Lost, e.to_string()),
        other => (Cause::Unavailable, other.to_string()),
    }
}

/// A session opened by prepare, with what it learnt about the server, so
/// the freeze spends its round trips on the lock only.
#[derive(Debug)]
struct Prepared {
    conn: Conn,
    flavor: Flavor,
    statements: Statements,
    role: pb::Role,
    /// The binary log's coordinates can be read (`binlog_status` needs a
    /// privilege the GTID set does not): probed when a freeze session
    /// opens, so that the freeze's one round trip does not fail on it.
    binlog_visible: bool,
}

#[derive(Debug)]
pub struct Mysql {
    ctx: Ctx,
    dsn: Option<Secret>,
    connect_timeout: Duration,
    lock_timeout: Duration,
    poll_interval: Duration,
    hold_check_interval: Duration,
    /// The longest lease: the freeze session's server-side bound until
    /// the freeze sets the lease's own.
    prepared_expiry: Duration,
    control: Mutex<Option<Conn>>,
    /// A session opened ahead of the freeze (by prepare), so the freeze
    /// does not pay for connecting.
    spare: Mutex<Option<Prepared>>,
    /// The session replica waits run on, kept between backups (and opened
    /// at prepare) so an alignment costs no connection.
    wait: Mutex<Option<Prepared>>,
}

impl Mysql {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        Mysql {
            ctx,
            dsn: config.dsn.clone(),
            connect_timeout: config.connect_timeout,
            lock_timeout: config.lock_timeout,
            poll_interval: config.poll_interval,
            hold_check_interval: config.hold_check_interval,
            prepared_expiry: config.prepared_expiry,
            control: Mutex::new(None),
            spare: Mutex::new(None),
            wait: Mutex::new(None),
        }
    }

    fn err(&self, step: Step, e: &mysql_async::Error) -> EngineError {
        let (cause, message) = my_error(e);
        self.ctx.err(step, cause, message)
    }

    fn opts(&self) -> Result<OptsBuilder, EngineError> {
        let dsn = self.dsn.as_ref().ok_or_else(|| {
            self.ctx.err(
                Step::Connect,
                Cause::Invalid,
                "no connection string configured",
            )
        })?;
        let opts =
            parse_dsn(dsn.expose()).map_err(|e| self.ctx.err(Step::Connect, Cause::Invalid, e))?;
        Ok(OptsBuilder::from_opts(opts).prefer_socket(false))
    }

    async fn connect(&self, step: Step) -> Result<Conn, EngineError> {
        connect(&self.ctx, self.opts()?, self.connect_timeout, step).await
    }

    fn lock_error(&self, e: &mysql_async::Error) -> EngineError {
        let mut err = self.err(Step::Freeze, e);
        if err.cause == Cause::Timeout {
            err.message = format!(
                "{} (the lock was not granted within {} s, {ENV_LOCK_TIMEOUT})",
                err.message,
                self.lock_timeout.as_secs_f64().ceil()
            );
        }
        err
    }

    /// The freeze session's settings: the lock wait bounds, and a
    /// `wait_timeout` of the longest lease, so that the server ends the
    /// session (and any lock it holds) if this agent goes silent.
    fn session_settings(&self, statements: &Statements) -> Vec<String> {
        let mut settings = statements.session.clone();
        settings.push(wait_timeout(self.prepared_expiry));
        settings
    }

    /// A new freeze session: bounded lock waits, flavour and role known.
    async fn freeze_session(&self, step: Step) -> Result<Prepared, EngineError> {
        let mut p = self.session(step).await?;
        for setting in self.session_settings(&p.statements) {
            p.conn
                .query_drop(setting)
                .await
                .map_err(|e| self.err(step, &e))?;
        }
        p.binlog_visible = binlog_visible(&mut p.conn, &p.statements).await;
        Ok(p)
    }

    /// A new session for replica waits: flavour and role known, and
    /// whether it may read the binary log's coordinates.
    async fn wait_session(&self, step: Step) -> Result<Prepared, EngineError> {
        let mut p = self.session(step).await?;
        p.binlog_visible = binlog_visible(&mut p.conn, &p.statements).await;
        Ok(p)
    }

    /// A new session that knows the server's flavour and role.
    async fn session(&self, step: Step) -> Result<Prepared, EngineError> {
        let mut conn = self.connect(step).await?;
        let (flavor, statements) = self.statements_for(&mut conn, step).await?;
        let (role, _) = self.role(&mut conn, &statements, step).await?;
        Ok(Prepared {
            conn,
            flavor,
            statements,
            role,
            binlog_visible: false,
        })
    }

    async fn flavor(conn: &mut Conn) -> Result<Flavor, mysql_async::Error> {
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await?
            .unwrap_or_default();
        Ok(Flavor::detect(&version))
    }

    async fn statements_for(
        &self,
        conn: &mut Conn,
        step: Step,
    ) -> Result<(Flavor, Statements), EngineError> {
        let flavor = Self::flavor(conn).await.map_err(|e| self.err(step, &e))?;
        let statements = statements(flavor, self.lock_timeout.as_secs_f64().ceil() as u64)
            .map_err(|e| self.ctx.err(step, Cause::Refused, e))?;
        Ok((flavor, statements))
    }

    /// Role and upstream from the replica status.
    async fn role(
        &self,
        conn: &mut Conn,
        s: &Statements,
        step: Step,
    ) -> Result<(pb::Role, String), EngineError> {
        let rows: Vec<Row> = conn
            .query(s.replica_status)
            .await
            .map_err(|e| self.err(step, &e))?;
        Ok(match rows.first() {
            None => (pb::Role::Primary, String::new()),
            Some(row) => {
                let host: Option<String> = row.get_opt(s.upstream_columns.0).and_then(Result::ok);
                let port: Option<String> = row.get_opt(s.upstream_columns.1).and_then(Result::ok);
                (
                    pb::Role::Replica,
                    format!("{}:{}", host.unwrap_or_default(), port.unwrap_or_default()),
                )
            }
        })
    }

    async fn read_position(
        &self,
        conn: &mut Conn,
        step: Step,
    ) -> Result<(pb::Position, pb::Role), EngineError> {
        let (flavor, s) = self.statements_for(conn, step).await?;
        let (role, _) = self.role(conn, &s, step).await?;
        let position = self.position_as(conn, flavor, &s, role, step).await?;
        Ok((position, role))
    }

    /// The position, for a server whose flavour and role are known.
    async fn position_as(
        &self,
        conn: &mut Conn,
        flavor: Flavor,
        s: &Statements,
        role: pb::Role,
        step: Step,
    ) -> Result<pb::Position, EngineError> {
        let q = |e: mysql_async::Error| self.err(step, &e);
        let (gtid, file, pos) = match flavor {
            Flavor::Mariadb { .. } => {
                let gtid: String = if role == pb::Role::Replica {
                    conn.query_first("SELECT @@gtid_slave_pos")
                        .await
                        .map_err(q)?
                } else {
                    conn.query_first("SELECT @@gtid_binlog_pos")
                        .await
                        .map_err(q)?
                }
                .unwrap_or_default();
                let (file, pos) = binlog_coordinates(conn, s.binlog_status).await;
                (gtid, file, pos)
            }
            Flavor::Mysql { .. } => {
                let local: Result<Option<String>, _> = conn
                    .query_first("SELECT CAST(LOCAL AS CHAR) FROM performance_schema.log_status")
                    .await;
                match local {
                    Ok(Some(local)) => parse_log_status(&local)
                        .map_err(|e| self.ctx.err(step, Cause::Refused, e))?,
                    // log_status needs BACKUP_ADMIN; fall back to two reads.
                    _ => {
                        let gtid: String = conn
                            .query_first("SELECT @@GLOBAL.gtid_executed")
                            .await
                            .map_err(q)?
                            .unwrap_or_default();
                        let (file, pos) = binlog_coordinates(conn, s.binlog_status).await;
                        (gtid.split_whitespace().collect(), file, pos)
                    }
                }
            }
        };
        Ok(make::gtid(flavor.gtid_flavor(), &gtid, &file, pos))
    }

    async fn with_control<T>(
        &self,
        step: Step,
        f: impl AsyncFnOnce(&Self, &mut Conn) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut guard = self.control.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect(step).await?);
        }
        let result = f(self, guard.as_mut().expect("connected")).await;
        if result.as_ref().is_err_and(|e| e.cause == Cause::Lost) {
            *guard = None;
        }
        result
    }
}

async fn connect(
    ctx: &Ctx,
    opts: OptsBuilder,
    bound: Duration,
    step: Step,
) -> Result<Conn, EngineError> {
    match tokio::time::timeout(bound, Conn::new(opts)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            let (_, message) = my_error(&e);
            Err(ctx.err(
                step,
                Cause::Unavailable,
                format!("cannot connect: {message}"),
            ))
        }
        Err(_) => Err(ctx.err(
            step,
            Cause::Unavailable,
            format!(
                "cannot connect within {} ms (STILLPOINT_CONNECT_TIMEOUT)",
                bound.as_millis()
            ),
        )),
    }
}

async fn binlog_coordinates(conn: &mut Conn, statement: &str) -> (String, u64) {
    match conn.query_first::<Row, _>(statement).await {
        Ok(Some(row)) => coordinates_of(&row),
        // No binary log, or no privilege to see it: the GTID set still orders.
        _ => (String::new(), 0),
    }
}

/// The (File, Position) of a binary log status row.
fn coordinates_of(row: &Row) -> (String, u64) {
    (
        row.get_opt::<String, _>("File")
            .and_then(Result::ok)
            .unwrap_or_default(),
        row.get_opt::<u64, _>("Position")
            .and_then(Result::ok)
            .unwrap_or(0),
    )
}

/// Whether this session may read the binary log's coordinates.
async fn binlog_visible(conn: &mut Conn, s: &Statements) -> bool {
    conn.query_drop(s.binlog_status).await.is_ok()
}

/// The redo log's current and flushed LSNs (MariaDB's status variables).
const REDO_LSNS: &str =
    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_lsn_current', 'Innodb_lsn_flushed')";

/// Whether `Innodb_lsn_flushed` has reached `Innodb_lsn_current` in the
/// rows of [`REDO_LSNS`]; `None` when the server reports neither.
fn redo_flushed(rows: &[(String, u64)]) -> Option<bool> {
    let lsn = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    Some(lsn("Innodb_lsn_flushed")? >= lsn("Innodb_lsn_current")?)
}

/// MariaDB's whole freeze as one multi-statement text: the lease's bound
/// on the session, the backup stages, then (commits blocked) the
/// position and the redo log's LSNs, read in the same round trip.
fn mariadb_freeze_sql(
    s: &Statements,
    role: pb::Role,
    binlog_visible: bool,
    ttl: Duration,
) -> String {
    let mut sql = vec![wait_timeout(ttl)];
    sql.extend(s.freeze.iter().cloned());
    sql.push(gtid_select(role).into());
    if binlog_visible {
        sql.push(s.binlog_status.into());
    }
    sql.push(REDO_LSNS.into());
    sql.join("; ")
}

/// What MariaDB's one-round-trip freeze read once its stages were taken.
#[derive(Debug, Default, PartialEq, Eq)]
struct FreezeRead {
    gtid: String,
    coordinates: (String, u64),
    /// Every redo record written was flushed (`None`: not reported).
    redo_flushed: Option<bool>,
}

impl FreezeRead {
    /// Reads the rows of every result set of [`mariadb_freeze_sql`],
    /// telling them apart by their columns.
    fn of(sets: &[Vec<Row>]) -> FreezeRead {
        let mut read = FreezeRead::default();
        let mut lsns = Vec::new();
        for row in sets.iter().flatten() {
            let has = |name: &str| row.columns_ref().iter().any(|c| c.name_str() == name);
            if has("gtid") {
                read.gtid = row.get_opt(0).and_then(Result::ok).unwrap_or_default();
            } else if has("File") {
                read.coordinates = coordinates_of(row);
            } else if has("Variable_name") {
                let name: Option<String> = row.get_opt(0).and_then(Result::ok);
                let value: Option<u64> = row.get_opt(1).and_then(Result::ok);
                lsns.extend(name.zip(value));
            }
        }
        read.redo_flushed = redo_flushed(&lsns);
        read
    }
}

impl FreezeRead {
    fn position(&self, flavor: Flavor) -> pb::Position {
        let (file, pos) = &self.coordinates;
        make::gtid(flavor.gtid_flavor(), &self.gtid, file, *pos)
    }
}

/// The `SELECT` of a member's own GTID set, named `gtid`.
fn gtid_select(role: pb::Role) -> &'static str {
    match role {
        pb::Role::Replica => "SELECT @@gtid_slave_pos AS gtid",
        _ => "SELECT @@gtid_binlog_pos AS gtid",
    }
}

/// A GTID set MariaDB's text protocol can carry as a literal: its sets are
/// digits, dashes and commas; anything else goes as a parameter.
fn mariadb_gtid_literal(set: &str) -> bool {
    set.chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '-' | ',' | ' '))
}

/// MariaDB's replica wait and, in the same round trip, where the replica
/// then stands.
fn mariadb_wait_sql(p: &Prepared, set: &str, seconds: f64) -> String {
    let mut sql = vec![
        format!("SELECT MASTER_GTID_WAIT('{set}', {seconds}) AS waited"),
        gtid_select(p.role).to_string(),
    ];
    if p.binlog_visible {
        sql.push(p.statements.binlog_status.into());
    }
    sql.join("; ")
}

/// Waits on `p` for GTID set `set` at most `seconds`: the wait function's
/// result and, on MariaDB, the position read in the same round trip (on
/// MySQL the caller reads it).
async fn wait_as(
    p: &mut Prepared,
    set: &str,
    seconds: f64,
) -> Result<(Option<i64>, Option<FreezeRead>), mysql_async::Error> {
    if !(matches!(p.flavor, Flavor::Mariadb { .. }) && mariadb_gtid_literal(set)) {
        let result = p
            .conn
            .exec_first(p.statements.wait, (set.to_string(), seconds))
            .await?;
        return Ok((result, None));
    }
    let sql = mariadb_wait_sql(p, set, seconds);
    let sets = query_sets(&mut p.conn, &sql).await?;
    let waited = sets
        .iter()
        .flatten()
        .find(|r| r.columns_ref().iter().any(|c| c.name_str() == "waited"))
        .and_then(|r| r.get_opt::<Option<i64>, _>(0).and_then(Result::ok))
        .flatten();
    Ok((waited, Some(FreezeRead::of(&sets))))
}

/// Runs a multi-statement text and collects every result set's rows.
async fn query_sets(conn: &mut Conn, sql: &str) -> Result<Vec<Vec<Row>>, mysql_async::Error> {
    let mut result = conn.query_iter(sql).await?;
    let mut sets = Vec::new();
    loop {
        sets.push(result.collect::<Row>().await?);
        if result.is_empty() {
            break;
        }
    }
    // What is left (nothing, or a statement's error) ends the query.
    result.drop_result().await?;
    Ok(sets)
}

#[async_trait]
impl Engine for Mysql {
    fn kind(&self) -> EngineKind {
        EngineKind::Mysql
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        self.with_control(Step::Describe, async |this, conn| {
            let version: String = conn
                .query_first("SELECT VERSION()")
                .await
                .map_err(|e| this.err(Step::Describe, &e))?
                .unwrap_or_default();
            let (_, s) = this.statements_for(conn, Step::Describe).await?;
            let (role, upstream) = this.role(conn, &s, Step::Describe).await?;
            let select = PATH_VARIABLES
                .iter()
                .map(|v| format!("@@{v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let row: Option<Row> = conn
                .query_first(format!("SELECT {select}"))
                .await
                .map_err(|e| this.err(Step::Describe, &e))?;
            let values: Vec<Option<String>> = (0..PATH_VARIABLES.len())
                .map(|i| {
                    row.as_ref()
                        .and_then(|r| r.get_opt::<Option<String>, _>(i))
                        .and_then(Result::ok)
                        .flatten()
                })
                .collect();
            let (name, engine) = match Flavor::detect(&version) {
                Flavor::Mariadb { .. } => ("MariaDB", pb::Engine::Mariadb),
                Flavor::Mysql { .. } => ("MySQL", pb::Engine::Mysql),
            };
            Ok(Description {
                engine: Some(engine),
                server_version: format!("{name} {version}"),
                role,
                upstream,
                capabilities: pb::Capabilities {
                    blocks_writes: true,
                    wait_for_position: true,
                    thaw_artefacts: false,
                },
                paths: server_paths(&values),
                ..Default::default()
            })
        })
        .await
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        self.with_control(Step::Position, async |this, conn| {
            this.read_position(conn, Step::Position).await
        })
        .await
    }

    async fn prepare(&self, _backup_id: &str, _atomic_cut: bool) -> Result<String, EngineError> {
        let mut conn = self.connect(Step::Prepare).await?;
        // Closing idle tables now makes the lock that follows quicker.
        conn.query_drop("FLUSH NO_WRITE_TO_BINLOG TABLES")
            .await
            .map_err(|e| self.err(Step::Prepare, &e))?;
        let (flavor, statements) = self.statements_for(&mut conn, Step::Prepare).await?;
        let (role, _) = self.role(&mut conn, &statements, Step::Prepare).await?;
        for setting in self.session_settings(&statements) {
            conn.query_drop(setting)
                .await
                .map_err(|e| self.err(Step::Prepare, &e))?;
        }
        let binlog_visible = binlog_visible(&mut conn, &statements).await;
        *self.spare.lock().await = Some(Prepared {
            conn,
            flavor,
            statements,
            role,
            binlog_visible,
        });
        let mut wait = self.wait.lock().await;
        if wait.is_none() {
            *wait = Some(self.wait_session(Step::Prepare).await?);
        }
        Ok("tables flushed; freeze and wait sessions open".into())
    }

    async fn freeze(
        &self,
        _backup_id: &str,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let spare = self.spare.lock().await.take();
        let mut prepared = match spare {
            Some(p) => p,
            None => self.freeze_session(Step::Freeze).await?,
        };
        // The lease's bound on the session and every stage of the freeze
        // go in one round trip (the server stops at the first that fails,
        // and the thaw then ends any stage taken); on MariaDB the position
        // and the redo log's LSNs are read in it too. A prepared session
        // the server closed meanwhile fails it without locking anything:
        // then once more, anew.
        let mariadb = matches!(prepared.flavor, Flavor::Mariadb { .. });
        let sql = |p: &Prepared| match mariadb {
            true => mariadb_freeze_sql(&p.statements, p.role, p.binlog_visible, ttl),
            false => format!("{}; {}", wait_timeout(ttl), p.statements.freeze.join("; ")),
        };
        let text = sql(&prepared);
        let sets = match query_sets(&mut prepared.conn, &text).await {
            Ok(sets) => sets,
            Err(e) if matches!(e, mysql_async::Error::Server(_)) => {
                let _ = prepared.conn.query_drop(prepared.statements.thaw).await;
                return Err(self.lock_error(&e));
            }
            Err(_) => {
                prepared = self.freeze_session(Step::Freeze).await?;
                let text = sql(&prepared);
                query_sets(&mut prepared.conn, &text)
                    .await
                    .map_err(|e| self.lock_error(&e))?
            }
        };
        let read = FreezeRead::of(&sets);
        let Prepared {
            mut conn,
            flavor,
            statements: s,
            role,
            ..
        } = prepared;
        let position = match mariadb {
            true => read.position(flavor),
            false => match self
                .position_as(&mut conn, flavor, &s, role, Step::Freeze)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = conn.query_drop(s.thaw).await;
                    return Err(e);
                }
            },
        };
        tracing::info!(connection_id = conn.id(), "lock held by this session");
        let target = (self.ctx.clone(), self.opts()?, self.connect_timeout);
        let (conn_id, interval) = (conn.id(), self.hold_check_interval);
        let monitor = HoldMonitor::spawn(move |lost| monitor(target, conn_id, interval, lost));
        Ok(Box::new(MyHold {
            ctx: self.ctx.clone(),
            conn,
            thaw: s.thaw,
            position,
            monitor,
            redo_flushed: read.redo_flushed == Some(true),
        }))
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        let Some(pb::position::Kind::Gtid(want)) = &target.kind else {
            return Err(self.ctx.err(
                Step::Wait,
                Cause::Invalid,
                format!(
                    "a MySQL/MariaDB member cannot wait for a {} position",
                    target.kind_name()
                ),
            ));
        };
        let cached = self.wait.lock().await.take();
        let mut session = match cached {
            Some(session) => session,
            None => self.wait_session(Step::Wait).await?,
        };
        if session.flavor.gtid_flavor() as i32 != want.flavor {
            return Err(self.ctx.err(
                Step::Wait,
                Cause::Invalid,
                "the target GTID is of the other flavour (MySQL vs MariaDB)",
            ));
        }
        let started = Instant::now();
        let seconds = timeout.as_secs_f64();
        let (result, read) = match wait_as(&mut session, &want.gtid_set, seconds).await {
            Ok(r) => r,
            // The kept session was closed while idle: once more, anew.
            Err(e) if !matches!(e, mysql_async::Error::Server(_)) => {
                session = self.wait_session(Step::Wait).await?;
                wait_as(&mut session, &want.gtid_set, seconds)
                    .await
                    .map_err(|e| self.err(Step::Wait, &e))?
            }
            Err(e) => return Err(self.err(Step::Wait, &e)),
        };
        let Prepared {
            mut conn,
            flavor,
            statements: s,
            role,
            binlog_visible,
        } = session;
        let position = match read {
            Some(read) => read.position(flavor),
            None => {
                self.position_as(&mut conn, flavor, &s, role, Step::Wait)
                    .await?
            }
        };
        *self.wait.lock().await = Some(Prepared {
            conn,
            flavor,
            statements: s.clone(),
            role,
            binlog_visible,
        });
        if result == Some(s.wait_ok) {
            return Ok(position);
        }
        // A NULL or a timeout: say where the replica is.
        let _ = self.poll_interval;
        Err(self.ctx.err(
            Step::Wait,
            Cause::Timeout,
            format!(
                "replica at {} did not reach gtid '{}' within {} ms (is replication running?)",
                position.display(),
                want.gtid_set,
                started.elapsed().as_millis()
            ),
        ))
    }
}

/// Reports through `lost` when the held session (`conn_id`) leaves the
/// process list, or the server stops answering.
async fn monitor(
    (ctx, opts, bound): (Ctx, OptsBuilder, Duration),
    conn_id: u32,
    interval: Duration,
    lost: oneshot::Sender<String>,
) {
    let mut conn = match connect(&ctx, opts, bound, Step::Hold).await {
        Ok(conn) => conn,
        Err(e) => {
            let _ = lost.send(format!("cannot watch the held session: {}", e.message));
            return;
        }
    };
    loop {
        tokio::time::sleep(interval).await;
        let present = tokio::time::timeout(
            bound,
            conn.exec_first::<u64, _, _>(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?",
                (conn_id,),
            ),
        )
        .await;
        let Ok(present) = present else {
            let _ = lost.send(format!(
                "the server did not answer within {} ms",
                bound.as_millis()
            ));
            return;
        };
        match present {
            Ok(Some(n)) if n > 0 => {}
            Ok(_) => {
                let _ = lost.send(format!(
                    "the held session (connection id {conn_id}) is gone (killed?); the server released its lock"
                ));
                return;
            }
            Err(e) => {
                let _ = lost.send(format!("the server stopped answering: {}", my_error(&e).1));
                return;
            }
        }
    }
}

#[derive(Debug)]
struct MyHold {
    ctx: Ctx,
    conn: Conn,
    thaw: &'static str,
    position: pb::Position,
    monitor: HoldMonitor,
    /// The redo log was flushed when the freeze blocked commits (read in
    /// the freeze's round trip): a flush has nothing left to do.
    redo_flushed: bool,
}

#[async_trait]
impl Frozen for MyHold {
    fn position(&self) -> pb::Position {
        self.position.clone()
    }

    async fn lost(&mut self) -> EngineError {
        self.monitor.lost(&self.ctx).await
    }

    /// Restarts the held session's server-side bound for the new lease
    /// (set first with the freeze): the server closes a session idle for
    /// `wait_timeout` seconds, which releases its lock even if this agent
    /// can no longer reach it.
    async fn renewed(&mut self, ttl: Duration) -> Result<(), EngineError> {
        self.conn.query_drop(wait_timeout(ttl)).await.map_err(|e| {
            let (cause, message) = my_error(&e);
            let cause = match cause {
                Cause::Unavailable => Cause::Lost,
                other => other,
            };
            self.ctx
                .err(Step::Hold, cause, format!("renewing the hold: {message}"))
        })
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        // Commits are blocked; this writes and syncs the redo log (which
        // `innodb_flush_log_at_trx_commit = 0|2` leaves to a timer). The
        // binary log is written at commit: the agent's syncfs covers it
        // whatever `sync_binlog` is. MariaDB says when the redo log is
        // flushed already; then there is nothing to do. Read once commits
        // were blocked, that answer holds for every later flush of the
        // hold: no commit has written redo since.
        if self.redo_flushed {
            return Ok("redo log already flushed".into());
        }
        let lsns: Vec<(String, u64)> = self.conn.query(REDO_LSNS).await.unwrap_or_default();
        if redo_flushed(&lsns) == Some(true) {
            return Ok("redo log already flushed".into());
        }
        self.conn
            .query_drop("FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS")
            .await
            .map_err(|e| {
                let (cause, message) = my_error(&e);
                self.ctx.err(Step::Flush, cause, message)
            })?;
        Ok("FLUSH ENGINE LOGS".into())
    }

    async fn thaw(self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        let MyHold {
            ctx,
            mut conn,
            thaw,
            monitor,
            ..
        } = *self;
        drop(monitor);
        let result = conn.query_drop(thaw).await;
        // Writes flow again; closing the session need not be waited for.
        tokio::spawn(async move {
            let _ = conn.disconnect().await;
        });
        result.map_err(|e| {
            let (cause, message) = my_error(&e);
            ctx.err(Step::Thaw, cause, message)
        })?;
        Ok(Thawed::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_freezes_and_reads_in_one_text_and_skips_what_it_may_not_read() {
        let s = statements(
            Flavor::Mariadb {
                major: 10,
                minor: 11,
            },
            5,
        )
        .unwrap();
        let ttl = Duration::from_secs(30);
        let primary = mariadb_freeze_sql(&s, pb::Role::Primary, true, ttl);
        let expected = format!(
            "{}; BACKUP STAGE START; BACKUP STAGE BLOCK_COMMIT; SELECT @@gtid_binlog_pos AS gtid; \
             SHOW MASTER STATUS; {REDO_LSNS}",
            wait_timeout(ttl)
        );
        assert_eq!(primary, expected);
        let replica = mariadb_freeze_sql(&s, pb::Role::Replica, false, ttl);
        assert!(
            replica.contains("SELECT @@gtid_slave_pos AS gtid"),
            "{replica}"
        );
        assert!(!replica.contains("SHOW MASTER STATUS"), "{replica}");
        // The stages come before any read: what is read is where commits stopped.
        assert!(replica.find("BLOCK_COMMIT") < replica.find("gtid_slave_pos"));
    }

    #[test]
    fn only_a_set_of_digits_dashes_and_commas_goes_into_the_text_of_a_wait() {
        assert!(mariadb_gtid_literal("0-1-3,1-2-40"));
        assert!(mariadb_gtid_literal(""));
        for hostile in ["0-1-3'); DROP TABLE t; --", "0-1-3\\", "3E11FA47-71CA:1-5"] {
            assert!(!mariadb_gtid_literal(hostile), "{hostile}");
        }
    }

    #[test]
    fn the_redo_log_is_flushed_only_when_the_server_says_so() {
        let rows = |current: u64, flushed: u64| {
            vec![
                ("Innodb_lsn_current".to_string(), current),
                ("Innodb_lsn_flushed".to_string(), flushed),
            ]
        };
        assert_eq!(redo_flushed(&rows(100, 100)), Some(true));
        assert_eq!(redo_flushed(&rows(100, 120)), Some(true));
        assert_eq!(redo_flushed(&rows(120, 100)), Some(false));
        assert_eq!(
            redo_flushed(&rows(1, 1)[..1]),
            None,
            "one of the two is not proof"
        );
        assert_eq!(redo_flushed(&[]), None);
    }

    #[test]
    fn flavours_are_detected() {
        assert_eq!(
            Flavor::detect("10.11.19-MariaDB-0+deb12u1-log"),
            Flavor::Mariadb {
                major: 10,
                minor: 11
            }
        );
        assert_eq!(
            Flavor::detect("8.0.36"),
            Flavor::Mysql {
                major: 8,
                minor: 0,
                patch: 36
            }
        );
        assert_eq!(
            Flavor::detect("8.4.2-commercial"),
            Flavor::Mysql {
                major: 8,
                minor: 4,
                patch: 2
            }
        );
    }

    #[test]
    fn mariadb_uses_backup_stages() {
        let s = statements(
            Flavor::Mariadb {
                major: 10,
                minor: 11,
            },
            5,
        )
        .unwrap();
        assert_eq!(
            s.session,
            vec![
                "SET SESSION lock_wait_timeout = 5",
                "SET SESSION max_statement_time = 5",
            ]
        );
        assert_eq!(
            s.freeze,
            vec!["BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"]
        );
        assert_eq!(s.thaw, "BACKUP STAGE END");
        assert_eq!(s.wait, "SELECT MASTER_GTID_WAIT(?, ?)");
        assert!(
            statements(
                Flavor::Mariadb {
                    major: 10,
                    minor: 3
                },
                5
            )
            .is_err()
        );
    }

    #[test]
    fn mysql_uses_a_global_read_lock_and_version_specific_status() {
        let old = statements(
            Flavor::Mysql {
                major: 8,
                minor: 0,
                patch: 21,
            },
            3,
        )
        .unwrap();
        assert_eq!(old.session, vec!["SET SESSION lock_wait_timeout = 3"]);
        assert_eq!(old.freeze, vec!["FLUSH TABLES WITH READ LOCK"]);
        assert_eq!(old.thaw, "UNLOCK TABLES");
        assert_eq!(old.replica_status, "SHOW SLAVE STATUS");
        assert_eq!(old.binlog_status, "SHOW MASTER STATUS");
        assert_eq!(old.wait, "SELECT WAIT_FOR_EXECUTED_GTID_SET(?, ?)");
        let mid = statements(
            Flavor::Mysql {
                major: 8,
                minor: 0,
                patch: 22,
            },
            3,
        )
        .unwrap();
        assert_eq!(mid.replica_status, "SHOW REPLICA STATUS");
        assert_eq!(mid.upstream_columns, ("Source_Host", "Source_Port"));
        assert_eq!(mid.binlog_status, "SHOW MASTER STATUS");
        let new = statements(
            Flavor::Mysql {
                major: 8,
                minor: 4,
                patch: 0,
            },
            3,
        )
        .unwrap();
        assert_eq!(new.binlog_status, "SHOW BINARY LOG STATUS");
        assert!(
            statements(
                Flavor::Mysql {
                    major: 5,
                    minor: 7,
                    patch: 0
                },
                3
            )
            .is_err()
        );
        // A sub-second bound still waits at least a second (the server's unit).
        let s = statements(
            Flavor::Mysql {
                major: 8,
                minor: 4,
                patch: 0,
            },
            0,
        )
        .unwrap();
        assert_eq!(s.session[0], "SET SESSION lock_wait_timeout = 1");
    }

    #[test]
    fn server_paths_are_absolute() {
        let some = |v: &str| Some(v.to_string());
        let paths = server_paths(&[
            some("/var/lib/mysql/"),
            some("/var/log/mysql/binlog"),
            some("/var/log/mysql/binlog.index"),
            None,
            None,
            some("./"),
            some(""),
            some("undo/"),
        ]);
        let got: Vec<(&str, &str)> = paths
            .iter()
            .map(|p| (p.what.as_str(), p.path.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("datadir", "/var/lib/mysql"),
                ("log_bin_basename", "/var/log/mysql/binlog"),
                ("log_bin_index", "/var/log/mysql/binlog.index"),
                ("innodb_log_group_home_dir", "/var/lib/mysql"),
                ("innodb_data_home_dir", "/var/lib/mysql"),
                ("innodb_undo_directory", "/var/lib/mysql/undo"),
            ]
        );
    }

    #[test]
    fn log_status_is_parsed() {
        let local = r#"{"gtid_executed": "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-77,\n4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3", "binary_log_file": "binlog.000003", "binary_log_position": 1522}"#;
        let (gtid, file, pos) = parse_log_status(local).unwrap();
        assert_eq!(
            gtid,
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-77,4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3"
        );
        assert_eq!(file, "binlog.000003");
        assert_eq!(pos, 1522);
    }
}
