//! The demo cluster: PostgreSQL, MariaDB and Redis, each a primary and a
//! replica, on a loop-mounted btrfs image (every data directory its own
//! subvolume), six agents over mTLS, a causal writer workload, group backups
//! with the btrfs snapshotter, and a restore that starts every member and
//! checks the consistent-cut invariant and replica alignment.
//!
//! [`Options`] vary it the way operators' setups vary: Redis persistence
//! (AOF, RDB only), writes acknowledged before they are durable, and a
//! block layout (each data directory on its own loop-mounted ext4, cut by
//! the exec snapshotter as a reflink copy of the image: a block-level
//! snapshot that, like a cloud disk snapshot, does not see the page cache).
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

use crate::servers::Setup;
use crate::servers::agent::{AgentProc, AgentSpec};
use crate::servers::loopfs::LoopMount;
use crate::servers::mariadb::{MariaPair, MariaRestored};
use crate::servers::postgres::{PgPair, PgRestored};
use crate::servers::redis::{Persistence, RedisPair, RedisRestored};
use crate::servers::run;
use stillpoint_controller::certs;
use stillpoint_controller::core::agents::ControllerTls;
use stillpoint_controller::local::catalog::{Catalog, Manifest, MemberRecord};
use stillpoint_controller::local::config::{Driver, ExecTemplates, Group, MemberFile, RoleHint};
use stillpoint_controller::local::orchestrator::Orchestrator;

/// How the demo cluster is set up.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How Redis persists (default: the append-only file).
    pub redis: Persistence,
    /// Acknowledge writes before they are durable ([`Setup::relaxed`]).
    pub relaxed: bool,
    /// Data directories on loop devices, cut as reflink copies of their
    /// images ([`Setup::block`]) instead of btrfs subvolume snapshots.
    pub block: bool,
    /// The worst order on purpose: PostgreSQL in `backup` mode (its writes
    /// flow through the cut), and the cut made by the exec snapshotter as
    /// btrfs snapshots, each primary's volume at once and every other
    /// volume this long later.
    pub worst_order: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis: Persistence::Aof,
            relaxed: false,
            block: false,
            worst_order: None,
        }
    }
}

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
    pub options: Options,
    /// Certificates and agent state; removed on drop.
    _work: tempfile::TempDir,
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

/// How many causal writers run at once (each with its own connections).
pub const WRITERS: i32 = 4;

/// Running causal writers.
#[derive(Debug)]
pub struct Workload {
    stop: watch::Sender<bool>,
    acked: Arc<Mutex<Acked>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl Workload {
    /// Stops the writers and returns what they saw acknowledged.
    pub async fn stop(self) -> Result<Acked> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await.context("a workload task")??;
        }
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

/// One member restored for verification.
#[derive(Debug)]
struct Restored {
    name: String,
    /// Its restored data directory.
    data: PathBuf,
    /// Where its binlog basename is in the restore (MariaDB).
    log_bin: Option<PathBuf>,
}

impl Restored {
    fn new(
        m: &MemberRecord,
        volumes: Vec<(PathBuf, PathBuf)>,
        data: Option<PathBuf>,
    ) -> Result<Self> {
        Ok(Restored {
            name: m.name.clone(),
            data: data
                .with_context(|| format!("{}: its data directory is not in the restore", m.name))?,
            log_bin: stillpoint_controller::local::restore::relocated_path(
                m,
                &volumes,
                "log_bin_basename",
            ),
        })
    }
}

/// What keeps a restore in place while it is verified.
#[derive(Debug)]
enum Restore {
    Files,
    /// The block layout's restored images, mounted.
    Mounts(#[allow(dead_code)] Vec<LoopMount>),
}

/// The ids of a chain's keys (`<prefix>:<id>`) in a Redis server.
async fn redis_ids(c: &redis::aio::MultiplexedConnection, prefix: &str) -> Result<BTreeSet<i32>> {
    let mut c = c.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await?;
    Ok(keys
        .iter()
        .filter_map(|k| k.split_once(':')?.1.parse().ok())
        .collect())
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sets {
    a: BTreeSet<i32>,
    b: BTreeSet<i32>,
}

impl Cluster {
    /// Mounts btrfs, starts the six servers and six agents, issues the PKI.
    pub async fn start(agent_binary: &Path, say: impl Fn(&str)) -> Result<Cluster> {
        Self::start_with(agent_binary, Options::default(), say).await
    }

    /// The cluster set up as `options` say.
    pub async fn start_with(
        agent_binary: &Path,
        options: Options,
        say: impl Fn(&str),
    ) -> Result<Cluster> {
        say("mounting a btrfs image (sparse, 8 GiB)");
        let mount = tokio::task::spawn_blocking(|| LoopMount::btrfs(8192)).await??;
        let base = mount.path().to_path_buf();
        say(&format!(
            "starting PostgreSQL, MariaDB and Redis ({}), each a primary and a replica{}{}",
            match options.redis {
                Persistence::Aof => "AOF",
                Persistence::Rdb => "RDB only",
                Persistence::None => "no persistence",
            },
            if options.relaxed {
                ", acknowledging writes before they are durable"
            } else {
                ""
            },
            if options.block {
                ", each data directory on its own loop device"
            } else {
                ""
            }
        ));
        fn setup(base: &Path, options: Options) -> Setup<'_> {
            Setup {
                base: Some(base),
                block: options.block,
                relaxed: options.relaxed,
                logs_apart: false,
            }
        }
        let (b1, b2, b3) = (base.clone(), base.clone(), base.clone());
        let pg = tokio::task::spawn_blocking(move || PgPair::start_with(&setup(&b1, options)));
        let maria =
            tokio::task::spawn_blocking(move || MariaPair::start_with(&setup(&b2, options)));
        let redis = tokio::task::spawn_blocking(move || {
            RedisPair::start_with(&setup(&b3, options), options.redis)
        });
        let (pg, maria, redis) = (pg.await??, maria.await??, redis.await??);
        pg.primary.psql(&format!("CREATE DATABASE {DB}"))?;
        let (c, conn) =
            tokio_postgres::connect(&pg.primary.conninfo(DB), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(
            "CREATE TABLE chain_a (id int PRIMARY KEY); CREATE TABLE chain_b (id int PRIMARY KEY); \
             CREATE TABLE flow (id int PRIMARY KEY)",
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
        let pg_mode = match options.worst_order {
            Some(_) => "backup",
            None => "fence",
        };
        let fence = || {
            vec![
                ("STILLPOINT_PG_MODE", pg_mode.to_string()),
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
                &pg.volume_of(&pg.primary.data),
                fence(),
            ),
            m(
                "pg-1",
                "postgres",
                pg.replica.conninfo(DB),
                RoleHint::Replica,
                Some("pg-0"),
                &pg.volume_of(&pg.replica.data),
                fence(),
            ),
            m(
                "maria-0",
                "mariadb",
                maria_url(maria.primary.port),
                RoleHint::Primary,
                None,
                &maria.volume_of(&maria.primary.data),
                vec![],
            ),
            m(
                "maria-1",
                "mariadb",
                maria_url(maria.replica.port),
                RoleHint::Replica,
                Some("maria-0"),
                &maria.volume_of(&maria.replica.data),
                vec![],
            ),
            m(
                "redis-0",
                "redis",
                redis.primary.url(),
                RoleHint::Primary,
                None,
                &redis.volume_of(&redis.primary.dir),
                vec![],
            ),
            m(
                "redis-1",
                "redis",
                redis.replica.url(),
                RoleHint::Replica,
                Some("redis-0"),
                &redis.volume_of(&redis.replica.dir),
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
                accept_uncovered: vec![],
            });
            agents.push(proc);
        }
        let snapshots = base.join("snapshots");
        std::fs::create_dir_all(&snapshots)?;
        // The block layout's cut: a reflink copy of each volume's image,
        // which holds what reached the device and nothing of the page cache.
        let (driver, exec) = match (options.block, options.worst_order) {
            (false, Some(later)) => (
                Driver::Exec,
                Some(ExecTemplates {
                    // Primaries are the `-0` members.
                    snapshot: format!(
                        "sh -c 'case {{member}} in *-0) ;; *) sleep {:.3};; esac; \
                         btrfs -q subvolume snapshot -r {{volume}} {}/{{snapshot}}'",
                        later.as_secs_f64(),
                        snapshots.display()
                    ),
                    delete: format!(
                        "sh -c 'test ! -e {0}/{{snapshot}} || btrfs -q subvolume delete {0}/{{snapshot}}'",
                        snapshots.display()
                    ),
                    timeout: None,
                }),
            ),
            (false, None) => (Driver::Btrfs, None),
            (true, _) => (
                Driver::Exec,
                Some(ExecTemplates {
                    snapshot: format!(
                        "cp --reflink=always {{volume}}.img {}/{{snapshot}}.img",
                        snapshots.display()
                    ),
                    delete: format!("rm -f {}/{{snapshot}}.img", snapshots.display()),
                    timeout: None,
                }),
            ),
        };
        let group = Group {
            name: "demo".into(),
            driver,
            snapshot_dir: snapshots,
            exec,
            freeze_budget: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            align_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            rpc_timeout: stillpoint_controller::core::agents::DEFAULT_RPC_TIMEOUT,
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
            options,
            _work: work,
            mount,
        })
    }

    /// Starts the causal writers: in each chain, a step is written only
    /// after the previous one was acknowledged.
    pub async fn workload(&self) -> Result<Workload> {
        let (stop, stopped) = watch::channel(false);
        let acked = Arc::new(Mutex::new(Acked::default()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (pg, conn) =
                tokio_postgres::connect(&self.pg.primary.conninfo(DB), tokio_postgres::NoTls)
                    .await?;
            tokio::spawn(conn);
            let mut maria = mysql_async::Conn::from_url(self.maria.primary.url(DB)).await?;
            let mut redis = redis::Client::open(self.redis.primary.url())?
                .get_multiplexed_async_connection_with_config(
                    &redis::AsyncConnectionConfig::new().set_response_timeout(None),
                )
                .await?;
            let (record, mut stopped) = (acked.clone(), stopped.clone());
            tasks.push(tokio::spawn(async move {
                // Each writer its own ids: writer, writer + WRITERS, ...
                for id in (1..).map(|n| n * WRITERS + writer) {
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
            }));
        }
        if self.options.worst_order.is_some() {
            tasks.push(self.flowing_writes(stopped).await?);
        }
        Ok(Workload { stop, acked, tasks })
    }

    /// PostgreSQL writes that depend on no other member, one after
    /// another: in `backup` mode they go on through the freeze and the cut.
    async fn flowing_writes(
        &self,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<Result<()>>> {
        let (pg, conn) =
            tokio_postgres::connect(&self.pg.primary.conninfo(DB), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(tokio::spawn(async move {
            for id in 1.. {
                if *stopped.borrow_and_update() {
                    break;
                }
                pg.execute("INSERT INTO flow VALUES ($1)", &[&id]).await?;
            }
            Ok(())
        }))
    }

    /// Takes one group backup.
    pub async fn backup(&self, id: &str) -> Result<Manifest> {
        Ok(self.orchestrator.backup(&self.group, id).await?)
    }

    /// Restores `manifest`; returns what keeps the restore in place
    /// (mounts) and each member's volumes (backed up from, restored to).
    fn restore(&self, manifest: &Manifest, to: &Path) -> Result<(Restore, Vec<Restored>)> {
        if self.options.worst_order.is_some() {
            return self.restore_exec(manifest, to);
        }
        if !self.options.block {
            stillpoint_controller::local::restore::restore_files(manifest, to)?;
            let restored = manifest
                .members
                .iter()
                .map(|m| {
                    let volumes = m
                        .snapshots
                        .iter()
                        .enumerate()
                        .map(|(i, h)| (h.volume.clone(), to.join(&m.name).join(i.to_string())))
                        .collect();
                    Restored::new(
                        m,
                        volumes,
                        stillpoint_controller::local::restore::restored_data_dir(m, to),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok((Restore::Files, restored));
        }
        // Block layout: each snapshot is a filesystem image. Mount a reflink
        // copy of it (the mount replays the journal, as after a crash), then
        // point what pointed at the source at the restored volume.
        std::fs::create_dir_all(to)?;
        let mut mounts = Vec::new();
        let mut restored = Vec::new();
        for m in &manifest.members {
            let mut volumes = Vec::new();
            for (index, h) in m.snapshots.iter().enumerate() {
                let image = self.group.snapshot_dir.join(format!("{}.img", h.handle));
                let copy = to.join(format!("{}-{index}.img", m.name));
                run(
                    std::process::Command::new("cp")
                        .arg("--reflink=always")
                        .arg(&image)
                        .arg(&copy),
                    "copying a snapshot image",
                )?;
                let mount = LoopMount::image(&copy, &to.join(format!("{}-{index}", m.name)))?;
                volumes.push((h.volume.clone(), mount.path().to_path_buf()));
                mounts.push(mount);
            }
            let data = stillpoint_controller::local::restore::relocate(m, &volumes)?;
            restored.push(Restored::new(m, volumes, Some(data))?);
        }
        Ok((Restore::Mounts(mounts), restored))
    }

    /// Restores the worst-order layout: each snapshot is a btrfs subvolume
    /// the exec snapshotter made; copy it, then point what pointed at the
    /// source at the copy.
    fn restore_exec(&self, manifest: &Manifest, to: &Path) -> Result<(Restore, Vec<Restored>)> {
        std::fs::create_dir_all(to)?;
        let mut restored = Vec::new();
        for m in &manifest.members {
            let mut volumes = Vec::new();
            for (index, h) in m.snapshots.iter().enumerate() {
                let copy = to.join(format!("{}-{index}", m.name));
                run(
                    std::process::Command::new("cp")
                        .args(["-a", "--reflink=auto"])
                        .arg(self.group.snapshot_dir.join(&h.handle))
                        .arg(&copy),
                    "copying a snapshot",
                )?;
                volumes.push((h.volume.clone(), copy));
            }
            let data = stillpoint_controller::local::restore::relocate(m, &volumes)?;
            restored.push(Restored::new(m, volumes, Some(data))?);
        }
        Ok((Restore::Files, restored))
    }

    /// Restores `manifest`, starts every member from it, and checks the
    /// consistent-cut invariant, that each replica holds exactly its
    /// primary's data, and that every chain acknowledged before the backup
    /// started (`before`) is whole in every member.
    pub async fn verify(&self, manifest: &Manifest, before: &Acked) -> Result<Verified> {
        // On the btrfs mount: restored copies share extents with the snapshots.
        let to = self.mount.path().join("restore").join(&manifest.id);
        let (restore, restored) = self.restore(manifest, &to)?;
        let member = |name: &str| -> Result<&Restored> {
            restored
                .iter()
                .find(|r| r.name == name)
                .with_context(|| format!("{name} was not restored"))
        };
        let path = |name: &str| -> Result<PathBuf> { Ok(member(name)?.data.clone()) };
        let mut sets = Vec::new();
        let mut wal_ends = Vec::new();
        for name in ["pg-0", "pg-1"] {
            // An atomic snapshot restores by crash recovery: no backup_label.
            if path(name)?.join("backup_label").exists() {
                bail!("{name} was restored with a backup_label from an atomic snapshot");
            }
            let server = PgRestored::at(path(name)?)?;
            tokio::task::block_in_place(|| server.start())?;
            let (c, conn) =
                tokio_postgres::connect(&server.server.conninfo(DB), tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            // Where its WAL ends once recovered (each wrote the same
            // end-of-recovery checkpoint after it).
            let end: String = c
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await?
                .get(0);
            wal_ends.push((name, end));
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
                name,
                Sets {
                    a: ids("chain_a").await?,
                    b: ids("chain_b").await?,
                },
            ));
        }
        for name in ["maria-0", "maria-1"] {
            let log_bin = member(name)?.log_bin.clone();
            let server = MariaRestored::at(path(name)?)?.with_log_bin(log_bin);
            tokio::task::block_in_place(|| server.start())?;
            let mut c = mysql_async::Conn::from_url(server.server.url(DB)).await?;
            let a: Vec<i32> = c.query("SELECT id FROM chain_a").await?;
            let b: Vec<i32> = c.query("SELECT id FROM chain_b").await?;
            c.disconnect().await?;
            sets.push((
                name,
                Sets {
                    a: a.into_iter().collect(),
                    b: b.into_iter().collect(),
                },
            ));
        }
        for name in ["redis-0", "redis-1"] {
            let server = RedisRestored::at(path(name)?)?;
            tokio::task::block_in_place(|| server.start())?;
            let c = redis::Client::open(server.server.url())?
                .get_multiplexed_async_connection()
                .await?;
            let a = redis_ids(&c, "a").await?;
            let b = redis_ids(&c, "b").await?;
            sets.push((name, Sets { a, b }));
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
            let (p, r) = (get(primary), get(replica));
            // PostgreSQL in backup mode takes writes through the cut: its
            // replica holds what it held at the alignment, never more.
            let flows = primary == "pg-0" && self.options.worst_order.is_some();
            let held = match flows {
                true => r.a.is_subset(&p.a) && r.b.is_subset(&p.b),
                false => p == r,
            };
            if !held {
                problems.push(format!(
                    "replica {replica} does not hold {} its primary {primary}'s data",
                    if flows { "only" } else { "exactly" }
                ));
            }
        }
        let lsn = |name: &str| {
            wal_ends
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, l)| stillpoint_proto::position::parse_lsn(l))
        };
        if lsn("pg-1") > lsn("pg-0") {
            problems.push(format!(
                "the PostgreSQL replica's WAL ends ahead of its primary's: {wal_ends:?}"
            ));
        }
        // Whatever was acknowledged before the backup started is in it.
        let before_a: BTreeSet<i32> = before.a.iter().copied().collect();
        let before_b: BTreeSet<i32> = before.b.iter().copied().collect();
        for (member, set) in &sets {
            for (chain, acked, held) in [("A", &before_a, &set.a), ("B", &before_b, &set.b)] {
                let lost: Vec<i32> = acked.difference(held).copied().take(5).collect();
                if !lost.is_empty() {
                    problems.push(format!(
                        "{member} lacks chain {chain} ids {lost:?}, acknowledged before the backup started"
                    ));
                }
            }
        }
        if !problems.is_empty() {
            bail!(
                "backup {} is not a consistent cut: {}",
                manifest.id,
                problems.join("; ")
            );
        }
        drop(restore);
        crate::servers::remove_tree(&to);
        Ok(Verified {
            backup: manifest.id.clone(),
            chain_a: pg.a.len(),
            chain_b: pg.b.len(),
        })
    }

    /// Every acknowledged write is in the live primaries (Redis included).
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
        let r = redis::Client::open(self.redis.primary.url())?
            .get_multiplexed_async_connection()
            .await?;
        let (redis_a, redis_b) = (redis_ids(&r, "a").await?, redis_ids(&r, "b").await?);
        let mut missing = Vec::new();
        for (what, held) in [
            ("PostgreSQL chain_a", pg_a as usize),
            ("PostgreSQL chain_b", pg_b as usize),
            ("MariaDB chain_a", maria_a.unwrap_or(0) as usize),
            ("MariaDB chain_b", maria_b.unwrap_or(0) as usize),
        ] {
            let want = if what.ends_with('a') {
                acked.a.len()
            } else {
                acked.b.len()
            };
            if held < want {
                missing.push(format!("{what} holds {held} of {want}"));
            }
        }
        for (what, acked, held) in [("a", &acked.a, &redis_a), ("b", &acked.b, &redis_b)] {
            let lost: Vec<i32> = acked
                .iter()
                .filter(|id| !held.contains(id))
                .take(5)
                .copied()
                .collect();
            if !lost.is_empty() {
                missing.push(format!("Redis lacks {what}: ids {lost:?}"));
            }
        }
        if !missing.is_empty() {
            bail!("acknowledged writes are missing: {}", missing.join("; "));
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
