//! The workloads a restore scales, and their pods.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::kube::crd::WorkloadRef;
use crate::kube::resolve::workload_of;

/// The workload APIs of a namespace.
#[derive(Clone)]
pub(super) struct Workloads {
    pub(super) sts: Api<StatefulSet>,
    pub(super) deploy: Api<Deployment>,
    pub(super) pods: Api<Pod>,
}

/// What the restore needs of a workload: its replicas, pod selector,
/// template and the claim templates of a StatefulSet.
pub(super) struct WorkloadInfo {
    pub(super) replicas: i32,
    pub(super) selector: BTreeMap<String, String>,
    pub(super) template: Option<PodTemplateSpec>,
    pub(super) claim_templates: Vec<String>,
}

impl Workloads {
    pub(super) async fn get(&self, w: &WorkloadRef) -> Result<Option<WorkloadInfo>, kube::Error> {
        Ok(match w.kind.as_str() {
            "StatefulSet" => self.sts.get_opt(&w.name).await?.map(|s| {
                let spec = s.spec.unwrap_or_default();
                WorkloadInfo {
                    replicas: spec.replicas.unwrap_or(1),
                    selector: spec.selector.match_labels.unwrap_or_default(),
                    template: Some(spec.template),
                    claim_templates: spec
                        .volume_claim_templates
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|c| c.metadata.name)
                        .collect(),
                }
            }),
            _ => self.deploy.get_opt(&w.name).await?.map(|d| {
                let spec = d.spec.unwrap_or_default();
                WorkloadInfo {
                    replicas: spec.replicas.unwrap_or(1),
                    selector: spec.selector.match_labels.unwrap_or_default(),
                    template: Some(spec.template),
                    claim_templates: Vec::new(),
                }
            }),
        })
    }

    pub(super) async fn scale(&self, w: &WorkloadRef, replicas: i32) -> Result<(), kube::Error> {
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        match w.kind.as_str() {
            "StatefulSet" => self.sts.patch_scale(&w.name, &params, &patch).await?,
            _ => self.deploy.patch_scale(&w.name, &params, &patch).await?,
        };
        Ok(())
    }

    /// The pods `w` runs now.
    pub(super) async fn pods(
        &self,
        w: &WorkloadRef,
        info: &WorkloadInfo,
    ) -> Result<Vec<Pod>, kube::Error> {
        let selector = info
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|p| workload_of(p).as_ref() == Some(w))
            .collect())
    }
}

pub(super) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is not Ready, from its status.
pub(super) fn not_ready_because(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "it has no status yet".into();
    };
    let mut why = Vec::new();
    for c in status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
    {
        if c.ready {
            continue;
        }
        let state = c.state.clone().unwrap_or_default();
        let text = if let Some(w) = state.waiting {
            format!(
                "waiting ({}{})",
                w.reason.unwrap_or_default(),
                w.message.map(|m| format!(": {m}")).unwrap_or_default()
            )
        } else if let Some(t) = state.terminated {
            format!(
                "terminated ({}, exit code {})",
                t.reason.unwrap_or_default(),
                t.exit_code
            )
        } else {
            "running but not ready (its readiness probe fails)".into()
        };
        let restarts = match c.restart_count {
            0 => String::new(),
            n => format!(", {n} restarts"),
        };
        why.push(format!("container {} {text}{restarts}", c.name));
    }
    if why.is_empty() {
        for c in status.conditions.iter().flatten() {
            if c.status != "True" {
                why.push(format!(
                    "{} is {}{}",
                    c.type_,
                    c.status,
                    c.message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if why.is_empty() {
        format!("phase {}", status.phase.clone().unwrap_or_default())
    } else {
        why.join("; ")
    }
}
