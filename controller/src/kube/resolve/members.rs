//! From the spec's members to member instances: their pods, agents,
//! identities and volumes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

use super::pods::{agent_port, describe_selector, pod_identity, pod_volumes, pods_of, workload_of};
use super::{AGENT_PORT_NAME, MAX_GROUP_PODS, MAX_GROUP_PVCS, Verdict};
use crate::kube::crd::{ConsistencyGroupSpec, MemberTemplate, ResolvedMember};
use crate::kube::reason::Reason;

/// A member instance: the spec's member and one of its pods.
pub(super) type Instance<'a> = (&'a MemberTemplate, &'a Pod);

/// A pod's volumes to snapshot: (volume name, claim, mount path in the
/// server's container).
pub(super) type Mounts = Vec<(String, String, Option<PathBuf>)>;

/// What the pods say of each member instance.
pub(super) struct Found {
    pub(super) members: Vec<ResolvedMember>,
    /// Each instance's volumes, in the order of `members`.
    pub(super) mounts: Vec<Mounts>,
    /// The first pod that does not run: reported after the PVCs (an
    /// unbound PVC is why a pod does not run).
    pub(super) not_running: Option<Verdict>,
    /// The CSI drivers of every PVC (once bound).
    pub(super) drivers: BTreeSet<String>,
}

/// Each member's pods, at least one each, no pod twice, and no more than
/// a group takes.
pub(super) fn instances<'a>(
    spec: &'a ConsistencyGroupSpec,
    pods: &'a [Pod],
    ns: &str,
) -> Result<Vec<Instance<'a>>, Verdict> {
    let mut instances: Vec<Instance<'a>> = Vec::new();
    for t in &spec.members {
        let found = pods_of(t, pods);
        if found.is_empty() {
            return Err(Verdict::no(
                Reason::MemberNotFound,
                format!(
                    "member {}: no pod in namespace {ns} matches {}",
                    t.name,
                    describe_selector(t)
                ),
            ));
        }
        instances.extend(found.into_iter().map(|p| (t, p)));
    }
    if instances.len() > MAX_GROUP_PODS {
        return Err(Verdict::no(
            Reason::TooManyPods,
            format!(
                "the members' selectors match {} pods; a group resolves to at most \
                 {MAX_GROUP_PODS}: narrow the selectors or split the group",
                instances.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (t, p) in &instances {
        let pod = p.metadata.name.clone().unwrap_or_default();
        if !seen.insert(pod.clone()) {
            return Err(Verdict::no(
                Reason::InvalidSpec,
                format!(
                    "pod {pod} is selected by more than one member (the second: {})",
                    t.name
                ),
            ));
        }
    }
    Ok(instances)
}

/// Every instance's agent, identity and volumes; on a refusal, the members
/// found up to the one refused.
pub(super) fn found(
    instances: &[Instance<'_>],
    trust_domain: &str,
) -> Result<Found, (Verdict, Vec<ResolvedMember>)> {
    let mut found = Found {
        members: Vec::new(),
        mounts: Vec::new(),
        not_running: None,
        drivers: BTreeSet::new(),
    };
    for (t, p) in instances {
        let (m, mounts, not_running) = member(t, p, trust_domain);
        found.members.push(m);
        match mounts {
            Err(v) => return Err((v, found.members)),
            Ok(mounts) => found.mounts.push(mounts),
        }
        if let Some(v) = not_running {
            found.not_running.get_or_insert(v);
        }
    }
    Ok(found)
}

/// Instance `p` of member `t` as the status shows it; its volumes (or why
/// it cannot be protected at all); why it does not run, if it does not.
fn member(
    t: &MemberTemplate,
    p: &Pod,
    trust_domain: &str,
) -> (ResolvedMember, Result<Mounts, Verdict>, Option<Verdict>) {
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
        let v = Verdict::no(
            Reason::NoAgent,
            format!(
                "pod {pod} (member {}) has no Stillpoint agent: no container port named `{AGENT_PORT_NAME}`. \
                 Add the agent sidecar (or label the pod stillpoint.dev/inject=true for injection)",
                t.name
            ),
        );
        return (m, Err(v), None);
    };
    let not_running = match (ip, running) {
        (Some(ip), true) => {
            m.agent = Some(format!("{ip}:{port}"));
            None
        }
        _ => Some(Verdict::no(
            Reason::PodNotRunning,
            format!(
                "pod {pod} (member {}) is not running or has no IP yet",
                t.name
            ),
        )),
    };
    m.identity = Some(pod_identity(trust_domain, p));
    match pod_volumes(p, t.volumes.as_deref()) {
        Ok(v) => {
            m.pvcs = v.iter().map(|(_, c, _)| c.clone()).collect();
            (m, Ok(v), not_running)
        }
        Err(v) => (m, Err(v), not_running),
    }
}

/// The group's pods snapshot no more PVCs than a group takes.
pub(super) fn volume_limit(members: &[ResolvedMember]) -> Result<(), Verdict> {
    let claims: usize = members.iter().map(|m| m.pvcs.len()).sum();
    if claims > MAX_GROUP_PVCS {
        return Err(Verdict::no(
            Reason::TooManyVolumes,
            format!(
                "the group's pods snapshot {claims} PVCs; a group takes at most \
                 {MAX_GROUP_PVCS}: narrow members' `volumes` or split the group"
            ),
        ));
    }
    Ok(())
}
