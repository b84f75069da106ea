//! The lab's applications: a namespace of a test ([`Space`]) and the
//! workloads the Kubernetes-mode tests and benchmarks run in it —
//! PostgreSQL, MariaDB and Redis primaries and replicas as StatefulSets
//! with the agent as a sidecar, and the ConsistencyGroup `shop` over them.

use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use k8s_openapi::api::core::v1::Pod;
use stillpoint_controller::kube::crd::{BackupPhase, ConsistencyGroup, GroupBackup};

use crate::harness::kube::stillpoint::{self, ControllerProc, Installed};
use crate::harness::kube::{self, KubeLab, pod_ip, wait_async, wait_pod_ready, wait_pvc_bound};

fn lab() -> &'static KubeLab {
    tokio::task::block_in_place(KubeLab::shared)
}

pub const BOUND: Duration = Duration::from_secs(120);

/// The uid and gid of a host user (the lab runs containers as host users).
pub fn user(name: &str) -> (u32, u32) {
    kube::host_user(name).unwrap()
}

/// Everything one namespace of a test holds.
pub struct Space {
    pub lab: &'static KubeLab,
    pub installed: &'static Installed,
    pub admin: ::kube::Client,
    pub ns: String,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

impl Space {
    /// A namespace of a lab of a test's own, with a PKI of its own.
    pub fn in_lab(lab: &'static KubeLab, admin: ::kube::Client, ns: String) -> Space {
        Space {
            lab,
            installed: Box::leak(Box::new(Installed::new().unwrap())),
            admin,
            ns,
        }
    }

    pub async fn new(prefix: &str) -> Space {
        Self::with_lab(lab(), prefix).await
    }

    /// A namespace of `lab`, with `deploy/` installed in it once.
    pub async fn with_lab(lab: &'static KubeLab, prefix: &str) -> Space {
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

    pub async fn apply(&self, yaml: &str) {
        stillpoint::apply_all(self.lab, &self.admin, yaml)
            .await
            .unwrap();
    }

    /// A ServiceAccount and the Secret with its agent identity (`agent-<sa>`).
    pub async fn identity(&self, sa: &str) {
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

    pub async fn pvc(&self, name: &str, source: Option<&str>) {
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

    /// A VolumeSnapshotClass and a VolumeGroupSnapshotClass `name` of the
    /// lab's driver, said to be atomic, with class `parameters` (a YAML map).
    pub async fn atomic_classes(&self, name: &str, parameters: &str) {
        let driver = kube::csi::DRIVER;
        for (api, kind) in [
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
            (
                "groupsnapshot.storage.k8s.io/v1",
                "VolumeGroupSnapshotClass",
            ),
        ] {
            self.apply(&format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, annotations: {{stillpoint.dev/atomic: \"true\"}}}}\n\
                 driver: {driver}\ndeletionPolicy: Delete\nparameters: {parameters}\n"
            ))
            .await;
        }
    }

    pub async fn ready(&self, pod: &str) -> Pod {
        wait_pod_ready(&self.admin, &self.ns, pod, BOUND)
            .await
            .unwrap()
    }

    pub async fn controller(&self, identity: &str, lease: &str) -> ControllerProc {
        ControllerProc::start(self.lab, self.installed, &self.ns, identity, lease)
            .await
            .unwrap()
    }

    pub fn backups(&self) -> Api<GroupBackup> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn groups(&self) -> Api<ConsistencyGroup> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Creates GroupBackup `name` of `group` and waits for its final phase.
    pub async fn backup(&self, name: &str, group: &str) -> GroupBackup {
        let ns = &self.ns;
        self.apply(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: GroupBackup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{group: {group}}}"
        ))
        .await;
        self.finished(name).await
    }

    pub async fn finished(&self, name: &str) -> GroupBackup {
        self.finished_within(name, BOUND).await
    }

    /// Waits up to `bound` for GroupBackup `name`'s final phase.
    pub async fn finished_within(&self, name: &str, bound: Duration) -> GroupBackup {
        let api = self.backups();
        wait_async(&format!("GroupBackup {name} to end"), bound, || {
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

    /// Switches `group` to snapshot `driver` and waits until it is
    /// Protectable with it.
    pub async fn use_driver(&self, group: &str, driver: &str) {
        self.groups()
            .patch(
                group,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "snapshot": { "driver": driver } } })),
            )
            .await
            .unwrap();
        self.protectable(group, "True").await;
    }

    /// Waits until the group's `Protectable` condition has `status`, and
    /// returns its reason and message.
    pub async fn protectable(&self, group: &str, status: &str) -> (String, String) {
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

pub fn group_yaml(ns: &str, name: &str, driver: &str, members: &str) -> String {
    let atomic = kube::ATOMIC_SNAPSHOT_CLASS;
    format!(
        "apiVersion: stillpoint.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  members:\n{members}  snapshot: {{driver: {driver}, volumeSnapshotClassName: {atomic}, \
         volumeGroupSnapshotClassName: {atomic}}}\n  freezeBudget: 20s\n  leaseTTL: 5s\n  alignTimeout: 10s\n"
    )
}

pub async fn pg_connect(pod: &Pod) -> tokio_postgres::Client {
    kube::postgres_of(pod).await.unwrap()
}

pub async fn redis_connect(pod: &Pod) -> redis::aio::MultiplexedConnection {
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

/// Waits until both replicas stream from their primaries.
pub async fn streaming(pg1: &Pod, redis1: &Pod) {
    let replica = pg_connect(pg1).await;
    let cache = redis_connect(redis1).await;
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
}

/// The shop of the restore tests as StatefulSets: PostgreSQL and Redis,
/// primary and replica each (replicas streaming), its group `shop`, each
/// PostgreSQL StatefulSet's YAML passed through `pg`. Returns the
/// primaries.
pub async fn shop_statefulsets(space: &Space, pg: impl Fn(String) -> String) -> (Pod, Pod) {
    let ns = space.ns.clone();
    for sa in ["pg", "redis"] {
        space.identity(sa).await;
    }
    for (name, port) in [("pg", 5432), ("redis", 6379)] {
        space
            .apply(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{clusterIP: None, selector: {{app: {name}}}, ports: [{{port: {port}}}]}}\n"
            ))
            .await;
    }
    space
        .apply(&pg(sts_yaml(&ns, "pg", "postgres", None, Run::Original)))
        .await;
    space
        .apply(&sts_yaml(&ns, "redis", "redis", None, Run::Original))
        .await;
    let pg0 = space.ready("pg-0").await;
    let redis0 = space.ready("redis-0").await;
    // The replicas name their primaries as users write it: the primary's
    // pod by its StatefulSet's headless Service, relative to the namespace.
    space
        .apply(&pg(sts_yaml(
            &ns,
            "pg-replica",
            "postgres",
            Some("pg-0.pg"),
            Run::Original,
        )))
        .await;
    space
        .apply(&sts_yaml(
            &ns,
            "redis-replica",
            "redis",
            Some("redis-0.redis"),
            Run::Original,
        ))
        .await;
    let pg1 = space.ready("pg-replica-0").await;
    let redis1 = space.ready("redis-replica-0").await;
    streaming(&pg1, &redis1).await;
    let members = "  - {name: pg, selector: {matchLabels: {app: pg}}}\n  - {name: pg-replica, selector: {matchLabels: {app: pg-replica}}}\n  \
                   - {name: cache, selector: {matchLabels: {app: redis}}}\n  - {name: cache-replica, selector: {matchLabels: {app: redis-replica}}}\n";
    space.apply(&group_yaml(&ns, "shop", "csi", members)).await;
    (pg0, redis0)
}

/// [`shop_statefulsets`] with settings the PostgreSQL pods read (ConfigMap
/// `shop-settings`, Secret `shop-password`), and a MariaDB primary and
/// replica (`maria`, `maria-replica`, the replica naming its primary
/// `maria-0.maria`) in the group. Returns the primaries: PostgreSQL,
/// MariaDB, Redis.
pub async fn shop_with_settings(space: &Space) -> [Pod; 3] {
    let ns = space.ns.clone();
    space
        .apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: shop-settings, namespace: {ns}}}\n\
             data: {{greeting: hello}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-password, namespace: {ns}}}\n\
             stringData: {{PASSWORD: s3cret}}\n"
        ))
        .await;
    let (pg0, redis0) = shop_statefulsets(space, |yaml: String| {
        yaml.replace(
            "        image: postgres:15\n",
            "        image: postgres:15\n        envFrom: [{configMapRef: {name: shop-settings}}, {secretRef: {name: shop-password}}]\n",
        )
    })
    .await;
    space.identity("maria").await;
    space
        .apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: maria, namespace: {ns}}}\n\
             spec: {{clusterIP: None, selector: {{app: maria}}, ports: [{{port: 3306}}]}}\n"
        ))
        .await;
    space
        .apply(&sts_yaml(&ns, "maria", "mariadb", None, Run::Original))
        .await;
    let maria0 = space.ready("maria-0").await;
    space
        .apply(&sts_yaml(
            &ns,
            "maria-replica",
            "mariadb",
            Some("maria-0.maria"),
            Run::Original,
        ))
        .await;
    maria_follows(&space.ready("maria-replica-0").await).await;
    // The shop's group, with MariaDB's members too.
    let members: Vec<serde_json::Value> = [
        ("pg", "pg"),
        ("pg-replica", "pg-replica"),
        ("maria", "maria"),
        ("maria-replica", "maria-replica"),
        ("cache", "redis"),
        ("cache-replica", "redis-replica"),
    ]
    .into_iter()
    .map(|(name, app)| serde_json::json!({"name": name, "selector": {"matchLabels": {"app": app}}}))
    .collect();
    space
        .groups()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"members": members}})),
        )
        .await
        .unwrap();
    [pg0, maria0, redis0]
}

/// Waits until MariaDB `replica` replicates (both threads running).
pub async fn maria_follows(replica: &Pod) {
    use mysql_async::prelude::Queryable;
    let c = std::sync::Arc::new(tokio::sync::Mutex::new(maria_connect(replica).await));
    wait_async("the MariaDB replica replicating", BOUND, || {
        let c = c.clone();
        async move {
            let row: Option<mysql_async::Row> =
                c.lock().await.query_first("SHOW SLAVE STATUS").await?;
            Ok(row.is_some_and(|r| {
                r.get::<String, _>("Slave_IO_Running").as_deref() == Some("Yes")
                    && r.get::<String, _>("Slave_SQL_Running").as_deref() == Some("Yes")
            }))
        }
    })
    .await
    .unwrap();
}

pub async fn maria_connect(pod: &Pod) -> mysql_async::Conn {
    let ip = pod_ip(pod).unwrap();
    mysql_async::Conn::from_url(format!("mysql://root@{ip}:3306/"))
        .await
        .unwrap()
}

/// How a StatefulSet of the restore tests runs its server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Run {
    /// The original: a new primary, or a replica of `upstream`.
    Original,
    /// A copy for a restore: starts on restored data, follows no upstream.
    Copy,
    /// A copy whose readiness probe never passes.
    NeverReady,
    /// A copy whose server starts only after a few seconds.
    Slow,
}

/// The agent sidecar in a workload's pod template (identity `agent-tls`,
/// data volume `data`).
pub fn template_agent(engine: &str, dsn: &str) -> String {
    stillpoint::agent_container(engine, dsn, "agent-tls", "data")
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect()
}

/// A StatefulSet `name` of one pod running `engine` (`postgres` or
/// `redis`) with its agent, claim template `data`.
pub fn sts_yaml(ns: &str, name: &str, engine: &str, upstream: Option<&str>, run: Run) -> String {
    let (uid, gid) = user("postgres");
    let replicas = if run == Run::Original { 1 } else { 0 };
    let (sa, server) = match engine {
        "postgres" => {
            // The lab's pods share the host's PID namespace: a data
            // directory restored while its original runs holds a
            // postmaster.pid naming a live process (in a cluster, each
            // container's own PID namespace makes this moot).
            let start = match (run, upstream) {
                (Run::Original, None) => "rm -f /data/pgdata/postmaster.pid; test -f /data/pgdata/PG_VERSION || { initdb -D /data/pgdata -U postgres -A trust >/dev/null && \
                     echo 'host all all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf && \
                     echo 'host replication all 0.0.0.0/0 trust' >> /data/pgdata/pg_hba.conf; } && "
                    .to_string(),
                (Run::Original, Some(primary)) => format!(
                    "rm -f /data/pgdata/postmaster.pid; test -f /data/pgdata/PG_VERSION || pg_basebackup -h {primary} -U postgres -D /data/pgdata -R -X stream -C -S {} && \
                     chmod 700 /data/pgdata && ",
                    name.replace('-', "_")
                ),
                (Run::Slow, _) => "sleep 5 && rm -f /data/pgdata/postmaster.pid && ".to_string(),
                _ => "rm -f /data/pgdata/postmaster.pid && ".to_string(),
            };
            // A restored replica follows nobody: its upstream is the original.
            let follow = if run == Run::Original {
                ""
            } else {
                " -c primary_conninfo="
            };
            let probe = if run == Run::NeverReady {
                "[\"false\"]"
            } else {
                "[pg_isready, -h, 127.0.0.1]"
            };
            (
                "pg",
                format!(
                    r#"      - name: postgres
        image: postgres:15
        command: [sh, -c, "{start}exec postgres -D /data/pgdata -c listen_addresses=* -c unix_socket_directories=/tmp{follow}"]
        securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
        readinessProbe: {{exec: {{command: {probe}}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
"#
                ),
            )
        }
        "mariadb" => ("maria", maria_server(upstream)),
        _ => {
            let replica = match (run, upstream) {
                (Run::Original, Some(p)) => format!(", --replicaof, {p}, \"6379\""),
                _ => String::new(),
            };
            (
                "redis",
                format!(
                    r#"      - name: redis
        image: redis:7
        args: [--port, "6379", --dir, /data, --appendonly, "yes", --save, "", --protected-mode, "no"{replica}]
        readinessProbe: {{tcpSocket: {{port: 6379}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
"#
                ),
            )
        }
    };
    let dsn = match engine {
        "postgres" => "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        "mariadb" => "mysql://root@127.0.0.1:3306/",
        _ => "redis://127.0.0.1:6379",
    };
    let agent = template_agent(engine, dsn);
    format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: {name}, namespace: {ns}}}
spec:
  serviceName: {name}
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      serviceAccountName: {sa}
      terminationGracePeriodSeconds: 5
      containers:
{server}{agent}      volumes:
      - {{name: agent-tls, secret: {{secretName: agent-{sa}}}}}
  volumeClaimTemplates:
  - metadata: {{name: data}}
    spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
"#
    )
}

/// The MariaDB container of a StatefulSet: a primary, or a replica of
/// `upstream` (set up once, on its first start: afterwards it follows
/// whom its `master.info` names). Nothing its init file does is
/// binlogged: a restored server's GTID set is what it was frozen at.
pub fn maria_server(upstream: Option<&str>) -> String {
    let (uid, gid) = user("mysql");
    let (id, follow) = match upstream {
        None => (1, String::new()),
        Some(p) => (
            2,
            format!(
                " && echo \\\"CHANGE MASTER TO MASTER_HOST='{p}', MASTER_USER='root', MASTER_USE_GTID=slave_pos;\\\" >> /tmp/first.sql \
                 && echo \\\"START SLAVE;\\\" >> /tmp/first.sql"
            ),
        ),
    };
    let start = format!(
        "echo \\\"SET sql_log_bin=0;\\\" > /tmp/init.sql && \
         echo \\\"CREATE USER IF NOT EXISTS root@'%';\\\" >> /tmp/init.sql && \
         echo \\\"GRANT ALL ON *.* TO root@'%' WITH GRANT OPTION;\\\" >> /tmp/init.sql && \
         {{ test -d /data/db/mysql || {{ mariadb-install-db --no-defaults --datadir=/data/db \
            --auth-root-authentication-method=normal --skip-test-db >/dev/null 2>&1{follow}; }}; }} && \
         {{ test ! -f /tmp/first.sql || cat /tmp/first.sql >> /tmp/init.sql; }} && \
         exec mariadbd --no-defaults --datadir=/data/db --port=3306 --bind-address=0.0.0.0 \
            --socket=/tmp/mysqld.sock --pid-file=/tmp/mysqld.pid --skip-name-resolve \
            --innodb-buffer-pool-size=64M --server-id={id} --log-bin=/data/db/binlog \
            --binlog-format=ROW --init-file=/tmp/init.sql"
    );
    format!(
        r#"      - name: mariadb
        image: mariadb:10.11
        command: [sh, -c, "{start}"]
        securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
        readinessProbe: {{tcpSocket: {{port: 3306}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
"#
    )
}
