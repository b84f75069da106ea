//! From a ConsistencyGroup to the group the protocol runs: its pods, their
//! agents (pod IP and the container port named `stillpoint`) and the
//! identity each must present (the SPIFFE ID of the pod's ServiceAccount),
//! their PVCs and the CSI driver of each, the snapshot class — and, when
//! something is missing, the reason the group cannot be protected.
//!
//! Nothing is frozen here: the agents are asked only to describe their
//! server (engine, role, upstream, the paths it needs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::join_all;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use stillpoint_proto::PositionExt;
use stillpoint_proto::pb;

use crate::core::agents::{
    ControllerTls, DEFAULT_RPC_TIMEOUT, MAX_CONNECT_TIMEOUT, MAX_RPC_TIMEOUT, answer, within,
};
use crate::core::model::{AgentEndpoint, Engine, GroupSpec, MemberSpec, Role, VolumeId};
use crate::core::protocol::{copy_refusal, coverage};
use crate::core::record::ServerPath;
use crate::kube::crd::{
    ATOMIC_ANNOTATION, ConsistencyGroup, MemberRole, MemberTemplate, ResolvedMember,
    SnapshotDriver, WorkloadRef,
};

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
    pub reason: String,
    pub message: String,
}

impl Verdict {
    fn yes(reason: &str, message: impl Into<String>) -> Self {
        Verdict {
            ok: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    fn no(reason: &str, message: impl Into<String>) -> Self {
        Verdict {
            ok: false,
            reason: reason.into(),
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

/// The identity the agent of a pod must present.
pub fn pod_identity(trust_domain: &str, pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
}

/// The agent's container port on a pod, if it has one.
pub fn agent_port(pod: &Pod) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(AGENT_PORT_NAME))
        .map(|p| p.container_port)
}

/// The StatefulSet or Deployment that runs a pod, from its controller
/// owner reference (a Deployment's ReplicaSet is `<deployment>-<hash>`,
/// the hash being the pod's `pod-template-hash` label).
pub fn workload_of(pod: &Pod) -> Option<WorkloadRef> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    match owner.kind.as_str() {
        "StatefulSet" => Some(WorkloadRef {
            kind: "StatefulSet".into(),
            name: owner.name.clone(),
        }),
        "ReplicaSet" => {
            let hash = kube::ResourceExt::labels(pod).get("pod-template-hash")?;
            let name = owner.name.strip_suffix(&format!("-{hash}"))?;
            Some(WorkloadRef {
                kind: "Deployment".into(),
                name: name.to_string(),
            })
        }
        _ => None,
    }
}

/// Whether a pod's labels match a selector's.
fn matches(pod: &Pod, labels: &BTreeMap<String, String>) -> bool {
    let have = pod.metadata.labels.clone().unwrap_or_default();
    !labels.is_empty() && labels.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The pods of a member, by name.
fn pods_of<'p>(template: &MemberTemplate, pods: &'p [Pod]) -> Vec<&'p Pod> {
    let mut found: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            template
                .selector
                .as_ref()
                .is_some_and(|s| matches(p, &s.match_labels))
                || template.stateful_set.as_ref().is_some_and(|s| {
                    p.metadata.name.as_deref() == Some(&format!("{}-{}", s.name, s.ordinal))
                })
        })
        .collect();
    found.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    found
}

fn describe_selector(t: &MemberTemplate) -> String {
    if let Some(s) = &t.stateful_set {
        return format!("pod {}-{} of StatefulSet {}", s.name, s.ordinal, s.name);
    }
    let labels: Vec<String> = t
        .selector
        .iter()
        .flat_map(|s| s.match_labels.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    format!("selector {}", labels.join(","))
}

/// One pod's volumes to snapshot: (volume name, claim, mount path in the
/// server's container).
fn pod_volumes(
    pod: &Pod,
    wanted: Option<&[String]>,
) -> Result<Vec<(String, String, Option<PathBuf>)>, Verdict> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes = spec.volumes.unwrap_or_default();
    let names: Vec<String> = match wanted {
        Some(w) => w.to_vec(),
        None => volumes
            .iter()
            .filter(|v| v.persistent_volume_claim.is_some())
            .map(|v| v.name.clone())
            .collect(),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(v) = volumes.iter().find(|v| v.name == name) else {
            return Err(Verdict::no(
                "VolumeNotFound",
                format!("pod {pod_name} has no volume {name}"),
            ));
        };
        let Some(pvc) = &v.persistent_volume_claim else {
            return Err(Verdict::no(
                "VolumeNotPVC",
                format!(
                    "volume {name} of pod {pod_name} is not a PersistentVolumeClaim, so no CSI snapshot can be taken of it"
                ),
            ));
        };
        // Where the server (not the agent) has it mounted.
        let mount = spec
            .containers
            .iter()
            .filter(|c| {
                !c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some(AGENT_PORT_NAME))
            })
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .find(|m| m.name == name)
            .map(|m| PathBuf::from(&m.mount_path));
        out.push((name, pvc.claim_name.clone(), mount));
    }
    Ok(out)
}

/// What an agent said.
pub(crate) struct Described {
    pub(crate) engine: Engine,
    pub(crate) role: Role,
    pub(crate) upstream: String,
    pub(crate) position: Option<String>,
    pub(crate) paths: Vec<ServerPath>,
}

/// The host of a `host:port` (or `[v6]:port`) address.
fn host_of(addr: &str) -> &str {
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
                true => Verdict::no("WrongIdentity", text),
                false => Verdict::no("AgentUnreachable", text),
            }
        })?;
        let describe = client.describe(pb::DescribeRequest::default());
        let d = answer(rpc, "describe", describe).await.map_err(|e| {
            let reason = match e.code() {
                tonic::Code::DeadlineExceeded => "AgentUnreachable",
                _ => "ServerUnavailable",
            };
            Verdict::no(
                reason,
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

    /// Resolves `group` now.
    pub async fn resolve(&self, group: &ConsistencyGroup) -> Resolution {
        let ns = group.metadata.namespace.clone().unwrap_or_default();
        let name = group.metadata.name.clone().unwrap_or_default();
        let spec = &group.spec;
        let fail = |resolved: Verdict, members: Vec<ResolvedMember>| Resolution {
            protectable: Verdict::no(&resolved.reason, resolved.message.clone()),
            resolved,
            members,
            spec: None,
            atomic: false,
        };
        let budget = |text: &Option<String>, default: Duration| match text {
            None => Ok(default),
            Some(t) => stillpoint_proto::duration::parse_duration(t)
                .map_err(|e| Verdict::no("InvalidSpec", e)),
        };
        let bounded = |name: &str, value: Duration, max: Duration| {
            within(name, value, max).map_err(|e| Verdict::no("InvalidSpec", e))
        };
        let budgets = (|| {
            Ok::<_, Verdict>((
                budget(&spec.freeze_budget, DEFAULT_FREEZE_BUDGET)?,
                budget(&spec.lease_ttl, DEFAULT_LEASE_TTL)?,
                budget(&spec.align_timeout, DEFAULT_ALIGN_TIMEOUT)?,
                bounded(
                    "connectTimeout",
                    budget(&spec.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?,
                    MAX_CONNECT_TIMEOUT,
                )?,
                bounded(
                    "rpcTimeout",
                    budget(&spec.rpc_timeout, DEFAULT_RPC_TIMEOUT)?,
                    MAX_RPC_TIMEOUT,
                )?,
            ))
        })();
        let (freeze_budget, lease_ttl, align_timeout, connect_timeout, rpc_timeout) = match budgets
        {
            Ok(b) => b,
            Err(v) => return fail(v, Vec::new()),
        };
        if spec.members.is_empty() {
            return fail(
                Verdict::no("InvalidSpec", "the group has no members"),
                Vec::new(),
            );
        }
        let mut names = BTreeSet::new();
        for t in &spec.members {
            if !names.insert(t.name.as_str()) {
                return fail(
                    Verdict::no("InvalidSpec", format!("two members are named {}", t.name)),
                    Vec::new(),
                );
            }
            if t.selector.is_none() == t.stateful_set.is_none() {
                return fail(
                    Verdict::no(
                        "InvalidSpec",
                        format!("member {}: give either `selector` or `statefulSet`", t.name),
                    ),
                    Vec::new(),
                );
            }
            if let Some(p) = &t.primary
                && !spec.members.iter().any(|m| &m.name == p)
            {
                return fail(
                    Verdict::no(
                        "ReplicaWithoutPrimary",
                        format!(
                            "member {}: its primary {p} is not a member of the group",
                            t.name
                        ),
                    ),
                    Vec::new(),
                );
            }
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let pods = match pods.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                return fail(
                    Verdict::no("APIError", format!("listing pods: {e}")),
                    Vec::new(),
                );
            }
        };
        // Members → pods.
        let mut instances: Vec<(&MemberTemplate, &Pod)> = Vec::new();
        for t in &spec.members {
            let found = pods_of(t, &pods);
            if found.is_empty() {
                return fail(
                    Verdict::no(
                        "MemberNotFound",
                        format!(
                            "member {}: no pod in namespace {ns} matches {}",
                            t.name,
                            describe_selector(t)
                        ),
                    ),
                    Vec::new(),
                );
            }
            instances.extend(found.into_iter().map(|p| (t, p)));
        }
        if instances.len() > MAX_GROUP_PODS {
            return fail(
                Verdict::no(
                    "TooManyPods",
                    format!(
                        "the members' selectors match {} pods; a group resolves to at most \
                         {MAX_GROUP_PODS}: narrow the selectors or split the group",
                        instances.len()
                    ),
                ),
                Vec::new(),
            );
        }
        let mut seen = BTreeSet::new();
        for (t, p) in &instances {
            let pod = p.metadata.name.clone().unwrap_or_default();
            if !seen.insert(pod.clone()) {
                return fail(
                    Verdict::no(
                        "InvalidSpec",
                        format!(
                            "pod {pod} is selected by more than one member (the second: {})",
                            t.name
                        ),
                    ),
                    Vec::new(),
                );
            }
        }
        let mut members: Vec<ResolvedMember> = Vec::new();
        let mut not_running: Option<Verdict> = None;
        let mut mounts: Vec<Vec<(String, String, Option<PathBuf>)>> = Vec::new();
        for (t, p) in &instances {
            let pod = p.metadata.name.clone().unwrap_or_default();
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let mut m = ResolvedMember {
                name: t.name.clone(),
                pod: pod.clone(),
                ip: ip.clone(),
                workload: workload_of(p),
                ..Default::default()
            };
            let Some(port) = agent_port(p) else {
                members.push(m);
                return fail(
                    Verdict::no(
                        "NoAgent",
                        format!(
                            "pod {pod} (member {}) has no Stillpoint agent: no container port named `{AGENT_PORT_NAME}`. \
                             Add the agent sidecar (or label the pod stillpoint.dev/inject=true for injection)",
                            t.name
                        ),
                    ),
                    members,
                );
            };
            // A pod that does not run is reported after its PVCs (an
            // unbound PVC is why it does not run).
            match (ip, running) {
                (Some(ip), true) => m.agent = Some(format!("{ip}:{port}")),
                _ => {
                    not_running.get_or_insert_with(|| {
                        Verdict::no(
                            "PodNotRunning",
                            format!(
                                "pod {pod} (member {}) is not running or has no IP yet",
                                t.name
                            ),
                        )
                    });
                }
            }
            m.identity = Some(pod_identity(&self.trust_domain, p));
            match pod_volumes(p, t.volumes.as_deref()) {
                Ok(v) => {
                    m.pvcs = v.iter().map(|(_, c, _)| c.clone()).collect();
                    mounts.push(v);
                }
                Err(v) => {
                    members.push(m);
                    return fail(v, members);
                }
            }
            members.push(m);
        }
        let claims: usize = members.iter().map(|m| m.pvcs.len()).sum();
        if claims > MAX_GROUP_PVCS {
            let v = Verdict::no(
                "TooManyVolumes",
                format!(
                    "the group's pods snapshot {claims} PVCs; a group takes at most \
                     {MAX_GROUP_PVCS}: narrow members' `volumes` or split the group"
                ),
            );
            return fail(v, Vec::new());
        }
        // PVCs bound, and their drivers.
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut drivers = BTreeSet::new();
        for m in members.iter_mut() {
            for claim in &m.pvcs {
                let pvc = match pvcs.get_opt(claim).await {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        let v = Verdict::no(
                            "PVCNotFound",
                            format!("pod {}: PVC {claim} does not exist", m.pod),
                        );
                        return fail(v, members);
                    }
                    Err(e) => {
                        return fail(
                            Verdict::no("APIError", format!("reading PVC {claim}: {e}")),
                            members,
                        );
                    }
                };
                let phase = pvc
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                let volume = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
                let (Some(volume), "Bound") = (volume, phase.as_str()) else {
                    let v = Verdict::no(
                        "PVCUnbound",
                        format!(
                            "pod {}: PVC {claim} is {} (not Bound)",
                            m.pod,
                            if phase.is_empty() { "Pending" } else { &phase }
                        ),
                    );
                    return fail(v, members);
                };
                let driver = match pvs.get_opt(&volume).await {
                    Ok(pv) => pv.and_then(|pv| pv.spec?.csi.map(|c| c.driver)),
                    Err(e) => {
                        return fail(
                            Verdict::no(
                                "APIError",
                                format!("reading PersistentVolume {volume}: {e}"),
                            ),
                            members,
                        );
                    }
                };
                let Some(driver) = driver else {
                    let v = Verdict::no(
                        "NotCSI",
                        format!(
                            "pod {}: PVC {claim} is not provisioned by a CSI driver, so it cannot be snapshotted",
                            m.pod
                        ),
                    );
                    return fail(v, members);
                };
                drivers.insert(driver.clone());
                m.driver = Some(driver);
            }
        }
        if let Some(v) = not_running {
            return fail(v, members);
        }
        let resolved = Verdict::yes(
            "AllMembersFound",
            format!(
                "{} member instances in {} members",
                members.len(),
                spec.members.len()
            ),
        );
        // The snapshot class serves every PVC's driver, and says (or the
        // group says) whether its snapshots are point-in-time.
        let atomic = match self.check_class(group, &drivers).await {
            Ok(atomic) => atomic,
            Err(v) => {
                return Resolution {
                    resolved,
                    protectable: v,
                    members,
                    spec: None,
                    atomic: false,
                };
            }
        };
        // Each agent describes its server.
        let described = join_all(members.iter().map(|m| {
            let (addr, identity) = (
                m.agent.clone().unwrap_or_default(),
                m.identity.clone().unwrap_or_default(),
            );
            async move {
                self.describe(&addr, &identity, connect_timeout, rpc_timeout)
                    .await
            }
        }))
        .await;
        let mut protectable: Option<Verdict> = None;
        let mut infos = Vec::new();
        for (m, d) in members.iter_mut().zip(described) {
            match d {
                Ok(d) => {
                    m.engine = Some(d.engine.to_string());
                    m.role = Some(d.role.to_string());
                    m.position = d.position.clone();
                    infos.push(Some(d));
                }
                Err(v) => {
                    protectable.get_or_insert(Verdict::no(
                        &v.reason,
                        format!("member {} (pod {}): {}", m.name, m.pod, v.message),
                    ));
                    infos.push(None);
                }
            }
        }
        if let Some(v) = protectable {
            return Resolution {
                resolved,
                protectable: v,
                members,
                spec: None,
                atomic,
            };
        }
        let infos: Vec<Described> = infos.into_iter().flatten().collect();
        // Roles and primaries.
        let mut problems: Vec<Verdict> = Vec::new();
        let mut specs = Vec::new();
        for (i, ((t, p), d)) in instances.iter().zip(&infos).enumerate() {
            let pod = members[i].pod.clone();
            let expected = match t.role {
                Some(MemberRole::Primary) => Role::Primary,
                Some(MemberRole::Replica) => Role::Replica,
                Some(MemberRole::Standalone) => Role::Standalone,
                None => d.role,
            };
            if !d.role.meets(expected) {
                problems.push(Verdict::no(
                    "RoleMismatch",
                    format!("pod {pod} (member {}) is expected to be {expected} but its agent reports {}", t.name, d.role),
                ));
            }
            let mut primary = None;
            if d.role == Role::Replica || expected == Role::Replica {
                let candidates: Vec<usize> = match &t.primary {
                    Some(pm) => (0..instances.len())
                        .filter(|&j| &instances[j].0.name == pm)
                        .collect(),
                    None => {
                        let host = host_of(&d.upstream);
                        (0..instances.len())
                            .filter(|&j| j != i)
                            .filter(|&j| {
                                let other = &members[j];
                                !host.is_empty()
                                    && (other.ip.as_deref() == Some(host)
                                        || host == other.pod
                                        || host.starts_with(&format!("{}.", other.pod)))
                            })
                            .collect()
                    }
                };
                match candidates.as_slice() {
                    [j] => primary = Some(members[*j].pod.clone()),
                    [] => problems.push(Verdict::no(
                        "ReplicaWithoutPrimary",
                        format!(
                            "pod {pod} (member {}) replicates from {}, which is no pod of this group",
                            t.name,
                            if d.upstream.is_empty() { "an unknown upstream" } else { &d.upstream }
                        ),
                    )),
                    many => problems.push(Verdict::no(
                        "ReplicaWithoutPrimary",
                        format!(
                            "pod {pod} (member {}): its primary member {} has {} pods; name one with `statefulSet`",
                            t.name,
                            t.primary.clone().unwrap_or_default(),
                            many.len()
                        ),
                    )),
                }
            }
            members[i].primary = primary.clone();
            let member_spec = MemberSpec {
                name: pod.clone(),
                agent: AgentEndpoint {
                    addr: members[i].agent.clone().unwrap_or_default(),
                    identity: members[i].identity.clone().unwrap_or_default(),
                },
                role: expected,
                primary,
                volumes: mounts[i]
                    .iter()
                    .map(|(_, claim, mount)| VolumeId::Pvc {
                        claim: claim.clone(),
                        mount_path: mount.clone(),
                    })
                    .collect(),
                restore_stage: t.restore_stage,
                fsfreeze: t.fsfreeze,
                accept_uncovered: t.accept_uncovered.iter().map(PathBuf::from).collect(),
            };
            if let Err(why) = coverage(
                &member_spec,
                d.engine,
                &d.paths,
                &[],
                crate::kube::csi::ACCEPT_GAP,
            ) {
                problems.push(Verdict::no("NotCovered", why));
            }
            if !atomic
                && let Some(why) = copy_refusal(&member_spec, d.engine, crate::kube::csi::COPY_FIX)
            {
                problems.push(Verdict::no("CopyRefused", why));
            }
            let _ = p;
            specs.push(member_spec);
        }
        if let Some(first) = problems.into_iter().next() {
            return Resolution {
                resolved,
                protectable: first,
                members,
                spec: None,
                atomic,
            };
        }
        let message = format!(
            "{} members can be backed up by {}; {}",
            members.len(),
            match spec.snapshot.driver {
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
            protectable: Verdict::yes("Ready", message),
            atomic,
            members,
            spec: Some(GroupSpec {
                name,
                namespace: Some(ns),
                members: specs,
                freeze_budget,
                lease_ttl,
                align_timeout,
                connect_timeout,
                rpc_timeout,
            }),
        }
    }

    /// The group's snapshot class exists and serves every driver of its
    /// PVCs; returns whether its snapshots are point-in-time.
    async fn check_class(
        &self,
        group: &ConsistencyGroup,
        drivers: &BTreeSet<String>,
    ) -> Result<bool, Verdict> {
        let s = &group.spec.snapshot;
        let (resource, named, default_annotation, what) = match s.driver {
            SnapshotDriver::Csi => (
                ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass"),
                    "volumesnapshotclasses",
                ),
                s.volume_snapshot_class_name.clone(),
                "snapshot.storage.kubernetes.io/is-default-class",
                "VolumeSnapshotClass",
            ),
            SnapshotDriver::CsiGroup => {
                let served = crate::kube::csi::volume_group_snapshot_resource(&self.client)
                    .await
                    .map_err(|e| Verdict::no("NoSnapshotClass", e))?;
                let gvk = GroupVersionKind::gvk(
                    "groupsnapshot.storage.k8s.io",
                    &served.version,
                    "VolumeGroupSnapshotClass",
                );
                (
                    ApiResource::from_gvk_with_plural(&gvk, "volumegroupsnapshotclasses"),
                    s.volume_group_snapshot_class_name.clone(),
                    "groupsnapshot.storage.kubernetes.io/is-default-class",
                    "VolumeGroupSnapshotClass",
                )
            }
        };
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let classes = api
            .list(&ListParams::default())
            .await
            .map_err(|e| Verdict::no("APIError", format!("listing {what}es: {e}")))?
            .items;
        let driver_of =
            |c: &DynamicObject| c.data["driver"].as_str().unwrap_or_default().to_string();
        match named {
            Some(name) => {
                let Some(class) = classes
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(&name))
                else {
                    return Err(Verdict::no(
                        "NoSnapshotClass",
                        format!("{what} {name} does not exist"),
                    ));
                };
                let driver = driver_of(class);
                if let Some(other) = drivers.iter().find(|d| **d != driver) {
                    return Err(Verdict::no(
                        "ClassDriverMismatch",
                        format!(
                            "{what} {name} is for driver {driver}, but the group has PVCs of driver {other}"
                        ),
                    ));
                }
                atomicity(s.atomic, &[class], what)
            }
            None => {
                let mut used = Vec::new();
                for d in drivers {
                    let default = classes.iter().find(|c| {
                        driver_of(c) == *d
                            && c.metadata
                                .annotations
                                .as_ref()
                                .and_then(|a| a.get(default_annotation))
                                .map(String::as_str)
                                == Some("true")
                    });
                    let Some(default) = default else {
                        return Err(Verdict::no(
                            "NoSnapshotClass",
                            format!(
                                "no {what} is named in the group's snapshot settings and none is the default for driver {d} \
                                 (annotation {default_annotation}: \"true\")"
                            ),
                        ));
                    };
                    used.push(default);
                }
                atomicity(s.atomic, &used, what)
            }
        }
    }
}

/// Whether snapshots of `classes` are point-in-time: the group's word
/// (`spec.snapshot.atomic`), else every class's annotation. Never assumed.
fn atomicity(spec: Option<bool>, classes: &[&DynamicObject], what: &str) -> Result<bool, Verdict> {
    if let Some(atomic) = spec {
        return Ok(atomic);
    }
    let said: Vec<(String, Option<bool>)> = classes
        .iter()
        .map(|c| {
            let value = c
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ATOMIC_ANNOTATION))
                .and_then(|v| v.parse::<bool>().ok());
            (c.metadata.name.clone().unwrap_or_default(), value)
        })
        .collect();
    match said
        .iter()
        .map(|(_, v)| *v)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()[..]
    {
        [Some(atomic)] => Ok(atomic),
        _ => {
            let names: Vec<&str> = said.iter().map(|(n, _)| n.as_str()).collect();
            Err(Verdict::no(
                "AtomicityUnknown",
                format!(
                    "whether the snapshots of {what} {} are point-in-time is not known, and a backup's \
                     consistency depends on it: set spec.snapshot.atomic in the group (true for block \
                     storage that snapshots at an instant, false for drivers that copy files, such as \
                     hostpath), or annotate the class {ATOMIC_ANNOTATION}: \"true\" or \"false\"",
                    names.join(", ")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_upstream() {
        assert_eq!(host_of("10.1.2.3:5432"), "10.1.2.3");
        assert_eq!(host_of("pg-0.pg.shop.svc:5432"), "pg-0.pg.shop.svc");
        assert_eq!(host_of("[fd00::1]:6379"), "fd00::1");
        assert_eq!(host_of("rs0"), "rs0");
    }

    #[test]
    fn a_copy_refusal_names_the_fix_in_kubernetes_words() {
        let member = MemberSpec {
            name: "maria".into(),
            agent: crate::core::model::AgentEndpoint {
                addr: "10.0.0.1:9443".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/maria".into(),
            },
            role: crate::core::model::Role::Primary,
            primary: None,
            volumes: Vec::new(),
            restore_stage: None,
            fsfreeze: false,
            accept_uncovered: Vec::new(),
        };
        let why = copy_refusal(&member, Engine::Mariadb, crate::kube::csi::COPY_FIX).unwrap();
        for needle in [
            "member maria (mariadb",
            "`fsfreeze: true` on member maria in the ConsistencyGroup",
            "stillpoint.dev/fsfreeze",
            "spec.snapshot.atomic: true",
        ] {
            assert!(why.contains(needle), "{needle}: {why}");
        }
        assert!(!why.contains("STILLPOINT_FSFREEZE_MOUNTS"), "{why}");
        let frozen = MemberSpec {
            fsfreeze: true,
            ..member
        };
        assert!(copy_refusal(&frozen, Engine::Mariadb, crate::kube::csi::COPY_FIX).is_none());
        // A gap in coverage: accepted the Kubernetes way.
        let paths = [ServerPath {
            what: "datadir".into(),
            path: "/var/lib/mysql".into(),
        }];
        let with_volume = MemberSpec {
            volumes: vec![crate::core::model::VolumeId::Pvc {
                claim: "data-maria-0".into(),
                mount_path: Some("/data".into()),
            }],
            ..frozen
        };
        let why = coverage(
            &with_volume,
            Engine::Mariadb,
            &paths,
            &[],
            crate::kube::csi::ACCEPT_GAP,
        )
        .unwrap_err();
        assert!(
            why.contains(
                "`acceptUncovered: [\"/var/lib/mysql\"]` on member maria in the ConsistencyGroup"
            ),
            "{why}"
        );
    }
}
