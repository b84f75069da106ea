//! `stillpoint-lab`: command dispatch only.

use std::process::ExitCode;

use clap::Parser;
use stillpoint_lab::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stillpoint-lab: {err:#}");
            ExitCode::FAILURE
        }
    }
}
