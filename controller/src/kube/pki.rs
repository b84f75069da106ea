//! The in-cluster PKI: no certificates by hand.
//!
//! The CA lives in a Secret in the controller's namespace (`ca.crt`,
//! `ca.key`; during a rotation also `next.crt`/`next.key` and
//! `previous.crt`), created once and reused by every replica after any
//! restart. From it the controller issues its
//! own client identity and the webhook's serving certificate (in memory),
//! and signs the agents' certificate requests after checking their
//! ServiceAccount tokens (`crate::kube::webhook`).
//!
//! Rotation is staged so that no certificate is ever presented to a peer
//! that does not trust its CA yet: two thirds into the CA's life the next
//! CA is made and added to the bundle (still signing with the current
//! one); once every holder has renewed since (one overlap, the leaf
//! lifetime), the next CA signs and the old one stays in the bundle until
//! it expires. No leaf outlives the CA that signed it. The trust bundle —
//! current, next and previous — is published to
//! the MutatingWebhookConfiguration's `caBundle` and to a ConfigMap
//! `stillpoint-ca` in each namespace with injected pods.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair};
use time::OffsetDateTime;

use crate::certs::{self, CertError, LeafSpec, Validity};
use crate::kube::inject::CA_BUNDLE_CONFIGMAP;
use crate::kube::store::FIELD_MANAGER;

/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const PREVIOUS_CA_KEY: &str = "previous.crt";
pub const NEXT_CA_KEY: &str = "next.crt";
pub const NEXT_KEY_KEY: &str = "next.key";
/// Label on every ConfigMap holding the bundle.
pub const BUNDLE_LABEL: &str = "stillpoint.dev/ca-bundle";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("the CA Secret {0}: {1}")]
    Secret(String, String),
    #[error("{0}")]
    Cert(#[from] CertError),
    #[error("the certificate request is not usable: {0}")]
    BadRequest(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// One CA: certificate, key, validity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ca {
    cert_pem: String,
    key_pem: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Ca {
    fn parse(cert_pem: String, key_pem: String) -> Result<Ca, String> {
        KeyPair::from_pem(&key_pem).map_err(|e| format!("key: {e}"))?;
        let (not_before, not_after) = validity_of(&cert_pem)?;
        Ok(Ca {
            cert_pem,
            key_pem,
            not_before,
            not_after,
        })
    }

    fn new(validity: Duration) -> Result<Ca, PkiError> {
        let v = Validity::lasting(validity);
        let (cert_pem, key) = certs::new_ca("Stillpoint in-cluster CA", v)?;
        Ok(Ca {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_before: v.not_before,
            not_after: v.not_after,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(CertError::from)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(CertError::from)?)
    }
}

/// The CAs as the Secret holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CaState {
    /// Signs.
    current: Ca,
    /// Trusted, signs after the overlap.
    next: Option<Ca>,
    /// Trusted until it expires.
    previous_pem: Option<String>,
}

impl CaState {
    fn from_secret(name: &str, secret: &Secret) -> Result<CaState, PkiError> {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| -> Option<String> {
            data.get(key)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let err = |m: String| PkiError::Secret(name.to_string(), m);
        let cert_pem = text(CA_CERT_KEY).ok_or_else(|| err("has no ca.crt".into()))?;
        let key_pem = text(CA_KEY_KEY).ok_or_else(|| err("has no ca.key".into()))?;
        let current = Ca::parse(cert_pem, key_pem).map_err(|e| err(format!("ca: {e}")))?;
        let next = match (text(NEXT_CA_KEY), text(NEXT_KEY_KEY)) {
            (Some(c), Some(k)) => Some(Ca::parse(c, k).map_err(|e| err(format!("next: {e}")))?),
            _ => None,
        };
        // A previous CA is trusted only while it is valid.
        let previous_pem = text(PREVIOUS_CA_KEY)
            .filter(|p| validity_of(p).is_ok_and(|(_, after)| after > OffsetDateTime::now_utc()));
        Ok(CaState {
            current,
            next,
            previous_pem,
        })
    }

    fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put(CA_CERT_KEY, &self.current.cert_pem);
        put(CA_KEY_KEY, &self.current.key_pem);
        if let Some(next) = &self.next {
            put(NEXT_CA_KEY, &next.cert_pem);
            put(NEXT_KEY_KEY, &next.key_pem);
        }
        if let Some(p) = &self.previous_pem {
            put(PREVIOUS_CA_KEY, p);
        }
        data
    }

    fn bundle(&self) -> String {
        let mut bundle = String::new();
        let parts = std::iter::once(&self.current.cert_pem)
            .chain(self.next.as_ref().map(|n| &n.cert_pem))
            .chain(self.previous_pem.as_ref());
        for pem in parts {
            bundle.push_str(pem.trim_end());
            bundle.push('\n');
        }
        bundle
    }

    /// What the next step of a rotation makes of this state, if one is due:
    /// a next CA two thirds into the current one's life; the next CA
    /// signing once `overlap` has passed since it was made.
    fn rotated(&self, validity: Duration, overlap: Duration) -> Result<Option<CaState>, PkiError> {
        let now = OffsetDateTime::now_utc();
        match &self.next {
            Some(next) if now >= next.not_before + time::Duration::minutes(1) + overlap => {
                Ok(Some(CaState {
                    current: next.clone(),
                    next: None,
                    previous_pem: Some(self.current.cert_pem.clone()),
                }))
            }
            Some(_) => Ok(None),
            None => {
                let c = &self.current;
                let life = c.not_after - c.not_before;
                if now < c.not_before + life * 2 / 3 {
                    return Ok(None);
                }
                Ok(Some(CaState {
                    current: c.clone(),
                    next: Some(Ca::new(validity)?),
                    previous_pem: self.previous_pem.clone(),
                }))
            }
        }
    }
}

/// A certificate's validity window.
pub fn validity_of(pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (from, to) = stillpoint_proto::tls::pem_validity(pem)?;
    let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).map_err(|e| e.to_string());
    Ok((at(from)?, at(to)?))
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("namespace", &self.namespace)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// A new key and certificate, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// The controller's CA, kept in a Secret.
pub struct Pki {
    client: kube::Client,
    namespace: String,
    secret: String,
    /// How long a new CA is valid; it is rotated two thirds of the way in.
    ca_validity: Duration,
    /// How long a next CA is trusted before it signs (every holder renews
    /// within it): the leaf lifetime.
    overlap: Duration,
    state: RwLock<CaState>,
}

impl Pki {
    /// Loads the CA from the Secret, creating it if there is none yet
    /// (when two replicas race, the API server keeps one and both use it).
    pub async fn load_or_create(
        client: kube::Client,
        namespace: &str,
        secret: &str,
        ca_validity: Duration,
        overlap: Duration,
    ) -> Result<Pki, PkiError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let state = match api.get_opt(secret).await? {
            Some(s) => CaState::from_secret(secret, &s)?,
            None => {
                let fresh = CaState {
                    current: Ca::new(ca_validity)?,
                    next: None,
                    previous_pem: None,
                };
                let object = Secret {
                    metadata: ObjectMeta {
                        name: Some(secret.to_string()),
                        namespace: Some(namespace.to_string()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "stillpoint".to_string(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(fresh.to_secret_data()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &object).await {
                    Ok(_) => {
                        tracing::info!("created the CA in Secret {namespace}/{secret}");
                        fresh
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        CaState::from_secret(secret, &api.get(secret).await?)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok(Pki {
            client,
            namespace: namespace.to_string(),
            secret: secret.to_string(),
            ca_validity,
            overlap,
            state: RwLock::new(state),
        })
    }

    /// The trust bundle: the current CA, and the previous one while valid.
    pub fn bundle(&self) -> String {
        self.state.read().unwrap().bundle()
    }

    /// When the signing CA expires.
    pub fn ca_not_after(&self) -> OffsetDateTime {
        self.state.read().unwrap().current.not_after
    }

    /// Re-reads the Secret (the leader may have rotated the CA).
    /// Returns whether the signing CA changed.
    pub async fn refresh(&self) -> Result<bool, PkiError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let fresh = CaState::from_secret(&self.secret, &api.get(&self.secret).await?)?;
        let mut state = self.state.write().unwrap();
        let changed = fresh.current.cert_pem != state.current.cert_pem;
        *state = fresh;
        Ok(changed)
    }

    /// Takes the next step of a rotation when one is due (the leader calls
    /// this). Returns whether the Secret changed.
    pub async fn rotate_if_due(&self) -> Result<bool, PkiError> {
        let rotated = {
            let state = self.state.read().unwrap();
            state.rotated(self.ca_validity, self.overlap)?
        };
        let Some(fresh) = rotated else {
            return Ok(false);
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        // A JSON merge patch that also removes what is gone (next.* once it
        // signs), guarded by the resourceVersion read.
        let current = api.get(&self.secret).await?;
        let mut data: BTreeMap<String, Option<ByteString>> = fresh
            .to_secret_data()
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        for key in [NEXT_CA_KEY, NEXT_KEY_KEY, PREVIOUS_CA_KEY] {
            data.entry(key.to_string()).or_insert(None);
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "data": data,
        });
        api.patch(&self.secret, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let step = match fresh.next.is_some() {
            true => "made the next CA (trusted now, signing after the overlap)",
            false => "the next CA signs now; the previous one stays trusted until it expires",
        };
        tracing::info!(
            "CA rotation in Secret {}/{}: {step}",
            self.namespace,
            self.secret
        );
        *self.state.write().unwrap() = fresh;
        Ok(true)
    }

    /// `validity` capped at the signing CA's own expiry.
    fn capped(&self, mut validity: Validity) -> Validity {
        let ca_end = self.state.read().unwrap().current.not_after;
        if validity.not_after > ca_end {
            validity.not_after = ca_end;
        }
        validity
    }

    /// A new key and a certificate for `spec`.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let spec = LeafSpec {
            validity: self.capped(spec.validity),
            ..spec.clone()
        };
        let params = certs::leaf_params(&spec)?;
        let issuer = self.state.read().unwrap().current.issuer()?;
        let key = KeyPair::generate().map_err(CertError::from)?;
        let cert = params.signed_by(&key, &issuer).map_err(CertError::from)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: spec.validity.not_after,
        })
    }

    /// Issues the identity `uri` for `ttl` into `dir` (`tls.crt`,
    /// `tls.key`, and the bundle as `ca.crt`): the controller's own client
    /// identity, which it reloads from there. Returns when it expires.
    pub fn write_identity(
        &self,
        dir: &std::path::Path,
        uri: &str,
        ttl: Duration,
    ) -> Result<OffsetDateTime, PkiError> {
        let issued = self.issue(&LeafSpec {
            uri: uri.to_string(),
            dns: vec![],
            validity: Validity::lasting(ttl),
        })?;
        certs::create_dir(dir)?;
        certs::write_file(&dir.join(certs::CA_CERT), &self.bundle(), 0o644)?;
        certs::write_file(&dir.join(certs::LEAF_KEY), &issued.key_pem, 0o600)?;
        certs::write_file(&dir.join(certs::LEAF_CERT), &issued.cert_pem, 0o644)?;
        Ok(issued.not_after)
    }

    /// Signs a certificate request for the identity `uri` valid for `ttl`.
    /// Only the request's public key is used: names, usages and validity
    /// are the controller's.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        uri: &str,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadRequest(e.to_string()))?;
        let spec = LeafSpec {
            uri: uri.to_string(),
            dns: vec![],
            validity: self.capped(Validity::lasting(ttl)),
        };
        let issuer = self.state.read().unwrap().current.issuer()?;
        Ok(certs::sign_csr(csr_pem, &spec, &issuer)?)
    }

    /// Writes the bundle into the webhook configuration `name` (every
    /// webhook of it) when it differs. A missing configuration is not an
    /// error (the webhook is optional).
    pub async fn publish_to_webhook(&self, name: &str) -> Result<bool, PkiError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(config) = api.get_opt(name).await? else {
            return Ok(false);
        };
        let bundle = ByteString(self.bundle().into_bytes());
        // A strategic merge patch: webhooks merge by name.
        let stale: Vec<serde_json::Value> = config
            .webhooks
            .iter()
            .flatten()
            .filter(|hook| hook.client_config.ca_bundle.as_ref() != Some(&bundle))
            .map(
                |hook| serde_json::json!({"name": hook.name, "clientConfig": {"caBundle": bundle}}),
            )
            .collect();
        if stale.is_empty() {
            return Ok(false);
        }
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({"webhooks": stale})),
        )
        .await?;
        Ok(true)
    }

    /// Writes the bundle into ConfigMap `stillpoint-ca` of `namespace`.
    pub async fn publish_to_namespace(&self, namespace: &str) -> Result<(), PkiError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": CA_BUNDLE_CONFIGMAP,
                "namespace": namespace,
                "labels": {BUNDLE_LABEL: "true", "app.kubernetes.io/managed-by": "stillpoint"},
            },
            "data": {CA_CERT_KEY: self.bundle()},
        });
        api.patch(
            CA_BUNDLE_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
        Ok(())
    }

    /// Why webhook configuration `config` never injects into namespace
    /// `ns`, if it does not ([`crate::kube::inject::excluded_namespace`]);
    /// a configuration that cannot be read excludes every namespace.
    pub async fn excluded(&self, config: &str, ns: &str) -> Option<String> {
        use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
        let configs: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let selectors: Vec<_> = match configs.get(config).await {
            Ok(c) => c
                .webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|w| w.namespace_selector)
                .collect(),
            Err(e) => {
                return Some(format!(
                    "webhook configuration {config} could not be read: {e}"
                ));
            }
        };
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let labels = match namespaces.get_opt(ns).await {
            Ok(n) => n.map(|n| n.metadata.labels.unwrap_or_default()),
            Err(e) => {
                tracing::warn!("reading namespace {ns}: {e}");
                None
            }
        };
        crate::kube::inject::excluded_namespace(&selectors, labels.as_ref())
    }

    /// Writes the bundle into the ConfigMap of every namespace with
    /// opted-in pods (found from the pods, so the controller needs no
    /// right to list ConfigMaps), except those webhook configuration
    /// `config` never injects into: no agent runs there.
    pub async fn publish_to_all_namespaces(&self, config: &str) -> Result<(), PkiError> {
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::all(self.client.clone());
        let pods = api
            .list_metadata(
                &kube::api::ListParams::default()
                    .labels(&format!("{}=true", crate::kube::inject::INJECT_LABEL)),
            )
            .await?;
        let namespaces: std::collections::BTreeSet<String> = pods
            .items
            .into_iter()
            .filter_map(|p| p.metadata.namespace)
            .collect();
        for ns in namespaces {
            match self.excluded(config, &ns).await {
                Some(why) => tracing::debug!("not publishing the CA bundle into {ns}: {why}"),
                None => self.publish_to_namespace(&ns).await?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs_in(bundle: &str) -> usize {
        rustls_pemfile::certs(&mut bundle.as_bytes()).count()
    }

    #[test]
    fn a_rotation_trusts_the_next_ca_before_it_signs() {
        let day = Duration::from_secs(86_400);
        let overlap = Duration::from_secs(3600);
        let mut state = CaState {
            current: Ca::new(3 * day).unwrap(),
            next: None,
            previous_pem: None,
        };
        assert!(state.rotated(3 * day, overlap).unwrap().is_none(), "young");
        assert_eq!(certs_in(&state.bundle()), 1);
        // Two thirds in: a next CA, trusted, not signing.
        let shift = time::Duration::days(2) + time::Duration::hours(1);
        state.current.not_before -= shift;
        state.current.not_after -= shift;
        let staged = state.rotated(3 * day, overlap).unwrap().unwrap();
        assert_eq!(staged.current, state.current, "the current CA still signs");
        assert!(staged.next.is_some());
        assert_eq!(certs_in(&staged.bundle()), 2);
        assert!(
            staged.rotated(3 * day, overlap).unwrap().is_none(),
            "the next CA waits one overlap"
        );
        // After the overlap: the next CA signs, the old one stays trusted.
        let mut waited = staged.clone();
        waited.next.as_mut().unwrap().not_before -= time::Duration::hours(2);
        let promoted = waited.rotated(3 * day, overlap).unwrap().unwrap();
        assert_eq!(Some(&promoted.current), waited.next.as_ref());
        assert_eq!(
            promoted.previous_pem.as_ref(),
            Some(&state.current.cert_pem)
        );
        assert!(promoted.next.is_none());
        assert_eq!(certs_in(&promoted.bundle()), 2);
        // The Secret's data reads back as the same state.
        let secret = Secret {
            data: Some(promoted.to_secret_data()),
            ..Default::default()
        };
        let back = CaState::from_secret("ca", &secret).unwrap();
        assert_eq!(back.current.cert_pem, promoted.current.cert_pem);
        assert_eq!(back.previous_pem, promoted.previous_pem);
    }
}
