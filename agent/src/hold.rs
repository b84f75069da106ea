//! The hold: one freeze at a time, owned by a backup id, kept under a lease.
//!
//! - A freeze is owned by one backup id and has a TTL. Each renewal from the
//!   holder's stream extends it; without one the agent thaws by itself.
//! - The holder's stream ending thaws at once.
//! - A freeze with another id is refused and names the holder; the same id
//!   takes the hold over (the old stream is told and no longer owns it).
//! - If the engine reports the held session lost, the hold fails at once.
//! - Thaw is idempotent: a hold that already ended returns its recorded
//!   result; an unknown id is a no-op that says so. A stream that was taken
//!   over can no longer thaw (or flush) the hold it lost.
//! - The flush (the engine's own, then `syncfs(2)` on the volumes) runs
//!   inside the hold, bounded by the flush timeout and by the lease.
//! - Only a thaw that the holder asked for after a complete cut keeps what a
//!   restore needs (PostgreSQL's WAL); every other ending releases it all.
//!
//! Each hold is run by one supervisor task that owns the engine's
//! [`Frozen`] value, so lease expiry, renewals, loss and thaw never race.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stillpoint_proto::pb::{self, freeze_event::Event};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use crate::durable::{self, Volumes};
use crate::engine::{Cause, Ending, Engine, EngineError, Frozen, Step};
use crate::metrics::{CauseLabel, Metrics};

/// Events for the stream that holds the freeze.
pub type Events = mpsc::Sender<pb::FreezeEvent>;

/// How many ended holds are remembered for idempotent thaws.
const HISTORY: usize = 64;

/// Why a hold request was not granted.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(
        "member {member} is already frozen by backup '{holder}' (lease expires in {expires_in_ms} ms); \
         thaw that backup or wait for its lease to expire"
    )]
    Busy {
        member: String,
        holder: String,
        expires_in_ms: u64,
    },
    #[error(
        "member {member}: a freeze for backup '{backup_id}' is still being taken; retry shortly"
    )]
    InProgress { member: String, backup_id: String },
    #[error("member {member}: {what}")]
    Invalid { member: String, what: String },
    #[error(
        "member {member}: backup '{backup_id}' holds no freeze here (it ended or was taken over)"
    )]
    NotHolder { member: String, backup_id: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A granted freeze, as seen by the stream that asked for it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub frozen: pb::Frozen,
    /// Which stream owns the hold; older generations no longer renew it.
    pub generation: u64,
    /// Changes (or closes) when the hold has ended.
    pub ended: watch::Receiver<()>,
}

/// What a thaw request found.
#[derive(Debug, Clone)]
pub struct ThawOutcome {
    pub known: bool,
    pub already_thawed: bool,
    pub result: Option<pb::ThawResult>,
    pub message: String,
}

enum Slot {
    Idle,
    Freezing { backup_id: String },
    Held(Handle),
}

struct Handle {
    backup_id: String,
    commands: mpsc::UnboundedSender<Command>,
    deadline: Arc<Mutex<Instant>>,
    frozen_at: Instant,
}

/// How long the hold in force has lasted, and how far past its lease's
/// deadline it is (zero while renewals keep it within its lease; more
/// while a thaw its lease called for has not completed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoldTimes {
    pub held: Duration,
    pub overdue: Duration,
}

enum Command {
    Attach {
        events: Events,
        reply: oneshot::Sender<Attached>,
    },
    Renew {
        generation: u64,
        reply: oneshot::Sender<Result<Duration, ()>>,
    },
    Detach {
        generation: u64,
    },
    Flush {
        generation: u64,
        sync_volumes: bool,
    },
    Thaw {
        cause: pb::ThawCause,
        /// The stream asking, if it is one: a stream that was taken over
        /// thaws nothing.
        generation: Option<u64>,
        ending: Ending,
        reply: oneshot::Sender<pb::ThawResult>,
    },
}

/// A hold as its supervisor keeps it: the engine's hold, the stream its
/// events go to (and that stream's generation), the lease's deadline, and
/// the error that lost it, if one did.
struct Held {
    frozen: Box<dyn Frozen>,
    events: Events,
    generation: u64,
    deadline: Instant,
    lost: Option<EngineError>,
}

/// How a hold ends: why, how its engine ends it, and who asked (a thaw
/// request waits for the result).
struct End {
    cause: pb::ThawCause,
    ending: Ending,
    reply: Option<oneshot::Sender<pb::ThawResult>>,
}

impl End {
    /// Ended without a thaw request: the hold is abandoned.
    fn abandoned(cause: pb::ThawCause) -> Self {
        End {
            cause,
            ending: Ending::Abandoned,
            reply: None,
        }
    }
}

/// Bounds applied to every hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_ttl: Duration,
    pub freeze_timeout: Duration,
    pub flush_timeout: Duration,
    pub thaw_timeout: Duration,
}

/// The agent's single hold slot.
pub struct Holds {
    engine: Arc<dyn Engine>,
    member: String,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Where the flush syncs.
    pub volumes: Volumes,
    slot: Mutex<Slot>,
    history: Mutex<VecDeque<pb::ThawResult>>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds")
            .field("member", &self.member)
            .field("engine", &self.engine.kind())
            .field("holder", &self.holder())
            .finish_non_exhaustive()
    }
}

impl Holds {
    pub fn new(
        engine: Arc<dyn Engine>,
        member: String,
        limits: Limits,
        metrics: Arc<Metrics>,
        volumes: Volumes,
    ) -> Arc<Self> {
        Arc::new(Holds {
            engine,
            member,
            limits,
            metrics,
            volumes,
            slot: Mutex::new(Slot::Idle),
            history: Mutex::new(VecDeque::new()),
        })
    }

    /// The backup id holding the freeze, and whether the freeze is in force
    /// (`false` while it is still being taken).
    pub fn state(&self) -> Option<(String, bool)> {
        match &*self.slot.lock().unwrap() {
            Slot::Idle => None,
            Slot::Freezing { backup_id } => Some((backup_id.clone(), false)),
            Slot::Held(h) => Some((h.backup_id.clone(), true)),
        }
    }

    /// The hold in force, if one is: how long it has lasted and how far
    /// past its deadline it is.
    pub fn times(&self) -> Option<HoldTimes> {
        match &*self.slot.lock().unwrap() {
            Slot::Held(h) => {
                let now = Instant::now();
                let deadline = *h.deadline.lock().unwrap();
                Some(HoldTimes {
                    held: now.saturating_duration_since(h.frozen_at),
                    overdue: now.saturating_duration_since(deadline),
                })
            }
            _ => None,
        }
    }

    /// The backup id currently holding (or taking) the freeze.
    pub fn holder(&self) -> Option<String> {
        match &*self.slot.lock().unwrap() {
            Slot::Idle => None,
            Slot::Freezing { backup_id } => Some(backup_id.clone()),
            Slot::Held(h) => Some(h.backup_id.clone()),
        }
    }

    fn invalid(&self, what: String) -> HoldError {
        HoldError::Invalid {
            member: self.member.clone(),
            what,
        }
    }

    /// Freezes for `backup_id`, or takes over the hold that id already owns.
    /// The `Frozen` event is sent on `events` before this returns.
    /// Takes the hold; `aligned_us` (the alignment wait that preceded it,
    /// if any) is reported in the `frozen` event.
    /// `block_writes`: every write must wait (a quiesce; see
    /// [`Engine::freeze_writes`]).
    pub async fn freeze(
        self: &Arc<Self>,
        backup_id: &str,
        ttl: Duration,
        aligned_us: u64,
        block_writes: bool,
        events: Events,
    ) -> Result<Attached, HoldError> {
        self.check_request(backup_id, ttl)?;
        if let Some(commands) = self.claim(backup_id, ttl)? {
            return self.attach(commands, backup_id, events).await;
        }
        // The slot says Freezing: whatever happens below must leave it.
        let started = Instant::now();
        let frozen = self.freeze_engine(backup_id, ttl, block_writes).await?;
        let took = started.elapsed();
        Ok(self.hold(backup_id, ttl, frozen, took, aligned_us, events))
    }

    fn check_request(&self, backup_id: &str, ttl: Duration) -> Result<(), HoldError> {
        if backup_id.trim().is_empty() {
            return Err(self.invalid("a freeze needs a backup id".into()));
        }
        if ttl.is_zero() || ttl > self.limits.max_ttl {
            return Err(self.invalid(format!(
                "lease TTL {} ms is invalid: it must be greater than 0 and at most {} ms (STILLPOINT_MAX_TTL)",
                ttl.as_millis(),
                self.limits.max_ttl.as_millis()
            )));
        }
        Ok(())
    }

    /// The slot for `backup_id`: marked Freezing when idle (`None`), the
    /// hold's commands when `backup_id` already holds it (a takeover), or
    /// why another freeze has it.
    fn claim(
        &self,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<Option<mpsc::UnboundedSender<Command>>, HoldError> {
        let mut slot = self.slot.lock().unwrap();
        match &*slot {
            Slot::Held(h) if h.backup_id == backup_id => Ok(Some(h.commands.clone())),
            Slot::Held(h) => {
                let left = h
                    .deadline
                    .lock()
                    .unwrap()
                    .saturating_duration_since(Instant::now());
                Err(HoldError::Busy {
                    member: self.member.clone(),
                    holder: h.backup_id.clone(),
                    expires_in_ms: left.as_millis() as u64,
                })
            }
            Slot::Freezing { backup_id: other } if other == backup_id => {
                Err(HoldError::InProgress {
                    member: self.member.clone(),
                    backup_id: other.clone(),
                })
            }
            Slot::Freezing { backup_id: other } => Err(HoldError::Busy {
                member: self.member.clone(),
                holder: other.clone(),
                expires_in_ms: ttl.as_millis() as u64,
            }),
            Slot::Idle => {
                *slot = Slot::Freezing {
                    backup_id: backup_id.to_string(),
                };
                Ok(None)
            }
        }
    }

    /// Takes over the hold `backup_id` owns: its events go to `events`.
    async fn attach(
        &self,
        commands: mpsc::UnboundedSender<Command>,
        backup_id: &str,
        events: Events,
    ) -> Result<Attached, HoldError> {
        let (reply, answer) = oneshot::channel();
        let ended = || HoldError::NotHolder {
            member: self.member.clone(),
            backup_id: backup_id.to_string(),
        };
        commands
            .send(Command::Attach { events, reply })
            .map_err(|_| ended())?;
        answer.await.map_err(|_| ended())
    }

    /// The engine's freeze within its timeout; on failure the slot is idle
    /// again.
    async fn freeze_engine(
        &self,
        backup_id: &str,
        ttl: Duration,
        block_writes: bool,
    ) -> Result<Box<dyn Frozen>, HoldError> {
        let freezing = match block_writes {
            true => self.engine.freeze_writes(backup_id, ttl),
            false => self.engine.freeze(backup_id, ttl),
        };
        let outcome = match timeout(self.limits.freeze_timeout, freezing).await {
            Ok(result) => result,
            Err(_) => Err(EngineError {
                member: self.member.clone(),
                engine: self.engine.kind(),
                step: Step::Freeze,
                cause: Cause::Timeout,
                message: format!(
                    "no freeze within {} ms (STILLPOINT_FREEZE_TIMEOUT)",
                    self.limits.freeze_timeout.as_millis()
                ),
            }),
        };
        outcome.map_err(|err| {
            *self.slot.lock().unwrap() = Slot::Idle;
            self.metrics.failure(&err);
            err.into()
        })
    }

    /// Frozen in `took`: the metrics, the `Frozen` event, the slot held,
    /// and the hold's supervisor running.
    fn hold(
        self: &Arc<Self>,
        backup_id: &str,
        ttl: Duration,
        frozen: Box<dyn Frozen>,
        took: Duration,
        aligned_us: u64,
        events: Events,
    ) -> Attached {
        let engine = Metrics::engine(self.engine.kind().name());
        self.metrics
            .freeze_seconds
            .get_or_create(&engine)
            .observe(took.as_secs_f64());
        self.metrics.frozen.set(1);
        let event = pb::Frozen {
            backup_id: backup_id.to_string(),
            position: Some(frozen.position()),
            freeze_duration_us: took.as_micros() as u64,
            ttl_ms: ttl.as_millis() as u64,
            resumed: false,
            aligned_us,
        };
        let _ = events.try_send(pb::FreezeEvent {
            event: Some(Event::Frozen(event.clone())),
        });
        let (commands, inbox) = mpsc::unbounded_channel();
        let (end_signal, ended) = watch::channel(());
        let deadline = Arc::new(Mutex::new(Instant::now() + ttl));
        *self.slot.lock().unwrap() = Slot::Held(Handle {
            backup_id: backup_id.to_string(),
            commands,
            deadline: deadline.clone(),
            frozen_at: Instant::now(),
        });
        tracing::info!(
            backup_id,
            ttl_ms = ttl.as_millis() as u64,
            freeze_us = took.as_micros() as u64,
            "frozen"
        );
        let supervisor = Supervisor {
            holds: self.clone(),
            backup_id: backup_id.to_string(),
            ttl,
            deadline,
            frozen_event: event.clone(),
            frozen_at: Instant::now(),
            end_signal,
        };
        tokio::spawn(supervisor.run(frozen, inbox, events));
        Attached {
            frozen: event,
            generation: 1,
            ended,
        }
    }

    fn commands_for(&self, backup_id: &str) -> Option<mpsc::UnboundedSender<Command>> {
        match &*self.slot.lock().unwrap() {
            Slot::Held(h) if h.backup_id == backup_id => Some(h.commands.clone()),
            _ => None,
        }
    }

    /// Extends the lease of `backup_id` by its TTL. Only the current stream
    /// (`generation`) may renew.
    pub async fn renew(&self, backup_id: &str, generation: u64) -> Result<Duration, HoldError> {
        let not_holder = || HoldError::NotHolder {
            member: self.member.clone(),
            backup_id: backup_id.to_string(),
        };
        let commands = self.commands_for(backup_id).ok_or_else(not_holder)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Renew { generation, reply })
            .map_err(|_| not_holder())?;
        answer
            .await
            .map_err(|_| not_holder())?
            .map_err(|()| not_holder())
    }

    /// The holder's stream ended: thaw now, unless another stream took over.
    pub fn detach(&self, backup_id: &str, generation: u64) {
        if let Some(commands) = self.commands_for(backup_id) {
            let _ = commands.send(Command::Detach { generation });
        }
    }

    /// Asks the hold's stream `generation` to flush; the `flushed` event
    /// (or the hold's failure) follows on that stream.
    pub fn flush(&self, backup_id: &str, generation: u64, sync_volumes: bool) {
        if let Some(commands) = self.commands_for(backup_id) {
            let _ = commands.send(Command::Flush {
                generation,
                sync_volumes,
            });
        }
    }

    /// Thaws `backup_id` (a `Thaw` call, a shutdown): nothing is kept for
    /// a restore. Idempotent.
    pub async fn thaw(&self, backup_id: &str, cause: pb::ThawCause) -> ThawOutcome {
        self.end(backup_id, cause, None, Ending::Abandoned).await
    }

    /// Thaws `backup_id` at the request of its stream `generation`;
    /// `completed`: the cut it protected is complete. A stream that was
    /// taken over thaws nothing.
    pub async fn thaw_from_stream(
        &self,
        backup_id: &str,
        generation: u64,
        completed: bool,
    ) -> Option<pb::ThawResult> {
        let commands = self.commands_for(backup_id)?;
        let (reply, answer) = oneshot::channel();
        let ending = if completed {
            Ending::Completed
        } else {
            Ending::Abandoned
        };
        commands
            .send(Command::Thaw {
                cause: pb::ThawCause::Requested,
                generation: Some(generation),
                ending,
                reply,
            })
            .ok()?;
        answer.await.ok()
    }

    async fn end(
        &self,
        backup_id: &str,
        cause: pb::ThawCause,
        generation: Option<u64>,
        ending: Ending,
    ) -> ThawOutcome {
        if let Some(commands) = self.commands_for(backup_id) {
            let (reply, answer) = oneshot::channel();
            let command = Command::Thaw {
                cause,
                generation,
                ending,
                reply,
            };
            if commands.send(command).is_ok()
                && let Ok(result) = answer.await
            {
                return ThawOutcome {
                    known: true,
                    already_thawed: false,
                    message: format!("thawed member {}", self.member),
                    result: Some(result),
                };
            }
        }
        let past = self
            .history
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.backup_id == backup_id)
            .cloned();
        match past {
            Some(result) => ThawOutcome {
                known: true,
                already_thawed: true,
                message: format!(
                    "backup '{backup_id}' was already thawed on member {} ({})",
                    self.member,
                    cause_name(result.cause)
                ),
                result: Some(result),
            },
            None => ThawOutcome {
                known: false,
                already_thawed: false,
                result: None,
                message: format!(
                    "no hold for backup '{backup_id}' on member {}: nothing to thaw \
                     (never frozen here, or ended long ago)",
                    self.member
                ),
            },
        }
    }

    /// Thaws whatever is held (agent shutdown). Waits for a freeze that is
    /// still being taken, up to the freeze timeout.
    pub async fn shutdown(&self) {
        let give_up = Instant::now() + self.limits.freeze_timeout + Duration::from_secs(1);
        loop {
            let holder = match &*self.slot.lock().unwrap() {
                Slot::Idle => return,
                Slot::Freezing { .. } => None,
                Slot::Held(h) => Some(h.backup_id.clone()),
            };
            match holder {
                Some(id) => {
                    let outcome = self.thaw(&id, pb::ThawCause::Shutdown).await;
                    tracing::info!(backup_id = %id, "{}", outcome.message);
                }
                None if Instant::now() > give_up => return,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

pub fn cause_name(cause: i32) -> &'static str {
    match pb::ThawCause::try_from(cause).unwrap_or_default() {
        pb::ThawCause::Requested => "thaw requested",
        pb::ThawCause::StreamClosed => "holder's stream closed",
        pb::ThawCause::LeaseExpired => "lease expired",
        pb::ThawCause::HoldLost => "hold lost",
        pb::ThawCause::Shutdown => "agent shutting down",
        pb::ThawCause::Unspecified => "unknown cause",
    }
}

struct Supervisor {
    holds: Arc<Holds>,
    backup_id: String,
    ttl: Duration,
    deadline: Arc<Mutex<Instant>>,
    frozen_event: pb::Frozen,
    frozen_at: Instant,
    /// Dropped when the hold ends, which wakes every stream reader.
    end_signal: watch::Sender<()>,
}

impl Supervisor {
    fn send(events: &Events, event: Event) {
        // A holder that does not read its stream only misses events.
        let _ = events.try_send(pb::FreezeEvent { event: Some(event) });
    }

    /// Holds until the lease runs out, the hold is lost, or a command ends
    /// it; then thaws and records the result.
    async fn run(
        self,
        frozen: Box<dyn Frozen>,
        mut inbox: mpsc::UnboundedReceiver<Command>,
        events: Events,
    ) {
        let mut held = Held {
            frozen,
            events,
            generation: 1,
            deadline: *self.deadline.lock().unwrap(),
            lost: None,
        };
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(held.deadline) => break End::abandoned(pb::ThawCause::LeaseExpired),
                err = held.frozen.lost() => {
                    held.lost = Some(err);
                    break End::abandoned(pb::ThawCause::HoldLost);
                }
                command = inbox.recv() => {
                    if let Some(end) = self.command(&mut held, command).await {
                        break end;
                    }
                }
            }
        };
        self.finish(held, end, inbox).await;
    }

    /// What command `command` (none: every sender is gone) does to the
    /// hold; `Some` when it ends it.
    async fn command(&self, held: &mut Held, command: Option<Command>) -> Option<End> {
        let generation = held.generation;
        match command {
            None => Some(End::abandoned(pb::ThawCause::Shutdown)),
            Some(Command::Attach { events, reply }) => {
                self.attach(held, events, reply);
                None
            }
            Some(Command::Renew {
                generation: g,
                reply,
            }) if g == generation => self.renew(held, reply).await,
            Some(Command::Renew { reply, .. }) => {
                let _ = reply.send(Err(()));
                None
            }
            Some(Command::Detach { generation: g }) if g == generation => {
                Some(End::abandoned(pb::ThawCause::StreamClosed))
            }
            Some(Command::Detach { .. }) => None,
            Some(Command::Flush {
                generation: g,
                sync_volumes,
            }) if g == generation => self.flush_held(held, sync_volumes).await,
            // A stream that was taken over flushes and thaws nothing
            // (dropping the reply tells its caller so).
            Some(Command::Flush { .. }) => None,
            Some(Command::Thaw {
                generation: Some(g),
                ..
            }) if g != generation => None,
            Some(Command::Thaw {
                cause,
                ending,
                reply,
                ..
            }) => Some(End {
                cause,
                ending,
                reply: Some(reply),
            }),
        }
    }

    /// Another stream for the same backup takes the hold over.
    fn attach(&self, held: &mut Held, events: Events, reply: oneshot::Sender<Attached>) {
        held.generation += 1;
        self.holds.metrics.takeovers.inc();
        Self::send(
            &held.events,
            Event::Failed(pb::HoldFailed {
                backup_id: self.backup_id.clone(),
                reason: "another stream for the same backup took the hold over".into(),
            }),
        );
        held.events = events;
        held.deadline = self.extend();
        let frozen = pb::Frozen {
            resumed: true,
            ..self.frozen_event.clone()
        };
        Self::send(&held.events, Event::Frozen(frozen.clone()));
        let _ = reply.send(Attached {
            frozen,
            generation: held.generation,
            ended: self.end_signal.subscribe(),
        });
    }

    /// The lease renewed (and the engine's hold with it), or the hold lost.
    async fn renew(
        &self,
        held: &mut Held,
        reply: oneshot::Sender<Result<Duration, ()>>,
    ) -> Option<End> {
        // Bounded by the lease: a server that stopped answering (a network
        // partition inside the pod) must not keep the hold past it.
        let renewed = tokio::time::timeout_at(held.deadline, held.frozen.renewed(self.ttl))
            .await
            .unwrap_or_else(|_| Err(self.unanswered_renewal()));
        if let Err(err) = renewed {
            let _ = reply.send(Err(()));
            held.lost = Some(err);
            return Some(End::abandoned(pb::ThawCause::HoldLost));
        }
        held.deadline = self.extend();
        Self::send(
            &held.events,
            Event::Renewed(pb::Renewed {
                expires_in_ms: self.ttl.as_millis() as u64,
            }),
        );
        let _ = reply.send(Ok(self.ttl));
        None
    }

    /// The engine did not confirm its hold before the lease ran out: the
    /// hold is as good as lost (the server ends it by its own timeout).
    fn unanswered_renewal(&self) -> EngineError {
        EngineError {
            member: self.holds.member.clone(),
            engine: self.holds.engine.kind(),
            step: Step::Hold,
            cause: Cause::Lost,
            message: format!(
                "the server did not confirm the hold within the {} ms lease",
                self.ttl.as_millis()
            ),
        }
    }

    /// The flush, reported as an event; a hold lost while flushing ends.
    async fn flush_held(&self, held: &mut Held, sync_volumes: bool) -> Option<End> {
        match self
            .flush(held.frozen.as_mut(), held.deadline, sync_volumes)
            .await
        {
            Ok(flushed) => Self::send(&held.events, Event::Flushed(flushed)),
            Err(err) => {
                Self::send(
                    &held.events,
                    Event::Flushed(pb::Flushed {
                        error: err.to_string(),
                        ..Default::default()
                    }),
                );
                if err.cause == Cause::Lost {
                    held.lost = Some(err);
                    return Some(End::abandoned(pb::ThawCause::HoldLost));
                }
            }
        }
        None
    }

    /// Thaws, tells the stream why and how, frees the slot and records the
    /// result.
    async fn finish(self, held: Held, end: End, inbox: mpsc::UnboundedReceiver<Command>) {
        let Held {
            frozen,
            events,
            lost,
            ..
        } = held;
        let cause = end.cause;
        // Why the hold ended goes out before the thaw, which may take up
        // to the thaw timeout when the server stopped answering: the
        // holder can give up (and thaw the other members) at once.
        if let Some(err) = &lost {
            Self::send(
                &events,
                Event::Failed(pb::HoldFailed {
                    backup_id: self.backup_id.clone(),
                    reason: err.to_string(),
                }),
            );
        } else if cause == pb::ThawCause::LeaseExpired {
            Self::send(
                &events,
                Event::Failed(pb::HoldFailed {
                    backup_id: self.backup_id.clone(),
                    reason: format!(
                        "lease expired: no renewal within {} ms; member {} thaws",
                        self.ttl.as_millis(),
                        self.holds.member
                    ),
                }),
            );
        }
        let result = self.thaw(frozen, cause, end.ending, lost.as_ref()).await;
        Self::send(
            &events,
            Event::Thawed(pb::Thawed {
                result: Some(result.clone()),
            }),
        );
        {
            let mut slot = self.holds.slot.lock().unwrap();
            *slot = Slot::Idle;
            let mut history = self.holds.history.lock().unwrap();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(result.clone());
        }
        if let Some(reply) = end.reply {
            let _ = reply.send(result);
        }
        // `inbox` drops here, after the history is written: a thaw request
        // that raced with the end finds the recorded result.
        drop(inbox);
    }

    /// The engine's flush, then (`sync_volumes`) `syncfs(2)` on the
    /// volumes; bounded by the flush timeout and by the lease (a hold never
    /// outlives its lease).
    async fn flush(
        &self,
        frozen: &mut dyn Frozen,
        deadline: Instant,
        sync_volumes: bool,
    ) -> Result<pb::Flushed, EngineError> {
        let holds = &self.holds;
        let started = Instant::now();
        let bound = (started + holds.limits.flush_timeout).min(deadline);
        let timed_out = || EngineError {
            member: holds.member.clone(),
            engine: holds.engine.kind(),
            step: Step::Flush,
            cause: Cause::Timeout,
            message: format!(
                "no flush within {} ms (STILLPOINT_FLUSH_TIMEOUT, or what was left of the lease)",
                bound.saturating_duration_since(started).as_millis()
            ),
        };
        let detail = tokio::time::timeout_at(bound, frozen.flush())
            .await
            .map_err(|_| timed_out())??;
        let engine_us = started.elapsed().as_micros() as u64;
        if !sync_volumes {
            let detail = match detail.is_empty() {
                true => {
                    "nothing to flush; volumes not synced (the snapshot sees the page cache)".into()
                }
                false => format!("{detail}; volumes not synced (the snapshot sees the page cache)"),
            };
            tracing::info!(backup_id = %self.backup_id, engine_us, "{detail}");
            return Ok(pb::Flushed {
                engine_us,
                sync_us: 0,
                detail,
                error: String::new(),
            });
        }
        if holds.volumes.list().is_empty() && !holds.volumes.configured() {
            // No Describe yet: learn where the server keeps its files.
            holds.volumes.learn(&holds.engine.describe().await?.paths);
        }
        let (paths, configured) = (holds.volumes.list(), holds.volumes.configured());
        let syncing = tokio::task::spawn_blocking(move || durable::sync_all(&paths, configured));
        let synced = tokio::time::timeout_at(bound, syncing)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|message| EngineError {
                member: holds.member.clone(),
                engine: holds.engine.kind(),
                step: Step::Flush,
                cause: Cause::Refused,
                message,
            })?;
        let sync_us = started.elapsed().as_micros() as u64 - engine_us;
        let synced: Vec<String> = synced.iter().map(|p| p.display().to_string()).collect();
        let detail = match (detail.is_empty(), synced.is_empty()) {
            (_, true) => format!("{detail}; no volumes to sync"),
            (true, false) => format!("synced {}", synced.join(", ")),
            (false, false) => format!("{detail}; synced {}", synced.join(", ")),
        };
        tracing::info!(backup_id = %self.backup_id, engine_us, sync_us, "{detail}");
        Ok(pb::Flushed {
            engine_us,
            sync_us,
            detail,
            error: String::new(),
        })
    }

    fn extend(&self) -> Instant {
        let deadline = Instant::now() + self.ttl;
        *self.deadline.lock().unwrap() = deadline;
        deadline
    }

    async fn thaw(
        &self,
        frozen: Box<dyn Frozen>,
        cause: pb::ThawCause,
        ending: Ending,
        lost: Option<&EngineError>,
    ) -> pb::ThawResult {
        let holds = &self.holds;
        let held = self.frozen_at.elapsed();
        let started = Instant::now();
        let outcome = timeout(holds.limits.thaw_timeout, frozen.thaw(ending)).await;
        let took = started.elapsed();
        holds.metrics.frozen.set(0);
        holds
            .metrics
            .thaws
            .get_or_create(&CauseLabel {
                cause: cause_label(cause).into(),
            })
            .inc();
        if cause == pb::ThawCause::LeaseExpired {
            holds.metrics.lease_expiries.inc();
        }
        let mut result = pb::ThawResult {
            backup_id: self.backup_id.clone(),
            cause: cause as i32,
            thaw_duration_us: took.as_micros() as u64,
            held_us: held.as_micros() as u64,
            ..Default::default()
        };
        if let Some(err) = lost {
            holds.metrics.failure(err);
            result.error = err.to_string();
        }
        match outcome {
            Ok(Ok(thawed)) => {
                holds
                    .metrics
                    .thaw_seconds
                    .get_or_create(&Metrics::engine(holds.engine.kind().name()))
                    .observe(took.as_secs_f64());
                result.artefacts = thawed.artefacts.into_iter().collect();
                result.stop_position = thawed.stop_position;
            }
            Ok(Err(err)) => {
                holds.metrics.failure(&err);
                if result.error.is_empty() {
                    result.error = err.to_string();
                }
            }
            Err(_) => {
                let err = EngineError {
                    member: holds.member.clone(),
                    engine: holds.engine.kind(),
                    step: Step::Thaw,
                    cause: Cause::Timeout,
                    message: format!(
                        "no thaw within {} ms (STILLPOINT_THAW_TIMEOUT)",
                        holds.limits.thaw_timeout.as_millis()
                    ),
                };
                holds.metrics.failure(&err);
                result.error = err.to_string();
            }
        }
        if result.error.is_empty() {
            tracing::info!(backup_id = %self.backup_id, cause = cause_name(cause as i32), held_us = result.held_us, thaw_us = result.thaw_duration_us, "thawed");
        } else {
            tracing::warn!(backup_id = %self.backup_id, cause = cause_name(cause as i32), error = %result.error, "hold ended with an error");
        }
        result
    }
}

fn cause_label(cause: pb::ThawCause) -> &'static str {
    match cause {
        pb::ThawCause::Requested => "requested",
        pb::ThawCause::StreamClosed => "stream_closed",
        pb::ThawCause::LeaseExpired => "lease_expired",
        pb::ThawCause::HoldLost => "hold_lost",
        pb::ThawCause::Shutdown => "shutdown",
        pb::ThawCause::Unspecified => "unspecified",
    }
}
