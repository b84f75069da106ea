//! A held freeze kept alive: renews the lease every TTL/3, watches the
//! agent's events, flushes and thaws on request. Dropping it ends the
//! stream, which makes the agent thaw at once.

use std::time::Duration;

use futures_util::FutureExt;

use stillpoint_proto::pb::{self, freeze_event::Event};
use tokio::sync::{mpsc, oneshot, watch};

use crate::core::agents::HeldFreeze;

/// The id agents know a hold by: the kind of what holds it (a backup or a
/// quiesce; in Kubernetes mode the resource's kind), its name and, in
/// Kubernetes mode, its uid. Agents hand a hold to any stream that names
/// its id, so no two holders may ever share one: not a GroupBackup and a
/// GroupQuiesce of similar names, nor an object and a later one that took
/// its name.
pub fn hold_id(kind: &str, name: &str, uid: Option<&str>) -> String {
    match uid {
        Some(uid) => format!("{kind}:{name}:{uid}"),
        None => format!("{kind}:{name}"),
    }
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Request {
    Flush {
        sync_volumes: bool,
        reply: Reply<Arrived>,
    },
    /// The thaw was sent: await its answer.
    Thawed { reply: Reply<pb::ThawResult> },
}

/// The running renewal task of one hold.
#[derive(Debug)]
pub struct Holder {
    pub frozen: pb::Frozen,
    /// `Some(reason)` once the hold was lost.
    pub failed: watch::Receiver<Option<String>>,
    requests: mpsc::Sender<Request>,
    thaw_sender: crate::core::agents::ThawSender,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Flush { .. } => "Flush",
            Request::Thawed { .. } => "Thawed",
        })
    }
}

/// Whether a thaw result ends a hold that lasted until it was asked to
/// end: any other ending (lease expiry, the agent shutting down, a lost
/// session) means the member was not held for the whole cut.
pub fn thaw_accepted(result: &pb::ThawResult) -> Result<(), String> {
    if !result.error.is_empty() {
        return Err(result.error.clone());
    }
    match pb::ThawCause::try_from(result.cause).unwrap_or_default() {
        pb::ThawCause::Requested => Ok(()),
        _ => Err(format!(
            "its hold ended before the thaw was requested ({}): it was not held for the whole cut",
            crate::core::agents::thaw_cause(result.cause)
        )),
    }
}

/// The answer to a flush asked for with the freeze
/// ([`Holder::spawn_flushing`]).
#[derive(Debug)]
pub struct EarlyFlush(oneshot::Receiver<Result<Arrived, String>>);

/// A `flushed` event and when it arrived.
pub type Arrived = (pb::Flushed, tokio::time::Instant);

impl EarlyFlush {
    /// The answer and when it arrived, if it is already there.
    pub fn ready(&mut self) -> Option<(Result<pb::Flushed, String>, Option<tokio::time::Instant>)> {
        match self.0.try_recv() {
            Ok(answer) => Some(Self::split(answer)),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some((Err("the hold ended before it answered".into()), None))
            }
        }
    }

    /// What the agent did, or why it could not, as [`Holder::flush`] says,
    /// and when it arrived.
    pub async fn answer(self) -> (Result<pb::Flushed, String>, Option<tokio::time::Instant>) {
        Self::split(answered(self.0).await)
    }

    fn split(
        answer: Result<Arrived, String>,
    ) -> (Result<pb::Flushed, String>, Option<tokio::time::Instant>) {
        match answer {
            Ok((f, at)) => (flushed(f), Some(at)),
            Err(e) => (Err(e), None),
        }
    }
}

/// What an event from the agent does to the hold: answers the flush
/// awaited, or fails the hold; `false` once the stream ended.
fn on_event(
    event: Result<Option<pb::FreezeEvent>, tonic::Status>,
    flushing: &mut Option<Reply<Arrived>>,
    fail: &impl Fn(String),
) -> bool {
    match event {
        Ok(Some(pb::FreezeEvent {
            event: Some(Event::Flushed(f)),
        })) => {
            if let Some(reply) = flushing.take() {
                let _ = reply.send(Ok((f, tokio::time::Instant::now())));
            }
        }
        Ok(Some(pb::FreezeEvent {
            event: Some(Event::Failed(f)),
        })) => {
            fail(f.reason);
        }
        Ok(Some(pb::FreezeEvent {
            event: Some(Event::Thawed(t)),
        })) => {
            let cause = t
                .result
                .map(|r| crate::core::agents::thaw_cause(r.cause))
                .unwrap_or("?");
            fail(format!("the agent thawed on its own ({cause})"));
        }
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => {
            fail("the freeze stream ended".into());
            return false;
        }
    }
    true
}

/// An answer the hold's task sends, or why none came.
async fn answered<T>(answer: oneshot::Receiver<Result<T, String>>) -> Result<T, String> {
    answer
        .await
        .map_err(|_| "the hold ended before it answered".to_string())?
}

/// A `flushed` event as the flush's outcome: its error, if it has one.
fn flushed(f: pb::Flushed) -> Result<pb::Flushed, String> {
    match f.error.is_empty() {
        true => Ok(f),
        false => Err(f.error),
    }
}

impl Holder {
    pub fn spawn(held: HeldFreeze, ttl: Duration) -> Holder {
        Self::spawn_with(held, ttl, None, None)
    }

    /// Like [`Holder::spawn`], for a hold whose freeze also asked for the
    /// flush: its `flushed` event answers the returned receiver (dropped
    /// unanswered if the hold ends first). An answer that came with
    /// `frozen` is taken at once, without waiting for the hold's task.
    pub fn spawn_flushing(mut held: HeldFreeze, ttl: Duration) -> (Holder, EarlyFlush) {
        let (reply, answer) = oneshot::channel();
        let first = held.next_event().now_or_never();
        let reply = match first {
            Some(Ok(Some(pb::FreezeEvent {
                event: Some(Event::Flushed(f)),
            }))) => {
                let _ = reply.send(Ok((f, tokio::time::Instant::now())));
                return (Self::spawn_with(held, ttl, None, None), EarlyFlush(answer));
            }
            _ => reply,
        };
        (
            Self::spawn_with(held, ttl, Some(reply), first),
            EarlyFlush(answer),
        )
    }

    /// `first`: an event already read from the stream, handled first.
    fn spawn_with(
        mut held: HeldFreeze,
        ttl: Duration,
        flushing: Option<Reply<Arrived>>,
        first: Option<Result<Option<pb::FreezeEvent>, tonic::Status>>,
    ) -> Holder {
        let frozen = held.frozen.clone();
        let thaw_sender = held.thaw_sender();
        let (fail_tx, failed) = watch::channel(None);
        // The first reason is the cause; what follows it (the thaw, the
        // stream's end) is its consequence.
        let fail = move |reason: String| {
            fail_tx.send_if_modified(|current| {
                let first = current.is_none();
                if first {
                    *current = Some(reason);
                }
                first
            });
        };
        let (requests, mut inbox) = mpsc::channel::<Request>(2);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(ttl / 3);
            ticker.tick().await;
            let mut flushing = flushing;
            if let Some(event) = first
                && !on_event(event, &mut flushing, &fail)
            {
                return;
            }
            loop {
                tokio::select! {
                    // Requests first: a `thawed` event that follows a thaw
                    // asked for is that thaw's answer (see `Holder::thaw`).
                    biased;
                    request = inbox.recv() => match request {
                        None => return,
                        // Renewals go on while the agent flushes.
                        Some(Request::Flush { sync_volumes, reply }) => match held.request_flush(sync_volumes).await {
                            Ok(()) => flushing = Some(reply),
                            Err(e) => {
                                let _ = reply.send(Err(e.message().to_string()));
                            }
                        },
                        Some(Request::Thawed { reply }) => {
                            // No renewal while the answer is awaited: once the
                            // lease lapses the agent thaws by itself, so the
                            // answer is awaited no longer than that.
                            let result = match tokio::time::timeout(ttl, held.thawed()).await {
                                Ok(answer) => answer
                                    .map_err(|e| e.message().to_string())
                                    .and_then(|r| r.ok_or_else(|| "the stream ended without a thaw result".into())),
                                Err(_) => Err(format!(
                                    "no answer to the thaw within the lease TTL ({}); the agent thaws by itself once it lapses",
                                    stillpoint_proto::duration::format_duration(ttl)
                                )),
                            };
                            let _ = reply.send(result);
                            return;
                        }
                    },
                    _ = ticker.tick() => {
                        if let Err(e) = held.renew().await {
                            fail(format!("renewal failed: {}", e.message()));
                        }
                    }
                    event = held.next_event() => {
                        if !on_event(event, &mut flushing, &fail) {
                            return;
                        }
                    }
                }
            }
        });
        Holder {
            frozen,
            failed,
            requests,
            thaw_sender,
        }
    }

    /// The loss reason, if the hold was lost.
    pub fn lost(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    async fn ask<T>(&self, request: impl FnOnce(Reply<T>) -> Request) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| "the hold already ended".to_string())?;
        answered(answer).await
    }

    /// Has the agent make what its engine acknowledged durable (and with
    /// `sync_volumes`, on the member's volumes: `syncfs`); returns what it
    /// did, or why it could not.
    pub async fn flush(&self, sync_volumes: bool) -> Result<pb::Flushed, String> {
        let flushed_event = self
            .ask(|reply| Request::Flush {
                sync_volumes,
                reply,
            })
            .await?;
        flushed(flushed_event.0)
    }

    /// Thaws and returns the agent's result. `completed`: the cut this
    /// hold protected is complete (the agent keeps what its restore needs).
    pub async fn thaw(self, completed: bool) -> Result<pb::ThawResult, String> {
        // The hold's task is told first, then the thaw is sent from here,
        // not by that task: it is on its way while the task wakes. The
        // task reads its requests before the stream's events, so it takes
        // the `thawed` answer as this thaw's, never as the agent's own.
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Thawed { reply })
            .await
            .map_err(|_| "the hold already ended".to_string())?;
        self.thaw_sender
            .request_thaw(completed)
            .await
            .map_err(|e| e.message().to_string())?;
        answered(answer).await
    }
}

/// Freezes every `(key, agent)` in parallel under hold id `id` with lease
/// `ttl` and keeps each renewing; if any refuses, thaws the others and
/// returns every refusal (nothing is left frozen). A manual quiesce, in
/// either mode: every write of every member waits (PostgreSQL is fenced
/// whatever its mode, or refuses).
pub async fn freeze_all<K: Clone>(
    tls: &crate::core::agents::ControllerTls,
    agents: &[(K, crate::core::model::AgentEndpoint)],
    label: impl Fn(&K) -> String,
    id: &str,
    ttl: Duration,
) -> Result<Vec<(K, Holder)>, Vec<String>> {
    let frozen = futures_util::future::join_all(agents.iter().map(|(key, agent)| {
        let (tls, label) = (tls.clone(), label(key));
        async move {
            let mut client = tls
                .connect(&agent.addr, &agent.identity)
                .await
                .map_err(|e| format!("{label}: {e}"))?;
            // Frozen within the lease TTL, or not at all.
            let held = tokio::time::timeout(ttl, HeldFreeze::quiesce(&mut client, id, ttl))
                .await
                .map_err(|_| {
                    format!(
                        "{label}: no answer to the freeze within the lease TTL ({})",
                        stillpoint_proto::duration::format_duration(ttl)
                    )
                })?
                .map_err(|e| format!("{label}: {}", e.message()))?;
            Ok::<_, String>((key.clone(), Holder::spawn(held, ttl)))
        }
    }))
    .await;
    let (mut holders, mut errors) = (Vec::new(), Vec::new());
    for r in frozen {
        match r {
            Ok(h) => holders.push(h),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(holders);
    }
    for (_, h) in holders {
        let _ = h.thaw(false).await;
    }
    Err(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(cause: pb::ThawCause, error: &str) -> pb::ThawResult {
        pb::ThawResult {
            backup_id: "b".into(),
            cause: cause as i32,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_requested_thaw_without_error_is_accepted() {
        assert!(thaw_accepted(&result(pb::ThawCause::Requested, "")).is_ok());
        for cause in [
            pb::ThawCause::LeaseExpired,
            pb::ThawCause::StreamClosed,
            pb::ThawCause::HoldLost,
            pb::ThawCause::Shutdown,
            pb::ThawCause::Unspecified,
        ] {
            let err = thaw_accepted(&result(cause, "")).unwrap_err();
            assert!(err.contains("before the thaw was requested"), "{err}");
        }
        let err =
            thaw_accepted(&result(pb::ThawCause::Requested, "backup stop failed")).unwrap_err();
        assert_eq!(err, "backup stop failed");
    }
}
