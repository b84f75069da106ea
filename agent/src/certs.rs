//! Certificates from the controller (`STILLPOINT_CERT_URL`): at start, and
//! again two thirds of the way through each certificate's life, the agent
//! makes a new key, sends a certificate request to the controller
//! authenticated by its projected ServiceAccount token, and writes the
//! answer to its TLS files (`tls.key`, `tls.crt`, and the CA bundle), which
//! the server reloads without a restart. The key never leaves the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use stillpoint_proto::tls::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one request to the controller (connect, TLS, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Retry backoff after a failed request.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct CertSource {
    /// `https://host:port/path` of the controller's certificate endpoint.
    pub url: String,
    /// The projected ServiceAccount token (re-read for every request: the
    /// kubelet rotates it).
    pub token_file: PathBuf,
    /// The CA bundle that issues the endpoint's serving certificate.
    pub ca_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} is not an https:// URL with a host")]
    Url(String),
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("making the key and request: {0}")]
    Generate(String),
    #[error("the trust bundle {0} holds no usable certificate")]
    Trust(PathBuf),
    #[error("reaching {0}: {1}")]
    Connect(String, String),
    #[error("the controller refused the certificate request ({0}): {1}")]
    Refused(u16, String),
    #[error("the controller's answer is not usable: {0}")]
    Answer(String),
}

/// A parsed `https://host:port/path`.
fn split_url(url: &str) -> Result<(String, u16, String), CertError> {
    let bad = || CertError::Url(url.to_string());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port, path.to_string()))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    crate::durable::write_file(path, contents, mode, None)
        .map_err(|e| CertError::Write(path.to_path_buf(), e))
}

/// The roots the endpoint is checked against: the configured bundle, plus
/// the bundle of the last answer (which carries a rotated CA first).
fn roots(source: &CertSource, tls: &TlsFiles) -> Result<rustls::RootCertStore, CertError> {
    let mut store = rustls::RootCertStore::empty();
    for file in [&source.ca_file, &tls.ca] {
        let Ok(pem) = std::fs::read(file) else {
            continue;
        };
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = store.add(cert);
        }
    }
    if store.is_empty() {
        return Err(CertError::Trust(source.ca_file.clone()));
    }
    Ok(store)
}

/// One HTTPS POST; returns the status and the body.
async fn post(
    source: &CertSource,
    tls: &TlsFiles,
    token: &str,
    body: &str,
) -> Result<(u16, String), CertError> {
    let (host, port, path) = split_url(&source.url)?;
    let config = rustls::ClientConfig::builder_with_provider(stillpoint_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Connect(source.url.clone(), e.to_string()))?
        .with_root_certificates(roots(source, tls)?)
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.clone()).map_err(|_| CertError::Url(source.url.clone()))?;
    let connect = |e: &dyn std::fmt::Display| CertError::Connect(source.url.clone(), e.to_string());
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| connect(&e))?;
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| connect(&e))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/pkcs10\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| connect(&e))?;
        let mut response = Vec::new();
        // A peer that closes without close_notify still sent its answer.
        let _ = stream.read_to_end(&mut response).await;
        Ok::<_, CertError>(response)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| connect(&format!("no answer within {REQUEST_TIMEOUT:?}")))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| CertError::Answer("not an HTTP response".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| CertError::Answer("no HTTP status".into()))?;
    Ok((status, body.to_string()))
}

/// Obtains a certificate now and writes the TLS files. Returns when the
/// next renewal is due.
pub async fn obtain(source: &CertSource, tls: &TlsFiles) -> Result<SystemTime, CertError> {
    let token = std::fs::read_to_string(&source.token_file)
        .map_err(|e| CertError::Read(source.token_file.clone(), e))?;
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Generate(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let (status, body) = post(source, tls, token.trim(), &csr).await?;
    if status != 200 {
        return Err(CertError::Refused(status, body.trim().to_string()));
    }
    let answer: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| CertError::Answer(e.to_string()))?;
    let field = |name: &str| {
        answer
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| CertError::Answer(format!("no {name}")))
    };
    let cert = field("certificate")?;
    let bundle = field("caBundle")?;
    let renew_at = renewal_time(&cert)?;
    // The bundle first (it may hold a new CA the certificate chains to),
    // then the key, then the certificate: the reloader takes a key and a
    // certificate that match or keeps what it has.
    write_atomic(&tls.ca, bundle.as_bytes(), 0o644)?;
    write_atomic(&tls.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&tls.cert, cert.as_bytes(), 0o644)?;
    Ok(renew_at)
}

/// Two thirds of the way through the certificate's life.
fn renewal_time(pem: &str) -> Result<SystemTime, CertError> {
    let (from, to) = stillpoint_proto::tls::pem_validity(pem).map_err(CertError::Answer)?;
    let at = from + (to - from) * 2 / 3;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64))
}

/// Obtains the first certificate, retrying with a backoff until it has one.
pub async fn obtain_until_done(source: &CertSource, tls: &TlsFiles) -> SystemTime {
    let mut wait = RETRY_MIN;
    loop {
        match obtain(source, tls).await {
            Ok(renew_at) => {
                tracing::info!(url = %source.url, "obtained a certificate from the controller");
                return renew_at;
            }
            Err(err) => {
                tracing::warn!(%err, "no certificate yet; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Renews forever: at each renewal time, and after a failure with a backoff.
pub async fn keep_renewed(source: CertSource, tls: TlsFiles, mut renew_at: SystemTime) {
    loop {
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        renew_at = obtain_until_done(&source, &tls).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("https://ctl.ns.svc:9444/v1/certificate").unwrap(),
            ("ctl.ns.svc".into(), 9444, "/v1/certificate".into())
        );
        assert_eq!(
            split_url("https://10.1.2.1/x").unwrap(),
            ("10.1.2.1".into(), 443, "/x".into())
        );
        assert_eq!(
            split_url("https://[::1]:8443/x").unwrap(),
            ("::1".into(), 8443, "/x".into())
        );
        for bad in ["http://x/y", "https://", "https://:9/x", "https://h:port/x"] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
