//! Mutual TLS between the controller and the agents, with identities.
//!
//! Both ends present a certificate issued by the same CA and carry a
//! SPIFFE-style URI SAN (`spiffe://<trust-domain>/ns/<ns>/sa/<name>`):
//!
//! - the agent accepts a client only if its chain verifies against the CA
//!   *and* its URI SAN is the configured controller identity
//!   ([`server_config`]);
//! - the controller accepts an agent only if its chain verifies against the
//!   CA *and* its URI SAN is the identity expected for that member
//!   ([`client_config`]). Agents are dialled by pod IP, so DNS names are not
//!   what is checked.
//!
//! Certificate, key and CA files are re-read when they change on disk
//! ([`watch_files`]), so rotating a mounted Secret needs no restart.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use tokio::sync::watch;

/// ALPN protocol spoken over the TLS connection (gRPC is HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Where a certificate, its key and the trusted CA are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files a `stillpoint certs issue --out DIR` directory holds.
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("CA file {path} is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not make a usable identity: {reason}")]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Certificates, key and CA as read from disk.
#[derive(Clone)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
    /// The URI SAN of our own certificate, when it has one.
    pub identity: Option<String>,
    files: TlsFiles,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads and checks the three files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = read_certs("certificate", &files.cert)?;
        let key = read_key(&files.key)?;
        let ca = read_certs("CA", &files.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let identity = uri_sans(&chain[0]).ok().and_then(|u| u.into_iter().next());
        let creds = Credentials {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            identity,
            files: files.clone(),
        };
        // Catch a key that does not match its certificate now, not at the
        // first handshake.
        provider()
            .key_provider
            .load_private_key(creds.key.clone_key())
            .map_err(|e| creds.identity_error(e.to_string()))?;
        Ok(creds)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn identity_error(&self, reason: String) -> TlsError {
        TlsError::BadIdentity {
            cert: self.files.cert.clone(),
            key: self.files.key.clone(),
            reason,
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            what: "key",
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: "key",
            path: path.to_path_buf(),
            expected: "PRIVATE KEY",
        })
}

/// The crypto provider used on both ends (ring: small and quick to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// The validity window (`notBefore`, `notAfter`, Unix seconds) of the
/// first certificate in `pem`.
pub fn pem_validity(pem: &str) -> Result<(i64, i64), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM")?
        .map_err(|e| e.to_string())?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Checks the form `spiffe://<trust-domain>/<path>` of an identity.
pub fn validate_identity(identity: &str) -> Result<(), String> {
    let Some(rest) = identity.strip_prefix("spiffe://") else {
        return Err(format!(
            "identity '{identity}' must be a URI of the form spiffe://<trust-domain>/ns/<namespace>/sa/<name>"
        ));
    };
    match rest.split_once('/') {
        Some((domain, path)) if !domain.is_empty() && !path.is_empty() => Ok(()),
        _ => Err(format!(
            "identity '{identity}' needs a trust domain and a path, e.g. spiffe://cluster.local/ns/stillpoint/sa/controller"
        )),
    }
}

fn check_identity(
    cert: &CertificateDer<'_>,
    expected: &str,
    who: &str,
) -> Result<(), rustls::Error> {
    let sans = uri_sans(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if sans.iter().any(|uri| uri == expected) {
        return Ok(());
    }
    let got = if sans.is_empty() {
        "no URI SAN".to_string()
    } else {
        format!("identity {}", sans.join(", "))
    };
    Err(rustls::Error::General(format!(
        "{who} presented {got}, expected {expected}"
    )))
}

/// Agent side: client certificates must chain to the CA and carry `controller_identity`.
#[derive(Debug)]
struct ControllerIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expected: String,
}

impl ClientCertVerifier for ControllerIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.expected, "client")?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The agent's server configuration: requires a client certificate from the
/// CA carrying `controller_identity`.
pub fn server_config(
    creds: &Credentials,
    controller_identity: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(creds.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: creds.files.ca.clone(),
            reason: e.to_string(),
        })?;
    let verifier = ControllerIdentityVerifier {
        inner,
        expected: controller_identity.to_string(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| creds.identity_error(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| creds.identity_error(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Controller side: the agent's certificate must chain to the CA and carry
/// the identity expected for that member. The DNS name is not checked.
#[derive(Debug)]
struct AgentIdentityVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: String,
}

impl ServerCertVerifier for AgentIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_identity(end_entity, &self.expected, "agent")?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The controller's client configuration for one agent whose certificate
/// must carry `agent_identity`.
pub fn client_config(
    creds: &Credentials,
    agent_identity: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = AgentIdentityVerifier {
        roots: creds.roots.clone(),
        algorithms: provider.signature_verification_algorithms,
        expected: agent_identity.to_string(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| creds.identity_error(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| creds.identity_error(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A short, loggable reason for a failed handshake.
pub fn refusal_reason(err: &io::Error) -> String {
    use rustls::Error as E;
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => "connection closed during the TLS handshake".into(),
            io::ErrorKind::TimedOut => "TLS handshake timed out".into(),
            _ => err.to_string(),
        };
    };
    match tls {
        E::NoCertificatesPresented => "no client certificate presented".into(),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "certificate not issued by the configured CA".into()
        }
        // An issuer with the CA's name whose signature does not verify: another CA.
        E::InvalidCertificate(CertificateError::BadSignature) => {
            "certificate not issued by the configured CA (signature does not verify)".into()
        }
        E::InvalidCertificate(CertificateError::InvalidPurpose)
        | E::InvalidCertificate(CertificateError::InvalidPurposeContext { .. }) => {
            "certificate is not issued for this use (extended key usage)".into()
        }
        E::InvalidCertificate(CertificateError::Expired)
        | E::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "certificate has expired".into()
        }
        E::InvalidCertificate(CertificateError::NotValidYet)
        | E::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "certificate is not valid yet".into()
        }
        E::InvalidMessage(_) => "not a TLS client (plaintext or another protocol)".into(),
        E::General(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// Keeps a value built from TLS files current: the files are re-read every
/// `interval` and, when their bytes changed and they load cleanly, `build`
/// makes a new value that is published on the returned channel. A bad
/// update is logged and the previous value stays in use.
pub fn watch_files<T, F>(
    files: TlsFiles,
    interval: Duration,
    mut build: F,
) -> Result<(watch::Receiver<Arc<T>>, tokio::task::JoinHandle<()>), TlsError>
where
    T: Send + Sync + 'static,
    F: FnMut(&Credentials) -> Result<T, TlsError> + Send + 'static,
{
    let initial = build(&Credentials::load(&files)?)?;
    let mut seen = fingerprint(&files);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            let now = fingerprint(&files);
            if now == seen {
                continue;
            }
            match Credentials::load(&files).and_then(|c| build(&c).map(|v| (c, v))) {
                Ok((creds, value)) => {
                    tracing::info!(
                        cert = %files.cert.display(),
                        identity = creds.identity.as_deref().unwrap_or("-"),
                        "TLS credentials changed on disk; reloaded"
                    );
                    seen = now;
                    let _ = tx.send(Arc::new(value));
                }
                // A Secret update may land file by file: keep the old value
                // and try again next tick.
                Err(err) => {
                    tracing::warn!(%err, "TLS credentials changed but cannot be used yet; keeping the previous ones")
                }
            }
        }
    });
    Ok((rx, task))
}

fn fingerprint(files: &TlsFiles) -> Vec<Option<Vec<u8>>> {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| std::fs::read(p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_must_be_spiffe_uris() {
        assert!(validate_identity("spiffe://cluster.local/ns/db/sa/controller").is_ok());
        assert!(validate_identity("https://example/x").is_err());
        assert!(validate_identity("spiffe://only-domain").is_err());
        assert!(validate_identity("spiffe:///path").is_err());
    }
}
