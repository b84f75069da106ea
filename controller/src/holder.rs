//! A held freeze kept alive: renews the lease every TTL/3, watches the
//! agent's events, and thaws on request. Dropping it ends the stream, which
//! makes the agent thaw at once.

use std::time::Duration;

use stillpoint_proto::pb::{self, freeze_event::Event};
use tokio::sync::{mpsc, oneshot, watch};

use crate::agents::HeldFreeze;

/// The running renewal task of one hold.
#[derive(Debug)]
pub struct Holder {
    pub frozen: pb::Frozen,
    /// `Some(reason)` once the hold was lost.
    pub failed: watch::Receiver<Option<String>>,
    thaw: mpsc::Sender<oneshot::Sender<Result<pb::ThawResult, String>>>,
}

impl Holder {
    pub fn spawn(mut held: HeldFreeze, ttl: Duration) -> Holder {
        let frozen = held.frozen.clone();
        let (fail_tx, failed) = watch::channel(None);
        let (thaw, mut thaw_rx) =
            mpsc::channel::<oneshot::Sender<Result<pb::ThawResult, String>>>(1);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(ttl / 3);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        if let Err(e) = held.renew().await {
                            let _ = fail_tx.send(Some(format!("renewal failed: {}", e.message())));
                        }
                    }
                    event = held.next_event() => match event {
                        Ok(Some(pb::FreezeEvent { event: Some(Event::Failed(f)) })) => {
                            let _ = fail_tx.send(Some(f.reason));
                        }
                        Ok(Some(pb::FreezeEvent { event: Some(Event::Thawed(t)) })) => {
                            let cause = t.result.map(|r| crate::agents::thaw_cause(r.cause)).unwrap_or("?");
                            let _ = fail_tx.send(Some(format!("the agent thawed on its own ({cause})")));
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            let _ = fail_tx.send(Some("the freeze stream ended".into()));
                            return;
                        }
                    },
                    reply = thaw_rx.recv() => {
                        let Some(reply) = reply else { return };
                        let result = match held.request_thaw().await {
                            Ok(()) => held
                                .thawed()
                                .await
                                .map_err(|e| e.message().to_string())
                                .and_then(|r| r.ok_or_else(|| "the stream ended without a thaw result".into())),
                            Err(e) => Err(e.message().to_string()),
                        };
                        let _ = reply.send(result);
                        return;
                    }
                }
            }
        });
        Holder {
            frozen,
            failed,
            thaw,
        }
    }

    /// The loss reason, if the hold was lost.
    pub fn lost(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// Thaws and returns the agent's result.
    pub async fn thaw(self) -> Result<pb::ThawResult, String> {
        let (reply, answer) = oneshot::channel();
        self.thaw
            .send(reply)
            .await
            .map_err(|_| "the hold already ended".to_string())?;
        answer
            .await
            .map_err(|_| "the hold task ended".to_string())?
    }
}
