//! stillpoint-agent: wiring only. Configuration comes from `STILLPOINT_*`
//! environment variables (see `config.rs` and `docs/src/agent.md`); a bad
//! configuration exits 64 after listing every problem.
//!
//! The agent runs on one thread (tokio's current-thread runtime). Every
//! step of a freeze — the controller's message, the database's answer, the
//! reply — is a task woken by the one before it; on a second worker thread
//! each such wake-up is a hand-over to a thread that must first be
//! scheduled, which on a busy node costs more than the step. Nothing in the
//! agent blocks its thread: the database drivers are asynchronous, and
//! `FIFREEZE`, `FITHAW` and `syncfs(2)` run on tokio's blocking pool.

use std::process::ExitCode;

use stillpoint_agent::config::{self, Config, LogFormat};

/// sysexits' EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    if std::env::var_os(stillpoint_agent::watchdog::WATCHDOG_ENV).is_some() {
        return ExitCode::from(stillpoint_agent::watchdog::run() as u8);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("--version" | "-V") => {
            println!("stillpoint-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            print_help();
            return ExitCode::SUCCESS;
        }
        Some("restore") if args.len() == 1 => return restore(),
        Some(_) => {
            eprintln!(
                "stillpoint-agent takes no arguments but `restore`: it is configured by STILLPOINT_* \
                 environment variables (credentials too, never the command line). See --help."
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("stillpoint-agent: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("stillpoint-agent: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(stillpoint_agent::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// `stillpoint-agent restore`: prepares a restored data directory, then
/// exits (see `restore.rs`).
fn restore() -> ExitCode {
    use stillpoint_agent::restore::{RestoreConfig, run};
    let config = match RestoreConfig::from_source(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!(
                "stillpoint-agent restore: invalid configuration ({} problem(s)):",
                problems.len()
            );
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(&config) {
        Ok(done) => {
            println!("stillpoint-agent restore: {done}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("stillpoint-agent restore: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config::DEFAULT_LOG));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn print_help() {
    println!(
        "stillpoint-agent {}\n\n\
         Holds one database member's freeze under a lease and serves the agent API over mTLS.\n\
         Configured only by environment variables (see docs/src/agent.md for each key's meaning):\n",
        env!("CARGO_PKG_VERSION")
    );
    for key in config::ALL_KEYS {
        println!("  {key}");
    }
    println!(
        "\n`stillpoint-agent restore` prepares a restored data directory before its server starts,\n\
         then exits: {} (required); {} and {} to write a PostgreSQL backup label\n\
         ({} optional); {} to rename the original's hosts in replication settings.",
        stillpoint_agent::restore::ENV_RESTORE_DATA_DIR,
        stillpoint_agent::restore::ENV_RESTORE_FROM,
        stillpoint_agent::restore::ENV_RESTORE_MEMBER,
        stillpoint_agent::restore::ENV_RESTORE_WAL_FROM,
        stillpoint_agent::restore::ENV_RESTORE_HOSTS
    );
    println!("\nExit codes: 0 stopped cleanly, 1 runtime failure, 64 bad configuration.");
}
