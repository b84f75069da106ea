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
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
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
    let ip = pod_ip(pod).unwrap();
    let (client, conn) = tokio_postgres::connect(
        &format!("host={ip} port=5432 user=postgres dbname=postgres connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
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
    let list = snapshots.list(&ListParams::default()).await.unwrap();
    let mut sources: Vec<String> = list
        .items
        .iter()
        .map(|s| {
            let v = serde_json::to_value(s).unwrap();
            assert_eq!(v["status"]["readyToUse"], true, "{v}");
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
