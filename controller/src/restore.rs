//! Local restore: copies each member's snapshots to a target directory,
//! stage by stage, and applies the member's consistency method.
//!
//! - `backup-label`: the copy needs PostgreSQL's `backup_label` (and
//!   `tablespace_map`) written into it: recovery then replays the WAL that
//!   was copied with it up to the backup's stop LSN.
//! - `crash-consistent` / `frozen` / `frozen-copy`: restored as cut; a
//!   stale `backup_label` is removed so that a crash-consistent image is not
//!   asked for WAL past the snapshot.

use std::path::{Path, PathBuf};

use crate::catalog::{Consistency, Manifest, MemberRecord};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup {id} did not succeed ({outcome}); only a succeeded backup restores")]
    NotRestorable { id: String, outcome: String },
    #[error("{0} already exists; restore into an empty or new directory")]
    Exists(PathBuf),
    #[error("member {member}: {message}")]
    Member { member: String, message: String },
}

/// One restored volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub member: String,
    pub stage: u32,
    pub path: PathBuf,
    pub consistency: Option<Consistency>,
}

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
            engine: m.engine.clone(),
            role: m.role.clone(),
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

fn member_error(member: &str, message: impl Into<String>) -> RestoreError {
    RestoreError::Member {
        member: member.to_string(),
        message: message.into(),
    }
}

/// Restores every volume of `manifest` under `to/<member>/<index>`.
pub fn restore_files(manifest: &Manifest, to: &Path) -> Result<Vec<Restored>, RestoreError> {
    if manifest.outcome != crate::catalog::Outcome::Succeeded {
        return Err(RestoreError::NotRestorable {
            id: manifest.id.clone(),
            outcome: format!("{:?}", manifest.outcome).to_lowercase(),
        });
    }
    let mut restored = Vec::new();
    for m in order(manifest) {
        for (index, snapshot) in m.snapshots.iter().enumerate() {
            if snapshot.driver == "exec" {
                return Err(member_error(
                    &m.name,
                    format!(
                        "snapshot {} was made by the exec snapshotter: restore it with your storage tools",
                        snapshot.handle
                    ),
                ));
            }
            let target = to.join(&m.name).join(index.to_string());
            if target.exists() {
                return Err(RestoreError::Exists(target));
            }
            std::fs::create_dir_all(target.parent().expect("has a parent"))
                .map_err(|e| member_error(&m.name, e.to_string()))?;
            let status = std::process::Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&snapshot.handle)
                .arg(&target)
                .status()
                .map_err(|e| member_error(&m.name, format!("cp: {e}")))?;
            if !status.success() {
                return Err(member_error(
                    &m.name,
                    format!("copying {} failed", snapshot.handle),
                ));
            }
            if index == 0 {
                apply_consistency(m, &target)?;
            }
            restored.push(Restored {
                member: m.name.clone(),
                stage: m.restore_stage,
                path: target,
                consistency: m.consistency,
            });
        }
    }
    Ok(restored)
}

/// Writes (or removes) what the member's consistency method asks for.
pub fn apply_consistency(m: &MemberRecord, data: &Path) -> Result<(), RestoreError> {
    let write = |name: &str, text: &str| {
        std::fs::write(data.join(name), text)
            .map_err(|e| member_error(&m.name, format!("writing {name}: {e}")))
    };
    match m.consistency {
        Some(Consistency::BackupLabel) => {
            let label = m.artefacts.get("backup_label").ok_or_else(|| {
                member_error(
                    &m.name,
                    "the manifest has no backup_label for a backup-label restore",
                )
            })?;
            write("backup_label", label)?;
            if let Some(map) = m.artefacts.get("tablespace_map") {
                write("tablespace_map", map)?;
            }
        }
        _ if m.engine == "postgres" => {
            let _ = std::fs::remove_file(data.join("backup_label"));
            let _ = std::fs::remove_file(data.join("tablespace_map"));
        }
        _ => {}
    }
    // A pid file in a snapshot is stale by definition.
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    Ok(())
}
