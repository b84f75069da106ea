//! A minimal plain-HTTP/1 listener for the admin endpoints (`/healthz`,
//! `/metrics`) that both programs serve.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The content type of the Prometheus/OpenMetrics exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Plain text.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// One answer: status, content type and body.
pub type Answer = (StatusCode, &'static str, String);

/// Serves `respond(method, path)` on every connection until the task is dropped.
pub async fn serve<F>(listener: TcpListener, respond: F)
where
    F: Fn(&Method, &str) -> Answer + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (status, content_type, body) = respond(request.method(), request.uri().path());
                let response = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts are valid");
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The answer for a path the listener does not serve.
pub fn not_found() -> Answer {
    (
        StatusCode::NOT_FOUND,
        TEXT,
        "not found: try /healthz or /metrics\n".to_string(),
    )
}
