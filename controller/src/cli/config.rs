//! `stillpoint config check`.

use clap::Subcommand;

use super::Global;
use crate::local::config::Config;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the file: every error names its field.
    Check,
}

pub fn run(command: ConfigCommand, global: &Global) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Check => {
            let config = Config::load(&global.config)?;
            let members: usize = config.groups.values().map(|g| g.members.len()).sum();
            println!(
                "{}: ok ({} group(s), {members} member(s))",
                config.path.display(),
                config.groups.len()
            );
            Ok(())
        }
    }
}
