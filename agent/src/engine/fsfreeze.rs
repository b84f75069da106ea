//! `FIFREEZE` on configured mount points: on its own (engine `fsfreeze`) or
//! layered over a database engine, frozen after the database and thawed
//! before it.
//!
//! A frozen filesystem outlives the process that froze it, so two guards
//! stand behind the lease:
//! - the **watchdog** child process ([`crate::watchdog`]) holds a pipe from
//!   the agent and thaws every mount it was told about as soon as the pipe
//!   closes, i.e. when the agent dies;
//! - a **state file** lists the mounts frozen right now; at start-up the
//!   agent thaws whatever it lists (a crash of the whole container).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_proto::pb;

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, EngineKind, Frozen, Step, Thawed, sys,
};
use crate::config::EngineConfig;

const STATE_FILE: &str = "fsfreeze.frozen";

/// Freezes and thaws the configured mounts.
#[derive(Debug, Clone)]
pub struct FsFreeze {
    ctx: Ctx,
    mounts: Vec<PathBuf>,
    state_file: PathBuf,
}

impl FsFreeze {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        FsFreeze {
            ctx,
            mounts: config.fsfreeze_mounts.clone(),
            state_file: config.state_dir.join(STATE_FILE),
        }
    }

    fn err(&self, step: Step, cause: Cause, message: String) -> EngineError {
        EngineError {
            engine: EngineKind::Fsfreeze,
            ..self.ctx.err(step, cause, message)
        }
    }

    fn tell_watchdog(&self, line: &str) -> Result<(), EngineError> {
        crate::watchdog::tell(line).map_err(|e| {
            self.err(
                Step::Freeze,
                Cause::Refused,
                format!("the fsfreeze watchdog: {e}"),
            )
        })
    }

    fn write_state(&self, frozen: &[PathBuf]) -> Result<(), EngineError> {
        let io = |e: std::io::Error| {
            self.err(
                Step::Freeze,
                Cause::Refused,
                format!(
                    "cannot record frozen mounts in {}: {e}",
                    self.state_file.display()
                ),
            )
        };
        if frozen.is_empty() {
            return match std::fs::remove_file(&self.state_file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.state_file.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text: String = frozen
            .iter()
            .map(|p| format!("{}\n", p.display()))
            .collect();
        let tmp = self.state_file.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &self.state_file).map_err(io)
    }

    /// Freezes every mount, in order; on a failure thaws those already frozen.
    fn freeze_mounts(&self) -> Result<FsHold, EngineError> {
        // Record first: the state file may live on one of these mounts.
        self.write_state(&self.mounts)?;
        let mut hold = FsHold {
            fs: self.clone(),
            frozen: Vec::new(),
        };
        for mount in &self.mounts {
            self.tell_watchdog(&format!("freeze {}", mount.display()))?;
            if let Err(e) = sys::freeze(mount) {
                let message = format!("FIFREEZE {}: {e}", mount.display());
                let _ = hold.thaw_mounts();
                return Err(self.err(Step::Freeze, Cause::Refused, message));
            }
            hold.frozen.push(mount.clone());
        }
        Ok(hold)
    }

    /// Thaws whatever the state file lists (left by a crashed agent).
    pub fn recover_mounts(&self) -> Result<Option<String>, EngineError> {
        let Ok(text) = std::fs::read_to_string(&self.state_file) else {
            return Ok(None);
        };
        let mut done = Vec::new();
        for path in text.lines().filter(|l| !l.is_empty()) {
            match sys::thaw(Path::new(path)) {
                Ok(()) => done.push(format!("thawed {path}")),
                // EINVAL: it was not frozen (the watchdog already thawed it).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => done.push(format!("could not thaw {path}: {e}")),
            }
        }
        self.write_state(&[])?;
        Ok((!done.is_empty()).then(|| done.join("; ")))
    }
}

/// Mounts frozen by one hold.
#[derive(Debug)]
pub struct FsHold {
    fs: FsFreeze,
    frozen: Vec<PathBuf>,
}

impl FsHold {
    fn thaw_mounts(&mut self) -> Result<(), EngineError> {
        let mut errors = Vec::new();
        for mount in self.frozen.drain(..).rev() {
            match sys::thaw(&mount) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => errors.push(format!("FITHAW {}: {e}", mount.display())),
            }
            let _ = self.fs.tell_watchdog(&format!("thaw {}", mount.display()));
        }
        self.fs.write_state(&[])?;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(self.fs.err(Step::Thaw, Cause::Refused, errors.join("; ")))
        }
    }
}

impl Drop for FsHold {
    fn drop(&mut self) {
        // Never leave a mount frozen behind a dropped hold.
        if !self.frozen.is_empty() {
            let _ = self.thaw_mounts();
        }
    }
}

#[async_trait]
impl Engine for FsFreeze {
    fn kind(&self) -> EngineKind {
        EngineKind::Fsfreeze
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        Ok(Description {
            server_version: format!(
                "fsfreeze on {}",
                self.mounts
                    .iter()
                    .map(|m| m.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            role: pb::Role::Standalone,
            upstream: String::new(),
            capabilities: pb::Capabilities {
                blocks_writes: true,
                wait_for_position: false,
                thaw_artefacts: false,
            },
            paths: self
                .mounts
                .iter()
                .map(|m| super::server_path("mount", m.display().to_string()))
                .collect(),
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        Err(self.err(
            Step::Position,
            Cause::Invalid,
            "a filesystem has no replication position".into(),
        ))
    }

    async fn prepare(&self, _backup_id: &str, _atomic_cut: bool) -> Result<String, EngineError> {
        Ok("nothing to prepare".into())
    }

    async fn freeze(
        &self,
        _backup_id: &str,
        _ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let fs = self.clone();
        let hold = tokio::task::spawn_blocking(move || fs.freeze_mounts())
            .await
            .map_err(|e| self.err(Step::Freeze, Cause::Refused, e.to_string()))??;
        Ok(Box::new(FsFrozen { hold }))
    }

    async fn wait_for_position(
        &self,
        _: &pb::Position,
        _: Duration,
    ) -> Result<pb::Position, EngineError> {
        Err(self.err(
            Step::Wait,
            Cause::Invalid,
            "a filesystem has no replication position".into(),
        ))
    }

    async fn recover(&self) -> Result<Option<String>, EngineError> {
        self.recover_mounts()
    }
}

#[derive(Debug)]
struct FsFrozen {
    hold: FsHold,
}

#[async_trait]
impl Frozen for FsFrozen {
    fn position(&self) -> pb::Position {
        pb::Position::default()
    }

    async fn lost(&mut self) -> EngineError {
        std::future::pending().await
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        Ok("filesystems frozen: FIFREEZE wrote everything out".into())
    }

    async fn thaw(mut self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        let fs = self.hold.fs.clone();
        let mut hold = std::mem::replace(
            &mut self.hold,
            FsHold {
                fs: fs.clone(),
                frozen: Vec::new(),
            },
        );
        tokio::task::spawn_blocking(move || hold.thaw_mounts())
            .await
            .map_err(|e| fs.err(Step::Thaw, Cause::Refused, e.to_string()))??;
        Ok(Thawed::default())
    }
}

/// A database engine with its mounts frozen after it and thawed before it.
#[derive(Debug)]
pub struct Layered {
    inner: Arc<dyn Engine>,
    fs: FsFreeze,
}

impl Layered {
    pub fn new(inner: Arc<dyn Engine>, fs: FsFreeze) -> Self {
        Layered { inner, fs }
    }

    /// Freezes the mounts once the database is frozen; any failure thaws it.
    async fn freeze_mounts_after(
        &self,
        mut database: Box<dyn Frozen>,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        // The database's own flush comes before FIFREEZE: once the mounts
        // are frozen, its writes (a Redis save) would block. Its writes are
        // frozen already, so nothing it acknowledges later is missed.
        let flushed = match database.flush().await {
            Ok(detail) => detail,
            Err(e) => {
                let _ = database.thaw(Ending::Abandoned).await;
                return Err(e);
            }
        };
        let fs = self.fs.clone();
        match tokio::task::spawn_blocking(move || fs.freeze_mounts()).await {
            Ok(Ok(hold)) => Ok(Box::new(LayeredFrozen {
                database,
                hold,
                flushed,
            })),
            Ok(Err(e)) => {
                let _ = database.thaw(Ending::Abandoned).await;
                Err(e)
            }
            Err(e) => {
                let _ = database.thaw(Ending::Abandoned).await;
                Err(self.fs.err(Step::Freeze, Cause::Refused, e.to_string()))
            }
        }
    }
}

#[async_trait]
impl Engine for Layered {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        let mut d = self.inner.describe().await?;
        d.capabilities.blocks_writes = true;
        Ok(d)
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        self.inner.position().await
    }

    async fn prepare(&self, backup_id: &str, atomic_cut: bool) -> Result<String, EngineError> {
        self.inner.prepare(backup_id, atomic_cut).await
    }

    async fn freeze(&self, backup_id: &str, ttl: Duration) -> Result<Box<dyn Frozen>, EngineError> {
        let database = self.inner.freeze(backup_id, ttl).await?;
        self.freeze_mounts_after(database).await
    }

    async fn freeze_writes(
        &self,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        let database = self.inner.freeze_writes(backup_id, ttl).await?;
        self.freeze_mounts_after(database).await
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        self.inner.wait_for_position(target, timeout).await
    }

    async fn recover(&self) -> Result<Option<String>, EngineError> {
        let fs = self.fs.recover_mounts()?;
        let db = self.inner.recover().await?;
        Ok(match (fs, db) {
            (None, None) => None,
            (a, b) => Some([a, b].into_iter().flatten().collect::<Vec<_>>().join("; ")),
        })
    }
}

#[derive(Debug)]
struct LayeredFrozen {
    database: Box<dyn Frozen>,
    hold: FsHold,
    /// What the database's flush (run before FIFREEZE) did.
    flushed: String,
}

#[async_trait]
impl Frozen for LayeredFrozen {
    fn position(&self) -> pb::Position {
        self.database.position()
    }

    async fn lost(&mut self) -> EngineError {
        self.database.lost().await
    }

    async fn renewed(&mut self, ttl: Duration) -> Result<(), EngineError> {
        self.database.renewed(ttl).await
    }

    async fn flush(&mut self) -> Result<String, EngineError> {
        let done = "filesystems frozen: FIFREEZE wrote everything out";
        Ok(match self.flushed.as_str() {
            "" => done.to_string(),
            db => format!("{db} (before FIFREEZE); {done}"),
        })
    }

    async fn thaw(self: Box<Self>, ending: Ending) -> Result<Thawed, EngineError> {
        let LayeredFrozen {
            database, mut hold, ..
        } = *self;
        // Filesystem first, then the database: the reverse of the freeze.
        let fs = tokio::task::spawn_blocking(move || hold.thaw_mounts()).await;
        let db = database.thaw(ending).await;
        match fs {
            Ok(Err(e)) => Err(e),
            _ => db,
        }
    }
}
