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

pub mod noop;

/// The kinds of member an agent can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// Bookkeeping only: hold, lease, a counter position. Not a database.
    Noop,
}

impl EngineKind {
    pub const ALL: &'static [EngineKind] = &[EngineKind::Noop];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Noop => "noop",
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
        match self {
            EngineKind::Noop => false,
        }
    }

    pub fn to_pb(self) -> pb::Engine {
        match self {
            EngineKind::Noop => pb::Engine::Noop,
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
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s.to_ascii_lowercase())
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub server_version: String,
    pub role: pb::Role,
    pub upstream: String,
    pub capabilities: pb::Capabilities,
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

    /// Work done before the freeze while writes still flow. Returns a detail line.
    async fn prepare(&self, backup_id: &str) -> Result<String, EngineError>;

    /// Freezes and returns the hold. `ttl` is the lease; engines whose lock
    /// can carry its own timeout (Redis `CLIENT PAUSE`) use it.
    async fn freeze(&self, backup_id: &str, ttl: Duration) -> Result<Box<dyn Frozen>, EngineError>;

    /// Waits until this member has replayed up to `target`, at most `timeout`.
    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError>;
}

impl fmt::Debug for dyn Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Engine({})", self.kind())
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

    async fn thaw(self: Box<Self>) -> Result<Thawed, EngineError>;
}

/// Builds the configured engine.
pub fn build(config: &Config) -> Arc<dyn Engine> {
    match config.engine {
        EngineKind::Noop => Arc::new(noop::Noop::new(config.member.clone(), config.noop.clone())),
    }
}
