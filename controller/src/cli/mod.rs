//! The `stillpoint` command line: one file per command group.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::core::agents::ControllerTls;
use crate::local::catalog::Catalog;
use crate::local::config::Config;
use crate::local::orchestrator::Orchestrator;

pub mod backup;
pub mod certs;
pub mod config;
pub mod controller;
pub mod kube;
pub mod lab;
pub mod output;
pub mod plan;
pub mod quiesce;
pub mod restore;
pub mod serve;
pub mod status;

/// Stillpoint: application-consistent, group-consistent backups of stateful applications.
#[derive(Debug, Parser)]
#[command(name = "stillpoint", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Local-mode configuration file.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "STILLPOINT_CONFIG",
        default_value = "stillpoint.toml"
    )]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    pub output: output::Output,
    /// Write the controller's metrics (Prometheus text) to this file when
    /// the command ends, for a node-exporter textfile collector.
    #[arg(long, global = true, env = "STILLPOINT_METRICS_FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Kubernetes mode: GroupBackups and ConsistencyGroups through the API
    /// server (the default when the local config file does not exist but
    /// a kubeconfig or an in-cluster ServiceAccount does).
    #[arg(long, global = true, env = "STILLPOINT_KUBE")]
    pub kube: bool,
    /// Kubernetes mode: the namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', global = true, env = "STILLPOINT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes mode: the kubeconfig file (default: KUBECONFIG,
    /// ~/.kube/config, or the in-cluster ServiceAccount).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the kubeconfig context (default: its current
    /// context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Log filter for the controller's own logs (stderr).
    #[arg(long, global = true, env = "STILLPOINT_LOG", default_value = "warn")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a CA and issue mTLS identities for the controller and agents.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Take, list, describe and delete group backups.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Validate the configuration file.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Freeze a group or member and keep it frozen (renewing) until Ctrl-C or
    /// --for (in Kubernetes mode: a GroupQuiesce, held by the controller).
    Quiesce(quiesce::QuiesceArgs),
    /// Break the hold on a group or member, whoever owns it (in Kubernetes
    /// mode: delete its GroupQuiesces and wait until they thawed).
    Thaw(status::TargetArgs),
    /// Agents' reachability, engine, role, position and replica lag.
    Status(status::StatusArgs),
    /// Print a backup's recovery plan: stages in order, each member's
    /// consistency method and the position each replica must reach.
    Plan(plan::PlanArgs),
    /// Restore a backup's volumes, stage by stage, with each member's consistency method
    /// (Kubernetes mode: create a GroupRestore and follow it).
    Restore(restore::RestoreArgs),
    /// Run the configured schedules (with retention) and serve /metrics,
    /// until SIGTERM or Ctrl-C (which abort and thaw any backup in flight).
    Serve(serve::ServeArgs),
    /// Kubernetes mode's control plane: reconcile ConsistencyGroups and
    /// GroupBackups while holding the leader Lease; serve /metrics,
    /// /healthz and /readyz. SIGTERM aborts and thaws any backup in flight.
    Controller(Box<controller::ControllerArgs>),
    /// Print the CustomResourceDefinitions (YAML), as deploy/crds/ holds them.
    Crds,
    /// Run the whole thing on this machine: six real databases on btrfs,
    /// six agents, a causal workload, group backups, restore and checks
    /// (runs `stillpoint-lab demo`; `stillpoint demo --help` for options).
    Demo(lab::LabArgs),
    /// Run the benchmark suite: freeze window against exec hooks, fan-out,
    /// application stall under pgbench, controller memory, flush cost, and
    /// (`--parts kube`, from a checkout) the window in the Kubernetes lab.
    /// Prints tables and writes JSON (runs `stillpoint-lab bench`; `--help`
    /// for options).
    Bench(lab::LabArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The command line as `kubectl stillpoint` (a `kubectl-stillpoint`
/// binary on the PATH): named so in its help, and in Kubernetes mode.
pub fn kubectl_plugin() -> clap::Command {
    Cli::command()
        .name("kubectl-stillpoint")
        .bin_name("kubectl stillpoint")
        .display_name("kubectl stillpoint")
        .about(
            "Stillpoint as a kubectl plugin: consistency-group backups, quiesce and restore \
             in Kubernetes mode (the same commands as `stillpoint --kube`)",
        )
}

/// Parses the command line of `kubectl stillpoint`: always Kubernetes mode.
pub fn parse_kubectl_plugin() -> Cli {
    use clap::FromArgMatches;
    let matches = kubectl_plugin().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.global.kube = true;
    cli
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.global.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    crate::rlimit::raise_open_files();
    let metrics_file = cli.global.metrics_file.clone();
    let result = dispatch(cli);
    if let Some(path) = metrics_file {
        let tmp = path.with_extension("prom.tmp");
        std::fs::write(&tmp, crate::metrics::metrics().encode())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing the metrics to {}", path.display()))?;
    }
    result
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let kube_command = matches!(
        cli.command,
        Command::Backup(_)
            | Command::Status(_)
            | Command::Plan(_)
            | Command::Quiesce(_)
            | Command::Thaw(_)
            | Command::Restore(_)
    );
    if kube_command && kube::wanted(&cli.global) {
        return kube::dispatch(cli.command, &cli.global);
    }
    match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Backup(command) => backup::run(command, &cli.global),
        Command::Config(command) => config::run(command, &cli.global),
        Command::Quiesce(args) => quiesce::run(args, &cli.global),
        Command::Thaw(args) => status::thaw(args, &cli.global),
        Command::Status(args) => status::run(args, &cli.global),
        Command::Plan(args) => plan::run(args, &cli.global),
        Command::Restore(args) => restore::run(args, &cli.global),
        Command::Serve(args) => serve::run(args, &cli.global),
        Command::Controller(args) => controller::run(*args, &cli.global),
        Command::Crds => controller::crds(),
        Command::Demo(args) => lab::run("demo", args),
        Command::Bench(args) => lab::run("bench", args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "stillpoint",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// The two-thread runtime the commands run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// The local-mode configuration and what hangs off it.
#[derive(Debug)]
pub struct Local {
    pub config: Config,
}

impl Local {
    pub fn load(global: &Global) -> anyhow::Result<Local> {
        let config = Config::load(&global.config)?;
        Ok(Local { config })
    }

    pub fn catalog(&self) -> anyhow::Result<Catalog> {
        Catalog::open(&self.config.catalog).with_context(|| {
            format!(
                "the catalog {} is not usable (set `catalog` in {})",
                self.config.catalog.display(),
                self.config.path.display()
            )
        })
    }

    /// The controller's TLS. Must run inside the runtime.
    pub fn tls(&self) -> anyhow::Result<ControllerTls> {
        ControllerTls::watch(self.config.tls.clone(), Duration::from_secs(10)).with_context(|| {
            format!(
                "the controller's certificates are not usable (the [tls] section of {}; \
                 `stillpoint certs issue` makes them)",
                self.config.path.display()
            )
        })
    }

    pub fn orchestrator(&self) -> anyhow::Result<Orchestrator> {
        Ok(Orchestrator {
            tls: self.tls()?,
            catalog: self.catalog()?,
        })
    }
}
