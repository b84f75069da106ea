//! exec: a user command started at freeze and kept running as the hold.
//!
//! The freeze counts as done when the optional ready probe succeeds: a
//! command that exits 0 (`STILLPOINT_EXEC_READY_COMMAND`, polled) or a given
//! line on the command's stdout (`STILLPOINT_EXEC_READY_LINE`); with neither,
//! as soon as the command is running. At thaw its process group gets
//! SIGTERM, then SIGKILL after `STILLPOINT_EXEC_GRACE`. If the command exits
//! before the thaw, the hold is lost and reported. The watchdog ends the
//! group if the agent itself dies.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use stillpoint_proto::pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{
    Cause, Ctx, Description, Ending, Engine, EngineError, EngineKind, Frozen, Step, Thawed, sys,
};
use crate::config::{EngineConfig, ExecConfig};
use crate::watchdog;

#[derive(Debug)]
pub struct Exec {
    ctx: Ctx,
    config: ExecConfig,
    poll_interval: Duration,
}

impl Exec {
    pub fn new(ctx: Ctx, config: &EngineConfig) -> Self {
        Exec {
            ctx,
            config: config.exec.clone(),
            poll_interval: config.poll_interval.max(Duration::from_millis(20)),
        }
    }
}

/// A running hold command; its process group is ended when this drops.
#[derive(Debug)]
struct Group {
    child: Child,
    pgid: u32,
    ended: bool,
}

impl Group {
    fn spawn(command: &str) -> std::io::Result<Group> {
        let child = Command::new("sh")
            .args(["-c", command])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let pgid = child.id().unwrap_or(0);
        let _ = watchdog::tell(&format!("group {pgid}"));
        Ok(Group {
            child,
            pgid,
            ended: false,
        })
    }

    async fn end(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if self.ended {
            return None;
        }
        self.ended = true;
        sys::signal_group(self.pgid, libc::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                sys::signal_group(self.pgid, libc::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        // Children of the shell may outlive it: the group goes too.
        sys::signal_group(self.pgid, libc::SIGKILL);
        let _ = watchdog::tell(&format!("ungroup {}", self.pgid));
        status
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.ended {
            sys::signal_group(self.pgid, libc::SIGKILL);
            let _ = watchdog::tell(&format!("ungroup {}", self.pgid));
        }
    }
}

#[async_trait]
impl Engine for Exec {
    fn kind(&self) -> EngineKind {
        EngineKind::Exec
    }

    async fn describe(&self) -> Result<Description, EngineError> {
        Ok(Description {
            server_version: "exec hold command".into(),
            role: pb::Role::Standalone,
            upstream: String::new(),
            capabilities: pb::Capabilities {
                blocks_writes: true,
                wait_for_position: false,
                thaw_artefacts: false,
            },
            ..Default::default()
        })
    }

    async fn position(&self) -> Result<(pb::Position, pb::Role), EngineError> {
        Err(self.ctx.err(
            Step::Position,
            Cause::Invalid,
            "an exec member has no replication position",
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
        let mut group = Group::spawn(&self.config.command).map_err(|e| {
            self.ctx.err(
                Step::Freeze,
                Cause::Refused,
                format!("cannot start the hold command: {e}"),
            )
        })?;
        let stdout = group.child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let exited = |status: Option<std::process::ExitStatus>| {
            self.ctx.err(
                Step::Freeze,
                Cause::Refused,
                format!(
                    "the hold command exited before it was ready ({})",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown status".into())
                ),
            )
        };
        if let Some(wanted) = &self.config.ready_line {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.trim() == wanted.trim() => break,
                    Ok(Some(_)) => {}
                    _ => return Err(exited(group.child.wait().await.ok())),
                }
            }
        } else if let Some(probe) = &self.config.ready_command {
            loop {
                if let Ok(Some(status)) = group.child.try_wait() {
                    return Err(exited(Some(status)));
                }
                let ok = Command::new("sh")
                    .args(["-c", probe])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await
                    .is_ok_and(|s| s.success());
                if ok {
                    break;
                }
                tokio::time::sleep(self.poll_interval).await;
            }
        }
        // Keep draining stdout so the command never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Box::new(ExecHold {
            ctx: self.ctx.clone(),
            group,
            grace: self.config.grace,
            started: Instant::now(),
        }))
    }

    async fn wait_for_position(
        &self,
        _: &pb::Position,
        _: Duration,
    ) -> Result<pb::Position, EngineError> {
        Err(self.ctx.err(
            Step::Wait,
            Cause::Invalid,
            "an exec member has no replication position",
        ))
    }
}

#[derive(Debug)]
struct ExecHold {
    ctx: Ctx,
    group: Group,
    grace: Duration,
    started: Instant,
}

#[async_trait]
impl Frozen for ExecHold {
    fn position(&self) -> pb::Position {
        pb::Position::default()
    }

    async fn lost(&mut self) -> EngineError {
        let status = self.group.child.wait().await;
        self.ctx.err(
            Step::Hold,
            Cause::Lost,
            format!(
                "the hold command exited before the thaw, after {} ms ({})",
                self.started.elapsed().as_millis(),
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            ),
        )
    }

    async fn thaw(mut self: Box<Self>, _ending: Ending) -> Result<Thawed, EngineError> {
        let status = self.group.end(self.grace).await;
        let mut thawed = Thawed::default();
        if let Some(status) = status {
            thawed
                .artefacts
                .insert("exit_status".into(), status.to_string());
        }
        Ok(thawed)
    }
}
