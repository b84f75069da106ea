//! Sidecar injection: what the mutating admission webhook does to a pod
//! that opted in (label `stillpoint.dev/inject: "true"`), as a pure
//! function from the AdmissionReview body to the answer.
//!
//! The agent goes in as a native sidecar (an `initContainers` entry with
//! `restartPolicy: Always`: it starts before the database and never keeps
//! a Job alive) where the API server supports it, as a regular container
//! otherwise. It gets the pod's data volumes (at the database's own
//! mount paths, for the flush step), the DSN from the referenced Secret as
//! a file, a projected ServiceAccount token for audience `stillpoint` (to
//! obtain its certificate from the controller), the CA bundle, and a
//! restricted securityContext. A pod already injected is left as it is.
//! Bad annotations on an opted-in pod are denied with a message naming
//! the annotation and what is allowed; nothing is ever patched half-way.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use kube::core::Status;
use kube::core::admission::AdmissionResponse;
use serde_json::{Value, json};

/// The label that opts a pod in (the webhook's `objectSelector`).
pub const INJECT_LABEL: &str = "stillpoint.dev/inject";
/// Set on an injected pod: the version that injected it.
pub const INJECTED_ANNOTATION: &str = "stillpoint.dev/injected";
/// The injected container's name.
pub const AGENT_CONTAINER: &str = "stillpoint-agent";
/// The ConfigMap (in the pod's namespace) holding the CA bundle, key `ca.crt`.
pub const CA_BUNDLE_CONFIGMAP: &str = "stillpoint-ca";
/// The audience of the projected token the agent proves itself with.
pub const TOKEN_AUDIENCE: &str = "stillpoint";
/// The agent's gRPC port (named `stillpoint`, which discovery looks for).
pub const AGENT_PORT: i32 = 9443;
/// The agent's admin port (`/healthz`, `/metrics`).
pub const ADMIN_PORT: i32 = 9090;
/// The user the agent runs as when neither the database container nor the
/// pod names one.
pub const DEFAULT_AGENT_USER: i64 = 65532;

/// Every annotation the injector reads; any other `stillpoint.dev/` key on
/// an opted-in pod is refused (a typo would otherwise be silently ignored).
pub const ANNOTATIONS: &[(&str, &str)] = &[
    (
        "stillpoint.dev/engine",
        "postgres | mysql | mariadb | redis | mongodb | exec | fsfreeze (required)",
    ),
    (
        "stillpoint.dev/dsn-secret",
        "a Secret in the pod's namespace whose key `dsn` is the connection string (required for a database engine)",
    ),
    (
        "stillpoint.dev/data-volumes",
        "comma-separated names of the pod's volumes holding the database's files (default: every PVC-backed volume)",
    ),
    ("stillpoint.dev/pg-mode", "backup | fence (postgres only)"),
    (
        "stillpoint.dev/pg-fence-schemas",
        "comma-separated schemas whose tables a fence (and every quiesce) locks (postgres only; default public)",
    ),
    (
        "stillpoint.dev/pg-fence-databases",
        "comma-separated databases fenced (postgres only; default: the DSN's database)",
    ),
    (
        "stillpoint.dev/lock-timeout",
        "a duration such as 5s or 500ms (how long the engine waits for its lock)",
    ),
    (
        "stillpoint.dev/fsfreeze",
        "true | false: also FIFREEZE the data volumes' filesystems (needs SYS_ADMIN)",
    ),
    (
        "stillpoint.dev/exec-command",
        "the hold command (engine exec only, required there)",
    ),
    (INJECTED_ANNOTATION, "set by the injector"),
];

const ENGINES: &[&str] = &[
    "postgres",
    "postgresql",
    "mysql",
    "mariadb",
    "redis",
    "mongodb",
    "exec",
    "fsfreeze",
];

/// How the webhook injects (the controller's flags).
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The agent image.
    pub image: String,
    /// Native sidecars (Kubernetes 1.29 and later), else a regular container.
    pub native_sidecars: bool,
    /// The controller's identity the agent accepts.
    pub controller_identity: String,
    /// Where the agent asks for its certificate.
    pub certificate_url: String,
    /// The version written into the status annotation.
    pub version: String,
}

/// Why a webhook configuration whose webhooks select namespaces by
/// `selectors` (their `namespaceSelector`s; `None` for one without, which
/// selects every namespace) never injects into a namespace with `labels`
/// (`None`: they could not be read, which excludes it too). `None`: it
/// may hold injected pods.
pub fn excluded_namespace(
    selectors: &[Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>],
    labels: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    use kube::core::{Selector, SelectorExt};
    let Some(labels) = labels else {
        return Some("its labels could not be read".into());
    };
    let selected = selectors.iter().any(|s| match s {
        None => true,
        Some(s) => Selector::try_from(s.clone()).is_ok_and(|s| s.matches(labels)),
    });
    match selected {
        true => None,
        false => Some(
            "the webhook configuration's namespaceSelector does not select it (kube-system, the \
             controller's own namespace and namespaces labelled stillpoint.dev/inject: disabled \
             are left out)"
                .into(),
        ),
    }
}

/// A denial: the message says which annotation and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// The settings an opted-in pod asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    pub engine: String,
    pub dsn_secret: Option<String>,
    /// (volume name, mount path in the database container).
    pub data_volumes: Vec<(String, String)>,
    pub pg_mode: Option<String>,
    /// `STILLPOINT_PG_FENCE_SCHEMAS` and `STILLPOINT_PG_FENCE_DATABASES`.
    pub pg_fence_schemas: Option<String>,
    pub pg_fence_databases: Option<String>,
    pub lock_timeout: Option<String>,
    pub fsfreeze: bool,
    pub exec_command: Option<String>,
}

fn get_str<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str()
}

/// What the injector reads of a pod, typed, and nothing more. Not
/// k8s-openapi's `Pod`: its `Volume` is 3 KiB and its `Container` 2 KiB in
/// memory, so a review listing thousands of `{"name": "v"}` would cost
/// hundreds of times its size; here every other field is skipped as it is
/// read, and what is kept costs about as much as its JSON.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: MetaView,
    #[serde(default)]
    pub spec: SpecView,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct MetaView {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView {
    #[serde(default)]
    pub containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub volumes: Option<Vec<VolumeView>>,
    #[serde(default)]
    pub security_context: Option<UserView>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub volume_mounts: Vec<MountView>,
    #[serde(default)]
    pub security_context: Option<UserView>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mount_path: String,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    #[serde(default)]
    pub name: String,
    /// Whether the volume is a PVC (its fields are not read).
    #[serde(default)]
    pub persistent_volume_claim: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

impl PodView {
    fn labels(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.labels.as_ref().unwrap_or(&NONE)
    }

    fn annotations(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.metadata.annotations.as_ref().unwrap_or(&NONE)
    }

    /// The pod's containers (not init containers), in order.
    fn containers(&self) -> &[ContainerView] {
        self.spec.containers.as_deref().unwrap_or(&[])
    }

    fn volumes(&self) -> &[VolumeView] {
        self.spec.volumes.as_deref().unwrap_or(&[])
    }
}

/// Whether the pod already has the agent (by annotation or by container).
pub fn already_injected(pod: &PodView) -> bool {
    pod.annotations().contains_key(INJECTED_ANNOTATION)
        || pod
            .containers()
            .iter()
            .chain(pod.spec.init_containers.iter().flatten())
            .any(|c| c.name == AGENT_CONTAINER)
}

fn check_duration(key: &str, text: &str) -> Result<(), Denied> {
    match stillpoint_proto::duration::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(()),
        _ => Err(Denied(format!(
            "annotation {key}: {text:?} is not a duration; allowed: a positive number with a unit, such as 5s, 500ms or 1m"
        ))),
    }
}

/// Reads and checks the pod's `stillpoint.dev/` annotations.
/// `namespace_labels` decide whether SYS_ADMIN may be asked for.
pub fn settings(
    pod: &PodView,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<PodSettings, Denied> {
    let annotations = pod.annotations();
    known_only(annotations)?;
    let get = |key: &str| annotations.get(key).map(|v| v.trim().to_string());
    let engine = engine(get("stillpoint.dev/engine"))?;
    let dsn_secret = dsn_secret(get("stillpoint.dev/dsn-secret"), &engine)?;
    let pg_mode = pg_mode(get("stillpoint.dev/pg-mode"), &engine)?;
    let pg_fence_schemas = pg_names(&engine, "stillpoint.dev/pg-fence-schemas", get)?;
    let pg_fence_databases = pg_names(&engine, "stillpoint.dev/pg-fence-databases", get)?;
    let lock_timeout = get("stillpoint.dev/lock-timeout");
    if let Some(t) = &lock_timeout {
        check_duration("stillpoint.dev/lock-timeout", t)?;
    }
    let fsfreeze = fsfreeze(get("stillpoint.dev/fsfreeze"), &engine, namespace_labels)?;
    let exec_command = exec_command(get("stillpoint.dev/exec-command"), &engine)?;
    let data_volumes = data_volumes(pod, get("stillpoint.dev/data-volumes"))?;
    if fsfreeze && data_volumes.is_empty() {
        return Err(Denied(
            "fsfreeze needs data volumes, and this pod has none: name them in annotation stillpoint.dev/data-volumes".into(),
        ));
    }
    Ok(PodSettings {
        engine,
        dsn_secret,
        data_volumes,
        pg_mode,
        pg_fence_schemas,
        pg_fence_databases,
        lock_timeout,
        fsfreeze,
        exec_command,
    })
}

/// Every `stillpoint.dev/` annotation is one the injector reads.
fn known_only(annotations: &BTreeMap<String, String>) -> Result<(), Denied> {
    for key in annotations.keys() {
        if key.starts_with("stillpoint.dev/") && !ANNOTATIONS.iter().any(|(k, _)| k == key) {
            let known: Vec<&str> = ANNOTATIONS
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| *k != INJECTED_ANNOTATION)
                .collect();
            return Err(Denied(format!(
                "annotation {key} is not one the injector reads; allowed: {}",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// `stillpoint.dev/engine`: required, one of the engines.
fn engine(value: Option<String>) -> Result<String, Denied> {
    match value {
        None => Err(Denied(
            "annotation stillpoint.dev/engine is missing; allowed: postgres, mysql, mariadb, redis, mongodb, exec, fsfreeze".into(),
        )),
        Some(e) if ENGINES.contains(&e.as_str()) => Ok(e),
        Some(e) => Err(Denied(format!(
            "annotation stillpoint.dev/engine: {e:?} is not an engine; allowed: postgres, mysql, mariadb, redis, mongodb, exec, fsfreeze"
        ))),
    }
}

/// `stillpoint.dev/dsn-secret`: a Secret's name, required by a database.
fn dsn_secret(value: Option<String>, engine: &str) -> Result<Option<String>, Denied> {
    let database = !matches!(engine, "exec" | "fsfreeze");
    match (&value, database) {
        (None, true) => Err(Denied(format!(
            "annotation stillpoint.dev/dsn-secret is missing; engine {engine} needs the name of a Secret in this namespace whose key `dsn` is the connection string"
        ))),
        (Some(s), _) if !is_dns_subdomain(s) => Err(Denied(format!(
            "annotation stillpoint.dev/dsn-secret: {s:?} is not a Secret name; allowed: a DNS subdomain (lower-case letters, digits, '-' and '.')"
        ))),
        _ => Ok(value),
    }
}

/// `stillpoint.dev/pg-mode`: PostgreSQL's, `backup` or `fence`.
fn pg_mode(value: Option<String>, engine: &str) -> Result<Option<String>, Denied> {
    if let Some(mode) = &value {
        if !matches!(engine, "postgres" | "postgresql") {
            return Err(Denied(format!(
                "annotation stillpoint.dev/pg-mode applies to engine postgres only, not {engine}"
            )));
        }
        if !matches!(mode.as_str(), "backup" | "fence") {
            return Err(Denied(format!(
                "annotation stillpoint.dev/pg-mode: {mode:?} is not a mode; allowed: backup, fence"
            )));
        }
    }
    Ok(value)
}

/// `stillpoint.dev/fsfreeze` (or engine fsfreeze): a boolean, only where the
/// namespace's Pod Security level allows SYS_ADMIN.
fn fsfreeze(
    value: Option<String>,
    engine: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<bool, Denied> {
    let fsfreeze = match value.as_deref() {
        None | Some("false") => engine == "fsfreeze",
        Some("true") => true,
        Some(other) => {
            return Err(Denied(format!(
                "annotation stillpoint.dev/fsfreeze: {other:?} is not a boolean; allowed: true, false"
            )));
        }
    };
    let level = namespace_labels
        .get("pod-security.kubernetes.io/enforce")
        .map(String::as_str)
        .unwrap_or("privileged");
    if fsfreeze && level != "privileged" {
        return Err(Denied(format!(
            "annotation stillpoint.dev/fsfreeze (or engine fsfreeze) needs the SYS_ADMIN capability, which this namespace's Pod Security level {level:?} forbids; run the database in a namespace labelled pod-security.kubernetes.io/enforce=privileged, or leave fsfreeze off"
        )));
    }
    Ok(fsfreeze)
}

/// `stillpoint.dev/exec-command`: engine exec's, and required by it.
fn exec_command(value: Option<String>, engine: &str) -> Result<Option<String>, Denied> {
    match (&value, engine) {
        (None, "exec") => Err(Denied(
            "annotation stillpoint.dev/exec-command is missing; engine exec needs the hold command"
                .into(),
        )),
        (Some(_), e) if e != "exec" => Err(Denied(format!(
            "annotation stillpoint.dev/exec-command applies to engine exec only, not {e}"
        ))),
        _ => Ok(value),
    }
}

/// A PostgreSQL-only annotation that lists names (schemas, databases).
fn pg_names(
    engine: &str,
    key: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, Denied> {
    let Some(value) = get(key) else {
        return Ok(None);
    };
    if !matches!(engine, "postgres" | "postgresql") {
        return Err(Denied(format!(
            "annotation {key} applies to engine postgres only, not {engine}"
        )));
    }
    let names: Vec<&str> = value.split(',').map(str::trim).collect();
    if names
        .iter()
        .any(|n| n.is_empty() || n.len() > 63 || n.chars().any(char::is_control))
    {
        return Err(Denied(format!(
            "annotation {key}: {value:?} is not a list of names; allowed: comma-separated names of at most 63 characters"
        )));
    }
    Ok(Some(names.join(",")))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The data volumes with the path the database container mounts each at.
fn data_volumes(pod: &PodView, named: Option<String>) -> Result<Vec<(String, String)>, Denied> {
    let volumes = pod.volumes();
    let mount_of = |volume: &str| -> Option<String> {
        pod.containers().iter().find_map(|c| {
            c.volume_mounts
                .iter()
                .find(|m| m.name == volume && !m.mount_path.is_empty())
                .map(|m| m.mount_path.clone())
        })
    };
    let names: Vec<String> = match named {
        Some(list) => {
            let names: Vec<String> = list
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if names.is_empty() {
                return Err(Denied(
                    "annotation stillpoint.dev/data-volumes is empty; allowed: comma-separated names of the pod's volumes".into(),
                ));
            }
            for name in &names {
                if !volumes.iter().any(|v| &v.name == name) {
                    let have: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
                    return Err(Denied(format!(
                        "annotation stillpoint.dev/data-volumes: {name:?} is not a volume of this pod; allowed: {}",
                        if have.is_empty() {
                            "none (the pod has no volumes)".to_string()
                        } else {
                            have.join(", ")
                        }
                    )));
                }
            }
            names
        }
        None => volumes
            .iter()
            .filter(|v| v.persistent_volume_claim.is_some())
            .map(|v| v.name.clone())
            .collect(),
    };
    names
        .into_iter()
        .map(|name| match mount_of(&name) {
            Some(path) => Ok((name, path)),
            None => Err(Denied(format!(
                "annotation stillpoint.dev/data-volumes: volume {name:?} is mounted by no container of the pod, so the agent cannot know where the database sees it; mount it in the database container"
            ))),
        })
        .collect()
}

/// The user and group the agent runs as: the database container's, else
/// the pod's, else [`DEFAULT_AGENT_USER`] (root only for fsfreeze, whose
/// FIFREEZE needs an effective SYS_ADMIN, which a non-root user never has).
fn agent_user(pod: &PodView, fsfreeze: bool) -> (i64, Option<i64>) {
    if fsfreeze {
        return (0, Some(0));
    }
    let first = pod
        .containers()
        .first()
        .and_then(|c| c.security_context.as_ref());
    let pod_level = pod.spec.security_context.as_ref();
    let from = |key: fn(&UserView) -> Option<i64>| -> Option<i64> {
        first.and_then(key).or_else(|| pod_level.and_then(key))
    };
    match from(|u| u.run_as_user) {
        Some(0) | None => (DEFAULT_AGENT_USER, Some(DEFAULT_AGENT_USER)),
        Some(uid) => (uid, from(|u| u.run_as_group)),
    }
}

/// The agent container for this pod.
pub fn agent_container(pod: &PodView, s: &PodSettings, cfg: &InjectConfig) -> Value {
    let mut env = vec![
        json!({"name": "STILLPOINT_MEMBER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "STILLPOINT_ENGINE", "value": s.engine}),
        json!({"name": "STILLPOINT_CONTROLLER_IDENTITY", "value": cfg.controller_identity}),
        json!({"name": "STILLPOINT_LISTEN_ADDR", "value": format!("0.0.0.0:{AGENT_PORT}")}),
        json!({"name": "STILLPOINT_ADMIN_ADDR", "value": format!("0.0.0.0:{ADMIN_PORT}")}),
        json!({"name": "STILLPOINT_TLS_CERT", "value": "/var/run/stillpoint/tls/tls.crt"}),
        json!({"name": "STILLPOINT_TLS_KEY", "value": "/var/run/stillpoint/tls/tls.key"}),
        // Written by the agent from the controller's answer (the bundle
        // follows CA rotations); the mounted one only bootstraps trust.
        json!({"name": "STILLPOINT_TLS_CA", "value": "/var/run/stillpoint/tls/ca.crt"}),
        json!({"name": "STILLPOINT_CERT_CA", "value": "/etc/stillpoint/ca/ca.crt"}),
        json!({"name": "STILLPOINT_CERT_URL", "value": cfg.certificate_url}),
        json!({"name": "STILLPOINT_TOKEN_FILE", "value": "/var/run/secrets/stillpoint/token"}),
        json!({"name": "STILLPOINT_STATE_DIR", "value": "/var/lib/stillpoint"}),
    ];
    if s.dsn_secret.is_some() {
        env.push(json!({"name": "STILLPOINT_DSN_FILE", "value": "/etc/stillpoint/dsn/dsn"}));
    }
    if let Some(mode) = &s.pg_mode {
        env.push(json!({"name": "STILLPOINT_PG_MODE", "value": mode}));
    }
    if let Some(schemas) = &s.pg_fence_schemas {
        env.push(json!({"name": "STILLPOINT_PG_FENCE_SCHEMAS", "value": schemas}));
    }
    if let Some(databases) = &s.pg_fence_databases {
        env.push(json!({"name": "STILLPOINT_PG_FENCE_DATABASES", "value": databases}));
    }
    if let Some(t) = &s.lock_timeout {
        env.push(json!({"name": "STILLPOINT_LOCK_TIMEOUT", "value": t}));
    }
    if let Some(cmd) = &s.exec_command {
        env.push(json!({"name": "STILLPOINT_EXEC_COMMAND", "value": cmd}));
    }
    let paths: Vec<&str> = s.data_volumes.iter().map(|(_, p)| p.as_str()).collect();
    if !paths.is_empty() {
        env.push(json!({"name": "STILLPOINT_VOLUMES", "value": paths.join(",")}));
    }
    if s.fsfreeze {
        env.push(json!({"name": "STILLPOINT_FSFREEZE_MOUNTS", "value": paths.join(",")}));
    }
    let mut mounts: Vec<Value> = s
        .data_volumes
        .iter()
        .map(|(name, path)| json!({"name": name, "mountPath": path}))
        .collect();
    mounts.extend([
        json!({"name": "stillpoint-tls", "mountPath": "/var/run/stillpoint/tls"}),
        json!({"name": "stillpoint-token", "mountPath": "/var/run/secrets/stillpoint", "readOnly": true}),
        json!({"name": "stillpoint-ca", "mountPath": "/etc/stillpoint/ca", "readOnly": true}),
        json!({"name": "stillpoint-state", "mountPath": "/var/lib/stillpoint"}),
    ]);
    if s.dsn_secret.is_some() {
        mounts.push(
            json!({"name": "stillpoint-dsn", "mountPath": "/etc/stillpoint/dsn", "readOnly": true}),
        );
    }
    let (uid, gid) = agent_user(pod, s.fsfreeze);
    let mut security = json!({
        "runAsNonRoot": uid != 0,
        "runAsUser": uid,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    if let Some(gid) = gid {
        security["runAsGroup"] = json!(gid);
    }
    if s.fsfreeze {
        security["capabilities"]["add"] = json!(["SYS_ADMIN"]);
    }
    let mut container = json!({
        "name": AGENT_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "ports": [
            {"name": "stillpoint", "containerPort": AGENT_PORT, "protocol": "TCP"},
            {"name": "stillpoint-adm", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": ADMIN_PORT}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        "securityContext": security,
        "volumeMounts": mounts,
    });
    if cfg.native_sidecars {
        container["restartPolicy"] = json!("Always");
    }
    container
}

/// The volumes the agent adds to the pod.
fn agent_volumes(s: &PodSettings) -> Vec<Value> {
    let mut volumes = vec![
        json!({"name": "stillpoint-tls", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
        // Readable by the agent's user (no fsGroup is set: it would change
        // the database's volumes); only the agent container mounts these.
        json!({"name": "stillpoint-token", "projected": {"defaultMode": 0o444, "sources": [
            {"serviceAccountToken": {"audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}
        ]}}),
        json!({"name": "stillpoint-ca", "configMap": {"name": CA_BUNDLE_CONFIGMAP}}),
        json!({"name": "stillpoint-state", "emptyDir": {"sizeLimit": "1Mi"}}),
    ];
    if let Some(secret) = &s.dsn_secret {
        volumes.push(json!({"name": "stillpoint-dsn", "secret": {
            "secretName": secret, "defaultMode": 0o444, "items": [{"key": "dsn", "path": "dsn"}]
        }}));
    }
    volumes
}

/// Escapes a JSON Pointer token (RFC 6901).
/// An `add` operation at `path` (its tokens, escaped by `jsonptr`).
fn add<'t>(path: impl IntoIterator<Item = &'t str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path),
        value,
    })
}

/// The JSON Patch that injects the agent into `pod`.
pub fn patch(pod: &PodView, s: &PodSettings, cfg: &InjectConfig) -> Result<Patch, Denied> {
    for volume in agent_volumes(s) {
        let name = get_str(&volume, &["name"]).unwrap_or_default().to_string();
        if pod.volumes().iter().any(|v| v.name == name) {
            return Err(Denied(format!(
                "the pod already has a volume named {name:?}, which the injector adds; rename it"
            )));
        }
    }
    let mut ops = Vec::new();
    let container = agent_container(pod, s, cfg);
    let (list, present, index_first) = if cfg.native_sidecars {
        ("initContainers", pod.spec.init_containers.is_some(), true)
    } else {
        ("containers", pod.spec.containers.is_some(), false)
    };
    ops.push(match (present, index_first) {
        (true, true) => add(["spec", list, "0"], container),
        (true, false) => add(["spec", list, "-"], container),
        (false, _) => add(["spec", list], json!([container])),
    });
    let volumes = agent_volumes(s);
    match pod.spec.volumes.as_ref() {
        Some(_) => ops.extend(
            volumes
                .into_iter()
                .map(|v| add(["spec", "volumes", "-"], v)),
        ),
        None => ops.push(add(["spec", "volumes"], json!(volumes))),
    }
    ops.push(match pod.metadata.annotations.as_ref() {
        Some(_) => add(
            ["metadata", "annotations", INJECTED_ANNOTATION],
            json!(cfg.version),
        ),
        None => add(
            ["metadata", "annotations"],
            json!({INJECTED_ANNOTATION: cfg.version}),
        ),
    });
    Ok(Patch(ops))
}

/// What the webhook answers for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Allowed as it is (not opted in, or already injected).
    Unchanged,
    /// Allowed with this JSON Patch.
    Patch(Patch),
    /// Denied (HTTP 403 in the AdmissionReview status) with this message.
    Denied(String),
}

/// Decides what to do with a pod: `namespace_labels` are its namespace's.
pub fn decide(
    pod: &PodView,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> Answer {
    if pod.labels().get(INJECT_LABEL).map(String::as_str) != Some("true") || already_injected(pod) {
        return Answer::Unchanged;
    }
    match settings(pod, namespace_labels).and_then(|s| patch(pod, &s, cfg)) {
        Ok(ops) => Answer::Patch(ops),
        Err(Denied(message)) => Answer::Denied(message),
    }
}

/// A request the webhook could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// What the webhook needs of an AdmissionReview request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub uid: String,
    pub namespace: String,
    pub operation: String,
    pub pod: &'a PodView,
}

/// An `admission.k8s.io/v1` AdmissionReview as far as this webhook reads
/// it: typed, and nothing else. kube's own `AdmissionRequest` also keeps
/// `oldObject`, `userInfo` and `options` (untyped JSON), which this webhook
/// never reads; parsing only what it reads means that whatever else a body
/// carries is skipped without being held in memory.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<ReviewRequest>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    object: Option<PodView>,
}

/// Only the uid, for answering a review that does not parse as a whole.
#[derive(Debug, Clone, serde::Deserialize)]
struct UidOnly {
    request: UidOnlyRequest,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct UidOnlyRequest {
    uid: String,
}

/// A request body, parsed once (or why it is not an AdmissionReview of a
/// pod), and the uid found in it, if any.
#[derive(Debug, Clone)]
pub struct Body {
    review: Result<Review, String>,
    uid: Option<String>,
}

impl Body {
    pub fn parse(body: &[u8]) -> Body {
        let review = serde_json::from_slice::<Review>(body).map_err(|e| e.to_string());
        let uid = match &review {
            Ok(r) => r.request.as_ref().map(|r| r.uid.clone()),
            Err(_) => serde_json::from_slice::<UidOnly>(body)
                .ok()
                .map(|u| u.request.uid),
        };
        Body { review, uid }
    }

    fn request(&self) -> Option<&ReviewRequest> {
        self.review.as_ref().ok()?.request.as_ref()
    }

    /// The namespace a review is about, without checking anything else
    /// (the webhook looks up its labels before [`review_body`]).
    pub fn namespace(&self) -> Option<String> {
        self.request()?.namespace.clone()
    }

    /// The pod's name, if the review names one.
    pub fn pod_name(&self) -> Option<&str> {
        self.request()?.object.as_ref()?.metadata.name.as_deref()
    }

    /// Whether the request is a dry run (nothing it causes is kept).
    pub fn dry_run(&self) -> bool {
        self.request().is_some_and(|r| r.dry_run)
    }
}

/// Reads an `admission.k8s.io/v1` AdmissionReview for a pod.
pub fn read_review(body: &Body) -> Result<Request<'_>, BadReview> {
    let review = body
        .review
        .as_ref()
        .map_err(|e| BadReview(format!("the body is not an AdmissionReview of a pod: {e}")))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(BadReview(
            "not an admission.k8s.io/v1 AdmissionReview".into(),
        ));
    }
    let request = review
        .request
        .as_ref()
        .ok_or_else(|| BadReview("the AdmissionReview has no request".into()))?;
    if request.uid.is_empty() {
        return Err(BadReview("the request has no uid".into()));
    }
    let pod = request
        .object
        .as_ref()
        .ok_or_else(|| BadReview("the request has no object".into()))?;
    if pod.kind.as_deref().is_some_and(|k| k != "Pod") {
        return Err(BadReview("the object is not a Pod".into()));
    }
    Ok(Request {
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        operation: request.operation.clone(),
        pod,
    })
}

/// kube's response to request `uid`, allowed. (kube makes one from its
/// own `AdmissionRequest`, which this webhook does not parse: see
/// [`Review`].)
fn allowed(uid: &str) -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid("");
    response.uid = uid.to_string();
    response.allowed = true;
    response.result = Status::default();
    response
}

/// Refused with HTTP status `code` and its `reason`.
fn refused(uid: &str, code: u16, reason: &str, message: String) -> AdmissionResponse {
    let mut response = allowed(uid).deny(&message);
    response.result = Status::failure(&message, reason).with_code(code);
    response.result.status = None;
    response
}

/// The AdmissionReview response for request `uid`.
pub fn response(uid: &str, answer: &Answer) -> Value {
    let response = match answer {
        Answer::Unchanged => allowed(uid),
        Answer::Patch(ops) => match allowed(uid).with_patch(ops.clone()) {
            Ok(r) => r,
            Err(e) => refused(
                uid,
                500,
                "InternalError",
                format!("stillpoint injector: {e}"),
            ),
        },
        Answer::Denied(message) => refused(
            uid,
            403,
            "Forbidden",
            format!("stillpoint injector: {message}"),
        ),
    };
    serde_json::to_value(response.into_review()).unwrap_or_default()
}

/// The answer to an unreadable review: a response with the uid when one
/// can be found (the API server then applies the failure policy), else
/// none (the server answers HTTP 400).
pub fn bad_review_response(body: &Body, err: &BadReview) -> Option<Value> {
    let uid = body.uid.clone().filter(|u| !u.is_empty())?;
    let response = refused(
        &uid,
        400,
        "BadRequest",
        format!("stillpoint injector: {err}"),
    );
    serde_json::to_value(response.into_review()).ok()
}

/// The whole webhook, given the namespace's labels: the body in, the
/// answer's body and HTTP status out. Never panics on any input.
pub fn review(
    body: &[u8],
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> (u16, Value) {
    review_body(&Body::parse(body), namespace_labels, cfg)
}

/// [`review`] of a body already parsed.
pub fn review_body(
    body: &Body,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> (u16, Value) {
    match read_review(body) {
        Ok(request) => {
            // Only CREATE injects; an UPDATE of an injected pod (or any
            // other) is left alone, so re-invocation never doubles it.
            let answer = match request.operation.as_str() {
                "CREATE" | "" => decide(request.pod, namespace_labels, cfg),
                _ => Answer::Unchanged,
            };
            (200, response(&request.uid, &answer))
        }
        Err(err) => match bad_review_response(body, &err) {
            Some(answer) => (200, answer),
            None => (400, json!({"error": format!("stillpoint injector: {err}")})),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(native: bool) -> InjectConfig {
        InjectConfig {
            image: "ghcr.io/stillpoint-dev/stillpoint-agent:0.1.0".into(),
            native_sidecars: native,
            controller_identity:
                "spiffe://cluster.local/ns/stillpoint-system/sa/stillpoint-controller".into(),
            certificate_url: "https://stillpoint-webhook.stillpoint-system.svc:9444/v1/certificate"
                .into(),
            version: "0.1.0".into(),
        }
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "pg-0", "labels": {"app": "pg", INJECT_LABEL: "true"}, "annotations": annotations},
            "spec": {
                "serviceAccountName": "pg",
                "securityContext": {"runAsUser": 999, "runAsGroup": 999},
                "containers": [{"name": "postgres", "image": "postgres:16",
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-pg-0"}},
                            {"name": "scratch", "emptyDir": {}}],
            }
        })
    }

    /// [`super::decide`] of a pod written as JSON.
    fn decide(pod: &Value, labels: &BTreeMap<String, String>, cfg: &InjectConfig) -> Answer {
        let view: PodView = serde_json::from_value(pod.clone()).unwrap();
        super::decide(&view, labels, cfg)
    }

    fn pg() -> Value {
        pod(json!({"stillpoint.dev/engine": "postgres", "stillpoint.dev/dsn-secret": "pg-agent"}))
    }

    /// Applies the JSON Patch ops this module emits (add only).
    fn apply(mut doc: Value, ops: &Patch) -> Value {
        json_patch::patch(&mut doc, ops).unwrap();
        doc
    }

    fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    }

    #[test]
    fn a_native_sidecar_with_everything_it_needs() {
        let Answer::Patch(ops) = decide(&pg(), &BTreeMap::new(), &cfg(true)) else {
            panic!("injects");
        };
        let out = apply(pg(), &ops);
        let agent = &out["spec"]["initContainers"][0];
        assert_eq!(agent["name"], AGENT_CONTAINER);
        assert_eq!(agent["restartPolicy"], "Always");
        assert_eq!(env(agent, "STILLPOINT_ENGINE"), Some("postgres"));
        assert_eq!(
            env(agent, "STILLPOINT_VOLUMES"),
            Some("/var/lib/postgresql/data")
        );
        assert_eq!(
            env(agent, "STILLPOINT_DSN_FILE"),
            Some("/etc/stillpoint/dsn/dsn")
        );
        assert!(env(agent, "STILLPOINT_FSFREEZE_MOUNTS").is_none());
        let sc = &agent["securityContext"];
        assert_eq!(sc["runAsUser"], 999, "the database's user reads its volume");
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(agent["ports"][0]["name"], "stillpoint");
        let volumes = out["spec"]["volumes"].as_array().unwrap();
        let token = volumes
            .iter()
            .find(|v| v["name"] == "stillpoint-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            TOKEN_AUDIENCE
        );
        let dsn = volumes
            .iter()
            .find(|v| v["name"] == "stillpoint-dsn")
            .unwrap();
        assert_eq!(dsn["secret"]["secretName"], "pg-agent");
        assert_eq!(out["metadata"]["annotations"][INJECTED_ANNOTATION], "0.1.0");
        assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
        // Injecting the injected pod changes nothing.
        assert_eq!(
            decide(&out, &BTreeMap::new(), &cfg(true)),
            Answer::Unchanged
        );
    }

    #[test]
    fn namespaces_are_excluded_as_the_configuration_selects_them() {
        let yaml = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/webhook.yaml"),
        )
        .unwrap();
        let config: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration =
            serde_yaml::from_str(
                yaml.split("\n---\n")
                    .find(|d| d.contains("\nkind: MutatingWebhookConfiguration\n"))
                    .unwrap(),
            )
            .unwrap();
        let selectors: Vec<_> = config
            .webhooks
            .unwrap()
            .into_iter()
            .map(|w| w.namespace_selector)
            .collect();
        let ns = |name: &str, extra: &[(&str, &str)]| {
            let mut labels =
                BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]);
            labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            labels
        };
        assert_eq!(excluded_namespace(&selectors, Some(&ns("shop", &[]))), None);
        for labels in [
            ns("kube-system", &[]),
            ns("stillpoint-system", &[]),
            ns("quiet", &[(INJECT_LABEL, "disabled")]),
        ] {
            assert!(
                excluded_namespace(&selectors, Some(&labels)).is_some(),
                "{labels:?}"
            );
        }
        assert!(
            excluded_namespace(&selectors, None).is_some(),
            "unknown labels"
        );
        assert_eq!(excluded_namespace(&[None], Some(&ns("any", &[]))), None);
    }

    #[test]
    fn the_fence_is_configured_by_annotation() {
        let p = pod(json!({
            "stillpoint.dev/engine": "postgres",
            "stillpoint.dev/dsn-secret": "pg-agent",
            "stillpoint.dev/pg-fence-schemas": "shop, audit",
            "stillpoint.dev/pg-fence-databases": "app",
        }));
        let Answer::Patch(ops) = decide(&p, &BTreeMap::new(), &cfg(true)) else {
            panic!("injects");
        };
        let out = apply(p, &ops);
        let agent = &out["spec"]["initContainers"][0];
        assert_eq!(
            env(agent, "STILLPOINT_PG_FENCE_SCHEMAS"),
            Some("shop,audit")
        );
        assert_eq!(env(agent, "STILLPOINT_PG_FENCE_DATABASES"), Some("app"));
        let plain = apply(pg(), &ops_of(&pg()));
        let agent = &plain["spec"]["initContainers"][0];
        assert!(env(agent, "STILLPOINT_PG_FENCE_SCHEMAS").is_none());
    }

    fn ops_of(p: &Value) -> Patch {
        match decide(p, &BTreeMap::new(), &cfg(true)) {
            Answer::Patch(ops) => ops,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_regular_container_where_native_sidecars_are_missing() {
        let Answer::Patch(ops) = decide(&pg(), &BTreeMap::new(), &cfg(false)) else {
            panic!("injects");
        };
        let out = apply(pg(), &ops);
        assert!(out["spec"].get("initContainers").is_none());
        let agent = &out["spec"]["containers"][1];
        assert_eq!(agent["name"], AGENT_CONTAINER);
        assert!(agent.get("restartPolicy").is_none());
    }

    #[test]
    fn pods_that_did_not_opt_in_are_left_alone() {
        let mut p = pg();
        p["metadata"]["labels"][INJECT_LABEL] = json!("false");
        assert_eq!(decide(&p, &BTreeMap::new(), &cfg(true)), Answer::Unchanged);
        p["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove(INJECT_LABEL);
        assert_eq!(decide(&p, &BTreeMap::new(), &cfg(true)), Answer::Unchanged);
    }

    #[test]
    fn a_pod_with_the_agent_by_hand_is_not_injected_again() {
        let mut p = pg();
        p["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": AGENT_CONTAINER, "image": "x"}));
        assert_eq!(decide(&p, &BTreeMap::new(), &cfg(true)), Answer::Unchanged);
    }

    #[test]
    fn every_bad_annotation_is_denied_with_its_name_and_what_is_allowed() {
        let restricted: BTreeMap<String, String> = [(
            "pod-security.kubernetes.io/enforce".to_string(),
            "restricted".to_string(),
        )]
        .into();
        let none = BTreeMap::new();
        let cases: Vec<(Value, &BTreeMap<String, String>, &[&str])> = vec![
            (
                json!({}),
                &none,
                &["stillpoint.dev/engine is missing", "postgres"],
            ),
            (
                json!({"stillpoint.dev/engine": "postgress"}),
                &none,
                &[
                    "stillpoint.dev/engine",
                    "\"postgress\"",
                    "allowed: postgres",
                ],
            ),
            (
                json!({"stillpoint.dev/engine": "postgres"}),
                &none,
                &["stillpoint.dev/dsn-secret is missing"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "Bad_Name"}),
                &none,
                &["stillpoint.dev/dsn-secret", "DNS subdomain"],
            ),
            (
                json!({"stillpoint.dev/engine": "postgres", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/pg-mode": "freeze"}),
                &none,
                &["stillpoint.dev/pg-mode", "allowed: backup, fence"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/pg-mode": "fence"}),
                &none,
                &["stillpoint.dev/pg-mode applies to engine postgres only"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/pg-fence-schemas": "app"}),
                &none,
                &["stillpoint.dev/pg-fence-schemas applies to engine postgres only"],
            ),
            (
                json!({"stillpoint.dev/engine": "postgres", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/pg-fence-databases": "shop,,other"}),
                &none,
                &["stillpoint.dev/pg-fence-databases", "comma-separated names"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/lock-timeout": "soon"}),
                &none,
                &["stillpoint.dev/lock-timeout", "5s"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/fsfreeze": "yes"}),
                &none,
                &["stillpoint.dev/fsfreeze", "allowed: true, false"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/fsfreeze": "true"}),
                &restricted,
                &[
                    "SYS_ADMIN",
                    "\"restricted\"",
                    "pod-security.kubernetes.io/enforce=privileged",
                ],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/data-volumes": "data,logs"}),
                &none,
                &[
                    "stillpoint.dev/data-volumes",
                    "\"logs\"",
                    "allowed: data, scratch",
                ],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/data-volumes": "scratch"}),
                &none,
                &["volume \"scratch\" is mounted by no container"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/datavolumes": "data"}),
                &none,
                &[
                    "stillpoint.dev/datavolumes is not one the injector reads",
                    "stillpoint.dev/data-volumes",
                ],
            ),
            (
                json!({"stillpoint.dev/engine": "exec"}),
                &none,
                &["stillpoint.dev/exec-command is missing"],
            ),
            (
                json!({"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "s", "stillpoint.dev/exec-command": "x"}),
                &none,
                &["stillpoint.dev/exec-command applies to engine exec only"],
            ),
        ];
        for (annotations, ns, needles) in cases {
            let p = pod(annotations.clone());
            let answer = decide(&p, ns, &cfg(true));
            let Answer::Denied(message) = &answer else {
                panic!("{annotations} is denied, not {answer:?}");
            };
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{annotations}: {message:?} lacks {needle:?}"
                );
            }
        }
    }

    #[test]
    fn fsfreeze_asks_for_sys_admin_where_the_namespace_allows_it() {
        let p = pod(
            json!({"stillpoint.dev/engine": "postgres", "stillpoint.dev/dsn-secret": "s",
            "stillpoint.dev/fsfreeze": "true"}),
        );
        let Answer::Patch(ops) = decide(&p, &BTreeMap::new(), &cfg(true)) else {
            panic!("injects");
        };
        let out = apply(p, &ops);
        let agent = &out["spec"]["initContainers"][0];
        assert_eq!(
            agent["securityContext"]["capabilities"]["add"],
            json!(["SYS_ADMIN"])
        );
        assert_eq!(agent["securityContext"]["runAsUser"], 0);
        assert_eq!(
            env(agent, "STILLPOINT_FSFREEZE_MOUNTS"),
            Some("/var/lib/postgresql/data")
        );
    }

    #[test]
    fn the_review_envelope() {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "namespace": "shop", "operation": "CREATE", "object": pg()},
        });
        let bytes = serde_json::to_vec(&body).unwrap();
        assert_eq!(Body::parse(&bytes).namespace().as_deref(), Some("shop"));
        let (code, answer) = review(&bytes, &BTreeMap::new(), &cfg(true));
        assert_eq!(code, 200);
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        // An UPDATE is never mutated.
        let mut update = body.clone();
        update["request"]["operation"] = json!("UPDATE");
        let (_, answer) = review(
            &serde_json::to_vec(&update).unwrap(),
            &BTreeMap::new(),
            &cfg(true),
        );
        assert!(answer["response"].get("patch").is_none());
        // Malformed: with a uid, a 400 inside the review; without, HTTP 400.
        let mut broken = body.clone();
        broken["request"]["object"] = json!("a string");
        let (code, answer) = review(
            &serde_json::to_vec(&broken).unwrap(),
            &BTreeMap::new(),
            &cfg(true),
        );
        assert_eq!(code, 200);
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["code"], 400);
        // Typed: an object that is not a Pod is not read as one.
        let mut secret = body.clone();
        secret["request"]["object"] =
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}});
        let (code, answer) = review(
            &serde_json::to_vec(&secret).unwrap(),
            &BTreeMap::new(),
            &cfg(true),
        );
        assert_eq!(
            (code, answer["response"]["allowed"].clone()),
            (200, json!(false))
        );
        assert!(
            answer["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("the object is not a Pod"),
            "{answer}"
        );
        for garbage in [&b"{"[..], b"[]", b"null", b"{\"request\":{}}", b"\xff\xfe"] {
            let (code, _) = review(garbage, &BTreeMap::new(), &cfg(true));
            assert_eq!(code, 400);
        }
    }
}
