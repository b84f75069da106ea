//! `stillpoint serve`: runs the configured schedules and serves
//! `/metrics` and `/healthz` until SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use hyper::{Method, StatusCode};
use stillpoint_proto::admin::{self, OPENMETRICS, TEXT};
use tokio::signal::unix::{SignalKind, signal};

use super::{Global, Local};
use crate::local::serve;
use crate::metrics::metrics;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the plain-HTTP listener for `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "STILLPOINT_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
}

pub fn run(args: ServeArgs, global: &Global) -> anyhow::Result<()> {
    let local = Local::load(global)?;
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let orchestrator = local.orchestrator()?;
        let listener = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {} (--metrics-listen)", args.metrics_listen))?;
        let schedules = local.config.schedules.len();
        let active = local.config.schedules.values().filter(|s| !s.suspend).count();
        tokio::spawn(admin::serve(listener, move |method, path| match (method, path) {
            (&Method::GET, "/healthz") => (
                StatusCode::OK,
                TEXT,
                format!("ok: {active} of {schedules} schedule(s) active\n"),
            ),
            (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics().encode()),
            _ => admin::not_found(),
        }));
        let (stop, shutdown) = tokio::sync::watch::channel(None);
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            let reason = tokio::select! {
                _ = term.recv() => "the controller received SIGTERM",
                _ = tokio::signal::ctrl_c() => "the controller was interrupted (SIGINT)",
            };
            tracing::warn!("{reason}: aborting any backup in flight, then exiting");
            let _ = stop.send(Some(reason.to_string()));
        });
        eprintln!(
            "stillpoint serve: {active} of {schedules} schedule(s) active; metrics on http://{}/metrics",
            args.metrics_listen
        );
        serve::serve(local.config.clone(), orchestrator, shutdown).await;
        eprintln!("stillpoint serve: stopped; every member thawed");
        Ok(())
    })
}
