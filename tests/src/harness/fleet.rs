//! Agents under test with a controller connection: one PKI, one controller
//! identity, one state dir per agent.

use std::time::Duration;

use anyhow::Result;
use stillpoint_controller::core::agents::{ControllerTls, HeldFreeze};
use stillpoint_proto::pb::{self, agent_client::AgentClient};
use tonic::transport::Channel;

use super::agent::{AgentProc, AgentSpec};
use super::pki::{CONTROLLER_IDENTITY, Pki, agent_identity};

/// A PKI and the controller's TLS, to start and reach agents with.
#[derive(Debug)]
pub struct Fleet {
    pki: Pki,
    tls: ControllerTls,
    state: tempfile::TempDir,
}

/// A running agent and a client for it.
#[derive(Debug)]
pub struct Agent {
    pub proc: AgentProc,
    pub client: AgentClient<Channel>,
    pub identity: String,
    pub state_dir: std::path::PathBuf,
}

impl Fleet {
    /// Must be called inside a tokio runtime.
    pub fn new() -> Result<Self> {
        let pki = Pki::new()?;
        let tls = ControllerTls::watch(
            pki.issue("controller", CONTROLLER_IDENTITY)?,
            Duration::from_secs(60),
        )?;
        let state = tempfile::Builder::new()
            .prefix("stillpoint-state-")
            .tempdir()?;
        Ok(Fleet { pki, tls, state })
    }

    /// A spec for `member` on `engine`, with its own identity and state dir.
    pub fn spec(&self, member: &str, engine: &str) -> Result<AgentSpec> {
        let files = self.pki.issue(member, &agent_identity(member))?;
        let state = self.state_dir(member);
        std::fs::create_dir_all(&state)?;
        let mut spec = super::agent::noop(member, files);
        spec.engine = engine.to_string();
        Ok(spec
            .with("STILLPOINT_STATE_DIR", state.to_str().unwrap())
            .with("STILLPOINT_MAX_TTL", "2m"))
    }

    /// The state directory the agent for `member` is given.
    pub fn state_dir(&self, member: &str) -> std::path::PathBuf {
        self.state.path().join(member)
    }

    /// Starts the agent and connects to it.
    pub async fn start(&self, spec: &AgentSpec) -> Result<Agent> {
        let proc = AgentProc::spawn(spec)?;
        let identity = agent_identity(&spec.member);
        let client = self.tls.connect(&proc.grpc_addr(), &identity).await?;
        let state_dir = self.state_dir(&spec.member);
        Ok(Agent {
            proc,
            client,
            identity,
            state_dir,
        })
    }

    /// Another connection to an agent.
    pub async fn connect(&self, agent: &Agent) -> Result<AgentClient<Channel>> {
        Ok(self
            .tls
            .connect(&agent.proc.grpc_addr(), &agent.identity)
            .await?)
    }
}

impl Agent {
    pub async fn describe(&mut self) -> Result<pb::DescribeResponse, tonic::Status> {
        Ok(self
            .client
            .describe(pb::DescribeRequest::default())
            .await?
            .into_inner())
    }

    pub async fn position(&mut self) -> Result<pb::Position, tonic::Status> {
        Ok(self
            .client
            .position(pb::PositionRequest {})
            .await?
            .into_inner()
            .position
            .unwrap_or_default())
    }

    /// Prepares for a non-atomic cut (a copy).
    pub async fn prepare(&mut self, backup_id: &str) -> Result<pb::PrepareResponse, tonic::Status> {
        self.prepare_for(backup_id, false).await
    }

    pub async fn prepare_for(
        &mut self,
        backup_id: &str,
        atomic_cut: bool,
    ) -> Result<pb::PrepareResponse, tonic::Status> {
        Ok(self
            .client
            .prepare(pb::PrepareRequest {
                backup_id: backup_id.into(),
                atomic_cut,
            })
            .await?
            .into_inner())
    }

    pub async fn freeze(
        &mut self,
        backup_id: &str,
        ttl: Duration,
    ) -> Result<HeldFreeze, tonic::Status> {
        HeldFreeze::start(&mut self.client, backup_id, ttl).await
    }

    /// Freezes once this member has reached `target` (one round trip).
    pub async fn freeze_aligned(
        &mut self,
        backup_id: &str,
        ttl: Duration,
        target: &pb::Position,
        bound: Duration,
    ) -> Result<HeldFreeze, tonic::Status> {
        HeldFreeze::start_aligned(
            &mut self.client,
            backup_id,
            ttl,
            Some((target.clone(), bound)),
        )
        .await
    }

    pub async fn thaw(&mut self, backup_id: &str) -> Result<pb::ThawResponse, tonic::Status> {
        Ok(self
            .client
            .thaw(pb::ThawRequest {
                backup_id: backup_id.into(),
            })
            .await?
            .into_inner())
    }

    pub async fn wait_for(
        &mut self,
        target: &pb::Position,
        bound: Duration,
    ) -> Result<pb::WaitForPositionResponse, tonic::Status> {
        Ok(self
            .client
            .wait_for_position(pb::WaitForPositionRequest {
                target: Some(target.clone()),
                timeout_ms: bound.as_millis() as u64,
            })
            .await?
            .into_inner())
    }

    /// Waits for the next `failed` event on a held freeze, at most `bound`.
    pub async fn failure(hold: &mut HeldFreeze, bound: Duration) -> Option<pb::HoldFailed> {
        let wait = async {
            while let Ok(Some(event)) = hold.next_event().await {
                if let Some(pb::freeze_event::Event::Failed(f)) = event.event {
                    return Some(f);
                }
            }
            None
        };
        tokio::time::timeout(bound, wait).await.ok().flatten()
    }
}

/// Runs `future` and says whether it finished within `bound`.
pub async fn finishes_within<F: std::future::Future>(
    bound: Duration,
    future: F,
) -> Option<F::Output> {
    tokio::time::timeout(bound, future).await.ok()
}

/// Asserts that a replica's wait ended at its bound (`waited` ≥ `bound`)
/// with a clear "did not reach" deadline error.
pub fn assert_wait_hit_its_bound(
    err: &tonic::Status,
    waited: std::time::Duration,
    bound: std::time::Duration,
) {
    assert!(
        waited >= bound,
        "the wait ended before its bound: {waited:?}"
    );
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("did not reach"), "{}", err.message());
}
