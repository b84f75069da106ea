//! Engines: how one kind of member is prepared, frozen, held and thawed.
//!
//! The [`Engine`] trait is where the world varies; the lease, renewal and
//! ownership rules around a freeze live in [`crate::hold`] and are the same
//! for every engine.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_proto::pb;

use crate::config::Config;

pub mod exec;
pub mod fsfreeze;
pub mod mongodb;
pub mod mysql;
pub mod noop;
pub mod postgres;
pub mod redis;
pub(crate) mod sys;

/// The kinds of member an agent can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Bookkeeping only: hold, lease, a counter position. Not a database.
    Noop,
    Postgres,
    /// MySQL 8 or MariaDB ≥ 10.4, detected at connect.
    Mysql,
    Redis,
    Mongodb,
    /// Only `FIFREEZE` on the configured mounts.
    Fsfreeze,
    /// A user command held running for the duration of the freeze.
    Exec,
}

impl EngineKind {
    pub const ALL: &'static [EngineKind] = &[
        EngineKind::Postgres,
        EngineKind::Mysql,
        EngineKind::Redis,
        EngineKind::Mongodb,
        EngineKind::Fsfreeze,
        EngineKind::Exec,
        EngineKind::Noop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Noop => "noop",
            EngineKind::Postgres => "postgres",
            EngineKind::Mysql => "mysql",
            EngineKind::Redis => "redis",
            EngineKind::Mongodb => "mongodb",
            EngineKind::Fsfreeze => "fsfreeze",
            EngineKind::Exec => "exec",
        }
    }

    pub fn supported_names() -> String {
        Self::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the engine connects to a database and so needs a DSN.
    pub fn needs_dsn(self) -> bool {
        matches!(
            self,
            EngineKind::Postgres | EngineKind::Mysql | EngineKind::Redis | EngineKind::Mongodb
        )
    }

    /// Checks that a DSN parses for this engine. The reason never contains the DSN.
    pub fn check_dsn(self, dsn: &str) -> Result<(), String> {
        match self {
            EngineKind::Postgres => postgres::parse_dsn(dsn).map(drop),
            EngineKind::Mysql => mysql::parse_dsn(dsn).map(drop),
            EngineKind::Redis => redis::parse_dsn(dsn).map(drop),
            EngineKind::Mongodb => mongodb::check_dsn(dsn),
            EngineKind::Noop | EngineKind::Fsfreeze | EngineKind::Exec => Ok(()),
        }
    }

    pub fn to_pb(self) -> pb::Engine {
        match self {
            EngineKind::Noop => pb::Engine::Noop,
            EngineKind::Postgres => pb::Engine::Postgres,
            EngineKind::Mysql => pb::Engine::Mysql,
            EngineKind::Redis => pb::Engine::Redis,
            EngineKind::Mongodb => pb::Engine::Mongodb,
            EngineKind::Fsfreeze => pb::Engine::Fsfreeze,
            EngineKind::Exec => pb::Engine::Exec,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.to_ascii_lowercase();
        // MariaDB and MySQL share one engine; the flavour is detected.
        let name = match name.as_str() {
            "mariadb" => "mysql",
            "postgresql" => "postgres",
            other => other,
        };
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| format!("unknown engine (supported: {})", Self::supported_names()))
    }
}

/// The step of the protocol an error happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Describe,
    Position,
    Prepare,
    Freeze,
    Hold,
    Flush,
    Thaw,
    Wait,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::Describe => "describe",
            Step::Position => "position",
            Step::Prepare => "prepare",
            Step::Freeze => "freeze",
            Step::Hold => "hold",
            Step::Flush => "flush",
            Step::Thaw => "thaw",
            Step::Wait => "wait-for-position",
        })
    }
}

/// What kind of failure, for status codes and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The server could not be reached or refused the login.
    Unavailable,
    /// A bound was hit.
    Timeout,
    /// The server refused the statement.
    Refused,
    /// The held session died.
    Lost,
    /// The request itself was wrong.
    Invalid,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Unavailable => "unavailable",
            Cause::Timeout => "timeout",
            Cause::Refused => "refused",
            Cause::Lost => "lost",
            Cause::Invalid => "invalid",
        }
    }
}

/// An engine failure naming the member, the engine, the step and the
/// server's own message. Never carries credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[error("member {member} ({engine}): {step} failed: {message}")]
pub struct EngineError {
    pub member: String,
    pub engine: EngineKind,
    pub step: Step,
    pub cause: Cause,
    pub message: String,
}

/// Who the member is, as `Describe` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Description {
    /// The engine as the server turned out to be, where the configured
    /// kind covers several (`mysql`: MySQL or MariaDB); else the kind's.
    pub engine: Option<pb::Engine>,
    pub server_version: String,
    pub role: pb::Role,
    pub upstream: String,
    pub capabilities: pb::Capabilities,
    /// What the server needs for crash recovery, where the server has it.
    pub paths: Vec<pb::ServerPath>,
    /// Setup problems the operator should hear about.
    pub warnings: Vec<String>,
}

/// A server path for [`Description::paths`].
pub fn server_path(what: impl Into<String>, path: impl Into<String>) -> pb::ServerPath {
    pb::ServerPath {
        what: what.into(),
        path: path.into(),
    }
}

/// How a hold ends, which decides what the engine keeps afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The cut this hold protected is complete: keep what its restore still
    /// needs (PostgreSQL: the backup's WAL, for `STILLPOINT_PG_WAL_RETAIN`).
    Completed,
    /// Anything else (an abort, lease expiry, a lost stream, shutdown, a
    /// manual thaw): release everything at once.
    Abandoned,
}

impl EngineError {
    pub fn new(
        member: &str,
        engine: EngineKind,
        step: Step,
        cause: Cause,
        message: impl Into<String>,
    ) -> Self {
        EngineError {
            member: member.to_string(),
            engine,
            step,
            cause,
            message: message.into(),
        }
    }
}

/// Names the member and engine in every error an engine makes.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub member: String,
    pub engine: EngineKind,
}

impl Ctx {
    pub fn err(&self, step: Step, cause: Cause, message: impl Into<String>) -> EngineError {
        EngineError::new(&self.member, self.engine, step, cause, message)
    }

    /// A bound that was hit.
    pub fn timeout(&self, step: Step, what: &str, bound: Duration, key: &str) -> EngineError {
        self.err(
            step,
            Cause::Timeout,
            format!(
                "{what} did not finish within {} ms ({key})",
                bound.as_millis()
            ),
        )
    }
}

/// Polls `read` until the position it returns reaches `target`, at most
/// `timeout` (one poll every `interval`). Shared by the engines whose replica
/// wait is a poll.
pub async fn poll_position<F, Fut>(
    ctx: &Ctx,
    target: &pb::Position,
    timeout: Duration,
    interval: Duration,
    mut read: F,
) -> Result<pb::Position, EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<pb::Position, EngineError>>,
{
    use stillpoint_proto::PositionExt;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let position = read().await?;
        let reached = position
            .reached(target)
            .map_err(|e| ctx.err(Step::Wait, Cause::Invalid, e.to_string()))?;
        if reached {
            return Ok(position);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ctx.err(
                Step::Wait,
                Cause::Timeout,
                format!(
                    "{} {} did not reach {} within {} ms (is replication running?)",
                    position.kind_name(),
                    position.display(),
                    target.display(),
                    timeout.as_millis()
                ),
            ));
        }
        tokio::time::sleep(interval).await;
    }
}

/// How much longer than the lease a server's own timeout keeps a held
/// session whose agent stopped renewing it (PostgreSQL's fence, MySQL's
/// freeze session): the agent's lease ends the hold first, and the server
/// ends it by itself when the agent cannot (cut off from it, stopped).
pub const SERVER_GRACE: Duration = Duration::from_secs(1);

/// A background check that a hold is still in force (a MySQL held
/// session, a Redis server); reports the first loss. The check stops when
/// this drops.
#[derive(Debug)]
pub struct HoldMonitor {
    lost: tokio::sync::oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldMonitor {
    /// Runs `check`, which sends the loss reason when it sees one.
    pub fn spawn<F, Fut>(check: F) -> Self
    where
        F: FnOnce(tokio::sync::oneshot::Sender<String>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, lost) = tokio::sync::oneshot::channel();
        HoldMonitor {
            lost,
            task: tokio::spawn(check(tx)),
        }
    }

    /// Resolves with the loss (cancel-safe).
    pub async fn lost(&mut self, ctx: &Ctx) -> EngineError {
        let reason = (&mut self.lost)
            .await
            .unwrap_or_else(|_| "the hold monitor stopped".into());
        ctx.err(Step::Hold, Cause::Lost, reason)
    }
}

impl Drop for HoldMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a thaw hands back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Thawed {
    pub artefacts: BTreeMap<String, String>,
    pub stop_position: Option<pb::Position>,
}

/// One kind of member.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    fn kind(&self) -> EngineKind;

    async fn describe(&self) -> Result<Description, EngineError>;

    /// The current position and the role it was read in.
    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError>;

    /// Work done before the freeze while writes still flow. `atomic_cut`:
    /// the controller's snapshot of this member is one atomic image.
    /// Returns a detail line.
    async fn prepare(&self, backup_id: &str, atomic_cut: bool) -> Result<String, EngineError>;

    /// Freezes and returns the hold. `ttl` is the lease; engines whose lock
    /// can carry its own timeout (Redis `CLIENT PAUSE`) use it.
    async fn freeze(&self, backup_id: &str, ttl: Duration) -> Result<Box<dyn Frozen>, EngineError>;

    /// Freezes so that every write waits, whatever the engine's backup
    /// freeze would let through (a manual quiesce). Most engines' freeze
    /// already blocks every write; PostgreSQL's `backup` mode does not, and
    /// fences instead.
    async fn freeze_writes(
        &self,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        self.freeze(backup_id, ttl).await
    }

    /// Waits until this member has replayed up to `target`, at most `timeout`.
    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError>;

    /// Undoes what a crashed predecessor left locked (from the state
    /// directory). Runs once at start-up; returns what it did, if anything.
    async fn recover(&self) -> Result<Option<String>, EngineError> {
        Ok(None)
    }
}

impl fmt::Debug for dyn Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Engine({})", self.kind())
    }
}

impl fmt::Debug for dyn Frozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Frozen")
    }
}

/// A freeze in force. Dropping it without [`Frozen::thaw`] must not leave
/// the member frozen for longer than its engine's own bound.
#[async_trait]
pub trait Frozen: Send {
    /// The position captured at the freeze.
    fn position(&self) -> pb::Position;

    /// Resolves when the hold is lost (the held session died). Cancel-safe;
    /// never resolves for engines whose hold cannot be lost.
    async fn lost(&mut self) -> EngineError;

    /// The lease was renewed for another `ttl`. Engines whose lock carries
    /// its own timeout (Redis `CLIENT PAUSE`) extend it here.
    async fn renewed(&mut self, _ttl: Duration) -> Result<(), EngineError> {
        Ok(())
    }

    /// Makes what the engine acknowledged durable in its files (the agent
    /// then runs `syncfs(2)` on the member's volumes). Runs once every
    /// member of the group is frozen, before the cut. Returns a detail line.
    async fn flush(&mut self) -> Result<String, EngineError> {
        Ok(String::new())
    }

    async fn thaw(self: Box<Self>, ending: Ending) -> Result<Thawed, EngineError>;
}

/// Builds the configured engine; with `STILLPOINT_FSFREEZE_MOUNTS` set on a
/// database engine, the mounts are frozen after it and thawed before it.
pub fn build(config: &Config) -> Arc<dyn Engine> {
    let ctx = Ctx {
        member: config.member.clone(),
        engine: config.engine,
    };
    let e = &config.engines;
    let engine: Arc<dyn Engine> = match config.engine {
        EngineKind::Noop => Arc::new(noop::Noop::new(config.member.clone(), e.noop.clone())),
        EngineKind::Postgres => Arc::new(postgres::Postgres::new(ctx.clone(), e)),
        EngineKind::Mysql => Arc::new(mysql::Mysql::new(ctx.clone(), e)),
        EngineKind::Redis => Arc::new(redis::Redis::new(ctx.clone(), e)),
        EngineKind::Mongodb => Arc::new(mongodb::Mongo::new(ctx.clone(), e)),
        EngineKind::Exec => Arc::new(exec::Exec::new(ctx.clone(), e)),
        EngineKind::Fsfreeze => return Arc::new(fsfreeze::FsFreeze::new(ctx, e)),
    };
    if e.fsfreeze_mounts.is_empty() {
        engine
    } else {
        Arc::new(fsfreeze::Layered::new(
            engine,
            fsfreeze::FsFreeze::new(ctx, e),
        ))
    }
}
