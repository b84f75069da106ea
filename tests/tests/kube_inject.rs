//! Sidecar injection and the in-cluster PKI against the lab's real API
//! server: the controller (under deploy's RBAC, `--pki`) keeps its CA in a
//! Secret, serves the mutating webhook the API server calls for opted-in
//! pods, and issues agents their certificates after a TokenReview of their
//! projected tokens; the injected agents then serve a group backup.

use std::time::Duration;

use ::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use stillpoint_agent::certs::{CertError, CertSource};
use stillpoint_controller::kube::crd::{BackupPhase, GroupBackup};
use stillpoint_controller::kube::inject::{AGENT_CONTAINER, INJECTED_ANNOTATION};
use stillpoint_proto::tls::{TlsFiles, uri_sans};
use stillpoint_tests::harness::kube::stillpoint::{self, ControllerProc, TRUST_DOMAIN};
use stillpoint_tests::harness::kube::{
    self, KubeLab, postgres_of, wait_async, wait_pod_ready, wait_pvc_bound,
};
use tokio::sync::OnceCell;

const BOUND: Duration = Duration::from_secs(180);
const WEBHOOK: &str = "stillpoint-injector";

fn lab() -> &'static KubeLab {
    tokio::task::block_in_place(KubeLab::shared)
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The controller every test of this binary shares (one leader: the
/// webhook and the CA are cluster-wide), and where its endpoint listens.
struct Shared {
    controller: ControllerProc,
    addr: String,
}

async fn shared() -> &'static Shared {
    static SHARED: OnceCell<Shared> = OnceCell::const_new();
    SHARED
        .get_or_init(|| async {
            let lab = lab();
            stillpoint::install(lab).await.unwrap();
            let admin = lab.admin().await.unwrap();
            // The configuration first: the leader fills in its caBundle.
            let controller = ControllerProc::start_pki(
                lab,
                "",
                "inject-0",
                "stillpoint-inject",
                WEBHOOK,
                "stillpoint-ca",
                &["--agent-cert-ttl", "1h"],
            )
            .await
            .unwrap();
            let addr = controller.webhook_addr(BOUND).await.unwrap();
            install_webhook(&admin, WEBHOOK, &format!("https://{addr}/mutate"), None).await;
            let configs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
            wait_async("the webhook's caBundle published", BOUND, || {
                let configs = configs.clone();
                async move {
                    let c = configs.get(WEBHOOK).await?;
                    Ok(c.webhooks
                        .iter()
                        .flatten()
                        .all(|w| w.client_config.ca_bundle.is_some()))
                }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", controller.logs()));
            Shared { controller, addr }
        })
        .await
}

/// deploy/webhook.yaml's configuration, named `name`, calling `url`
/// (the lab has no Service network), optionally only for namespace `only`.
async fn install_webhook(admin: &::kube::Client, name: &str, url: &str, only: Option<&str>) {
    let yaml = std::fs::read_to_string(repo().join("deploy/webhook.yaml")).unwrap();
    let doc = yaml
        .split("\n---\n")
        .find(|d| d.contains("\nkind: MutatingWebhookConfiguration\n"))
        .unwrap();
    let mut config: serde_json::Value = serde_yaml::from_str(doc).unwrap();
    config["metadata"]["name"] = name.into();
    let hook = &mut config["webhooks"][0];
    hook["clientConfig"] = serde_json::json!({ "url": url });
    if let Some(ns) = only {
        hook["name"] = format!("{name}.stillpoint.dev").into();
        hook["namespaceSelector"] = serde_json::json!({
            "matchLabels": {"kubernetes.io/metadata.name": ns}
        });
    }
    let api: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    api.patch(
        name,
        &PatchParams::apply("stillpoint-tests").force(),
        &Patch::Apply(&config),
    )
    .await
    .unwrap();
}

struct Space {
    lab: &'static KubeLab,
    admin: ::kube::Client,
    ns: String,
}

impl Space {
    async fn new(prefix: &str) -> Space {
        shared().await;
        let lab = lab();
        let admin = lab.admin().await.unwrap();
        let ns = lab.namespace(prefix).await.unwrap();
        Space { lab, admin, ns }
    }

    async fn apply(&self, yaml: &str) {
        stillpoint::apply_all(self.lab, &self.admin, yaml)
            .await
            .unwrap();
    }

    /// Creates `yaml` (one object); the API server's error if it refuses.
    async fn create(&self, yaml: &str) -> Result<(), String> {
        self.lab
            .apply_yaml(&self.admin, yaml)
            .await
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    }

    async fn sa(&self, name: &str) {
        let ns = &self.ns;
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}"
        ))
        .await;
    }

    async fn pod(&self, name: &str) -> Pod {
        Api::<Pod>::namespaced(self.admin.clone(), &self.ns)
            .get(name)
            .await
            .unwrap()
    }

    /// A token of ServiceAccount `sa` for `audience`, bound to `pod` if given.
    async fn token(&self, sa: &str, audience: &str, pod: Option<&Pod>) -> String {
        token_of(&self.admin, &self.ns, sa, audience, pod).await
    }
}

/// A token of ServiceAccount `ns`/`sa` for `audience`, bound to `pod` if given.
async fn token_of(
    admin: &::kube::Client,
    ns: &str,
    sa: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.to_string()]),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    api.create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap()
}

fn agent_of(pod: &Pod) -> Vec<&k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .filter(|c| c.name == AGENT_CONTAINER)
        .collect()
}

/// A PostgreSQL StatefulSet `pg` (one replica) that opted in.
fn postgres_statefulset(ns: &str) -> String {
    let (uid, gid) = kube::host_user("postgres").unwrap();
    format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: pg, namespace: {ns}}}
spec:
  serviceName: pg
  replicas: 1
  selector: {{matchLabels: {{app: pg}}}}
  template:
    metadata:
      labels: {{app: pg, stillpoint.dev/inject: "true"}}
      annotations:
        stillpoint.dev/engine: postgres
        stillpoint.dev/dsn-secret: pg-agent
        stillpoint.dev/data-volumes: data
    spec:
      serviceAccountName: pg
      containers:
      - name: postgres
        image: postgres:16
        command: [sh, -c, "test -f /data/pgdata/PG_VERSION || {{ initdb -D /data/pgdata -U postgres -A trust >/dev/null && echo 'host all all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf && echo 'host replication all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf; }} && exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
        securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
        ports: [{{name: pg, containerPort: 5432}}]
        readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opted_in_statefulset_gets_the_agent_its_certificate_and_a_consistent_backup() {
    let s = Space::new("inject").await;
    let ns = &s.ns;
    s.sa("pg").await;
    s.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: pg-agent, namespace: {ns}}}\n\
         stringData: {{dsn: \"host=127.0.0.1 port=5432 user=postgres dbname=postgres\"}}"
    ))
    .await;
    s.apply(&postgres_statefulset(ns)).await;
    let pod = wait_pod_ready(&s.admin, ns, "pg-0", BOUND)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nagent:\n{}\ncontroller:\n{}",
                s.lab.container_log(ns, "pg-0", AGENT_CONTAINER),
                shared_logs()
            )
        });
    // Injected once, as a native sidecar, with the status annotation.
    let agents = agent_of(&pod);
    assert_eq!(agents.len(), 1, "one agent");
    assert_eq!(agents[0].restart_policy.as_deref(), Some("Always"));
    assert!(
        pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].name == AGENT_CONTAINER,
        "the agent starts first"
    );
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key(INJECTED_ANNOTATION));
    // A streaming replica of it, an opted-in pod too.
    let primary_ip = kube::pod_ip(&pod).unwrap();
    let (uid, gid) = kube::host_user("postgres").unwrap();
    s.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data-pg-r, namespace: {ns}}}\n\
         spec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
    ))
    .await;
    s.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: pg-r
  namespace: {ns}
  labels: {{app: pg, stillpoint.dev/inject: "true"}}
  annotations: {{stillpoint.dev/engine: postgres, stillpoint.dev/dsn-secret: pg-agent, stillpoint.dev/data-volumes: data}}
spec:
  serviceAccountName: pg
  containers:
  - name: postgres
    image: postgres:16
    command: [sh, -c, "test -f /data/pgdata/PG_VERSION || pg_basebackup -h {primary_ip} -U postgres -D /data/pgdata -R -X stream -C -S pg_r && chmod 700 /data/pgdata && exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: data-pg-r}}}}]
"#
    ))
    .await;
    wait_pod_ready(&s.admin, ns, "pg-r", BOUND)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nagent:\n{}",
                s.lab.container_log(ns, "pg-r", AGENT_CONTAINER)
            )
        });

    // Its group is protectable: the agent answered with the identity of
    // the pod's ServiceAccount, from a certificate the controller issued.
    s.apply(&format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: shop, namespace: {ns}}}\n\
         spec:\n  members:\n  - {{name: pg, selector: {{matchLabels: {{app: pg}}}}}}\n  \
         snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  freezeBudget: 20s\n  leaseTTL: 5s\n",
        kube::ATOMIC_SNAPSHOT_CLASS
    ))
    .await;
    // Backups run under a controller watching this namespace, with the
    // identity the PKI issued the shared one.
    let db = postgres_of(&pod).await.unwrap();
    db.batch_execute("CREATE TABLE t (id int primary key)")
        .await
        .unwrap();
    for id in 0..100 {
        db.execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    s.apply(&format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: b1, namespace: {ns}}}\n\
         spec: {{group: shop}}"
    ))
    .await;
    let backups: Api<GroupBackup> = Api::namespaced(s.admin.clone(), ns);
    wait_async("GroupBackup b1 to end", BOUND, || {
        let backups = backups.clone();
        async move {
            Ok(backups
                .get("b1")
                .await?
                .status
                .and_then(|s| s.phase)
                .is_some_and(BackupPhase::is_final))
        }
    })
    .await
    .unwrap();
    let b = backups.get("b1").await.unwrap();
    let status = b.status.clone().unwrap();
    assert_eq!(
        status.phase,
        Some(BackupPhase::Succeeded),
        "{status:?}\n{}",
        shared_logs()
    );
    // Both members, the replica aligned to its primary's frozen position.
    assert_eq!(status.members.len(), 2, "{status:?}");
    let replica = status
        .members
        .iter()
        .find(|m| m.role.as_deref() == Some("replica"))
        .unwrap_or_else(|| panic!("a replica in {status:?}"));
    assert_eq!(replica.pod, "pg-r");
    assert!(replica.aligned_to.is_some(), "{replica:?}");

    // Each restored into a new PVC and a plain pod: every acknowledged
    // row, in the primary and in its replica alike.
    for (i, member) in status.members.iter().enumerate() {
        let snapshot = &member.volume_snapshots[0].name;
        let name = format!("restored-{i}");
        s.apply(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n  \
             dataSource: {{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: {snapshot}}}\n"
        ))
        .await;
        wait_pvc_bound(&s.admin, ns, &name, BOUND).await.unwrap();
        s.apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  containers:
  - name: postgres
    image: postgres:16
    command: [sh, -c, "rm -f /data/pgdata/postmaster.pid /data/pgdata/standby.signal && exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {name}}}}}]
"#
        ))
        .await;
        let restored = wait_pod_ready(&s.admin, ns, &name, BOUND).await.unwrap();
        assert!(
            agent_of(&restored).is_empty(),
            "a pod that did not opt in is left alone"
        );
        let n: i64 = postgres_of(&restored)
            .await
            .unwrap()
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 100,
            "{}: every row acknowledged before the backup",
            member.pod
        );
    }
}

fn shared_logs() -> String {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async { shared().await.controller.logs() })
    })
}

/// The CA bundle (to reach the endpoint) as the namespace's ConfigMap has it.
async fn bundle_file(s: &Space, dir: &std::path::Path) -> std::path::PathBuf {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(s.admin.clone(), &s.ns);
    let found = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    wait_async("the CA bundle ConfigMap", BOUND, || {
        let (api, found) = (api.clone(), found.clone());
        async move {
            let cm = api.get_opt("stillpoint-ca").await?;
            let bundle = cm
                .and_then(|c| c.data)
                .and_then(|d| d.get("ca.crt").cloned())
                .unwrap_or_default();
            *found.lock().unwrap() = bundle.clone();
            Ok(!bundle.is_empty())
        }
    })
    .await
    .unwrap();
    let path = dir.join("bundle.crt");
    std::fs::write(&path, found.lock().unwrap().as_str()).unwrap();
    path
}

/// Asks the endpoint for a certificate with `token`, as an agent does.
async fn ask(addr: &str, bundle: &std::path::Path, token: &str) -> Result<TlsFiles, CertError> {
    let dir = tempfile::tempdir().unwrap().keep();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let source = CertSource {
        url: format!("https://{addr}/v1/certificate"),
        token_file,
        ca_file: bundle.to_path_buf(),
    };
    let files = TlsFiles::in_dir(&dir);
    stillpoint_agent::certs::obtain(&source, &files).await?;
    Ok(files)
}

/// A JWT like the API server's for `sa`, signed with the lab's
/// ServiceAccount key, that expired an hour ago.
fn expired_token(lab: &KubeLab, ns: &str, sa: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "aud": ["stillpoint"],
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0"}},
    });
    let payload = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{payload}");
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(lab.dir.join("pki/service-accounts.key"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(signing_input.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "openssl signs the token");
    format!("{signing_input}.{}", b64(&out.stdout))
}

fn refused(result: Result<TlsFiles, CertError>) -> (u16, String) {
    match result {
        Err(CertError::Refused(code, message)) => (code, message),
        other => panic!("refused, not {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_only_for_opted_in_pods_presenting_their_own_token() {
    let s = Space::new("certs").await;
    let ns = &s.ns;
    let addr = shared().await.addr.clone();
    s.sa("db").await;
    s.sa("other").await;
    // An opted-in pod (its own agent is injected and asks too) and one that
    // did not opt in.
    for (name, label) in [("opted", "true"), ("plain", "false")] {
        s.create(&redis_pod(ns, name, label)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(&s, dir.path()).await;
    let opted = s.pod("opted").await;
    let plain = s.pod("plain").await;

    // The pod's own bound token: a certificate for its ServiceAccount.
    let token = s.token("db", "stillpoint", Some(&opted)).await;
    let files = ask(&addr, &bundle, &token).await.unwrap();
    let pem = std::fs::read(&files.cert).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        uri_sans(&der).unwrap(),
        vec![format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/db")]
    );

    // Another audience.
    let token = s.token("db", "api", Some(&opted)).await;
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 401, "{message}");
    // Not bound to a pod.
    let token = s.token("db", "stillpoint", None).await;
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 403);
    assert!(message.contains("not bound to a pod"), "{message}");
    // A pod that did not opt in.
    let token = s.token("db", "stillpoint", Some(&plain)).await;
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 403);
    assert!(message.contains("not opted in"), "{message}");
    // Another ServiceAccount's token for the opted-in pod: the API server
    // refuses to bind it, or the controller refuses it.
    let api: Api<ServiceAccount> = Api::namespaced(s.admin.clone(), ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["stillpoint".into()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: opted.metadata.name.clone(),
                uid: opted.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    if let Ok(issued) = api
        .create_token_request("other", &PostParams::default(), &request)
        .await
    {
        let token = issued.status.unwrap().token.unwrap();
        let (code, message) = refused(ask(&addr, &bundle, &token).await);
        assert_eq!(code, 403);
        assert!(message.contains("runs as ServiceAccount db"), "{message}");
    }
    // An expired token (signed by the cluster's own key).
    let token = expired_token(s.lab, ns, "db");
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 401, "{message}");
    // No token at all.
    let (code, _) = refused(ask(&addr, &bundle, "").await);
    assert_eq!(code, 401);

    // An opted-in pod where the webhook never injects: a namespace that
    // opted out, and the controller's own namespace and identity.
    let off = Space::new("certs-off").await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(off.admin.clone())
        .patch(
            &off.ns,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"stillpoint.dev/inject": "disabled"}}}),
            ),
        )
        .await
        .unwrap();
    off.sa("db").await;
    let controller_ns = stillpoint_tests::harness::kube::stillpoint::CONTROLLER_NS;
    let controller_sa = stillpoint_tests::harness::kube::stillpoint::CONTROLLER_SA;
    for (space_ns, name, sa) in [
        (off.ns.as_str(), "opted-off", "db"),
        (controller_ns, "impostor", controller_sa),
    ] {
        off.create(&format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {space_ns}
  labels: {{stillpoint.dev/inject: "true"}}
spec:
  serviceAccountName: {sa}
  # As Pod Security restricted requires (stillpoint-system enforces it).
  securityContext: {{runAsNonRoot: true, runAsUser: 999, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379"]
    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
        ))
        .await
        .unwrap();
    }
    let pod_in = |ns: &str, name: &str| {
        let api: Api<Pod> = Api::namespaced(off.admin.clone(), ns);
        let name = name.to_string();
        async move { api.get(&name).await.unwrap() }
    };
    let pod = pod_in(&off.ns, "opted-off").await;
    let token = token_of(&off.admin, &off.ns, "db", "stillpoint", Some(&pod)).await;
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 403, "{message}");
    assert!(message.contains("excluded from injection"), "{message}");
    let pod = pod_in(controller_ns, "impostor").await;
    let token = token_of(
        &off.admin,
        controller_ns,
        controller_sa,
        "stillpoint",
        Some(&pod),
    )
    .await;
    let (code, message) = refused(ask(&addr, &bundle, &token).await);
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains("the controller's own identity"),
        "{message}"
    );
    Api::<Pod>::namespaced(off.admin.clone(), controller_ns)
        .delete("impostor", &DeleteParams::default())
        .await
        .unwrap();

    // Admission has no side effects: reviews the API server never sent,
    // from anyone who reaches the endpoint, for namespaces the
    // configuration leaves out and for one it serves that has no opted-in
    // pod, are answered and write nothing.
    let served = Space::new("forged").await;
    for target in [
        "kube-system",
        off.ns.as_str(),
        controller_ns,
        served.ns.as_str(),
    ] {
        let review = forged_review(target, "forged").to_string();
        let (code, _) = post(&addr, &bundle, "/mutate", review.as_bytes());
        assert_eq!(code, 200, "a forged review for {target} is answered");
        let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(off.admin.clone(), target);
        assert!(
            configmaps.get_opt("stillpoint-ca").await.unwrap().is_none(),
            "a forged review wrote the CA bundle into {target}"
        );
    }
}

/// An AdmissionReview for an opted-in Redis pod `name` in `ns`, as the API
/// server would send it.
fn forged_review(ns: &str, name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": name, "operation": "CREATE", "namespace": ns,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns,
                    "labels": {"stillpoint.dev/inject": "true"},
                    "annotations": {"stillpoint.dev/engine": "redis", "stillpoint.dev/dsn-secret": "x"}},
                "spec": {"containers": [{"name": "redis", "image": "redis:7"}]}
            }
        }
    })
}

/// POSTs `body` to `path` on the endpoint with curl: (HTTP code, body).
fn post(addr: &str, bundle: &std::path::Path, path: &str, body: &[u8]) -> (u16, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), body).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--cacert"])
        .arg(bundle)
        // Sent only once the endpoint has looked at the headers: a body
        // refused for its declared length is then not cut off mid-upload
        // (which would lose the answer to a reset).
        .args(["-H", "Expect: 100-continue"])
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", file.path().display()))
        .arg(format!("https://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (answer, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), answer.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_annotations_are_denied_and_a_pod_is_injected_once() {
    let s = Space::new("annotations").await;
    let ns = &s.ns;
    s.sa("db").await;
    let pod = |name: &str, annotations: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{stillpoint.dev/inject: "true"}}
  annotations: {{{annotations}}}
spec:
  serviceAccountName: db
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, emptyDir: {{}}}}]
"#
        )
    };
    for (annotations, needle) in [
        (
            "stillpoint.dev/engine: redis5",
            "stillpoint.dev/engine: \"redis5\" is not an engine",
        ),
        (
            "stillpoint.dev/engine: redis",
            "stillpoint.dev/dsn-secret is missing",
        ),
        (
            "stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: s, stillpoint.dev/lock-timeout: soon",
            "stillpoint.dev/lock-timeout",
        ),
        (
            "stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: s, stillpoint.dev/data-volumes: logs",
            "\"logs\" is not a volume of this pod; allowed: data",
        ),
        (
            "stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: s, stillpoint.dev/pg-mode: fence",
            "stillpoint.dev/pg-mode applies to engine postgres only",
        ),
    ] {
        let err = s.create(&pod("bad", annotations)).await.unwrap_err();
        assert!(err.contains(needle), "{annotations}: {err}");
        assert!(err.contains("denied"), "{err}");
    }
    // A good one, then updated and applied again: one agent, always.
    let good = pod(
        "good",
        "stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: redis-agent, stillpoint.dev/data-volumes: data",
    );
    s.create(&good).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(s.admin.clone(), ns);
    pods.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .unwrap();
    let manifest: serde_json::Value = serde_yaml::from_str(&good).unwrap();
    pods.patch(
        "good",
        &PatchParams::apply("stillpoint-tests"),
        &Patch::Apply(&manifest),
    )
    .await
    .unwrap();
    let p = pods.get("good").await.unwrap();
    assert_eq!(agent_of(&p).len(), 1, "injected exactly once");
    let mounts: Vec<String> = agent_of(&p)[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| format!("{}={}", m.name, m.mount_path))
        .collect();
    assert!(mounts.contains(&"data=/data".to_string()), "{mounts:?}");
    // A server-side dry run of another opted-in pod injects, and writes nothing.
    let other = pod(
        "dry",
        "stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: redis-agent",
    );
    let manifest: serde_json::Value = serde_yaml::from_str(&other).unwrap();
    let dry = pods
        .patch(
            "dry",
            &PatchParams::apply("stillpoint-tests").dry_run(),
            &Patch::Apply(&manifest),
        )
        .await
        .unwrap();
    assert_eq!(agent_of(&dry).len(), 1);
    assert!(pods.get_opt("dry").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_down_webhook_delays_only_opted_in_pods() {
    let s = Space::new("down").await;
    let ns = &s.ns;
    // A second configuration, for this namespace only, whose webhook is
    // down (nothing listens on its port).
    let closed = std::net::TcpListener::bind((s.lab.bridge.gateway(), 0)).unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let name = format!("stillpoint-down-{ns}");
    install_webhook(
        &s.admin,
        &name,
        &format!("https://{}:{port}/mutate", s.lab.bridge.gateway()),
        Some(ns),
    )
    .await;
    let pod = |name: &str, label: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{stillpoint.dev/inject: \"{label}\"}}}}\n\
             spec:\n  containers: [{{name: c, image: busybox, command: [sleep, \"3600\"]}}]\n"
        )
    };
    // Not opted in: never sent to the webhook, created at once.
    s.create(&pod("plain", "false")).await.unwrap();
    // Opted in: the failure policy (Fail) keeps it out, and says why.
    let err = s.create(&pod("opted", "true")).await.unwrap_err();
    assert!(err.contains("failed calling webhook"), "{err}");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(s.admin.clone());
    configs
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

/// The CA Secret's `ca.crt`, and whether a next CA is staged.
async fn ca_state(s: &Space, secret: &str) -> (String, bool) {
    let api: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(s.admin.clone(), stillpoint::CONTROLLER_NS);
    let data = api.get(secret).await.unwrap().data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    (text("ca.crt"), data.contains_key("next.crt"))
}

/// The agent's count of TLS reloads (from its admin port).
async fn tls_reloads(ip: std::net::Ipv4Addr) -> f64 {
    let addr = std::net::SocketAddr::from((ip, 9090));
    tokio::task::spawn_blocking(move || {
        stillpoint_tests::harness::http_get(addr, "/metrics")
            .map(|(_, body)| {
                stillpoint_tests::harness::metric_sum(&body, "stillpoint_agent_tls_reloads")
            })
            .unwrap_or(-1.0)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_freeze_outlives_agent_certificate_renewals_and_a_ca_rotation() {
    use stillpoint_controller::core::agents::{ControllerTls, HeldFreeze};
    let s = Space::new("rotation").await;
    let ns = s.ns.clone();
    // This namespace leaves the shared webhook for a controller of its own
    // whose CA lives a minute and whose certificates twelve seconds.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(s.admin.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"stillpoint.dev/inject": "disabled"}}}),
            ),
        )
        .await
        .unwrap();
    let secret = format!("ca-{ns}");
    let config = format!("stillpoint-rotation-{ns}");
    // deploy's RBAC names the Secret stillpoint-ca and the configuration
    // stillpoint-injector; this second CA and configuration need the same
    // rights for their own names.
    s.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {secret}, namespace: stillpoint-system}}\n\
         rules: [{{apiGroups: [\"\"], resources: [secrets], resourceNames: [{secret}], verbs: [get]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {secret}, namespace: stillpoint-system}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {secret}}}\n\
         subjects: [{{kind: ServiceAccount, name: stillpoint-controller, namespace: stillpoint-system}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {config}}}\n\
         rules: [{{apiGroups: [admissionregistration.k8s.io], resources: [mutatingwebhookconfigurations], resourceNames: [{config}], verbs: [get, patch]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {config}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {config}}}\n\
         subjects: [{{kind: ServiceAccount, name: stillpoint-controller, namespace: stillpoint-system}}]"
    ))
    .await;
    let ctl = ControllerProc::start_pki(
        s.lab,
        &ns,
        "rotation-0",
        &format!("rotation-{ns}"),
        &config,
        &secret,
        &[
            "--ca-validity",
            "60s",
            "--agent-cert-ttl",
            "12s",
            "--pki-interval",
            "1s",
        ],
    )
    .await
    .unwrap();
    let addr = ctl.webhook_addr(BOUND).await.unwrap();
    install_webhook(
        &s.admin,
        &config,
        &format!("https://{addr}/mutate"),
        Some(&ns),
    )
    .await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(s.admin.clone());
    wait_async("the caBundle", BOUND, || {
        let (configs, config) = (configs.clone(), config.clone());
        async move {
            Ok(configs
                .get(&config)
                .await?
                .webhooks
                .iter()
                .flatten()
                .all(|w| w.client_config.ca_bundle.is_some()))
        }
    })
    .await
    .unwrap();
    s.sa("cache").await;
    s.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: cache-agent, namespace: {ns}}}\n\
         stringData: {{dsn: \"redis://127.0.0.1:6379\"}}"
    ))
    .await;
    s.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: cache
  namespace: {ns}
  labels: {{stillpoint.dev/inject: "true"}}
  annotations: {{stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: cache-agent}}
spec:
  serviceAccountName: cache
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379", --save, "", --protected-mode, "no"]
    readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
"#
    ))
    .await;
    let pod = wait_pod_ready(&s.admin, &ns, "cache", BOUND)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}\n{}",
                s.lab.container_log(&ns, "cache", AGENT_CONTAINER),
                ctl.logs()
            )
        });
    let ip = kube::pod_ip(&pod).unwrap();
    let agent = format!("{ip}:9443");
    let identity = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/cache");
    let tls_dir = ctl.tls_dir.clone().unwrap();
    let tls = ControllerTls::watch(TlsFiles::in_dir(&tls_dir), Duration::from_secs(1)).unwrap();
    let mut client = tls.connect(&agent, &identity).await.unwrap();
    let (first_ca, _) = ca_state(&s, &secret).await;
    let reloads_before = tls_reloads(ip).await;
    let mut hold = HeldFreeze::start(&mut client, "rotation", Duration::from_secs(5))
        .await
        .unwrap();
    // Writes wait while the hold lasts.
    let mut redis = redis::Client::open(format!("redis://{ip}:6379"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis.set_response_timeout(Duration::from_millis(500));
    let blocked = |r: redis::RedisResult<()>| r.is_err();
    assert!(blocked(
        redis::cmd("SET")
            .arg("k")
            .arg("1")
            .query_async(&mut redis)
            .await
    ));
    // Renew until the CA was staged and then signs (about 52 s in).
    let mut staged = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        hold.renew().await.unwrap();
        let (ca, next) = ca_state(&s, &secret).await;
        staged |= next;
        if ca != first_ca {
            assert!(staged, "the next CA was trusted before it signed");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation:\n{}",
            ctl.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The controller and the agent renewed under the new CA (a few
    // seconds), the hold renewing all along.
    let mut renewed = false;
    for _ in 0..30 {
        hold.renew().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if tls_reloads(ip).await >= reloads_before + 2.0 {
            renewed = true;
        }
        // A new connection (the controller's new identity, the agent's
        // current certificate) still sees the hold.
        if renewed
            && let Ok(mut fresh) = tls.connect(&agent, &identity).await
            && let Ok(d) = fresh
                .describe(stillpoint_proto::pb::DescribeRequest::default())
                .await
        {
            assert_eq!(d.into_inner().holder, "rotation", "the hold is intact");
            break;
        }
    }
    assert!(renewed, "the agent reloaded its certificate while frozen");
    assert!(blocked(
        redis::cmd("SET")
            .arg("k")
            .arg("2")
            .query_async(&mut redis)
            .await
    ));
    hold.request_thaw(false).await.unwrap();
    while let Some(event) = hold.next_event().await.unwrap() {
        if matches!(
            event.event,
            Some(stillpoint_proto::pb::freeze_event::Event::Thawed(_))
        ) {
            break;
        }
    }
    redis.set_response_timeout(Duration::from_secs(5));
    let () = redis::cmd("SET")
        .arg("k")
        .arg("3")
        .query_async(&mut redis)
        .await
        .unwrap();
    configs
        .delete(&config, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_that_opted_out_is_never_injected() {
    let s = Space::new("optout").await;
    let ns = &s.ns;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(s.admin.clone());
    namespaces
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"stillpoint.dev/inject": "disabled"}}}),
            ),
        )
        .await
        .unwrap();
    // Opted in, with an annotation the webhook would deny: it never sees it.
    s.create(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: {ns}, labels: {{stillpoint.dev/inject: \"true\"}}, \
         annotations: {{stillpoint.dev/engine: nope}}}}\n\
         spec:\n  containers: [{{name: c, image: busybox, command: [sleep, \"3600\"]}}]\n"
    ))
    .await
    .unwrap();
    assert!(agent_of(&s.pod("p").await).is_empty());
}

/// A Redis pod `name` in `ns` running as ServiceAccount `db`, its opt-in
/// label set to `label`, with the annotations an agent needs.
fn redis_pod(ns: &str, name: &str, label: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{stillpoint.dev/inject: "{label}"}}
  annotations: {{stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: redis-agent}}
spec:
  serviceAccountName: db
  containers: [{{name: redis, image: redis:7, args: [--port, "6379"]}}]
"#
    )
}

/// A forged review for an opted-in pod in `ns`, exactly `bytes` long,
/// filled with what costs the parser most per byte: thousands of tiny
/// containers, volumes and annotations.
fn heaviest_review(ns: &str, bytes: usize) -> Vec<u8> {
    let mut review = forged_review(ns, "heavy");
    let object = &mut review["request"]["object"];
    let per_part = bytes / 3;
    let mut containers = vec![serde_json::json!({"name": "redis", "image": "redis:7"})];
    let mut volumes = Vec::new();
    let mut annotations = object["metadata"]["annotations"].clone();
    let (mut c, mut v, mut a) = (0usize, 0usize, 0usize);
    while c < per_part {
        let name = format!("c{}", containers.len());
        c += name.len() + 13;
        containers.push(serde_json::json!({ "name": name }));
    }
    while v < per_part {
        let name = format!("v{}", volumes.len());
        v += name.len() + 13;
        volumes.push(serde_json::json!({ "name": name }));
    }
    while a < per_part {
        let key = format!("a{a}");
        a += key.len() + 6;
        annotations[key] = "".into();
    }
    object["spec"]["containers"] = containers.into();
    object["spec"]["volumes"] = volumes.into();
    object["metadata"]["annotations"] = annotations;
    let mut body = review.to_string().into_bytes();
    // Trim or pad (with spaces, which JSON allows) to exactly `bytes`.
    while body.len() > bytes {
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut review = review;
        review["request"]["object"]["spec"]["volumes"]
            .as_array_mut()
            .unwrap()
            .pop();
        body = review.to_string().into_bytes();
    }
    body.resize(bytes, b' ');
    body
}

/// A large pod as production PostgreSQL runs: the database, an exporter, a
/// pooler and a log shipper, an init container, each with its environment,
/// probes, resources and security context; eight volumes; anti-affinity,
/// spread constraints and tolerations; and the copy of itself that
/// `kubectl apply` keeps in an annotation.
fn large_real_pod(ns: &str, name: &str) -> serde_json::Value {
    use serde_json::json;
    let env = |prefix: &str, n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"name": format!("{prefix}_SETTING_{i}"), "value": format!("value-of-setting-{i}-for-{prefix}")}))
            .chain([json!({"name": format!("{prefix}_PASSWORD"), "valueFrom": {"secretKeyRef": {"name": "pg-credentials", "key": "password"}}})])
            .collect()
    };
    let probe = |path: &str, port: i32| json!({"httpGet": {"path": path, "port": port}, "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6});
    let secure = json!({"runAsNonRoot": true, "runAsUser": 999, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}});
    let resources = |cpu: &str, mem: &str| json!({"requests": {"cpu": cpu, "memory": mem}, "limits": {"memory": mem}});
    let container = |cname: &str, image: &str, n: usize, port: i32, mounts: serde_json::Value| {
        json!({
            "name": cname, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": [format!("/usr/local/bin/{cname}")], "args": ["--config", format!("/etc/{cname}/{cname}.conf"), "--log-format", "json"],
            "ports": [{"name": format!("port-{port}"), "containerPort": port, "protocol": "TCP"}],
            "env": env(&cname.to_uppercase().replace('-', "_"), n),
            "resources": resources("500m", "1Gi"),
            "livenessProbe": probe("/healthz", port), "readinessProbe": probe("/readyz", port), "startupProbe": probe("/healthz", port),
            "securityContext": secure, "volumeMounts": mounts,
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        })
    };
    let spec = json!({
        "serviceAccountName": "db",
        "securityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [container("bootstrap", "postgres:16", 10, 8001, json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]))],
        "containers": [
            container("postgres", "postgres:16", 40, 5432, json!([
                {"name": "data", "mountPath": "/var/lib/postgresql/data"}, {"name": "wal", "mountPath": "/var/lib/postgresql/wal"},
                {"name": "config", "mountPath": "/etc/postgres"}, {"name": "tls", "mountPath": "/etc/postgres/tls", "readOnly": true},
                {"name": "run", "mountPath": "/var/run/postgresql"}, {"name": "shm", "mountPath": "/dev/shm"}])),
            container("postgres-exporter", "quay.io/prometheuscommunity/postgres-exporter:v0.15.0", 15, 9187, json!([{"name": "run", "mountPath": "/var/run/postgresql"}])),
            container("pgbouncer", "bitnami/pgbouncer:1.22.0", 20, 6432, json!([{"name": "pooler", "mountPath": "/etc/pgbouncer"}, {"name": "tls", "mountPath": "/etc/pgbouncer/tls", "readOnly": true}])),
            container("fluent-bit", "fluent/fluent-bit:3.0", 15, 2020, json!([{"name": "data", "mountPath": "/var/lib/postgresql/data", "readOnly": true}])),
        ],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": format!("data-{name}")}},
            {"name": "wal", "persistentVolumeClaim": {"claimName": format!("wal-{name}")}},
            {"name": "config", "configMap": {"name": "pg-config", "defaultMode": 420}},
            {"name": "pooler", "configMap": {"name": "pgbouncer-config"}},
            {"name": "tls", "secret": {"secretName": "pg-tls", "defaultMode": 256}},
            {"name": "run", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600, "audience": "vault"}}]}},
        ],
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres", "app.kubernetes.io/instance": "shop"}}, "topologyKey": "kubernetes.io/hostname"}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "postgres"}}}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "databases", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 120, "priorityClassName": "",
    });
    let labels = json!({"stillpoint.dev/inject": "true", "app.kubernetes.io/name": "postgres", "app.kubernetes.io/instance": "shop",
        "app.kubernetes.io/component": "database", "app.kubernetes.io/part-of": "shop", "app.kubernetes.io/managed-by": "kubectl",
        "app.kubernetes.io/version": "16.4", "role": "primary"});
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": {
            "stillpoint.dev/engine": "postgres", "stillpoint.dev/dsn-secret": "pg-agent", "stillpoint.dev/data-volumes": "data,wal",
            "prometheus.io/scrape": "true", "prometheus.io/port": "9187"}},
        "spec": spec,
    });
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        pod["spec"]["initContainers"][0]
            .as_object_mut()
            .unwrap()
            .remove(probe);
    }
    let applied = pod.to_string();
    pod["spec"]["priorityClassName"] = serde_json::Value::Null;
    pod["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
        applied.into();
    pod
}

/// Sends headers announcing a body of 1,000 bytes, then ten of them, and
/// waits: the HTTP status the endpoint answers, and after how long.
fn stalled_body(addr: &str, bundle: &std::path::Path) -> (u16, Duration) {
    use std::io::{Read, Write};
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", addr, "-CAfile"])
        .arg(bundle)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let host = addr.split(':').next().unwrap();
    let started = std::time::Instant::now();
    write!(
        stdin,
        "POST /mutate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"apiVers"
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 12];
    stdout.read_exact(&mut first).unwrap();
    let waited = started.elapsed();
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let line = String::from_utf8_lossy(&first).to_string();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {line:?}"));
    (code, waited)
}

/// The controller's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// The controller's memory limit in deploy/controller.yaml, in bytes.
fn deployed_memory_limit() -> u64 {
    let yaml = std::fs::read_to_string(repo().join("deploy/controller.yaml")).unwrap();
    let deployment: serde_json::Value = yaml
        .split("\n---\n")
        .map(|d| serde_yaml::from_str::<serde_json::Value>(d).unwrap())
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let limit =
        &deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"];
    let mib = limit
        .as_str()
        .and_then(|v| v.strip_suffix("Mi"))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("deploy/controller.yaml sets a memory limit in Mi");
    mib << 20
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_endpoint_takes_64_maximum_bodies_at_once_within_its_memory_limit_and_still_admits_pods()
 {
    let s = Space::new("flood").await;
    let ns = s.ns.clone();
    let shared = shared().await;
    s.sa("db").await;
    let pod = |name: &str| redis_pod(&ns, name, "true");
    // A real opted-in pod: the leader publishes the CA bundle here.
    s.create(&pod("first")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_file(&s, dir.path()).await;
    let limit = stillpoint_controller::kube::webhook::DEFAULT_MAX_REVIEW;
    // What a large real pod's review weighs, as the API server sends it.
    let pods: Api<Pod> = Api::namespaced(s.admin.clone(), &ns);
    pods.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &serde_json::from_value(large_real_pod(&ns, "large")).unwrap(),
    )
    .await
    .unwrap();
    let logs = shared.controller.logs();
    // Reinvoked, the review carries the injected pod: the larger one.
    let large: usize = logs
        .lines()
        .filter(|l| l.contains(&format!("namespace={ns} ")) && l.contains("pod=\"large\""))
        .filter_map(|l| l.split("an admission review of ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or_else(|| panic!("the controller logged no review of pod large:\n{logs}"));
    eprintln!("a large real pod's AdmissionReview: {large} bytes (limit {limit})");
    assert!(
        large * 8 < limit,
        "the limit leaves room for pods 8 times as large"
    );
    let small = stillpoint_controller::kube::webhook::SMALL_BODY;
    assert!(
        large as u64 * 2 < small,
        "pods twice as large still take their turn apart from large bodies ({small} bytes)"
    );
    // Over the limit: refused before it is read.
    let (code, message) = post(
        &shared.addr,
        &bundle,
        "/mutate",
        &heaviest_review(&ns, limit + 1),
    );
    assert_eq!(code, 413, "{message}");
    // A body that stops coming is given up after the read timeout.
    let (code, waited) = stalled_body(&shared.addr, &bundle);
    assert_eq!(code, 408, "a stalled body is answered 408");
    let bound = stillpoint_controller::kube::webhook::READ_TIMEOUT;
    assert!(
        waited >= bound && waited < bound + Duration::from_secs(5),
        "given up after {waited:?}, the bound is {bound:?}"
    );
    let body = dir.path().join("heavy.json");
    std::fs::write(&body, heaviest_review(&ns, limit)).unwrap();
    let (code, message) = post(
        &shared.addr,
        &bundle,
        "/mutate",
        &std::fs::read(&body).unwrap(),
    );
    assert_eq!(code, 200, "a maximum-size review is read: {message}");
    let pid = shared.controller.pid();
    let before = peak_rss(pid);
    // 64 at once, three rounds; real pods are admitted meanwhile.
    let flood = {
        let (addr, bundle, body) = (shared.addr.clone(), bundle.clone(), body.clone());
        tokio::task::spawn_blocking(move || {
            let mut codes = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..3 {
                let children: Vec<_> = (0..64)
                    .map(|_| {
                        std::process::Command::new("curl")
                            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                            .arg(&bundle)
                            .args(["-H", "Content-Type: application/json", "--data-binary"])
                            .arg(format!("@{}", body.display()))
                            .arg(format!("https://{addr}/mutate"))
                            .stdout(std::process::Stdio::piped())
                            .spawn()
                            .unwrap()
                    })
                    .collect();
                for child in children {
                    let out = child.wait_with_output().unwrap();
                    *codes
                        .entry(String::from_utf8_lossy(&out.stdout).to_string())
                        .or_default() += 1;
                }
            }
            codes
        })
    };
    let mut admitted = 0;
    while !flood.is_finished() {
        let manifest: serde_json::Value = serde_yaml::from_str(&pod("during")).unwrap();
        let dry = pods
            .patch(
                "during",
                &PatchParams::apply("stillpoint-tests").dry_run(),
                &Patch::Apply(&manifest),
            )
            .await
            .unwrap_or_else(|e| {
                let logs = shared.controller.logs();
                let tail: Vec<&str> = logs
                    .lines()
                    .filter(|l| l.contains("pod=\"during\"") || l.contains("busy"))
                    .collect();
                panic!(
                    "a real pod refused during the flood: {e}\nthe endpoint's last reviews \
                     of it and refusals as busy:\n{}",
                    tail[tail.len().saturating_sub(40)..].join("\n")
                )
            });
        assert_eq!(agent_of(&dry).len(), 1, "injected during the flood");
        admitted += 1;
    }
    let codes = flood.await.unwrap();
    let after = peak_rss(pid);
    let ceiling = deployed_memory_limit();
    eprintln!(
        "flood of 3 x 64 bodies of {limit} bytes: answers {codes:?}; {admitted} real pods \
         admitted meanwhile; controller peak RSS {} MiB before, {} MiB after (limit {} MiB)",
        before >> 20,
        after >> 20,
        ceiling >> 20
    );
    assert!(admitted >= 1, "no real pod was tried during the flood");
    assert!(
        codes.keys().all(|c| c == "200" || c == "503"),
        "every body answered or refused as busy: {codes:?}"
    );
    assert!(
        after < ceiling,
        "the controller's peak RSS {} MiB reached its limit {} MiB",
        after >> 20,
        ceiling >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_manifest_in_deploy_is_accepted_by_the_api_server() {
    let s = Space::new("manifests").await;
    let mut files: Vec<_> = ["deploy", "deploy/examples"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(repo().join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let mut checked = 0;
    for file in &files {
        // The examples' namespace is this test's.
        let yaml = std::fs::read_to_string(file)
            .unwrap()
            .replace("namespace: shop", &format!("namespace: {}", s.ns));
        for document in yaml.split("\n---\n") {
            let has_object = document.lines().any(|l| l.starts_with("kind:"));
            if !has_object {
                continue;
            }
            s.lab
                .dry_run_yaml(&s.admin, document)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:#}\n{document}", file.display()));
            checked += 1;
        }
    }
    eprintln!("{checked} objects in {} files accepted", files.len());
    // A ConsistencyGroup lists at most 64 members.
    let members: String = (0..65)
        .map(|i| format!("  - {{name: m{i}, selector: {{matchLabels: {{app: a{i}}}}}}}\n"))
        .collect();
    let group = format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: big, namespace: {}}}\n\
         spec:\n  members:\n{members}  snapshot: {{driver: csi}}\n",
        s.ns
    );
    let refused = s.lab.dry_run_yaml(&s.admin, &group).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("must have at most 64 items"),
        "{refused:#}"
    );
    // deploy/rbac.yaml's namespace enforces Pod Security restricted.
    let root = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: root, namespace: {}}}\n\
         spec: {{containers: [{{name: sh, image: busybox, securityContext: {{privileged: true}}}}]}}",
        stillpoint_tests::harness::kube::stillpoint::CONTROLLER_NS
    );
    let refused = s.lab.dry_run_yaml(&s.admin, &root).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("violates PodSecurity \"restricted"),
        "{refused:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controllers_service_account_creates_only_preparation_pods_and_artefacts_secrets() {
    use stillpoint_tests::harness::kube::stillpoint::{CONTROLLER_NS, CONTROLLER_SA};
    let s = Space::new("confined").await;
    let ns = s.ns.clone();
    // A GroupRestore to own the pod (no controller watches this namespace).
    s.apply(&format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupRestore\nmetadata: {{name: r, namespace: {ns}}}\nspec: {{backup: b}}"
    ))
    .await;
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(s.admin.clone(), &ns);
    let uid = restores.get("r").await.unwrap().metadata.uid.unwrap();
    // As the controller's ServiceAccount, with deploy's RBAC.
    let controller = s
        .lab
        .client_for(CONTROLLER_NS, CONTROLLER_SA)
        .await
        .unwrap();
    let pod = |ns: &str, image: &str, secret: &str| -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "prepare", "namespace": ns,
                "labels": {"stillpoint.dev/restore-uid": uid},
                "ownerReferences": [{"apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupRestore",
                    "name": "r", "uid": uid, "controller": true}]},
            "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 999, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "restore", "image": image, "args": ["restore"],
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "artefacts", "mountPath": "/a"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-pg-0"}},
                    {"name": "artefacts", "secret": {"secretName": secret}}],
            }
        }))
        .unwrap()
    };
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let create = |ns: &str, pod: Pod| {
        let api: Api<Pod> = Api::namespaced(controller.clone(), ns);
        let dry = dry.clone();
        async move {
            api.create(&dry, &pod)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    let agent = "ghcr.io/stillpoint-dev/stillpoint-agent:0.1.0";
    // A policy is in force a moment after it is made.
    wait_async("the policy in force", BOUND, || {
        let attempt = create("kube-system", pod("kube-system", agent, "b-artefacts"));
        async move { Ok(attempt.await.is_err()) }
    })
    .await
    .unwrap();
    // A preparation pod is admitted.
    create(&ns, pod(&ns, agent, "b-artefacts")).await.unwrap();
    for (target, p, needle) in [
        (
            "kube-system",
            pod("kube-system", agent, "b-artefacts"),
            "system namespace",
        ),
        (
            ns.as_str(),
            pod(&ns, "busybox:1.36", "b-artefacts"),
            "the agent image",
        ),
        (
            ns.as_str(),
            pod(&ns, agent, "cloud-credentials"),
            "artefacts Secret",
        ),
    ] {
        let refused = create(target, p).await.unwrap_err();
        assert!(
            refused.contains("stillpoint-controller-confined") && refused.contains(needle),
            "{target}: {refused}"
        );
    }
    // Secrets: a backup's artefacts, owned by it, only.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(controller.clone(), &ns);
    let secret = |name: &str, owner: &str| -> k8s_openapi::api::core::v1::Secret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns,
                "ownerReferences": [{"apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupBackup",
                    "name": owner, "uid": "00000000-0000-0000-0000-000000000001"}]},
        }))
        .unwrap()
    };
    secrets
        .create(&dry, &secret("b-artefacts", "b"))
        .await
        .unwrap();
    let refused = secrets
        .create(&dry, &secret("registry-token", "b"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("stillpoint-controller-confined"),
        "{refused}"
    );
    // PVCs: it changes only the labels a csi-group cut selects by.
    s.apply(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data, namespace: {ns}, labels: {{app: shop}}}}\n\
         spec:\n  storageClassName: nowhere\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
    ))
    .await;
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(controller.clone(), &ns);
    let patch = |metadata: serde_json::Value| {
        let pvcs = pvcs.clone();
        async move {
            let params = PatchParams {
                dry_run: true,
                ..Default::default()
            };
            pvcs.patch(
                "data",
                &params,
                &Patch::Merge(serde_json::json!({ "metadata": metadata })),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        }
    };
    patch(serde_json::json!({"labels": {"stillpoint.dev/backup": "u", "stillpoint.dev/cut": "1"}}))
        .await
        .unwrap();
    for (what, metadata) in [
        (
            "another label",
            serde_json::json!({"labels": {"app": "other"}}),
        ),
        (
            "a label removed",
            serde_json::json!({"labels": {"app": null}}),
        ),
        (
            "an annotation",
            serde_json::json!({"annotations": {"a": "b"}}),
        ),
        (
            "a finalizer",
            serde_json::json!({"finalizers": ["example.com/keep"]}),
        ),
    ] {
        let refused = patch(metadata).await.unwrap_err();
        assert!(
            refused.contains("stillpoint-controller-confined") && refused.contains("labels"),
            "{what}: {refused}"
        );
    }
}
