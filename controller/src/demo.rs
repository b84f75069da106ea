//! The demo cluster: PostgreSQL, MariaDB and Redis, each a primary and a
//! replica, on a loop-mounted btrfs image (every data directory its own
//! subvolume), six agents over mTLS, a causal writer workload, group backups
//! with the btrfs snapshotter, and a restore that starts every member and
//! checks the consistent-cut invariant and replica alignment.
//!
//! `stillpoint demo` runs it once; the end-to-end tests run it for many
//! backups in a row. Everything is removed on drop.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mysql_async::prelude::Queryable;
use tokio::sync::watch;

use crate::agents::ControllerTls;
use crate::catalog::{Catalog, Manifest};
use crate::certs;
use crate::config::{Driver, Group, MemberFile, RoleHint};
use crate::orchestrator::Orchestrator;
use crate::servers::agent::{AgentProc, AgentSpec};
use crate::servers::loopfs::LoopMount;
use crate::servers::mariadb::{MariaPair, MariaRestored};
use crate::servers::postgres::{PgPair, PgRestored};
use crate::servers::redis::{RedisPair, RedisRestored};
use crate::servers::run;

/// One member of the demo group: name, engine, DSN, role, primary, volume, extra agent settings.
struct DemoMember {
    name: &'static str,
    engine: &'static str,
    dsn: String,
    role: RoleHint,
    primary: Option<&'static str>,
    volume: PathBuf,
    env: Vec<(&'static str, String)>,
}

const CONTROLLER: &str = "spiffe://stillpoint.demo/ns/stillpoint/sa/controller";
const DB: &str = "demo";

fn identity(member: &str) -> String {
    format!("spiffe://stillpoint.demo/ns/demo/sa/{member}")
}

/// The running demo cluster. Fields drop in order: agents, servers, the
/// work dir, and last the btrfs mount.
#[derive(Debug)]
pub struct Cluster {
    agents: Vec<AgentProc>,
    pub pg: PgPair,
    pub maria: MariaPair,
    pub redis: RedisPair,
    pub group: Group,
    pub orchestrator: Orchestrator,
    work: tempfile::TempDir,
    mount: LoopMount,
}

/// Ids whose whole causal chain was acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Acked {
    /// Chain A: PostgreSQL, then MariaDB, then Redis.
    pub a: Vec<i32>,
    /// Chain B: Redis, then MariaDB, then PostgreSQL.
    pub b: Vec<i32>,
}

/// A running causal writer.
#[derive(Debug)]
pub struct Workload {
    stop: watch::Sender<bool>,
    acked: Arc<Mutex<Acked>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Workload {
    /// Stops the writer and returns what it saw acknowledged.
    pub async fn stop(self) -> Result<Acked> {
        let _ = self.stop.send(true);
        self.task.await.context("the workload task")??;
        Ok(self.acked.lock().unwrap().clone())
    }

    pub fn acked(&self) -> Acked {
        self.acked.lock().unwrap().clone()
    }
}

/// What one restored backup contained.
#[derive(Debug, Clone)]
pub struct Verified {
    pub backup: String,
    /// Rows of chain A in the restored PostgreSQL primary.
    pub chain_a: usize,
    pub chain_b: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sets {
    a: BTreeSet<i32>,
    b: BTreeSet<i32>,
}

impl Cluster {
    /// Mounts btrfs, starts the six servers and six agents, issues the PKI.
    pub async fn start(agent_binary: &Path, say: impl Fn(&str)) -> Result<Cluster> {
        say("mounting a btrfs image (sparse, 4 GiB)");
        let mount = tokio::task::spawn_blocking(|| LoopMount::btrfs(4096)).await??;
        let base = mount.path().to_path_buf();
        say("starting PostgreSQL, MariaDB and Redis, each a primary and a replica");
        let (b1, b2, b3) = (base.clone(), base.clone(), base.clone());
        let pg = tokio::task::spawn_blocking(move || PgPair::start_in(Some(&b1)));
        let maria = tokio::task::spawn_blocking(move || MariaPair::start_in(Some(&b2)));
        let redis = tokio::task::spawn_blocking(move || RedisPair::start_in(Some(&b3), true));
        let (pg, maria, redis) = (pg.await??, maria.await??, redis.await??);
        pg.primary.psql(&format!("CREATE DATABASE {DB}"))?;
        let (c, conn) =
            tokio_postgres::connect(&pg.primary.conninfo(DB), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE chain_a (id int PRIMARY KEY); CREATE TABLE chain_b (id int PRIMARY KEY)",
        )
        .await?;
        maria.primary.sql(&format!(
            "CREATE DATABASE {DB}; CREATE TABLE {DB}.chain_a (id INT PRIMARY KEY) ENGINE=InnoDB; \
             CREATE TABLE {DB}.chain_b (id INT PRIMARY KEY) ENGINE=InnoDB"
        ))?;

        say("issuing throwaway certificates");
        let work = tempfile::Builder::new()
            .prefix("stillpoint-demo-")
            .tempdir()?;
        let pki = certs::ScratchPki::new(&work.path().join("pki"), "Stillpoint demo CA")?;
        let issue = |name: &str, uri: &str| pki.issue(name, uri);
        let controller_dir = issue("controller", CONTROLLER)?;

        say("starting six agents (mTLS)");
        let maria_url = |port: u16| format!("mysql://root@127.0.0.1:{port}/");
        // btrfs snapshots are atomic: no WAL needs keeping past the thaw.
        let fence = || {
            vec![
                ("STILLPOINT_PG_MODE", "fence".to_string()),
                ("STILLPOINT_PG_WAL_RETAIN", "0s".to_string()),
            ]
        };
        let m = |name, engine, dsn, role, primary, volume: &Path, env| DemoMember {
            name,
            engine,
            dsn,
            role,
            primary,
            volume: volume.to_path_buf(),
            env,
        };
        let members = vec![
            m(
                "pg-0",
                "postgres",
                pg.primary.conninfo(DB),
                RoleHint::Primary,
                None,
                &pg.primary.data,
                fence(),
            ),
            m(
                "pg-1",
                "postgres",
                pg.replica.conninfo(DB),
                RoleHint::Replica,
                Some("pg-0"),
                &pg.replica.data,
                fence(),
            ),
            m(
                "maria-0",
                "mariadb",
                maria_url(maria.primary.port),
                RoleHint::Primary,
                None,
                &maria.primary.data,
                vec![],
            ),
            m(
                "maria-1",
                "mariadb",
                maria_url(maria.replica.port),
                RoleHint::Replica,
                Some("maria-0"),
                &maria.replica.data,
                vec![],
            ),
            m(
                "redis-0",
                "redis",
                redis.primary.url(),
                RoleHint::Primary,
                None,
                &redis.primary.dir,
                vec![],
            ),
            m(
                "redis-1",
                "redis",
                redis.replica.url(),
                RoleHint::Replica,
                Some("redis-0"),
                &redis.replica.dir,
                vec![],
            ),
        ];
        let mut agents = Vec::new();
        let mut group_members = Vec::new();
        for DemoMember {
            name,
            engine,
            dsn,
            role,
            primary,
            volume,
            env,
        } in members
        {
            let files = stillpoint_proto::tls::TlsFiles::in_dir(&issue(name, &identity(name))?);
            let mut spec = AgentSpec::new(name, engine, files, CONTROLLER)
                .with("STILLPOINT_DSN", &dsn)
                .with(
                    "STILLPOINT_STATE_DIR",
                    &work.path().join("state").join(name).display().to_string(),
                );
            for (k, v) in env {
                spec = spec.with(k, &v);
            }
            let proc = AgentProc::spawn_with(agent_binary, &spec)?;
            group_members.push(MemberFile {
                name: name.into(),
                agent: proc.grpc_addr(),
                identity: identity(name),
                role,
                primary: primary.map(str::to_string),
                volumes: vec![volume],
                restore_stage: None,
                fsfreeze: false,
            });
            agents.push(proc);
        }
        let snapshots = base.join("snapshots");
        std::fs::create_dir_all(&snapshots)?;
        let group = Group {
            name: "demo".into(),
            driver: Driver::Btrfs,
            snapshot_dir: snapshots,
            exec: None,
            freeze_budget: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            align_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            members: group_members,
        };
        let orchestrator = Orchestrator {
            tls: ControllerTls::watch(
                stillpoint_proto::tls::TlsFiles::in_dir(&controller_dir),
                Duration::from_secs(60),
            )?,
            catalog: Catalog::open(&work.path().join("catalog"))?,
        };
        Ok(Cluster {
            agents,
            pg,
            maria,
            redis,
            group,
            orchestrator,
            work,
            mount,
        })
    }

    /// Starts the causal writer: each step is written only after the
    /// previous one was acknowledged.
    pub async fn workload(&self) -> Result<Workload> {
        let (pg, conn) =
            tokio_postgres::connect(&self.pg.primary.conninfo(DB), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let mut maria = mysql_async::Conn::from_url(self.maria.primary.url(DB)).await?;
        let mut redis = redis::Client::open(self.redis.primary.url())?
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new().set_response_timeout(None),
            )
            .await?;
        let (stop, mut stopped) = watch::channel(false);
        let acked = Arc::new(Mutex::new(Acked::default()));
        let record = acked.clone();
        let task = tokio::spawn(async move {
            for id in 1.. {
                if *stopped.borrow_and_update() {
                    break;
                }
                pg.execute("INSERT INTO chain_a VALUES ($1)", &[&id])
                    .await?;
                maria
                    .exec_drop("INSERT INTO chain_a VALUES (?)", (id,))
                    .await?;
                redis::cmd("SET")
                    .arg(format!("a:{id}"))
                    .arg(1)
                    .query_async::<()>(&mut redis)
                    .await?;
                record.lock().unwrap().a.push(id);
                redis::cmd("SET")
                    .arg(format!("b:{id}"))
                    .arg(1)
                    .query_async::<()>(&mut redis)
                    .await?;
                maria
                    .exec_drop("INSERT INTO chain_b VALUES (?)", (id,))
                    .await?;
                pg.execute("INSERT INTO chain_b VALUES ($1)", &[&id])
                    .await?;
                record.lock().unwrap().b.push(id);
            }
            Ok(())
        });
        Ok(Workload { stop, acked, task })
    }

    /// Takes one group backup.
    pub async fn backup(&self, id: &str) -> Result<Manifest> {
        Ok(self.orchestrator.backup(&self.group, id).await?)
    }

    /// Restores `manifest`, starts every member from it, and checks the
    /// consistent-cut invariant and that each replica holds exactly its
    /// primary's data.
    pub async fn verify(&self, manifest: &Manifest) -> Result<Verified> {
        let to = self.work.path().join("restore").join(&manifest.id);
        let restored = crate::restore::restore_files(manifest, &to)?;
        let path = |member: &str| -> Result<PathBuf> {
            restored
                .iter()
                .find(|r| r.member == member)
                .map(|r| r.path.clone())
                .with_context(|| format!("{member} was not restored"))
        };
        let fill = |from: PathBuf, into: &Path| -> Result<()> {
            run(
                std::process::Command::new("cp")
                    .arg("-a")
                    .arg(&from)
                    .arg(into),
                "copying a restored volume",
            )
            .map(drop)
        };
        let mut sets = Vec::new();
        for member in ["pg-0", "pg-1"] {
            // An atomic snapshot restores by crash recovery: no backup_label.
            if path(member)?.join("backup_label").exists() {
                bail!("{member} was restored with a backup_label from an atomic snapshot");
            }
            let server = PgRestored::new()?;
            fill(path(member)?, server.data_dir())?;
            tokio::task::block_in_place(|| server.start())?;
            let (c, conn) =
                tokio_postgres::connect(&server.server.conninfo(DB), tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let ids = |table: &'static str| {
                let c = &c;
                async move {
                    Ok::<_, anyhow::Error>(
                        c.query(&format!("SELECT id FROM {table}"), &[])
                            .await?
                            .iter()
                            .map(|r| r.get::<_, i32>(0))
                            .collect::<BTreeSet<i32>>(),
                    )
                }
            };
            sets.push((
                member,
                Sets {
                    a: ids("chain_a").await?,
                    b: ids("chain_b").await?,
                },
            ));
        }
        for member in ["maria-0", "maria-1"] {
            let server = MariaRestored::new()?;
            fill(path(member)?, server.data_dir())?;
            tokio::task::block_in_place(|| server.start())?;
            let mut c = mysql_async::Conn::from_url(server.server.url(DB)).await?;
            let a: Vec<i32> = c.query("SELECT id FROM chain_a").await?;
            let b: Vec<i32> = c.query("SELECT id FROM chain_b").await?;
            c.disconnect().await?;
            sets.push((
                member,
                Sets {
                    a: a.into_iter().collect(),
                    b: b.into_iter().collect(),
                },
            ));
        }
        for member in ["redis-0", "redis-1"] {
            let server = RedisRestored::new()?;
            fill(path(member)?, server.data_dir())?;
            tokio::task::block_in_place(|| server.start())?;
            let mut c = redis::Client::open(server.server.url())?
                .get_multiplexed_async_connection()
                .await?;
            let keys = |prefix: &'static str| {
                let mut c = c.clone();
                async move {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}:*"))
                        .query_async(&mut c)
                        .await?;
                    Ok::<_, anyhow::Error>(
                        keys.iter()
                            .filter_map(|k| k.split_once(':')?.1.parse().ok())
                            .collect::<BTreeSet<i32>>(),
                    )
                }
            };
            let a = keys("a").await?;
            let b = keys("b").await?;
            let _ = &mut c;
            sets.push((member, Sets { a, b }));
        }
        let get = |m: &str| {
            sets.iter()
                .find(|(n, _)| *n == m)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        let (pg, maria, redis) = (get("pg-0"), get("maria-0"), get("redis-0"));
        let mut problems = Vec::new();
        // Chain A is written PostgreSQL → MariaDB → Redis: a later step
        // present means every earlier one is.
        let missing = |later: &BTreeSet<i32>, earlier: &BTreeSet<i32>| -> Vec<i32> {
            later.difference(earlier).copied().take(5).collect()
        };
        for (what, later, earlier) in [
            ("chain A: in MariaDB but not PostgreSQL", &maria.a, &pg.a),
            ("chain A: in Redis but not MariaDB", &redis.a, &maria.a),
            ("chain B: in MariaDB but not Redis", &maria.b, &redis.b),
            ("chain B: in PostgreSQL but not MariaDB", &pg.b, &maria.b),
        ] {
            let m = missing(later, earlier);
            if !m.is_empty() {
                problems.push(format!("{what}: ids {m:?}"));
            }
        }
        for (primary, replica) in [
            ("pg-0", "pg-1"),
            ("maria-0", "maria-1"),
            ("redis-0", "redis-1"),
        ] {
            if get(primary) != get(replica) {
                problems.push(format!(
                    "replica {replica} does not hold exactly its primary {primary}'s data"
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "backup {} is not a consistent cut: {}",
                manifest.id,
                problems.join("; ")
            );
        }
        let _ = std::fs::remove_dir_all(&to);
        Ok(Verified {
            backup: manifest.id.clone(),
            chain_a: pg.a.len(),
            chain_b: pg.b.len(),
        })
    }

    /// Every acknowledged write is in the live primaries.
    pub async fn nothing_lost(&self, acked: &Acked) -> Result<()> {
        let (c, conn) =
            tokio_postgres::connect(&self.pg.primary.conninfo(DB), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let count = |table: &str| format!("SELECT count(*) FROM {table}");
        let pg_a: i64 = c.query_one(&count("chain_a"), &[]).await?.get(0);
        let pg_b: i64 = c.query_one(&count("chain_b"), &[]).await?.get(0);
        let mut m = mysql_async::Conn::from_url(self.maria.primary.url(DB)).await?;
        let maria_a: Option<i64> = m.query_first(count("chain_a")).await?;
        let maria_b: Option<i64> = m.query_first(count("chain_b")).await?;
        m.disconnect().await?;
        let (a, b) = (acked.a.len() as i64, acked.b.len() as i64);
        if pg_a < a || pg_b < b || maria_a.unwrap_or(0) < a || maria_b.unwrap_or(0) < b {
            bail!(
                "acknowledged writes are missing: acked a={a} b={b}; PostgreSQL a={pg_a} b={pg_b}; \
                 MariaDB a={maria_a:?} b={maria_b:?}"
            );
        }
        Ok(())
    }

    /// The six agents.
    pub fn agents(&self) -> &[AgentProc] {
        &self.agents
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.group.snapshot_dir
    }

    pub fn mount(&self) -> &Path {
        self.mount.path()
    }
}
