//! A Redis server on a directory: `redis-server` run as the `redis` user,
//! stopped (`SHUTDOWN NOSAVE NOW`, then killed) on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Scratch, ServerProcess, command_as, free_port, require, run, service_user, wait_for};

/// One running server.
#[derive(Debug)]
pub struct RedisServer {
    pub name: &'static str,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The server process, once started.
    pub process: ServerProcess,
}

impl RedisServer {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one command with redis-cli and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(require(&["redis-cli"], "redis-tools")?);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args);
        Ok(run(&mut cmd, &format!("redis-cli on {}", self.name))?
            .trim()
            .to_string())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// `SHUTDOWN NOSAVE NOW` (about 10 ms), killing it if that fails.
    pub fn stop(&self) {
        self.process
            .stop("Redis shutdown", Duration::from_secs(10), || {
                let _ = self.cli(&["shutdown", "nosave", "now"]);
            });
    }

    /// Starts `redis-server` on its port, directory and log (as `user`,
    /// with `options`) and waits until it answers.
    pub fn launch(&self, user: Option<&super::ServiceUser>, options: &[&str]) -> Result<()> {
        let mut cmd = command_as(
            &require(&["redis-server"], "redis-server")?,
            user,
            &self.dir,
        );
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&self.log)
            .args(["--daemonize", "no"])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.process
            .set(cmd.spawn().context("starting redis-server")?);
        wait_for(
            &format!("Redis {} answering", self.name),
            Duration::from_secs(20),
            || {
                self.process.ensure_running("redis-server")?;
                Ok(self.cli(&["ping"]).is_ok_and(|out| out == "PONG"))
            },
        )
        .with_context(|| self.log_tail())
    }

    pub fn log_tail(&self) -> String {
        super::log_tail(&self.log)
    }
}

impl super::Server for RedisServer {
    fn pid(&self) -> Option<u32> {
        RedisServer::pid(self)
    }

    fn stop(&self) {
        RedisServer::stop(self)
    }
}

/// A server started on a restored directory (its append-only file or RDB),
/// without replication. Stopped and removed on drop.
#[derive(Debug)]
pub struct RedisRestored {
    pub server: RedisServer,
    user: Option<super::ServiceUser>,
    scratch: Scratch,
}

impl RedisRestored {
    /// An empty place for the data: fill `data_dir()`, then `start()`.
    pub fn new() -> Result<Self> {
        Self::make(None)
    }

    /// A server for the directory `dir` (kept on drop).
    pub fn at(dir: PathBuf) -> Result<Self> {
        Self::make(Some(dir))
    }

    fn make(dir: Option<PathBuf>) -> Result<Self> {
        let user = service_user("redis")?;
        let scratch = Scratch::new("redis-restore")?;
        let dir = dir.unwrap_or_else(|| scratch.path().join("data"));
        let server = RedisServer {
            name: "restored",
            port: free_port(),
            log: scratch.path().join("redis.log"),
            dir,
            process: ServerProcess::default(),
        };
        Ok(RedisRestored {
            server,
            user,
            scratch,
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.server.dir
    }

    /// Starts the server, loading the append-only file when there is one.
    pub fn start(&self) -> Result<()> {
        let s = &self.server;
        if let Some(user) = &self.user {
            for path in [&s.dir, &self.scratch.path().to_path_buf()] {
                run(
                    Command::new("chown")
                        .args(["-R", &format!("{}:{}", user.uid, user.gid)])
                        .arg(path),
                    "chown the restored Redis dir",
                )?;
            }
        }
        let aof = s.dir.join("appendonlydir").exists();
        s.launch(
            self.user.as_ref(),
            &["--save", "", "--appendonly", if aof { "yes" } else { "no" }],
        )
    }
}

impl Drop for RedisRestored {
    fn drop(&mut self) {
        self.server.stop();
        super::remove_tree(self.scratch.path());
    }
}
