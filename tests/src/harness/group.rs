//! A group of agents, a controller PKI, a catalog and a local-mode config,
//! for tests of the group backup and the CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use stillpoint_controller::core::agents::ControllerTls;
use stillpoint_controller::local::catalog::Catalog;
use stillpoint_controller::local::config::Config;
use stillpoint_controller::local::orchestrator::Orchestrator;

use super::agent::AgentProc;
use super::pki::{CONTROLLER_IDENTITY, Pki, agent_identity};

/// A PKI, a catalog and snapshot dir, and agents started from specs.
#[derive(Debug)]
pub struct Setup {
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub agents: Vec<AgentProc>,
}

impl Setup {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Setup {
        Setup {
            pki: Pki::new().unwrap(),
            dir: tempfile::Builder::new()
                .prefix("stillpoint-group-")
                .tempdir()
                .unwrap(),
            agents: Vec::new(),
        }
    }

    pub fn agent(&mut self, member: &str, engine: &str, env: &[(&str, String)]) -> String {
        let files = self.pki.issue(member, &agent_identity(member)).unwrap();
        let mut spec = super::agent::noop(member, files);
        spec.engine = engine.into();
        spec = spec.with(
            "STILLPOINT_STATE_DIR",
            self.dir.path().join(member).to_str().unwrap(),
        );
        for (k, v) in env {
            spec = spec.with(k, v);
        }
        let agent = AgentProc::spawn(&spec).unwrap();
        let addr = agent.grpc_addr();
        self.agents.push(agent);
        addr
    }

    /// Writes a local-mode config with one group and loads it.
    pub fn config(&self, group: &str, body: &str) -> Config {
        self.config_in(group, &self.snapshots(), body)
    }

    /// As [`Setup::config`], with the group's snapshots in `snapshot_dir`
    /// (btrfs snapshots must be on the volumes' filesystem).
    pub fn config_in(&self, group: &str, snapshot_dir: &Path, body: &str) -> Config {
        self.load(group, snapshot_dir, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Setup::config`], or the configuration's problems.
    pub fn config_result(&self, group: &str, body: &str) -> Result<Config, String> {
        self.load(group, &self.snapshots(), body)
    }

    fn load(&self, group: &str, snapshot_dir: &Path, body: &str) -> Result<Config, String> {
        self.pki.issue("controller", CONTROLLER_IDENTITY).unwrap();
        let text = format!(
            "catalog = \"{catalog}\"\n[tls]\ndir = \"{tls}\"\n[groups.{group}]\nsnapshot_dir = \"{snaps}\"\n{body}",
            catalog = self.dir.path().join("catalog").display(),
            tls = self.pki.path().join("controller").display(),
            snaps = snapshot_dir.display(),
        );
        let path = self.dir.path().join("stillpoint.toml");
        std::fs::write(&path, &text).unwrap();
        Config::load(&path).map_err(|e| format!("{e}\n{text}"))
    }

    pub fn orchestrator(&self, config: &Config) -> Orchestrator {
        Orchestrator {
            tls: ControllerTls::watch(config.tls.clone(), Duration::from_secs(30)).unwrap(),
            catalog: Catalog::open(&config.catalog).unwrap(),
        }
    }

    pub fn snapshots(&self) -> PathBuf {
        self.dir.path().join("snapshots")
    }
}

pub fn member(
    name: &str,
    addr: &str,
    role: &str,
    primary: Option<&str>,
    volumes: &[&Path],
) -> String {
    let volumes: Vec<String> = volumes
        .iter()
        .map(|v| format!("\"{}\"", v.display()))
        .collect();
    format!(
        "[[groups.g.members]]\nname = \"{name}\"\nagent = \"{addr}\"\nidentity = \"{}\"\nrole = \"{role}\"\n{}volumes = [{}]\n",
        agent_identity(name),
        primary
            .map(|p| format!("primary = \"{p}\"\n"))
            .unwrap_or_default(),
        volumes.join(", ")
    )
}

pub fn is_frozen(agent: &AgentProc) -> bool {
    agent.admin_get("/healthz").unwrap().1.contains("frozen by")
}

impl Setup {
    /// Agents for the shared Redis pair and their member entries
    /// (`redis-0` primary, `redis-1` its replica), each followed by `extra`.
    pub fn redis_pair_members(&mut self, extra: &str) -> String {
        let redis = super::shared::redis();
        let r0 = self.agent(
            "redis-0",
            "redis",
            &[("STILLPOINT_DSN", redis.primary.url())],
        );
        let r1 = self.agent(
            "redis-1",
            "redis",
            &[("STILLPOINT_DSN", redis.replica.url())],
        );
        format!(
            "{}{extra}{}{extra}",
            member("redis-0", &r0, "primary", None, &[&redis.primary.dir]),
            member(
                "redis-1",
                &r1,
                "replica",
                Some("redis-0"),
                &[&redis.replica.dir]
            ),
        )
    }

    /// Noop agents named `names`, each a primary on one placeholder volume
    /// (a noop server keeps no files); returns their member entries.
    pub fn noop_members(&mut self, names: &[&str]) -> String {
        let volume = self.dir.path().join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        names
            .iter()
            .map(|name| {
                let addr = self.agent(name, "noop", &[]);
                member(name, &addr, "primary", None, &[&volume])
            })
            .collect()
    }

    /// The config file `config` wrote.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("stillpoint.toml")
    }

    /// Appends to the config file (schedules, more groups).
    pub fn append_config(&self, text: &str) {
        let path = self.config_path();
        let mut body = std::fs::read_to_string(&path).unwrap();
        body.push('\n');
        body.push_str(text);
        std::fs::write(&path, body).unwrap();
    }

    /// A `stillpoint` command with the setup's config.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(super::agent::controller_binary().unwrap());
        cmd.arg("--config").arg(self.config_path()).args(args);
        cmd
    }

    /// Runs `stillpoint` with the setup's config to completion.
    pub fn stillpoint(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running stillpoint")
    }

    /// Starts `stillpoint` with the setup's config, stdout piped.
    pub fn spawn_stillpoint(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting stillpoint")
    }
}
