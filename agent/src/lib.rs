//! stillpoint-agent: a sidecar that holds one database member's freeze.
//!
//! - [`config`]: every `STILLPOINT_*` key, parsed all at once.
//! - [`tls`]: the mTLS listener that admits only the controller identity.
//! - [`server`]: the gRPC service (Describe, Position, Prepare, Freeze, Thaw,
//!   WaitForPosition).
//! - [`hold`]: the lease: one hold at a time, renewal, expiry, takeover.
//! - [`engine`]: the per-database engines behind one trait.
//! - [`durable`]: the flush's `syncfs(2)` on the member's volumes.
//! - [`mounts`]: where a volume (a directory, device or image) is mounted.
//! - [`admin`] and [`metrics`]: `/healthz` and `/metrics`.
//! - [`watchdog`]: the child process that undoes holds if the agent dies.
//!
//! `unsafe` is denied everywhere but `engine::sys` (FIFREEZE, FITHAW, syncfs).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use stillpoint_proto::pb::agent_server::AgentServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

pub mod admin;
pub mod certs;
pub mod config;
pub mod durable;
pub mod engine;
pub mod hold;
pub mod metrics;
pub mod mounts;
pub mod restore;
pub mod server;
pub mod tls;
pub mod watchdog;

use config::Config;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] stillpoint_proto::tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { what, addr, source })
}

/// Runs the agent until `shutdown` resolves; then thaws whatever it holds
/// and stops serving (in-flight RPCs get `shutdown_grace`).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let metrics = Arc::new(metrics::Metrics::default());
    // Certificates from the controller: the first one before serving
    // anything (a shutdown meanwhile ends the wait), then renewed.
    let mut shutdown = std::pin::pin!(shutdown);
    let renewals = match &config.certificates {
        Some(source) => {
            let renew_at = tokio::select! {
                at = certs::obtain_until_done(source, &config.tls) => at,
                () = &mut shutdown => return Ok(()),
            };
            Some(tokio::spawn(certs::keep_renewed(
                source.clone(),
                config.tls.clone(),
                renew_at,
            )))
        }
        None => None,
    };
    let tls_config = tls::watch_server_config(
        config.tls.clone(),
        config.controller_identity.clone(),
        config.tls_reload_interval,
        metrics.clone(),
    )?;
    let grpc = bind("gRPC", config.listen_addr).await?;
    let admin = bind("admin", config.admin_addr).await?;
    let grpc_addr = grpc.local_addr().unwrap_or(config.listen_addr);
    let admin_addr = admin.local_addr().unwrap_or(config.admin_addr);

    let engine = engine::build(&config);
    // Undo what a crashed predecessor left locked before serving anything.
    match engine.recover().await {
        Ok(Some(done)) => tracing::warn!("recovered at start-up: {done}"),
        Ok(None) => {}
        Err(err) => tracing::error!(%err, "could not undo what a previous run left locked"),
    }
    let holds = hold::Holds::new(
        engine.clone(),
        config.member.clone(),
        hold::Limits {
            max_ttl: config.max_ttl,
            freeze_timeout: config.freeze_timeout,
            flush_timeout: config.flush_timeout,
            thaw_timeout: config.thaw_timeout,
        },
        metrics.clone(),
        durable::Volumes::new(config.volumes.clone()),
    );
    let service = server::AgentService {
        engine,
        holds: holds.clone(),
        member: config.member.clone(),
        max_ttl: config.max_ttl,
        max_wait: config.max_wait,
        prepare_timeout: config.prepare_timeout,
    };
    let admin_task = tokio::spawn(admin::serve(admin, metrics.clone(), holds.clone()));
    let incoming = tls::accept(grpc, tls_config, config.handshake_timeout, metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(service))
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async {
                let _ = stopped.await;
            }),
    );
    tracing::info!(
        member = %config.member,
        engine = %config.engine,
        grpc = %grpc_addr,
        admin = %admin_addr,
        controller_identity = %config.controller_identity,
        "ready"
    );

    shutdown.await;
    if let Some(renewals) = renewals {
        renewals.abort();
    }
    tracing::info!("shutting down: thawing any hold first");
    holds.shutdown().await;
    let _ = stop.send(());
    admin_task.abort();
    match tokio::time::timeout(config.shutdown_grace, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => tracing::error!(%join, "gRPC server task failed"),
        Err(_) => tracing::warn!("in-flight RPCs did not finish within the shutdown grace"),
    }
    tracing::info!("stopped");
    Ok(())
}
