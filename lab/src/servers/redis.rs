//! A real Redis primary with a replica.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
pub use stillpoint_controller::local::servers::redis::*;

use crate::servers::{ServerProcess, Setup, free_port, require, service_user, wait_for};

/// A primary and its replica.
pub type RedisPair = crate::servers::Pair<RedisServer>;

/// How a Redis pair persists its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing on disk (`save ""`, no AOF).
    None,
    /// RDB snapshots only (Redis's default `save` points, no AOF).
    Rdb,
    /// The append-only file (`appendfsync everysec`, Redis's default).
    Aof,
}

impl crate::servers::Pair<RedisServer> {
    /// Starts a primary and a replica and waits until the link is up.
    pub fn start() -> Result<Self> {
        Self::start_in(None, false)
    }

    /// Starts the pair under `base`; with `append_only`, every acknowledged
    /// write is in the append-only file (so a snapshot of the dir has it).
    pub fn start_in(base: Option<&Path>, append_only: bool) -> Result<Self> {
        let persistence = match append_only {
            true => Persistence::Aof,
            false => Persistence::None,
        };
        Self::start_with(
            &Setup {
                base,
                ..Setup::default()
            },
            persistence,
        )
    }

    /// Starts the pair laid out as `setup` says, persisting as `persistence`.
    pub fn start_with(setup: &Setup<'_>, persistence: Persistence) -> Result<Self> {
        // Fails before any directory is made when Redis is not installed.
        require(&["redis-server"], "redis-server")?;
        let user = service_user("redis")?;
        let scratch = setup.scratch("redis")?;
        let (save, append_only) = match persistence {
            Persistence::None => ("", "no"),
            Persistence::Rdb => ("3600 1 300 100 60 10000", "no"),
            Persistence::Aof => ("", "yes"),
        };
        let server = |name: &'static str| -> Result<RedisServer> {
            let dir = scratch.data_dir(name, user.as_ref())?;
            Ok(RedisServer {
                name,
                port: free_port(),
                log: dir.join("redis.log"),
                dir,
                process: ServerProcess::default(),
            })
        };
        let primary = server("primary")?;
        let replica = server("replica")?;
        let pair = RedisPair::new(primary, replica, scratch);
        for (s, upstream) in [
            (&pair.primary, None),
            (&pair.replica, Some(pair.primary.port)),
        ] {
            let upstream = upstream.map(|port| port.to_string());
            let mut options = vec![
                "--save",
                save,
                "--appendonly",
                append_only,
                "--appendfsync",
                "everysec",
                "--repl-diskless-sync-delay",
                "0",
            ];
            if let Some(port) = &upstream {
                options.extend(["--replicaof", "127.0.0.1", port]);
            }
            s.launch(user.as_ref(), &options)?;
        }
        wait_for("Redis replica link up", Duration::from_secs(20), || {
            Ok(pair
                .replica
                .cli(&["info", "replication"])?
                .contains("master_link_status:up"))
        })
        .with_context(|| pair.replica.log_tail())?;
        Ok(pair)
    }
}
