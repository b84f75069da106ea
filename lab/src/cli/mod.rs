//! The `stillpoint-lab` command line.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod demo;

/// Stillpoint's lab: the demo and the benchmarks, on real servers on this
/// machine (as root).
#[derive(Debug, Parser)]
#[command(name = "stillpoint-lab", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole thing on this machine: six real databases on btrfs,
    /// six agents, a causal workload, group backups, restore and checks.
    Demo(demo::DemoArgs),
    /// Run the benchmark suite: freeze window against exec hooks, fan-out,
    /// application stall under pgbench, controller memory. Prints a table
    /// and writes JSON.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    stillpoint_controller::rlimit::raise_open_files();
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
