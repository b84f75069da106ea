//! The agent binary as a child process: `stillpoint_lab::servers::agent`,
//! plus the tests' default spec.
pub use stillpoint_lab::servers::agent::*;
use stillpoint_proto::tls::TlsFiles;

/// A noop agent accepting the tests' controller identity.
pub fn noop(member: &str, tls: TlsFiles) -> AgentSpec {
    AgentSpec::new(member, "noop", tls, super::pki::CONTROLLER_IDENTITY)
}
