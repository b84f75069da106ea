//! A small CA for Stillpoint identities (rcgen).
//!
//! `init` creates a CA (`ca.crt`, `ca.key`); `issue` creates a leaf with a
//! SPIFFE-style URI SAN (`tls.crt`, `tls.key`, plus a copy of `ca.crt`), the
//! layout a Kubernetes TLS Secret mounts. Leaves carry both the server and
//! client auth usages: agents serve with them, the controller dials with them.
//! Private keys are written with mode 0600; existing files are never
//! overwritten unless asked.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use stillpoint_proto::tls::validate_identity;
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const LEAF_CERT: &str = "tls.crt";
pub const LEAF_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the CA from {dir}: {reason}")]
    Ca { dir: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a minute ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Self {
        Self::lasting(std::time::Duration::from_secs(u64::from(days) * 86_400))
    }

    /// From a minute ago (clock skew) until `lifetime` from now.
    pub fn lasting(lifetime: std::time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(1),
            not_after: now + lifetime,
        }
    }
}

/// A leaf request.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The identity (a `spiffe://` URI SAN).
    pub uri: String,
    /// DNS names; an entry that parses as an IP address becomes an IP SAN.
    pub dns: Vec<String>,
    pub validity: Validity,
}

fn refuse_existing(paths: &[PathBuf], force: bool) -> Result<(), CertError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CertError::Exists(p.clone())),
        None => Ok(()),
    }
}

pub(crate) fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Write beside the target and rename, so a reader (or the agent's
    // reloader) never sees half a file, and the mode is right from the start.
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// A new self-signed CA `name`: its certificate (PEM) and key pair.
pub fn new_ca(name: &str, validity: Validity) -> Result<(String, KeyPair), CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Stillpoint");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key_pair = KeyPair::generate()?;
    let ca = params.self_signed(&key_pair)?;
    Ok((ca.pem(), key_pair))
}

/// Signs certificate request `csr_pem` (PEM) for `spec` with `issuer`:
/// only the request's public key is used; names, usages and validity are
/// `spec`'s. The certificate as PEM.
pub fn sign_csr(
    csr_pem: &str,
    spec: &LeafSpec,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<String, CertError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let signed = CertificateSigningRequestParams {
        params: leaf_params(spec)?,
        public_key: csr.public_key,
    };
    Ok(signed.signed_by(issuer)?.pem())
}

/// Creates a CA in `out` (`ca.crt`, `ca.key`).
pub fn init_ca(out: &Path, name: &str, validity: Validity, force: bool) -> Result<(), CertError> {
    let (cert, key) = (out.join(CA_CERT), out.join(CA_KEY));
    refuse_existing(&[cert.clone(), key.clone()], force)?;
    let (ca_pem, key_pair) = new_ca(name, validity)?;
    create_dir(out)?;
    write_file(&key, &key_pair.serialize_pem(), 0o600)?;
    write_file(&cert, &ca_pem, 0o644)?;
    Ok(())
}

/// The certificate parameters of a leaf: the identity `spec.uri` as its
/// only URI SAN, `spec.dns` as DNS names (or IP addresses), usable both as
/// a server and a client certificate.
pub fn leaf_params(spec: &LeafSpec) -> Result<CertificateParams, CertError> {
    validate_identity(&spec.uri).map_err(CertError::Invalid)?;
    if spec.validity.not_after <= spec.validity.not_before {
        return Err(CertError::Invalid(
            "the certificate would never be valid (not_after <= not_before)".into(),
        ));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let name = spec.uri.rsplit('/').next().unwrap_or("stillpoint");
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Stillpoint");
    params.subject_alt_names.push(SanType::URI(
        spec.uri
            .as_str()
            .try_into()
            .map_err(|_| CertError::Invalid(format!("'{}' is not a valid URI", spec.uri)))?,
    ));
    for dns in &spec.dns {
        if let Ok(ip) = dns.parse::<std::net::IpAddr>() {
            params.subject_alt_names.push(SanType::IpAddress(ip));
            continue;
        }
        params.subject_alt_names.push(SanType::DnsName(
            dns.as_str()
                .try_into()
                .map_err(|_| CertError::Invalid(format!("'{dns}' is not a valid DNS name")))?,
        ));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = spec.validity.not_before;
    params.not_after = spec.validity.not_after;
    Ok(params)
}

/// A throwaway PKI (a one-day CA in `<dir>/ca`) for the demo and the
/// benchmarks: issues leaves into `<dir>/<name>`.
#[derive(Debug)]
pub struct ScratchPki {
    dir: PathBuf,
}

impl ScratchPki {
    pub fn new(dir: &Path, ca_name: &str) -> Result<ScratchPki, CertError> {
        init_ca(&dir.join("ca"), ca_name, Validity::days(1), false)?;
        Ok(ScratchPki {
            dir: dir.to_path_buf(),
        })
    }

    /// Issues the identity `uri` into `<dir>/<name>` and returns that directory.
    pub fn issue(&self, name: &str, uri: &str) -> Result<PathBuf, CertError> {
        let out = self.dir.join(name);
        let spec = LeafSpec {
            uri: uri.into(),
            dns: vec![],
            validity: Validity::days(1),
        };
        issue(&self.dir.join("ca"), &spec, &out, false)?;
        Ok(out)
    }
}

/// Issues a leaf signed by the CA in `ca_dir` into `out`
/// (`tls.crt`, `tls.key`, `ca.crt`).
pub fn issue(ca_dir: &Path, spec: &LeafSpec, out: &Path, force: bool) -> Result<(), CertError> {
    let params = leaf_params(spec)?;
    let ca_err = |reason: String| CertError::Ca {
        dir: ca_dir.to_path_buf(),
        reason,
    };
    let ca_pem =
        fs::read_to_string(ca_dir.join(CA_CERT)).map_err(|e| ca_err(format!("{CA_CERT}: {e}")))?;
    let ca_key_pem =
        fs::read_to_string(ca_dir.join(CA_KEY)).map_err(|e| ca_err(format!("{CA_KEY}: {e}")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| ca_err(format!("{CA_KEY}: {e}")))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| ca_err(format!("{CA_CERT}: {e}")))?;

    let paths = [out.join(LEAF_CERT), out.join(LEAF_KEY), out.join(CA_CERT)];
    refuse_existing(&paths, force)?;
    let key_pair = KeyPair::generate()?;
    let cert = params.signed_by(&key_pair, &issuer)?;
    create_dir(out)?;
    write_file(&paths[1], &key_pair.serialize_pem(), 0o600)?;
    write_file(&paths[0], &cert.pem(), 0o644)?;
    write_file(&paths[2], &ca_pem, 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_proto::tls::{Credentials, TlsFiles, uri_sans};

    #[test]
    fn issued_leaf_loads_and_carries_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test CA", Validity::days(1), false).unwrap();
        let out = dir.path().join("leaf");
        let uri = "spiffe://test.local/ns/db/sa/agent";
        let spec = LeafSpec {
            uri: uri.into(),
            dns: vec!["agent.db.svc".into()],
            validity: Validity::days(1),
        };
        issue(&ca, &spec, &out, false).unwrap();
        let creds = Credentials::load(&TlsFiles::in_dir(&out)).unwrap();
        assert_eq!(uri_sans(&creds.chain[0]).unwrap(), vec![uri.to_string()]);
        let mode = fs::metadata(out.join(LEAF_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(ca.join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = issue(&ca, &spec, &out, false).unwrap_err();
        assert!(again.to_string().contains("--force"), "{again}");
        issue(&ca, &spec, &out, true).unwrap();
        assert!(init_ca(&ca, "x", Validity::days(1), false).is_err());
    }

    #[test]
    fn identities_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA", Validity::days(1), false).unwrap();
        let spec = LeafSpec {
            uri: "http://not-spiffe".into(),
            dns: vec![],
            validity: Validity::days(1),
        };
        assert!(issue(dir.path(), &spec, &dir.path().join("x"), false).is_err());
    }
}
