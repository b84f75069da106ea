//! Real database servers run locally for the demo, the benchmarks and the
//! end-to-end tests: a PostgreSQL primary with a streaming replica, a
//! MariaDB primary with a GTID replica, a Redis primary with a replica,
//! agents as processes, and loop-mounted filesystems.
//!
//! Each pair runs on free ports in its own temp dir (on a btrfs mount, each
//! data directory is its own subvolume, so it can be snapshotted), as the
//! Debian service users (`postgres`, `mysql`, `redis`) when run as root, and
//! is stopped and removed on drop. The single servers and the process
//! helpers are the product's own (`stillpoint restore --start` uses them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
pub use stillpoint_controller::local::servers::{
    Scratch, Server, ServerProcess, ServiceUser, command_as, free_port, is_btrfs, is_root,
    kill_and_wait, log_tail, pid_alive, remove_tree, require, run, service_user, signal, wait_for,
};

pub mod agent;
pub mod loopfs;
pub mod mariadb;
pub mod postgres;
pub mod redis;

/// How a pair of servers is laid out and tuned.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup<'a> {
    /// Where the pair's files go (on a btrfs mount, each data directory is
    /// its own subvolume).
    pub base: Option<&'a Path>,
    /// Each data directory on its own loop-mounted ext4 filesystem, whose
    /// image `<volume>.img` lies beside it: a block device, as cloud disks
    /// are. A copy of the image sees what reached the device, not the page
    /// cache (on btrfs, `cp --reflink=always` of the image is such a copy).
    pub block: bool,
    /// Acknowledge writes before they are durable, as many operators run:
    /// PostgreSQL `synchronous_commit = off`; MariaDB
    /// `innodb_flush_log_at_trx_commit = 2`, `sync_binlog = 0`; Redis
    /// `appendfsync everysec` (its default).
    pub relaxed: bool,
    /// Each server keeps its logs in a directory of its own beside its
    /// data directory, as operators do with a separate disk: PostgreSQL's
    /// WAL (`pg_wal` is then a link to `<name>-wal`), MariaDB's binlog
    /// (`<name>-binlog/binlog`).
    pub logs_apart: bool,
}

impl Setup<'_> {
    /// A scratch dir for one pair, laid out as this says.
    pub fn scratch(&self, what: &str) -> Result<Scratch> {
        let mut scratch = match self.base {
            Some(base) => Scratch::new_in(base, what)?,
            None => Scratch::new(what)?,
        };
        if self.block {
            scratch.use_block_volumes()?;
        }
        Ok(scratch)
    }
}

/// A primary and its replica in one temp dir; both stopped and the dir
/// removed on drop.
#[derive(Debug)]
pub struct Pair<S: Server> {
    pub primary: S,
    pub replica: S,
    scratch: Scratch,
}

impl<S: Server> Pair<S> {
    pub(crate) fn new(primary: S, replica: S, scratch: Scratch) -> Self {
        Pair {
            primary,
            replica,
            scratch,
        }
    }

    /// The temp dir holding both servers' files.
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Both servers' pids.
    pub fn pids(&self) -> Vec<u32> {
        [self.primary.pid(), self.replica.pid()]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The volume a data directory of the pair is on (see [`Setup::block`]).
    pub fn volume_of(&self, data: &Path) -> PathBuf {
        self.scratch.volume_of(data)
    }

    /// Stops both servers and removes their files. Idempotent.
    pub fn teardown(&self) {
        self.replica.stop();
        self.primary.stop();
        self.scratch.release();
        remove_tree(self.dir());
    }
}

impl<S: Server> Drop for Pair<S> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A plain HTTP/1.0 GET: the status line and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(String, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: stillpoint\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// The sum of the samples of a Prometheus text exposition whose lines
/// start with `prefix`.
pub fn metric_sum(exposition: &str, prefix: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
