//! What the protocol works on, whichever mode described it: a group of
//! members, each an agent to dial (and the identity it must present), the
//! role it is expected to have, and its volumes — paths on a host, or
//! PersistentVolumeClaims in a cluster.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stillpoint_proto::pb;

/// The kind of server a member is, as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Mysql,
    Mariadb,
    Mongodb,
    Redis,
    Fsfreeze,
    Exec,
    Noop,
    Unknown,
}

impl Engine {
    pub fn from_pb(engine: i32) -> Engine {
        match pb::Engine::try_from(engine).unwrap_or_default() {
            pb::Engine::Postgres => Engine::Postgres,
            pb::Engine::Mysql => Engine::Mysql,
            pb::Engine::Mariadb => Engine::Mariadb,
            pb::Engine::Mongodb => Engine::Mongodb,
            pb::Engine::Redis => Engine::Redis,
            pb::Engine::Fsfreeze => Engine::Fsfreeze,
            pb::Engine::Exec => Engine::Exec,
            pb::Engine::Noop => Engine::Noop,
            pb::Engine::Unspecified => Engine::Unknown,
        }
    }

    /// The name manifests, tables and metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
            Engine::Mariadb => "mariadb",
            Engine::Mongodb => "mongodb",
            Engine::Redis => "redis",
            Engine::Fsfreeze => "fsfreeze",
            Engine::Exec => "exec",
            Engine::Noop => "noop",
            Engine::Unknown => "unknown",
        }
    }

    /// The same as [`Engine::name`].
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    /// MySQL or MariaDB: InnoDB, whose file copy is consistent only frozen.
    pub fn is_innodb(self) -> bool {
        matches!(self, Engine::Mysql | Engine::Mariadb)
    }

    /// The default restore stage of the engine's class: databases before
    /// everything that depends on them.
    pub fn default_stage(self) -> u32 {
        match self {
            Engine::Postgres | Engine::Mysql | Engine::Mariadb | Engine::Mongodb => 2,
            Engine::Redis => 3,
            _ => 4,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq<str> for Engine {
    fn eq(&self, other: &str) -> bool {
        self.name() == other
    }
}

impl PartialEq<&str> for Engine {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// A member's role in replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    /// Neither (a filesystem, an exec hook, a server without replication).
    Standalone,
    /// The agent did not say.
    Unknown,
}

impl Role {
    pub fn from_pb(role: i32) -> Role {
        match pb::Role::try_from(role).unwrap_or_default() {
            pb::Role::Primary => Role::Primary,
            pb::Role::Replica => Role::Replica,
            pb::Role::Standalone => Role::Standalone,
            pb::Role::Unspecified => Role::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Standalone => "standalone",
            Role::Unknown => "unknown",
        }
    }

    /// The same as [`Role::name`].
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    /// Whether an agent reporting `self` meets the expectation `expected`
    /// (a server without replicas reports itself a primary).
    pub fn meets(self, expected: Role) -> bool {
        self == expected || (expected == Role::Standalone && self == Role::Primary)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq<str> for Role {
    fn eq(&self, other: &str) -> bool {
        self.name() == other
    }
}

impl PartialEq<&str> for Role {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// One volume of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VolumeId {
    /// A path on the host (local mode).
    Path(PathBuf),
    /// A PersistentVolumeClaim, and where the member's server has it mounted.
    Pvc {
        claim: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mount_path: Option<PathBuf>,
    },
}

impl VolumeId {
    /// Where the member's server sees the volume's files, if known: what
    /// the coverage check compares the server's paths with.
    pub fn root(&self) -> Option<&Path> {
        match self {
            VolumeId::Path(p) => Some(p),
            VolumeId::Pvc { mount_path, .. } => mount_path.as_deref(),
        }
    }

    /// A name for messages: the path, or the claim.
    pub fn describe(&self) -> String {
        match self {
            VolumeId::Path(p) => p.display().to_string(),
            VolumeId::Pvc {
                claim,
                mount_path: Some(at),
            } => format!("PVC {claim} (at {})", at.display()),
            VolumeId::Pvc { claim, .. } => format!("PVC {claim}"),
        }
    }
}

/// Where a member's agent is and who it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// `host:port`.
    pub addr: String,
    /// The URI SAN its certificate must carry.
    pub identity: String,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub name: String,
    pub agent: AgentEndpoint,
    /// The role it is expected to have; the agent's report must meet it.
    pub role: Role,
    /// For a replica: the member it replicates from.
    pub primary: Option<String>,
    pub volumes: Vec<VolumeId>,
    /// Restore stage; default by engine class.
    pub restore_stage: Option<u32>,
    /// The agent freezes the member's mount (makes a copy of InnoDB consistent).
    pub fsfreeze: bool,
    /// Paths the server uses that are knowingly not on the volumes.
    pub accept_uncovered: Vec<PathBuf>,
}

/// A consistency group as the protocol runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub name: String,
    /// Where the group lives, in Kubernetes mode (a label of its metrics).
    pub namespace: Option<String>,
    pub members: Vec<MemberSpec>,
    /// Bound on the freeze window.
    pub freeze_budget: Duration,
    /// The lease given to the agents.
    pub lease_ttl: Duration,
    /// Bound on a replica's alignment wait.
    pub align_timeout: Duration,
    /// Bound on dialling an agent.
    pub connect_timeout: Duration,
    /// Bound on each request to an agent outside the freeze's own budgets.
    pub rpc_timeout: Duration,
}
