//! Recovery plans: the order in which a backup's members are restored —
//! by stage, primaries before their replicas — and what each must reach.

use crate::core::record::{Consistency, Manifest, MemberRecord};

/// The members in restore order: by stage, primaries before their replicas.
pub fn order(manifest: &Manifest) -> Vec<&MemberRecord> {
    let mut members: Vec<&MemberRecord> = manifest.members.iter().collect();
    members.sort_by_key(|m| (m.restore_stage, m.role == "replica", m.name.clone()));
    members
}

/// What a stage number stands for (the defaults put each engine class in
/// its own; a member's `restore_stage` overrides it).
pub fn stage_class(stage: u32) -> &'static str {
    match stage {
        1 => "infrastructure",
        2 => "databases",
        3 => "messaging",
        4 => "applications",
        _ => "custom",
    }
}

/// One member's line of a recovery plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanStep {
    pub stage: u32,
    pub class: &'static str,
    pub member: String,
    pub engine: String,
    pub role: String,
    /// `default` (by engine class) or `explicit` (the member's `restore_stage`).
    pub stage_from: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// For a replica: the position it must reach (its primary's frozen
    /// position, which the backup aligned it to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub must_reach: Option<String>,
    /// For a primary: the position it was frozen at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

/// The recovery plan: every member in restore order. Each stage starts
/// only once every member of the previous one is healthy.
pub fn plan(manifest: &Manifest) -> Vec<PlanStep> {
    order(manifest)
        .into_iter()
        .map(|m| PlanStep {
            stage: m.restore_stage,
            class: stage_class(m.restore_stage),
            member: m.name.clone(),
            engine: m.engine.to_string(),
            role: m.role.to_string(),
            stage_from: if m.restore_stage_explicit {
                "explicit"
            } else {
                "default"
            },
            consistency: m.consistency,
            must_reach: (m.role == "replica")
                .then(|| m.aligned_to.clone().or_else(|| m.position.clone()))
                .flatten(),
            position: (m.role != "replica").then(|| m.position.clone()).flatten(),
        })
        .collect()
}
