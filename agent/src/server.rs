//! The gRPC service: maps requests onto the hold and the engine, and engine
//! errors onto `tonic::Status`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use stillpoint_proto::pb::{self, agent_server::Agent, freeze_request::Msg};
use stillpoint_proto::position::PositionExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Cause, Engine, EngineError};
use crate::hold::{HoldError, Holds};
use crate::tls::PeerInfo;

/// The agent's gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    pub engine: Arc<dyn Engine>,
    pub holds: Arc<Holds>,
    pub member: String,
    pub max_ttl: Duration,
    pub max_wait: Duration,
    pub prepare_timeout: Duration,
}

/// Maps an engine error to the status the controller sees.
pub fn engine_status(err: &EngineError) -> Status {
    let message = err.to_string();
    match err.cause {
        Cause::Unavailable => Status::unavailable(message),
        Cause::Timeout => Status::deadline_exceeded(message),
        Cause::Refused => Status::failed_precondition(message),
        Cause::Lost => Status::aborted(message),
        Cause::Invalid => Status::invalid_argument(message),
    }
}

fn hold_status(err: &HoldError) -> Status {
    match err {
        HoldError::Busy { .. } => Status::failed_precondition(err.to_string()),
        HoldError::InProgress { .. } => Status::unavailable(err.to_string()),
        HoldError::Invalid { .. } => Status::invalid_argument(err.to_string()),
        HoldError::NotHolder { .. } => Status::failed_precondition(err.to_string()),
        HoldError::Engine(e) => engine_status(e),
    }
}

fn peer<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown peer".into())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::FreezeEvent, Status>> + Send>>;

impl AgentService {
    /// Waits until this member reaches `target`, bounded by `timeout_ms`
    /// (0: the longest wait served); returns the position and the wait.
    async fn wait(
        &self,
        target: &pb::Position,
        timeout_ms: u64,
    ) -> Result<(pb::Position, u64), Status> {
        let bound = match timeout_ms {
            0 => self.max_wait,
            ms => Duration::from_millis(ms).min(self.max_wait),
        };
        let started = Instant::now();
        let reached = tokio::time::timeout(
            bound + Duration::from_secs(1),
            self.engine.wait_for_position(target, bound),
        )
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "member {}: did not reach {} within {} ms",
                self.member,
                target.display(),
                bound.as_millis()
            ))
        })?
        .map_err(|e| engine_status(&e))?;
        Ok((reached, started.elapsed().as_micros() as u64))
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        let volume_roots = request
            .into_inner()
            .volumes
            .into_iter()
            .map(|volume| pb::VolumeRoots {
                roots: crate::mounts::roots(std::path::Path::new(&volume))
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                volume,
            })
            .collect();
        let d = self
            .engine
            .describe()
            .await
            .map_err(|e| engine_status(&e))?;
        self.holds.volumes.learn(&d.paths);
        for warning in &d.warnings {
            tracing::warn!("{warning}");
        }
        Ok(Response::new(pb::DescribeResponse {
            engine: d.engine.unwrap_or_else(|| self.engine.kind().to_pb()) as i32,
            member: self.member.clone(),
            server_version: d.server_version,
            role: d.role as i32,
            upstream: d.upstream,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: Some(d.capabilities),
            max_ttl_ms: self.max_ttl.as_millis() as u64,
            holder: self.holds.holder().unwrap_or_default(),
            paths: d.paths,
            warnings: d.warnings,
            volumes: self
                .holds
                .volumes
                .list()
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            volume_roots,
        }))
    }

    async fn position(
        &self,
        _request: Request<pb::PositionRequest>,
    ) -> Result<Response<pb::PositionResponse>, Status> {
        let (position, role) = self
            .engine
            .position()
            .await
            .map_err(|e| engine_status(&e))?;
        Ok(Response::new(pb::PositionResponse {
            position: Some(position),
            role: role as i32,
        }))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let pb::PrepareRequest {
            backup_id,
            atomic_cut,
        } = request.into_inner();
        let started = Instant::now();
        let detail = tokio::time::timeout(
            self.prepare_timeout,
            self.engine.prepare(&backup_id, atomic_cut),
        )
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "member {}: prepare did not finish within {} ms (STILLPOINT_PREPARE_TIMEOUT)",
                self.member,
                self.prepare_timeout.as_millis()
            ))
        })?
        .map_err(|e| engine_status(&e))?;
        Ok(Response::new(pb::PrepareResponse {
            duration_us: started.elapsed().as_micros() as u64,
            detail,
        }))
    }

    type FreezeStream = EventStream;

    async fn freeze(
        &self,
        request: Request<Streaming<pb::FreezeRequest>>,
    ) -> Result<Response<Self::FreezeStream>, Status> {
        let who = peer(&request);
        let mut inbound = request.into_inner();
        let start = match inbound.message().await? {
            Some(pb::FreezeRequest {
                msg: Some(Msg::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a Freeze stream must be `start`",
                ));
            }
        };
        // A replica's alignment first, in the same round trip; no hold is
        // taken unless it succeeds.
        let aligned_us = match &start.align_to {
            Some(target) => self.wait(target, start.align_timeout_ms).await?.1,
            None => 0,
        };
        let (events, rx) = mpsc::channel(64);
        let holds = self.holds.clone();
        let backup_id = start.backup_id.clone();
        let ttl = Duration::from_millis(start.ttl_ms);
        tracing::info!(backup_id = %backup_id, ttl_ms = start.ttl_ms, peer = %who, "freeze requested");
        // The hold is taken in its own task so that a caller vanishing
        // mid-freeze cannot leave the slot half-taken; the stream reader
        // then sees the end of the stream and thaws.
        let (granted, grant) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let attached = match holds
                .freeze(&backup_id, ttl, aligned_us, start.block_writes, events)
                .await
            {
                Ok(attached) => {
                    // The flush asked for with the freeze: `flushed`
                    // follows `frozen`, which is already on the stream.
                    if let Some(flush) = &start.flush {
                        holds.flush(&backup_id, attached.generation, flush.sync_volumes);
                    }
                    let _ = granted.send(Ok(()));
                    attached
                }
                Err(err) => {
                    tracing::warn!(backup_id = %backup_id, error = %err, "freeze refused");
                    let _ = granted.send(Err(hold_status(&err)));
                    return;
                }
            };
            let mut ended = attached.ended.clone();
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    // The hold is over: stop reading, so the stream closes
                    // even if the caller keeps its side open.
                    _ = ended.changed() => return,
                };
                match message {
                    Ok(Some(pb::FreezeRequest {
                        msg: Some(Msg::Renew(_)),
                    })) => {
                        if let Err(err) = holds.renew(&backup_id, attached.generation).await {
                            tracing::debug!(backup_id = %backup_id, error = %err, "renewal refused");
                            return;
                        }
                    }
                    Ok(Some(pb::FreezeRequest {
                        msg: Some(Msg::Flush(flush)),
                    })) => holds.flush(&backup_id, attached.generation, flush.sync_volumes),
                    Ok(Some(pb::FreezeRequest {
                        msg: Some(Msg::Thaw(thaw)),
                    })) => {
                        // Only this stream's own hold: one that was taken
                        // over thaws nothing.
                        holds
                            .thaw_from_stream(&backup_id, attached.generation, thaw.completed)
                            .await;
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        holds.detach(&backup_id, attached.generation);
                        return;
                    }
                }
            }
        });
        grant
            .await
            .map_err(|_| Status::internal("freeze task ended without an answer"))??;
        let stream = ReceiverStream::new(rx);
        let stream = futures_util::StreamExt::map(stream, Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn thaw(
        &self,
        request: Request<pb::ThawRequest>,
    ) -> Result<Response<pb::ThawResponse>, Status> {
        let who = peer(&request);
        let backup_id = request.into_inner().backup_id;
        let mut outcome = self.holds.thaw(&backup_id, pb::ThawCause::Requested).await;
        // Nothing is kept for a restore after a Thaw call: a backup session
        // kept for its WAL (PostgreSQL, a cut that copies) ends too.
        if crate::engine::postgres::release(&backup_id) {
            outcome.known = true;
            outcome.message = format!(
                "{}; the backup session kept for its WAL ended (its slot dropped)",
                outcome.message
            );
        }
        tracing::info!(backup_id = %backup_id, peer = %who, known = outcome.known, "{}", outcome.message);
        Ok(Response::new(pb::ThawResponse {
            known: outcome.known,
            already_thawed: outcome.already_thawed,
            result: outcome.result,
            message: outcome.message,
        }))
    }

    async fn wait_for_position(
        &self,
        request: Request<pb::WaitForPositionRequest>,
    ) -> Result<Response<pb::WaitForPositionResponse>, Status> {
        let request = request.into_inner();
        let target = request
            .target
            .ok_or_else(|| Status::invalid_argument("WaitForPosition needs a target position"))?;
        let (reached, waited_us) = self.wait(&target, request.timeout_ms).await?;
        Ok(Response::new(pb::WaitForPositionResponse {
            reached: Some(reached),
            waited_us,
        }))
    }
}
