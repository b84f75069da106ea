//! The admin listener: `/healthz` and Prometheus `/metrics`, plain HTTP/1.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use stillpoint_proto::admin::{self, OPENMETRICS, TEXT};
use tokio::net::TcpListener;

use crate::hold::Holds;
use crate::metrics::Metrics;

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, holds: Arc<Holds>) {
    admin::serve(listener, move |method, path| match (method, path) {
        (&Method::GET, "/healthz") => {
            let body = match holds.state() {
                Some((id, true)) => format!("ok: frozen by backup '{id}'\n"),
                Some((id, false)) => format!("ok: freezing for backup '{id}'\n"),
                None => "ok\n".to_string(),
            };
            (StatusCode::OK, TEXT, body)
        }
        (&Method::GET, "/metrics") => {
            metrics.observe_hold(holds.times());
            (StatusCode::OK, OPENMETRICS, metrics.encode())
        }
        _ => admin::not_found(),
    })
    .await
}
