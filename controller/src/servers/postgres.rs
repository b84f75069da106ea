//! A real PostgreSQL primary with a streaming replica (`pg_basebackup -R`,
//! with a physical slot so that backup checkpoints never recycle WAL the
//! replica still needs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::servers::{
    Scratch, ServiceUser, Setup, command_as, free_port, kill_and_wait, run, service_user, wait_for,
};

/// The replication slot the replica streams from.
pub const REPLICA_SLOT: &str = "stillpoint_replica";

/// Where PostgreSQL's server programs live (`STILLPOINT_PG_BINDIR` overrides).
pub fn bindir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("STILLPOINT_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().context(
        "PostgreSQL server programs (initdb, pg_ctl) not found under /usr/lib/postgresql: \
         install them with `apt-get install -y postgresql` (.ci/run does this)",
    )
}

/// One running server.
#[derive(Debug)]
pub struct PgServer {
    pub name: &'static str,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    bindir: PathBuf,
    user: Option<ServiceUser>,
    scratch_root: PathBuf,
}

impl PgServer {
    /// A libpq / tokio-postgres connection string.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=5",
            self.port
        )
    }

    fn pg_ctl(&self, args: &[&str], what: &str) -> Result<String> {
        let mut cmd = command_as(
            &self.bindir.join("pg_ctl"),
            self.user.as_ref(),
            &self.scratch_root,
        );
        cmd.arg("-D").arg(&self.data).args(args);
        run(&mut cmd, what)
    }

    fn start(&self) -> Result<()> {
        self.pg_ctl(
            &["-l", self.log.to_str().unwrap(), "-w", "-t", "60", "start"],
            &format!("starting PostgreSQL {}", self.name),
        )
        .map(drop)
        .with_context(|| self.log_tail())
    }

    /// Stops the server (fast shutdown), killing it if that fails.
    pub fn stop(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let stopped = self.pg_ctl(
            &["-m", "fast", "-w", "-t", "30", "stop"],
            "stopping PostgreSQL",
        );
        if stopped.is_err() {
            kill_and_wait(pid);
        }
    }

    /// The postmaster's pid, while it runs. A pid file copied from another
    /// server's data directory (a restored copy that never started) names
    /// that other, live postmaster: only a postmaster whose working
    /// directory is this data directory counts, so `stop` never stops
    /// another server.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
            .filter(|pid| crate::servers::pid_alive(*pid))
            .filter(|pid| self.runs_here(*pid))
    }

    fn runs_here(&self, pid: u32) -> bool {
        let cwd = match std::fs::read_link(format!("/proc/{pid}/cwd")) {
            Ok(cwd) => cwd,
            // Not ours to inspect (another user, no /proc): trust the file.
            Err(_) => return true,
        };
        let here = std::fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
        cwd == here
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let psql = self.bindir.join("psql");
        let out = run(
            Command::new(psql)
                .args([
                    "-X",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-At",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-d", "postgres", "-c", sql]),
            &format!("psql on {}", self.name),
        )?;
        Ok(out.trim().to_string())
    }

    pub fn log_tail(&self) -> String {
        crate::servers::log_tail(&self.log)
    }
}

impl crate::servers::Server for PgServer {
    fn pid(&self) -> Option<u32> {
        PgServer::pid(self)
    }

    fn stop(&self) {
        PgServer::stop(self)
    }
}

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
        let scratch = Scratch::with_setup(setup, "pg")?;
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

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// A server started from a data directory someone else filled (a restored
/// backup). Stopped and removed on drop.
#[derive(Debug)]
pub struct PgRestored {
    pub server: PgServer,
    scratch: Scratch,
}

impl PgRestored {
    /// An empty place for a data directory: fill `data_dir()`, then `start()`.
    pub fn new() -> Result<Self> {
        Self::make(None)
    }

    /// A server for the data directory `data` (kept on drop; only the
    /// server's run and log files go).
    pub fn at(data: PathBuf) -> Result<Self> {
        Self::make(Some(data))
    }

    fn make(data: Option<PathBuf>) -> Result<Self> {
        let user = service_user("postgres")?;
        let scratch = Scratch::new("pg-restore")?;
        let root = scratch.path().to_path_buf();
        let logs = scratch.owned_dir("log", user.as_ref())?;
        scratch.owned_dir("run", user.as_ref())?;
        let server = PgServer {
            name: "restored",
            port: free_port(),
            data: data.unwrap_or_else(|| root.join("data")),
            log: logs.join("restored.log"),
            bindir: bindir()?,
            user,
            scratch_root: root,
        };
        Ok(PgRestored { server, scratch })
    }

    pub fn data_dir(&self) -> &Path {
        &self.server.data
    }

    /// Makes the directory the server's own (owner, mode, port, no stale
    /// pid file) and starts it; recovery runs as part of the start.
    pub fn start(&self) -> Result<()> {
        let data = &self.server.data;
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        let _ = std::fs::remove_file(data.join("standby.signal"));
        append(
            &data.join("postgresql.auto.conf"),
            &format!(
                "port = {}\nunix_socket_directories = '{}'\nlog_min_messages = log\n",
                self.server.port,
                self.scratch.path().join("run").display()
            ),
        )?;
        if let Some(user) = &self.server.user {
            run(
                Command::new("chown")
                    .args(["-R", &format!("{}:{}", user.uid, user.gid)])
                    .arg(data),
                "chown the restored data directory",
            )?;
        }
        run(
            Command::new("chmod").args(["700"]).arg(data),
            "chmod the data directory",
        )?;
        self.server.start()
    }
}

impl Drop for PgRestored {
    fn drop(&mut self) {
        self.server.stop();
        let _ = std::fs::remove_dir_all(self.scratch.path());
    }
}
