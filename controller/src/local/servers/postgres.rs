//! A PostgreSQL server on a data directory: started with `pg_ctl` as the
//! `postgres` user, stopped (fast, then killed) on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::{Scratch, ServiceUser, command_as, free_port, kill_and_wait, run, service_user};

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
    /// Where `pg_ctl` and `psql` are ([`bindir`]).
    pub bindir: PathBuf,
    /// Who it runs as (none unless we are root).
    pub user: Option<ServiceUser>,
    /// The directory its programs run in.
    pub scratch_root: PathBuf,
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

    /// Starts it (`pg_ctl start -w`).
    pub fn start(&self) -> Result<()> {
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
            .filter(|pid| super::pid_alive(*pid))
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
        super::log_tail(&self.log)
    }
}

impl super::Server for PgServer {
    fn pid(&self) -> Option<u32> {
        PgServer::pid(self)
    }

    fn stop(&self) {
        PgServer::stop(self)
    }
}

/// Appends `text` to a configuration file.
pub fn append(path: &Path, text: &str) -> Result<()> {
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
