//! The agent's mTLS listener: every connection must present a controller
//! certificate from the configured CA carrying the controller identity.
//! Refusals are logged with their reason and counted; the certificate files
//! are re-read when they change.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use stillpoint_proto::tls::{self as sptls, Credentials, TlsError, TlsFiles};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::metrics::{CauseLabel, Metrics};

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub identity: Option<String>,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.addr,
            self.identity.as_deref().unwrap_or("no identity")
        )
    }
}

/// An accepted, authenticated connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The server TLS configuration, kept current from the files on disk.
pub fn watch_server_config(
    files: TlsFiles,
    controller_identity: String,
    reload_interval: Duration,
    metrics: Arc<Metrics>,
) -> Result<watch::Receiver<Arc<rustls::ServerConfig>>, TlsError> {
    let mut first = true;
    let (rx, _task) = sptls::watch_files(files, reload_interval, move |creds: &Credentials| {
        if !first {
            metrics.tls_reloads.inc();
        }
        first = false;
        sptls::server_config(creds, &controller_identity)
    })?;
    Ok(rx)
}

/// Accepts TCP connections, runs each handshake in its own task (bounded by
/// `handshake_timeout`) and yields the authenticated ones.
pub fn accept(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
) -> mpsc::Receiver<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                let result = match handshake {
                    Ok(result) => result,
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake timed out",
                    )),
                };
                match result {
                    Ok(stream) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|cert| sptls::uri_sans(cert).ok())
                            .and_then(|uris| uris.into_iter().next());
                        let peer = PeerInfo { addr, identity };
                        tracing::debug!(%peer, "mTLS connection accepted");
                        let _ = tx.send(Ok(TlsConn { stream, peer })).await;
                    }
                    Err(err) => {
                        let reason = sptls::refusal_reason(&err);
                        metrics
                            .tls_refusals
                            .get_or_create(&CauseLabel {
                                cause: refusal_label(&reason).into(),
                            })
                            .inc();
                        tracing::warn!(peer = %addr, %reason, "connection refused");
                    }
                }
            });
        }
    });
    rx
}

fn refusal_label(reason: &str) -> &'static str {
    if reason.contains("no client certificate") {
        "no_client_certificate"
    } else if reason.contains("not issued by the configured CA") {
        "unknown_ca"
    } else if reason.contains("expired") || reason.contains("not valid yet") {
        "validity"
    } else if reason.contains("expected spiffe") || reason.contains("expected ") {
        "identity"
    } else if reason.contains("not a TLS client") {
        "not_tls"
    } else if reason.contains("timed out") {
        "timeout"
    } else {
        "other"
    }
}
