//! The agents: each dialled with the identity its pod must present, and
//! asked to describe its server (engine, role, upstream, the paths it
//! needs). Nothing is frozen.

use std::time::Duration;

use futures_util::future::join_all;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;

use super::spec::Budgets;
use super::{Resolver, Verdict};
use crate::core::agents::answer;
use crate::core::error::ErrorKind;
use crate::core::model::{Engine, Role};
use crate::core::record::ServerPath;
use crate::kube::crd::ResolvedMember;
use crate::kube::reason::Reason;

/// What an agent said.
pub(crate) struct Described {
    pub(crate) engine: Engine,
    pub(crate) role: Role,
    pub(crate) upstream: String,
    pub(crate) position: Option<String>,
    pub(crate) paths: Vec<ServerPath>,
}

/// The host of a `host:port` (or `[v6]:port`) address.
pub(super) fn host_of(addr: &str) -> &str {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    }
}

impl Resolver {
    /// Describes the agent at `addr`: dialled within `connect`, each
    /// request answered within `rpc`.
    pub(crate) async fn describe(
        &self,
        addr: &str,
        identity: &str,
        connect: Duration,
        rpc: Duration,
    ) -> Result<Described, Verdict> {
        let mut tls = self.tls.clone();
        tls.connect_timeout = connect;
        let mut client = tls.connect(addr, identity).await.map_err(|e| {
            let text = e.to_string();
            match text.contains(" presented ") {
                true => Verdict::no(Reason::Run(ErrorKind::WrongIdentity), text),
                false => Verdict::no(Reason::Run(ErrorKind::AgentUnreachable), text),
            }
        })?;
        let describe = client.describe(pb::DescribeRequest::default());
        let d = answer(rpc, "describe", describe).await.map_err(|e| {
            let reason = match e.code() {
                tonic::Code::DeadlineExceeded => ErrorKind::AgentUnreachable,
                _ => ErrorKind::ServerUnavailable,
            };
            Verdict::no(
                Reason::Run(reason),
                format!("agent {addr}: {} (rpcTimeout)", e.message()),
            )
        })?;
        // A position is only shown: none if it does not come in time.
        let position = answer(rpc, "position", client.position(pb::PositionRequest {}))
            .await
            .ok()
            .and_then(|r| r.position)
            .map(|p| p.display());
        Ok(Described {
            engine: Engine::from_pb(d.engine),
            role: Role::from_pb(d.role),
            upstream: d.upstream,
            position,
            paths: d
                .paths
                .into_iter()
                .map(|p| ServerPath {
                    what: p.what,
                    path: p.path.into(),
                })
                .collect(),
        })
    }

    /// Every member's agent describes its server, each member's engine,
    /// role and position recorded; the first that cannot, named.
    pub(super) async fn describe_all(
        &self,
        members: &mut [ResolvedMember],
        budgets: &Budgets,
    ) -> Result<Vec<Described>, Verdict> {
        let described = join_all(members.iter().map(|m| {
            let (addr, identity) = (
                m.agent.clone().unwrap_or_default(),
                m.identity.clone().unwrap_or_default(),
            );
            async move {
                self.describe(
                    &addr,
                    &identity,
                    budgets.connect_timeout,
                    budgets.rpc_timeout,
                )
                .await
            }
        }))
        .await;
        let mut refused: Option<Verdict> = None;
        let mut infos = Vec::new();
        for (m, d) in members.iter_mut().zip(described) {
            match d {
                Ok(d) => {
                    m.engine = Some(d.engine.to_string());
                    m.role = Some(d.role.to_string());
                    m.position = d.position.clone();
                    infos.push(d);
                }
                Err(v) => {
                    refused.get_or_insert(Verdict::no(
                        v.reason,
                        format!("member {} (pod {}): {}", m.name, m.pod, v.message),
                    ));
                }
            }
        }
        match refused {
            Some(v) => Err(v),
            None => Ok(infos),
        }
    }
}
