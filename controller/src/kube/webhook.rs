//! The controller's HTTPS endpoint (rustls, a serving certificate from the
//! in-cluster CA): the sidecar-injecting mutating webhook and the agents'
//! certificate endpoint.
//!
//! - `POST /mutate`: an `admission.k8s.io/v1` AdmissionReview for a pod
//!   (`crate::kube::inject` decides).
//! - `POST /v1/certificate`: a PEM certificate request, authenticated by
//!   `Authorization: Bearer <projected ServiceAccount token>` (audience
//!   `stillpoint`). The token is checked with a TokenReview; the pod it is
//!   bound to must exist, carry the opt-in label and run as that
//!   ServiceAccount. The answer is JSON `{"certificate", "caBundle",
//!   "notAfter"}`: a short-lived certificate for
//!   `spiffe://<trust-domain>/ns/<ns>/sa/<serviceaccount>`.
//! - `GET /healthz`.
//!
//! Admission has no side effects (`sideEffects: None`): it reads the pod's
//! namespace and answers, nothing more. The CA bundle ConfigMap reaches a
//! namespace through the leader ([`publish_bundles`]), never because a
//! request named it.
//!
//! Every request is bounded before it costs memory: at most
//! [`MAX_CONNECTIONS`] connections (more are closed at once), at most
//! [`IN_FLIGHT`] large requests and [`IN_FLIGHT_SMALL`] small ones (a
//! declared length of at most [`SMALL_BODY`]) read and handled at a time,
//! each class in its own turn, so a flood of large bodies never delays the
//! API server's reviews of real pods (a request that waits [`PERMIT_WAIT`]
//! for its turn is answered 503 with `Retry-After`), a body
//! limit per route (`/mutate`: `--webhook-max-review-bytes`, checked
//! against `Content-Length` before reading; `/v1/certificate`:
//! [`MAX_CSR_BODY`]), and [`READ_TIMEOUT`] for the TLS handshake, the
//! headers and the body each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;
use time::OffsetDateTime;

use crate::certs::{LeafSpec, Validity};
use crate::kube::inject::{self, INJECT_LABEL, InjectConfig, TOKEN_AUDIENCE};
use crate::kube::pki::Pki;

/// Connections served at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 128;
/// Large requests (over [`SMALL_BODY`], or of undeclared length) read and
/// handled at once.
pub const IN_FLIGHT: usize = 8;
/// Small requests read and handled at once, apart from the large ones.
pub const IN_FLIGHT_SMALL: usize = 16;
/// The largest declared body that is served in the small class: over twice
/// a large real pod's review (55,890 bytes, measured in the lab).
pub const SMALL_BODY: u64 = 128 << 10;
/// How long a request waits for its turn before it is answered 503.
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);
/// The largest certificate request body (a PEM CSR is about 1 KiB).
pub const MAX_CSR_BODY: usize = 16 << 10;
/// The default limit of an AdmissionReview body.
pub const DEFAULT_MAX_REVIEW: usize = 512 << 10;
/// The largest limit an AdmissionReview body may be given (the API
/// server's own request limit).
pub const MAX_REVIEW_LIMIT: usize = 3 << 20;
/// Bound on the TLS handshake, on the headers and on the body, each.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How the endpoint runs.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The names (DNS or IP) the serving certificate is for: the Service's.
    pub hosts: Vec<String>,
    /// The identity in the serving certificate (the controller's).
    pub identity: String,
    pub trust_domain: String,
    /// How long an agent's certificate is valid.
    pub agent_cert_ttl: Duration,
    /// How long the serving certificate is valid (renewed at two thirds).
    pub serving_cert_ttl: Duration,
    /// The MutatingWebhookConfiguration that calls this webhook: its
    /// namespaceSelector says where agents may run (and get certificates).
    pub webhook_config: String,
    /// The largest AdmissionReview body read (`--webhook-max-review-bytes`).
    pub max_review: usize,
    pub inject: InjectConfig,
}

/// The serving certificate, swapped on renewal.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap().clone())
    }
}

/// The endpoint.
pub struct Webhook {
    client: kube::Client,
    pki: Arc<Pki>,
    settings: WebhookSettings,
    serving: Arc<Resolver>,
    serving_not_after: RwLock<OffsetDateTime>,
    in_flight: tokio::sync::Semaphore,
    in_flight_small: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Pki(#[from] crate::kube::pki::PkiError),
    #[error("the serving certificate: {0}")]
    Tls(String),
}

fn certified(cert_pem: &str, key_pem: &str, bundle: &str) -> Result<CertifiedKey, WebhookError> {
    let tls = |e: &dyn std::fmt::Display| WebhookError::Tls(e.to_string());
    let mut chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| tls(&e))?;
    // The issuing CA after the leaf, so a client with an older bundle
    // still finds the path.
    chain.extend(
        rustls_pemfile::certs(&mut bundle.as_bytes())
            .take(1)
            .filter_map(Result::ok),
    );
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| tls(&e))?
        .ok_or_else(|| WebhookError::Tls("no private key".into()))?;
    let signing = stillpoint_proto::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| tls(&e))?;
    Ok(CertifiedKey::new(chain, signing))
}

impl Webhook {
    pub fn new(
        client: kube::Client,
        pki: Arc<Pki>,
        settings: WebhookSettings,
    ) -> Result<Arc<Webhook>, WebhookError> {
        let (key, not_after) = Self::serving_key(&pki, &settings)?;
        Ok(Arc::new(Webhook {
            client,
            pki,
            settings,
            serving: Arc::new(Resolver(RwLock::new(Arc::new(key)))),
            serving_not_after: RwLock::new(not_after),
            in_flight: tokio::sync::Semaphore::new(IN_FLIGHT),
            in_flight_small: tokio::sync::Semaphore::new(IN_FLIGHT_SMALL),
        }))
    }

    fn serving_key(
        pki: &Pki,
        settings: &WebhookSettings,
    ) -> Result<(CertifiedKey, OffsetDateTime), WebhookError> {
        let issued = pki.issue(&LeafSpec {
            uri: settings.identity.clone(),
            dns: settings.hosts.clone(),
            validity: Validity::lasting(settings.serving_cert_ttl),
        })?;
        Ok((
            certified(&issued.cert_pem, &issued.key_pem, &pki.bundle())?,
            issued.not_after,
        ))
    }

    /// Issues a new serving certificate (after a CA rotation, or when two
    /// thirds of the current one's life are over).
    pub fn renew_serving(&self, force: bool) -> Result<bool, WebhookError> {
        let not_after = *self.serving_not_after.read().unwrap();
        let ttl = self.settings.serving_cert_ttl;
        let due = OffsetDateTime::now_utc() >= not_after - ttl / 3;
        if !force && !due {
            return Ok(false);
        }
        let (key, not_after) = Self::serving_key(&self.pki, &self.settings)?;
        *self.serving.0.write().unwrap() = Arc::new(key);
        *self.serving_not_after.write().unwrap() = not_after;
        Ok(true)
    }

    fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        let mut config =
            rustls::ServerConfig::builder_with_provider(stillpoint_proto::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("the provider supports the default versions")
                .with_no_client_auth()
                .with_cert_resolver(self.serving.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Serves until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls_config());
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!("webhook accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "webhook connection refused: {MAX_CONNECTIONS} are open");
                refused("connections");
                continue;
            };
            let acceptor = acceptor.clone();
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let started = std::time::Instant::now();
                let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        tracing::debug!(%peer, handshake = ?started.elapsed(), "webhook connection");
                        tls
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "webhook TLS handshake: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
                let service = service_fn(move |request| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(request, peer).await) }
                });
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .max_buf_size(64 << 10)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    /// Routes first, then waits its turn, then reads the body within the
    /// route's limit.
    async fn handle(
        &self,
        request: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let route = match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
            (&Method::POST, "/mutate") => Route::Mutate,
            (&Method::POST, "/v1/certificate") => Route::Certificate,
            _ => return text(StatusCode::NOT_FOUND, "not found\n"),
        };
        let limit = match route {
            Route::Mutate => self.settings.max_review,
            Route::Certificate => MAX_CSR_BODY,
        };
        let length = request
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_some_and(|l| l > limit as u64) {
            refused("too_large");
            return too_large(limit);
        }
        let started = std::time::Instant::now();
        let class = match length {
            Some(l) if l <= SMALL_BODY => &self.in_flight_small,
            _ => &self.in_flight,
        };
        let Ok(Ok(_turn)) = tokio::time::timeout(PERMIT_WAIT, class.acquire()).await else {
            tracing::debug!(%peer, ?length, "busy: no turn within {PERMIT_WAIT:?}");
            refused("busy");
            let mut answer = text(StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n");
            answer.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            return answer;
        };
        let bearer = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let waited = started.elapsed();
        let body = match read_body(request.into_body(), limit).await {
            Ok(body) => body,
            Err(answer) => return answer,
        };
        let read = started.elapsed() - waited;
        match route {
            Route::Mutate => {
                let answer = self.mutate(&body, peer).await;
                tracing::debug!(
                    %peer,
                    code = answer.status().as_u16(),
                    ?waited,
                    ?read,
                    total = ?started.elapsed(),
                    "answered a review"
                );
                answer
            }
            Route::Certificate => {
                let answer = self.certificate(bearer.as_deref(), &body).await;
                if let Err((code, message)) = &answer {
                    tracing::warn!(%peer, "certificate refused ({code}): {message}");
                }
                match answer {
                    Ok(value) => json_response(StatusCode::OK, &value),
                    Err((code, message)) => text(code, &message),
                }
            }
        }
    }

    async fn namespace_labels(&self, ns: &str) -> Option<BTreeMap<String, String>> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get(ns).await {
            Ok(n) => Some(n.metadata.labels.unwrap_or_default()),
            Err(e) => {
                tracing::warn!("reading namespace {ns}: {e}");
                None
            }
        }
    }

    async fn mutate(&self, body: &[u8], peer: SocketAddr) -> Response<Full<Bytes>> {
        let size = body.len();
        let body = inject::Body::parse(body);
        let ns = body.namespace().unwrap_or_default();
        tracing::debug!(
            %peer,
            namespace = %ns,
            pod = body.pod_name().unwrap_or_default(),
            "an admission review of {size} bytes"
        );
        // Without the namespace's labels the Pod Security level is
        // unknown: fsfreeze is then refused rather than guessed.
        let labels = match ns.is_empty() {
            true => BTreeMap::new(),
            false => self.namespace_labels(&ns).await.unwrap_or_else(|| {
                BTreeMap::from([(
                    "pod-security.kubernetes.io/enforce".to_string(),
                    "unknown (the namespace could not be read)".to_string(),
                )])
            }),
        };
        let (code, answer) = inject::review_body(&body, &labels, &self.settings.inject);
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        json_response(code, &answer)
    }

    /// Checks the token and the pod, then signs the request.
    async fn certificate(
        &self,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<serde_json::Value, Refused> {
        let user = self.review(token).await?;
        let (ns, sa, uri) = self.identity_of(&user).await?;
        let pod_name = self.token_pod(&user, &ns, &sa).await?;
        let csr = std::str::from_utf8(body).map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                "the body is not a PEM certificate request".to_string(),
            )
        })?;
        let ttl = self.settings.agent_cert_ttl;
        let cert = self
            .pki
            .sign_request(csr, &uri, ttl)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let not_after = crate::kube::pki::validity_of(&cert)
            .map(|(_, after)| after)
            .unwrap_or_else(|_| OffsetDateTime::now_utc() + ttl);
        tracing::info!(pod = %format!("{ns}/{pod_name}"), identity = %uri, "issued an agent certificate");
        Ok(json!({
            "certificate": cert,
            "caBundle": self.pki.bundle(),
            "notAfter": not_after.unix_timestamp(),
        }))
    }

    /// Who the bearer token is: a TokenReview for audience `stillpoint`.
    async fn review(&self, token: Option<&str>) -> Result<UserInfo, Refused> {
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            unauthorized(
                "no bearer token: send the projected ServiceAccount token (audience stillpoint)"
                    .into(),
            )
        })?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("TokenReview failed: {e}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(unauthorized(format!(
                "the token was not accepted{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        if !status
            .audiences
            .iter()
            .flatten()
            .any(|a| a == TOKEN_AUDIENCE)
        {
            return Err(unauthorized(format!(
                "the token is not for audience {TOKEN_AUDIENCE}"
            )));
        }
        Ok(status.user.unwrap_or_default())
    }

    /// The ServiceAccount `user` is, and the identity an agent running as
    /// it gets: never the controller's own, never in an excluded namespace.
    async fn identity_of(&self, user: &UserInfo) -> Result<(String, String, String), Refused> {
        let username = user.username.clone().unwrap_or_default();
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(forbidden(format!("{username} is not a ServiceAccount")));
        };
        let uri = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.settings.trust_domain);
        if [
            &self.settings.identity,
            &self.settings.inject.controller_identity,
        ]
        .contains(&&uri)
        {
            return Err(forbidden(format!(
                "{uri} is the controller's own identity, which every agent obeys: it is never \
                 issued to an agent"
            )));
        }
        if let Some(why) = self.pki.excluded(&self.settings.webhook_config, ns).await {
            return Err(forbidden(format!(
                "namespace {ns} is excluded from injection ({why}): no agent runs there"
            )));
        }
        Ok((ns.to_string(), sa.to_string(), uri))
    }

    /// The pod the token is bound to: it exists (the same pod, not another
    /// of its name), opted in, and runs as ServiceAccount `sa`.
    async fn token_pod(&self, user: &UserInfo, ns: &str, sa: &str) -> Result<String, Refused> {
        let extra = user.extra.clone().unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let Some(pod_name) = first("authentication.kubernetes.io/pod-name") else {
            return Err(forbidden(
                "the token is not bound to a pod: use a projected ServiceAccount token".into(),
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(|e| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading pod {ns}/{pod_name}: {e}"),
                )
            })?
            .ok_or_else(|| forbidden(format!("pod {ns}/{pod_name} does not exist")))?;
        if let Some(uid) = first("authentication.kubernetes.io/pod-uid")
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(forbidden(format!(
                "the token's pod {ns}/{pod_name} was replaced by another of that name"
            )));
        }
        let opted_in = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECT_LABEL))
            .is_some_and(|v| v == "true");
        if !opted_in {
            return Err(forbidden(format!(
                "pod {ns}/{pod_name} is not opted in (label {INJECT_LABEL}: \"true\")"
            )));
        }
        let pod_sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        if pod_sa != sa {
            return Err(forbidden(format!(
                "pod {ns}/{pod_name} runs as ServiceAccount {pod_sa}, not {sa}"
            )));
        }
        Ok(pod_name)
    }
}

/// A refused certificate request: its HTTP status and why.
type Refused = (StatusCode, String);

fn unauthorized(m: String) -> Refused {
    (StatusCode::UNAUTHORIZED, m)
}

fn forbidden(m: String) -> Refused {
    (StatusCode::FORBIDDEN, m)
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn json_response(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a valid response")
}

/// The routes that read a body.
#[derive(Debug, Clone, Copy)]
enum Route {
    Mutate,
    Certificate,
}

/// Reads a body of at most `limit` bytes within [`READ_TIMEOUT`].
async fn read_body(
    body: hyper::body::Incoming,
    limit: usize,
) -> Result<Bytes, Response<Full<Bytes>>> {
    match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, limit).collect()).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            refused("too_large");
            Err(too_large(limit))
        }
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            &format!("reading the body: {e}"),
        )),
        Err(_) => {
            refused("timeout");
            Err(text(
                StatusCode::REQUEST_TIMEOUT,
                "reading the body timed out",
            ))
        }
    }
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "the body is over this route's limit of {limit} bytes (for /mutate: \
             --webhook-max-review-bytes)"
        ),
    )
}

/// Counts a request or connection refused before it was handled.
fn refused(reason: &str) {
    crate::metrics::metrics()
        .webhook_refusals
        .get_or_create(&crate::metrics::ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

/// The controller's own client identity, issued from the CA into a
/// directory it reloads from.
#[derive(Debug, Clone)]
pub struct OwnIdentity {
    pub dir: std::path::PathBuf,
    pub uri: String,
    pub ttl: Duration,
}

/// Keeps the PKI current while this replica runs: re-reads the CA Secret,
/// renews the serving certificate and the controller's own identity, and,
/// on the leader, rotates the CA when due and publishes the bundle to the
/// webhook configuration and every namespace's ConfigMap.
pub async fn upkeep(
    webhook: Arc<Webhook>,
    own: OwnIdentity,
    mut own_not_after: OffsetDateTime,
    webhook_config: String,
    mut leading: tokio::sync::watch::Receiver<bool>,
    every: Duration,
) {
    loop {
        let leader = *leading.borrow_and_update();
        let mut changed = false;
        if leader {
            match webhook.pki.rotate_if_due().await {
                Ok(rotated) => changed |= rotated,
                Err(e) => tracing::warn!("rotating the CA: {e}"),
            }
        }
        match webhook.pki.refresh().await {
            Ok(c) => changed |= c,
            Err(e) => tracing::warn!("reading the CA Secret: {e}"),
        }
        if let Err(e) = webhook.renew_serving(changed) {
            tracing::warn!("renewing the webhook's serving certificate: {e}");
        }
        if changed || OffsetDateTime::now_utc() >= own_not_after - own.ttl / 3 {
            match webhook.pki.write_identity(&own.dir, &own.uri, own.ttl) {
                Ok(not_after) => own_not_after = not_after,
                Err(e) => tracing::warn!("renewing the controller's identity: {e}"),
            }
        }
        if leader {
            if let Err(e) = webhook.pki.publish_to_webhook(&webhook_config).await {
                tracing::warn!("publishing the CA bundle to {webhook_config}: {e}");
            }
            if changed && let Err(e) = webhook.pki.publish_to_all_namespaces(&webhook_config).await
            {
                tracing::warn!("publishing the CA bundle to the namespaces: {e}");
            }
        }
        // Again after `every`, or at once when this replica starts leading.
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = leading.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(every).await;
                }
            }
        }
    }
}

/// On the leader: writes the CA bundle ConfigMap into each namespace where
/// an opted-in pod appears and the webhook configuration `config` serves,
/// as the pod appears (an agent mounts it; until it exists the kubelet
/// retries the mount). Admission itself writes nothing. [`upkeep`]
/// rewrites every such ConfigMap when the bundle changes.
pub async fn publish_bundles(
    webhook: Arc<Webhook>,
    config: String,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    use kube::core::PartialObjectMeta;
    use kube::runtime::{WatchStreamExt, watcher};
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        let pods: Api<PartialObjectMeta<Pod>> = Api::all(webhook.client.clone());
        let selector = format!("{INJECT_LABEL}=true");
        let mut stream = std::pin::pin!(
            watcher(pods, watcher::Config::default().labels(&selector))
                .default_backoff()
                .applied_objects()
        );
        // The bundle last written into each namespace.
        let mut published: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let pod = tokio::select! {
                pod = stream.next() => pod,
                _ = leading.wait_for(|l| !*l) => break,
            };
            let Some(pod) = pod else { break };
            let ns = match pod {
                Ok(pod) => pod.metadata.namespace.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!("watching opted-in pods: {e}");
                    continue;
                }
            };
            let bundle = webhook.pki.bundle();
            if ns.is_empty() || published.get(&ns) == Some(&bundle) {
                continue;
            }
            if let Some(why) = webhook.pki.excluded(&config, &ns).await {
                tracing::debug!("not publishing the CA bundle into {ns}: {why}");
                continue;
            }
            match webhook.pki.publish_to_namespace(&ns).await {
                Ok(()) => {
                    published.insert(ns, bundle);
                }
                Err(e) => tracing::warn!("writing the CA bundle ConfigMap in {ns}: {e}"),
            }
        }
    }
}
