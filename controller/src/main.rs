//! `stillpoint`: command dispatch only.

use std::process::ExitCode;

use clap::Parser;
use stillpoint_controller::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("stillpoint: {err:#}");
            ExitCode::FAILURE
        }
    }
}
