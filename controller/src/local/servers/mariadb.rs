//! A MariaDB server on a data directory: `mariadbd` run directly as the
//! `mysql` user, stopped (then killed) on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::{
    Scratch, ServerProcess, ServiceUser, command_as, free_port, require, run, service_user,
    wait_for,
};

/// One running server. `root@127.0.0.1` has no password and all privileges.
#[derive(Debug)]
pub struct MariaServer {
    pub name: &'static str,
    pub port: u16,
    pub data: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub server_id: u32,
    /// `--log-bin` (default `<data>/binlog`).
    pub log_bin: Option<PathBuf>,
    /// The server process, once started.
    pub process: ServerProcess,
}

impl MariaServer {
    /// A mysql_async URL for `root` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    fn client(&self) -> Result<Command> {
        let mut cmd = Command::new(require(&["mariadb", "mysql"], "mariadb-client")?);
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "--batch", "--skip-column-names"]);
        Ok(cmd)
    }

    /// Runs SQL over the unix socket as root and returns the output.
    pub fn sql(&self, sql: &str) -> Result<String> {
        let mut cmd = self.client()?;
        cmd.args(["-e", sql]);
        Ok(run(&mut cmd, &format!("mariadb on {}", self.name))?
            .trim()
            .to_string())
    }

    /// `SHOW SLAVE STATUS` as field → value (empty when not a replica).
    pub fn slave_status(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let mut cmd = self.client()?;
        cmd.args(["--column-names", "-e", "SHOW SLAVE STATUS\\G"]);
        let out = run(&mut cmd, &format!("SHOW SLAVE STATUS on {}", self.name))?;
        Ok(out
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Shuts the server down cleanly, killing it if that fails.
    pub fn stop(&self) {
        self.process
            .stop("MariaDB shutdown", Duration::from_secs(30), || {
                let _ = self.sql("SHUTDOWN");
            });
    }

    pub fn log_tail(&self) -> String {
        super::log_tail(&self.log)
    }
}

impl super::Server for MariaServer {
    fn pid(&self) -> Option<u32> {
        MariaServer::pid(self)
    }

    fn stop(&self) {
        MariaServer::stop(self)
    }
}

/// Starts `mariadbd` for `server` (as `user`, in `root`, with `extra`
/// options) and waits until it accepts connections.
pub fn start_server(
    server: &MariaServer,
    user: Option<&ServiceUser>,
    root: &Path,
    extra: &[&str],
) -> Result<()> {
    let mariadbd = require(&["mariadbd", "mysqld"], "mariadb-server")?;
    // Runs as the service user directly (no --user), so the child is the
    // server itself. Its output goes to files: a server holding our pipes
    // would hang the test.
    let stdout = std::fs::File::create(server.log.with_extension("out"))?;
    let mut cmd = command_as(&mariadbd, user, root);
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", server.data.display()))
        .arg(format!("--port={}", server.port))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--socket={}", server.socket.display()))
        .arg(format!(
            "--pid-file={}",
            server.data.join("mariadbd.pid").display()
        ))
        .arg(format!("--log-error={}", server.log.display()))
        .arg(format!("--server-id={}", server.server_id))
        .arg(format!(
            "--log-bin={}",
            server
                .log_bin
                .clone()
                .unwrap_or_else(|| server.data.join("binlog"))
                .display()
        ))
        .args([
            "--binlog-format=ROW",
            "--log-slave-updates",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=48M",
            "--skip-name-resolve",
            "--innodb-flush-log-at-trx-commit=1",
        ])
        .args(extra)
        .stdout(Stdio::from(stdout.try_clone()?))
        .stderr(Stdio::from(stdout));
    server
        .process
        .set(cmd.spawn().context("starting mariadbd")?);
    wait_for(
        &format!("MariaDB {} accepting connections", server.name),
        Duration::from_secs(60),
        || {
            server.process.ensure_running("mariadbd")?;
            Ok(server.sql("SELECT 1").is_ok())
        },
    )
    .with_context(|| server.log_tail())
}

/// A server started on a restored data directory (replication not started).
/// Stopped and removed on drop.
#[derive(Debug)]
pub struct MariaRestored {
    pub server: MariaServer,
    user: Option<ServiceUser>,
    scratch: Scratch,
}

impl MariaRestored {
    /// An empty place for a data directory: fill `data_dir()`, then `start()`.
    pub fn new() -> Result<Self> {
        Self::make(None)
    }

    /// A server for the data directory `data` (kept on drop).
    pub fn at(data: PathBuf) -> Result<Self> {
        Self::make(Some(data))
    }

    fn make(data: Option<PathBuf>) -> Result<Self> {
        let user = service_user("mysql")?;
        let scratch = Scratch::new("mariadb-restore")?;
        let run_dir = scratch.owned_dir("run", user.as_ref())?;
        let logs = scratch.owned_dir("log", user.as_ref())?;
        let server = MariaServer {
            name: "restored",
            port: free_port(),
            data: data.unwrap_or_else(|| scratch.path().join("data")),
            socket: run_dir.join("restored.sock"),
            log: logs.join("restored.err"),
            server_id: 99,
            log_bin: None,
            process: ServerProcess::default(),
        };
        Ok(MariaRestored {
            server,
            user,
            scratch,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.server.data
    }

    /// Starts with this binlog basename (where the backup had it, restored)
    /// instead of `<data>/binlog`.
    pub fn with_log_bin(mut self, basename: Option<PathBuf>) -> Self {
        self.server.log_bin = basename;
        self
    }

    /// Starts the server on the directory; InnoDB recovers as after a crash.
    pub fn start(&self) -> Result<()> {
        let data = &self.server.data;
        for stale in ["mariadbd.pid", "master.info", "relay-log.info"] {
            let _ = std::fs::remove_file(data.join(stale));
        }
        if let Some(user) = &self.user {
            run(
                Command::new("chown")
                    .args(["-R", &format!("{}:{}", user.uid, user.gid)])
                    .arg(data),
                "chown the restored data directory",
            )?;
        }
        start_server(
            &self.server,
            self.user.as_ref(),
            self.scratch.path(),
            &["--skip-slave-start"],
        )
    }
}

impl Drop for MariaRestored {
    fn drop(&mut self) {
        self.server.stop();
        super::remove_tree(self.scratch.path());
    }
}
