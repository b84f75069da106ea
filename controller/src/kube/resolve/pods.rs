//! What a pod says of itself: the agent's port and identity, its
//! workload, whether a member selects it, and its volumes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

use super::members::Mounts;
use super::{AGENT_PORT_NAME, Verdict};
use crate::kube::crd::{MemberTemplate, WorkloadRef};
use crate::kube::reason::Reason;

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
pub(super) fn matches(pod: &Pod, labels: &BTreeMap<String, String>) -> bool {
    let have = pod.metadata.labels.clone().unwrap_or_default();
    !labels.is_empty() && labels.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// Whether member `template` selects `pod` (by labels, or as its
/// StatefulSet's pod), whatever the pod's state.
fn selects(template: &MemberTemplate, pod: &Pod) -> bool {
    template
        .selector
        .as_ref()
        .is_some_and(|s| matches(pod, &s.match_labels))
        || template.stateful_set.as_ref().is_some_and(|s| {
            pod.metadata.name.as_deref() == Some(&format!("{}-{}", s.name, s.ordinal))
        })
}

/// Whether any member of `group` selects `pod`: what a change of the pod
/// can change the group's resolution for. (Its namespace is the caller's
/// to check.)
pub fn group_selects(group: &crate::kube::crd::ConsistencyGroup, pod: &Pod) -> bool {
    group.spec.members.iter().any(|m| selects(m, pod))
}

/// The pods of a member, by name.
pub(super) fn pods_of<'p>(template: &MemberTemplate, pods: &'p [Pod]) -> Vec<&'p Pod> {
    let mut found: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| selects(template, p))
        .collect();
    found.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    found
}

pub(super) fn describe_selector(t: &MemberTemplate) -> String {
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
pub(super) fn pod_volumes(pod: &Pod, wanted: Option<&[String]>) -> Result<Mounts, Verdict> {
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
                Reason::VolumeNotFound,
                format!("pod {pod_name} has no volume {name}"),
            ));
        };
        let Some(pvc) = &v.persistent_volume_claim else {
            return Err(Verdict::no(
                Reason::VolumeNotPVC,
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
