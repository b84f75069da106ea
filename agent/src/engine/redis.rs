//! Redis ≥ 6.2 (and Valkey) over the redis crate.
//!
//! Freeze is one atomic transaction, `MULTI; CLIENT PAUSE <ttl-ms> WRITE;
//! INFO replication; EXEC`, so the pause and the position it reports are one
//! step. The pause carries the lease TTL itself: if the agent dies, it ends
//! by itself; each lease renewal re-issues it. Thaw is `CLIENT UNPAUSE`.
//! Reads keep working while writes wait.
//!
//! Offsets keep creeping during a pause (replica PINGs are replicated), so
//! alignment compares a replica's offset ≥ the offset captured at the freeze.
//!
//! Flush (once every member is frozen, before the cut): with AOF on, wait
//! until the AOF buffer is written out (with `appendfsync everysec` Redis
//! may acknowledge a write before it reaches the file); the agent's
//! `syncfs` then makes the file durable. Without AOF (RDB only, or no
//! persistence) the image needs a save made *while paused*, so that every
//! write acknowledged before the freeze is in it: `BGSAVE` (accepted
//! during a `WRITE` pause: it is not a write command), waited for. That
//! save is in the freeze window; AOF gives the shorter freeze.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use stillpoint_proto::pb;
use stillpoint_proto::position::{PositionExt, make};
use tokio::sync::{Mutex, oneshot};
use tokio::time::Instant;

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, EngineKind, Frozen, HoldMonitor, Step,
    Thawed,
};
use crate::config::{EngineConfig, Secret};

/// Parses a `redis://[user:password@]host:port[/db]` URL.
pub fn parse_dsn(dsn: &str) -> Result<redis::Client, String> {
    // The crate's messages can include the URL; say what is wrong without it.
    redis::Client::open(dsn).map_err(|e| format!("invalid Redis URL ({:?})", e.kind()))
}

/// `INFO` output as key → value.
pub fn parse_info(info: &str) -> BTreeMap<String, String> {
    info.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Role, upstream and position from `INFO replication`.
pub fn replication_state(
    info: &BTreeMap<String, String>,
) -> Result<(pb::Role, String, pb::Position), String> {
    let get = |k: &str| info.get(k).cloned().unwrap_or_default();
    let replid = get("master_replid");
    let number = |k: &str| -> Result<u64, String> {
        get(k)
            .parse()
            .map_err(|_| format!("INFO replication has no numeric {k}"))
    };
    match get("role").as_str() {
        "master" => Ok((
            pb::Role::Primary,
            String::new(),
            make::redis(&replid, number("master_repl_offset")?),
        )),
        "slave" => Ok((
            pb::Role::Replica,
            format!("{}:{}", get("master_host"), get("master_port")),
            make::redis(&replid, number("slave_repl_offset")?),
        )),
        other => Err(format!("unexpected role '{other}' in INFO replication")),
    }
}

fn redis_error(e: &redis::RedisError) -> (Cause, String) {
    let cause = if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        Cause::Unavailable
    } else if e.is_timeout() {
        Cause::Timeout
    } else {
        Cause::Refused
    };
    (cause, e.to_string())
}

#[derive(Debug)]
pub struct Redis {
    ctx: Ctx,
    dsn: Option<Secret>,
    connect_timeout: Duration,
    poll_interval: Duration,
    hold_check_interval: Duration,
    control: Mutex<Option<MultiplexedConnection>>,
}

impl Redis {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        Redis {
            ctx,
            dsn: config.dsn.clone(),
            connect_timeout: config.connect_timeout,
            poll_interval: config.poll_interval,
            hold_check_interval: config.hold_check_interval,
            control: Mutex::new(None),
        }
    }

    fn err(&self, step: Step, e: &redis::RedisError) -> EngineError {
        let (cause, message) = redis_error(e);
        self.ctx.err(step, cause, message)
    }

    async fn connect(&self, step: Step) -> Result<MultiplexedConnection, EngineError> {
        let dsn = self.dsn.as_ref().ok_or_else(|| {
            self.ctx.err(
                Step::Connect,
                Cause::Invalid,
                "no connection string configured",
            )
        })?;
        let client =
            parse_dsn(dsn.expose()).map_err(|e| self.ctx.err(Step::Connect, Cause::Invalid, e))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| {
                let (_, message) = redis_error(&e);
                self.ctx.err(
                    step,
                    Cause::Unavailable,
                    format!("cannot connect: {message}"),
                )
            })
    }

    async fn control(&self, step: Step) -> Result<MultiplexedConnection, EngineError> {
        let mut guard = self.control.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect(step).await?);
        }
        // A multiplexed connection is a cheap handle; it reconnects lazily.
        Ok(guard.as_ref().expect("connected").clone())
    }

    async fn info(
        &self,
        conn: &mut MultiplexedConnection,
        section: &str,
        step: Step,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query_async(conn)
            .await
            .map_err(|e| self.err(step, &e))?;
        Ok(parse_info(&text))
    }

    async fn state(
        &self,
        conn: &mut MultiplexedConnection,
        step: Step,
    ) -> Result<(pb::Role, String, pb::Position), EngineError> {
        let info = self.info(conn, "replication", step).await?;
        replication_state(&info).map_err(|e| self.ctx.err(step, Cause::Refused, e))
    }
}

#[async_trait]
impl Engine for Redis {
    fn kind(&self) -> EngineKind {
        EngineKind::Redis
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        let mut conn = self.control(Step::Describe).await?;
        let server = self.info(&mut conn, "server", Step::Describe).await?;
        let (role, upstream, _) = self.state(&mut conn, Step::Describe).await?;
        let product = if server.contains_key("valkey_version") {
            "Valkey"
        } else {
            "Redis"
        };
        let version = server
            .get("valkey_version")
            .or_else(|| server.get("redis_version"))
            .cloned()
            .unwrap_or_default();
        let dir: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("dir")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(Step::Describe, &e))?;
        Ok(Description {
            server_version: format!("{product} {version}"),
            role,
            upstream,
            capabilities: pb::Capabilities {
                blocks_writes: true,
                wait_for_position: true,
                thaw_artefacts: false,
            },
            // The RDB file and the AOF directory both live in `dir`.
            paths: dir
                .get(1)
                .map(|d| vec![super::server_path("dir", d.clone())])
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        let mut conn = self.control(Step::Position).await?;
        let (role, _, position) = self.state(&mut conn, Step::Position).await?;
        Ok((position, role))
    }

    async fn prepare(&self, _backup_id: &str, _atomic_cut: bool) -> Result<String, EngineError> {
        let mut conn = self.control(Step::Prepare).await?;
        let persistence = self.info(&mut conn, "persistence", Step::Prepare).await?;
        Ok(if aof_enabled(&persistence) {
            "AOF on: the flush waits for the AOF buffer".into()
        } else {
            "AOF off: the flush saves the RDB while writes are paused".into()
        })
    }

    async fn freeze(
        &self,
        _backup_id: &str,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        // The pause, the position and the server's identity in one atomic
        // round trip, on the control connection (no connect in the window).
        let pause = |mut conn: MultiplexedConnection| async move {
            let reply: Result<(String, String), _> = redis::pipe()
                .atomic()
                .cmd("CLIENT")
                .arg("PAUSE")
                .arg(ttl.as_millis() as u64)
                .arg("WRITE")
                .ignore()
                .cmd("INFO")
                .arg("replication")
                .cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await;
            (conn, reply)
        };
        let (conn, reply) = pause(self.control(Step::Freeze).await?).await;
        let (mut conn, reply) = match reply {
            // A control connection the server closed while idle: once more
            // on a new one.
            Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                *self.control.lock().await = None;
                pause(self.control(Step::Freeze).await?).await
            }
            other => (conn, other),
        };
        let (replication, server) = reply.map_err(|e| self.err(Step::Freeze, &e))?;
        let (_, _, position) = match replication_state(&parse_info(&replication)) {
            Ok(state) => state,
            Err(e) => {
                let _: Result<(), _> = redis::cmd("CLIENT")
                    .arg("UNPAUSE")
                    .query_async(&mut conn)
                    .await;
                return Err(self.ctx.err(Step::Freeze, Cause::Refused, e));
            }
        };
        let run_id = parse_info(&server)
            .get("run_id")
            .cloned()
            .unwrap_or_default();
        let (watched, interval, answer) =
            (conn.clone(), self.hold_check_interval, self.connect_timeout);
        let monitor =
            HoldMonitor::spawn(move |lost| monitor(watched, run_id, interval, answer, lost));
        Ok(Box::new(RedisHold {
            ctx: self.ctx.clone(),
            conn,
            position,
            monitor,
            poll_interval: self.poll_interval,
        }))
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        if !matches!(target.kind, Some(pb::position::Kind::Redis(_))) {
            return Err(self.ctx.err(
                Step::Wait,
                Cause::Invalid,
                format!(
                    "a Redis member cannot wait for a {} position",
                    target.kind_name()
                ),
            ));
        }
        let conn = self.control(Step::Wait).await?;
        super::poll_position(&self.ctx, target, timeout, self.poll_interval, || {
            let mut conn = conn.clone();
            async move { Ok(self.state(&mut conn, Step::Wait).await?.2) }
        })
        .await
    }
}

/// Reports through `lost` when the server restarted (its pause with it) or
/// stopped answering (within `answer`: the connection has no response
/// timeout of its own).
async fn monitor(
    mut conn: MultiplexedConnection,
    run_id: String,
    interval: Duration,
    answer: Duration,
    lost: oneshot::Sender<String>,
) {
    loop {
        tokio::time::sleep(interval).await;
        let info = tokio::time::timeout(
            answer,
            redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(&mut conn),
        )
        .await;
        let info = match info {
            Ok(info) => info,
            Err(_) => {
                let _ = lost.send(format!(
                    "the server did not answer within {} ms",
                    answer.as_millis()
                ));
                return;
            }
        };
        match info {
            Ok(text) => {
                let now = parse_info(&text).get("run_id").cloned().unwrap_or_default();
                if now != run_id {
                    let _ = lost.send("the server restarted: its pause is gone".into());
                    return;
                }
            }
            Err(e) => {
                let _ = lost.send(format!("the server stopped answering: {e}"));
                return;
            }
        }
    }
}

fn aof_enabled(persistence: &BTreeMap<String, String>) -> bool {
    persistence.get("aof_enabled").is_some_and(|v| v == "1")
}

/// A flush error: a dropped connection means the server (and its pause)
/// is gone, which loses the hold.
fn flush_error(ctx: &Ctx, e: &redis::RedisError) -> EngineError {
    let (cause, message) = redis_error(e);
    let cause = match cause {
        Cause::Unavailable => Cause::Lost,
        other => other,
    };
    ctx.err(Step::Flush, cause, message)
}

async fn persistence(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
) -> Result<BTreeMap<String, String>, EngineError> {
    let text: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(conn)
        .await
        .map_err(|e| flush_error(ctx, &e))?;
    Ok(parse_info(&text))
}

/// Waits until everything Redis acknowledged is in the AOF file (its
/// buffer drained), or makes a new RDB save and waits for it to finish.
/// Bounded by the caller (the flush timeout and the lease).
async fn flush_writes(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    poll: Duration,
) -> Result<String, EngineError> {
    let started = Instant::now();
    let first = persistence(ctx, conn).await?;
    if aof_enabled(&first) {
        let mut p = first;
        while p.get("aof_buffer_length").is_some_and(|v| v != "0") {
            tokio::time::sleep(poll).await;
            p = persistence(ctx, conn).await?;
        }
        return Ok(format!(
            "AOF buffer written in {} ms",
            started.elapsed().as_millis()
        ));
    }
    let saves = |p: &BTreeMap<String, String>| -> (i64, i64) {
        let n = |k: &str| p.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        (n("rdb_saves"), n("rdb_last_save_time"))
    };
    let before = saves(&first);
    let mut issued = false;
    let mut p = first;
    loop {
        let running = p.get("rdb_bgsave_in_progress").is_some_and(|v| v == "1");
        if !running && issued {
            if p.get("rdb_last_bgsave_status").is_some_and(|s| s != "ok") {
                return Err(ctx.err(
                    Step::Flush,
                    Cause::Refused,
                    "BGSAVE failed (rdb_last_bgsave_status is not ok; see the server log)",
                ));
            }
            if saves(&p) != before {
                return Ok(format!(
                    "RDB saved while paused in {} ms",
                    started.elapsed().as_millis()
                ));
            }
        }
        if !running && !issued {
            // A save that started before the pause (a replica's full sync)
            // misses later writes: wait for it to end, then save anew.
            let reply: Result<String, _> = redis::cmd("BGSAVE").query_async(conn).await;
            match reply {
                Ok(_) => issued = true,
                Err(e) if e.to_string().contains("in progress") => {}
                Err(e) => return Err(flush_error(ctx, &e)),
            }
        }
        tokio::time::sleep(poll.max(Duration::from_millis(5))).await;
        p = persistence(ctx, conn).await?;
    }
}

#[derive(Debug)]
struct RedisHold {
    ctx: Ctx,
    conn: MultiplexedConnection,
    position: pb::Position,
    monitor: HoldMonitor,
    poll_interval: Duration,
}

#[async_trait]
impl Frozen for RedisHold {
    fn position(&self) -> pb::Position {
        self.position.clone()
    }

    async fn lost(&mut self) -> EngineError {
        self.monitor.lost(&self.ctx).await
    }

    async fn renewed(&mut self, ttl: Duration) -> Result<(), EngineError> {
        // A new CLIENT PAUSE replaces the end time of the current one.
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ttl.as_millis() as u64)
            .arg("WRITE")
            .query_async::<()>(&mut self.conn)
            .await
            .map_err(|e| {
                let (cause, message) = redis_error(&e);
                self.ctx
                    .err(Step::Hold, cause, format!("extending the pause: {message}"))
            })
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        flush_writes(&self.ctx, &mut self.conn, self.poll_interval).await
    }

    async fn thaw(self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        let RedisHold {
            ctx,
            mut conn,
            monitor,
            ..
        } = *self;
        drop(monitor);
        redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| {
                let (cause, message) = redis_error(&e);
                ctx.err(Step::Thaw, cause, message)
            })?;
        Ok(Thawed::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_info_is_read_for_both_roles() {
        let primary = parse_info(
            "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_replid:abc\r\nmaster_repl_offset:1234\r\n",
        );
        let (role, upstream, position) = replication_state(&primary).unwrap();
        assert_eq!(role, pb::Role::Primary);
        assert!(upstream.is_empty());
        assert_eq!(position, make::redis("abc", 1234));
        let replica = parse_info(
            "role:slave\r\nmaster_host:127.0.0.1\r\nmaster_port:6380\r\nslave_repl_offset:1200\r\nmaster_replid:abc\r\nmaster_repl_offset:1200\r\n",
        );
        let (role, upstream, position) = replication_state(&replica).unwrap();
        assert_eq!(role, pb::Role::Replica);
        assert_eq!(upstream, "127.0.0.1:6380");
        assert_eq!(position, make::redis("abc", 1200));
    }

    #[test]
    fn bad_urls_do_not_echo_the_password() {
        let err = parse_dsn("redis://user:hunter2@:notaport").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
