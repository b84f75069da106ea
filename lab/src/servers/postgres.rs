//! A real PostgreSQL primary with a streaming replica (`pg_basebackup -R`,
//! with a physical slot so that backup checkpoints never recycle WAL the
//! replica still needs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
pub use stillpoint_controller::local::servers::postgres::*;

use crate::servers::{Setup, command_as, free_port, run, service_user, wait_for};

/// The replication slot the replica streams from.
pub const REPLICA_SLOT: &str = "stillpoint_replica";

/// A primary and its streaming replica.
pub type PgPair = crate::servers::Pair<PgServer>;

const SETTINGS: &str = "
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_keep_size = '64MB'
shared_buffers = '32MB'
max_connections = 100
log_min_messages = warning
logging_collector = off
";

impl crate::servers::Pair<PgServer> {
    /// Starts a primary and a replica and waits until replication streams.
    pub fn start() -> Result<Self> {
        Self::start_in(None)
    }

    /// Starts the pair under `base` (a btrfs mount makes each data
    /// directory a subvolume).
    pub fn start_in(base: Option<&Path>) -> Result<Self> {
        Self::start_with(&Setup {
            base,
            ..Setup::default()
        })
    }

    /// Starts the pair laid out and tuned as `setup` says.
    pub fn start_with(setup: &Setup<'_>) -> Result<Self> {
        let bindir = bindir()?;
        let user = service_user("postgres")?;
        let scratch = setup.scratch("pg")?;
        let root = scratch.path().to_path_buf();
        let run_dir = scratch.owned_dir("run", user.as_ref())?;
        let logs = scratch.owned_dir("log", user.as_ref())?;
        let server = |name: &'static str| -> Result<PgServer> {
            Ok(PgServer {
                name,
                port: free_port(),
                data: scratch.data_dir(name, user.as_ref())?,
                log: logs.join(format!("{name}.log")),
                bindir: bindir.clone(),
                user: user.clone(),
                scratch_root: root.clone(),
            })
        };
        let primary = server("primary")?;
        let replica = server("replica")?;
        let wal_dir = |name: &str| -> Result<Option<PathBuf>> {
            match setup.logs_apart {
                true => Ok(Some(
                    scratch.owned_dir(&format!("{name}-wal"), user.as_ref())?,
                )),
                false => Ok(None),
            }
        };
        let (primary_wal, replica_wal) = (wal_dir("primary")?, wal_dir("replica")?);

        let mut initdb = command_as(&bindir.join("initdb"), user.as_ref(), &root);
        if let Some(wal) = &primary_wal {
            initdb.arg(format!("--waldir={}", wal.display()));
        }
        initdb.arg("-D").arg(&primary.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb, "initdb")?;
        append(
            &primary.data.join("postgresql.conf"),
            &format!(
                "{SETTINGS}port = {}\nunix_socket_directories = '{}'\nsynchronous_commit = {}\n",
                primary.port,
                run_dir.display(),
                if setup.relaxed { "off" } else { "on" }
            ),
        )?;
        append(
            &primary.data.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        )?;
        let pair = PgPair::new(primary, replica, scratch);
        pair.primary.start()?;

        let mut basebackup = command_as(&bindir.join("pg_basebackup"), user.as_ref(), &root);
        if let Some(wal) = &replica_wal {
            basebackup.arg(format!("--waldir={}", wal.display()));
        }
        basebackup
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(pair.primary.port.to_string())
            .arg("-D")
            .arg(&pair.replica.data)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-C",
                "-S",
                REPLICA_SLOT,
                "--no-sync",
            ]);
        run(&mut basebackup, "pg_basebackup for the replica")?;
        append(
            &pair.replica.data.join("postgresql.auto.conf"),
            &format!("port = {}\n", pair.replica.port),
        )?;
        pair.replica.start()?;
        wait_for(
            "PostgreSQL replica streaming",
            Duration::from_secs(30),
            || {
                Ok(pair
                    .primary
                    .psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")?
                    == "1")
            },
        )
        .with_context(|| pair.replica.log_tail())?;
        Ok(pair)
    }
}
