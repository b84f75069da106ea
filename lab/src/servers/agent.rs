//! The `stillpoint-agent` binary as a child process (`stillpoint demo` and
//! the black-box tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use stillpoint_proto::tls::TlsFiles;

use crate::servers::{signal, wait_for};

/// The agent binary: `$STILLPOINT_AGENT_BIN`, or the one cargo built beside
/// this test binary (`cargo test --workspace` builds it).
pub fn agent_binary() -> Result<PathBuf> {
    binary(
        "stillpoint-agent",
        "STILLPOINT_AGENT_BIN",
        "stillpoint-agent",
    )
}

/// The `stillpoint` CLI binary: `$STILLPOINT_BIN`, or the one beside this test.
pub fn controller_binary() -> Result<PathBuf> {
    binary("stillpoint", "STILLPOINT_BIN", "stillpoint-controller")
}

fn binary(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("locating the binary's directory")?;
    // Beside this binary (installed, or target/<profile>/stillpoint), or one
    // level up from a test binary (target/<profile>/deps/<test>).
    let beside = dir.join(name);
    let path = match dir.parent() {
        _ if beside.is_file() => beside,
        Some(up) => up.join(name),
        None => beside,
    };
    if !path.is_file() {
        bail!(
            "{} not found: run the suite with `cargo test --workspace` (which builds it), \
             or `cargo build -p {package}` first",
            path.display()
        );
    }
    Ok(path)
}

/// How to start one agent.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub member: String,
    pub engine: String,
    pub tls: TlsFiles,
    pub controller_identity: String,
    /// Extra `STILLPOINT_*` settings.
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    pub fn new(member: &str, engine: &str, tls: TlsFiles, controller_identity: &str) -> Self {
        AgentSpec {
            member: member.to_string(),
            engine: engine.into(),
            tls,
            controller_identity: controller_identity.into(),
            env: vec![],
        }
    }

    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running agent. Killed on drop.
#[derive(Debug)]
pub struct AgentProc {
    child: Child,
    pub member: String,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    /// Starts the agent on free loopback ports and waits for its `ready` line.
    pub fn spawn(spec: &AgentSpec) -> Result<Self> {
        Self::spawn_with(&agent_binary()?, spec)
    }

    /// Starts `binary` as the agent.
    pub fn spawn_with(binary: &std::path::Path, spec: &AgentSpec) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-agent-")
            .tempdir()?;
        let log = dir.path().join("agent.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("STILLPOINT_MEMBER", &spec.member)
            .env("STILLPOINT_ENGINE", &spec.engine)
            .env("STILLPOINT_LISTEN_ADDR", "127.0.0.1:0")
            .env("STILLPOINT_ADMIN_ADDR", "127.0.0.1:0")
            .env("STILLPOINT_TLS_CERT", &spec.tls.cert)
            .env("STILLPOINT_TLS_KEY", &spec.tls.key)
            .env("STILLPOINT_TLS_CA", &spec.tls.ca)
            .env("STILLPOINT_CONTROLLER_IDENTITY", &spec.controller_identity)
            .env("STILLPOINT_LOG", "info,stillpoint_agent=debug")
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let child = cmd.spawn().context("starting stillpoint-agent")?;
        let mut agent = AgentProc {
            child,
            member: spec.member.clone(),
            grpc: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            log,
            _dir: dir,
        };
        let mut ready = None;
        wait_for("agent ready", Duration::from_secs(20), || {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited ({status}) before it was ready:\n{}",
                    agent.logs()
                );
            }
            ready = agent
                .logs()
                .lines()
                .find(|l| l.contains(" ready "))
                .map(str::to_string);
            Ok(ready.is_some())
        })?;
        let line = ready.unwrap();
        let field = |name: &str| -> Result<SocketAddr> {
            let start = line
                .find(&format!("{name}="))
                .ok_or_else(|| anyhow!("no {name}= in {line}"))?;
            let value = line[start + name.len() + 1..]
                .split_whitespace()
                .next()
                .unwrap_or_default();
            Ok(value.parse()?)
        };
        agent.grpc = field("grpc")?;
        agent.admin = field("admin")?;
        Ok(agent)
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, bound: Duration) -> Result<()> {
        wait_for(&format!("agent log line {needle:?}"), bound, || {
            Ok(self.logs().contains(needle))
        })
        .with_context(|| self.logs())
    }

    pub fn grpc_addr(&self) -> String {
        self.grpc.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(&mut self, bound: Duration) -> Result<ExitStatus> {
        signal(self.child.id(), "TERM");
        self.wait_exit(bound)
    }

    pub fn wait_exit(&mut self, bound: Duration) -> Result<ExitStatus> {
        let mut status = None;
        wait_for("agent exit", bound, || {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        })?;
        Ok(status.unwrap())
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET a path on the admin listener; returns (status line, body).
    pub fn admin_get(&self, path: &str) -> Result<(String, String)> {
        super::http_get(self.admin, path)
    }

    /// One sample of a metric from `/metrics` (sum over matching lines).
    pub fn metric(&self, prefix: &str) -> Result<f64> {
        Ok(super::metric_sum(&self.admin_get("/metrics")?.1, prefix))
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}
