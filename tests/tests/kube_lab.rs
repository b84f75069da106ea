//! The Kubernetes lab itself, against its real API server: PVCs provisioned
//! by the real external-provisioner and bound by kube-controller-manager, a
//! database run by the pod runner at its pod IP, VolumeSnapshots and a
//! VolumeGroupSnapshot cut by the real snapshot controllers and restored,
//! a mutating webhook called by the API server, TokenRequest/TokenReview
//! and RBAC; and a lab that leaves nothing behind.

use std::time::Duration;

use ::kube::api::{Api, ListParams, PostParams};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use stillpoint_tests::harness::kube::{
    self, KubeLab, custom_field, pod_ip, wait_async, wait_pod_ready, wait_pvc_bound,
};

const BOUND: Duration = Duration::from_secs(120);

fn lab() -> &'static KubeLab {
    tokio::task::block_in_place(KubeLab::shared)
}

/// The uid and gid of a host user (the lab runs containers as host users).
fn user(name: &str) -> (u32, u32) {
    kube::host_user(name).unwrap()
}

fn pvc(ns: &str, name: &str, labels: &str, source: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n{source}"
    )
}

/// A PostgreSQL pod on PVC `claim`; `init`: create the cluster first.
fn postgres_pod(ns: &str, name: &str, claim: &str, init: bool) -> String {
    let (uid, gid) = user("postgres");
    let start = if init {
        "initdb -D /data/pgdata -U postgres -A trust >/dev/null && \
         echo 'host all all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf && "
    } else {
        "rm -f /data/pgdata/postmaster.pid && "
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  containers:
  - name: postgres
    image: postgres:15
    command: [sh, -c, "{start}exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    ports: [{{name: pg, containerPort: 5432}}]
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}]
"#
    )
}

async fn connect(pod: &Pod) -> tokio_postgres::Client {
    kube::postgres_of(pod).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_runs_on_a_pvc_and_a_snapshot_of_it_restores_into_a_new_pvc() {
    let lab = lab();
    let client = lab.admin().await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.36.3");
    let ns = lab.namespace("pvc").await.unwrap();

    lab.apply_yaml(&client, &pvc(&ns, "pg-data", "", ""))
        .await
        .unwrap();
    wait_pvc_bound(&client, &ns, "pg-data", BOUND)
        .await
        .unwrap();
    lab.apply_yaml(&client, &postgres_pod(&ns, "pg", "pg-data", true))
        .await
        .unwrap();
    let pod = wait_pod_ready(&client, &ns, "pg", BOUND).await.unwrap();
    let ip = pod_ip(&pod).unwrap();
    assert!(ip.octets()[0] == 198, "a pod IP of the lab's bridge: {ip}");
    let db = connect(&pod).await;
    db.batch_execute(
        "CREATE TABLE kept (id int); INSERT INTO kept SELECT generate_series(1, 42); CHECKPOINT",
    )
    .await
    .unwrap();

    // An atomic snapshot, restored into a new PVC, holds the data.
    lab.apply_yaml(
        &client,
        &format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {{name: pg-snap, namespace: {ns}}}\n\
             spec: {{volumeSnapshotClassName: {}, source: {{persistentVolumeClaimName: pg-data}}}}",
            kube::ATOMIC_SNAPSHOT_CLASS
        ),
    )
    .await
    .unwrap();
    wait_async("the VolumeSnapshot readyToUse", BOUND, || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let ready = custom_field(
                &client,
                "snapshot.storage.k8s.io/v1",
                "VolumeSnapshot",
                &ns,
                "pg-snap",
                "/status/readyToUse",
            )
            .await?;
            Ok(ready == Some(serde_json::json!(true)))
        }
    })
    .await
    .unwrap();
    lab.apply_yaml(
        &client,
        &pvc(
            &ns,
            "pg-restored",
            "",
            "  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: pg-snap}\n",
        ),
    )
    .await
    .unwrap();
    wait_pvc_bound(&client, &ns, "pg-restored", BOUND)
        .await
        .unwrap();
    lab.apply_yaml(
        &client,
        &postgres_pod(&ns, "pg-restored", "pg-restored", false),
    )
    .await
    .unwrap();
    let restored = wait_pod_ready(&client, &ns, "pg-restored", BOUND)
        .await
        .unwrap();
    assert_ne!(
        pod_ip(&restored).unwrap(),
        ip,
        "each pod has its own address"
    );
    let count: i64 = connect(&restored)
        .await
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_group_snapshot_cuts_every_pvc_of_its_selector() {
    let lab = lab();
    let client = lab.admin().await.unwrap();
    let ns = lab.namespace("vgs").await.unwrap();
    for name in ["a", "b"] {
        lab.apply_yaml(&client, &pvc(&ns, name, "group: g", ""))
            .await
            .unwrap();
        wait_pvc_bound(&client, &ns, name, BOUND).await.unwrap();
    }
    lab.apply_yaml(
        &client,
        &format!(
            "apiVersion: groupsnapshot.storage.k8s.io/v1\nkind: VolumeGroupSnapshot\nmetadata: {{name: both, namespace: {ns}}}\n\
             spec: {{volumeGroupSnapshotClassName: {}, source: {{selector: {{matchLabels: {{group: g}}}}}}}}",
            kube::SNAPSHOT_CLASS
        ),
    )
    .await
    .unwrap();
    wait_async("the VolumeGroupSnapshot readyToUse", BOUND, || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let ready = custom_field(
                &client,
                "groupsnapshot.storage.k8s.io/v1",
                "VolumeGroupSnapshot",
                &ns,
                "both",
                "/status/readyToUse",
            )
            .await?;
            Ok(ready == Some(serde_json::json!(true)))
        }
    })
    .await
    .unwrap();
    // One VolumeSnapshot per PVC, owned by the group snapshot.
    let gvk = ::kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let (resource, _) = ::kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
    let snapshots: Api<::kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &resource);
    // Each member snapshot's own status follows the group's.
    wait_async("every member VolumeSnapshot readyToUse", BOUND, || {
        let snapshots = snapshots.clone();
        async move {
            let list = snapshots.list(&ListParams::default()).await?;
            Ok(list.items.len() == 2
                && list
                    .items
                    .iter()
                    .all(|s| serde_json::to_value(s).unwrap()["status"]["readyToUse"] == true))
        }
    })
    .await
    .unwrap();
    let list = snapshots.list(&ListParams::default()).await.unwrap();
    let mut sources: Vec<String> = list
        .items
        .iter()
        .map(|s| {
            let v = serde_json::to_value(s).unwrap();
            assert_eq!(
                v["metadata"]["ownerReferences"][0]["kind"], "VolumeGroupSnapshot",
                "{v}"
            );
            v["spec"]["source"]["persistentVolumeClaimName"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    sources.sort();
    assert_eq!(sources, vec!["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_pass_token_review_and_rbac_is_enforced() {
    let lab = lab();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("auth").await.unwrap();
    lab.apply_yaml(
        &admin,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: nobody, namespace: {ns}}}"
        ),
    )
    .await
    .unwrap();
    let token = lab.token(&ns, "nobody", &["stillpoint"]).await.unwrap();
    let reviews: Api<TokenReview> = Api::all(admin.clone());
    let review = reviews
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token,
                    audiences: Some(vec!["stillpoint".into()]),
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let status = review.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences, Some(vec!["stillpoint".to_string()]));
    assert_eq!(
        status.user.unwrap().username.unwrap(),
        format!("system:serviceaccount:{ns}:nobody")
    );
    // No RoleBinding: forbidden.
    let nobody = lab.client_for(&ns, "nobody").await.unwrap();
    let err = Api::<ConfigMap>::namespaced(nobody, &ns)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");
}

/// A test mutating webhook at `https://<lab gateway>:<port>/mutate`: it
/// labels ConfigMaps `mutated: "yes"`, and gives those named `reject-…` a
/// data key the API server must refuse (`bad/key`).
async fn webhook(lab: &KubeLab) -> (String, String, tokio::task::JoinHandle<()>) {
    use base64::Engine;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let gateway = lab.bridge.gateway();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(gateway.into()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(stillpoint_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind((gateway, 0)).await.unwrap();
    let url = format!("https://{}/mutate", listener.local_addr().unwrap());
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_cert.pem());
    let b64 =
        |v: serde_json::Value| base64::engine::general_purpose::STANDARD.encode(v.to_string());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                loop {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let body_start = loop {
                        let Ok(n) = tls.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..body_start]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buffer.len() < body_start + length {
                        let Ok(n) = tls.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                    }
                    let review: serde_json::Value =
                        serde_json::from_slice(&buffer[body_start..body_start + length])
                            .unwrap_or_default();
                    let request = &review["request"];
                    let name = request["name"]
                        .as_str()
                        .or(request["object"]["metadata"]["name"].as_str())
                        .unwrap_or("");
                    let mut patch = vec![
                        serde_json::json!({"op": "add", "path": "/metadata/labels", "value": {"mutated": "yes"}}),
                    ];
                    if name.starts_with("reject") {
                        patch.push(serde_json::json!({"op": "add", "path": "/data", "value": {"bad/key": "x"}}));
                    }
                    let answer = serde_json::json!({
                        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": {"uid": request["uid"], "allowed": true, "patchType": "JSONPatch",
                                     "patch": b64(serde_json::Value::Array(patch))},
                    })
                    .to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if tls.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, ca_bundle, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_a_mutating_webhook_and_validates_its_patch() {
    let lab = lab();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("hook").await.unwrap();
    let (url, ca_bundle, server) = webhook(lab).await;
    lab.apply_yaml(
        &admin,
        &format!(
            r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: lab-test-{ns}}}
webhooks:
- name: test.lab.stillpoint.dev
  clientConfig: {{url: "{url}", caBundle: {ca_bundle}}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}}]
  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
  sideEffects: None
  admissionReviewVersions: [v1]
  failurePolicy: Fail
  timeoutSeconds: 5
"#
        ),
    )
    .await
    .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    let map = |name: &str| ConfigMap {
        metadata: ::kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    // The configuration reaches the API server's webhook cache shortly.
    let mut n = 0;
    wait_async(
        "a ConfigMap mutated by the webhook",
        Duration::from_secs(30),
        || {
            n += 1;
            let (maps, name) = (maps.clone(), format!("plain-{n}"));
            let map = map(&name);
            async move {
                let made = maps.create(&PostParams::default(), &map).await?;
                Ok(made
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .get("mutated")
                    .map(String::as_str)
                    == Some("yes"))
            }
        },
    )
    .await
    .unwrap();
    let err = maps
        .create(&PostParams::default(), &map("reject-me"))
        .await
        .unwrap_err();
    server.abort();
    let text = err.to_string();
    assert!(
        text.contains("bad/key") && text.contains("Invalid"),
        "{text}"
    );
    assert!(maps.get_opt("reject-me").await.unwrap().is_none());
}

/// The files of a pod's volume as the runner keeps them on the host.
fn pod_volume(lab: &KubeLab, ns: &str, pod: &str, volume: &str) -> std::path::PathBuf {
    let prefix = format!("{ns}_{pod}_");
    let dir = std::fs::read_dir(lab.dir.join("pods"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .expect("the pod's directory");
    dir.path().join("volumes").join(volume)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_runner_runs_init_containers_sidecars_env_tokens_probes_and_restarts() {
    let lab = lab();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("runner").await.unwrap();
    for doc in [
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: {ns}}}\nstringData: {{password: s3cret}}"
        ),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: {ns}}}\ndata: {{mode: fence}}"
        ),
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: full, namespace: {ns}, labels: {{app: full}}}}
spec:
  initContainers:
  - name: init
    image: busybox
    command: [sh, -c, "echo ran > /shared/init-ran"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  - name: sidecar
    image: busybox
    restartPolicy: Always
    command: [sh, -c, "test -f /shared/init-ran && touch /shared/sidecar-up && exec sleep 3600"]
    startupProbe: {{exec: {{command: [test, -f, /shared/sidecar-up]}}, periodSeconds: 1}}
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  containers:
  - name: app
    image: busybox
    command: [sh, -c, "test -f /shared/sidecar-up || exit 3; env > /shared/env; cp /var/run/secrets/tokens/token /shared/token; cat /etc/creds/password > /shared/secret; exec sleep 3600"]
    env:
    - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
    - {{name: MODE, valueFrom: {{configMapKeyRef: {{name: settings, key: mode}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    volumeMounts:
    - {{name: shared, mountPath: /shared}}
    - {{name: token, mountPath: /var/run/secrets/tokens}}
    - {{name: creds, mountPath: /etc/creds, readOnly: true}}
  - name: flaky
    image: busybox
    command: [sh, -c, "test -f /shared/once || {{ touch /shared/once; exit 1; }}; exec sleep 3600"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
  - name: cache
    image: redis:7
    args: ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
    ports: [{{name: redis, containerPort: 6379}}]
    readinessProbe: {{tcpSocket: {{port: redis}}, periodSeconds: 1}}
  volumes:
  - {{name: shared, emptyDir: {{}}}}
  - {{name: creds, secret: {{secretName: creds}}}}
  - name: token
    projected:
      sources: [{{serviceAccountToken: {{audience: stillpoint, expirationSeconds: 3600, path: token}}}}]
"#
        ),
    ] {
        lab.apply_yaml(&admin, &doc).await.unwrap();
    }
    let pod = wait_pod_ready(&admin, &ns, "full", BOUND).await.unwrap();
    let ip = pod_ip(&pod).unwrap().to_string();
    let status = pod.status.clone().unwrap();
    let inits = status.init_container_statuses.clone().unwrap();
    let sidecar = inits.iter().find(|c| c.name == "sidecar").unwrap();
    assert!(
        sidecar.started == Some(true) && sidecar.state.as_ref().unwrap().running.is_some(),
        "{sidecar:?}"
    );
    let init = inits.iter().find(|c| c.name == "init").unwrap();
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        0
    );
    let flaky = status
        .container_statuses
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "flaky")
        .unwrap();
    assert_eq!(flaky.restart_count, 1, "{flaky:?}");

    let shared = pod_volume(lab, &ns, "full", "shared");
    let env = std::fs::read_to_string(shared.join("env")).unwrap();
    for line in [
        "PASSWORD=s3cret",
        "MODE=fence",
        &format!("POD_IP={ip}"),
        "POD_NAME=full",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("secret")).unwrap(),
        "s3cret"
    );
    // The projected token is the pod's ServiceAccount's, for the audience asked.
    let token = std::fs::read_to_string(shared.join("token")).unwrap();
    let review = Api::<TokenReview>::all(admin.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token,
                    audiences: Some(vec!["stillpoint".into()]),
                },
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(review.authenticated, Some(true), "{review:?}");
    let user = review.user.unwrap();
    assert_eq!(
        user.username.unwrap(),
        format!("system:serviceaccount:{ns}:default")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
        vec!["full".to_string()]
    );
    // The readiness-probed server answers at the pod IP.
    let mut redis = redis::Client::open(format!("redis://{ip}:6379/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
    assert_eq!(pong, "PONG");

    // Deleting the pod stops everything and removes it.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    pods.delete("full", &Default::default()).await.unwrap();
    wait_async("the pod gone", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("full").await?.is_none()) }
    })
    .await
    .unwrap();
    assert!(!shared.exists(), "the pod's files are removed");
    let uid = pod.metadata.uid.clone().unwrap();
    assert!(
        kube::net::namespaces_with_prefix(&format!("spl-{}", &uid[..12])).is_empty(),
        "the pod's network namespace is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_runner_cannot_do_fails_the_pod_visibly() {
    let lab = lab();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("unmapped").await.unwrap();
    lab.apply_yaml(
        &admin,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: odd, namespace: {ns}}}\n\
             spec: {{containers: [{{name: odd, image: quay.io/acme/unknown:1.0}}]}}"
        ),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    wait_async(
        "the container waiting with ImageNotMapped",
        Duration::from_secs(30),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("odd").await?;
                let waiting = pod
                    .status
                    .and_then(|s| s.container_statuses)
                    .and_then(|c| c.first().cloned())
                    .and_then(|c| c.state)
                    .and_then(|s| s.waiting);
                Ok(waiting.is_some_and(|w| {
                    w.reason.as_deref() == Some("ImageNotMapped")
                        && w.message
                            .unwrap_or_default()
                            .contains("quay.io/acme/unknown:1.0")
                }))
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_find_each_other_by_service_and_statefulset_names_through_the_labs_dns() {
    let lab = lab();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("dns").await.unwrap();
    // A StatefulSet `web` of one ready pod behind headless Service `web`, a
    // Service `cache` of it, and a Service `idle` of a pod never ready.
    let docs = [
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec: {{clusterIP: None, selector: {{app: web}}, ports: [{{port: 6379}}]}}"
        ),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: cache, namespace: {ns}}}\nspec: {{selector: {{app: web}}, ports: [{{port: 6379}}]}}"
        ),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: idle, namespace: {ns}}}\nspec: {{selector: {{app: idle}}, ports: [{{port: 1}}]}}"
        ),
        format!(
            r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web, namespace: {ns}}}
spec:
  serviceName: web
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: redis
        image: redis:7
        args: ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
"#
        ),
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: idle, namespace: {ns}, labels: {{app: idle}}}}
spec:
  containers:
  - {{name: idle, image: busybox, command: [sleep, "3600"], readinessProbe: {{exec: {{command: ["false"]}}, periodSeconds: 1}}}}
"#
        ),
    ];
    for doc in docs {
        lab.apply_yaml(&admin, &doc).await.unwrap();
    }
    let web = wait_pod_ready(&admin, &ns, "web-0", BOUND).await.unwrap();
    let web_ip = pod_ip(&web).unwrap().to_string();
    // Each name as a pod resolves it (getent: the C library's resolver,
    // as the databases use it), written to a file.
    let names = [
        "web-0.web".to_string(),
        "cache".into(),
        format!("cache.{ns}"),
        format!("web-0.web.{ns}.svc.cluster.local"),
        "web".into(),
        "idle".into(),
        "web-1.web".into(),
        "nothing.example".into(),
    ];
    let script = names
        .iter()
        .map(|n| {
            format!(
                "echo \\\"{n} $(getent ahostsv4 {n} | head -1 | cut -d' ' -f1)\\\" >> /out/names"
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    lab.apply_yaml(
        &admin,
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: asker, namespace: {ns}}}
spec:
  containers:
  - name: ask
    image: busybox
    command: [sh, -c, "{script}; touch /out/done; exec sleep 3600"]
    readinessProbe: {{exec: {{command: [test, -f, /out/done]}}, periodSeconds: 1}}
    volumeMounts: [{{name: out, mountPath: /out}}]
  volumes: [{{name: out, emptyDir: {{}}}}]
"#
        ),
    )
    .await
    .unwrap();
    wait_pod_ready(&admin, &ns, "asker", BOUND).await.unwrap();
    let out = std::fs::read_to_string(pod_volume(lab, &ns, "asker", "out").join("names")).unwrap();
    let answers: std::collections::BTreeMap<&str, &str> = out
        .lines()
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
        .collect();
    for (name, want) in [
        ("web-0.web", web_ip.as_str()),
        ("cache", &web_ip),
        (&format!("cache.{ns}"), &web_ip),
        (&format!("web-0.web.{ns}.svc.cluster.local"), &web_ip),
        ("web", &web_ip),
        ("idle", ""),
        ("web-1.web", ""),
        ("nothing.example", ""),
    ] {
        assert_eq!(answers.get(name).copied(), Some(want), "{name}: {out}");
    }
}
