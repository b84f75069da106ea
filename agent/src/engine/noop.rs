//! The noop engine: every rule of the hold, no database.
//!
//! Its position is a counter that advances by one on every `Position` and
//! `Freeze`; a noop replica "replays" instantly. Protocol tests and the
//! fan-out benchmarks use it; it protects nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_proto::pb;
use stillpoint_proto::position::{PositionExt, make};

use super::{Cause, Description, Ending, Engine, EngineError, EngineKind, Frozen, Step, Thawed};
use crate::config::NoopConfig;

#[derive(Debug)]
pub struct Noop {
    member: String,
    config: NoopConfig,
    counter: Arc<AtomicU64>,
}

impl Noop {
    pub fn new(member: String, config: NoopConfig) -> Self {
        Noop {
            member,
            config,
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    fn role(&self) -> pb::Role {
        if self.config.replica {
            pb::Role::Replica
        } else {
            pb::Role::Primary
        }
    }

    fn error(&self, step: Step, cause: Cause, message: String) -> EngineError {
        EngineError {
            member: self.member.clone(),
            engine: EngineKind::Noop,
            step,
            cause,
            message,
        }
    }
}

#[async_trait]
impl Engine for Noop {
    fn kind(&self) -> EngineKind {
        EngineKind::Noop
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        tokio::time::sleep(self.config.describe_latency).await;
        Ok(Description {
            server_version: "noop".into(),
            role: self.role(),
            upstream: self.config.upstream.clone(),
            capabilities: pb::Capabilities {
                // It has no writes to let through: its freeze stands for
                // one that blocks them (and flushes with it).
                blocks_writes: true,
                wait_for_position: true,
                thaw_artefacts: false,
            },
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        tokio::time::sleep(self.config.describe_latency).await;
        let value = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((make::counter(value), self.role()))
    }

    async fn prepare(&self, _backup_id: &str, _atomic_cut: bool) -> Result<String, EngineError> {
        Ok("nothing to prepare".into())
    }

    async fn freeze(
        &self,
        _backup_id: &str,
        _ttl: Duration,
    ) -> Result<Box<dyn Frozen>, EngineError> {
        if !self.config.freeze_latency.is_zero() {
            tokio::time::sleep(self.config.freeze_latency).await;
        }
        let value = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Box::new(NoopHold {
            position: make::counter(value),
            thaw_latency: self.config.thaw_latency,
        }))
    }

    async fn wait_for_position(
        &self,
        target: &pb::Position,
        _timeout: Duration,
    ) -> Result<pb::Position, EngineError> {
        let Some(pb::position::Kind::Counter(want)) = &target.kind else {
            return Err(self.error(
                Step::Wait,
                Cause::Invalid,
                format!(
                    "a noop member cannot wait for a {} position",
                    target.kind_name()
                ),
            ));
        };
        let value = self
            .counter
            .fetch_max(want.value, Ordering::SeqCst)
            .max(want.value);
        Ok(make::counter(value))
    }
}

#[derive(Debug)]
struct NoopHold {
    position: pb::Position,
    thaw_latency: Duration,
}

#[async_trait]
impl Frozen for NoopHold {
    fn position(&self) -> pb::Position {
        self.position.clone()
    }

    async fn lost(&mut self) -> EngineError {
        std::future::pending().await
    }

    async fn thaw(self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        if !self.thaw_latency.is_zero() {
            tokio::time::sleep(self.thaw_latency).await;
        }
        Ok(Thawed::default())
    }
}
