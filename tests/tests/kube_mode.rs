//! Kubernetes mode against the lab's real API server, snapshot controllers
//! and CSI driver, with the controller running as a process under the
//! ServiceAccount and RBAC from `deploy/` (a token minted for it, never
//! admin): ConsistencyGroups resolved from pods, GroupBackups cut with
//! `csi` and `csi-group` under a causal workload and restored into new
//! PVCs and pods, failures that leave nothing frozen, and a controller
//! killed mid-freeze.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ::kube::ResourceExt;
use ::kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use k8s_openapi::api::core::v1::{Pod, Secret};
use stillpoint_controller::kube::crd::{
    BackupPhase, ConsistencyGroup, GroupBackup, GroupBackupContent, GroupBackupStatus, GroupRestore,
};
use stillpoint_tests::harness::kube::shop::{
    BOUND, Run, Space, group_yaml, maria_connect, pg_connect, redis_connect, shop_statefulsets,
    shop_with_settings, streaming, sts_yaml, template_agent, user,
};
use stillpoint_tests::harness::kube::stillpoint::{self, ControllerProc, Installed};
use stillpoint_tests::harness::kube::{
    self, KubeLab, pod_ip, wait_async, wait_pod_ready, wait_pvc_bound,
};

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

const SHOP_MEMBERS: &str = "  - {name: pg, selector: {matchLabels: {app: pg}}}\n  - {name: cache, selector: {matchLabels: {app: redis}}}\n";

/// One step of a causal workload: its writes in order, each after the
/// previous one was acknowledged.
trait Step: Send + 'static {
    fn step(&mut self, n: i32) -> impl std::future::Future<Output = ()> + Send;
}

/// A causal workload running: step 1, 2, … until stopped; `acked` counts
/// the steps done whole.
struct Workload {
    stop: tokio::sync::watch::Sender<bool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Step n is committed in PostgreSQL, then pushed to Redis; a restored
/// Redis holding step n means PostgreSQL holds it too.
struct OneWay {
    db: tokio_postgres::Client,
    cache: redis::aio::MultiplexedConnection,
}

impl Step for OneWay {
    async fn step(&mut self, n: i32) {
        self.db
            .execute("INSERT INTO chain VALUES ($1)", &[&n])
            .await
            .unwrap();
        let _: i64 = redis::cmd("RPUSH")
            .arg("chain")
            .arg(n)
            .query_async(&mut self.cache)
            .await
            .unwrap();
    }
}

impl Workload {
    /// The one-way workload ([`OneWay`]) over `pg` and `redis`.
    async fn start(pg: &Pod, redis: &Pod) -> Workload {
        let db = pg_connect(pg).await;
        db.batch_execute("CREATE TABLE IF NOT EXISTS chain (id int primary key)")
            .await
            .unwrap();
        let cache = redis_connect(redis).await;
        Workload::run(OneWay { db, cache })
    }

    fn run(mut steps: impl Step) -> Workload {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = acked.clone();
        let task = tokio::spawn(async move {
            let mut n: i32 = 0;
            while !*stopped.borrow() {
                n += 1;
                steps.step(n).await;
                done.store(n as usize, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Workload { stop, acked, task }
    }

    fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs the `stillpoint` CLI in Kubernetes mode against the lab as its
/// admin; returns (success, stdout, stderr).
fn cli(space: &Space, args: &[&str]) -> (bool, String, String) {
    let out =
        std::process::Command::new(stillpoint_tests::harness::agent::controller_binary().unwrap())
            .args(["--kube", "--kubeconfig"])
            .arg(&space.lab.admin_kubeconfig)
            .args(["-n", &space.ns])
            .args(args)
            .output()
            .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(b: &GroupBackup) -> GroupBackupStatus {
    b.status.clone().unwrap_or_default()
}

fn status_of_phase(b: &GroupBackup) -> Option<BackupPhase> {
    b.status.as_ref().and_then(|s| s.phase)
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
    let named = |engine: &str, role: &str| {
        restored
            .iter()
            .find(|(m, _)| m.engine.as_deref() == Some(engine) && m.role.as_deref() == Some(role))
            .map(|(_, name)| name.as_str())
            .unwrap_or_else(|| panic!("{tag}: no restored {engine} {role}"))
    };
    let held = check_cut(
        &tag,
        [
            named("postgres", "primary"),
            named("postgres", "replica"),
            named("redis", "primary"),
            named("redis", "replica"),
        ],
        space,
        before,
    )
    .await;
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
    held
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
    streaming(&pg1, &redis1).await;
    (pg0, redis0)
}

/// The GroupBackupContent of succeeded backup `b`: bound to it both ways,
/// every member and snapshot recorded down to the handle its
/// VolumeSnapshotContent holds.
async fn check_content(space: &Space, b: &GroupBackup) {
    let s = status(b);
    let name = s
        .content
        .clone()
        .expect("a succeeded backup names its content");
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    let c = contents.get(&name).await.unwrap();
    assert_eq!(c.spec.source.namespace, space.ns);
    assert_eq!(c.spec.source.name, b.name_any());
    assert_eq!(Some(c.spec.source.uid.clone()), b.uid());
    assert_eq!(c.spec.group, b.spec.group);
    assert_eq!(
        c.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Ready")
    );
    wait_async(&format!("content {name} Bound"), BOUND, || {
        let (contents, name) = (contents.clone(), name.clone());
        async move {
            let c = contents.get(&name).await?;
            Ok(c.status.iter().flat_map(|s| s.conditions.iter()).any(|c| {
                c.type_ == "Bound" && c.status == "True" && c.observed_generation.is_some()
            }))
        }
    })
    .await
    .unwrap();
    assert!(c.spec.size.is_some(), "{:?}", c.spec);
    assert_eq!(c.spec.members.len(), s.members.len());
    let vscs = snapshot_content_api(space).await;
    for (m, recorded) in c.spec.members.iter().zip(&s.members) {
        assert_eq!(m.pod, recorded.pod);
        assert_eq!(m.position, recorded.position);
        assert_eq!(m.volumes.len(), recorded.volume_snapshots.len());
        for v in &m.volumes {
            let vsc = vscs
                .get(v.volume_snapshot_content.as_deref().unwrap())
                .await
                .unwrap();
            assert_eq!(
                v.snapshot_handle.as_deref(),
                vsc.data["status"]["snapshotHandle"].as_str(),
                "{v:?}"
            );
            assert_eq!(v.driver.as_deref(), Some(kube::csi::DRIVER));
            assert!(
                v.storage_class_name.is_some()
                    && !v.access_modes.is_empty()
                    && v.restore_size.is_some(),
                "{v:?}"
            );
        }
    }
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
        space.use_driver("shop", driver).await;
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
            check_content(&space, &b).await;
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
    // The CLI in Kubernetes mode: create and follow, list, describe,
    // status and plan.
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(&space, &["backup", "create", "shop", "--id", "by-cli"])
    });
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("GroupBackup by-cli of group shop succeeded"),
        "{out}"
    );
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&space, &["backup", "list"]));
    assert!(
        ok && out.contains("by-cli") && out.contains("csi-group-4") && out.contains("Succeeded"),
        "{out}"
    );
    let (ok, out, _) =
        tokio::task::block_in_place(|| cli(&space, &["backup", "describe", "csi-1", "-o", "json"]));
    assert!(ok);
    let described: GroupBackup = serde_json::from_str(&out).unwrap();
    assert_eq!(status(&described).members.len(), 4);
    let (ok, out, _) =
        tokio::task::block_in_place(|| cli(&space, &["backup", "describe", "csi-1"]));
    assert!(
        ok && out.contains("VOLUMESNAPSHOT") && out.contains("data-pg-1"),
        "{out}"
    );
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&space, &["status", "shop"]));
    assert!(
        ok && out.contains("Protectable=True") && out.contains("pg-1") && out.contains("replica"),
        "{out}"
    );
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&space, &["status", "-o", "yaml"]));
    assert!(
        ok && out.contains("protectable: \"True\"") || out.contains("protectable: True"),
        "{out}"
    );
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&space, &["plan", "csi-1"]));
    assert!(
        ok && out.contains("must reach") && out.contains("2 databases"),
        "{out}"
    );
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
            Ok(g.status.and_then(|s| s.last_successful_backup).as_deref() == Some("by-cli"))
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}",
            tokio::task::block_in_place(|| cli(&space, &["status", "shop"]))
        )
    });
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
    // Its finalizer goes once the snapshots are gone: the GroupBackup
    // goes after them, not with them.
    wait_async("the deleted GroupBackup gone", BOUND, || async {
        Ok(space.backups().get_opt("csi-0").await?.is_none())
    })
    .await
    .unwrap();
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    let content = status(first).content.unwrap();
    // Its finalizer lets it go once it sees its GroupBackup gone.
    wait_async(
        "the content of a backup deleted with deletionPolicy Delete gone with it",
        BOUND,
        || {
            let (contents, content) = (contents.clone(), content.clone());
            async move { Ok(contents.get_opt(&content).await?.is_none()) }
        },
    )
    .await
    .unwrap();
    // `backup delete` returns once the snapshots are gone too, the group
    // snapshot's own included.
    let group_backup = &taken[5].0;
    assert_eq!(group_backup.name_any(), "csi-group-0");
    let recorded: Vec<String> = status(group_backup)
        .members
        .iter()
        .flat_map(|m| m.volume_snapshots.iter().map(|v| v.name.clone()))
        .collect();
    let (ok, out, err) =
        tokio::task::block_in_place(|| cli(&space, &["backup", "delete", "csi-group-0"]));
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("deleted GroupBackup csi-group-0 and its snapshots"),
        "{out}"
    );
    let names: BTreeSet<String> = vs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    let left: Vec<&String> = recorded.iter().filter(|r| names.contains(*r)).collect();
    assert!(
        left.is_empty(),
        "still there when the CLI returned: {left:?}"
    );
}

/// A Redis pod with options: its app label, ServiceAccount, the Secret of
/// its agent's identity (no agent: `None`), its data directory, extra
/// environment for the agent, and its PVC (`data-<name>`, or none).
struct RedisPod<'a> {
    name: &'a str,
    app: &'a str,
    sa: &'a str,
    agent_secret: Option<&'a str>,
    dir: &'a str,
    upstream: Option<&'a str>,
    pvc: bool,
}

impl<'a> RedisPod<'a> {
    /// A Redis primary on PVC `data-<name>` with its agent (ServiceAccount
    /// `redis`, identity Secret `agent-redis`).
    fn with_agent(name: &'a str, app: &'a str) -> Self {
        RedisPod {
            name,
            app,
            sa: "redis",
            agent_secret: Some("agent-redis"),
            dir: "/data",
            upstream: None,
            pvc: true,
        }
    }

    fn yaml(&self, ns: &str) -> String {
        let RedisPod {
            name,
            app,
            sa,
            agent_secret,
            dir,
            upstream,
            pvc,
        } = self;
        let replica = upstream
            .map(|p| format!(", --replicaof, {p}, \"6379\""))
            .unwrap_or_default();
        let agent = agent_secret
            .map(|_| {
                stillpoint::agent_container("redis", "redis://127.0.0.1:6379", "agent-tls", "data")
            })
            .unwrap_or_default();
        let data = if *pvc {
            format!("persistentVolumeClaim: {{claimName: data-{name}}}")
        } else {
            "emptyDir: {}".into()
        };
        let secret = agent_secret
            .map(|s| format!("  - {{name: agent-tls, secret: {{secretName: {s}}}}}\n"))
            .unwrap_or_default();
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  serviceAccountName: {sa}
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379", --dir, {dir}, --appendonly, "yes", --save, "", --protected-mode, "no"{replica}]
    ports: [{{name: redis, containerPort: 6379}}]
    readinessProbe: {{tcpSocket: {{port: redis}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
{agent}  volumes:
  - {{name: data, {data}}}
{secret}"#
        )
    }
}

/// A pod that claims to have an agent (the `stillpoint` port) but runs none.
fn mute_pod(ns: &str, name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  containers:
  - name: app
    image: busybox
    command: [sh, -c, "exec sleep 3600"]
    ports: [{{name: stillpoint, containerPort: 9443}}]
"#
    )
}

/// The Events of one object, by reason.
async fn event_reasons(space: &Space, name: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(space.admin.clone(), &space.ns);
    events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

/// Whether a Redis write goes through within `bound` (not frozen).
async fn writes(redis: &Pod, bound: Duration) -> bool {
    let ip = pod_ip(redis).unwrap();
    let mut c = redis::Client::open(format!("redis://{ip}:6379"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    c.set_response_timeout(bound);
    redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query_async::<()>(&mut c)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_reason_a_group_cannot_be_protected_is_reported_and_nothing_freezes() {
    let space = Space::new("unprotectable").await;
    let ns = space.ns.clone();
    for sa in ["redis", "other"] {
        space.identity(sa).await;
    }
    for pvc in [
        "data-redis-a",
        "data-imposter",
        "data-scattered",
        "data-orphan",
    ] {
        space.pvc(pvc, None).await;
    }
    let healthy = RedisPod::with_agent("redis-a", "ra");
    space.apply(&healthy.yaml(&ns)).await;
    let redis_a = space.ready("redis-a").await;
    let ip = pod_ip(&redis_a).unwrap().to_string();
    for pod in [
        RedisPod {
            name: "plain",
            app: "plain",
            agent_secret: None,
            pvc: false,
            ..healthy
        },
        // Its agent presents the identity of ServiceAccount `other`.
        RedisPod {
            name: "imposter",
            app: "imposter",
            agent_secret: Some("agent-other"),
            ..healthy
        },
        // Its data directory is not on its PVC.
        RedisPod {
            name: "scattered",
            app: "scattered",
            dir: "/tmp",
            ..healthy
        },
        RedisPod {
            name: "orphan",
            app: "orphan",
            upstream: Some(&ip),
            ..healthy
        },
    ] {
        space.apply(&pod.yaml(&ns)).await;
        space.ready(pod.name).await;
    }
    space.apply(&mute_pod(&ns, "mute")).await;
    space.ready("mute").await;
    // A pod whose container cannot start (the lab maps no image `nosuch`).
    space.pvc("data-broken", None).await;
    space
        .apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: broken, namespace: {ns}, labels: {{app: broken}}}}\n\
             spec:\n  containers:\n  - {{name: db, image: nosuch:1, ports: [{{name: stillpoint, containerPort: 9443}}], \
             volumeMounts: [{{name: data, mountPath: /data}}]}}\n  volumes: [{{name: data, persistentVolumeClaim: {{claimName: data-broken}}}}]\n"
        ))
        .await;
    // A PVC no driver provisions, and a pod waiting for it.
    space
        .apply(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data-stuck, namespace: {ns}}}\n\
             spec:\n  storageClassName: nowhere\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        ))
        .await;
    space
        .apply(
            &RedisPod {
                name: "stuck",
                app: "stuck",
                ..healthy
            }
            .yaml(&ns),
        )
        .await;
    // A pod whose PVC does not exist (it never runs).
    space
        .apply(
            &RedisPod {
                name: "lost",
                app: "lost",
                ..healthy
            }
            .yaml(&ns),
        )
        .await;
    // A PVC bound to a PersistentVolume that is not CSI (hostPath).
    space
        .apply(&format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: hp-{ns}}}\n\
             spec:\n  capacity: {{storage: 1Gi}}\n  accessModes: [ReadWriteOnce]\n  storageClassName: \"\"\n  \
             hostPath: {{path: /tmp/stillpoint-hp-{ns}}}\n  claimRef: {{namespace: {ns}, name: data-hp}}\n---\n\
             apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data-hp, namespace: {ns}}}\n\
             spec:\n  storageClassName: \"\"\n  volumeName: hp-{ns}\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        ))
        .await;
    wait_pvc_bound(&space.admin, &ns, "data-hp", BOUND)
        .await
        .unwrap();
    space
        .apply(
            &RedisPod {
                name: "hp",
                app: "hp",
                ..healthy
            }
            .yaml(&ns),
        )
        .await;
    // A snapshot class of another driver.
    space
        .apply(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata: {name: elsewhere}\n\
             driver: other.csi.example\ndeletionPolicy: Delete\n",
        )
        .await;
    // A class of the right driver that does not say whether its snapshots
    // are point-in-time.
    space
        .apply(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata: {{name: unsaid-{ns}}}\n\
             driver: {}\ndeletionPolicy: Delete\nparameters: {{mode: atomic}}\n",
            kube::csi::DRIVER
        ))
        .await;
    // More pods than a group may resolve to (never scheduled: objects only).
    let crowd: String = (0..=stillpoint_controller::kube::resolve::MAX_GROUP_PODS)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: crowd-{i}, namespace: {ns}, labels: {{app: crowd}}}}\n\
                 spec:\n  schedulerName: nobody\n  containers: [{{name: c, image: busybox, \
                 ports: [{{name: stillpoint, containerPort: 9443}}]}}]\n---\n"
            )
        })
        .collect();
    space.apply(&crowd).await;
    let _controller = space
        .controller("unprotectable-a", &format!("lease-{ns}"))
        .await;
    let member =
        |app: &str| format!("  - {{name: m-{app}, selector: {{matchLabels: {{app: {app}}}}}}}\n");
    let orphan_needles = ["orphan", ip.as_str()];
    let cases: Vec<(&str, String, &str, &[&str])> = vec![
        (
            "no-agent",
            member("plain"),
            "NoAgent",
            &["plain", "stillpoint"],
        ),
        (
            "unreachable",
            member("ra") + &member("mute"),
            "AgentUnreachable",
            &["mute", "9443"],
        ),
        (
            "wrong-identity",
            member("imposter"),
            "WrongIdentity",
            &["imposter", "/sa/other", "/sa/redis"],
        ),
        (
            "orphan",
            member("orphan"),
            "ReplicaWithoutPrimary",
            &orphan_needles,
        ),
        (
            "unbound",
            member("stuck"),
            "PVCUnbound",
            &["data-stuck", "Pending"],
        ),
        (
            "not-covered",
            member("scattered"),
            "NotCovered",
            &[
                "scattered",
                "/tmp",
                "acceptUncovered: [\"/tmp\"]` on member scattered",
            ],
        ),
        (
            "missing-pod",
            member("nothing"),
            "MemberNotFound",
            &["m-nothing", "app=nothing"],
        ),
        (
            "not-running",
            member("broken"),
            "PodNotRunning",
            &["broken", "not running"],
        ),
        (
            "ordinal",
            "  - {name: m-sts, statefulSet: {name: redis, ordinal: 9}}\n".into(),
            "MemberNotFound",
            &["m-sts", "pod redis-9 of StatefulSet redis"],
        ),
        (
            "role",
            "  - {name: m-ra, selector: {matchLabels: {app: ra}}, role: replica}\n".into(),
            "RoleMismatch",
            &["redis-a", "replica", "primary"],
        ),
        (
            "not-pvc",
            "  - {name: m-ra, selector: {matchLabels: {app: ra}}, volumes: [agent-tls]}\n".into(),
            "VolumeNotPVC",
            &["agent-tls"],
        ),
        (
            "no-such-volume",
            "  - {name: m-ra, selector: {matchLabels: {app: ra}}, volumes: [nope]}\n".into(),
            "VolumeNotFound",
            &["nope"],
        ),
        (
            "two-names",
            member("ra") + &member("ra"),
            "InvalidSpec",
            &["two members are named m-ra"],
        ),
        (
            "slow-dial",
            member("ra") + "  connectTimeout: 300d\n",
            "InvalidSpec",
            &["connectTimeout 300d is outside its range", "at most 1m"],
        ),
        (
            "slow-rpc",
            member("ra") + "  rpcTimeout: 1h\n",
            "InvalidSpec",
            &["rpcTimeout 1h is outside its range", "at most 5m"],
        ),
        (
            "crowd",
            member("crowd"),
            "TooManyPods",
            &["match 257 pods", "at most 256"],
        ),
        ("lost-pvc", member("lost"), "PVCNotFound", &["data-lost"]),
        ("not-csi", member("hp"), "NotCSI", &["data-hp"]),
    ];
    for (group, members, _, _) in &cases {
        space.apply(&group_yaml(&ns, group, "csi", members)).await;
    }
    let unsaid = format!("unsaid-{ns}");
    for (class, reason, needles) in [
        ("missing", "NoSnapshotClass", &["missing"][..]),
        (
            "elsewhere",
            "ClassDriverMismatch",
            &["elsewhere", "other.csi.example", kube::csi::DRIVER][..],
        ),
        (
            unsaid.as_str(),
            "AtomicityUnknown",
            &[
                unsaid.as_str(),
                "spec.snapshot.atomic",
                "stillpoint.dev/atomic",
            ][..],
        ),
    ] {
        let group = class.split('-').next().unwrap();
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: class-{group}, namespace: {ns}}}\n\
                 spec:\n  members:\n{}  snapshot: {{driver: csi, volumeSnapshotClassName: {class}}}\n",
                member("ra")
            ))
            .await;
        let (got, message) = space.protectable(&format!("class-{group}"), "False").await;
        assert_eq!(got, reason, "{message}");
        for n in needles {
            assert!(message.contains(n), "{reason}: {n} not in {message}");
        }
    }
    for (group, _, reason, needles) in &cases {
        let (got, message) = space.protectable(group, "False").await;
        assert_eq!(&got, reason, "{group}: {message}");
        for n in *needles {
            assert!(message.contains(n), "{group}: {n} not in: {message}");
        }
    }
    // The healthy member alone is protectable.
    // (on storage that takes 3 s to cut, so that two backups would overlap)
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: solo, namespace: {ns}}}\n\
             spec:\n  members:\n{}  snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n",
            member("ra"),
            kube::SLOW_SNAPSHOT_CLASS
        ))
        .await;
    let (_, message) = space.protectable("solo", "True").await;
    assert!(message.contains("point-in-time"), "{message}");
    // The default class copies files and says so: taken as a copy.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: on-default, namespace: {ns}}}\n\
             spec:\n  members:\n{}  snapshot: {{driver: csi}}\n",
            member("ra"),
        ))
        .await;
    let (_, message) = space.protectable("on-default", "True").await;
    assert!(message.contains("copies"), "{message}");

    // A backup of a group with an unreachable agent fails at once, naming
    // the member and the cause; its healthy member never froze.
    let b = space.backup("half-1", "unreachable").await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BackupPhase::Failed));
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(c.reason, "AgentUnreachable", "{c:?}");
    assert!(
        c.message.contains("mute") && c.message.contains("9443"),
        "{}",
        c.message
    );
    assert!(s.error.as_deref().unwrap().contains("mute"));
    assert!(
        writes(&redis_a, Duration::from_secs(2)).await,
        "nothing stays frozen"
    );
    assert!(
        event_reasons(&space, "half-1")
            .await
            .contains(&"AgentUnreachable".to_string())
    );

    // The CLI follows a backup to its end; its exit code is the outcome.
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &space,
            &["backup", "create", "unreachable", "--id", "half-2"],
        )
    });
    assert!(!ok, "{out}");
    assert!(
        err.contains("half-2") && err.contains("AgentUnreachable") && err.contains("mute"),
        "{err}"
    );
    let (ok, _, err) = tokio::task::block_in_place(|| cli(&space, &["backup", "create", "ghost"]));
    assert!(!ok && err.contains("no ConsistencyGroup ghost"), "{err}");

    // A backup of a group that does not exist fails at once.
    let b = space.backup("ghost-1", "ghost").await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BackupPhase::Failed));
    assert_eq!(s.conditions[0].reason, "GroupNotFound");
    assert!(
        s.error
            .unwrap()
            .contains("ConsistencyGroup ghost does not exist")
    );

    // Two backups of one group never run at once: the second waits.
    for name in ["solo-1", "solo-2"] {
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{group: solo}}"
            ))
            .await;
    }
    let (one, two) = (
        space.finished("solo-1").await,
        space.finished("solo-2").await,
    );
    for b in [&one, &two] {
        assert_eq!(
            status(b).phase,
            Some(BackupPhase::Succeeded),
            "{:?}",
            status(b)
        );
    }
    let waited = [
        event_reasons(&space, "solo-1").await,
        event_reasons(&space, "solo-2").await,
    ];
    assert!(
        waited.iter().any(|r| r.contains(&"Waiting".to_string())),
        "one of them waited for the other: {waited:?}"
    );
    let (s1, s2) = (status(&one), status(&two));
    let (first, second) = if s1.start_time <= s2.start_time {
        (s1, s2)
    } else {
        (s2, s1)
    };
    assert!(first.completion_time.unwrap().0 <= second.start_time.unwrap().0);

    // A running (or finished) backup's spec cannot be changed.
    let err = space
        .backups()
        .patch(
            "solo-1",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "group": "unreachable" } })),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be changed"), "{err}");
}

/// VolumeSnapshots labelled with a backup's uid.
/// `space`'s VolumeSnapshots, as the admin.
async fn snapshot_api(space: &Space) -> Api<::kube::api::DynamicObject> {
    let gvk = ::kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    let (resource, _) = ::kube::discovery::pinned_kind(&space.admin, &gvk)
        .await
        .unwrap();
    Api::namespaced_with(space.admin.clone(), &space.ns, &resource)
}

async fn labelled_snapshots(space: &Space, uid: &str) -> Vec<String> {
    let vs = snapshot_api(space).await;
    vs.list(&ListParams::default().labels(&format!("stillpoint.dev/backup={uid}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect()
}

/// The VolumeSnapshots (and their contents) of a backup, for a failure's message.
async fn dump_snapshots(space: &Space, uid: &str) -> String {
    let mut out = String::new();
    for (kind, plural, namespaced) in [
        ("VolumeSnapshot", "volumesnapshots", true),
        ("VolumeSnapshotContent", "volumesnapshotcontents", false),
    ] {
        let gvk = ::kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind);
        let resource = ::kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<::kube::api::DynamicObject> = match namespaced {
            true => Api::namespaced_with(space.admin.clone(), &space.ns, &resource),
            false => Api::all_with(space.admin.clone(), &resource),
        };
        for o in api.list(&ListParams::default()).await.unwrap().items {
            let v = serde_json::to_value(&o).unwrap();
            if namespaced && v["metadata"]["labels"]["stillpoint.dev/backup"] != uid {
                continue;
            }
            if !namespaced && v["spec"]["volumeSnapshotRef"]["namespace"] != space.ns.as_str() {
                continue;
            }
            out.push_str(&format!(
                "{kind} {}: finalizers {} deletion {} status {}\n",
                v["metadata"]["name"],
                v["metadata"]["finalizers"],
                v["metadata"]["deletionTimestamp"],
                v["status"]
            ));
        }
    }
    out
}

async fn lease_holder(space: &Space, lease: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(space.admin.clone(), stillpoint::CONTROLLER_NS);
    leases
        .get_opt(lease)
        .await
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
}

/// Creates a GroupBackup and returns once one of its VolumeSnapshots
/// exists (the group is frozen, the cut under way); returns its uid.
async fn until_cutting(space: &Space, name: &str, group: &str) -> String {
    let ns = &space.ns;
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: {group}}}"
        ))
        .await;
    let uid = space
        .backups()
        .get(name)
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let deadline = tokio::time::Instant::now() + BOUND;
    while labelled_snapshots(space, &uid).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never started cutting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    uid
}

/// A ValidatingAdmissionPolicy (and its binding) that refuses every
/// request one resource rule matches in the space's namespace, until
/// lifted.
struct Refusal {
    name: String,
}

impl Refusal {
    /// Refuses what `rule` (one `matchConstraints.resourceRules` entry, as
    /// YAML flow) matches, saying `message`; `what` names the policy.
    async fn apply(space: &Space, what: &str, rule: &str, message: &str) -> Refusal {
        let ns = &space.ns;
        let name = format!("deny-{what}-{ns}");
        space
            .apply(&format!(
                "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\n\
                 metadata: {{name: {name}}}\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n\
                 \x20   resourceRules:\n    - {rule}\n  validations:\n\
                 \x20 - {{expression: \"false\", message: {message}}}\n\
                 ---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\n\
                 metadata: {{name: {name}}}\nspec:\n  policyName: {name}\n  validationActions: [Deny]\n\
                 \x20 matchResources:\n    namespaceSelector:\n      matchLabels: {{kubernetes.io/metadata.name: {ns}}}\n"
            ))
            .await;
        Refusal { name }
    }

    /// Deletes the policy and its binding.
    async fn lift(self, space: &Space) {
        let dp = ::kube::api::DeleteParams::default();
        let admission = |kind: &str, plural: &str| {
            let gvk =
                ::kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
            let resource = ::kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
            Api::<::kube::api::DynamicObject>::all_with(space.admin.clone(), &resource)
        };
        admission(
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
        )
        .delete(&self.name, &dp)
        .await
        .unwrap();
        admission("ValidatingAdmissionPolicy", "validatingadmissionpolicies")
            .delete(&self.name, &dp)
            .await
            .unwrap();
    }
}

/// A [`Refusal`] of every deletion of a VolumeSnapshot in the space's
/// namespace: storage whose snapshots cannot be deleted for a while.
struct SnapshotDeletesDenied {
    refusal: Refusal,
}

impl SnapshotDeletesDenied {
    /// In force once a dry-run deletion of a probe snapshot is refused.
    async fn new(space: &Space) -> SnapshotDeletesDenied {
        let ns = &space.ns;
        let refusal = Refusal::apply(
            space,
            "snapshot-deletes",
            "{apiGroups: [snapshot.storage.k8s.io], apiVersions: [\"*\"], operations: [DELETE], \
             resources: [volumesnapshots]}",
            "snapshot deletions are refused here for now",
        )
        .await;
        space
            .apply(&format!(
                "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\n\
                 metadata: {{name: deletion-probe, namespace: {ns}}}\n\
                 spec: {{source: {{volumeSnapshotContentName: deletion-probe-{ns}}}}}\n"
            ))
            .await;
        let vs = snapshot_api(space).await;
        let dry = ::kube::api::DeleteParams {
            dry_run: true,
            ..Default::default()
        };
        wait_async("snapshot deletions refused", BOUND, || {
            let (vs, dry) = (&vs, &dry);
            async move { Ok(vs.delete("deletion-probe", dry).await.is_err()) }
        })
        .await
        .unwrap();
        SnapshotDeletesDenied { refusal }
    }

    /// Deletions are allowed again (and the probe deleted).
    async fn lift(self, space: &Space) {
        self.refusal.lift(space).await;
        let dp = ::kube::api::DeleteParams::default();
        let vs = snapshot_api(space).await;
        wait_async("the probe snapshot deleted", BOUND, || {
            let (vs, dp) = (&vs, &dp);
            async move { Ok(vs.delete("deletion-probe", dp).await.is_ok()) }
        })
        .await
        .unwrap();
    }
}

/// Waits until Redis takes writes again; returns how long that took.
async fn until_writes(redis: &Pod) -> Duration {
    let started = tokio::time::Instant::now();
    while !writes(redis, Duration::from_millis(200)).await {
        assert!(started.elapsed() < BOUND, "writes never resumed");
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_killed_mid_freeze_is_replaced_and_its_backup_failed_and_cleaned_up() {
    let space = Space::new("failover").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-redis-k", None).await;
    let pod = RedisPod::with_agent("redis-k", "rk");
    space.apply(&pod.yaml(&ns)).await;
    let redis = space.ready("redis-k").await;
    // Storage that takes 3 s to cut: the group stays frozen that long.
    let ttl = Duration::from_secs(3);
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: slow, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: cache, selector: {{matchLabels: {{app: rk}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  leaseTTL: 3s\n  freezeBudget: 30s\n",
            kube::SLOW_SNAPSHOT_CLASS
        ))
        .await;
    let lease = format!("lease-{ns}");
    let mut a = space.controller("failover-a", &lease).await;
    wait_async("failover-a leads", BOUND, || {
        let (space, lease) = (&space, &lease);
        async move { Ok(lease_holder(space, lease).await.as_deref() == Some("failover-a")) }
    })
    .await
    .unwrap();
    let mut b = space.controller("failover-b", &lease).await;
    space.protectable("slow", "True").await;
    // Ready while leading; the standby is alive but not ready.
    let get = |c: &ControllerProc, path: &str| {
        tokio::task::block_in_place(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match c.get(path) {
                    Ok(r) => return r,
                    Err(e) if std::time::Instant::now() > deadline => panic!("{path}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
    };
    assert_eq!(get(&a, "/readyz").0, 200);
    assert_eq!(get(&b, "/readyz").0, 503);
    assert_eq!(get(&b, "/healthz").0, 200);

    // Killed while frozen, mid-cut, on storage that refuses, for now, to
    // delete snapshots.
    let denied = SnapshotDeletesDenied::new(&space).await;
    let uid = until_cutting(&space, "doomed", "slow").await;
    assert!(
        !writes(&redis, Duration::from_millis(300)).await,
        "the group is frozen"
    );
    a.kill();
    let resumed = until_writes(&redis).await;
    assert!(
        resumed <= ttl + Duration::from_secs(1),
        "writes resumed {resumed:?} after the kill; the lease TTL is {ttl:?}"
    );
    // The standby takes the Lease, fails the orphaned backup and deletes
    // its partial snapshots.
    let doomed = space.finished("doomed").await;
    let s = status(&doomed);
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:?}");
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(c.reason, "ControllerRestarted");
    assert!(c.message.contains("failover-a"), "{}", c.message);
    assert_eq!(
        lease_holder(&space, &lease).await.as_deref(),
        Some("failover-b")
    );
    assert_eq!(get(&b, "/readyz").0, 200, "the new leader is ready");
    let (code, metrics) = get(&b, "/metrics");
    assert!(
        code == 200 && metrics.contains("# TYPE stillpoint_") && metrics.ends_with("# EOF\n"),
        "{metrics}"
    );
    // Its snapshots cannot be deleted yet: it says so, and keeps trying.
    let snapshots_deleted = |b: &GroupBackup| {
        status(b)
            .conditions
            .iter()
            .find(|c| c.type_ == "SnapshotsDeleted")
            .map(|c| c.status.clone())
    };
    assert_eq!(snapshots_deleted(&doomed).as_deref(), Some("False"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!labelled_snapshots(&space, &uid).await.is_empty());
    let still = space.finished("doomed").await;
    assert_eq!(snapshots_deleted(&still).as_deref(), Some("False"));
    denied.lift(&space).await;
    let deleted = wait_async("the partial VolumeSnapshots deleted", BOUND, || {
        let (space, uid) = (&space, &uid);
        async move { Ok(labelled_snapshots(space, uid).await.is_empty()) }
    })
    .await;
    if let Err(e) = deleted {
        panic!("{e}\n{}\n{}", dump_snapshots(&space, &uid).await, b.logs());
    }
    // And says so, once they are.
    let said = wait_async("SnapshotsDeleted True", BOUND, || {
        let space = &space;
        async move {
            let s = status(&space.finished("doomed").await);
            Ok(s.conditions
                .iter()
                .any(|c| c.type_ == "SnapshotsDeleted" && c.status == "True"))
        }
    })
    .await;
    said.unwrap_or_else(|e| panic!("{e}"));

    // SIGTERM mid-freeze: the backup is aborted, the group thawed at once
    // (not by lease), the Lease released, and the controller exits.
    let uid = until_cutting(&space, "interrupted", "slow").await;
    let started = tokio::time::Instant::now();
    let exit = tokio::task::block_in_place(|| b.terminate(Duration::from_secs(30))).unwrap();
    assert!(exit.success(), "{exit}: {}", b.logs());
    assert!(writes(&redis, Duration::from_millis(500)).await);
    let s = status(&space.finished("interrupted").await);
    assert_eq!(s.phase, Some(BackupPhase::Aborted), "{s:?}");
    assert!(s.error.as_deref().unwrap().contains("SIGTERM"), "{s:?}");
    assert_eq!(
        lease_holder(&space, &lease).await,
        None,
        "the Lease was released"
    );
    // Deleted before it exited (the snapshot controller finishes that).
    let deleted = wait_async(
        "the aborted backup's VolumeSnapshots deleted",
        BOUND,
        || {
            let (space, uid) = (&space, &uid);
            async move { Ok(labelled_snapshots(space, uid).await.is_empty()) }
        },
    )
    .await;
    if let Err(e) = deleted {
        panic!("{e}\n{}\n{}", dump_snapshots(&space, &uid).await, b.logs());
    }
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
}

/// The snapshot contents named by content `c`, as the API has them now.
async fn snapshot_contents_of(
    space: &Space,
    c: &GroupBackupContent,
) -> Vec<::kube::api::DynamicObject> {
    let vscs = snapshot_content_api(space).await;
    let mut out = Vec::new();
    for name in c
        .spec
        .members
        .iter()
        .flat_map(|m| m.volumes.iter())
        .filter_map(|v| v.volume_snapshot_content.clone())
    {
        if let Some(vsc) = vscs.get_opt(&name).await.unwrap() {
            out.push(vsc);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_outlive_their_namespace_and_a_backup_deleted_on_purpose_leaves_nothing() {
    let space = Space::new("outlive").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-redis-o", None).await;
    let pod = RedisPod::with_agent("redis-o", "ro");
    space.apply(&pod.yaml(&ns)).await;
    space.ready("redis-o").await;
    space
        .apply(&group_yaml(
            &ns,
            "shop",
            "csi",
            "  - {name: cache, selector: {matchLabels: {app: ro}}}\n",
        ))
        .await;
    // What the backup keeps of the application: the pod's ServiceAccount
    // and Secret, the Service that selects it; not what nothing names.
    space
        .apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ro, namespace: {ns}}}\n\
             spec: {{selector: {{app: ro}}, ports: [{{port: 6379}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: {ns}}}\n\
             spec: {{selector: {{app: other}}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: unrelated, namespace: {ns}}}\n\
             data: {{a: b}}\n"
        ))
        .await;
    let _controller = space.controller("outlive", &format!("lease-{ns}")).await;
    space.protectable("shop", "True").await;
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    let mut taken = Vec::new();
    for name in ["kept", "dropped"] {
        let b = space.backup(name, "shop").await;
        assert_eq!(status(&b).phase, Some(BackupPhase::Succeeded), "{name}");
        check_content(&space, &b).await;
        let c = contents.get(&status(&b).content.unwrap()).await.unwrap();
        let vscs = snapshot_contents_of(&space, &c).await;
        assert!(!vscs.is_empty());
        for vsc in &vscs {
            assert_eq!(
                vsc.data["spec"]["deletionPolicy"], "Retain",
                "{name}: a backup's snapshot contents are retained while its content exists"
            );
        }
        taken.push(c);
    }
    let (kept, dropped) = (taken[0].clone(), taken[1].clone());
    let agent_secret = check_captured(&space, &kept).await;
    // Deleted on purpose: its snapshots, snapshot contents and content go.
    space
        .backups()
        .delete("dropped", &DeleteParams::default())
        .await
        .unwrap();
    wait_async(
        "the dropped backup's content and snapshot contents gone",
        BOUND,
        || {
            let (space, contents, dropped) = (&space, contents.clone(), dropped.clone());
            async move {
                Ok(contents.get_opt(&dropped.name_any()).await?.is_none()
                    && snapshot_contents_of(space, &dropped).await.is_empty())
            }
        },
    )
    .await
    .unwrap();
    // The namespace deleted: everything in it goes, the backups' data stays.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(space.admin.clone());
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    wait_async("the namespace gone", BOUND * 2, || {
        let namespaces = namespaces.clone();
        let ns = ns.clone();
        async move { Ok(namespaces.get_opt(&ns).await?.is_none()) }
    })
    .await
    .unwrap();
    let left = contents.get(&kept.name_any()).await.unwrap();
    assert_eq!(
        left.spec, kept.spec,
        "the content outlives its namespace unchanged"
    );
    let vscs = snapshot_contents_of(&space, &kept).await;
    assert_eq!(
        vscs.len(),
        kept.spec
            .members
            .iter()
            .map(|m| m.volumes.len())
            .sum::<usize>(),
        "every snapshot content outlives the namespace"
    );
    for vsc in &vscs {
        assert!(vsc.data["status"]["snapshotHandle"].is_string(), "{vsc:?}");
    }
    let at = kept.spec.kept_secret.clone().unwrap();
    let kept_secrets: Api<Secret> = Api::namespaced(space.admin.clone(), &at.namespace);
    assert_eq!(
        kept_secrets.get(&at.name).await.unwrap().data,
        agent_secret,
        "the captured Secrets' data outlives the namespace"
    );
    wait_async(
        "the kept content says its GroupBackup is gone",
        BOUND,
        || {
            let (contents, kept) = (contents.clone(), kept.clone());
            async move {
                let c = contents.get(&kept.name_any()).await?;
                Ok(c.status.iter().flat_map(|s| s.conditions.iter()).any(|c| {
                    c.type_ == "Bound" && c.status == "False" && c.reason == "SourceDeleted"
                }))
            }
        },
    )
    .await
    .unwrap();
    // The content deleted on purpose: its snapshot contents go with it.
    contents
        .delete(&kept.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    wait_async(
        "the kept content and its snapshot contents gone",
        BOUND,
        || {
            let (space, contents, kept) = (&space, contents.clone(), kept.clone());
            let (kept_secrets, at) = (kept_secrets.clone(), at.clone());
            async move {
                Ok(contents.get_opt(&kept.name_any()).await?.is_none()
                    && snapshot_contents_of(space, &kept).await.is_empty()
                    && kept_secrets.get_opt(&at.name).await?.is_none())
            }
        },
    )
    .await
    .unwrap();
    nothing_leaked(&space).await;
}

/// The causal workload in both directions over the shop with MariaDB:
/// step `n` goes PostgreSQL → Redis → MariaDB (`chain`), then MariaDB →
/// Redis → PostgreSQL (`back`).
struct BothWays {
    db: tokio_postgres::Client,
    my: mysql_async::Conn,
    cache: redis::aio::MultiplexedConnection,
}

impl Step for BothWays {
    async fn step(&mut self, n: i32) {
        use mysql_async::prelude::Queryable;
        let push = |list: &'static str| {
            let mut cache = self.cache.clone();
            async move {
                let _: i64 = redis::cmd("RPUSH")
                    .arg(list)
                    .arg(n)
                    .query_async(&mut cache)
                    .await
                    .unwrap();
            }
        };
        let insert = "INSERT INTO chain VALUES ($1)";
        self.db.execute(insert, &[&n]).await.unwrap();
        push("chain").await;
        let my = &mut self.my;
        my.exec_drop("INSERT INTO shop.chain VALUES (?)", (n,))
            .await
            .unwrap();
        my.exec_drop("INSERT INTO shop.back VALUES (?)", (n,))
            .await
            .unwrap();
        push("back").await;
        let insert = "INSERT INTO back VALUES ($1)";
        self.db.execute(insert, &[&n]).await.unwrap();
    }
}

impl BothWays {
    /// The workload over the shop's primaries: PostgreSQL, MariaDB, Redis.
    async fn start([pg, maria, redis]: &[Pod; 3]) -> Workload {
        use mysql_async::prelude::Queryable;
        let db = pg_connect(pg).await;
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS chain (id int primary key); \
             CREATE TABLE IF NOT EXISTS back (id int primary key)",
        )
        .await
        .unwrap();
        let mut my = maria_connect(maria).await;
        my.query_drop(
            "CREATE DATABASE IF NOT EXISTS shop; \
             CREATE TABLE IF NOT EXISTS shop.chain (id int primary key); \
             CREATE TABLE IF NOT EXISTS shop.back (id int primary key)",
        )
        .await
        .unwrap();
        let cache = redis_connect(redis).await;
        Workload::run(BothWays { db, my, cache })
    }
}

/// The ids of `table` in each engine's restored server (pods
/// `<prefix><workload>-0`): PostgreSQL, its replica, MariaDB, its replica,
/// Redis, its replica.
async fn shop_ids(space: &Space, prefix: &str, table: &str) -> [BTreeSet<i32>; 6] {
    use mysql_async::prelude::Queryable;
    let pod = |w: &str| format!("{prefix}{w}-0");
    let mut out: Vec<BTreeSet<i32>> = Vec::new();
    for w in ["pg", "pg-replica"] {
        let p = space.ready(&pod(w)).await;
        let rows = pg_connect(&p)
            .await
            .query(&format!("SELECT id FROM {table}"), &[])
            .await
            .unwrap();
        out.push(rows.iter().map(|r| r.get::<_, i32>(0)).collect());
    }
    for w in ["maria", "maria-replica"] {
        let p = space.ready(&pod(w)).await;
        let ids: Vec<i32> = maria_connect(&p)
            .await
            .query(format!("SELECT id FROM shop.{table}"))
            .await
            .unwrap();
        out.push(ids.into_iter().collect());
    }
    for w in ["redis", "redis-replica"] {
        let p = space.ready(&pod(w)).await;
        let ids: Vec<i32> = redis::cmd("LRANGE")
            .arg(table)
            .arg(0)
            .arg(-1)
            .query_async(&mut redis_connect(&p).await)
            .await
            .unwrap();
        out.push(ids.into_iter().collect());
    }
    out.try_into().unwrap()
}

/// The restored shop (`<prefix>` pods) is a consistent cut of
/// [`BothWays`]: in each direction no later hop holds a step an earlier
/// one lacks, no replica is ahead of its primary, and every step
/// acknowledged before the backup (`before`) is in every primary and
/// every aligned replica (PostgreSQL's, MariaDB's).
async fn check_both_ways(tag: &str, space: &Space, prefix: &str, before: usize) {
    let subset = |a: &BTreeSet<i32>, b: &BTreeSet<i32>, what: &str| {
        let extra: Vec<&i32> = a.difference(b).take(5).collect();
        assert!(extra.is_empty(), "{tag}: {what}: {extra:?}");
    };
    let expected: BTreeSet<i32> = (1..=before as i32).collect();
    let chain = shop_ids(space, prefix, "chain").await;
    subset(
        &chain[4],
        &chain[0],
        "chain: Redis holds steps PostgreSQL does not",
    );
    subset(
        &chain[2],
        &chain[4],
        "chain: MariaDB holds steps Redis does not",
    );
    let back = shop_ids(space, prefix, "back").await;
    subset(
        &back[4],
        &back[2],
        "back: Redis holds steps MariaDB does not",
    );
    subset(
        &back[0],
        &back[4],
        "back: PostgreSQL holds steps Redis does not",
    );
    for (table, ids) in [("chain", chain), ("back", back)] {
        let [pg, pg_r, my, my_r, redis, redis_r] = ids;
        subset(
            &pg_r,
            &pg,
            &format!("{table}: the PostgreSQL replica is ahead"),
        );
        subset(
            &my_r,
            &my,
            &format!("{table}: the MariaDB replica is ahead"),
        );
        subset(
            &redis_r,
            &redis,
            &format!("{table}: the Redis replica is ahead"),
        );
        let held = [
            (&pg, "PostgreSQL"),
            (&pg_r, "the PostgreSQL replica"),
            (&my, "MariaDB"),
            (&my_r, "the MariaDB replica"),
            (&redis, "Redis"),
        ];
        for (ids, who) in held {
            subset(
                &expected,
                ids,
                &format!("{table}: {who} lacks steps acknowledged before the backup"),
            );
        }
    }
}

/// Deletes namespace `ns` and waits until it is gone.
async fn delete_namespace(space: &Space, ns: &str) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(space.admin.clone());
    namespaces
        .delete(ns, &DeleteParams::default())
        .await
        .unwrap();
    wait_async("the namespace gone", BOUND * 2, || {
        let (namespaces, ns) = (namespaces.clone(), ns.to_string());
        async move { Ok(namespaces.get_opt(&ns).await?.is_none()) }
    })
    .await
    .unwrap();
}

/// Restores content `content` into `space` (watched by a controller of
/// its own) and checks the application came back whole: every member
/// restored and its position checked, the cut consistent, the settings
/// back, and nothing of the restore's snapshot bindings left.
async fn restore_from_nothing(space: &Space, content: &str, before: usize) {
    use stillpoint_controller::kube::crd::RestorePhase;
    let r = restore(space, "back", &format!("{{content: {content}}}")).await;
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    eprintln!("restored from nothing into {}: {:#?}", space.ns, rs.members);
    for m in rs
        .members
        .iter()
        .filter(|m| m.engine.as_deref() == Some("postgres"))
    {
        assert!(
            m.check.as_deref().unwrap_or_default().starts_with("ok:"),
            "{m:?}"
        );
    }
    check_both_ways(
        &format!("from content into {}", space.ns),
        space,
        "",
        before,
    )
    .await;
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(space.admin.clone(), &space.ns);
    let settings = maps.get("shop-settings").await.unwrap();
    assert_eq!(settings.data.unwrap()["greeting"], "hello");
    let secrets: Api<Secret> = Api::namespaced(space.admin.clone(), &space.ns);
    let password = secrets.get("shop-password").await.unwrap();
    assert_eq!(password.data.unwrap()["PASSWORD"].0, b"s3cret");
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(space.admin.clone(), &space.ns);
    let pg = services.get("pg").await.unwrap();
    assert_eq!(pg.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    assert!(space.groups().get_opt("shop").await.unwrap().is_some());
    follow_restored_primaries(space, "").await;
    nothing_leaked(space).await;
    let uid = r.uid().unwrap();
    let groups = stillpoint_controller::kube::csi::volume_group_snapshot_resource(&space.admin)
        .await
        .unwrap();
    let group_contents: Api<::kube::api::DynamicObject> = Api::all_with(
        space.admin.clone(),
        &::kube::core::ApiResource::from_gvk_with_plural(
            &::kube::api::GroupVersionKind::gvk(
                &groups.group,
                &groups.version,
                "VolumeGroupSnapshotContent",
            ),
            "volumegroupsnapshotcontents",
        ),
    );
    wait_async("the restore's snapshot bindings gone", BOUND, || {
        let (space, uid, group_contents) = (space, uid.clone(), group_contents.clone());
        async move {
            let left = all_snapshot_contents(space)
                .await
                .into_iter()
                .chain(group_contents.list(&ListParams::default()).await?.items)
                .filter(|c| c.name_any().starts_with(&uid))
                .count();
            Ok(left == 0)
        }
    })
    .await
    .unwrap();
}

/// The restored replicas (pods `<prefix>pg-replica-0`,
/// `<prefix>redis-replica-0`) replicate from the restored primaries, which
/// their kept configuration names by Service (`pg-0.pg`, `redis-0.redis`,
/// renamed for copies): a write on each primary after the restore reaches
/// its replica.
async fn follow_restored_primaries(space: &Space, prefix: &str) {
    let [pg0, pg1, redis0, redis1] = {
        let mut pods = Vec::new();
        for name in ["pg-0", "pg-replica-0", "redis-0", "redis-replica-0"] {
            pods.push(space.ready(&format!("{prefix}{name}")).await);
        }
        <[Pod; 4]>::try_from(pods).unwrap()
    };
    streaming(&pg1, &redis1).await;
    let mark = format!("after-restore-{}{prefix}", space.ns);
    pg_connect(&pg0)
        .await
        .execute("CREATE TABLE IF NOT EXISTS marks (m text)", &[])
        .await
        .unwrap();
    pg_connect(&pg0)
        .await
        .execute("INSERT INTO marks VALUES ($1)", &[&mark])
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("mark")
        .arg(&mark)
        .query_async(&mut redis_connect(&redis0).await)
        .await
        .unwrap();
    let (replica, cache) = (pg_connect(&pg1).await, redis_connect(&redis1).await);
    wait_async(
        "the writes on the restored primaries replicated",
        BOUND,
        || {
            let (replica, mut cache, mark) = (&replica, cache.clone(), &mark);
            async move {
                let pg = replica
                    .query_opt("SELECT 1 FROM marks WHERE m = $1", &[mark])
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                let kept: Option<String> = redis::cmd("GET")
                    .arg("mark")
                    .query_async(&mut cache)
                    .await?;
                Ok(pg && kept.as_deref() == Some(mark.as_str()))
            }
        },
    )
    .await
    .unwrap();
    maria_mark_reaches(
        space,
        &format!("{prefix}maria-0"),
        &format!("{prefix}maria-replica-0"),
        &mark,
    )
    .await;
}

/// Writes `mark` on MariaDB pod `primary` and waits until its replica
/// `replica` has it.
async fn maria_mark_reaches(space: &Space, primary: &str, replica: &str, mark: &str) {
    use mysql_async::prelude::Queryable;
    let mut my = maria_connect(&space.ready(primary).await).await;
    my.query_drop("CREATE TABLE IF NOT EXISTS shop.marks (m varchar(200))")
        .await
        .unwrap();
    my.exec_drop("INSERT INTO shop.marks VALUES (?)", (mark,))
        .await
        .unwrap();
    let replica = std::sync::Arc::new(tokio::sync::Mutex::new(
        maria_connect(&space.ready(replica).await).await,
    ));
    wait_async("the write on the MariaDB primary replicated", BOUND, || {
        let replica = replica.clone();
        async move {
            let seen: Option<String> = replica
                .lock()
                .await
                .exec_first("SELECT m FROM shop.marks WHERE m = ?", (mark,))
                .await
                .ok()
                .flatten();
            Ok(seen.is_some())
        }
    })
    .await
    .unwrap();
}

/// The VolumeSnapshotContents made for `space`'s namespace that nothing
/// holds: their VolumeSnapshot is gone and no GroupBackupContent records
/// them. None may ever be left.
async fn leaked_snapshot_contents(space: &Space) -> Vec<String> {
    let snapshots = snapshot_api(space).await;
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    let recorded: BTreeSet<String> = contents
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|c| c.spec.members.iter())
        .flat_map(|m| m.volumes.iter())
        .filter_map(|v| v.volume_snapshot_content.clone())
        .collect();
    let mut left = Vec::new();
    for c in all_snapshot_contents(space).await {
        let to = &c.data["spec"]["volumeSnapshotRef"];
        if to["namespace"].as_str() != Some(space.ns.as_str()) || recorded.contains(&c.name_any()) {
            continue;
        }
        let name = to["name"].as_str().unwrap_or_default();
        if snapshots.get_opt(name).await.unwrap().is_none() {
            left.push(format!("{} (of {name})", c.name_any()));
        }
    }
    left
}

/// Waits until no snapshot content of `space` has leaked.
async fn nothing_leaked(space: &Space) {
    wait_async("no VolumeSnapshotContent leaked", BOUND, || async move {
        Ok(leaked_snapshot_contents(space).await.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", e));
}

/// Every VolumeSnapshotContent of the lab.
async fn all_snapshot_contents(space: &Space) -> Vec<::kube::api::DynamicObject> {
    let api = snapshot_content_api(space).await;
    api.list(&ListParams::default()).await.unwrap().items
}

/// The lab's VolumeSnapshotContents, as the admin.
async fn snapshot_content_api(space: &Space) -> Api<::kube::api::DynamicObject> {
    let gvk = ::kube::api::GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        "VolumeSnapshotContent",
    );
    let (resource, _) = ::kube::discovery::pinned_kind(&space.admin, &gvk)
        .await
        .unwrap();
    Api::all_with(space.admin.clone(), &resource)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_application_comes_back_from_its_content_alone_after_its_namespace_is_deleted() {
    let space = Space::new("nothing").await;
    let ns = space.ns.clone();
    let shop = shop_with_settings(&space).await;
    let controller = space.controller("nothing", &format!("lease-{ns}")).await;
    space.protectable("shop", "True").await;
    let workload = BothWays::start(&shop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut taken = Vec::new();
    for driver in ["csi", "csi-group"] {
        space.use_driver("shop", driver).await;
        let before = workload.acked();
        let b = space.backup(&format!("{driver}-1"), "shop").await;
        assert_eq!(status(&b).phase, Some(BackupPhase::Succeeded), "{driver}");
        assert_eq!(
            status(&b).members.len(),
            6,
            "every member of the shop, MariaDB too"
        );
        taken.push((status(&b).content.unwrap(), before));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    workload.stop().await;
    // The disaster: everything of the namespace goes.
    delete_namespace(&space, &ns).await;
    drop(controller);

    // Into a new, empty namespace, from the csi-group backup's content.
    // With identities of the lab's own PKI, an agent's identity names its
    // namespace: the new one gets its own, which the restore leaves as
    // it is.
    let elsewhere = Space::new("nothing-elsewhere").await;
    for sa in ["pg", "maria", "redis"] {
        elsewhere.identity(sa).await;
    }
    let other = elsewhere
        .controller("nothing-elsewhere", &format!("lease-{}", elsewhere.ns))
        .await;
    restore_from_nothing(&elsewhere, &taken[1].0, taken[1].1).await;
    drop(other);

    // Into the original namespace made again, from the csi backup's.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(space.admin.clone());
    let again: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    namespaces
        .create(&Default::default(), &again)
        .await
        .unwrap();
    let _controller = space
        .controller("nothing-again", &format!("lease-{ns}-again"))
        .await;
    restore_from_nothing(&space, &taken[0].0, taken[0].1).await;

    // Under new names next to the running original, with no copy written
    // by hand: the restore makes them, and the copies follow each other.
    restore_beside_the_original(&space, &taken[1].0, taken[1].1).await;
}

/// Restores content `content` under new names (`copy-`) next to the
/// application running in `space`, and checks the copies: consistent,
/// each replica following its copied primary and not the original, and
/// none of them taken into the original's group.
async fn restore_beside_the_original(space: &Space, content: &str, before: usize) {
    use stillpoint_controller::kube::crd::RestorePhase;
    let r = restore(
        space,
        "copy",
        &format!("{{content: {content}, pvcPrefix: copy-}}"),
    )
    .await;
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    for m in &rs.members {
        assert!(
            m.restored_pod
                .as_deref()
                .is_some_and(|p| p.starts_with("copy-")),
            "{m:?}"
        );
        if m.engine.as_deref() == Some("postgres") {
            assert!(
                m.check.as_deref().unwrap_or_default().starts_with("ok:"),
                "{m:?}"
            );
        }
    }
    check_both_ways(
        "under new names next to the original",
        space,
        "copy-",
        before,
    )
    .await;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(space.admin.clone(), &space.ns);
    let copied = services.get("copy-pg").await.unwrap();
    assert_eq!(
        copied.spec.unwrap().selector.unwrap()["app"],
        "copy-pg",
        "the copied Service selects the copies"
    );
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(space.admin.clone(), &space.ns);
    assert!(maps.get_opt("copy-shop-settings").await.unwrap().is_some());
    follow_restored_primaries(space, "copy-").await;
    // A write on the original primary never reaches the copied replica.
    let original = space.ready("pg-0").await;
    let mark = format!("original-only-{}", space.ns);
    pg_connect(&original)
        .await
        .execute("INSERT INTO marks VALUES ($1)", &[&mark])
        .await
        .unwrap();
    let replica = pg_connect(&space.ready("pg-replica-0").await).await;
    wait_async(
        "the original replica has the original's write",
        BOUND,
        || {
            let (replica, mark) = (&replica, &mark);
            async move {
                Ok(replica
                    .query_opt("SELECT 1 FROM marks WHERE m = $1", &[mark])
                    .await?
                    .is_some())
            }
        },
    )
    .await
    .unwrap();
    let copy = pg_connect(&space.ready("copy-pg-replica-0").await).await;
    let leaked = copy
        .query_opt("SELECT 1 FROM marks WHERE m = $1", &[&mark])
        .await
        .unwrap();
    assert!(leaked.is_none(), "the copied replica follows the original");
    {
        use mysql_async::prelude::Queryable;
        maria_mark_reaches(space, "maria-0", "maria-replica-0", &mark).await;
        let seen: Option<String> = maria_connect(&space.ready("copy-maria-replica-0").await)
            .await
            .exec_first("SELECT m FROM shop.marks WHERE m = ?", (&mark,))
            .await
            .unwrap();
        assert!(
            seen.is_none(),
            "the copied MariaDB replica follows the original"
        );
    }
    // The original's group does not take the copies.
    let b = space.backup("after-copy", "shop").await;
    let pods: BTreeSet<String> = status(&b).members.iter().map(|m| m.pod.clone()).collect();
    assert_eq!(
        pods,
        BTreeSet::from(
            [
                "pg-0",
                "pg-replica-0",
                "maria-0",
                "maria-replica-0",
                "redis-0",
                "redis-replica-0"
            ]
            .map(String::from)
        ),
    );
    nothing_leaked(space).await;
}

/// Tears a second lab of a test down when the test ends, passed or not.
struct SecondLab(&'static KubeLab);

impl Drop for SecondLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("cp")
                .args(["-r"])
                .arg(&self.0.dir)
                .arg("/tmp/runs/second-lab")
                .status();
        }
        // The lab's runtime is shut down, which blocks.
        tokio::task::block_in_place(|| self.0.teardown());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_exported_from_one_cluster_restores_in_another_on_the_same_storage() {
    let space = Space::new("carried").await;
    let ns = space.ns.clone();
    let shop = shop_with_settings(&space).await;
    let controller = space.controller("carried", &format!("lease-{ns}")).await;
    space.protectable("shop", "True").await;
    let workload = BothWays::start(&shop).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut taken = Vec::new();
    for (driver, name) in [("csi-group", "grouped-1"), ("csi", "carried-1")] {
        space.use_driver("shop", driver).await;
        let before = workload.acked();
        let b = space.backup(name, "shop").await;
        assert_eq!(status(&b).phase, Some(BackupPhase::Succeeded), "{name}");
        taken.push((status(&b).content.unwrap(), before));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    workload.stop().await;
    drop(controller);
    // The group backup with its Secrets' data, the other without.
    let dir = tempfile::tempdir().unwrap();
    let (grouped, carried) = (
        dir.path().join("grouped.yaml"),
        dir.path().join("carried.yaml"),
    );
    let (grouped, carried) = (grouped.to_str().unwrap(), carried.to_str().unwrap());
    for args in [
        [
            "backup",
            "export",
            "grouped-1",
            "--include-secrets",
            "-f",
            grouped,
        ]
        .as_slice(),
        ["backup", "export", "carried-1", "-f", carried].as_slice(),
    ] {
        let (ok, _, err) = cli(&space, args);
        assert!(ok, "{err}");
    }

    // Another cluster whose CSI driver reaches the same storage, with
    // Stillpoint installed from deploy/ and a namespace of the same name.
    let other = tokio::task::block_in_place(|| KubeLab::start_sharing_storage(space.lab)).unwrap();
    let other: &'static KubeLab = Box::leak(Box::new(other));
    let _down = SecondLab(other);
    stillpoint::apply_deploy(other).await.unwrap();
    let there = Space {
        lab: other,
        installed: space.installed,
        admin: other.admin().await.unwrap(),
        ns: ns.clone(),
    };
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(there.admin.clone());
    let made: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
    namespaces.create(&Default::default(), &made).await.unwrap();
    for sa in ["pg", "maria", "redis"] {
        there.identity(sa).await;
    }
    for (file, (content, _)) in [grouped, carried].iter().zip(&taken) {
        let (ok, out, err) = cli(&there, &["backup", "import", file]);
        assert!(ok && out.contains(content.as_str()), "{out}{err}");
        let imported = Api::<GroupBackupContent>::all(there.admin.clone())
            .get(content)
            .await
            .unwrap();
        assert_eq!(
            imported.spec.deletion_policy,
            stillpoint_controller::kube::crd::DeletionPolicy::Retain
        );
    }
    // Imported twice: refused, saying why.
    let (ok, _, err) = cli(&there, &["backup", "import", grouped]);
    assert!(
        !ok && err.contains("exists in this cluster already"),
        "{err}"
    );
    let controller = there
        .controller("carried-there", &format!("lease-{ns}"))
        .await;
    // The group backup, its members bound there through its group
    // snapshot's handles.
    let restored = tokio::time::timeout(
        BOUND * 3,
        restore_from_nothing(&there, &taken[0].0, taken[0].1),
    )
    .await;
    assert!(
        restored.is_ok(),
        "the restore did not end:\n{}",
        controller.logs()
    );

    // The other came without its Secrets' data: with the Secret not there,
    // the restore stops, saying which to create.
    Api::<Secret>::namespaced(there.admin.clone(), &ns)
        .delete("shop-password", &DeleteParams::default())
        .await
        .unwrap();
    let r = restore(&there, "again", &format!("{{content: {}}}", taken[1].0)).await;
    let rs = r.status.unwrap();
    let done = rs
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(done.reason, "NotRestorable", "{rs:#?}");
    for needle in [
        "Secret shop-password",
        "--include-secrets",
        "create it in namespace",
    ] {
        assert!(done.message.contains(needle), "{needle}: {}", done.message);
    }
}

/// Checks what content `c` (of the `outlive` test's Redis pod) keeps of
/// the application; returns the kept Secret's data.
async fn check_captured(
    space: &Space,
    c: &GroupBackupContent,
) -> Option<BTreeMap<String, k8s_openapi::ByteString>> {
    let kinds: Vec<(&str, &str)> = c
        .spec
        .objects
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("ServiceAccount", "redis"),
            ("Secret", "agent-redis"),
            ("Service", "ro"),
            ("PersistentVolumeClaim", "data-redis-o"),
            ("ConsistencyGroup", "shop"),
        ],
        "captured in the order a restore creates them"
    );
    for o in &c.spec.objects {
        let meta = &o.manifest["metadata"];
        assert!(
            meta.get("uid").is_none()
                && meta.get("resourceVersion").is_none()
                && meta.get("managedFields").is_none()
                && meta.get("namespace").is_none()
                && o.manifest.get("status").is_none(),
            "{o:?}"
        );
    }
    let secret = c.spec.objects.iter().find(|o| o.kind == "Secret").unwrap();
    assert!(
        secret.manifest.get("data").is_none(),
        "no Secret data in a custom resource"
    );
    let service = c.spec.objects.iter().find(|o| o.kind == "Service").unwrap();
    assert!(service.manifest["spec"].get("clusterIP").is_none());
    let at = c.spec.kept_secret.clone().expect("a kept Secret");
    assert_eq!(at.namespace, "stillpoint-system");
    let kept: Api<Secret> = Api::namespaced(space.admin.clone(), &at.namespace);
    let kept = kept.get(&at.name).await.unwrap();
    let original: Api<Secret> = Api::namespaced(space.admin.clone(), &space.ns);
    let original = original.get("agent-redis").await.unwrap();
    let data = kept.data.clone().unwrap_or_default();
    let captured: BTreeMap<String, k8s_openapi::ByteString> =
        serde_json::from_slice(&data["secret.agent-redis"].0).unwrap();
    assert_eq!(
        Some(captured),
        original.data,
        "the Secret's data, kept whole"
    );
    assert_eq!(
        kept.owner_references().first().map(|o| o.uid.clone()),
        c.uid(),
        "owned by its content"
    );
    kept.data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_needs_every_permission_deploy_gives_it() {
    let space = Space::new("rbac").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-redis-r", None).await;
    let pod = RedisPod::with_agent("redis-r", "rr");
    space.apply(&pod.yaml(&ns)).await;
    let redis = space.ready("redis-r").await;
    space
        .apply(&group_yaml(
            &ns,
            "shop",
            "csi",
            "  - {name: cache, selector: {matchLabels: {app: rr}}}\n",
        ))
        .await;
    // deploy/rbac.yaml for another ServiceAccount, less `create` on
    // VolumeSnapshots.
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
        .unwrap();
    let mut limited = Vec::new();
    for doc in rbac.split("\n---\n") {
        let mut v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "ClusterRole" => {
                v["metadata"]["name"] = "stillpoint-limited".into();
                for rule in v["rules"].as_sequence_mut().unwrap() {
                    if rule["resources"]
                        == serde_yaml::from_str::<serde_yaml::Value>("[volumesnapshots]").unwrap()
                    {
                        let verbs = rule["verbs"].as_sequence_mut().unwrap();
                        let before = verbs.len();
                        verbs.retain(|v| v.as_str() != Some("create"));
                        assert_eq!(verbs.len(), before - 1);
                    }
                }
            }
            "ClusterRoleBinding" | "RoleBinding" => {
                v["metadata"]["name"] = format!("stillpoint-limited-{kind}").to_lowercase().into();
                if kind == "ClusterRoleBinding" {
                    v["roleRef"]["name"] = "stillpoint-limited".into();
                }
                v["subjects"][0]["name"] = "stillpoint-limited".into();
            }
            "ServiceAccount" => v["metadata"]["name"] = "stillpoint-limited".into(),
            _ => continue,
        }
        limited.push(serde_yaml::to_string(&v).unwrap());
    }
    space.apply(&limited.join("\n---\n")).await;
    let _controller = ControllerProc::start_as(
        space.lab,
        space.installed,
        &ns,
        "rbac-limited",
        &format!("lease-{ns}"),
        "stillpoint-limited",
    )
    .await
    .unwrap();
    space.protectable("shop", "True").await;
    let s = status(&space.backup("denied", "shop").await);
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:?}");
    let error = s.error.unwrap();
    for needle in [
        "forbidden",
        "cannot create resource \"volumesnapshots\"",
        "system:serviceaccount:stillpoint-system:stillpoint-limited",
    ] {
        assert!(error.contains(needle), "{needle} not in: {error}");
    }
    assert!(
        writes(&redis, Duration::from_secs(1)).await,
        "nothing stays frozen"
    );
}

/// A ServiceAccount of `space` acting as a person: `roles` bound in each
/// namespace named (ClusterRoles by RoleBinding), `cluster_roles` by a
/// ClusterRoleBinding (removed by the caller).
async fn person(
    space: &Space,
    name: &str,
    roles: &[(&str, &str)],
    cluster_roles: &[&str],
) -> ::kube::Client {
    let ns = &space.ns;
    space
        .apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}"
        ))
        .await;
    let subject = format!("subjects: [{{kind: ServiceAccount, name: {name}, namespace: {ns}}}]");
    for (role, at) in roles {
        space
            .apply(&format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n\
                 metadata: {{name: {name}-{role}, namespace: {at}}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n{subject}"
            ))
            .await;
    }
    for role in cluster_roles {
        space
            .apply(&format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
                 metadata: {{name: {ns}-{name}}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n{subject}"
            ))
            .await;
    }
    space.lab.client_for(ns, name).await.unwrap()
}

/// Creates (dry run: the admission chain runs, nothing is stored) a
/// GroupRestore of `content` in `ns` as `who`.
async fn try_restore(who: &::kube::Client, ns: &str, content: &str) -> Result<(), String> {
    let restore: GroupRestore = serde_json::from_value(serde_json::json!({
        "apiVersion": "stillpoint.dev/v1alpha1",
        "kind": "GroupRestore",
        "metadata": {"name": "back", "namespace": ns},
        "spec": {"content": content},
    }))
    .unwrap();
    let params = ::kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let api: Api<GroupRestore> = Api::namespaced(who.clone(), ns);
    api.create(&params, &restore)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_operator_restores_only_its_own_namespace_content_a_cluster_operator_any() {
    let space = Space::new("mine").await;
    let other = space.lab.namespace("theirs").await.unwrap();
    let (mine, uid) = (space.ns.clone(), "0c1d2e3f-0000-4000-8000-000000000001");
    let content = |ns: &str, name: &str| -> GroupBackupContent {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "stillpoint.dev/v1alpha1",
            "kind": "GroupBackupContent",
            "metadata": {"name": name},
            "spec": {"source": {"namespace": ns, "name": "nightly", "uid": uid}, "group": "shop"},
        }))
        .unwrap()
    };
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    let name = format!("{mine}.gbc-{uid}");
    let pp = ::kube::api::PostParams::default();
    contents.create(&pp, &content(&mine, &name)).await.unwrap();
    // A content cannot claim to come from another namespace than its name says.
    let forged = contents
        .create(&pp, &content(&mine, &format!("{other}.gbc-{uid}")))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        forged.contains("begins with its source namespace"),
        "{forged}"
    );

    // Operator of both namespaces, as deploy/rbac.yaml's ClusterRole.
    let both = [
        ("stillpoint-operator", mine.as_str()),
        ("stillpoint-operator", other.as_str()),
    ];
    let alice = person(&space, "alice", &both, &[]).await;
    try_restore(&alice, &mine, &name).await.unwrap();
    let refused = try_restore(&alice, &other, &name).await.unwrap_err();
    for needle in [
        "Forbidden",
        "was taken in another namespace",
        "verb restore",
    ] {
        assert!(refused.contains(needle), "{needle} not in: {refused}");
    }
    let read = Api::<GroupBackupContent>::all(alice.clone())
        .get(&name)
        .await;
    assert!(read.is_err(), "a namespace operator does not read contents");
    // A cluster operator: the same, plus stillpoint-content-restorer.
    let carol = person(
        &space,
        "carol",
        &[("stillpoint-operator", other.as_str())],
        &["stillpoint-content-restorer"],
    )
    .await;
    try_restore(&carol, &other, &name).await.unwrap();
    Api::<GroupBackupContent>::all(carol.clone())
        .get(&name)
        .await
        .unwrap();
    // And the admin.
    try_restore(&space.admin, &other, &name).await.unwrap();

    let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
        Api::all(space.admin.clone());
    bindings
        .delete(&format!("{mine}-carol"), &DeleteParams::default())
        .await
        .unwrap();
    contents
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_class_that_copies_cuts_postgresql_in_backup_mode_with_its_wal_and_backup_label() {
    let space = Space::new("copies").await;
    let ns = space.ns.clone();
    space.identity("pg").await;
    space.pvc("data-pg-0", None).await;
    space.apply(&postgres_pod(&ns, "pg-0", None, false)).await;
    let pg0 = space.ready("pg-0").await;
    let db = pg_connect(&pg0).await;
    db.batch_execute("CREATE TABLE acked (id int primary key)")
        .await
        .unwrap();
    for id in 0..50 {
        db.execute("INSERT INTO acked VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    // The lab's default classes copy files one after another, as hostpath does.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: copies, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: pg, selector: {{matchLabels: {{app: pg}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {class}, \
             volumeGroupSnapshotClassName: {class}, atomic: false}}\n",
            class = kube::SNAPSHOT_CLASS
        ))
        .await;
    let _controller = space.controller("copies-a", &format!("lease-{ns}")).await;
    space.protectable("copies", "True").await;
    let b = space.backup("copy-1", "copies").await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{s:?}");
    let pg = &s.members[0];
    assert_eq!(pg.consistency.as_deref(), Some("backup-label"));
    assert!(pg.artefacts.iter().any(|a| a == "backup_label"), "{pg:?}");
    // The data, then the WAL up to the backup stop.
    assert_eq!(pg.volume_snapshots.len(), 2, "{pg:?}");
    assert_eq!(pg.volume_snapshots[0].part, None);
    assert_eq!(pg.volume_snapshots[1].part.as_deref(), Some("pg_wal"));
    // The artefacts, in a Secret the backup owns.
    let secret_name = s.artefacts_secret.clone().unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(space.admin.clone(), &ns);
    let secret = secrets.get(&secret_name).await.unwrap();
    let label = &secret.data.as_ref().unwrap()["pg-0.backup_label"];
    assert!(String::from_utf8_lossy(&label.0).starts_with("START WAL LOCATION"));
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("GroupBackup", "copy-1")
    );
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&space, &["plan", "copy-1"]));
    assert!(ok && out.contains("backup-label"), "{out}");

    // Restored: the data, and its WAL part beside it; the agent in restore
    // mode (an init container) lays the WAL and the backup_label in before
    // PostgreSQL starts, which then recovers from the label.
    space
        .pvc("restored-data", Some(&pg.volume_snapshots[0].name))
        .await;
    space
        .pvc("restored-wal", Some(&pg.volume_snapshots[1].name))
        .await;
    let (uid, gid) = user("postgres");
    space
        .apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: restored, namespace: {ns}}}
spec:
  initContainers:
  - name: prepare
    image: ghcr.io/stillpoint-dev/stillpoint-agent:0.1.0
    args: [restore]
    env:
    - {{name: STILLPOINT_RESTORE_DATA_DIR, value: /data/pgdata}}
    - {{name: STILLPOINT_RESTORE_FROM, value: /artefacts}}
    - {{name: STILLPOINT_RESTORE_MEMBER, value: pg-0}}
    - {{name: STILLPOINT_RESTORE_WAL_FROM, value: /wal/pgdata/pg_wal}}
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    volumeMounts:
    - {{name: data, mountPath: /data}}
    - {{name: wal, mountPath: /wal, readOnly: true}}
    - {{name: artefacts, mountPath: /artefacts, readOnly: true}}
  containers:
  - name: postgres
    image: postgres:15
    command: [sh, -c, "rm -f /data/pgdata/postmaster.pid && exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: restored-data}}}}
  - {{name: wal, persistentVolumeClaim: {{claimName: restored-wal}}}}
  - {{name: artefacts, secret: {{secretName: {secret_name}, defaultMode: 292}}}}
"#
        ))
        .await;
    let restored = wait_pod_ready(&space.admin, &ns, "restored", BOUND)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nprepare:\n{}\npostgres:\n{}",
                space.lab.container_log(&ns, "restored", "prepare"),
                space.lab.container_log(&ns, "restored", "postgres")
            )
        });
    let prepared = space.lab.container_log(&ns, "restored", "prepare");
    assert!(prepared.contains("backup_label of pg-0"), "{prepared}");
    recovered_from_label(&restored, 50).await;

    // The same by a GroupRestore. The pod was no workload's: without
    // volumesOnly the restore says so and changes nothing.
    use stillpoint_controller::kube::crd::RestorePhase;
    let r = restore(&space, "no-workload", "{backup: copy-1}").await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Failed));
    assert!(
        rs.error
            .as_deref()
            .unwrap_or_default()
            .contains("volumesOnly"),
        "{rs:?}"
    );
    assert!(rs.pvcs.is_empty());
    // volumesOnly: the PVC, prepared by the agent in restore mode (in a
    // pod of the restore's) before anything starts PostgreSQL on it, in a
    // namespace that enforces Pod Security `restricted`.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(space.admin.clone());
    let enforce = |level: Option<&str>| serde_json::json!({"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}});
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(enforce(Some("restricted"))),
        )
        .await
        .unwrap();
    let r = restore(&space, "by-restore", "{backup: copy-1, volumesOnly: true}").await;
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(enforce(None)))
        .await
        .unwrap();
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    assert_eq!(rs.pvcs, ["restored-data-pg-0"]);
    assert_eq!(rs.members[0].phase, "Prepared", "{rs:#?}");
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &ns);
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(space.admin.clone(), &ns);
    wait_async("the preparation pod and WAL PVC gone", BOUND, || {
        let (pods, claims) = (pods.clone(), claims.clone());
        async move {
            Ok(pods.get_opt("by-restore-prepare-pg-0").await?.is_none()
                && claims.get_opt("by-restore-wal-pg-0").await?.is_none())
        }
    })
    .await
    .unwrap();
    let restored = postgres_on_claim(&space, "by-restore", "restored-data-pg-0").await;
    recovered_from_label(&restored, 50).await;

    // The same with csi-group on the class that copies: the WAL part is
    // cut during the thaw without the group's per-PVC VolumeSnapshot (the
    // snapshot controller makes it later, and it is recorded after the
    // thaw); both are in the backup, and it restores.
    space.use_driver("copies", "csi-group").await;
    let g = space.backup("copy-group-1", "copies").await;
    let gs = status(&g);
    assert_eq!(gs.phase, Some(BackupPhase::Succeeded), "{gs:?}");
    let gpg = &gs.members[0];
    assert_eq!(gpg.consistency.as_deref(), Some("backup-label"));
    let parts: Vec<Option<&str>> = gpg
        .volume_snapshots
        .iter()
        .map(|v| v.part.as_deref())
        .collect();
    assert_eq!(parts.len(), 2, "{gpg:?}");
    assert!(
        parts.contains(&None) && parts.contains(&Some("pg_wal")),
        "{gpg:?}"
    );
    let r = restore(
        &space,
        "by-group",
        "{backup: copy-group-1, volumesOnly: true, pvcPrefix: grouped-}",
    )
    .await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    assert_eq!(rs.pvcs, ["grouped-data-pg-0"]);
    let restored = postgres_on_claim(&space, "by-group", "grouped-data-pg-0").await;
    recovered_from_label(&restored, 50).await;
}

/// Pod `name` running PostgreSQL (as `postgres`) on the data directory
/// of claim `claim`, once Ready.
async fn postgres_on_claim(space: &Space, name: &str, claim: &str) -> Pod {
    let ns = &space.ns;
    let (uid, gid) = user("postgres");
    space
        .apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  containers:
  - name: postgres
    image: postgres:15
    command: [sh, -c, "rm -f /data/pgdata/postmaster.pid && exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    readinessProbe: {{exec: {{command: [pg_isready, -h, 127.0.0.1]}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}
"#
        ))
        .await;
    wait_pod_ready(&space.admin, ns, name, BOUND)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", space.lab.container_log(ns, name, "postgres")))
}

/// The restored PostgreSQL holds every row acknowledged before the backup
/// (`acked`) and recovered from its backup_label (which it then renamed).
async fn recovered_from_label(restored: &Pod, acked: i64) {
    let db = pg_connect(restored).await;
    let n: i64 = db
        .query_one("SELECT count(*) FROM acked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, acked, "every row acknowledged before the backup");
    let recovered = db
        .query_one("SELECT size FROM pg_stat_file('backup_label.old')", &[])
        .await;
    assert!(
        recovered.is_ok(),
        "started from its backup_label: {recovered:?}"
    );
}

/// A MariaDB pod `name` (app label `maria`) with the agent, on PVC
/// `data-<name>`; `root` may connect from anywhere.
fn mariadb_pod(ns: &str, name: &str) -> String {
    let (uid, gid) = user("mysql");
    // The init file takes one statement per line.
    let start = "echo \\\"CREATE USER IF NOT EXISTS root@'%';\\\" > /tmp/init.sql && \
         echo \\\"GRANT ALL ON *.* TO root@'%' WITH GRANT OPTION;\\\" >> /tmp/init.sql && \
         { test -d /data/db/mysql || mariadb-install-db --no-defaults --datadir=/data/db \
            --auth-root-authentication-method=normal --skip-test-db >/dev/null 2>&1; } && \
         exec mariadbd --no-defaults --datadir=/data/db --port=3306 --bind-address=0.0.0.0 \
            --socket=/tmp/mysqld.sock --pid-file=/tmp/mysqld.pid --skip-name-resolve \
            --innodb-buffer-pool-size=64M --server-id=1 --log-bin=/data/db/binlog \
            --binlog-format=ROW --init-file=/tmp/init.sql";
    let agent = stillpoint::agent_container(
        "mariadb",
        "mysql://root@127.0.0.1:3306/",
        "agent-tls",
        "data",
    );
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: maria}}}}
spec:
  serviceAccountName: maria
  containers:
  - name: mariadb
    image: mariadb:10.11
    command: [sh, -c, "{start}"]
    securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
    ports: [{{name: mysql, containerPort: 3306}}]
    readinessProbe: {{tcpSocket: {{port: 3306}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
{agent}  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data-{name}}}}}
  - {{name: agent-tls, secret: {{secretName: agent-maria}}}}
"#
    )
}

/// One write to each engine of the quiesce test, each in its own task:
/// PostgreSQL and MariaDB insert `id` into `t`, Redis sets `k<id>`.
fn writes_to_each(
    pg: &Pod,
    maria: &Pod,
    redis: &Pod,
    id: i32,
) -> Vec<(&'static str, tokio::task::JoinHandle<()>)> {
    let (pg, maria, redis) = (pg.clone(), maria.clone(), redis.clone());
    vec![
        (
            "postgres",
            tokio::spawn(async move {
                pg_connect(&pg)
                    .await
                    .execute("INSERT INTO t VALUES ($1)", &[&id])
                    .await
                    .unwrap();
            }),
        ),
        (
            "mariadb",
            tokio::spawn(async move {
                use mysql_async::prelude::Queryable;
                let mut c = maria_connect(&maria).await;
                c.exec_drop("INSERT INTO app.t VALUES (?)", (id,))
                    .await
                    .unwrap();
            }),
        ),
        (
            "redis",
            tokio::spawn(async move {
                let mut c = redis_connect(&redis).await;
                redis::cmd("SET")
                    .arg(format!("k{id}"))
                    .arg(id)
                    .query_async::<()>(&mut c)
                    .await
                    .unwrap();
            }),
        ),
    ]
}

/// Waits until GroupQuiesce `name` has reached `phase`; returns it.
async fn quiesce_phase(
    space: &Space,
    name: &str,
    phase: stillpoint_controller::kube::crd::QuiescePhase,
) -> stillpoint_controller::kube::crd::GroupQuiesce {
    let api: Api<stillpoint_controller::kube::crd::GroupQuiesce> =
        Api::namespaced(space.admin.clone(), &space.ns);
    wait_async(&format!("GroupQuiesce {name} {phase:?}"), BOUND, || {
        let api = api.clone();
        async move {
            Ok(api
                .get_opt(name)
                .await?
                .and_then(|q| q.status)
                .and_then(|s| s.phase)
                == Some(phase))
        }
    })
    .await
    .unwrap();
    api.get(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_quiesce_holds_writes_until_deleted_expired_thawed_or_its_controller_dies() {
    use stillpoint_controller::kube::crd::{GroupQuiesce, QuiescePhase};
    let space = Space::new("quiesce").await;
    let ns = space.ns.clone();
    for sa in ["redis", "pg", "maria"] {
        space.identity(sa).await;
    }
    for pvc in ["data-redis-q", "data-pg-q", "data-maria-q"] {
        space.pvc(pvc, None).await;
    }
    let pod = RedisPod::with_agent("redis-q", "rq");
    space.apply(&pod.yaml(&ns)).await;
    // PostgreSQL in the default mode (`backup`: a backup's freeze lets
    // its writes flow), and MariaDB.
    space.apply(&postgres_pod(&ns, "pg-q", None, false)).await;
    space.apply(&mariadb_pod(&ns, "maria-q")).await;
    let redis = space.ready("redis-q").await;
    let pg = space.ready("pg-q").await;
    let maria = space.ready("maria-q").await;
    pg_connect(&pg)
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    {
        use mysql_async::prelude::Queryable;
        let mut c = maria_connect(&maria).await;
        c.query_drop("CREATE DATABASE app; CREATE TABLE app.t (id int) ENGINE=InnoDB")
            .await
            .unwrap();
    }
    let group = |name: &str, members: &str| {
        format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  members:\n{members}\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  leaseTTL: 3s\n",
            kube::ATOMIC_SNAPSHOT_CLASS
        )
    };
    let cache = "  - {name: cache, selector: {matchLabels: {app: rq}}}\n";
    let all = format!(
        "{cache}  - {{name: pg, selector: {{matchLabels: {{app: pg}}}}}}\n  - {{name: maria, selector: {{matchLabels: {{app: maria}}}}}}\n"
    );
    space.apply(&group("hold", &all)).await;
    space.apply(&group("cache-only", cache)).await;
    let lease = format!("lease-{ns}");
    let mut a = space.controller("quiesce-a", &lease).await;
    space.protectable("hold", "True").await;
    space.protectable("cache-only", "True").await;
    let quiesces: Api<GroupQuiesce> = Api::namespaced(space.admin.clone(), &ns);
    let create = |name: &str, extra: &str| {
        format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: hold, duration: 10m{extra}}}"
        )
    };

    // Held, with positions, until deleted: every write of every engine
    // waits (PostgreSQL too, whatever its mode), then completes.
    space.apply(&create("q1", "")).await;
    let q = quiesce_phase(&space, "q1", QuiescePhase::Frozen).await;
    let status = q.status.unwrap();
    let pods: BTreeSet<&str> = status.members.iter().map(|m| m.pod.as_str()).collect();
    assert_eq!(pods, BTreeSet::from(["maria-q", "pg-q", "redis-q"]));
    assert!(
        status.members.iter().all(|m| m.position.is_some()),
        "{status:?}"
    );
    assert!(status.until.is_some());
    let waiting = writes_to_each(&pg, &maria, &redis, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (engine, w) in &waiting {
        assert!(
            !w.is_finished(),
            "a {engine} write went through the quiesce"
        );
    }
    // A GroupBackup named as the quiesce's hold once was takes nothing
    // over: it is refused, and the quiesce holds on.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: quiesce-q1, namespace: {ns}}}\n\
             spec: {{group: cache-only}}"
        ))
        .await;
    let b = space.finished("quiesce-q1").await;
    assert_eq!(status_of_phase(&b), Some(BackupPhase::Failed), "{b:?}");
    let q = quiesce_phase(&space, "q1", QuiescePhase::Frozen).await;
    assert!(q.status.unwrap().error.is_none());
    space
        .groups()
        .delete("cache-only", &DeleteParams::default())
        .await
        .unwrap();
    for (engine, w) in &waiting {
        assert!(
            !w.is_finished(),
            "a {engine} write went through the quiesce"
        );
    }
    quiesces
        .delete("q1", &DeleteParams::default())
        .await
        .unwrap();
    wait_async("q1 gone", BOUND, || {
        let quiesces = quiesces.clone();
        async move { Ok(quiesces.get_opt("q1").await?.is_none()) }
    })
    .await
    .unwrap();
    for (engine, w) in waiting {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap_or_else(|_| panic!("the {engine} write did not complete after the thaw"))
            .unwrap();
    }
    let rows: i64 = pg_connect(&pg)
        .await
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the PostgreSQL write landed once");
    {
        use mysql_async::prelude::Queryable;
        let n: Option<i64> = maria_connect(&maria)
            .await
            .query_first("SELECT count(*) FROM app.t")
            .await
            .unwrap();
        assert_eq!(n, Some(1), "the MariaDB write landed once");
    }
    let k1: Option<i32> = redis::cmd("GET")
        .arg("k1")
        .query_async(&mut redis_connect(&redis).await)
        .await
        .unwrap();
    assert_eq!(k1, Some(1), "the Redis write landed");

    // A Secret named as a backup's artefacts would be is never adopted:
    // the backup fails before anything freezes, and the Secret stays as
    // it was.
    space
        .apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: stranger-artefacts, namespace: {ns}}}\n\
             stringData: {{keep: mine}}"
        ))
        .await;
    let b = space.backup("stranger", "hold").await;
    let s = b.status.clone().unwrap_or_default();
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:?}");
    let completed = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(completed.reason, "ArtefactsSecretExists", "{completed:?}");
    assert!(
        s.members.iter().all(|m| m.position.is_none()),
        "nothing froze: {s:?}"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(space.admin.clone(), &ns);
    let stranger = secrets.get("stranger-artefacts").await.unwrap();
    assert!(
        stranger
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(
        stranger.data.unwrap()["keep"].0,
        b"mine".to_vec(),
        "the Secret is untouched"
    );
    space
        .backups()
        .delete("stranger", &DeleteParams::default())
        .await
        .unwrap();
    wait_async("backup stranger gone", BOUND, || {
        let backups = space.backups();
        async move { Ok(backups.get_opt("stranger").await?.is_none()) }
    })
    .await
    .unwrap();
    assert!(
        secrets
            .get_opt("stranger-artefacts")
            .await
            .unwrap()
            .is_some(),
        "a Secret the backup did not make outlives it"
    );

    // The CLI: a member for two seconds; it ends by itself.
    let cli_space = (space.lab.admin_kubeconfig.clone(), ns.clone());
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new(stillpoint_tests::harness::agent::controller_binary().unwrap())
            .args(["--kube", "--kubeconfig"])
            .arg(&cli_space.0)
            .args([
                "-n",
                &cli_space.1,
                "quiesce",
                "cache",
                "--for",
                "3s",
                "--ttl",
                "3s",
            ])
            .output()
            .unwrap()
    });
    wait_async("the CLI's quiesce frozen", BOUND, || {
        let quiesces = quiesces.clone();
        async move {
            Ok(quiesces
                .list(&Default::default())
                .await?
                .items
                .iter()
                .any(|q| q.status.as_ref().and_then(|s| s.phase) == Some(QuiescePhase::Frozen)))
        }
    })
    .await
    .unwrap();
    assert!(!writes(&redis, Duration::from_millis(500)).await);
    let out = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("frozen redis-q at"), "{stdout}");
    assert!(stdout.contains("thawed: Expired"), "{stdout}");
    assert!(
        writes(&redis, Duration::from_secs(2)).await,
        "expiry thawed"
    );

    // `stillpoint thaw GROUP` ends a quiesce at once.
    space.apply(&create("q2", "")).await;
    quiesce_phase(&space, "q2", QuiescePhase::Frozen).await;
    let (ok, stdout, stderr) = cli(&space, &["thaw", "hold"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("thawed: GroupQuiesce q2 deleted"),
        "{stdout}"
    );
    assert!(writes(&redis, Duration::from_secs(2)).await);

    // The controller dies: writes resume within the lease TTL + 1 s, and
    // the next leader says what happened.
    space.apply(&create("q3", ", ttl: 3s")).await;
    quiesce_phase(&space, "q3", QuiescePhase::Frozen).await;
    assert!(!writes(&redis, Duration::from_millis(300)).await);
    a.kill();
    let resumed = until_writes(&redis).await;
    assert!(
        resumed <= Duration::from_secs(4),
        "writes resumed {resumed:?} after the controller died (TTL 3 s)"
    );
    let _b = space.controller("quiesce-b", &lease).await;
    let q = quiesce_phase(&space, "q3", QuiescePhase::Failed).await;
    let status = q.status.unwrap();
    let frozen = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Frozen")
        .unwrap();
    assert_eq!(frozen.reason, "ControllerRestarted", "{frozen:?}");
    assert_eq!(frozen.status, "False");
}

/// Rows of `chain` on a restored PostgreSQL pod.
async fn chain_rows(space: &Space, pod: &str) -> BTreeSet<i32> {
    let pod = space.ready(pod).await;
    pg_connect(&pod)
        .await
        .query("SELECT id FROM chain", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_replica_is_restored_ahead_of_its_primary_whatever_order_the_storage_cuts_in() {
    use stillpoint_controller::kube::crd::RestorePhase;
    let space = Space::new("order").await;
    let ns = space.ns.clone();
    space.identity("pg").await;
    space
        .apply(&sts_yaml(&ns, "pg", "postgres", None, Run::Original))
        .await;
    let pg0 = space.ready("pg-0").await;
    let pg_ip = pod_ip(&pg0).unwrap().to_string();
    space
        .apply(&sts_yaml(
            &ns,
            "pg-replica",
            "postgres",
            Some(&pg_ip),
            Run::Original,
        ))
        .await;
    let pg1 = space.ready("pg-replica-0").await;
    let replica = pg_connect(&pg1).await;
    wait_async("the replica streaming", BOUND, || {
        let replica = &replica;
        async move {
            Ok(replica
                .query_opt(
                    "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    &[],
                )
                .await?
                .is_some())
        }
    })
    .await
    .unwrap();
    // The worst order, on purpose: the primary's volume is cut first, the
    // replica's 400 ms later, by both the group and the single snapshots.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(space.admin.clone(), &ns);
    let primary_volume = claims
        .get("data-pg-0")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.volume_name)
        .unwrap();
    let class = format!("worst-{ns}");
    let parameters =
        format!("{{mode: atomic, firstVolumes: {primary_volume}, thenAfterMs: \"400\"}}");
    space.atomic_classes(&class, &parameters).await;
    // PostgreSQL in its default mode: writes flow through the cut.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: pair, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: pg, selector: {{matchLabels: {{app: pg}}}}}}\n  \
             - {{name: pg-replica, selector: {{matchLabels: {{app: pg-replica}}}}}}\n  \
             snapshot: {{driver: csi-group, volumeSnapshotClassName: {class}, volumeGroupSnapshotClassName: {class}}}\n  \
             freezeBudget: 20s\n  leaseTTL: 5s\n  alignTimeout: 10s\n"
        ))
        .await;
    let _controller = space.controller("order-a", &format!("lease-{ns}")).await;
    space.protectable("pair", "True").await;

    // Write load: one committed row after another.
    let db = pg_connect(&pg0).await;
    db.batch_execute("CREATE TABLE chain (id int primary key)")
        .await
        .unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !*stopped.borrow() {
                n += 1;
                db.execute("INSERT INTO chain VALUES ($1)", &[&n])
                    .await
                    .unwrap();
                acked.store(n, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut taken = Vec::new();
    for driver in ["csi-group", "csi"] {
        space.use_driver("pair", driver).await;
        for n in 0..10 {
            let name = format!("{driver}-{n}");
            let before = acked.load(std::sync::atomic::Ordering::SeqCst);
            let b = space.backup(&name, "pair").await;
            let s = status(&b);
            assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{name}: {s:?}");
            // The replica's cut was fixed before its primary's.
            let cut = |pod: &str| s.timeline[pod]["cut"];
            assert!(
                cut("pg-replica-0") < cut("pg-0"),
                "{name}: {:?}",
                s.timeline
            );
            taken.push((name, before));
        }
    }
    let _ = stop.send(true);
    writer.await.unwrap();
    let after = acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after > taken.len() as i32,
        "the writes went on through the backups"
    );

    // Every backup restored in place: the product's own check finds no
    // replica ahead of its primary, and neither do the rows.
    let mut ahead = Vec::new();
    for (name, before) in &taken {
        let r = restore(
            &space,
            &format!("r-{name}"),
            &format!("{{backup: {name}, inPlace: true}}"),
        )
        .await;
        let rs = r.status.clone().unwrap();
        if rs.phase != Some(RestorePhase::Succeeded) {
            ahead.push(format!("{name}: {}", rs.error.clone().unwrap_or_default()));
            continue;
        }
        let replica = rs.members.iter().find(|m| m.pod == "pg-replica-0").unwrap();
        assert!(
            replica
                .check
                .as_deref()
                .unwrap_or_default()
                .contains("not ahead of pg-0"),
            "{name}: {replica:?}"
        );
        let (primary, replica) = (
            chain_rows(&space, "pg-0").await,
            chain_rows(&space, "pg-replica-0").await,
        );
        if !replica.is_subset(&primary) {
            ahead.push(format!("{name}: the replica holds rows its primary lacks"));
        }
        let acknowledged: BTreeSet<i32> = (1..=*before).collect();
        assert!(
            acknowledged.is_subset(&primary),
            "{name}: acknowledged rows lost"
        );
        assert!(
            acknowledged.is_subset(&replica),
            "{name}: the aligned replica lacks acknowledged rows"
        );
    }
    assert!(
        ahead.is_empty(),
        "replicas restored ahead of their primaries: {ahead:#?}"
    );
}

/// The GroupBackups schedule `name` made, and which have not ended.
async fn scheduled(space: &Space, name: &str) -> (Vec<GroupBackup>, Vec<String>) {
    let all = space
        .backups()
        .list(&ListParams::default().labels(&format!("stillpoint.dev/schedule={name}")))
        .await
        .unwrap()
        .items;
    let active = all
        .iter()
        .filter(|b| {
            !b.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(BackupPhase::is_final)
        })
        .map(|b| b.name_any())
        .collect();
    (all, active)
}

/// Sleeps until the wall clock's second within the minute, modulo
/// `period`, is `at`.
async fn until_second(period: u64, at: u64) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        if now.as_secs() % period == at {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_never_overlap_keep_the_newest_and_follow_their_missed_policy() {
    let space = Space::new("schedule").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-redis-s", None).await;
    let pod = RedisPod::with_agent("redis-s", "rs");
    space.apply(&pod.yaml(&ns)).await;
    space.ready("redis-s").await;
    // Two groups over the pod: one whose storage takes 3 s to cut (every
    // other firing of a 2-second schedule finds a backup running), one fast.
    for (group, class) in [
        ("slow", kube::SLOW_SNAPSHOT_CLASS),
        ("fast", kube::ATOMIC_SNAPSHOT_CLASS),
    ] {
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {group}, namespace: {ns}}}\n\
                 spec:\n  members:\n  - {{name: cache, selector: {{matchLabels: {{app: rs}}}}}}\n\
                 \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {class}}}\n  leaseTTL: 5s\n  freezeBudget: 30s\n"
            ))
            .await;
    }
    let lease = format!("lease-{ns}");
    let mut a = space.controller("schedule-a", &lease).await;
    space.protectable("slow", "True").await;
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: every2s, namespace: {ns}}}\n\
             spec: {{group: slow, schedule: \"*/2 * * * * *\", keepLast: 2, immediate: true}}"
        ))
        .await;
    // Never two of the group at once, while backups pile up.
    let started = tokio::time::Instant::now();
    let mut made = std::collections::BTreeMap::new();
    while made.len() < 5 {
        let (all, active) = scheduled(&space, "every2s").await;
        assert!(
            active.len() <= 1,
            "two backups of one group at once: {active:?}"
        );
        made.extend(all.iter().map(|b| (b.name_any(), b.uid().unwrap())));
        assert!(started.elapsed() < BOUND, "only {made:?}\n{}", a.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let schedules: Api<stillpoint_controller::kube::crd::BackupSchedule> =
        Api::namespaced(space.admin.clone(), &ns);
    schedules
        .patch(
            "every2s",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    // Retention: once everything ended, the newest two are left, and the
    // deleted ones' VolumeSnapshots are gone.
    wait_async("retention down to keepLast", BOUND, || {
        let space = &space;
        async move {
            let (all, active) = scheduled(space, "every2s").await;
            Ok(active.is_empty() && all.len() <= 2)
        }
    })
    .await
    .unwrap();
    let (kept, _) = scheduled(&space, "every2s").await;
    let kept: BTreeSet<String> = kept.iter().map(|b| b.name_any()).collect();
    // Names sort by time: the kept ones are the newest of all made.
    let every: BTreeSet<String> = made.keys().cloned().chain(kept.iter().cloned()).collect();
    let newest: BTreeSet<String> = every.iter().rev().take(kept.len()).cloned().collect();
    assert_eq!(kept, newest, "the newest are kept");
    let contents: Api<GroupBackupContent> = Api::all(space.admin.clone());
    for (gone, uid) in made.iter().filter(|(n, _)| !kept.contains(*n)) {
        // Each deleted backup's snapshots and content went with it.
        assert!(space.backups().get_opt(gone).await.unwrap().is_none());
        assert!(
            labelled_snapshots(&space, uid).await.is_empty(),
            "{gone}'s snapshots"
        );
        let content = format!("{ns}.gbc-{uid}");
        wait_async("a pruned backup's content gone", BOUND, || {
            let (contents, content) = (contents.clone(), content.clone());
            async move { Ok(contents.get_opt(&content).await?.is_none()) }
        })
        .await
        .unwrap();
    }
    for b in kept.iter() {
        let b = space.backups().get(b).await.unwrap();
        let content = status(&b).content.unwrap();
        assert!(
            contents.get_opt(&content).await.unwrap().is_some(),
            "{content}"
        );
    }
    // No snapshot content of this namespace is left that no kept backup's
    // VolumeSnapshot is bound to.
    nothing_leaked(&space).await;
    let reasons = event_reasons(&space, "every2s").await;
    assert!(reasons.iter().any(|r| r == "Scheduled"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "Skipped"),
        "overlapping firings skipped: {reasons:?}"
    );
    assert!(reasons.iter().any(|r| r == "Pruned"), "{reasons:?}");
    let (_, metrics) = a.get("/metrics").unwrap();
    // Labelled with the namespace: another namespace's schedule of this
    // name is another series.
    assert!(
        metrics.contains(&format!(
            "stillpoint_schedule_skips_total{{namespace=\"{ns}\",schedule=\"every2s\",reason=\"overlap\"}}"
        )),
        "{metrics}"
    );

    // Retention prunes only what its own schedule made: backups made by
    // hand that carry the schedule's name label (of this group or
    // another) are never touched, even by a schedule that keeps one.
    space.protectable("fast", "True").await;
    for (hand, group) in [("hand-1", "fast"), ("hand-2", "fast"), ("hand-3", "slow")] {
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {hand}, namespace: {ns}, \
                 labels: {{stillpoint.dev/schedule: strict}}}}\nspec: {{group: {group}}}"
            ))
            .await;
        space.finished(hand).await;
    }
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: strict, namespace: {ns}}}\n\
             spec: {{group: fast, schedule: \"0 0 0 1 1 *\", keepLast: 1, suspend: true}}"
        ))
        .await;
    wait_async("schedule strict reconciled", BOUND, || {
        let schedules = schedules.clone();
        async move {
            let s = schedules.get("strict").await?;
            Ok(s.status
                .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == "Valid")))
        }
    })
    .await
    .unwrap();
    // Another look after a resync would have had its chance.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for hand in ["hand-1", "hand-2", "hand-3"] {
        assert!(
            space.backups().get_opt(hand).await.unwrap().is_some(),
            "retention of schedule strict deleted {hand}, which it did not make"
        );
    }
    assert!(
        !event_reasons(&space, "strict")
            .await
            .iter()
            .any(|r| r == "Pruned")
    );

    // A schedule firing more often than the controller allows (the lab's
    // floor: --min-schedule-interval 2s) is refused and takes nothing.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: hasty, namespace: {ns}}}\n\
             spec: {{group: fast, schedule: \"* * * * * *\", immediate: true}}"
        ))
        .await;
    let valid = std::sync::Arc::new(std::sync::Mutex::new(None));
    wait_async("schedule hasty refused", BOUND, || {
        let (schedules, valid) = (schedules.clone(), valid.clone());
        async move {
            let s = schedules.get("hasty").await?;
            let c = s
                .status
                .iter()
                .flat_map(|st| st.conditions.clone())
                .find(|c| c.type_ == "Valid");
            let found = c.is_some();
            *valid.lock().unwrap() = c;
            Ok(found)
        }
    })
    .await
    .unwrap();
    let c = valid.lock().unwrap().clone().unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidSpec"),
        "{c:?}"
    );
    assert!(
        c.message.contains("fires 1s apart") && c.message.contains("--min-schedule-interval"),
        "{}",
        c.message
    );
    let taken = space
        .backups()
        .list(&ListParams::default().labels("stillpoint.dev/schedule=hasty"))
        .await
        .unwrap();
    assert!(taken.items.is_empty(), "a refused schedule took a backup");

    // Missed runs: every 15 s, the controller down across a run, back 5 s
    // after the next one would have been taken.
    for (policy, fires) in [("run-once", true), ("skip", false)] {
        let name = format!("q15-{policy}");
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{group: fast, schedule: \"*/15 * * * * *\", missed: {policy}, immediate: true}}"
            ))
            .await;
        wait_async("the first backup", BOUND, || {
            let (space, name) = (&space, &name);
            async move { Ok(scheduled(space, name).await.0.len() == 1) }
        })
        .await
        .unwrap();
        wait_async("it ended", BOUND, || {
            let (space, name) = (&space, &name);
            async move { Ok(scheduled(space, name).await.1.is_empty()) }
        })
        .await
        .unwrap();
        a.kill();
        // Down across the next run, back 6 s after it.
        until_second(15, 14).await;
        until_second(15, 6).await;
        a = space
            .controller(&format!("schedule-{policy}"), &lease)
            .await;
        // Before the run after that (9 s away): a backup only for run-once.
        let back = tokio::time::Instant::now();
        let mut all = Vec::new();
        while back.elapsed() < Duration::from_secs(8) {
            all = scheduled(&space, &name).await.0;
            if all.len() > 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reasons = event_reasons(&space, &name).await;
        assert_eq!(
            all.len(),
            if fires { 2 } else { 1 },
            "{policy}: {:?} (events {reasons:?})\n{}",
            all.iter().map(|b| b.name_any()).collect::<Vec<_>>(),
            a.logs()
        );
        assert!(
            reasons.iter().any(|r| r == "Missed"),
            "{policy}: {reasons:?}"
        );
        schedules
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
            )
            .await
            .unwrap();
        wait_async("its backups ended", BOUND, || {
            let (space, name) = (&space, &name);
            async move { Ok(scheduled(space, name).await.1.is_empty()) }
        })
        .await
        .unwrap();
    }
}

/// A schedule whose status cannot be written (every write refused at
/// admission, as a stale cache or a failing API server would leave it)
/// takes each run once, named by its scheduled time, on time, and counts
/// none as missed: its runs are recorded by the backups themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_whose_status_cannot_be_written_takes_each_run_once() {
    let space = Space::new("runs").await;
    let ns = space.ns.clone();
    // A group of no pod: its backups fail at once.
    let nobody = "  - {name: nobody, selector: {matchLabels: {app: nobody}}}\n";
    space.apply(&group_yaml(&ns, "empty", "csi", nobody)).await;
    let a = space.controller("runs", &format!("lease-{ns}")).await;
    let schedule = |name: &str, spec: &str| {
        format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: empty, {spec}}}"
        )
    };
    // A probe schedule whose status exists, to see the refusal in force.
    let schedules: Api<stillpoint_controller::kube::crd::BackupSchedule> =
        Api::namespaced(space.admin.clone(), &ns);
    space
        .apply(&schedule(
            "probe",
            "schedule: \"0 0 0 1 1 *\", suspend: true",
        ))
        .await;
    wait_async("the probe's status", BOUND, || {
        let schedules = schedules.clone();
        async move { Ok(schedules.get("probe").await?.status.is_some()) }
    })
    .await
    .unwrap();
    let refusal = Refusal::apply(
        &space,
        "schedule-status",
        "{apiGroups: [stillpoint.dev], apiVersions: [\"*\"], operations: [UPDATE], \
         resources: [backupschedules/status]}",
        "schedule status writes are refused here for now",
    )
    .await;
    let dry = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    wait_async("schedule status writes refused", BOUND, || {
        let (schedules, dry) = (schedules.clone(), dry.clone());
        let touch = serde_json::json!({"status": {"active": ["probe"]}});
        async move {
            let written = schedules
                .patch_status("probe", &dry, &Patch::Merge(touch))
                .await;
            Ok(written.is_err())
        }
    })
    .await
    .unwrap();
    space
        .apply(&schedule(
            "every3s",
            "schedule: \"*/3 * * * * *\", missed: run-once",
        ))
        .await;
    let created = schedules.get("every3s").await.unwrap();
    let born = created.metadata.creation_timestamp.unwrap().0.as_second();
    // The first run taken, each change of the schedule within its 3 s on
    // time is another look at it, whose status still says no run was.
    wait_async("the first run", BOUND, || {
        let space = &space;
        async move { Ok(!scheduled(space, "every3s").await.0.is_empty()) }
    })
    .await
    .unwrap();
    for look in 0..3 {
        let touch = serde_json::json!({"metadata": {"labels": {"look": look.to_string()}}});
        schedules
            .patch("every3s", &PatchParams::default(), &Patch::Merge(touch))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (runs, _) = scheduled(&space, "every3s").await;
    let reasons = event_reasons(&space, "every3s").await;
    assert_eq!(
        runs.len(),
        1,
        "{:?} ({reasons:?})\n{}",
        runs.iter().map(|b| b.name_any()).collect::<Vec<_>>(),
        a.logs()
    );
    assert!(!reasons.iter().any(|r| r == "Skipped"), "{reasons:?}");
    // Three runs or more, every write of the status refused.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (runs, _) = scheduled(&space, "every3s").await;
    let slots = one_run_each(&runs, born, &a.logs());
    assert!(slots.len() >= 3, "{slots:?}\n{}", a.logs());
    assert!(
        schedules.get("every3s").await.unwrap().status.is_none(),
        "a status was written through the refusal"
    );
    assert!(a.logs().contains("status not written"), "{}", a.logs());
    // Written again once allowed; the runs go on, still one each.
    refusal.lift(&space).await;
    wait_async("the schedule's status written", BOUND, || {
        let schedules = schedules.clone();
        async move {
            let s = schedules.get("every3s").await?.status;
            Ok(s.is_some_and(|s| s.last_schedule_time.is_some()))
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (runs, _) = scheduled(&space, "every3s").await;
    let after = one_run_each(&runs, born, &a.logs());
    assert!(after.len() >= slots.len() + 2, "{after:?}");
    let reasons = event_reasons(&space, "every3s").await;
    for not in ["Missed", "Skipped"] {
        assert!(!reasons.iter().any(|r| r == not), "{reasons:?}");
    }
}

/// The scheduled times (seconds) of a 3-second schedule's `runs`, created
/// at second `born`: each run is named by and annotated with a time of the
/// schedule's, one backup each, and every time since `born` up to the
/// newest has its run.
fn one_run_each(runs: &[GroupBackup], born: i64, logs: &str) -> BTreeSet<i64> {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let names: Vec<String> = runs.iter().map(|b| b.name_any()).collect();
    let times = (born + 1..=now).filter(|t| t % 3 == 0).count();
    assert!(
        runs.len() <= times,
        "{} backups for {times} runs: {names:?}\n{logs}",
        runs.len()
    );
    let mut slots = BTreeSet::new();
    for b in runs {
        let at = b
            .annotations()
            .get("stillpoint.dev/scheduled-time")
            .unwrap_or_else(|| panic!("{} has no scheduled time", b.name_any()));
        let at: k8s_openapi::jiff::Timestamp = at.parse().unwrap();
        let name = format!("every3s-{}", at.strftime("%Y%m%d-%H%M%S"));
        assert_eq!(b.name_any(), name, "named by its scheduled time");
        assert_eq!(at.as_second() % 3, 0, "{at} is no time of the schedule");
        assert!(
            slots.insert(at.as_second()),
            "two backups of the run at {at}: {names:?}\n{logs}"
        );
    }
    let newest = slots.last().copied().unwrap_or(born);
    let due: BTreeSet<i64> = (born + 1..=newest).filter(|t| t % 3 == 0).collect();
    assert_eq!(slots, due, "a run was not taken\n{logs}");
    slots
}

/// The four StatefulSets of the shop (`<prefix>pg`, `<prefix>pg-replica`,
/// `<prefix>redis`, `<prefix>redis-replica`) as copies for a restore.
async fn shop_copies(space: &Space, prefix: &str, pg: Run) {
    let ns = &space.ns;
    space
        .apply(&sts_yaml(ns, &format!("{prefix}pg"), "postgres", None, pg))
        .await;
    for (name, engine) in [
        ("pg-replica", "postgres"),
        ("redis", "redis"),
        ("redis-replica", "redis"),
    ] {
        space
            .apply(&sts_yaml(
                ns,
                &format!("{prefix}{name}"),
                engine,
                None,
                Run::Copy,
            ))
            .await;
    }
}

/// Deletes the copies [`shop_copies`] made (their PVCs stay).
async fn remove_copies(space: &Space, prefix: &str) {
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(space.admin.clone(), &space.ns);
    for name in ["pg", "pg-replica", "redis", "redis-replica"] {
        sts.delete(
            &format!("{prefix}{name}"),
            &DeleteParams::default().grace_period(1),
        )
        .await
        .unwrap();
    }
}

/// Creates GroupRestore `name` with `spec` (YAML flow).
async fn start_restore(space: &Space, name: &str, spec: &str) {
    let ns = &space.ns;
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupRestore\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}"
        ))
        .await;
}

/// Waits until GroupRestore `name` is starting a stage.
async fn until_starting(space: &Space, name: &str) {
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(space.admin.clone(), &space.ns);
    wait_async(
        &format!("GroupRestore {name} starting a stage"),
        BOUND,
        || {
            let restores = restores.clone();
            async move {
                Ok(restores
                    .get(name)
                    .await?
                    .status
                    .is_some_and(|s| s.stages.iter().any(|st| st.phase == "Starting")))
            }
        },
    )
    .await
    .unwrap();
}

/// Creates GroupRestore `name` and waits for its final phase.
async fn restore(
    space: &Space,
    name: &str,
    spec: &str,
) -> stillpoint_controller::kube::crd::GroupRestore {
    use stillpoint_controller::kube::crd::GroupRestore;
    start_restore(space, name, spec).await;
    let api: Api<GroupRestore> = Api::namespaced(space.admin.clone(), &space.ns);
    let ended = wait_async(
        &format!("GroupRestore {name} to end"),
        Duration::from_secs(300),
        || {
            let api = api.clone();
            async move {
                Ok(api
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_final()))
            }
        },
    )
    .await;
    let r = api.get(name).await.unwrap();
    if let Err(e) = ended {
        panic!("{e}: {:#?}\n{}", r.status, pods_not_ready(space).await);
    }
    r
}

/// Each pod of `space` that is not Ready: its status and its containers'
/// last lines, for failure messages.
async fn pods_not_ready(space: &Space) -> String {
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &space.ns);
    let mut out = String::new();
    for p in pods.list(&ListParams::default()).await.unwrap().items {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            continue;
        }
        let name = p.name_any();
        out.push_str(&format!("--- pod {name} not Ready: {:?}\n", p.status));
        let containers = p.spec.iter().flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .map(|c| c.name.clone())
        });
        for c in containers {
            let log = space.lab.container_log(&space.ns, &name, &c);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!("  [{c}]\n"));
            for l in tail.into_iter().rev() {
                out.push_str(&format!("    {l}\n"));
            }
        }
    }
    out
}

/// When each pod of the namespace was first seen, and first seen Ready,
/// polled every 100 ms while the returned task runs.
type Sightings = std::sync::Arc<
    std::sync::Mutex<
        std::collections::BTreeMap<String, (std::time::Instant, Option<std::time::Instant>)>,
    >,
>;

fn watch_pods(space: &Space) -> (Sightings, tokio::task::JoinHandle<()>) {
    let seen: Sightings = Default::default();
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &space.ns);
    let record = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                let now = std::time::Instant::now();
                let mut seen = record.lock().unwrap();
                for p in list.items {
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    let entry = seen.entry(p.name_any()).or_insert((now, None));
                    if ready && entry.1.is_none() {
                        entry.1 = Some(now);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen, task)
}

/// The consistent-cut check on four running pods: Redis's chain is a
/// prefix of PostgreSQL's, each replica holds no more than its primary,
/// and every step acknowledged before the backup started is there.
/// Returns how many steps the PostgreSQL primary holds.
async fn check_cut(tag: &str, pods: [&str; 4], space: &Space, before: usize) -> usize {
    let [pg_p, pg_r, redis_p, redis_r] = pods;
    let redis_ids = |name: &str| {
        let name = name.to_string();
        async move {
            let pod = space.ready(&name).await;
            let ids: Vec<i32> = redis::cmd("LRANGE")
                .arg("chain")
                .arg(0)
                .arg(-1)
                .query_async(&mut redis_connect(&pod).await)
                .await
                .unwrap();
            ids.into_iter().collect::<BTreeSet<i32>>()
        }
    };
    let (pg_primary, pg_replica) = (chain_rows(space, pg_p).await, chain_rows(space, pg_r).await);
    let (redis_primary, redis_replica) = (redis_ids(redis_p).await, redis_ids(redis_r).await);
    let ahead: Vec<&i32> = redis_primary.difference(&pg_primary).take(5).collect();
    assert!(
        ahead.is_empty(),
        "{tag}: Redis holds steps PostgreSQL does not: {ahead:?}"
    );
    assert!(
        pg_replica.is_subset(&pg_primary),
        "{tag}: the PostgreSQL replica is ahead of its primary"
    );
    assert!(
        redis_replica.is_subset(&redis_primary),
        "{tag}: the Redis replica is ahead of its primary"
    );
    let expected: BTreeSet<i32> = (1..=before as i32).collect();
    assert!(
        expected.is_subset(&pg_primary),
        "{tag}: steps acknowledged before the backup are missing"
    );
    assert!(
        expected.is_subset(&redis_primary),
        "{tag}: Redis lacks steps acknowledged before the backup"
    );
    assert!(
        expected.is_subset(&pg_replica),
        "{tag}: the aligned PostgreSQL replica lacks acknowledged steps"
    );
    pg_primary.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_restores_bring_a_shop_back_stage_by_stage_and_a_stage_never_ready_holds_the_rest() {
    use stillpoint_controller::kube::crd::{RestorePhase, WorkloadRef};
    let space = Space::new("restore").await;
    let ns = space.ns.clone();
    let (pg0, redis0) = shop_statefulsets(&space, |yaml| yaml).await;
    let _controller = space.controller("restore-a", &format!("lease-{ns}")).await;
    space.protectable("shop", "True").await;
    let workload = Workload::start(&pg0, &redis0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A csi backup and a csi-group backup under the causal workload.
    let mut taken = Vec::new();
    for driver in ["csi", "csi-group"] {
        space.use_driver("shop", driver).await;
        let before = workload.acked();
        let b = space.backup(&format!("{driver}-1"), "shop").await;
        let s = status(&b);
        assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{s:?}");
        // Each member's workload is recorded for the restore.
        let pg = s.members.iter().find(|m| m.pod == "pg-replica-0").unwrap();
        assert_eq!(
            pg.workload,
            Some(WorkloadRef {
                kind: "StatefulSet".into(),
                name: "pg-replica".into()
            })
        );
        assert_eq!(pg.data_directory.as_deref(), Some("/data/pgdata"));
        taken.push((b, before));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    workload.stop().await;

    // Under new names from the csi backup: copies of the StatefulSets,
    // scaled up stage by stage.
    shop_copies(&space, "restored-", Run::Copy).await;
    let (seen, watcher) = watch_pods(&space);
    let r = restore(&space, "from-csi", "{backup: csi-1}").await;
    watcher.abort();
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    let mut pvcs = rs.pvcs.clone();
    pvcs.sort();
    assert_eq!(
        pvcs,
        [
            "data-restored-pg-0",
            "data-restored-pg-replica-0",
            "data-restored-redis-0",
            "data-restored-redis-replica-0"
        ]
    );
    let stages: Vec<(u32, &str, &str)> = rs
        .stages
        .iter()
        .map(|s| (s.stage, s.class.as_str(), s.phase.as_str()))
        .collect();
    assert_eq!(
        stages,
        [(2, "databases", "Ready"), (3, "messaging", "Ready")],
        "{rs:#?}"
    );
    // Stage by stage, primaries before their replicas: each pod appeared
    // only after every pod before it in the plan was Ready.
    {
        let seen = seen.lock().unwrap();
        let order = [
            "restored-pg-0",
            "restored-pg-replica-0",
            "restored-redis-0",
            "restored-redis-replica-0",
        ];
        for pair in order.windows(2) {
            let (earlier, later) = (&seen[pair[0]], &seen[pair[1]]);
            let ready = earlier
                .1
                .unwrap_or_else(|| panic!("{} never seen Ready", pair[0]));
            assert!(
                later.0 >= ready,
                "{} appeared before {} was Ready",
                pair[1],
                pair[0]
            );
        }
    }
    // The restored PostgreSQL servers hold what the backup recorded.
    let replica = rs.members.iter().find(|m| m.pod == "pg-replica-0").unwrap();
    assert!(
        replica
            .check
            .as_deref()
            .unwrap_or_default()
            .starts_with("ok:"),
        "{replica:?}"
    );
    assert!(
        replica
            .check
            .as_deref()
            .unwrap_or_default()
            .contains("not ahead of restored-pg-0"),
        "{replica:?}"
    );
    let primary = rs.members.iter().find(|m| m.pod == "pg-0").unwrap();
    assert!(
        primary
            .check
            .as_deref()
            .unwrap_or_default()
            .starts_with("ok:"),
        "{primary:?}"
    );
    let held_by_csi = check_cut(
        "from-csi",
        [
            "restored-pg-0",
            "restored-pg-replica-0",
            "restored-redis-0",
            "restored-redis-replica-0",
        ],
        &space,
        taken[0].1,
    )
    .await;
    // The copies go (their PVCs stay).
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(space.admin.clone(), &ns);
    remove_copies(&space, "restored-").await;

    // A stage that never becomes Ready holds the later ones, and says why.
    shop_copies(&space, "stuck-", Run::NeverReady).await;
    let r = restore(
        &space,
        "stuck",
        "{backup: csi-1, pvcPrefix: stuck-, stageTimeout: 8s}",
    )
    .await;
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Failed), "{rs:#?}");
    let completed = rs
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(completed.reason, "StageNotReady");
    let error = rs.error.clone().unwrap_or_default();
    assert!(
        error.contains("stuck-pg-0")
            && error.contains("not Ready")
            && error.contains("later stages 3 (messaging) were not started"),
        "{error}"
    );
    let phases: Vec<(u32, String)> = rs
        .stages
        .iter()
        .map(|s| (s.stage, s.phase.clone()))
        .collect();
    assert_eq!(phases, [(2, "Failed".to_string()), (3, "Held".to_string())]);
    for held in ["stuck-pg-replica", "stuck-redis", "stuck-redis-replica"] {
        let s = sts.get(held).await.unwrap();
        assert_eq!(s.spec.unwrap().replicas, Some(0), "{held} was not started");
    }
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &ns);
    for pod in [
        "stuck-pg-replica-0",
        "stuck-redis-0",
        "stuck-redis-replica-0",
    ] {
        assert!(
            pods.get_opt(pod).await.unwrap().is_none(),
            "{pod} must not run"
        );
    }
    let reasons = event_reasons(&space, "stuck").await;
    assert!(reasons.iter().any(|r| r == "StageNotReady"), "{reasons:?}");
    let (_, metrics) = _controller.get("/metrics").unwrap();
    let violations = metrics
        .lines()
        .find(|l| l.starts_with("stillpoint_restore_order_violations_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(violations >= 1.0, "{metrics}");
    remove_copies(&space, "stuck-").await;

    // Deleted while a stage waits, a restore stops where it is: the pod
    // it waits for becomes Ready after the deletion, and nothing later is
    // started.
    shop_copies(&space, "late-", Run::Slow).await;
    start_restore(&space, "late", "{backup: csi-1, pvcPrefix: late-}").await;
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(space.admin.clone(), &ns);
    until_starting(&space, "late").await;
    restores
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    space.ready("late-pg-0").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for held in ["late-pg-replica", "late-redis", "late-redis-replica"] {
        let s = sts.get(held).await.unwrap();
        assert_eq!(
            s.spec.unwrap().replicas,
            Some(0),
            "{held} started by a deleted restore"
        );
    }
    let logs = _controller.logs();
    assert!(
        logs.contains("GroupRestore deleted: stopped where it was"),
        "{logs}"
    );
    remove_copies(&space, "late-").await;

    // In place from the csi-group backup: the originals scaled to zero,
    // their PVCs replaced from the snapshots, and scaled up again.
    // By the CLI, which creates the GroupRestore and follows it.
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &space,
            &["restore", "csi-group-1", "--in-place", "--name", "in-place"],
        )
    });
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("GroupRestore in-place succeeded") && out.contains("RESTORED AS"),
        "{out}"
    );
    assert!(err.contains("stage 2 (databases): Ready"), "{err}");
    let r =
        Api::<stillpoint_controller::kube::crd::GroupRestore>::namespaced(space.admin.clone(), &ns)
            .get("in-place")
            .await
            .unwrap();
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(space.admin.clone(), &ns);
    for claim in [
        "data-pg-0",
        "data-pg-replica-0",
        "data-redis-0",
        "data-redis-replica-0",
    ] {
        let c = claims.get(claim).await.unwrap();
        assert_eq!(
            c.labels().get("stillpoint.dev/restore").map(String::as_str),
            Some("in-place"),
            "{claim}"
        );
    }
    let held_by_group = check_cut(
        "in-place",
        ["pg-0", "pg-replica-0", "redis-0", "redis-replica-0"],
        &space,
        taken[1].1,
    )
    .await;
    assert!(held_by_csi < held_by_group, "the second backup holds more");

    // The same name again, from the older backup: the PVCs the first
    // restore made are not this one's, so they are replaced too, and the
    // shop holds the older backup's data.
    let uid_before = claims.get("data-pg-0").await.unwrap().uid();
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(space.admin.clone(), &ns);
    restores
        .delete("in-place", &DeleteParams::default())
        .await
        .unwrap();
    wait_async("GroupRestore in-place gone", BOUND, || {
        let restores = restores.clone();
        async move { Ok(restores.get_opt("in-place").await?.is_none()) }
    })
    .await
    .unwrap();
    let r = restore(&space, "in-place", "{backup: csi-1, inPlace: true}").await;
    let rs = r.status.clone().unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    let pvc = claims.get("data-pg-0").await.unwrap();
    assert_ne!(pvc.uid(), uid_before, "data-pg-0 was replaced");
    assert_eq!(rs.pvc_uids.get("data-pg-0"), pvc.uid().as_ref());
    let held = check_cut(
        "in-place again",
        ["pg-0", "pg-replica-0", "redis-0", "redis-replica-0"],
        &space,
        taken[0].1,
    )
    .await;
    assert_eq!(
        held, held_by_csi,
        "the re-created restore holds the older backup's data"
    );
}

/// A Redis Deployment `name` (one pod) with its agent, on PVC `claim`.
fn redis_deployment(ns: &str, name: &str, claim: &str, replicas: u32) -> String {
    redis_deployment_after(ns, name, claim, replicas, 0)
}

/// The same, its Redis starting `delay` seconds after its container.
fn redis_deployment_after(ns: &str, name: &str, claim: &str, replicas: u32, delay: u32) -> String {
    let agent = template_agent("redis", "redis://127.0.0.1:6379");
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  strategy: {{type: Recreate}}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      serviceAccountName: redis
      terminationGracePeriodSeconds: 5
      containers:
      - name: redis
        image: redis:7
        command: [sh, -c, "sleep {delay} && exec redis-server --port 6379 --dir /data --appendonly yes --save '' --protected-mode no"]
        readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
{agent}      volumes:
      - {{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}
      - {{name: agent-tls, secret: {{secretName: agent-redis}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_restore_scales_up_a_deployments_copy_on_its_restored_claim() {
    use stillpoint_controller::kube::crd::{RestorePhase, WorkloadRef};
    let space = Space::new("deploy").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-cache", None).await;
    space
        .apply(&redis_deployment(&ns, "cache", "data-cache", 1))
        .await;
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &ns);
    let ready_pod = |app: &'static str| {
        let pods = pods.clone();
        async move {
            let found = std::sync::Arc::new(std::sync::Mutex::new(None));
            let slot = found.clone();
            wait_async(&format!("a Ready pod of {app}"), BOUND, || {
                let (pods, slot) = (pods.clone(), slot.clone());
                async move {
                    let list = pods
                        .list(&ListParams::default().labels(&format!("app={app}")))
                        .await?;
                    let ready = list.items.into_iter().find(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    });
                    let ok = ready.is_some();
                    *slot.lock().unwrap() = ready;
                    Ok(ok)
                }
            })
            .await
            .unwrap();
            found.lock().unwrap().clone().unwrap()
        }
    };
    let cache = ready_pod("cache").await;
    let mut c = redis_connect(&cache).await;
    let _: () = redis::cmd("SET")
        .arg("acked")
        .arg("before the backup")
        .query_async(&mut c)
        .await
        .unwrap();
    space
        .apply(&group_yaml(
            &ns,
            "cache",
            "csi",
            "  - {name: cache, selector: {matchLabels: {app: cache}}}\n",
        ))
        .await;
    let mut _controller = space.controller("deploy-a", &format!("lease-{ns}")).await;
    space.protectable("cache", "True").await;
    let b = space.backup("cache-1", "cache").await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{s:?}");
    assert_eq!(
        s.members[0].workload,
        Some(WorkloadRef {
            kind: "Deployment".into(),
            name: "cache".into()
        }),
        "found through its ReplicaSet"
    );
    // The copy mounts the restored claim; the restore scales it to one pod.
    space
        .apply(&redis_deployment(
            &ns,
            "restored-cache",
            "restored-data-cache",
            0,
        ))
        .await;
    let r = restore(&space, "cache-back", "{backup: cache-1}").await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    assert_eq!(rs.pvcs, ["restored-data-cache"]);
    let restored = ready_pod("restored-cache").await;
    let value: String = redis::cmd("GET")
        .arg("acked")
        .query_async(&mut redis_connect(&restored).await)
        .await
        .unwrap();
    assert_eq!(value, "before the backup");
    // An in-place restore deleted while it waits for the original's pod
    // to go (held here by a finalizer) stops there: the original PVC is
    // never replaced.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(space.admin.clone(), &ns);
    let original = claims.get("data-cache").await.unwrap().uid();
    let held = ready_pod("cache").await.name_any();
    let hold = |on: bool| serde_json::json!({"metadata": {"finalizers": if on { vec!["stillpoint.dev/test-hold"] } else { vec![] }}});
    pods.patch(&held, &PatchParams::default(), &Patch::Merge(hold(true)))
        .await
        .unwrap();
    start_restore(&space, "cancelled", "{backup: cache-1, inPlace: true}").await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(space.admin.clone(), &ns);
    wait_async("the restore scaling cache down", BOUND, || {
        let deployments = deployments.clone();
        async move {
            Ok(deployments
                .get("cache")
                .await?
                .spec
                .and_then(|s| s.replicas)
                == Some(0))
        }
    })
    .await
    .unwrap();
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(space.admin.clone(), &ns);
    restores
        .delete("cancelled", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pods.patch(&held, &PatchParams::default(), &Patch::Merge(hold(false)))
        .await
        .unwrap();
    wait_async("the held pod gone", BOUND, || {
        let (pods, held) = (pods.clone(), held.clone());
        async move { Ok(pods.get_opt(&held).await?.is_none()) }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let claim = claims.get("data-cache").await.unwrap();
    assert_eq!(
        claim.uid(),
        original,
        "a deleted restore replaced the original PVC"
    );
    assert!(claim.metadata.deletion_timestamp.is_none());
    let logs = _controller.logs();
    assert!(
        logs.contains("GroupRestore deleted: stopped where it was"),
        "{logs}"
    );

    // A copy that does not mount the restored claim is refused up front.
    space
        .apply(&redis_deployment(&ns, "other-cache", "data-cache", 0))
        .await;
    let r = restore(&space, "mismatch", "{backup: cache-1, pvcPrefix: other-}").await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Failed));
    let error = rs.error.unwrap_or_default();
    assert!(
        error.contains("Deployment/other-cache would not mount PVC other-data-cache"),
        "{error}"
    );
    assert!(rs.pvcs.is_empty(), "nothing made");

    // A restore whose controller dies mid-stage is taken up by the next
    // leader and finished.
    space
        .apply(&redis_deployment_after(
            &ns,
            "again-cache",
            "again-data-cache",
            0,
            8,
        ))
        .await;
    start_restore(&space, "again", "{backup: cache-1, pvcPrefix: again-}").await;
    until_starting(&space, "again").await;
    _controller.kill();
    let mut next = space.controller("deploy-b", &format!("lease-{ns}")).await;
    let r = restore(&space, "again", "{backup: cache-1, pvcPrefix: again-}").await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Succeeded), "{rs:#?}");
    assert_eq!(rs.pvcs, ["again-data-cache"]);
    let notes = event_reasons(&space, "again").await;
    assert!(
        notes.iter().filter(|r| *r == "Restoring").count() >= 2,
        "{notes:?}"
    );
    let restored = ready_pod("again-cache").await;
    let value: String = redis::cmd("GET")
        .arg("acked")
        .query_async(&mut redis_connect(&restored).await)
        .await
        .unwrap();
    assert_eq!(value, "before the backup");

    // A restore taken up again after its backup was deleted and made again
    // under its name: its status (from the API) was planned from the other
    // backup. It fails saying so, and the controller goes on.
    next.kill();
    space
        .apply(&redis_deployment(
            &ns,
            "resumed-cache",
            "resumed-data-cache",
            0,
        ))
        .await;
    start_restore(&space, "resumed", "{backup: cache-1, pvcPrefix: resumed-}").await;
    let restores: Api<stillpoint_controller::kube::crd::GroupRestore> =
        Api::namespaced(space.admin.clone(), &ns);
    let planned_elsewhere = serde_json::json!({"status": {
        "phase": "Restoring",
        "backupUid": "00000000-0000-0000-0000-000000000000",
        "stage": 3,
        "stages": [{"stage": 3, "class": "caches", "phase": "Waiting", "members": ["cache-0"]}],
        "members": [{"pod": "cache-0", "stage": 3, "phase": "Pending"}],
    }});
    restores
        .patch_status(
            "resumed",
            &PatchParams::default(),
            &Patch::Merge(planned_elsewhere),
        )
        .await
        .unwrap();
    let mut last = space.controller("deploy-c", &format!("lease-{ns}")).await;
    let r = restore(&space, "resumed", "{backup: cache-1, pvcPrefix: resumed-}").await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Failed), "{rs:#?}");
    let completed = rs
        .conditions
        .iter()
        .find(|c| c.type_ == "Completed")
        .unwrap();
    assert_eq!(completed.reason, "BackupReplaced", "{completed:?}");
    assert!(rs.pvcs.is_empty(), "nothing made: {rs:#?}");
    assert!(last.running(), "the controller goes on:\n{}", last.logs());
    assert!(!last.logs().contains("panicked"), "{}", last.logs());
}

/// Storage that fails a cut at first (busy for a moment, or the snapshot
/// controller's own write conflicts) sets the snapshot's `status.error` and
/// the sidecars retry: a backup waits for the retry within its freeze
/// budget instead of failing on the first error it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_the_storage_fails_at_first_is_waited_for_not_failed() {
    let space = Space::new("flaky").await;
    let ns = space.ns.clone();
    space.identity("redis").await;
    space.pvc("data-redis-a", None).await;
    let redis = RedisPod::with_agent("redis-a", "ra");
    space.apply(&redis.yaml(&ns)).await;
    space.ready("redis-a").await;
    let class = format!("flaky-{ns}");
    space
        .atomic_classes(&class, "{mode: atomic, failFirst: \"2\"}")
        .await;
    let _controller = space.controller("flaky-a", &format!("lease-{ns}")).await;
    for snapshotter in ["csi", "csi-group"] {
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {snapshotter}, namespace: {ns}}}\n\
                 spec:\n  members: [{{name: cache, selector: {{matchLabels: {{app: ra}}}}}}]\n  \
                 snapshot: {{driver: {snapshotter}, volumeSnapshotClassName: {class}, volumeGroupSnapshotClassName: {class}}}\n  \
                 freezeBudget: 20s\n"
            ))
            .await;
        let (reason, message) = space.protectable(snapshotter, "True").await;
        assert_eq!(reason, "Ready", "{message}");
        let name = format!("{snapshotter}-1");
        let b = space.backup(&name, snapshotter).await;
        let s = status(&b);
        assert_eq!(s.phase, Some(BackupPhase::Succeeded), "{name}: {s:?}");
        assert!(s.members.iter().all(|m| !m.volume_snapshots.is_empty()));
    }
}

/// A controller that starts over many GroupBackups (a first list of about a
/// second, so every reconcile waits for the cache at once) reconciles its
/// groups, its old backups and a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_started_over_a_thousand_backups_reconciles_every_group_and_backup() {
    use futures_util::{StreamExt, TryStreamExt, stream};
    let space = Space::new("many").await;
    let ns = space.ns.clone();
    let groups = ["g0", "g1", "g2", "g3"];
    for g in groups {
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {g}, namespace: {ns}}}\n\
                 spec: {{members: [{{name: db, selector: {{matchLabels: {{app: {g}}}}}}}], snapshot: {{driver: csi}}}}"
            ))
            .await;
    }
    let count = 1000;
    let api = space.backups();
    stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let g = groups[i % groups.len()];
            async move {
                let name = format!("{g}-b{i:04}");
                let backup: GroupBackup = serde_json::from_value(serde_json::json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupBackup",
                    "metadata": {"name": name}, "spec": {"group": g},
                }))?;
                api.create(&Default::default(), &backup).await?;
                let status = serde_json::json!({
                    "apiVersion": "stillpoint.dev/v1alpha1", "kind": "GroupBackup",
                    "status": {"phase": "Succeeded", "backupId": name,
                        "completionTime": format!("2026-01-01T00:{:02}:{:02}.000000Z", i / 60 % 60, i % 60)},
                });
                api.patch_status(&name, &PatchParams::apply("tests").force(), &Patch::Apply(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    // The deployed Lease timings, not the lab's short ones: under the
    // suite's load a renewal missed the lab's 4 s deadline while this
    // controller started over the 1,000, and it stopped, as it must.
    let controller = ControllerProc::start_with(
        space.lab,
        space.installed,
        &ns,
        "many-a",
        "many-lease",
        &[
            "--lease-duration",
            "15s",
            "--renew-deadline",
            "10s",
            "--retry-period",
            "2s",
        ],
    )
    .await
    .unwrap();
    // Each group's newest successful backup, as the cache sees them.
    let newest = |g: &str| {
        (0..count)
            .filter(|i| groups[i % groups.len()] == g)
            .max_by_key(|i| (i / 60 % 60, i % 60))
            .map(|i| format!("{g}-b{i:04}"))
    };
    let groups_api = space.groups();
    wait_async("every group reconciled", BOUND, || {
        let groups_api = groups_api.clone();
        async move {
            let listed = groups_api.list(&ListParams::default()).await?;
            Ok(listed.items.iter().all(|g| {
                let status = g.status.as_ref();
                status.and_then(|s| s.observed_generation) == g.metadata.generation
                    && status.and_then(|s| s.last_successful_backup.clone())
                        == newest(&g.name_any())
            }))
        }
    })
    .await
    .unwrap_or_else(|e| {
        let logs = controller.logs();
        let tail: Vec<&str> = logs.lines().rev().take(30).collect();
        panic!(
            "{e}: the controller's last lines (newest first):\n{}",
            tail.join("\n")
        )
    });
    // A new backup is taken up (the group has no pods: it fails, and says
    // so). It waits behind the startup's reconciles of the 1,000 (each
    // gets its finalizer and its content): 13 s on a quiet machine, over
    // 120 s in one suite run beside another lab test, so the bound here is
    // that the backup is taken up at all, not how soon.
    let ns = &space.ns;
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: fresh, namespace: {ns}}}\n\
             spec: {{group: g0}}"
        ))
        .await;
    let fresh = space
        .finished_within("fresh", Duration::from_secs(400))
        .await;
    let status = fresh.status.unwrap();
    assert_eq!(status.phase, Some(BackupPhase::Failed), "{status:?}");
}

/// Every YAML example of the book and of `deploy/examples/` is accepted by
/// the API server with the CRDs installed (a server-side dry run with
/// strict field validation, in this test's namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_yaml_example_in_the_docs_and_deploy_is_accepted_by_the_api_server() {
    let space = Space::new("docs").await;
    let mut examples = stillpoint_tests::docs::yaml_examples();
    let dir = stillpoint_tests::docs::book().join("../deploy/examples");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if !value.is_null() {
                examples.push((path.display().to_string(), value));
            }
        }
    }
    assert!(examples.len() >= 10, "{} examples", examples.len());
    for (at, mut value) in examples {
        value["metadata"]["namespace"] = serde_json::json!(space.ns);
        let yaml = serde_yaml::to_string(&value).unwrap();
        if let Err(e) = space.lab.validate_yaml(&space.admin, &yaml).await {
            panic!("{at}: the API server refuses {}: {e:#}", value["kind"]);
        }
    }
}

/// The lab's leader election (harness `stillpoint.rs`): the leader stops
/// acting when it could not renew for `RENEW_DEADLINE`; a standby takes a
/// Lease it saw unchanged for `LEASE_DURATION`.
const RENEW_DEADLINE: Duration = Duration::from_secs(4);
const LEASE_DURATION: Duration = Duration::from_secs(6);

/// Redis pod `pod` (label `app: <app>`) with its agent in group `held`, and
/// controllers `<name>-a`, leading through a gate, and `<name>-b`, once
/// the group is Protectable.
async fn held_behind_gate(
    space: &Space,
    [pod, app]: [&str; 2],
    name: &str,
) -> (
    Pod,
    stillpoint_tests::harness::kube::gate::Gate,
    (ControllerProc, ControllerProc),
) {
    let ns = &space.ns;
    space.identity("redis").await;
    space.pvc(&format!("data-{pod}"), None).await;
    space.apply(&RedisPod::with_agent(pod, app).yaml(ns)).await;
    let redis = space.ready(pod).await;
    let member = format!("  - {{name: cache, selector: {{matchLabels: {{app: {app}}}}}}}\n");
    space.apply(&group_yaml(ns, "held", "csi", &member)).await;
    let gate = stillpoint_tests::harness::kube::gate::Gate::start(space.lab.api_address())
        .await
        .unwrap();
    let controllers = leader_behind(space, &gate, name).await;
    space.protectable("held", "True").await;
    (redis, gate, controllers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_api_server_thaws_within_its_renew_deadline_before_another_leads()
{
    use stillpoint_controller::kube::crd::QuiescePhase;
    let space = Space::new("partition").await;
    let ns = space.ns.clone();
    let (redis, gate, (mut a, b)) = held_behind_gate(&space, ["redis-p", "rp"], "cut").await;
    let lease = format!("lease-{ns}");
    // The leader holds the group frozen: a write waits.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: q, namespace: {ns}}}\n\
             spec: {{group: held, duration: 10m}}"
        ))
        .await;
    quiesce_phase(&space, "q", QuiescePhase::Frozen).await;
    let mut cache = redis_connect(&redis).await;
    let write = tokio::spawn(async move {
        let _: () = redis::cmd("SET")
            .arg("after")
            .arg("cut")
            .query_async(&mut cache)
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!write.is_finished(), "the write went through the freeze");

    // Partitioned from the API server: its requests hang.
    let cut = std::time::Instant::now();
    gate.cut();
    let (mut thawed, mut b_leads) = (None, None);
    while b_leads.is_none() && cut.elapsed() < BOUND {
        if thawed.is_none() && write.is_finished() {
            thawed = Some(cut.elapsed());
        }
        let ready = tokio::task::block_in_place(|| b.get("/readyz"));
        if ready.is_ok_and(|(code, _)| code == 200) {
            b_leads = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = a.logs();
    let thawed = thawed.unwrap_or_else(|| panic!("never thawed:\n{logs}"));
    let b_leads = b_leads.unwrap_or_else(|| panic!("the standby never led:\n{}", b.logs()));
    assert!(
        logs.contains("no renewal within the renew deadline"),
        "{logs}"
    );
    // Its last renewal was at most the cut: it stopped acting and thawed
    // by its renew deadline after that, within the Lease's remainder.
    assert!(
        thawed <= LEASE_DURATION,
        "thawed {thawed:?} after the cut, past the Lease ({LEASE_DURATION:?}; renew deadline \
         {RENEW_DEADLINE:?}):\n{logs}"
    );
    assert!(
        thawed < b_leads,
        "the standby led at {b_leads:?}, before the cut-off leader thawed at {thawed:?}"
    );
    assert!(
        b_leads >= RENEW_DEADLINE,
        "the standby led {b_leads:?} after the cut: the Lease was still being renewed"
    );
    gate.heal();
    let ends = std::time::Instant::now();
    while a.running() {
        assert!(
            ends.elapsed() < BOUND,
            "the cut-off leader's process never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lease_holder(&space, &lease).await.as_deref(), Some("cut-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_renewed_by_a_clock_hours_behind_is_never_taken_while_it_changes() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use stillpoint_controller::kube::leader::{LeaderLease, Timing};
    let space = Space::new("skew").await;
    let leases: Api<Lease> = Api::namespaced(space.admin.clone(), stillpoint::CONTROLLER_NS);
    let name = format!("lease-{}", space.ns);
    let timing = Timing {
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: Duration::from_secs(1),
    };
    // The holder's clock is two hours behind: every renewTime it writes
    // is long past by ours, yet it renews every 500 ms.
    let behind = |n: i32| {
        let at =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(2);
        serde_json::from_value::<Lease>(serde_json::json!({"metadata": {"name": name}})).map(
            |mut l| {
                l.spec = Some(LeaseSpec {
                    holder_identity: Some("behind".into()),
                    lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                    renew_time: Some(MicroTime(at)),
                    lease_transitions: Some(n),
                    ..Default::default()
                });
                l
            },
        )
    };
    leases
        .create(&Default::default(), &behind(0).unwrap())
        .await
        .unwrap();
    let standby = LeaderLease::new(leases.clone(), &name, "standby", timing);
    let started = std::time::Instant::now();
    let mut renewals = 0;
    while started.elapsed() < LEASE_DURATION * 3 {
        let mut l = leases.get(&name).await.unwrap();
        l.spec = behind(renewals).unwrap().spec;
        leases
            .replace(&name, &Default::default(), &l)
            .await
            .unwrap();
        renewals += 1;
        assert!(
            !standby.try_acquire().await.unwrap(),
            "taken {:?} into a live holder's renewals",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The holder stops renewing: taken once it stood still for the
    // Lease's duration as the standby saw it.
    let stood = std::time::Instant::now();
    wait_async("the standby takes the Lease", BOUND, || {
        let standby = &standby;
        async move { Ok(standby.try_acquire().await?) }
    })
    .await
    .unwrap();
    assert!(
        stood.elapsed() >= LEASE_DURATION - Duration::from_millis(600),
        "taken {:?} after the last renewal",
        stood.elapsed()
    );
    assert_eq!(
        lease_holder(&space, &name).await.as_deref(),
        Some("standby")
    );
}

/// The controller pods of a lab running `deploy/controller.yaml`, by name:
/// whether each is Ready.
async fn controller_pods(admin: &::kube::Client) -> BTreeMap<String, bool> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), stillpoint::CONTROLLER_NS);
    let listed = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=stillpoint-controller"))
        .await
        .unwrap();
    listed
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            (p.name_any(), ready)
        })
        .collect()
}

/// The holder of the deployed controller's Lease.
async fn deployed_leader(admin: &::kube::Client) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), stillpoint::CONTROLLER_NS);
    leases
        .get_opt("stillpoint-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

/// A lab of its own (the deployed controller watches every namespace)
/// with `deploy/` applied, webhook and controller included; returns once
/// one replica leads and is Ready and the other waits, alive but not
/// Ready, with the leader's pod name.
async fn deployed() -> (&'static KubeLab, SecondLab, ::kube::Client, String) {
    let other: &'static KubeLab = Box::leak(Box::new(
        tokio::task::block_in_place(KubeLab::start).unwrap(),
    ));
    let down = SecondLab(other);
    stillpoint::apply_deploy(other).await.unwrap();
    let admin = other.admin().await.unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["deploy/webhook.yaml", "deploy/controller.yaml"] {
        let yaml = std::fs::read_to_string(repo.join(file)).unwrap();
        stillpoint::apply_all(other, &admin, &yaml).await.unwrap();
    }
    let leader = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    wait_async("one deployed replica leads, the other waits", BOUND, || {
        let (admin, leader) = (&admin, leader.clone());
        async move {
            let pods = controller_pods(admin).await;
            let holder = deployed_leader(admin).await.unwrap_or_default();
            let ready: Vec<&String> = pods.iter().filter(|(_, r)| **r).map(|(n, _)| n).collect();
            *leader.lock().unwrap() = holder.clone();
            Ok(pods.len() == 2 && ready == [&holder])
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            other.container_log(stillpoint::CONTROLLER_NS, "", "controller")
        )
    });
    let leader = leader.lock().unwrap().clone();
    (other, down, admin, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_as_deployed_leads_from_one_replica_and_a_partitioned_leader_hands_over() {
    // Two replicas from the manifest: one leads and is Ready, the other
    // waits, alive but not Ready.
    let (other, _down, admin, first) = deployed().await;
    let log = |pod: &str| other.container_log(stillpoint::CONTROLLER_NS, pod, "controller");

    // The leader cut off from the API server: it stops within its renew
    // deadline (10 s as deployed), and the other replica takes the Lease
    // only once it saw it unchanged for the Lease's duration (15 s).
    let cut = std::time::Instant::now();
    let partition = other
        .cut_from_api(stillpoint::CONTROLLER_NS, &first)
        .await
        .unwrap();
    let second = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    wait_async("the other replica leads", BOUND, || {
        let (admin, second, first) = (&admin, second.clone(), first.clone());
        async move {
            let holder = deployed_leader(admin).await.unwrap_or_default();
            *second.lock().unwrap() = holder.clone();
            Ok(!holder.is_empty() && holder != first)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", log(&first)));
    let second = second.lock().unwrap().clone();
    // The cut-off leader stopped (its log, this machine's clock) before
    // the other took the Lease (its acquireTime, the same clock).
    let stopped = stopped_leading_at(&log(&first))
        .unwrap_or_else(|| panic!("the cut-off leader never stopped:\n{}", log(&first)));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(admin.clone(), stillpoint::CONTROLLER_NS);
    let acquired = leases
        .get("stillpoint-controller")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.acquire_time)
        .unwrap()
        .0;
    assert!(
        stopped < acquired,
        "{second} took the Lease at {acquired} before the cut-off leader stopped at {stopped}"
    );
    assert!(
        cut.elapsed() >= Duration::from_secs(15 - 2),
        "the Lease changed hands {:?} after the cut, within its duration (15 s) of the last \
         renewal (at most a retry period, 2 s, before the cut)",
        cut.elapsed()
    );
    wait_async("only the new leader Ready", BOUND, || {
        let (admin, second) = (&admin, second.clone());
        async move {
            let pods = controller_pods(admin).await;
            let ready: Vec<&String> = pods.iter().filter(|(_, r)| **r).map(|(n, _)| n).collect();
            Ok(ready == [&second])
        }
    })
    .await
    .unwrap();

    // Healed, the old leader waits as the standby.
    partition.heal();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        deployed_leader(&admin).await.as_deref(),
        Some(second.as_str())
    );
    assert_eq!(controller_pods(&admin).await.get(&first), Some(&false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_while_it_records_a_quiesce_thaws_it_before_another_leads() {
    use stillpoint_controller::kube::crd::QuiescePhase;
    let space = Space::new("recording").await;
    let ns = space.ns.clone();
    let (redis, gate, (_a, b)) = held_behind_gate(&space, ["redis-w", "rw"], "rec").await;

    // The server stopped: the leader's freeze waits on it.
    space
        .lab
        .signal_container(&ns, "redis-w", "redis", "STOP")
        .await
        .unwrap();
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: q, namespace: {ns}}}\n\
             spec: {{group: held, duration: 10m}}"
        ))
        .await;
    wait_async("the freeze requested", BOUND, || {
        let (lab, ns) = (space.lab, &ns);
        async move {
            let log = lab.container_log(ns, "redis-w", "stillpoint-agent");
            Ok(log.contains("freeze requested backup_id=GroupQuiesce:"))
        }
    })
    .await
    .unwrap();
    // Cut off from the API server mid-freeze; the freeze then completes,
    // and the leader cannot record it.
    let cut = std::time::Instant::now();
    gate.cut();
    space
        .lab
        .signal_container(&ns, "redis-w", "redis", "CONT")
        .await
        .unwrap();
    let write = write_when_thawed(&redis);
    let mut b_leads = None;
    while b_leads.is_none() && cut.elapsed() < BOUND {
        let ready = tokio::task::block_in_place(|| b.get("/readyz"));
        if ready.is_ok_and(|(code, _)| code == 200) {
            b_leads = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_leads = b_leads.expect("the standby leads");
    assert!(
        write.is_finished(),
        "still frozen when the standby led ({b_leads:?} after the cut)"
    );
    let thawed = write.await.unwrap().duration_since(cut);
    assert!(
        thawed <= LEASE_DURATION,
        "thawed {thawed:?} after the cut, past the Lease ({LEASE_DURATION:?})"
    );
    let takeovers = tokio::task::block_in_place(|| {
        agent_metric(&redis, "stillpoint_agent_hold_takeovers_total")
    });
    assert_eq!(takeovers, 0.0, "a hold was taken over");
    // Never recorded as held, the quiesce is still asked for: the new
    // leader holds it.
    let run_by =
        |q: stillpoint_controller::kube::crd::GroupQuiesce| q.status.and_then(|s| s.run_by);
    let q = quiesce_phase(&space, "q", QuiescePhase::Frozen).await;
    assert_eq!(run_by(q).as_deref(), Some("rec-b"));
    // Healed, the old leader's status write, held by the partition until
    // now, arrives late: it is refused, not applied over the new leader's.
    gate.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let q = quiesce_phase(&space, "q", QuiescePhase::Frozen).await;
    assert_eq!(run_by(q).as_deref(), Some("rec-b"), "a late write won");
    let quiesces: Api<stillpoint_controller::kube::crd::GroupQuiesce> =
        Api::namespaced(space.admin.clone(), &ns);
    quiesces
        .delete("q", &DeleteParams::default())
        .await
        .unwrap();
    assert!(writes(&redis, Duration::from_secs(10)).await);
}

/// The message of a write refused as a conflict (409), if it was.
fn conflict<T>(result: &Result<T, ::kube::Error>) -> Option<&str> {
    match result {
        Err(::kube::Error::Api(e)) if e.code == 409 => Some(&e.message),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_write_delivered_after_another_write_is_refused() {
    use stillpoint_controller::kube::crd::{GroupQuiesce, GroupQuiesceStatus, QuiescePhase};
    use stillpoint_controller::kube::store::apply_status_at;
    let space = Space::new("stale").await;
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: q, namespace: {ns}}}\n\
             spec: {{group: none, duration: 1m}}"
        ))
        .await;
    let api: Api<GroupQuiesce> = Api::namespaced(space.admin.clone(), &ns);
    let seen = api.get("q").await.unwrap().resource_version().unwrap();
    let status = |by: &str| GroupQuiesceStatus {
        phase: Some(QuiescePhase::Frozen),
        run_by: Some(by.into()),
        ..Default::default()
    };
    // One replica writes at the version it saw; another's write at that
    // same version, delivered later, is refused.
    apply_status_at(&api, "q", "GroupQuiesce", &seen, &status("new"))
        .await
        .unwrap();
    let late = apply_status_at(&api, "q", "GroupQuiesce", &seen, &status("old")).await;
    assert!(conflict(&late).is_some(), "{late:?}");
    let q = api.get("q").await.unwrap();
    assert_eq!(q.status.and_then(|s| s.run_by).as_deref(), Some("new"));
}

/// A GroupBackup's status is written only over the status its writer last
/// saw: a deposed leader's write, delivered after the new leader failed
/// the backup, is refused; so is one from a view older than the status;
/// a change of labels in between is not a reason to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backups_status_write_over_a_status_it_did_not_see_is_refused() {
    use stillpoint_controller::kube::crd::{BackupPhase, GroupBackup};
    use stillpoint_controller::kube::store::StatusWriter;
    let space = Space::new("stale-backup").await;
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: b, namespace: {ns}}}\n\
             spec: {{group: none}}"
        ))
        .await;
    let api: Api<GroupBackup> = Api::namespaced(space.admin.clone(), &ns);
    let phase = async || api.get("b").await.unwrap().status.and_then(|s| s.phase);
    // The first leader runs it.
    let old = StatusWriter::new(space.admin.clone(), &api.get("b").await.unwrap());
    old.update(|s| {
        s.phase = Some(BackupPhase::Running);
        s.run_by = Some("old".into());
    })
    .await
    .unwrap();
    let running = api.get("b").await.unwrap();
    // A label added meanwhile: the status is still the one it wrote.
    let label = serde_json::json!({"metadata": {"labels": {"team": "a"}}});
    api.patch("b", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    old.update(|s| s.freeze_window = Some("1ms".into()))
        .await
        .unwrap();
    // The next leader fails it (the first one's partition).
    let new = StatusWriter::new(space.admin.clone(), &api.get("b").await.unwrap());
    new.update(|s| s.phase = Some(BackupPhase::Failed))
        .await
        .unwrap();
    // The first leader's write, delayed until now, is refused.
    let late = old.update(|s| s.phase = Some(BackupPhase::Succeeded)).await;
    assert!(conflict(&late).is_some(), "{late:?}");
    assert_eq!(phase().await, Some(BackupPhase::Failed), "a late write won");
    // A view from before the new leader's write: refused as well.
    let stale = StatusWriter::new(space.admin.clone(), &running);
    let from_cache = stale.update(|s| s.phase = Some(BackupPhase::Failed)).await;
    assert!(conflict(&from_cache).is_some(), "{from_cache:?}");
    assert_eq!(phase().await, Some(BackupPhase::Failed));
}

/// A GroupRestore's status is written through the same fence as a
/// backup's (the restore's run writes with a `Fence` made when it began):
/// a change of labels in between is written over; the run's write after
/// another replica's is refused, and so is one from a view older than the
/// status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restores_status_write_over_a_status_it_did_not_see_is_refused() {
    use stillpoint_controller::kube::crd::{GroupRestore, GroupRestoreStatus, RestorePhase};
    use stillpoint_controller::kube::store::Fence;
    let space = Space::new("stale-restore").await;
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupRestore\nmetadata: {{name: r, namespace: {ns}}}\n\
             spec: {{backup: none}}"
        ))
        .await;
    let api: Api<GroupRestore> = Api::namespaced(space.admin.clone(), &ns);
    let phase = async || api.get("r").await.unwrap().status.and_then(|s| s.phase);
    let fence_of =
        |r: &GroupRestore| Fence::new(r.metadata.resource_version.clone(), r.status.clone());
    let write = async |fence: &mut Fence<GroupRestoreStatus>, phase: RestorePhase, note: &str| {
        let status = GroupRestoreStatus {
            phase: Some(phase),
            error: Some(note.into()),
            ..Default::default()
        };
        fence
            .apply(&api, "r", "GroupRestore", &status, |r| r.status)
            .await
    };
    // The first leader's run begins.
    let mut old = fence_of(&api.get("r").await.unwrap());
    write(&mut old, RestorePhase::Restoring, "old")
        .await
        .unwrap();
    let restoring = api.get("r").await.unwrap();
    let label = serde_json::json!({"metadata": {"labels": {"team": "a"}}});
    api.patch("r", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    write(&mut old, RestorePhase::Restoring, "old, stage 1")
        .await
        .unwrap();
    // The next leader fails it.
    let mut new = fence_of(&api.get("r").await.unwrap());
    write(&mut new, RestorePhase::Failed, "new").await.unwrap();
    // The first leader's write, delayed until now, is refused.
    let late = write(&mut old, RestorePhase::Succeeded, "old, done").await;
    assert!(
        conflict(&late).is_some_and(|m| m.contains("GroupRestore r")),
        "{late:?}"
    );
    assert_eq!(
        phase().await,
        Some(RestorePhase::Failed),
        "a late write won"
    );
    // A run begun from a view older than the status: refused as well.
    let late = write(&mut fence_of(&restoring), RestorePhase::Restoring, "stale").await;
    assert!(conflict(&late).is_some(), "{late:?}");
    let now = api.get("r").await.unwrap().status.unwrap();
    assert_eq!(
        (now.phase, now.error.as_deref()),
        (Some(RestorePhase::Failed), Some("new"))
    );
}

/// A Redis pod `name` (label `app: <app>`) that opted in to injection,
/// on PVC `data-<name>`.
fn opted_in_redis(ns: &str, name: &str, app: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: {app}, stillpoint.dev/inject: "true"}}
  annotations: {{stillpoint.dev/engine: redis, stillpoint.dev/dsn-secret: redis-dsn, stillpoint.dev/data-volumes: data}}
spec:
  serviceAccountName: redis
  containers:
  - name: redis
    image: redis:7
    args: [--port, "6379", --dir, /data, --appendonly, "yes", --save, "", --protected-mode, "no"]
    readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data-{name}}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_controller_as_deployed_backs_up_injected_pods_and_a_leader_cut_off_from_one_agent_fails_naming_it()
 {
    let (other, _down, admin, leader) = deployed().await;
    let space = Space::in_lab(
        other,
        admin.clone(),
        other.namespace("deployed").await.unwrap(),
    );
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: redis, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: redis-dsn, namespace: {ns}}}\n\
             stringData: {{dsn: \"redis://127.0.0.1:6379\"}}"
        ))
        .await;
    for (pod, app) in [("redis-da", "da"), ("redis-db", "db")] {
        space.pvc(&format!("data-{pod}"), None).await;
        space.apply(&opted_in_redis(&ns, pod, app)).await;
    }
    let (a, b) = (space.ready("redis-da").await, space.ready("redis-db").await);
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: pair, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: a, selector: {{matchLabels: {{app: da}}}}}}\n  \
             - {{name: b, selector: {{matchLabels: {{app: db}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  leaseTTL: 3s\n  freezeBudget: 30s\n",
            kube::SLOW_SNAPSHOT_CLASS
        ))
        .await;
    space.protectable("pair", "True").await;
    // Injected agents with certificates from the deployed PKI serve the
    // deployed leader: a backup succeeds.
    let done = space.backup("whole", "pair").await;
    assert_eq!(
        status_of_phase(&done),
        Some(BackupPhase::Succeeded),
        "{:#?}",
        done.status
    );
    assert_eq!(status(&done).run_by.as_deref(), Some(leader.as_str()));

    // Mid-freeze, the leader's pod cut off from b's agent (its packets to
    // the agent's port dropped in its network namespace).
    until_cutting(&space, "cut", "pair").await;
    let (to_a, to_b) = (write_when_thawed(&a), write_when_thawed(&b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!to_a.is_finished() && !to_b.is_finished(), "not frozen");
    let cut_at = std::time::Instant::now();
    let cut = other
        .cut_pod_from(
            stillpoint::CONTROLLER_NS,
            &leader,
            pod_ip(&b).unwrap(),
            9443,
        )
        .await
        .unwrap();
    let thawed_b = to_b.await.unwrap().duration_since(cut_at);
    assert!(
        thawed_b <= MEMBER_TTL + Duration::from_secs(1),
        "b thawed {thawed_b:?} after the cut, past its lease ({MEMBER_TTL:?})"
    );
    let thawed_a = to_a.await.unwrap();
    let backup = space.finished("cut").await;
    let ended = std::time::Instant::now();
    let s = status(&backup);
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:#?}");
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains("redis-db"), "the member is named: {error}");
    assert!(thawed_a <= ended, "a thawed only after the backup ended");
    drop(cut);
    for pod in [&a, &b] {
        assert!(writes(pod, Duration::from_secs(2)).await);
    }
    nothing_leaked(&space).await;
}

/// The lab's group lease TTL of the partition tests (`leaseTTL: 3s`).
const MEMBER_TTL: Duration = Duration::from_secs(3);

/// A SET on `redis` that waits out any freeze; returns when it went through.
fn write_when_thawed(redis: &Pod) -> tokio::task::JoinHandle<std::time::Instant> {
    let redis = redis.clone();
    tokio::spawn(async move {
        let mut c = redis_connect(&redis).await;
        let _: () = redis::cmd("SET")
            .arg("after")
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        std::time::Instant::now()
    })
}

/// Two Redis pods with agents, `redis-<x>` and `redis-<y>` (labelled
/// `app: <x>`, `app: <y>`), in ConsistencyGroup `pair` on storage that
/// takes 3 s to cut (the group stays frozen that long), lease TTL 3 s.
async fn slow_pair(space: &Space, [x, y]: [&str; 2]) -> [Pod; 2] {
    let ns = &space.ns;
    space.identity("redis").await;
    for app in [x, y] {
        let pod = format!("redis-{app}");
        space.pvc(&format!("data-{pod}"), None).await;
        space.apply(&RedisPod::with_agent(&pod, app).yaml(ns)).await;
    }
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: pair, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: a, selector: {{matchLabels: {{app: {x}}}}}}}\n  \
             - {{name: b, selector: {{matchLabels: {{app: {y}}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  leaseTTL: 3s\n  freezeBudget: 30s\n",
            kube::SLOW_SNAPSHOT_CLASS
        ))
        .await;
    [
        space.ready(&format!("redis-{x}")).await,
        space.ready(&format!("redis-{y}")).await,
    ]
}

/// A leader `<name>-a` reaching the API server only through `gate`, once
/// it leads Lease `lease-<ns>`, and a standby `<name>-b` reaching it
/// directly.
async fn leader_behind(
    space: &Space,
    gate: &stillpoint_tests::harness::kube::gate::Gate,
    name: &str,
) -> (ControllerProc, ControllerProc) {
    let (ns, lease) = (&space.ns, format!("lease-{}", space.ns));
    let leader = format!("{name}-a");
    let a = ControllerProc::start_through(space.lab, space.installed, ns, &leader, &lease, gate)
        .await
        .unwrap();
    wait_async(&format!("{leader} leads"), BOUND, || {
        let (lease, leader) = (&lease, &leader);
        async move { Ok(lease_holder(space, lease).await.as_ref() == Some(leader)) }
    })
    .await
    .unwrap();
    let b = space.controller(&format!("{name}-b"), &lease).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_one_agent_mid_freeze_fails_naming_it_and_nothing_stays_frozen() {
    let space = Space::new("agentcut").await;
    let ns = space.ns.clone();
    let [a, b] = slow_pair(&space, ["ca", "cb"]).await;
    let _controller = space.controller("agentcut", &format!("lease-{ns}")).await;
    space.protectable("pair", "True").await;
    until_cutting(&space, "cut", "pair").await;
    let (to_a, to_b) = (write_when_thawed(&a), write_when_thawed(&b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!to_a.is_finished() && !to_b.is_finished(), "not frozen");

    // The controller and b's agent cut apart, both ways, mid-freeze.
    let cut_at = std::time::Instant::now();
    let cut = space
        .lab
        .cut_host_from(&ns, "redis-cb", 9443)
        .await
        .unwrap();
    let thawed_b = to_b.await.unwrap();
    // b thaws by its own lease: nobody renews it.
    assert!(
        thawed_b.duration_since(cut_at) <= MEMBER_TTL + Duration::from_secs(1),
        "b thawed {:?} after the cut, past its lease ({MEMBER_TTL:?})",
        thawed_b.duration_since(cut_at)
    );
    let thawed_a = to_a.await.unwrap();
    let backup = space.finished("cut").await;
    let s = status(&backup);
    let ended = std::time::Instant::now();
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:#?}");
    let error = s.error.clone().unwrap_or_default();
    assert!(error.contains("redis-cb"), "the member is named: {error}");
    // a is thawed as soon as the backup gave up, not left to its lease.
    assert!(
        thawed_a <= ended,
        "a thawed only {:?} after the backup ended",
        thawed_a.duration_since(ended)
    );
    drop(cut);
    // Nothing of the failed backup is left, and both take writes.
    for pod in [&a, &b] {
        assert!(writes(pod, Duration::from_secs(2)).await);
    }
    nothing_leaked(&space).await;
}

/// When a controller's log says it stopped leading for want of a renewal.
fn stopped_leading_at(log: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    log.lines()
        .find(|l| l.contains("no renewal within the renew deadline"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The value of metric `name` on `pod`'s agent (its admin port).
fn agent_metric(pod: &Pod, name: &str) -> f64 {
    let addr: std::net::SocketAddr = format!("{}:9090", pod_ip(pod).unwrap()).parse().unwrap();
    let (_, body) = stillpoint_tests::harness::http_get(addr, "/metrics").unwrap();
    stillpoint_tests::harness::metric_sum(&body, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_api_server_mid_backup_fails_it_and_no_member_is_held_twice() {
    use stillpoint_tests::harness::kube::gate::Gate;
    let space = Space::new("cutbackup").await;
    let pods = slow_pair(&space, ["ma", "mb"]).await;
    let gate = Gate::start(space.lab.api_address()).await.unwrap();
    let (_a, _b) = leader_behind(&space, &gate, "mid").await;
    space.protectable("pair", "True").await;
    until_cutting(&space, "mid", "pair").await;
    let writes: Vec<_> = pods.iter().map(write_when_thawed).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(writes.iter().all(|w| !w.is_finished()), "not frozen");

    // The leader partitioned from the API server mid-cut.
    let cut = std::time::Instant::now();
    gate.cut();
    for w in writes {
        let thawed = w.await.unwrap().duration_since(cut);
        assert!(
            thawed <= LEASE_DURATION,
            "a member thawed {thawed:?} after the cut, past the Lease ({LEASE_DURATION:?})"
        );
    }
    // The standby finds the backup without a live run: Failed, never half.
    let b = space.finished("mid").await;
    assert_eq!(
        status(&b).phase,
        Some(BackupPhase::Failed),
        "{:#?}",
        b.status
    );
    // No member was ever held for two streams: nobody took a hold over.
    for pod in &pods {
        let takeovers = tokio::task::block_in_place(|| {
            agent_metric(pod, "stillpoint_agent_hold_takeovers_total")
        });
        assert_eq!(takeovers, 0.0, "{}", pod.name_any());
        let frozen = tokio::task::block_in_place(|| agent_metric(pod, "stillpoint_agent_frozen "));
        assert_eq!(frozen, 0.0, "{}", pod.name_any());
    }
    gate.heal();
    nothing_leaked(&space).await;
}

/// Waits (bounded, all at once) for each write; returns how long after
/// `since` each of `engines` completed.
async fn completed(
    writes: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    since: std::time::Instant,
    engines: &[&str],
) -> Result<BTreeMap<&'static str, Duration>, String> {
    let waited = futures_util::future::join_all(writes.into_iter().map(|(engine, w)| async move {
        let done = tokio::time::timeout(Duration::from_secs(30), w).await;
        (engine, done.map(|joined| (joined, since.elapsed())))
    }))
    .await;
    let mut done = BTreeMap::new();
    for (engine, result) in waited {
        let (joined, took) =
            result.map_err(|_| format!("the {engine} write did not complete within 30 s"))?;
        joined.unwrap();
        if engines.contains(&engine) {
            done.insert(engine, took);
        }
    }
    Ok(done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cut_off_from_its_database_mid_hold_leaves_nothing_frozen_past_its_lease() {
    use stillpoint_controller::kube::crd::{GroupQuiesce, QuiescePhase};
    let space = Space::new("dbcut").await;
    let ns = space.ns.clone();
    for sa in ["redis", "pg", "maria"] {
        space.identity(sa).await;
    }
    for pvc in ["data-redis-dc", "data-pg-dc", "data-maria-dc"] {
        space.pvc(pvc, None).await;
    }
    space
        .apply(&RedisPod::with_agent("redis-dc", "rdc").yaml(&ns))
        .await;
    space.apply(&postgres_pod(&ns, "pg-dc", None, false)).await;
    space.apply(&mariadb_pod(&ns, "maria-dc")).await;
    let (redis, pg, maria) = (
        space.ready("redis-dc").await,
        space.ready("pg-dc").await,
        space.ready("maria-dc").await,
    );
    pg_connect(&pg)
        .await
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    {
        use mysql_async::prelude::Queryable;
        let mut c = maria_connect(&maria).await;
        c.query_drop("CREATE DATABASE app; CREATE TABLE app.t (id int) ENGINE=InnoDB")
            .await
            .unwrap();
    }
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: hold, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: cache, selector: {{matchLabels: {{app: rdc}}}}}}\n  \
             - {{name: pg, selector: {{matchLabels: {{app: pg}}}}}}\n  - {{name: maria, selector: {{matchLabels: {{app: maria}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {}}}\n  leaseTTL: 3s\n",
            kube::ATOMIC_SNAPSHOT_CLASS
        ))
        .await;
    let _controller = space.controller("dbcut", &format!("lease-{ns}")).await;
    let quiesces: Api<GroupQuiesce> = Api::namespaced(space.admin.clone(), &ns);
    let ttl = Duration::from_secs(3);
    // Each engine's agent in turn, cut off from its server mid-hold.
    for (i, (pod, engine)) in [
        ("maria-dc", "mariadb"),
        ("pg-dc", "postgres"),
        ("redis-dc", "redis"),
    ]
    .into_iter()
    .enumerate()
    {
        space.protectable("hold", "True").await;
        let name = format!("q-{engine}");
        space
            .apply(&format!(
                "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{group: hold, duration: 10m}}"
            ))
            .await;
        quiesce_phase(&space, &name, QuiescePhase::Frozen).await;
        let waiting = writes_to_each(&pg, &maria, &redis, i as i32);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(waiting.iter().all(|(_, w)| !w.is_finished()), "not held");

        let cut_at = std::time::Instant::now();
        let cut = space.lab.cut_inside(&ns, pod).await.unwrap();
        // The cut-off member's server ends the hold by itself, within the
        // lease and the server's grace of the last renewal; the others
        // are thawed when the quiesce fails.
        let all = ["postgres", "mariadb", "redis"];
        let took = completed(waiting, cut_at, &all).await;
        let took = match took {
            Ok(took) => took,
            Err(e) => panic!(
                "{e}\n{:?}\n{}\n{}",
                quiesces.get(&name).await.unwrap().status,
                space.lab.container_log(&ns, pod, "stillpoint-agent"),
                space.lab.container_log(&ns, pod, engine)
            ),
        };
        let bound = ttl + Duration::from_secs(2);
        assert!(
            took[engine] <= bound,
            "{engine} was held {:?} after its agent was cut off (bound {bound:?}): {took:?}",
            took[engine]
        );
        // The others thaw as soon as the quiesce learns of the loss (by
        // the lease's end), not after the cut-off member's thaw.
        for other in all {
            assert!(
                took[other] <= ttl + Duration::from_secs(1),
                "{other} thawed {:?} after the cut: {took:?}",
                took[other]
            );
        }
        let q = quiesce_phase(&space, &name, QuiescePhase::Failed).await;
        let error = q.status.unwrap().error.unwrap_or_default();
        assert!(error.contains(pod), "the member is named: {error}");
        eprintln!("{engine} cut off: writes resumed after {took:?}; {error}");

        // Healed: nothing the cut left in flight freezes anything later
        // (a renewal delivered late is undone by the thaw behind it).
        drop(cut);
        space.ready(pod).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let late = writes_to_each(&pg, &maria, &redis, 100 + i as i32);
        let took = completed(late, std::time::Instant::now(), &all)
            .await
            .unwrap();
        assert!(
            took.values().all(|t| *t < Duration::from_secs(2)),
            "a write waited after the heal: {took:?}"
        );
        quiesces
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    }
    // The agents hold again after their cuts.
    space.protectable("hold", "True").await;
    let b = space.backup("after-cuts", "hold").await;
    assert_eq!(status_of_phase(&b), Some(BackupPhase::Succeeded), "{b:?}");
}

// The chaos run: faults of every kind, seeded, while schedules back up,
// a quiesce holds and a restore runs under a causal workload.

type Stamp = k8s_openapi::jiff::Timestamp;

/// The causal workload of the chaos run: step n is committed in
/// PostgreSQL, then pushed to Redis; a step that fails (a server killed,
/// a connection cut) is retried on new connections until both
/// acknowledged it (the insert is idempotent; a push repeated is harmless
/// to the set checks). Records when each step was acknowledged.
struct Survivor {
    stop: tokio::sync::watch::Sender<bool>,
    acks: std::sync::Arc<std::sync::Mutex<Vec<(Stamp, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

type Conns = (tokio_postgres::Client, redis::aio::MultiplexedConnection);

impl Survivor {
    async fn start(pg: &Pod, redis: &Pod) -> Survivor {
        pg_connect(pg)
            .await
            .batch_execute("CREATE TABLE IF NOT EXISTS chain (id int primary key)")
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, pg, redis) = (acks.clone(), pg.clone(), redis.clone());
        let task = tokio::spawn(async move {
            let mut conns: Option<Conns> = None;
            let mut n: i32 = 1;
            while !*stopped.borrow() {
                match Self::attempt(&pg, &redis, &mut conns, n).await {
                    Ok(()) => {
                        log.lock().unwrap().push((Stamp::now(), n as usize));
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => {
                        conns = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Survivor { stop, acks, task }
    }

    async fn attempt(
        pg: &Pod,
        redis: &Pod,
        conns: &mut Option<Conns>,
        n: i32,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        let bound = Duration::from_secs(60);
        if conns.is_none() {
            let connect = Duration::from_secs(5);
            let db = tokio::time::timeout(connect, kube::postgres_of(pg)).await??;
            let ip = pod_ip(redis)?;
            let client = redis::Client::open(format!("redis://{ip}:6379"))?;
            let mut cache =
                tokio::time::timeout(connect, client.get_multiplexed_async_connection()).await??;
            cache.set_response_timeout(bound);
            *conns = Some((db, cache));
        }
        let (db, cache) = conns.as_mut().context("connected")?;
        let insert = "INSERT INTO chain VALUES ($1) ON CONFLICT DO NOTHING";
        tokio::time::timeout(bound, db.execute(insert, &[&n])).await??;
        let mut push = redis::cmd("RPUSH");
        push.arg("chain").arg(n);
        tokio::time::timeout(bound, push.query_async::<i64>(cache)).await??;
        Ok(())
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().last().map_or(0, |(_, n)| *n)
    }

    /// The last step acknowledged before `at`.
    fn acked_before(&self, at: Stamp) -> usize {
        let acks = self.acks.lock().unwrap();
        acks.iter()
            .take_while(|(t, _)| *t < at)
            .last()
            .map_or(0, |(_, n)| *n)
    }

    async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        let acked = self.acked();
        self.task.await.unwrap();
        acked.max(self.acks.lock().unwrap().last().map_or(0, |(_, n)| *n))
    }
}

/// The shop's pods, which the faults aim at.
const SHOP_PODS: [&str; 4] = ["pg-0", "pg-replica-0", "redis-0", "redis-replica-0"];

/// One fault the chaos run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillLeader,
    KillStandby,
    KillAgent(&'static str),
    KillDatabase(&'static str),
    CrashApiServer,
    CrashEtcd,
    KillNode,
    /// The leading replica cut off from the API server.
    CutLeaderFromApi,
    /// The controllers cut off from one agent.
    CutFromAgent(&'static str),
    /// An agent cut off from the database beside it.
    CutAgentFromDatabase(&'static str),
}

impl Fault {
    const KINDS: usize = 10;

    /// Fault kind `kind` (0..KINDS) at a seeded pod.
    fn of(kind: usize, rng: &mut fastrand::Rng) -> Fault {
        let pod = SHOP_PODS[rng.usize(..SHOP_PODS.len())];
        match kind {
            0 => Fault::KillLeader,
            1 => Fault::KillStandby,
            2 => Fault::KillAgent(pod),
            3 => Fault::KillDatabase(pod),
            4 => Fault::CrashApiServer,
            5 => Fault::CrashEtcd,
            6 => Fault::KillNode,
            7 => Fault::CutLeaderFromApi,
            8 => Fault::CutFromAgent(pod),
            _ => Fault::CutAgentFromDatabase(pod),
        }
    }

    /// `count` faults: every kind once (in a seeded order), then seeded.
    fn plan(count: usize, rng: &mut fastrand::Rng) -> Vec<Fault> {
        let mut kinds: Vec<usize> = (0..Self::KINDS).collect();
        rng.shuffle(&mut kinds);
        (0..count)
            .map(|i| match kinds.get(i) {
                Some(kind) => Fault::of(*kind, rng),
                None => Fault::of(rng.usize(..Self::KINDS), rng),
            })
            .collect()
    }

    fn describe(self) -> String {
        match self {
            Fault::KillLeader => "SIGKILL the leading controller".into(),
            Fault::KillStandby => "SIGKILL the standby controller".into(),
            Fault::KillAgent(p) => format!("SIGKILL the agent of {p}"),
            Fault::KillDatabase(p) => format!("SIGKILL the database of {p}"),
            Fault::CrashApiServer => "SIGKILL the API server (restarted)".into(),
            Fault::CrashEtcd => "SIGKILL etcd (restarted)".into(),
            Fault::KillNode => "SIGKILL every pod process (node crash)".into(),
            Fault::CutLeaderFromApi => "leader cut off from the API server".into(),
            Fault::CutFromAgent(p) => format!("controllers cut off from the agent of {p}"),
            Fault::CutAgentFromDatabase(p) => format!("agent of {p} cut off from its database"),
        }
    }
}

/// The two controller replicas of the chaos run, each reaching the API
/// server through its own gate; a replica that exits is started again,
/// as its Deployment would.
struct Replicas {
    lab: &'static KubeLab,
    installed: &'static Installed,
    ns: String,
    lease: String,
    gates: Vec<stillpoint_tests::harness::kube::gate::Gate>,
    procs: Vec<Option<ControllerProc>>,
}

impl Replicas {
    const NAMES: [&str; 2] = ["chaos-a", "chaos-b"];

    async fn start(space: &Space) -> Replicas {
        use stillpoint_tests::harness::kube::gate::Gate;
        let mut r = Replicas {
            lab: space.lab,
            installed: space.installed,
            ns: space.ns.clone(),
            lease: format!("lease-{}", space.ns),
            gates: Vec::new(),
            procs: Vec::new(),
        };
        for _ in Self::NAMES {
            r.gates
                .push(Gate::start(space.lab.api_address()).await.unwrap());
            r.procs.push(None);
        }
        for i in 0..Self::NAMES.len() {
            r.restart(i).await;
        }
        r
    }

    async fn restart(&mut self, i: usize) {
        let started = ControllerProc::start_through(
            self.lab,
            self.installed,
            &self.ns,
            Self::NAMES[i],
            &self.lease,
            &self.gates[i],
        )
        .await;
        self.procs[i] = Some(started.unwrap());
    }

    /// Starts every replica that is not running; returns how many.
    async fn revive(&mut self) -> usize {
        let mut revived = 0;
        for i in 0..self.procs.len() {
            if !self.procs[i].as_mut().is_some_and(ControllerProc::running) {
                self.restart(i).await;
                revived += 1;
            }
        }
        revived
    }

    /// The replica holding the Lease, if it is running.
    async fn leader(&mut self, admin: &::kube::Client) -> Option<usize> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(admin.clone(), stillpoint::CONTROLLER_NS);
        let holder = leases
            .get_opt(&self.lease)
            .await
            .ok()??
            .spec?
            .holder_identity?;
        let i = Self::NAMES.iter().position(|n| *n == holder)?;
        let p = self.procs[i].as_mut()?;
        let ready = p.running()
            && tokio::task::block_in_place(|| p.get("/readyz")).is_ok_and(|(code, _)| code == 200);
        ready.then_some(i)
    }

    fn kill(&mut self, i: usize) {
        if let Some(p) = self.procs[i].as_mut() {
            p.kill();
        }
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .flatten()
            .map(|p| format!("--- {}\n{}", p.identity, p.logs()))
            .collect()
    }
}

/// What the cluster got back after a fault, and when.
struct Recovery {
    writes: Option<Duration>,
    pods: Option<Duration>,
    leader: Option<(usize, Duration)>,
}

impl Recovery {
    fn done(&self) -> bool {
        self.writes.is_some() && self.pods.is_some() && self.leader.is_some()
    }

    fn describe(&self) -> String {
        let s =
            |d: Option<Duration>| d.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let leader = self.leader.map_or("no leader".into(), |(i, d)| {
            format!("{} leads {:.1} s", Replicas::NAMES[i], d.as_secs_f64())
        });
        format!(
            "writes {} · pods ready {} · {leader}",
            s(self.writes),
            s(self.pods)
        )
    }
}

/// The shop's pods' container restarts so far, and whether every one is
/// Ready (`None` while the API server does not answer).
async fn shop_pods(pods: &Api<Pod>) -> Option<(i32, bool)> {
    let (mut restarts, mut ready) = (0, true);
    for name in SHOP_PODS {
        let status = pods.get(name).await.ok()?.status.unwrap_or_default();
        restarts += status
            .container_statuses
            .iter()
            .flatten()
            .map(|c| c.restart_count)
            .sum::<i32>();
        ready &= status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    }
    Some((restarts, ready))
}

/// Waits (bounded) until a step begun after the fault ended is
/// acknowledged, every shop pod is Ready after `restarts` container
/// restarts in all, and a running replica leads and is ready; each
/// measured from `since`, when the fault began.
async fn recover(
    space: &Space,
    replicas: &mut Replicas,
    workload: &Survivor,
    restarts: i32,
    since: tokio::time::Instant,
) -> Recovery {
    let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &space.ns);
    // The step in flight when the fault ended may complete; the next one
    // began after it.
    let acked = workload.acked() + 1;
    let started = since;
    let mut r = Recovery {
        writes: None,
        pods: None,
        leader: None,
    };
    while !r.done() && started.elapsed() < Duration::from_secs(240) {
        replicas.revive().await;
        if r.writes.is_none() && workload.acked() > acked {
            r.writes = Some(started.elapsed());
        }
        if r.pods.is_none()
            && shop_pods(&pods)
                .await
                .is_some_and(|(n, ready)| n >= restarts && ready)
        {
            r.pods = Some(started.elapsed());
        }
        if r.leader.is_none()
            && let Some(i) = replicas.leader(&space.admin).await
        {
            r.leader = Some((i, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r
}

/// One row of the chaos table.
struct Row {
    fault: Fault,
    at: Duration,
    held: Duration,
    window: (Stamp, Stamp),
    recovery: String,
}

/// Injects `fault`; a cut is held for `hold`, a killed controller stays
/// down for `hold`. Returns when the fault is over (healed, restarted),
/// with how many of the shop's containers it killed.
async fn inject(space: &Space, replicas: &mut Replicas, fault: Fault, hold: Duration) -> i32 {
    let (lab, ns) = (space.lab, space.ns.as_str());
    match fault {
        Fault::KillLeader | Fault::KillStandby => {
            let leader = replicas.leader(&space.admin).await.unwrap_or(0);
            let i = if fault == Fault::KillLeader {
                leader
            } else {
                1 - leader
            };
            replicas.kill(i);
            tokio::time::sleep(hold).await;
            replicas.revive().await;
            0
        }
        Fault::KillAgent(pod) => {
            lab.kill_container(ns, pod, "stillpoint-agent")
                .await
                .unwrap();
            1
        }
        Fault::KillDatabase(pod) => {
            let container = if pod.starts_with("pg") {
                "postgres"
            } else {
                "redis"
            };
            lab.kill_container(ns, pod, container).await.unwrap();
            1
        }
        Fault::CrashApiServer | Fault::CrashEtcd => {
            let name = if fault == Fault::CrashEtcd {
                "etcd"
            } else {
                "kube-apiserver"
            };
            lab.crash_and_restart(name).await.unwrap();
            0
        }
        Fault::KillNode => {
            let killed = lab.kill_node().unwrap();
            assert!(killed > 0, "the node ran no process");
            // Each shop pod's two containers.
            2 * SHOP_PODS.len() as i32
        }
        Fault::CutLeaderFromApi => {
            let i = replicas.leader(&space.admin).await.unwrap_or(0);
            replicas.gates[i].cut();
            tokio::time::sleep(hold).await;
            replicas.gates[i].heal();
            0
        }
        Fault::CutFromAgent(pod) => {
            let cut = lab.cut_host_from(ns, pod, 9443).await.unwrap();
            tokio::time::sleep(hold).await;
            drop(cut);
            0
        }
        Fault::CutAgentFromDatabase(pod) => {
            let cut = lab.cut_inside(ns, pod).await.unwrap();
            tokio::time::sleep(hold).await;
            drop(cut);
            0
        }
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| # | fault | at | lasted | back after (from the fault's start) |\n|---|---|---|---|---|\n",
    );
    for (i, r) in rows.iter().enumerate() {
        out += &format!(
            "| {} | {} | {:.1} s | {:.1} s | {} |\n",
            i + 1,
            r.fault.describe(),
            r.at.as_secs_f64(),
            r.held.as_secs_f64(),
            r.recovery
        );
    }
    out
}

/// The faults whose window (with `slack`) overlaps `[from, to]`.
fn faults_during(rows: &[Row], from: Stamp, to: Stamp) -> Vec<usize> {
    let slack = k8s_openapi::jiff::SignedDuration::from_secs(3);
    rows.iter()
        .enumerate()
        .filter(|(_, r)| r.window.0 - slack <= to && from <= r.window.1 + slack)
        .map(|(i, _)| i + 1)
        .collect()
}

/// The newest Succeeded GroupBackup of `space`.
async fn newest_succeeded(space: &Space) -> Option<GroupBackup> {
    let all = space.backups().list(&ListParams::default()).await.ok()?;
    all.items
        .into_iter()
        .filter(|b| status_of_phase(b) == Some(BackupPhase::Succeeded))
        .max_by_key(|b| b.metadata.creation_timestamp.clone().map(|t| t.0))
}

/// When `b` was created.
fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Stamp {
    meta.creation_timestamp.clone().map(|t| t.0).unwrap()
}

/// Waits until every GroupBackup, GroupQuiesce and GroupRestore of
/// `space` is in a final phase.
async fn all_final(space: &Space) {
    use stillpoint_controller::kube::crd::{GroupQuiesce, GroupRestore};
    let (ns, admin) = (&space.ns, &space.admin);
    let ended = wait_async(
        "every object in a final phase",
        Duration::from_secs(300),
        || async move {
            let backups: Api<GroupBackup> = Api::namespaced(admin.clone(), ns);
            let quiesces: Api<GroupQuiesce> = Api::namespaced(admin.clone(), ns);
            let restores: Api<GroupRestore> = Api::namespaced(admin.clone(), ns);
            let lp = ListParams::default();
            let b = backups.list(&lp).await?.items.iter().all(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(BackupPhase::is_final)
            });
            let q = quiesces.list(&lp).await?.items.iter().all(|q| {
                q.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_final())
            });
            let r = restores.list(&lp).await?.items.iter().all(|r| {
                r.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_final())
            });
            Ok(b && q && r)
        },
    )
    .await;
    if let Err(e) = ended {
        panic!("{e}\n{}", pods_not_ready(space).await);
    }
}

/// VolumeSnapshots of `space` that no existing GroupBackup records.
/// The unrecorded snapshots, each with its owners, labels and status.
async fn dump_unrecorded(space: &Space) -> String {
    let names = unrecorded_snapshots(space).await;
    let api = snapshot_api(space).await;
    let mut out = String::new();
    for name in names {
        if let Ok(s) = api.get(&name).await {
            out.push_str(&format!(
                "{name}: owners {:?}, labels {:?}, deleting {}, status {}\n",
                s.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .map(|o| format!("{}/{}", o.kind, o.name))
                    .collect::<Vec<_>>(),
                s.metadata.labels,
                s.metadata.deletion_timestamp.is_some(),
                s.data["status"]
            ));
        }
    }
    out
}

async fn unrecorded_snapshots(space: &Space) -> Vec<String> {
    let recorded: BTreeSet<String> = space
        .backups()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|b| status(b).members)
        .flat_map(|m| m.volume_snapshots)
        .map(|v| v.name)
        .collect();
    let snapshots = snapshot_api(space).await;
    snapshots
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .filter(|n| !recorded.contains(n))
        .collect()
}

/// Restores backup `backup` under names prefixed `prefix` and checks the
/// cut of the copies.
async fn restore_checked(space: &Space, name: &str, backup: &GroupBackup, before: usize) {
    use stillpoint_controller::kube::crd::RestorePhase;
    let spec = format!("{{backup: {}, pvcPrefix: {name}-}}", backup.name_any());
    let r = restore(space, name, &spec).await;
    let s = r.status.unwrap_or_default();
    assert_eq!(s.phase, Some(RestorePhase::Succeeded), "{s:#?}");
    let pods = SHOP_PODS.map(|p| format!("{name}-{p}"));
    check_cut(name, pods.each_ref().map(String::as_str), space, before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_leaves_nothing_frozen_lost_or_leaked_and_what_succeeded_restores_consistent() {
    use stillpoint_controller::kube::crd::{
        GroupQuiesce, GroupRestore, QuiescePhase, RestorePhase,
    };
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let faults = env("STILLPOINT_CHAOS_FAULTS").unwrap_or(12) as usize;
    let seed = env("STILLPOINT_CHAOS_SEED").unwrap_or_else(|| Stamp::now().as_second() as u64);
    eprintln!("chaos: {faults} faults, STILLPOINT_CHAOS_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    // A lab of its own: its API server, etcd and node are crashed.
    let lab = tokio::task::block_in_place(KubeLab::start).unwrap();
    let lab: &'static KubeLab = Box::leak(Box::new(lab));
    let _down = SecondLab(lab);
    stillpoint::apply_deploy(lab).await.unwrap();
    let space = Space {
        lab,
        installed: Box::leak(Box::new(Installed::new().unwrap())),
        admin: lab.admin().await.unwrap(),
        ns: lab.namespace("chaos").await.unwrap(),
    };
    let ns = space.ns.clone();
    let (pg0, redis0) = shop_statefulsets(&space, |yaml| yaml).await;
    let mut replicas = Replicas::start(&space).await;
    space.protectable("shop", "True").await;
    let workload = Survivor::start(&pg0, &redis0).await;
    // A backup of its own (no schedule's retention deletes it) to restore
    // while the faults go on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_base = workload.acked();
    let base = space.backup("base", "shop").await;
    assert_eq!(
        status_of_phase(&base),
        Some(BackupPhase::Succeeded),
        "{base:?}"
    );
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: every, namespace: {ns}}}\n\
             spec: {{group: shop, schedule: \"*/10 * * * * *\", immediate: true, keepLast: 4}}"
        ))
        .await;

    let began = std::time::Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut restoring = false;
    for (i, &fault) in Fault::plan(faults, &mut rng).iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.u64(1000..5000))).await;
        if i % 4 == 2 {
            space
                .apply(&format!(
                    "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupQuiesce\nmetadata: {{name: q-{i}, namespace: {ns}}}\n\
                     spec: {{group: shop, duration: 4s}}"
                ))
                .await;
        }
        if !restoring && i >= faults / 2 {
            start_restore(&space, "r", "{backup: base, pvcPrefix: r-}").await;
            restoring = true;
        }
        let hold = Duration::from_millis(rng.u64(2000..8000));
        let pods: Api<Pod> = Api::namespaced(space.admin.clone(), &ns);
        let restarts = shop_pods(&pods).await.map_or(0, |(n, _)| n);
        let (at, from, since) = (began.elapsed(), Stamp::now(), tokio::time::Instant::now());
        let killed = inject(&space, &mut replicas, fault, hold).await;
        let held = began.elapsed() - at;
        let r = recover(&space, &mut replicas, &workload, restarts + killed, since).await;
        rows.push(Row {
            fault,
            at,
            held,
            window: (from, Stamp::now()),
            recovery: r.describe(),
        });
        eprintln!("chaos {}: {} → {}", i + 1, fault.describe(), r.describe());
        if !r.done() {
            panic!(
                "no recovery:\n{}\n{}\n{}",
                table(&rows),
                pods_not_ready(&space).await,
                replicas.logs()
            );
        }
        // No member was ever held for two streams (two replicas at once):
        // no agent took a hold over (a restarted agent counts from 0).
        for pod in SHOP_PODS {
            let p = space.ready(pod).await;
            let taken = tokio::task::block_in_place(|| {
                agent_metric(&p, "stillpoint_agent_hold_takeovers_total")
            });
            assert_eq!(taken, 0.0, "{pod}: a hold was taken over\n{}", table(&rows));
        }
    }
    eprintln!("chaos table (seed {seed}):\n{}", table(&rows));

    // Quiet: no more backups; every object ends.
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: every, namespace: {ns}}}\n\
             spec: {{group: shop, schedule: \"*/10 * * * * *\", keepLast: 4}}"
        ))
        .await;
    Api::<stillpoint_controller::kube::crd::BackupSchedule>::namespaced(space.admin.clone(), &ns)
        .patch(
            "every",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    all_final(&space).await;

    // Every failure has a reason, and a fault was under way when it ran.
    let mut outcomes = String::new();
    for b in space
        .backups()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let s = status(&b);
        if s.phase == Some(BackupPhase::Succeeded) {
            continue;
        }
        let end = s.completion_time.clone().map_or_else(Stamp::now, |t| t.0);
        let during = faults_during(&rows, created(&b.metadata), end);
        let error = s.error.clone().unwrap_or_default();
        outcomes += &format!(
            "GroupBackup {}: {:?}, faults {during:?}: {error}\n",
            b.name_any(),
            s.phase
        );
        // A backup refused because the run's own quiesce held the group
        // needs no fault; any other failure does.
        let quiesced = error.contains("already frozen by backup 'GroupQuiesce:");
        assert!(
            !error.is_empty() && (quiesced || !during.is_empty()),
            "a failure with no reason or no fault under way:\n{outcomes}\n{}",
            table(&rows)
        );
    }
    let quiesces: Api<GroupQuiesce> = Api::namespaced(space.admin.clone(), &ns);
    for q in quiesces.list(&ListParams::default()).await.unwrap().items {
        let s = q.status.clone().unwrap_or_default();
        if s.phase == Some(QuiescePhase::Failed) {
            let error = s.error.clone().unwrap_or_default();
            outcomes += &format!("GroupQuiesce {}: Failed: {error}\n", q.name_any());
            assert!(!error.is_empty(), "{outcomes}");
        }
    }
    let restores: Api<GroupRestore> = Api::namespaced(space.admin.clone(), &ns);
    for r in restores.list(&ListParams::default()).await.unwrap().items {
        let s = r.status.clone().unwrap_or_default();
        outcomes += &format!(
            "GroupRestore {}: {:?} {}\n",
            r.name_any(),
            s.phase,
            s.error.clone().unwrap_or_default()
        );
        if s.phase == Some(RestorePhase::Failed) {
            assert!(s.error.is_some_and(|e| !e.is_empty()), "{outcomes}");
        }
    }
    let backups = space
        .backups()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let succeeded = backups
        .iter()
        .filter(|b| status_of_phase(b) == Some(BackupPhase::Succeeded))
        .count();
    eprintln!(
        "outcomes ({succeeded} of {} GroupBackups left by retention succeeded):\n{outcomes}",
        backups.len()
    );

    // What succeeded restores consistent: the restore run during the
    // faults (if it succeeded) and the newest backup now. Each holds every
    // step acknowledged before its backup was created.
    let newest = newest_succeeded(&space).await.expect("a backup succeeded");
    let before_newest = workload.acked_before(created(&newest.metadata));
    let acked = workload.stop().await;
    let r = restores.get("r").await.unwrap();
    if r.status.and_then(|s| s.phase) == Some(RestorePhase::Succeeded) {
        let pods = SHOP_PODS.map(|p| format!("r-{p}"));
        check_cut(
            "r",
            pods.each_ref().map(String::as_str),
            &space,
            before_base,
        )
        .await;
    }
    restore_checked(&space, "after", &newest, before_newest).await;

    // Nothing acknowledged is lost on the live servers.
    let expected: BTreeSet<i32> = (1..=acked as i32).collect();
    assert!(
        expected.is_subset(&chain_rows(&space, "pg-0").await),
        "PostgreSQL lost acknowledged steps"
    );
    for pod in ["pg-replica-0", "redis-0", "redis-replica-0"] {
        wait_async(
            &format!("{pod} holds every acknowledged step"),
            BOUND,
            || {
                let (space, expected) = (&space, &expected);
                async move {
                    let held: BTreeSet<i32> = if pod.starts_with("pg") {
                        chain_rows(space, pod).await
                    } else {
                        let p = space.ready(pod).await;
                        let ids: Vec<i32> = redis::cmd("LRANGE")
                            .arg("chain")
                            .arg(0)
                            .arg(-1)
                            .query_async(&mut redis_connect(&p).await)
                            .await?;
                        ids.into_iter().collect()
                    };
                    Ok(expected.is_subset(&held))
                }
            },
        )
        .await
        .unwrap();
    }
    // Nothing frozen, no PostgreSQL slot or fence left, nothing leaked.
    for pod in SHOP_PODS {
        let p = space.ready(pod).await;
        let frozen = tokio::task::block_in_place(|| agent_metric(&p, "stillpoint_agent_frozen "));
        assert_eq!(frozen, 0.0, "{pod} is frozen");
    }
    let pg = pg_connect(&space.ready("pg-0").await).await;
    let left: i64 = pg
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'stillpoint%') + \
                    (SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stillpoint-agent' \
                       AND state LIKE 'idle in transaction%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a backup slot or fence session was left on pg-0");
    nothing_leaked(&space).await;
    wait_async(
        "every VolumeSnapshot recorded by a backup",
        BOUND,
        || async { Ok(unrecorded_snapshots(&space).await.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| {
        let left = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(dump_unrecorded(&space))
        });
        panic!("{e}: {left}\n{:?}", replicas.logs())
    });
}

/// `helm` against `lab` as its admin.
fn helm(lab: &KubeLab, args: &[&str]) -> String {
    let kubeconfig = lab.admin_kubeconfig.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--kubeconfig", kubeconfig.as_str()]);
    stillpoint_tests::chart::run("helm", &all).unwrap()
}

/// The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule
/// CRDs, served by `lab` (the chart's monitoring objects are then created
/// and validated as in a cluster with the Operator).
async fn monitoring_crds(lab: &KubeLab, admin: &::kube::Client) {
    let dir = stillpoint_tests::chart::tools().unwrap().join("crd");
    for entry in std::fs::read_dir(dir).unwrap() {
        let yaml = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        stillpoint::apply_all(lab, admin, &yaml).await.unwrap();
    }
    let gvk = ::kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor");
    wait_async("the monitoring CRDs served", BOUND, || {
        let (admin, gvk) = (admin.clone(), gvk.clone());
        async move { Ok(::kube::discovery::pinned_kind(&admin, &gvk).await.is_ok()) }
    })
    .await
    .unwrap();
}

/// A monitoring.coreos.com object `kind`/`name` of `ns` as installed.
async fn monitoring_object(
    admin: &::kube::Client,
    kind: &str,
    ns: &str,
    name: &str,
) -> serde_json::Value {
    let gvk = ::kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
    let (resource, _) = ::kube::discovery::pinned_kind(admin, &gvk).await.unwrap();
    let api: Api<::kube::api::DynamicObject> = Api::namespaced_with(admin.clone(), ns, &resource);
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

fn matches(labels: &BTreeMap<String, String>, wanted: &serde_json::Value) -> bool {
    wanted
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

/// A static scrape job of `targets` (address, labels).
fn scrape_job(job: &str, honor: bool, targets: &[(String, BTreeMap<String, String>)]) -> String {
    let mut yaml = format!("- job_name: {job:?}\n  honor_labels: {honor}\n  static_configs:\n");
    for (address, labels) in targets {
        let mut labels = labels.clone();
        labels.insert("job".into(), job.into());
        yaml.push_str(&format!(
            "  - targets: [{address:?}]\n    labels: {}\n",
            serde_json::to_string(&labels).unwrap()
        ));
    }
    yaml
}

/// The scrape jobs the chart's ServiceMonitor and PodMonitor stand for,
/// resolved against the lab's objects as the Operator's Prometheus would:
/// the ServiceMonitor's Services by label in its namespaces, each pod behind
/// them (ready or not) at the named port, honouring the series' labels; the
/// PodMonitor's pods by label in every namespace, at the named container
/// port (native sidecars' too). Each target is labelled with its namespace
/// and pod.
async fn scrape_configs(admin: &::kube::Client, monitors_ns: &str) -> String {
    use k8s_openapi::api::core::v1::Service;
    let sm = monitoring_object(
        admin,
        "ServiceMonitor",
        monitors_ns,
        "stillpoint-controller",
    )
    .await;
    let pm = monitoring_object(admin, "PodMonitor", monitors_ns, "stillpoint-agents").await;
    let pods_of = |ns: Option<String>| {
        let admin = admin.clone();
        async move {
            let api: Api<Pod> = match ns {
                Some(ns) => Api::namespaced(admin, &ns),
                None => Api::all(admin),
            };
            api.list(&ListParams::default()).await.unwrap().items
        }
    };
    let port_named = |pod: &Pod, name: &str| {
        let spec = pod.spec.as_ref()?;
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    let target = |pod: &Pod, port: i32| {
        let labels = BTreeMap::from([
            ("namespace".to_string(), pod.namespace().unwrap_or_default()),
            ("pod".to_string(), pod.name_any()),
        ]);
        (format!("{}:{port}", pod_ip(pod).unwrap()), labels)
    };
    // The ServiceMonitor.
    let endpoint = &sm["spec"]["endpoints"][0];
    let mut controllers = Vec::new();
    for ns in sm["spec"]["namespaceSelector"]["matchNames"]
        .as_array()
        .unwrap()
    {
        let ns = ns.as_str().unwrap();
        let services: Api<Service> = Api::namespaced(admin.clone(), ns);
        for svc in services.list(&ListParams::default()).await.unwrap().items {
            let spec = svc.spec.clone().unwrap_or_default();
            let port = spec
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == endpoint["port"].as_str());
            if !matches(
                &svc.labels().clone(),
                &sm["spec"]["selector"]["matchLabels"],
            ) || port.is_none()
            {
                continue;
            }
            let selector = serde_json::to_value(spec.selector.unwrap_or_default()).unwrap();
            for pod in pods_of(Some(ns.to_string())).await {
                let named = port.and_then(|p| match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                        port_named(&pod, n)
                    }
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        Some(*n)
                    }
                    None => Some(p.port),
                });
                if matches(&pod.labels().clone(), &selector) && pod_ip(&pod).is_ok() {
                    controllers.push(target(&pod, named.unwrap()));
                }
            }
        }
    }
    // The PodMonitor.
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let mut agents = Vec::new();
    for pod in pods_of(None).await {
        if matches(
            &pod.labels().clone(),
            &pm["spec"]["selector"]["matchLabels"],
        ) && let (Some(p), Ok(_)) = (port_named(&pod, port), pod_ip(&pod))
        {
            agents.push(target(&pod, p));
        }
    }
    assert!(
        !controllers.is_empty() && !agents.is_empty(),
        "{controllers:?} {agents:?}"
    );
    let honor = endpoint["honorLabels"].as_bool().unwrap_or(false);
    scrape_job("stillpoint-controller", honor, &controllers)
        + &scrape_job(&format!("{monitors_ns}/stillpoint-agents"), false, &agents)
}

/// The chart installed into a lab of its own with `helm install`
/// (monitoring on, the Prometheus Operator's CRDs served); returns once one
/// replica leads, with the lab and a namespace for the test's objects
/// (the agents' NetworkPolicy is installed there).
async fn installed_by_helm() -> (&'static KubeLab, SecondLab, ::kube::Client, String) {
    let other: &'static KubeLab = Box::leak(Box::new(
        tokio::task::block_in_place(KubeLab::start).unwrap(),
    ));
    let down = SecondLab(other);
    let admin = other.admin().await.unwrap();
    monitoring_crds(other, &admin).await;
    let ns = other.namespace("charted").await.unwrap();
    let chart = stillpoint_tests::chart::chart();
    let policy_ns = format!("agentNetworkPolicy.namespaces={{{ns}}}");
    let installed = tokio::task::block_in_place(|| {
        helm(
            other,
            &[
                "install",
                "stillpoint",
                chart.to_str().unwrap(),
                "-n",
                stillpoint::CONTROLLER_NS,
                "--create-namespace",
                "--set",
                "monitoring.serviceMonitor.enabled=true",
                "--set",
                "monitoring.podMonitor.enabled=true",
                "--set",
                "monitoring.prometheusRule.enabled=true",
                "--set",
                "monitoring.dashboard.enabled=true",
                "--set",
                &policy_ns,
            ],
        )
    });
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    wait_async("a chart-installed replica leads", BOUND, || {
        let admin = &admin;
        async move {
            let pods = controller_pods(admin).await;
            let holder = deployed_leader(admin).await.unwrap_or_default();
            Ok(pods.get(&holder) == Some(&true))
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            other.container_log(stillpoint::CONTROLLER_NS, "", "controller")
        )
    });
    (other, down, admin, ns)
}

/// An opted-in Redis pod replicating `primary` (an address).
fn opted_in_replica(ns: &str, name: &str, app: &str, primary: &str) -> String {
    opted_in_redis(ns, name, app).replace(
        "--protected-mode, \"no\"]",
        &format!("--protected-mode, \"no\", --replicaof, {primary}, \"6379\"]"),
    )
}

/// Waits until Prometheus has a sample of `expr`.
async fn scraped(prometheus: &stillpoint_tests::harness::prometheus::Prometheus, expr: &str) {
    wait_async(&format!("Prometheus has {expr}"), BOUND, || async move {
        Ok(!prometheus.query(expr).unwrap().is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", prometheus.targets()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_installs_a_controller_that_backs_up_and_prometheus_alerts_on_its_failures_and_fills_every_panel()
 {
    let (other, _down, admin, ns) = installed_by_helm().await;
    let space = Space::in_lab(other, admin.clone(), ns.clone());
    // Injected Redis: a primary and its replica in group shop, a third
    // alone in group tight, whose freeze budget no backup can keep.
    space
        .apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: redis, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: redis-dsn, namespace: {ns}}}\n\
             stringData: {{dsn: \"redis://127.0.0.1:6379\"}}"
        ))
        .await;
    for pod in ["redis-p", "redis-r", "redis-t"] {
        space.pvc(&format!("data-{pod}"), None).await;
    }
    space.apply(&opted_in_redis(&ns, "redis-p", "mp")).await;
    let primary = space.ready("redis-p").await;
    let primary_ip = pod_ip(&primary).unwrap().to_string();
    space
        .apply(&opted_in_replica(&ns, "redis-r", "mr", &primary_ip))
        .await;
    space.apply(&opted_in_redis(&ns, "redis-t", "mt")).await;
    space.ready("redis-r").await;
    space.ready("redis-t").await;
    let atomic = kube::ATOMIC_SNAPSHOT_CLASS;
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: shop, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: p, selector: {{matchLabels: {{app: mp}}}}}}\n  \
             - {{name: r, selector: {{matchLabels: {{app: mr}}}}, primary: p}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {atomic}}}\n  freezeBudget: 20s\n---\n\
             apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: tight, namespace: {ns}}}\n\
             spec:\n  members:\n  - {{name: t, selector: {{matchLabels: {{app: mt}}}}}}\n\
             \x20 snapshot: {{driver: csi, volumeSnapshotClassName: {atomic}}}\n  freezeBudget: 1ms\n---\n\
             apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: yearly, namespace: {ns}}}\n\
             spec: {{group: shop, schedule: \"0 0 1 1 *\"}}\n"
        ))
        .await;
    space.protectable("shop", "True").await;
    space.protectable("tight", "True").await;

    // A real Prometheus scraping what the chart's ServiceMonitor and
    // PodMonitor select, evaluating the chart's PrometheusRule as installed.
    let rule = monitoring_object(
        &admin,
        "PrometheusRule",
        stillpoint::CONTROLLER_NS,
        "stillpoint",
    )
    .await;
    let rules = serde_yaml::to_string(&rule["spec"]).unwrap();
    let scrape = scrape_configs(&admin, stillpoint::CONTROLLER_NS).await;
    let prometheus = tokio::task::block_in_place(|| {
        stillpoint_tests::harness::prometheus::Prometheus::start(&scrape, &rules)
    })
    .unwrap();
    // Every target up, the agents' named by their pods.
    wait_async("every target up", BOUND, || {
        let prometheus = &prometheus;
        async move {
            let targets = prometheus.targets().unwrap();
            Ok(targets.len() >= 5 && targets.iter().all(|(_, h)| h == "up"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", prometheus.targets()));
    // The leader created the groups' series at zero, and Prometheus has
    // seen them so: the first failure is an increase.
    let failed =
        format!("stillpoint_backups_total{{namespace=\"{ns}\",group=\"tight\",result=\"failed\"}}");
    scraped(&prometheus, &format!("{failed} == 0")).await;

    // Through the chart-installed controller, under the chart's RBAC and
    // admission policies: shop backs up, tight fails its budget.
    for name in ["ok-1", "ok-2"] {
        let done = space.backup(name, "shop").await;
        assert_eq!(
            status_of_phase(&done),
            Some(BackupPhase::Succeeded),
            "{:#?}",
            done.status
        );
    }
    let tight = space.backup("tight-1", "tight").await;
    let s = status(&tight);
    assert_eq!(s.phase, Some(BackupPhase::Failed), "{s:#?}");
    let completed = s.conditions.iter().find(|c| c.type_ == "Completed");
    assert_eq!(
        completed.map(|c| c.reason.as_str()),
        Some("BudgetExceeded"),
        "{s:#?}"
    );
    let r = restore(
        &space,
        "r-1",
        "{backup: ok-1, volumesOnly: true, pvcPrefix: r-}",
    )
    .await;
    assert_eq!(
        r.status.as_ref().and_then(|s| s.phase),
        Some(stillpoint_controller::kube::crd::RestorePhase::Succeeded),
        "{:#?}",
        r.status
    );
    scraped(&prometheus, &format!("{failed} == 1")).await;

    // The consistency-failure alert is pending or firing for tight, and
    // the budget's; nothing is for shop, and a replica leads.
    let alerts_now = || prometheus.alerts().unwrap();
    wait_async("StillpointBackupFailed for tight", BOUND, || async {
        Ok(alerts_now().iter().any(|a| {
            a.name() == "StillpointBackupFailed"
                && a.labels.get("group").map(String::as_str) == Some("tight")
                && a.labels.get("namespace") == Some(&ns)
                && ["pending", "firing"].contains(&a.state.as_str())
        }))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", alerts_now(), prometheus.log_text()));
    // Its rule group is evaluated on its own schedule, not with the one
    // above: waited for in turn.
    wait_async(
        "StillpointFreezeBudgetExceeded for tight",
        BOUND,
        || async {
            Ok(alerts_now().iter().any(|a| {
                a.name() == "StillpointFreezeBudgetExceeded"
                    && a.labels.get("group").map(String::as_str) == Some("tight")
            }))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}\n{}", alerts_now(), prometheus.log_text()));
    let alerts = alerts_now();
    for a in &alerts {
        assert_ne!(
            a.labels.get("group").map(String::as_str),
            Some("shop"),
            "{a:?}"
        );
        assert_ne!(a.name(), "StillpointControllerNoLeader", "{a:?}");
        assert_ne!(a.name(), "StillpointNoRecentBackup", "{a:?}");
    }

    // Every query of the dashboard returns data for this namespace.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let queries = stillpoint_tests::chart::dashboard_queries(&ns, ".*").unwrap();
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        if prometheus.query(expr).unwrap().is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    // The figures the panels stand on are the backups just made.
    let results = prometheus
        .query(&format!(
            "sum by (group, result) (stillpoint_backups_total{{namespace=\"{ns}\"}}) > 0"
        ))
        .unwrap();
    let mut seen: Vec<(String, String, f64)> = results
        .iter()
        .map(|s| {
            (
                s.labels["group"].clone(),
                s.labels["result"].clone(),
                s.value,
            )
        })
        .collect();
    seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(
        seen,
        [
            ("shop".to_string(), "succeeded".to_string(), 2.0),
            ("tight".to_string(), "failed".to_string(), 1.0)
        ]
    );
    if let Ok(out) = std::env::var("STILLPOINT_DASHBOARD_OUT") {
        dashboard_picture(&space, &prometheus, &out).await;
    }
    nothing_leaked(&space).await;
}

/// More backups of both groups over a few minutes, then every panel's
/// queries over that time, written as JSON to `out` (for the picture in
/// the README: `tests/support/render_dashboard.py`).
async fn dashboard_picture(
    space: &Space,
    prometheus: &stillpoint_tests::harness::prometheus::Prometheus,
    out: &str,
) {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 120.0;
    for i in 0..24 {
        space.backup(&format!("more-{i}"), "shop").await;
        if i % 6 == 5 {
            space.backup(&format!("tight-more-{i}"), "tight").await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let queries = stillpoint_tests::chart::dashboard_queries(&space.ns, ".*").unwrap();
    let mut panels: Vec<serde_json::Value> = Vec::new();
    for (title, expr) in queries {
        let expr = expr.replace("[1h]", "[2m]").replace("[6h]", "[2m]");
        let result = prometheus.query_range(&expr, start, end, 2.0).unwrap();
        panels.push(serde_json::json!({"title": title, "expr": expr, "result": result}));
    }
    std::fs::write(out, serde_json::to_string_pretty(&panels).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_stillpoint_is_the_cli_in_kubernetes_mode_with_kubectls_context_and_namespace_flags()
 {
    let space = Space::new("plugin").await;
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: listed, namespace: {ns}}}\n\
             spec: {{group: nothing}}"
        ))
        .await;
    // The lab's admin as context `lab` (namespace: this test's), and a
    // current context that leads nowhere.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&space.lab.admin_kubeconfig).unwrap())
            .unwrap();
    let mut lab_context = config["contexts"][0].clone();
    lab_context["name"] = "lab".into();
    lab_context["context"]["namespace"] = ns.clone().into();
    let mut nowhere = config["clusters"][0].clone();
    nowhere["name"] = "nowhere".into();
    nowhere["cluster"]["server"] = "https://127.0.0.1:9".into();
    let mut elsewhere = lab_context.clone();
    elsewhere["name"] = "elsewhere".into();
    elsewhere["context"]["cluster"] = "nowhere".into();
    config["contexts"] = serde_yaml::Value::Sequence(vec![lab_context, elsewhere]);
    config["clusters"].as_sequence_mut().unwrap().push(nowhere);
    config["current-context"] = "elsewhere".into();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&config).unwrap()).unwrap();

    let plugin = stillpoint_tests::harness::agent::controller_binary()
        .unwrap()
        .with_file_name("kubectl-stillpoint");
    let run = |args: &[&str], env_kubeconfig: bool| {
        let mut c = std::process::Command::new(&plugin);
        c.env_remove("KUBECONFIG")
            .env("HOME", dir.path())
            .args(args);
        if env_kubeconfig {
            c.env("KUBECONFIG", &kubeconfig);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = kubeconfig.to_str().unwrap();
    // --kubeconfig and --context, the namespace the context's; and
    // KUBECONFIG with -n after the command, as kubectl users type it.
    for (args, env) in [
        (
            vec!["--kubeconfig", file, "--context", "lab", "backup", "list"],
            false,
        ),
        (
            vec!["backup", "list", "--context", "lab", "-n", ns.as_str()],
            true,
        ),
    ] {
        let (ok, out, err) = run(&args, env);
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains("listed"), "{args:?}: {out}");
    }
    // Its current context is used when none is named: here, nowhere.
    let (ok, _, err) = run(&["backup", "list"], true);
    assert!(!ok, "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("kubectl stillpoint: ")),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    // Another namespace has none of this one's backups.
    let (ok, out, err) = run(
        &["backup", "list", "--context", "lab", "-n", "default"],
        true,
    );
    assert!(ok, "{err}");
    assert!(!out.contains("listed"), "{out}");
    // Its help speaks of it as kubectl stillpoint.
    let (ok, out, _) = run(&["--help"], false);
    assert!(ok && out.contains("Usage: kubectl stillpoint"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_positions_move_does_not_rewrite_its_status_in_a_loop() {
    // A noop agent's position moves with every Describe, as a busy
    // database's does with every write.
    let space = Space::new("moving").await;
    let ns = space.ns.clone();
    space.identity("mover").await;
    let container = stillpoint::agent_container("noop", "", "agent-tls", "data");
    space
        .apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: mover, namespace: {ns}, labels: {{app: mover}}}}\n\
             spec:\n  serviceAccountName: mover\n  containers:\n{container}  volumes:\n  \
             - {{name: data, emptyDir: {{}}}}\n  - {{name: agent-tls, secret: {{secretName: agent-mover}}}}\n\
             ---\napiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: moving, namespace: {ns}}}\n\
             spec: {{members: [{{name: m, selector: {{matchLabels: {{app: mover}}}}}}], snapshot: {{driver: csi, atomic: true}}}}\n"
        ))
        .await;
    space.ready("mover").await;
    let _controller = ControllerProc::start_with(
        space.lab,
        space.installed,
        &ns,
        "moving-a",
        &format!("lease-{ns}"),
        &["--resync", "30s"],
    )
    .await
    .unwrap();
    // Its status carries a position, and within the resync period nothing
    // rewrites it (before, each write was a watch event that reconciled the
    // group again, which saw a new position and wrote again, in a loop).
    let position = |g: &ConsistencyGroup| {
        g.status
            .as_ref()
            .and_then(|s| s.members.first())
            .and_then(|m| m.position.clone())
    };
    wait_async(
        "the group's member resolved with a position",
        BOUND,
        || async { Ok(position(&space.groups().get("moving").await?).is_some()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = space.groups().get("moving").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = space.groups().get("moving").await.unwrap();
    assert_eq!(
        later.metadata.resource_version,
        first.metadata.resource_version,
        "the status was rewritten: {:?} then {:?}",
        position(&first),
        position(&later)
    );
}
