//! Why a backup failed, in kinds a caller can act on (a Condition reason,
//! a metric label), each with the phase and member it happened to.

use std::fmt;

/// The protocol's phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Resolve,
    Prepare,
    Freeze,
    Flush,
    Cut,
    Thaw,
    Finalize,
    Record,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Resolve => "resolve",
            Phase::Prepare => "prepare",
            Phase::Freeze => "freeze",
            Phase::Flush => "flush",
            Phase::Cut => "cut",
            Phase::Thaw => "thaw",
            Phase::Finalize => "finalize",
            Phase::Record => "record",
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The agent could not be dialled (or refused the TLS handshake).
    AgentUnreachable,
    /// The agent's certificate does not carry the identity expected for it.
    WrongIdentity,
    /// The agent answered, but its server did not (Describe failed).
    ServerUnavailable,
    /// The agent reports another role than the member is expected to have.
    RoleMismatch,
    /// A replica whose primary is not a member of the group.
    ReplicaWithoutPrimary,
    /// The server keeps something recovery needs outside the volumes.
    NotCovered,
    /// The snapshotter cannot make this member consistent (InnoDB on a copy).
    CopyRefused,
    PrepareFailed,
    FreezeFailed,
    /// A replica did not reach its primary's position in time.
    AlignmentTimeout,
    /// The freeze window would exceed the freeze budget.
    BudgetExceeded,
    /// A member's hold ended before its thaw was asked for.
    HoldLost,
    FlushFailed,
    CutFailed,
    ThawFailed,
    /// The snapshots did not become ready.
    NotReady,
    /// The backup's record could not be written.
    StoreFailed,
    /// Stopped on purpose (shutdown).
    Aborted,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: &[ErrorKind] = &[
        ErrorKind::AgentUnreachable,
        ErrorKind::WrongIdentity,
        ErrorKind::ServerUnavailable,
        ErrorKind::RoleMismatch,
        ErrorKind::ReplicaWithoutPrimary,
        ErrorKind::NotCovered,
        ErrorKind::CopyRefused,
        ErrorKind::PrepareFailed,
        ErrorKind::FreezeFailed,
        ErrorKind::AlignmentTimeout,
        ErrorKind::BudgetExceeded,
        ErrorKind::HoldLost,
        ErrorKind::FlushFailed,
        ErrorKind::CutFailed,
        ErrorKind::ThawFailed,
        ErrorKind::NotReady,
        ErrorKind::StoreFailed,
        ErrorKind::Aborted,
    ];

    /// CamelCase, for Condition reasons; also the metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::AgentUnreachable => "AgentUnreachable",
            ErrorKind::WrongIdentity => "WrongIdentity",
            ErrorKind::ServerUnavailable => "ServerUnavailable",
            ErrorKind::RoleMismatch => "RoleMismatch",
            ErrorKind::ReplicaWithoutPrimary => "ReplicaWithoutPrimary",
            ErrorKind::NotCovered => "NotCovered",
            ErrorKind::CopyRefused => "CopyRefused",
            ErrorKind::PrepareFailed => "PrepareFailed",
            ErrorKind::FreezeFailed => "FreezeFailed",
            ErrorKind::AlignmentTimeout => "AlignmentTimeout",
            ErrorKind::BudgetExceeded => "BudgetExceeded",
            ErrorKind::HoldLost => "HoldLost",
            ErrorKind::FlushFailed => "FlushFailed",
            ErrorKind::CutFailed => "CutFailed",
            ErrorKind::ThawFailed => "ThawFailed",
            ErrorKind::NotReady => "NotReady",
            ErrorKind::StoreFailed => "StoreFailed",
            ErrorKind::Aborted => "Aborted",
        }
    }
}

/// One thing that went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub phase: Phase,
    pub kind: ErrorKind,
    pub member: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn new(
        phase: Phase,
        kind: ErrorKind,
        member: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            phase,
            kind,
            member: member.map(str::to_string),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Everything that went wrong in one phase (the first is the cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn one(
        phase: Phase,
        kind: ErrorKind,
        member: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Problems(vec![Problem::new(phase, kind, member, message)])
    }

    /// The kind of the first problem.
    pub fn kind(&self) -> ErrorKind {
        self.0.first().map_or(ErrorKind::Aborted, |p| p.kind)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.0.iter().map(|p| p.message.clone()).collect();
        f.write_str(&text.join("; "))
    }
}

impl From<Problem> for Problems {
    fn from(p: Problem) -> Self {
        Problems(vec![p])
    }
}
