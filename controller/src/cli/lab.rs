//! `stillpoint demo` and `stillpoint bench`: run by the lab program
//! `stillpoint-lab` (the `stillpoint-lab` crate: local server pairs, the
//! demo and the benchmarks), which is not part of the controller.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

/// The lab program's name.
pub const PROGRAM: &str = "stillpoint-lab";

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct LabArgs {
    /// Passed on to `stillpoint-lab` (`--help` shows its options).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<OsString>,
}

/// Where `stillpoint-lab` is: beside this program, else on PATH.
pub fn program() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(PROGRAM)))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(PROGRAM))
                .find(|p| p.is_file())
        })
    })
}

/// Replaces this process with `stillpoint-lab COMMAND ARGS...`, so its
/// output, signals and exit code are the command's own.
pub fn run(command: &str, args: LabArgs) -> anyhow::Result<()> {
    let Some(lab) = program() else {
        bail!(
            "`stillpoint {command}` is run by the lab program `{PROGRAM}`, which is neither \
             beside this program nor on PATH: build it with `cargo build -p stillpoint-lab` \
             (`cargo xtask demo` does), or run `cargo xtask demo`"
        );
    };
    let err = std::process::Command::new(&lab)
        .arg(command)
        .args(args.args)
        .exec();
    bail!("starting {}: {err}", lab.display())
}
