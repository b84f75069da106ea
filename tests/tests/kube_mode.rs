//! Kubernetes mode against the lab's real API server, snapshot controllers
//! and CSI driver, with the controller running as a process under the
//! ServiceAccount and RBAC from `deploy/` (a token minted for it, never
//! admin): ConsistencyGroups resolved from pods, GroupBackups cut with
//! `csi` and `csi-group` under a causal workload and restored into new
//! PVCs and pods, failures that leave nothing frozen, and a controller
//! killed mid-freeze.

use std::collections::BTreeSet;
use std::time::Duration;

use ::kube::ResourceExt;
use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use k8s_openapi::api::core::v1::Pod;
use stillpoint_controller::kube::crd::{
    BackupPhase, ConsistencyGroup, GroupBackup, GroupBackupStatus,
};
use stillpoint_tests::harness::kube::stillpoint::{self, ControllerProc, Installed};
use stillpoint_tests::harness::kube::{
    self, KubeLab, pod_ip, wait_async, wait_pod_ready, wait_pvc_bound,
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

/// Everything one namespace of a test holds.
struct Space {
    lab: &'static KubeLab,
    installed: &'static Installed,
    admin: ::kube::Client,
    ns: String,
}

impl Space {
    async fn new(prefix: &str) -> Space {
        let lab = lab();
        let installed = stillpoint::install(lab).await.unwrap();
        let admin = lab.admin().await.unwrap();
        let ns = lab.namespace(prefix).await.unwrap();
        Space {
            lab,
            installed,
            admin,
            ns,
        }
    }

    async fn apply(&self, yaml: &str) {
        stillpoint::apply_all(self.lab, &self.admin, yaml)
            .await
            .unwrap();
    }

    /// A ServiceAccount and the Secret with its agent identity (`agent-<sa>`).
    async fn identity(&self, sa: &str) {
        let ns = &self.ns;
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}"
        ))
        .await;
        self.installed
            .agent_secret(self.lab, ns, sa, &format!("agent-{sa}"))
            .await
            .unwrap();
    }

    async fn pvc(&self, name: &str, source: Option<&str>) {
        let ns = &self.ns;
        let source = source
            .map(|s| {
                format!("  dataSource: {{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: {s}}}\n")
            })
            .unwrap_or_default();
        self.apply(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n{source}"
        ))
        .await;
        wait_pvc_bound(&self.admin, ns, name, BOUND).await.unwrap();
    }

    async fn ready(&self, pod: &str) -> Pod {
        wait_pod_ready(&self.admin, &self.ns, pod, BOUND)
            .await
            .unwrap()
    }

    async fn controller(&self, identity: &str, lease: &str) -> ControllerProc {
        ControllerProc::start(self.lab, self.installed, &self.ns, identity, lease)
            .await
            .unwrap()
    }

    fn backups(&self) -> Api<GroupBackup> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    fn groups(&self) -> Api<ConsistencyGroup> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Creates GroupBackup `name` of `group` and waits for its final phase.
    async fn backup(&self, name: &str, group: &str) -> GroupBackup {
        let ns = &self.ns;
        self.apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: {group}}}"
        ))
        .await;
        self.finished(name).await
    }

    async fn finished(&self, name: &str) -> GroupBackup {
        let api = self.backups();
        wait_async(&format!("GroupBackup {name} to end"), BOUND, || {
            let api = api.clone();
            async move {
                let b = api.get(name).await?;
                Ok(b.status
                    .and_then(|s| s.phase)
                    .is_some_and(BackupPhase::is_final))
            }
        })
        .await
        .unwrap();
        api.get(name).await.unwrap()
    }

    /// Waits until the group's `Protectable` condition has `status`, and
    /// returns its reason and message.
    async fn protectable(&self, group: &str, status: &str) -> (String, String) {
        let api = self.groups();
        let last = std::sync::Arc::new(std::sync::Mutex::new(None));
        let found = wait_async(
            &format!("group {group} Protectable={status}"),
            BOUND,
            || {
                let (api, last) = (api.clone(), last.clone());
                async move {
                    let g = api.get(group).await?;
                    let c = g
                        .status
                        .iter()
                        .flat_map(|s| s.conditions.clone())
                        .find(|c| c.type_ == "Protectable");
                    *last.lock().unwrap() = c.clone();
                    Ok(c.is_some_and(|c| {
                        c.status == status && c.observed_generation == g.metadata.generation
                    }))
                }
            },
        )
        .await;
        let c = last.lock().unwrap().clone();
        if let Err(e) = found {
            panic!("{e}: last condition {c:?}");
        }
        let c = c.unwrap();
        (c.reason, c.message)
    }
}

/// A PostgreSQL pod `name` (primary, or a streaming replica of `upstream`)
/// with the agent as a sidecar, on PVC `data-<name>`.
fn postgres_pod(ns: &str, name: &str, upstream: Option<&str>, restored: bool) -> String {
    let (uid, gid) = user("postgres");
    let slot = name.replace('-', "_");
    let start = match (restored, upstream) {
        (true, _) => "rm -f /data/pgdata/postmaster.pid /data/pgdata/standby.signal && ".to_string(),
        (false, None) => "test -f /data/pgdata/PG_VERSION || { initdb -D /data/pgdata -U postgres -A trust >/dev/null && \
             echo 'host all all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf && \
             echo 'host replication all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf; } && "
            .to_string(),
        (false, Some(primary)) => format!(
            // A slot keeps the WAL the replica still needs (backups checkpoint).
            "test -f /data/pgdata/PG_VERSION || pg_basebackup -h {primary} -U postgres -D /data/pgdata -R -X stream -C -S {slot} && \
             chmod 700 /data/pgdata && "
        ),
    };
    let app = if restored { "restored-pg" } else { "pg" };
    let agent = if restored {
        String::new()
    } else {
        stillpoint::agent_container(
            "postgres",
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            "agent-tls",
            "data",
        )
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  serviceAccountName: pg
  containers:
  - name: postgres
    image: postgres:15
    command: [sh, -c, "{start}exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    ports: [{{name: pg, containerPort: 5432}}]
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
{agent}  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data-{name}}}}}
  - {{name: agent-tls, secret: {{secretName: agent-pg}}}}
"#
    )
}

/// A Redis pod (primary, or a replica of `upstream`) with the agent.
fn redis_pod(ns: &str, name: &str, upstream: Option<&str>, restored: bool) -> String {
    let replica = upstream
        .map(|p| format!(", --replicaof, {p}, \"6379\""))
        .unwrap_or_default();
    let app = if restored { "restored-redis" } else { "redis" };
    let agent = if restored {
        String::new()
    } else {
        stillpoint::agent_container("redis", "redis://127.0.0.1:6379", "agent-tls", "data")
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  serviceAccountName: redis
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379", --dir, /data, --appendonly, "yes", --save, "", --protected-mode, "no"{replica}]
    ports: [{{name: redis, containerPort: 6379}}]
    readinessProbe: {{tcpSocket: {{port: redis}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
{agent}  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data-{name}}}}}
  - {{name: agent-tls, secret: {{secretName: agent-redis}}}}
"#
    )
}

fn group_yaml(ns: &str, name: &str, driver: &str, members: &str) -> String {
    let atomic = kube::ATOMIC_SNAPSHOT_CLASS;
    format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  members:\n{members}  snapshot: {{driver: {driver}, volumeSnapshotClassName: {atomic}, \
         volumeGroupSnapshotClassName: {atomic}}}\n  freezeBudget: 20s\n  leaseTTL: 5s\n  alignTimeout: 10s\n"
    )
}

const SHOP_MEMBERS: &str = "  - {name: pg, selector: {matchLabels: {app: pg}}}\n  - {name: cache, selector: {matchLabels: {app: redis}}}\n";

async fn pg_connect(pod: &Pod) -> tokio_postgres::Client {
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

async fn redis_connect(pod: &Pod) -> redis::aio::MultiplexedConnection {
    let ip = pod_ip(pod).unwrap();
    let mut c = redis::Client::open(format!("redis://{ip}:6379"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // A write waits out a freeze (the cut of CSI snapshots included).
    c.set_response_timeout(Duration::from_secs(60));
    c
}

/// The causal workload: step n is committed in PostgreSQL, then pushed to
/// Redis; a restored Redis holding step n means PostgreSQL holds it too.
struct Workload {
    stop: tokio::sync::watch::Sender<bool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    async fn start(pg: &Pod, redis: &Pod) -> Workload {
        let db = pg_connect(pg).await;
        db.batch_execute("CREATE TABLE IF NOT EXISTS chain (id int primary key)")
            .await
            .unwrap();
        let mut cache = redis_connect(redis).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = acked.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !*stopped.borrow() {
                n += 1;
                db.execute("INSERT INTO chain VALUES ($1)", &[&n])
                    .await
                    .unwrap();
                let _: i64 = redis::cmd("RPUSH")
                    .arg("chain")
                    .arg(n)
                    .query_async(&mut cache)
                    .await
                    .unwrap();
                seen.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Workload { stop, acked, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        self.acked.lock().unwrap().len()
    }
}

fn status(b: &GroupBackup) -> GroupBackupStatus {
    b.status.clone().unwrap_or_default()
}

/// Restores every VolumeSnapshot of `backup` into new PVCs, starts the
/// databases on them, and checks the cut: Redis's chain is a prefix of
/// PostgreSQL's, each replica holds no more than its primary, and every
/// step acknowledged before the backup started is there. Returns the
/// restored primary's step count.
async fn verify_restore(space: &Space, backup: &GroupBackup, before: usize) -> usize {
    let s = status(backup);
    let tag = backup.metadata.name.clone().unwrap();
    let mut restored = Vec::new();
    for m in &s.members {
        assert_eq!(m.volume_snapshots.len(), 1, "{m:?}");
        let snap = &m.volume_snapshots[0];
        let name = format!("{tag}-{}", m.pod);
        space.pvc(&format!("data-{name}"), Some(&snap.name)).await;
        let yaml = match m.engine.as_deref() {
            Some("postgres") => postgres_pod(&space.ns, &name, None, true),
            Some("redis") => redis_pod(&space.ns, &name, None, true),
            other => panic!("engine {other:?}"),
        };
        space.apply(&yaml).await;
        restored.push((m.clone(), name));
    }
    let mut pg = std::collections::BTreeMap::new();
    let mut cache = std::collections::BTreeMap::new();
    for (m, name) in &restored {
        let pod = space.ready(name).await;
        match m.engine.as_deref() {
            Some("postgres") => {
                let ids: BTreeSet<i32> = pg_connect(&pod)
                    .await
                    .query("SELECT id FROM chain", &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                pg.insert(m.role.clone().unwrap(), ids);
            }
            _ => {
                let ids: Vec<i32> = redis::cmd("LRANGE")
                    .arg("chain")
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut redis_connect(&pod).await)
                    .await
                    .unwrap();
                cache.insert(
                    m.role.clone().unwrap(),
                    ids.into_iter().collect::<BTreeSet<i32>>(),
                );
            }
        }
    }
    let (pg_primary, pg_replica) = (&pg["primary"], &pg["replica"]);
    let (redis_primary, redis_replica) = (&cache["primary"], &cache["replica"]);
    let ahead: Vec<&i32> = redis_primary.difference(pg_primary).take(5).collect();
    assert!(
        ahead.is_empty(),
        "{tag}: Redis holds steps PostgreSQL does not: {ahead:?}"
    );
    assert!(
        pg_replica.is_subset(pg_primary),
        "{tag}: the PostgreSQL replica is ahead of its primary"
    );
    assert!(
        redis_replica.is_subset(redis_primary),
        "{tag}: the Redis replica is ahead of its primary"
    );
    let expected: BTreeSet<i32> = (1..=before as i32).collect();
    assert!(
        expected.is_subset(pg_primary),
        "{tag}: steps acknowledged before the backup are missing"
    );
    assert!(
        expected.is_subset(redis_primary),
        "{tag}: Redis lacks steps acknowledged before the backup"
    );
    // Replicas were aligned to their primaries: what the replica holds is
    // what the primary held at the freeze.
    for m in s
        .members
        .iter()
        .filter(|m| m.role.as_deref() == Some("replica"))
    {
        let primary = s
            .members
            .iter()
            .find(|p| Some(&p.pod) == m.primary.as_ref())
            .unwrap();
        assert_eq!(
            m.aligned_to, primary.position,
            "{tag}: {} aligned to its primary",
            m.pod
        );
    }
    // Gone (network namespace and all) before the next restore reuses
    // their addresses.
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &space.ns);
    for (_, name) in &restored {
        let _ = pods
            .delete(name, &DeleteParams::default().grace_period(1))
            .await;
    }
    for (_, name) in &restored {
        wait_async(&format!("pod {name} gone"), BOUND, || {
            let pods = pods.clone();
            async move { Ok(pods.get_opt(name).await?.is_none()) }
        })
        .await
        .unwrap();
    }
    pg_primary.len()
}

/// Starts the shop: PostgreSQL primary + streaming replica, Redis primary
/// + replica, each with its agent.
async fn shop(space: &Space) -> (Pod, Pod) {
    let ns = &space.ns;
    for sa in ["pg", "redis"] {
        space.identity(sa).await;
    }
    for pvc in ["data-pg-0", "data-pg-1", "data-redis-0", "data-redis-1"] {
        space.pvc(pvc, None).await;
    }
    space.apply(&postgres_pod(ns, "pg-0", None, false)).await;
    space.apply(&redis_pod(ns, "redis-0", None, false)).await;
    let pg0 = space.ready("pg-0").await;
    let redis0 = space.ready("redis-0").await;
    let (pg_ip, redis_ip) = (
        pod_ip(&pg0).unwrap().to_string(),
        pod_ip(&redis0).unwrap().to_string(),
    );
    space
        .apply(&postgres_pod(ns, "pg-1", Some(&pg_ip), false))
        .await;
    space
        .apply(&redis_pod(ns, "redis-1", Some(&redis_ip), false))
        .await;
    let pg1 = space.ready("pg-1").await;
    let redis1 = space.ready("redis-1").await;
    // Both replicas stream from their primaries before anything starts.
    let replica = pg_connect(&pg1).await;
    let cache = redis_connect(&redis1).await;
    wait_async("both replicas streaming", BOUND, || {
        let (replica, mut cache) = (&replica, cache.clone());
        async move {
            let streaming = replica
                .query_opt(
                    "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    &[],
                )
                .await?
                .is_some();
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut cache)
                .await?;
            Ok(streaming && info.contains("master_link_status:up"))
        }
    })
    .await
    .unwrap();
    (pg0, redis0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_backups_with_csi_and_csi_group_restore_to_a_consistent_cut() {
    let space = Space::new("shop").await;
    let ns = space.ns.clone();
    let (pg0, redis0) = shop(&space).await;
    let workload = Workload::start(&pg0, &redis0).await;
    let _controller = space.controller("shop-a", &format!("lease-{ns}")).await;
    space
        .apply(&group_yaml(&ns, "shop", "csi", SHOP_MEMBERS))
        .await;
    let (reason, message) = space.protectable("shop", "True").await;
    assert_eq!(reason, "Ready", "{message}");
    let group = space.groups().get("shop").await.unwrap();
    let resolved = group.status.clone().unwrap();
    assert_eq!(resolved.resolved_members, 4);
    let pg1 = resolved.members.iter().find(|m| m.pod == "pg-1").unwrap();
    assert_eq!(pg1.role.as_deref(), Some("replica"));
    assert_eq!(
        pg1.primary.as_deref(),
        Some("pg-0"),
        "found by its upstream address"
    );
    assert_eq!(pg1.engine.as_deref(), Some("postgres"));
    assert_eq!(pg1.driver.as_deref(), Some(kube::csi::DRIVER));
    assert!(
        pg1.identity
            .as_deref()
            .unwrap()
            .ends_with(&format!("/ns/{ns}/sa/pg"))
    );

    let mut taken = Vec::new();
    for (driver, count) in [("csi", 5), ("csi-group", 5)] {
        space
            .groups()
            .patch(
                "shop",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "snapshot": { "driver": driver } } })),
            )
            .await
            .unwrap();
        space.protectable("shop", "True").await;
        for n in 0..count {
            let before = workload.acked();
            let name = format!("{driver}-{n}");
            let b = space.backup(&name, "shop").await;
            let s = status(&b);
            assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{name}: {s:?}");
            assert_eq!(s.snapshotter.as_deref(), Some(driver));
            assert_eq!(s.members.len(), 4);
            assert!(s.freeze_window.is_some());
            assert!(s.members.iter().all(|m| !m.volume_snapshots.is_empty()));
            assert!(
                b.finalizers()
                    .iter()
                    .any(|f| f == "stillpoint.dev/snapshots")
            );
            let completed = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Completed")
                .unwrap();
            assert_eq!(
                (completed.status.as_str(), completed.reason.as_str()),
                ("True", "Succeeded")
            );
            if driver == "csi-group" {
                assert_eq!(s.volume_group_snapshot.as_deref(), Some(name.as_str()));
            }
            eprintln!(
                "{name}: {:?} window {} members {}",
                s.phase,
                s.freeze_window.clone().unwrap_or_default(),
                s.members.len()
            );
            taken.push((b, before));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let acked = workload.stop().await;
    assert!(
        acked > taken.len(),
        "the workload wrote through the backups"
    );
    let mut last = 0;
    for (b, before) in &taken {
        let held = verify_restore(&space, b, *before).await;
        assert!(held >= last, "backups only move forward");
        last = held;
    }
    // The group reports its newest successful backup.
    let api = space.groups();
    wait_async("lastSuccessfulBackup", BOUND, || {
        let api = api.clone();
        async move {
            let g = api.get("shop").await?;
            Ok(g.status.and_then(|s| s.last_successful_backup).as_deref() == Some("csi-group-4"))
        }
    })
    .await
    .unwrap();
    // Deleting a backup deletes its snapshots (deletionPolicy Delete).
    let first = &taken[0].0;
    let snapshots: Vec<String> = status(first)
        .members
        .iter()
        .flat_map(|m| m.volume_snapshots.iter().map(|v| v.name.clone()))
        .collect();
    space
        .backups()
        .delete("csi-0", &DeleteParams::default())
        .await
        .unwrap();
    let gvk = ::kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let (resource, _) = ::kube::discovery::pinned_kind(&space.admin, &gvk)
        .await
        .unwrap();
    let vs: Api<::kube::api::DynamicObject> =
        Api::namespaced_with(space.admin.clone(), &ns, &resource);
    wait_async("the deleted backup's VolumeSnapshots gone", BOUND, || {
        let (vs, snapshots) = (vs.clone(), snapshots.clone());
        async move {
            let names: BTreeSet<String> = vs
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|o| o.metadata.name)
                .collect();
            Ok(snapshots.iter().all(|s| !names.contains(s)))
        }
    })
    .await
    .unwrap();
    assert!(space.backups().get_opt("csi-0").await.unwrap().is_none());
}
