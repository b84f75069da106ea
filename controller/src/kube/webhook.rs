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
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
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

/// Largest request body read (the API server's own limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;
/// Bound on reading one request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

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
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let this = self.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "webhook TLS handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let service = service_fn(move |request| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(request, peer).await) }
                });
                let _ = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn handle(
        &self,
        request: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let bearer = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let body = match tokio::time::timeout(
            READ_TIMEOUT,
            Limited::new(request.into_body(), MAX_BODY).collect(),
        )
        .await
        {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("reading the body: {e}"),
                );
            }
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "reading the body timed out"),
        };
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::POST, "/mutate") => self.mutate(&body).await,
            (&Method::POST, "/v1/certificate") => {
                let answer = self.certificate(bearer.as_deref(), &body).await;
                if let Err((code, message)) = &answer {
                    tracing::warn!(%peer, "certificate refused ({code}): {message}");
                }
                match answer {
                    Ok(value) => json_response(StatusCode::OK, &value),
                    Err((code, message)) => text(code, &message),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
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

    async fn mutate(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let body = inject::Body::parse(body);
        let ns = body.namespace().unwrap_or_default();
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
        let patched = answer.pointer("/response/patch").is_some();
        if patched && !body.dry_run() {
            // A namespace the configuration leaves out is never called for
            // by the API server: such a review is forged, and writes nothing.
            if let Some(why) = self.pki.excluded(&self.settings.webhook_config, &ns).await {
                tracing::warn!(
                    "a forged admission review for namespace {ns} ({why}): nothing written"
                );
                return text(
                    StatusCode::FORBIDDEN,
                    &format!("namespace {ns} is not served by this webhook"),
                );
            }
            // The pod mounts the bundle: it must exist before the pod runs.
            // If it cannot be written the webhook fails (the failure policy
            // decides), rather than let a pod in that cannot start.
            if let Err(e) = self.pki.publish_to_namespace(&ns).await {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("writing the CA bundle ConfigMap in {ns}: {e}"),
                );
            }
        }
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        json_response(code, &answer)
    }

    /// Checks the token and the pod, then signs the request.
    async fn certificate(
        &self,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<serde_json::Value, (StatusCode, String)> {
        let unauthorized = |m: String| (StatusCode::UNAUTHORIZED, m);
        let forbidden = |m: String| (StatusCode::FORBIDDEN, m);
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
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
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
        let extra = user.extra.unwrap_or_default();
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
