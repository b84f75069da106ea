//! MongoDB 5–8 over the mongodb driver.
//!
//! Freeze is `{fsync: 1, lock: true}` (with `fsyncLockAcquisitionTimeoutMillis`
//! from 7.0.2 on); thaw is `fsyncUnlock`, repeated until the server's
//! `lockCount` reaches 0. Position is `hello.lastWrite.opTime`; a secondary
//! waits by polling its own `hello`.
//!
//! The lock is **not** bound to a session and survives the agent: the agent
//! records it in a state file before locking and removes the record once the
//! count is back at 0; at start-up a leftover record is undone.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use stillpoint_proto::pb;
use stillpoint_proto::position::{PositionExt, make};
use tokio::sync::Mutex;

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, EngineKind, Frozen, Step, Thawed,
};
use crate::config::{EngineConfig, Secret};

const STATE_FILE: &str = "mongodb.fsynclock";
/// Bound on the unlock loop, in case a server never reports 0.
const MAX_UNLOCKS: usize = 64;

/// Checks the URL scheme (parsing proper needs the network for SRV).
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    if dsn.starts_with("mongodb://") || dsn.starts_with("mongodb+srv://") {
        Ok(())
    } else {
        Err("must start with mongodb:// or mongodb+srv://".into())
    }
}

/// Whether the server supports `fsyncLockAcquisitionTimeoutMillis` (7.0.2+).
pub fn supports_lock_timeout(version: &str) -> bool {
    let parts: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let v = (
        parts.first().copied().unwrap_or(0),
        parts.get(1).copied().unwrap_or(0),
        parts.get(2).copied().unwrap_or(0),
    );
    v >= (7, 0, 2)
}

/// The `{fsync: 1, lock: true}` command for a server version.
pub fn lock_command(version: &str, lock_timeout: Duration) -> Document {
    let mut command = doc! { "fsync": 1, "lock": true };
    if supports_lock_timeout(version) {
        command.insert(
            "fsyncLockAcquisitionTimeoutMillis",
            lock_timeout.as_millis() as i64,
        );
    }
    command
}

fn number(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Role, upstream and position from a `hello` reply.
pub fn hello_state(hello: &Document) -> (pb::Role, String, Option<pb::Position>) {
    let primary = hello.get_bool("isWritablePrimary").unwrap_or(false)
        || hello.get_bool("ismaster").unwrap_or(false);
    let role = if primary {
        pb::Role::Primary
    } else if hello.get_bool("secondary").unwrap_or(false) {
        pb::Role::Replica
    } else {
        pb::Role::Standalone
    };
    let upstream = if role == pb::Role::Replica {
        hello.get_str("primary").unwrap_or_default().to_string()
    } else {
        String::new()
    };
    let position = hello
        .get_document("lastWrite")
        .ok()
        .and_then(|w| w.get_document("opTime").ok())
        .and_then(|op| {
            let ts = op.get_timestamp("ts").ok()?;
            Some(make::mongo(
                ts.time,
                ts.increment,
                number(op.get("t")).unwrap_or(-1),
            ))
        });
    (role, upstream, position)
}

fn mongo_error(e: &mongodb::error::Error) -> (Cause, String) {
    use mongodb::error::ErrorKind;
    match e.kind.as_ref() {
        ErrorKind::Command(c) => {
            let cause = match c.code {
                // ExceededTimeLimit, LockTimeout, MaxTimeMSExpired
                262 | 24 | 50 => Cause::Timeout,
                // Unauthorized, AuthenticationFailed
                13 | 18 => Cause::Unavailable,
                _ => Cause::Refused,
            };
            (
                cause,
                format!("server error {} ({}): {}", c.code, c.code_name, c.message),
            )
        }
        ErrorKind::ServerSelection { message, .. } => (Cause::Unavailable, message.clone()),
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => {
            (Cause::Unavailable, e.to_string())
        }
        _ => (Cause::Refused, e.to_string()),
    }
}

#[derive(Debug)]
pub struct Mongo {
    ctx: Ctx,
    dsn: Option<Secret>,
    connect_timeout: Duration,
    lock_timeout: Duration,
    poll_interval: Duration,
    state_file: PathBuf,
    client: Mutex<Option<Client>>,
}

impl Mongo {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        Mongo {
            ctx,
            dsn: config.dsn.clone(),
            connect_timeout: config.connect_timeout,
            lock_timeout: config.lock_timeout,
            poll_interval: config.poll_interval,
            state_file: config.state_dir.join(STATE_FILE),
            client: Mutex::new(None),
        }
    }

    fn err(&self, step: Step, e: &mongodb::error::Error) -> EngineError {
        let (cause, message) = mongo_error(e);
        self.ctx.err(step, cause, message)
    }

    async fn admin(&self, step: Step) -> Result<Database, EngineError> {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            let dsn = self.dsn.as_ref().ok_or_else(|| {
                self.ctx.err(
                    Step::Connect,
                    Cause::Invalid,
                    "no connection string configured",
                )
            })?;
            let mut options = ClientOptions::parse(dsn.expose()).await.map_err(|e| {
                self.ctx.err(
                    Step::Connect,
                    Cause::Invalid,
                    format!("invalid MongoDB URL ({})", mongo_error(&e).1),
                )
            })?;
            options.connect_timeout = Some(self.connect_timeout);
            options.server_selection_timeout = Some(self.connect_timeout);
            options.app_name = Some("stillpoint-agent".into());
            *guard = Some(Client::with_options(options).map_err(|e| self.err(step, &e))?);
        }
        Ok(guard.as_ref().expect("connected").database("admin"))
    }

    async fn command(&self, step: Step, command: Document) -> Result<Document, EngineError> {
        let admin = self.admin(step).await?;
        admin
            .run_command(command)
            .await
            .map_err(|e| self.err(step, &e))
    }

    async fn hello(&self, step: Step) -> Result<Document, EngineError> {
        self.command(step, doc! { "hello": 1 }).await
    }
}

/// mongod's default `storage.dbPath` on Linux.
const DEFAULT_DB_PATH: &str = "/data/db";

/// `storage.dbPath` from a `getCmdLineOpts` reply (mongod's default when
/// it was not set).
pub fn db_path(options: &Document) -> String {
    options
        .get_document("parsed")
        .and_then(|p| p.get_document("storage"))
        .and_then(|s| s.get_str("dbPath"))
        .unwrap_or(DEFAULT_DB_PATH)
        .to_string()
}

/// `fsyncUnlock` until the server reports a lock count of 0; then the state
/// file goes. Returns how many calls it took.
async fn unlock_all(
    ctx: &Ctx,
    admin: &Database,
    state_file: &std::path::Path,
    step: Step,
) -> Result<usize, EngineError> {
    for unlocks in 1..=MAX_UNLOCKS {
        match admin.run_command(doc! { "fsyncUnlock": 1 }).await {
            Ok(reply) => {
                if number(reply.get("lockCount")).unwrap_or(0) <= 0 {
                    let _ = std::fs::remove_file(state_file);
                    return Ok(unlocks);
                }
            }
            Err(e) => {
                let (cause, message) = mongo_error(&e);
                // Not locked (any more): nothing left to undo.
                if message.contains("not locked") {
                    let _ = std::fs::remove_file(state_file);
                    return Ok(unlocks - 1);
                }
                return Err(ctx.err(step, cause, message));
            }
        }
    }
    Err(ctx.err(
        step,
        Cause::Refused,
        format!("the lock count did not reach 0 after {MAX_UNLOCKS} fsyncUnlock calls"),
    ))
}

#[async_trait]
impl Engine for Mongo {
    fn kind(&self) -> EngineKind {
        EngineKind::Mongodb
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        let info = self
            .command(Step::Describe, doc! { "buildInfo": 1 })
            .await?;
        let hello = self.hello(Step::Describe).await?;
        let (role, upstream, _) = hello_state(&hello);
        let options = self
            .command(Step::Describe, doc! { "getCmdLineOpts": 1 })
            .await?;
        Ok(Description {
            server_version: format!("MongoDB {}", info.get_str("version").unwrap_or("?")),
            role,
            upstream,
            capabilities: pb::Capabilities {
                blocks_writes: true,
                wait_for_position: true,
                thaw_artefacts: false,
            },
            // The journal lives in the dbPath (WiredTiger), so one path.
            paths: vec![super::server_path("storage.dbPath", db_path(&options))],
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        let hello = self.hello(Step::Position).await?;
        let (role, _, position) = hello_state(&hello);
        let position = position.ok_or_else(|| {
            self.ctx.err(
                Step::Position,
                Cause::Refused,
                "hello has no lastWrite.opTime (not a replica set member?)",
            )
        })?;
        Ok((position, role))
    }

    async fn prepare(&self, _backup_id: &str, _atomic_cut: bool) -> Result<String, EngineError> {
        self.hello(Step::Prepare).await?;
        Ok("connected".into())
    }

    async fn freeze(
        &self,
        backup_id: &str,
        _ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let info = self.command(Step::Freeze, doc! { "buildInfo": 1 }).await?;
        let version = info.get_str("version").unwrap_or_default().to_string();
        if let Some(dir) = self.state_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // Recorded before locking: a crash right after still gets undone.
        std::fs::write(&self.state_file, backup_id).map_err(|e| {
            self.ctx.err(
                Step::Freeze,
                Cause::Refused,
                format!(
                    "cannot record the lock in {}: {e}",
                    self.state_file.display()
                ),
            )
        })?;
        if let Err(e) = self
            .command(Step::Freeze, lock_command(&version, self.lock_timeout))
            .await
        {
            let _ = std::fs::remove_file(&self.state_file);
            return Err(e);
        }
        let position = match self.position().await {
            Ok((position, _)) => position,
            Err(e) => {
                let admin = self.admin(Step::Freeze).await?;
                let _ = unlock_all(&self.ctx, &admin, &self.state_file, Step::Freeze).await;
                return Err(e);
            }
        };
        Ok(Box::new(MongoHold {
            ctx: self.ctx.clone(),
            admin: self.admin(Step::Freeze).await?,
            state_file: self.state_file.clone(),
            position,
        }))
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        if !matches!(target.kind, Some(pb::position::Kind::Mongo(_))) {
            return Err(self.ctx.err(
                Step::Wait,
                Cause::Invalid,
                format!(
                    "a MongoDB member cannot wait for a {} position",
                    target.kind_name()
                ),
            ));
        }
        super::poll_position(&self.ctx, target, timeout, self.poll_interval, async || {
            Ok(self.position().await?.0)
        })
        .await
    }

    async fn recover(&self) -> Result<Option<String>, EngineError> {
        let Ok(backup_id) = std::fs::read_to_string(&self.state_file) else {
            return Ok(None);
        };
        let admin = self.admin(Step::Thaw).await?;
        let unlocks = unlock_all(&self.ctx, &admin, &self.state_file, Step::Thaw).await?;
        Ok(Some(format!(
            "undid the fsyncLock left by backup '{}' ({unlocks} fsyncUnlock)",
            backup_id.trim()
        )))
    }
}

#[derive(Debug)]
struct MongoHold {
    ctx: Ctx,
    admin: Database,
    state_file: PathBuf,
    position: pb::Position,
}

#[async_trait]
impl Frozen for MongoHold {
    fn position(&self) -> pb::Position {
        self.position.clone()
    }

    async fn lost(&mut self) -> EngineError {
        // The lock lives in the server, not in a session of ours.
        std::future::pending().await
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        Ok("fsyncLock already flushed every write".into())
    }

    async fn thaw(self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        let unlocks = unlock_all(&self.ctx, &self.admin, &self.state_file, Step::Thaw).await?;
        let mut thawed = Thawed::default();
        thawed
            .artefacts
            .insert("fsync_unlocks".into(), unlocks.to_string());
        Ok(thawed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_timeout_is_sent_from_7_0_2() {
        let bound = Duration::from_millis(1500);
        assert_eq!(
            lock_command("6.0.14", bound),
            doc! { "fsync": 1, "lock": true }
        );
        assert_eq!(
            lock_command("7.0.1", bound),
            doc! { "fsync": 1, "lock": true }
        );
        assert_eq!(
            lock_command("7.0.2", bound),
            doc! { "fsync": 1, "lock": true, "fsyncLockAcquisitionTimeoutMillis": 1500_i64 }
        );
        assert!(supports_lock_timeout("8.0.0-rc1"));
    }

    #[test]
    fn the_db_path_is_read_from_the_parsed_options() {
        let set = doc! { "argv": ["mongod"], "parsed": { "storage": { "dbPath": "/srv/mongo" } } };
        assert_eq!(db_path(&set), "/srv/mongo");
        assert_eq!(
            db_path(&doc! { "argv": ["mongod"], "parsed": {} }),
            "/data/db"
        );
    }

    #[test]
    fn hello_gives_role_and_optime() {
        let hello = doc! {
            "isWritablePrimary": false, "secondary": true, "primary": "db-0:27017",
            "lastWrite": { "opTime": { "ts": mongodb::bson::Timestamp { time: 100, increment: 3 }, "t": 2_i64 } },
        };
        let (role, upstream, position) = hello_state(&hello);
        assert_eq!(role, pb::Role::Replica);
        assert_eq!(upstream, "db-0:27017");
        assert_eq!(position, Some(make::mongo(100, 3, 2)));
    }
}
