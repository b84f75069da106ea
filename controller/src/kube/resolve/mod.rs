//! From a ConsistencyGroup to the group the protocol runs: its pods, their
//! agents (pod IP and the container port named `stillpoint`) and the
//! identity each must present (the SPIFFE ID of the pod's ServiceAccount),
//! their PVCs and the CSI driver of each, the snapshot class — and, when
//! something is missing, the reason the group cannot be protected.
//!
//! Nothing is frozen here: the agents are asked only to describe their
//! server (engine, role, upstream, the paths it needs).
//!
//! Resolving is a sequence of steps, each its own module: the spec checked
//! alone ([`spec`]); members to pods, agents and volumes ([`members`],
//! [`pods`]); the PVCs bound to CSI volumes ([`volumes`]); the snapshot
//! class ([`class`]); the agents' descriptions ([`agents`]); roles,
//! primaries and coverage ([`roles`]). The first two parts decide
//! `Resolved`, the rest `Protectable`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::core::agents::ControllerTls;
use crate::core::model::GroupSpec;
use crate::kube::crd::{ConsistencyGroup, ResolvedMember, SnapshotDriver};
use crate::kube::reason::Reason;

mod agents;
mod class;
mod members;
mod pods;
mod roles;
mod spec;
pub(crate) use spec::freeze_budget;
#[cfg(test)]
mod tests;
mod volumes;

pub use pods::{agent_port, group_selects, pod_identity, workload_of};

/// Checks a ConsistencyGroup's spec alone (its durations and members) as
/// resolving it does first: why it is refused, if it is.
pub fn check_spec(spec: &crate::kube::crd::ConsistencyGroupSpec) -> Result<(), String> {
    spec::check(spec).map(|_| ()).map_err(|v| v.message)
}

/// The name of the agent's container port.
pub const AGENT_PORT_NAME: &str = "stillpoint";
/// Defaults of a group's budgets.
pub const DEFAULT_FREEZE_BUDGET: Duration = Duration::from_secs(5);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_ALIGN_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most pods a group resolves to (its members' selectors together): a
/// group's every status lists each of them, and must stay under the API
/// server's object size limit.
pub const MAX_GROUP_PODS: usize = 256;
/// The most PVCs a group's pods snapshot together.
pub const MAX_GROUP_PVCS: usize = 1024;

/// A condition's verdict: its status, reason (CamelCase) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: Reason,
    pub message: String,
}

impl Verdict {
    fn yes(reason: Reason, message: impl Into<String>) -> Self {
        Verdict {
            ok: true,
            reason,
            message: message.into(),
        }
    }

    fn no(reason: Reason, message: impl Into<String>) -> Self {
        Verdict {
            ok: false,
            reason,
            message: message.into(),
        }
    }
}

/// What resolving a group found.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// Every member found (pods, agents, PVCs).
    pub resolved: Verdict,
    /// A backup can run now.
    pub protectable: Verdict,
    pub members: Vec<ResolvedMember>,
    /// The group as the protocol runs it (when protectable).
    pub spec: Option<GroupSpec>,
    /// Whether the group's snapshots are point-in-time: its spec, else its
    /// class's `stillpoint.dev/atomic` annotation (known when protectable).
    pub atomic: bool,
}

/// Resolves groups; dials agents with the controller's identity.
#[derive(Clone)]
pub struct Resolver {
    pub client: kube::Client,
    pub tls: ControllerTls,
    /// The trust domain of the agents' SPIFFE IDs.
    pub trust_domain: String,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Why resolving stopped short of a group the protocol runs.
enum Short {
    /// Not every member was found (with those that were, if any).
    Unresolved(Verdict, Vec<ResolvedMember>),
    /// Found (`resolved`), but no backup can run now (`why`).
    Unprotectable {
        resolved: Verdict,
        why: Verdict,
        members: Vec<ResolvedMember>,
        atomic: bool,
    },
}

impl Short {
    fn bare(v: Verdict) -> Self {
        Short::Unresolved(v, Vec::new())
    }
}

impl From<Short> for Resolution {
    fn from(short: Short) -> Self {
        let (resolved, protectable, members, atomic) = match short {
            Short::Unresolved(v, members) => {
                (v.clone(), Verdict::no(v.reason, v.message), members, false)
            }
            Short::Unprotectable {
                resolved,
                why,
                members,
                atomic,
            } => (resolved, why, members, atomic),
        };
        Resolution {
            resolved,
            protectable,
            members,
            spec: None,
            atomic,
        }
    }
}

impl Resolver {
    /// Resolves `group` now.
    pub async fn resolve(&self, group: &ConsistencyGroup) -> Resolution {
        self.steps(group).await.unwrap_or_else(Resolution::from)
    }

    /// The steps, in order: the members found decide `Resolved`, the rest
    /// `Protectable`.
    async fn steps(&self, group: &ConsistencyGroup) -> Result<Resolution, Short> {
        let ns = group.metadata.namespace.clone().unwrap_or_default();
        let spec = &group.spec;
        let budgets = spec::check(spec).map_err(Short::bare)?;
        let pods = self.pods(&ns).await.map_err(Short::bare)?;
        let instances = members::instances(spec, &pods, &ns).map_err(Short::bare)?;
        let mut found = self.find(&ns, &instances).await?;
        let resolved = Verdict::yes(
            Reason::AllMembersFound,
            format!(
                "{} member instances in {} members",
                found.members.len(),
                spec.members.len()
            ),
        );
        self.protect(group, &instances, &mut found, budgets, resolved)
            .await
    }

    /// The namespace's pods.
    async fn pods(&self, ns: &str) -> Result<Vec<Pod>, Verdict> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match pods.list(&ListParams::default()).await {
            Ok(l) => Ok(l.items),
            Err(e) => Err(Verdict::no(Reason::APIError, format!("listing pods: {e}"))),
        }
    }

    /// Every instance found: its agent, identity and volumes; its PVCs
    /// bound to CSI volumes; its pod running.
    async fn find(
        &self,
        ns: &str,
        instances: &[members::Instance<'_>],
    ) -> Result<members::Found, Short> {
        let mut found = members::found(instances, &self.trust_domain)
            .map_err(|(v, members)| Short::Unresolved(v, members))?;
        members::volume_limit(&found.members).map_err(Short::bare)?;
        let drivers = self.bind(ns, &mut found.members).await;
        let drivers = match drivers {
            Ok(d) => d,
            Err(v) => return Err(Short::Unresolved(v, found.members)),
        };
        found.drivers = drivers;
        match found.not_running.take() {
            Some(v) => Err(Short::Unresolved(v, found.members)),
            None => Ok(found),
        }
    }

    /// The group can be backed up now: its class, its agents, its roles.
    async fn protect(
        &self,
        group: &ConsistencyGroup,
        instances: &[members::Instance<'_>],
        found: &mut members::Found,
        budgets: spec::Budgets,
        resolved: Verdict,
    ) -> Result<Resolution, Short> {
        let short = |why: Verdict, found: &mut members::Found, atomic: bool| Short::Unprotectable {
            resolved: resolved.clone(),
            why,
            members: std::mem::take(&mut found.members),
            atomic,
        };
        let atomic = match self.check_class(group, &found.drivers).await {
            Ok(a) => a,
            Err(v) => return Err(short(v, found, false)),
        };
        let infos = match self.describe_all(&mut found.members, &budgets).await {
            Ok(i) => i,
            Err(v) => return Err(short(v, found, atomic)),
        };
        let specs = match roles::member_specs(instances, &infos, found, atomic) {
            Ok(s) => s,
            Err(v) => return Err(short(v, found, atomic)),
        };
        let members = std::mem::take(&mut found.members);
        Ok(ready(
            group,
            resolved.clone(),
            members,
            specs,
            atomic,
            budgets,
        ))
    }
}

/// The resolution of a group that can be backed up now.
fn ready(
    group: &ConsistencyGroup,
    resolved: Verdict,
    members: Vec<ResolvedMember>,
    specs: Vec<crate::core::model::MemberSpec>,
    atomic: bool,
    b: spec::Budgets,
) -> Resolution {
    let message = format!(
        "{} members can be backed up by {}; {}",
        members.len(),
        match group.spec.snapshot.driver {
            SnapshotDriver::Csi => "csi (a VolumeSnapshot per PVC)",
            SnapshotDriver::CsiGroup =>
                "csi-group (a VolumeGroupSnapshot per cut, replicas before their primaries)",
        },
        match atomic {
            true => "its snapshots are point-in-time",
            false => "its snapshots are copies (PostgreSQL is cut in backup mode)",
        }
    );
    Resolution {
        resolved,
        protectable: Verdict::yes(Reason::Ready, message),
        atomic,
        members,
        spec: Some(GroupSpec {
            name: group.metadata.name.clone().unwrap_or_default(),
            namespace: Some(group.metadata.namespace.clone().unwrap_or_default()),
            members: specs,
            freeze_budget: b.freeze_budget,
            lease_ttl: b.lease_ttl,
            align_timeout: b.align_timeout,
            connect_timeout: b.connect_timeout,
            rpc_timeout: b.rpc_timeout,
        }),
    }
}
