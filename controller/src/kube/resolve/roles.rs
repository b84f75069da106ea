//! What each member is: its role as the spec expects it and its agent
//! reports it, its primary among the group's pods, and whether its volumes
//! cover what its server needs.

use std::path::PathBuf;

use super::Verdict;
use super::agents::{Described, host_of};
use super::members::{Found, Instance};
use crate::core::error::ErrorKind;
use crate::core::model::{AgentEndpoint, MemberSpec, Role, VolumeId};
use crate::core::protocol::{copy_refusal, coverage};
use crate::kube::crd::{MemberRole, ResolvedMember};
use crate::kube::reason::Reason;

/// The members as the protocol runs them, each instance's primary recorded
/// in `found`; the first problem if any member cannot be backed up.
pub(super) fn member_specs(
    instances: &[Instance<'_>],
    infos: &[Described],
    found: &mut Found,
    atomic: bool,
) -> Result<Vec<MemberSpec>, Verdict> {
    let mut problems: Vec<Verdict> = Vec::new();
    let mut specs = Vec::new();
    for (i, ((t, _), d)) in instances.iter().zip(infos).enumerate() {
        let expected = match t.role {
            Some(MemberRole::Primary) => Role::Primary,
            Some(MemberRole::Replica) => Role::Replica,
            Some(MemberRole::Standalone) => Role::Standalone,
            None => d.role,
        };
        let pod = found.members[i].pod.clone();
        if !d.role.meets(expected) {
            problems.push(Verdict::no(
                Reason::Run(ErrorKind::RoleMismatch),
                format!(
                    "pod {pod} (member {}) is expected to be {expected} but its agent reports {}",
                    t.name, d.role
                ),
            ));
        }
        let mut primary = None;
        if d.role == Role::Replica || expected == Role::Replica {
            match primary_of(i, instances, &found.members, d) {
                Ok(p) => primary = Some(p),
                Err(v) => problems.push(v),
            }
        }
        found.members[i].primary = primary.clone();
        let member_spec = MemberSpec {
            name: pod,
            agent: AgentEndpoint {
                addr: found.members[i].agent.clone().unwrap_or_default(),
                identity: found.members[i].identity.clone().unwrap_or_default(),
            },
            role: expected,
            primary,
            volumes: found.mounts[i]
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
        problems.extend(covered(&member_spec, d, atomic));
        specs.push(member_spec);
    }
    match problems.into_iter().next() {
        Some(first) => Err(first),
        None => Ok(specs),
    }
}

/// The pod instance `i` (a replica) replicates from: the one pod of its
/// `primary` member, else the pod its upstream names.
fn primary_of(
    i: usize,
    instances: &[Instance<'_>],
    members: &[ResolvedMember],
    d: &Described,
) -> Result<String, Verdict> {
    let t = instances[i].0;
    let pod = &members[i].pod;
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
        [j] => Ok(members[*j].pod.clone()),
        [] => Err(Verdict::no(
            Reason::Run(ErrorKind::ReplicaWithoutPrimary),
            format!(
                "pod {pod} (member {}) replicates from {}, which is no pod of this group",
                t.name,
                if d.upstream.is_empty() {
                    "an unknown upstream"
                } else {
                    &d.upstream
                }
            ),
        )),
        many => Err(Verdict::no(
            Reason::Run(ErrorKind::ReplicaWithoutPrimary),
            format!(
                "pod {pod} (member {}): its primary member {} has {} pods; name one with `statefulSet`",
                t.name,
                t.primary.clone().unwrap_or_default(),
                many.len()
            ),
        )),
    }
}

/// What keeps `member` from being backed up as its storage cuts: a path its
/// server needs that its volumes do not hold, or a copying class under an
/// engine that needs an instant.
fn covered(member: &MemberSpec, d: &Described, atomic: bool) -> Vec<Verdict> {
    let mut problems = Vec::new();
    if let Err(why) = coverage(
        member,
        d.engine,
        &d.paths,
        &[],
        crate::kube::csi::ACCEPT_GAP,
    ) {
        problems.push(Verdict::no(Reason::Run(ErrorKind::NotCovered), why));
    }
    if !atomic && let Some(why) = copy_refusal(member, d.engine, crate::kube::csi::COPY_FIX) {
        problems.push(Verdict::no(Reason::Run(ErrorKind::CopyRefused), why));
    }
    problems
}
