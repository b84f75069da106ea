//! `stillpoint certs init|issue`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::certs::{self, LeafSpec, Validity};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA (ca.crt, ca.key) in a directory.
    Init(InitArgs),
    /// Issue a certificate with a URI SAN identity (tls.crt, tls.key, ca.crt).
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write ca.crt and ca.key (mode 0600) into.
    #[arg(long)]
    pub out: PathBuf,
    /// Common name of the CA.
    #[arg(long, default_value = "Stillpoint CA")]
    pub name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Directory holding the CA's ca.crt and ca.key.
    #[arg(long)]
    pub ca: PathBuf,
    /// Identity URI SAN, e.g. spiffe://cluster.local/ns/stillpoint/sa/stillpoint-controller.
    #[arg(long)]
    pub uri: String,
    /// Additional DNS SANs (repeatable).
    #[arg(long)]
    pub dns: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Directory to write tls.crt, tls.key (mode 0600) and ca.crt into.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init(args) => {
            anyhow::ensure!(args.days > 0, "--days must be at least 1");
            certs::init_ca(&args.out, &args.name, Validity::days(args.days), args.force)
                .with_context(|| format!("creating a CA in {}", args.out.display()))?;
            println!(
                "created CA in {} ({}, {})",
                args.out.display(),
                certs::CA_CERT,
                certs::CA_KEY
            );
        }
        CertsCommand::Issue(args) => {
            anyhow::ensure!(args.days > 0, "--days must be at least 1");
            let spec = LeafSpec {
                uri: args.uri.clone(),
                dns: args.dns,
                validity: Validity::days(args.days),
            };
            certs::issue(&args.ca, &spec, &args.out, args.force)
                .with_context(|| format!("issuing {} into {}", args.uri, args.out.display()))?;
            println!(
                "issued {} in {} ({}, {}, {})",
                args.uri,
                args.out.display(),
                certs::LEAF_CERT,
                certs::LEAF_KEY,
                certs::CA_CERT
            );
        }
    }
    Ok(())
}
