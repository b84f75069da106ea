//! Throwaway PKI: a CA and identities made with `stillpoint`'s own cert code.

use std::path::{Path, PathBuf};

use anyhow::Result;
use stillpoint_controller::certs::{self, LeafSpec, Validity};
use stillpoint_proto::tls::TlsFiles;

/// The controller identity every test agent accepts.
pub const CONTROLLER_IDENTITY: &str = "spiffe://stillpoint.test/ns/stillpoint/sa/controller";

/// The identity of a test agent for `member`.
pub fn agent_identity(member: &str) -> String {
    format!("spiffe://stillpoint.test/ns/db/sa/{member}")
}

/// A CA in a temp dir, and the identities issued from it.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-pki-")
            .tempdir()?;
        certs::init_ca(
            &dir.path().join("ca"),
            "Stillpoint test CA",
            Validity::days(2),
            false,
        )?;
        Ok(Pki { dir })
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues `uri` into `<pki>/<name>/` and returns its files.
    pub fn issue(&self, name: &str, uri: &str) -> Result<TlsFiles> {
        self.issue_with(name, uri, Validity::days(1))
    }

    pub fn issue_with(&self, name: &str, uri: &str, validity: Validity) -> Result<TlsFiles> {
        let out = self.dir.path().join(name);
        let spec = LeafSpec {
            uri: uri.to_string(),
            dns: vec![],
            validity,
        };
        certs::issue(&self.ca_dir(), &spec, &out, true)?;
        Ok(TlsFiles::in_dir(&out))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
