//! The `stillpoint` command line: one file per command group.

use clap::{Parser, Subcommand};

pub mod certs;

/// Stillpoint: application-consistent, group-consistent backups of stateful applications.
#[derive(Debug, Parser)]
#[command(name = "stillpoint", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a CA and issue mTLS identities for the controller and agents.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Certs(command) => certs::run(command),
    }
}
