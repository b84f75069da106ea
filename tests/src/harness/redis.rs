//! A real Redis primary with a replica.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Scratch, command_as, free_port, kill_and_wait, require, run, service_user, wait_for};

/// One running server.
#[derive(Debug)]
pub struct RedisServer {
    pub name: &'static str,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Mutex<Option<Child>>,
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
        self.child
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id())
            .filter(|pid| super::pid_alive(*pid))
    }

    /// `SHUTDOWN NOSAVE NOW` (about 10 ms), killing it if that fails.
    pub fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap().take() else {
            return;
        };
        let _ = self.cli(&["shutdown", "nosave", "now"]);
        let exited = wait_for("Redis shutdown", Duration::from_secs(10), || {
            Ok(child.try_wait()?.is_some())
        });
        if exited.is_err() {
            kill_and_wait(child.id());
        }
        let _ = child.wait();
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

/// A primary and its replica.
pub type RedisPair = super::Pair<RedisServer>;

impl super::Pair<RedisServer> {
    /// Starts a primary and a replica and waits until the link is up.
    pub fn start() -> Result<Self> {
        let server_bin = require(&["redis-server"], "redis-server")?;
        let user = service_user("redis")?;
        let scratch = Scratch::new("redis")?;
        let server = |name: &'static str| -> Result<RedisServer> {
            let dir = scratch.owned_dir(name, user.as_ref())?;
            Ok(RedisServer {
                name,
                port: free_port(),
                log: dir.join("redis.log"),
                dir,
                child: Mutex::new(None),
            })
        };
        let primary = server("primary")?;
        let replica = server("replica")?;
        let pair = RedisPair::new(primary, replica, scratch);
        for (s, upstream) in [
            (&pair.primary, None),
            (&pair.replica, Some(pair.primary.port)),
        ] {
            let mut cmd = command_as(&server_bin, user.as_ref(), &s.dir);
            cmd.args(["--port", &s.port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&s.dir)
                .arg("--logfile")
                .arg(&s.log)
                .args([
                    "--daemonize",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(port) = upstream {
                cmd.args(["--replicaof", "127.0.0.1", &port.to_string()]);
            }
            *s.child.lock().unwrap() = Some(cmd.spawn().context("starting redis-server")?);
            wait_for(
                &format!("Redis {} answering", s.name),
                Duration::from_secs(20),
                || {
                    super::ensure_running(&s.child, "redis-server")?;
                    Ok(s.cli(&["ping"]).is_ok_and(|out| out == "PONG"))
                },
            )
            .with_context(|| s.log_tail())?;
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
