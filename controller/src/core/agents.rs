//! mTLS channels to agents.
//!
//! The controller dials each agent by address and checks that the agent's
//! certificate chains to the CA and carries the identity expected for that
//! member; DNS names play no part (agents are dialled by pod IP). The
//! controller's own certificate files are re-read when they change, so every
//! new connection uses the current ones.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use stillpoint_proto::pb::agent_client::AgentClient;
use stillpoint_proto::pb::{self, freeze_request::Msg};
use stillpoint_proto::tls::{self as sptls, Credentials, TlsError, TlsFiles};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Default bound on dialling an agent (TCP + TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a dial may be given.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on each request to an agent outside the freeze's own
/// budgets (describe, position, prepare, and the answer to a thaw).
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a request may be given.
pub const MAX_RPC_TIMEOUT: Duration = Duration::from_secs(300);

/// `value` if it is within `max` (a setting named `name`), else why not.
pub fn within(name: &str, value: Duration, max: Duration) -> Result<Duration, String> {
    match value <= max && !value.is_zero() {
        true => Ok(value),
        false => Err(format!(
            "{name} {} is outside its range (over zero, at most {})",
            stillpoint_proto::duration::format_duration(value),
            stillpoint_proto::duration::format_duration(max)
        )),
    }
}

/// Waits at most `bound` for an agent's answer to `what`: a stalled agent
/// (or its stalled database) is an error, never a hang.
pub async fn answer<T>(
    bound: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(bound, call).await {
        Ok(answered) => answered.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer to {what} within {}",
            stillpoint_proto::duration::format_duration(bound)
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentConnectError {
    #[error("agent {addr} (expected identity {identity}): {reason}")]
    Connect {
        addr: String,
        identity: String,
        reason: String,
    },
    #[error("expected agent identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The controller's TLS credentials, kept current from disk.
#[derive(Debug, Clone)]
pub struct ControllerTls {
    creds: watch::Receiver<Arc<Credentials>>,
    pub connect_timeout: Duration,
}

impl ControllerTls {
    /// Loads the files now and re-reads them every `reload_interval`.
    /// Must be called inside a tokio runtime.
    pub fn watch(files: TlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        let (creds, _task) = sptls::watch_files(files, reload_interval, |c| Ok(c.clone()))?;
        Ok(ControllerTls {
            creds,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// The controller's own identity, from its certificate.
    pub fn identity(&self) -> Option<String> {
        self.creds.borrow().identity.clone()
    }

    /// Opens a channel to the agent at `addr` (`host:port`) whose certificate
    /// must carry `identity`. Connects eagerly, so a wrong identity, an
    /// unknown CA or an unreachable agent is reported here.
    pub async fn connect(
        &self,
        addr: &str,
        identity: &str,
    ) -> Result<AgentClient<Channel>, AgentConnectError> {
        sptls::validate_identity(identity).map_err(AgentConnectError::Identity)?;
        let fail = |reason: String| AgentConnectError::Connect {
            addr: addr.to_string(),
            identity: identity.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| fail(format!("not a host:port address: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let creds = self.creds.clone();
        let identity_owned = identity.to_string();
        let target = addr.to_string();
        let timeout = self.connect_timeout;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let config = sptls::client_config(&creds.borrow(), &identity_owned);
            let target = target.clone();
            async move {
                let config = config.map_err(|e| std::io::Error::other(e.to_string()))?;
                let dial = async {
                    let tcp = TcpStream::connect(&target).await?;
                    tcp.set_nodelay(true)?;
                    // The name is not checked (identity is); rustls needs one anyway.
                    let name = rustls::pki_types::ServerName::try_from("stillpoint-agent")
                        .expect("static name is valid");
                    TlsConnector::from(Arc::new(config))
                        .connect(name, tcp)
                        .await
                };
                let tls = tokio::time::timeout(timeout, dial).await.map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        Ok(AgentClient::new(channel))
    }
}

/// The innermost useful message of an error chain.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            parts.push(sptls::refusal_reason(io));
        } else {
            parts.push(e.to_string());
        }
        source = e.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// A `Freeze` stream opened ahead of the freeze (at prepare): the agent
/// already waits for its `start`, so the freeze itself costs one message
/// and its answer. Dropped unused, the stream just ends.
#[derive(Debug)]
pub struct OpenFreeze {
    client: AgentClient<Channel>,
    requests: tokio::sync::mpsc::Sender<pb::FreezeRequest>,
    call: tokio::task::JoinHandle<
        Result<tonic::Response<tonic::Streaming<pb::FreezeEvent>>, tonic::Status>,
    >,
}

impl OpenFreeze {
    pub fn open(client: &AgentClient<Channel>) -> OpenFreeze {
        let (requests, rx) = tokio::sync::mpsc::channel(8);
        let mut caller = client.clone();
        let call = tokio::spawn(async move {
            caller
                .freeze(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        OpenFreeze {
            client: client.clone(),
            requests,
            call,
        }
    }

    /// Sends `start` (with the replica's alignment, if any) and waits for
    /// the agent's `frozen` answer (or its refusal). `flush`: the agent
    /// also flushes right after the freeze (`Some(sync_volumes)`; only for
    /// a member whose freeze blocks every write), and its `flushed` event
    /// follows.
    pub async fn start(
        self,
        backup_id: &str,
        ttl: Duration,
        align: Option<(pb::Position, Duration)>,
        flush: Option<bool>,
    ) -> Result<HeldFreeze, tonic::Status> {
        let (align_to, align_timeout) = match align {
            // 0 would mean the agent's longest wait: at least 1 ms.
            Some((target, bound)) => (Some(target), (bound.as_millis() as u64).max(1)),
            None => (None, 0),
        };
        self.start_with(pb::FreezeStart {
            backup_id: backup_id.to_string(),
            ttl_ms: ttl.as_millis() as u64,
            align_to,
            align_timeout_ms: align_timeout,
            block_writes: false,
            flush: flush.map(|sync_volumes| pb::Flush { sync_volumes }),
        })
        .await
    }

    /// Sends `start` as given and waits for the agent's answer.
    pub async fn start_with(self, start: pb::FreezeStart) -> Result<HeldFreeze, tonic::Status> {
        let start = pb::FreezeRequest {
            msg: Some(Msg::Start(start)),
        };
        self.requests
            .send(start)
            .await
            .map_err(|_| tonic::Status::internal("freeze request channel closed"))?;
        let mut events = self
            .call
            .await
            .map_err(|e| tonic::Status::internal(format!("the freeze call failed: {e}")))??
            .into_inner();
        match events.message().await? {
            Some(pb::FreezeEvent {
                event: Some(pb::freeze_event::Event::Frozen(frozen)),
            }) => Ok(HeldFreeze {
                _channel: self.client,
                requests: self.requests,
                events,
                frozen,
            }),
            other => Err(tonic::Status::internal(format!(
                "agent answered a freeze with {other:?} instead of `frozen`"
            ))),
        }
    }
}

/// Sends a hold's thaw over its stream ([`HeldFreeze::request_thaw`])
/// without the hold itself, which another task may own.
#[derive(Debug, Clone)]
pub struct ThawSender(tokio::sync::mpsc::Sender<pb::FreezeRequest>);

impl ThawSender {
    pub async fn request_thaw(&self, completed: bool) -> Result<(), tonic::Status> {
        send_request(&self.0, Msg::Thaw(pb::ThawNow { completed })).await
    }
}

/// Sends `msg` over a hold's stream.
async fn send_request(
    requests: &tokio::sync::mpsc::Sender<pb::FreezeRequest>,
    msg: Msg,
) -> Result<(), tonic::Status> {
    requests
        .send(pb::FreezeRequest { msg: Some(msg) })
        .await
        .map_err(|_| tonic::Status::unavailable("the freeze stream has ended"))
}

/// A freeze held over an open `Freeze` stream. Dropping it ends the stream,
/// which makes the agent thaw at once.
#[derive(Debug)]
pub struct HeldFreeze {
    /// Keeps the channel (and so the stream's connection) alive for as long
    /// as the hold: a dropped last channel handle closes the connection.
    _channel: AgentClient<Channel>,
    requests: tokio::sync::mpsc::Sender<pb::FreezeRequest>,
    events: tonic::Streaming<pb::FreezeEvent>,
    /// The agent's answer to the freeze.
    pub frozen: pb::Frozen,
}

impl HeldFreeze {
    /// Opens a `Freeze` stream for `backup_id` with a lease of `ttl`, and
    /// waits for the agent's `frozen` answer (or its refusal).
    pub async fn start(
        client: &mut AgentClient<Channel>,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<Self, tonic::Status> {
        Self::start_aligned(client, backup_id, ttl, None).await
    }

    /// Freezes so that every write waits (a manual quiesce): an engine
    /// whose backup freeze lets writes flow fences, or refuses.
    pub async fn quiesce(
        client: &mut AgentClient<Channel>,
        id: &str,
        ttl: Duration,
    ) -> Result<Self, tonic::Status> {
        OpenFreeze::open(client)
            .start_with(pb::FreezeStart {
                backup_id: id.to_string(),
                ttl_ms: ttl.as_millis() as u64,
                block_writes: true,
                ..Default::default()
            })
            .await
    }

    /// Freezes a replica once it has reached `align` (its primary's frozen
    /// position, with a bound on the wait), in one round trip.
    pub async fn start_aligned(
        client: &mut AgentClient<Channel>,
        backup_id: &str,
        ttl: Duration,
        align: Option<(pb::Position, Duration)>,
    ) -> Result<Self, tonic::Status> {
        OpenFreeze::open(client)
            .start(backup_id, ttl, align, None)
            .await
    }
    /// Sends a lease renewal.
    pub async fn renew(&self) -> Result<(), tonic::Status> {
        self.send(Msg::Renew(pb::Renew {})).await
    }

    /// Asks for a thaw over the stream; the `thawed` event follows.
    /// `completed`: the cut this hold protected is complete (the agent keeps
    /// what its restore needs); otherwise everything is released at once.
    pub async fn request_thaw(&self, completed: bool) -> Result<(), tonic::Status> {
        self.send(Msg::Thaw(pb::ThawNow { completed })).await
    }

    /// What sends this hold's thaw, kept by whoever does not own the hold.
    pub fn thaw_sender(&self) -> ThawSender {
        ThawSender(self.requests.clone())
    }

    /// Asks for the flush (`sync_volumes`: with `syncfs` of the member's
    /// volumes); the `flushed` event follows.
    pub async fn request_flush(&self, sync_volumes: bool) -> Result<(), tonic::Status> {
        self.send(Msg::Flush(pb::Flush { sync_volumes })).await
    }

    async fn send(&self, msg: Msg) -> Result<(), tonic::Status> {
        send_request(&self.requests, msg).await
    }

    /// The next event from the agent (`None` when the stream ended).
    pub async fn next_event(&mut self) -> Result<Option<pb::FreezeEvent>, tonic::Status> {
        self.events.message().await
    }

    /// Asks for the flush (see [`HeldFreeze::request_flush`]) and waits for its `flushed` answer, skipping
    /// other events (an error if the hold failed first).
    pub async fn flush(&mut self, sync_volumes: bool) -> Result<pb::Flushed, tonic::Status> {
        self.request_flush(sync_volumes).await?;
        while let Some(event) = self.next_event().await? {
            match event.event {
                Some(pb::freeze_event::Event::Flushed(f)) => return Ok(f),
                Some(pb::freeze_event::Event::Failed(f)) => {
                    return Err(tonic::Status::aborted(f.reason));
                }
                _ => {}
            }
        }
        Err(tonic::Status::unavailable("the freeze stream ended"))
    }

    /// Waits for the `thawed` event, skipping others; `None` if the stream
    /// ended without one.
    pub async fn thawed(&mut self) -> Result<Option<pb::ThawResult>, tonic::Status> {
        while let Some(event) = self.next_event().await? {
            if let Some(pb::freeze_event::Event::Thawed(t)) = event.event {
                return Ok(t.result);
            }
        }
        Ok(None)
    }
}

/// A short name for a thaw cause.
pub fn thaw_cause(cause: i32) -> &'static str {
    match pb::ThawCause::try_from(cause).unwrap_or_default() {
        pb::ThawCause::Requested => "requested",
        pb::ThawCause::StreamClosed => "stream closed",
        pb::ThawCause::LeaseExpired => "lease expired",
        pb::ThawCause::HoldLost => "hold lost",
        pb::ThawCause::Shutdown => "agent shutdown",
        pb::ThawCause::Unspecified => "unspecified",
    }
}
