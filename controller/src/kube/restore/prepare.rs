//! Step 4, prepare: by the agent in restore mode, run as a pod on a
//! member's restored volumes before its server starts: WAL and
//! `backup_label` into a PostgreSQL member cut with a backup label, and,
//! under new names, the originals' hosts renamed in a replica's
//! replication settings (see `copies.rs`).

use k8s_openapi::api::core::v1::{Pod, PodSecurityContext, SecurityContext};
use kube::api::DeleteParams;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::time::Duration;

use super::plan::Planned;
use super::run::Run;
use super::workloads::not_ready_because;
use super::{PREPARE_ARTEFACTS, PREPARE_CPU_REQUEST, PREPARE_MEMORY, PREPARE_WAL, Stop, stop};
use crate::core::error::ErrorKind;
use crate::kube::crd::{RESTORE_UID_LABEL, VolumeSnapshotRef};
use crate::kube::reason::Reason;

/// The preparation pod's security contexts: who the database runs as (so
/// the restored files are its), and what Pod Security `restricted` asks:
/// not root, no privilege escalation, no capability, the runtime's seccomp
/// profile, a read-only root filesystem.
pub(super) fn restricted(
    pod: Option<PodSecurityContext>,
    container: Option<SecurityContext>,
) -> (Value, Value) {
    let object = |v: Result<Value, serde_json::Error>| {
        v.ok().filter(Value::is_object).unwrap_or_else(|| json!({}))
    };
    let mut pod = object(serde_json::to_value(pod));
    pod["runAsNonRoot"] = json!(true);
    pod["seccompProfile"] = json!({"type": "RuntimeDefault"});
    let mut container = object(serde_json::to_value(container));
    container["runAsNonRoot"] = json!(true);
    container["allowPrivilegeEscalation"] = json!(false);
    container["readOnlyRootFilesystem"] = json!(true);
    container["capabilities"] = json!({"drop": ["ALL"]});
    (pod, container)
}

impl Run {
    /// Whether `p` is a replica in a copy this restore made whose data
    /// directory may name the original's hosts.
    fn renames_hosts(&self, p: &Planned) -> bool {
        let engine = p.rec.engine.as_deref().unwrap_or_default();
        p.is_replica()
            && matches!(engine, "postgres" | "mysql" | "mariadb")
            && self
                .renames
                .as_ref()
                .is_some_and(|r| p.target.as_ref().is_some_and(|t| r.copies.contains(t)))
    }

    /// 4. WAL and `backup_label` in, hosts renamed, before the server starts.
    pub(super) async fn prepare(
        &mut self,
        planned: &[Planned],
        bound: Duration,
    ) -> Result<(), Stop> {
        let to_prepare: Vec<&Planned> = planned
            .iter()
            .filter(|p| p.needs_label() || self.renames_hosts(p))
            .collect();
        for p in to_prepare {
            // Prepared by an earlier run of this restore: never twice.
            let phase = self.member(&p.rec.pod).phase.as_str();
            if matches!(phase, "Prepared" | "Starting" | "Ready") {
                continue;
            }
            let pod = self.prepare_pod(p).await?;
            let name = pod.name_any();
            self.start_preparing(&pod).await?;
            self.wait_prepared(&name, bound).await?;
            let _ = self.w.pods.delete(&name, &DeleteParams::default()).await;
            let _ = self
                .pvcs
                .delete(&self.wal_claim(p), &DeleteParams::default())
                .await;
            let what = match (p.needs_label(), self.renames_hosts(p)) {
                (true, true) => "WAL and backup_label written, hosts renamed",
                (true, false) => "WAL and backup_label written",
                _ => "the originals' hosts renamed in its replication settings",
            };
            let m = self.member(&p.rec.pod);
            m.phase = "Prepared".into();
            m.message = Some(format!("{what} by the agent in restore mode"));
            self.save().await?;
            let note = format!(
                "pod {}: restored data directory prepared: {what}",
                p.rec.pod
            );
            self.ctx
                .event(&self.restore, false, Reason::Prepared, note)
                .await;
        }
        Ok(())
    }

    /// The preparation pod created, unless this restore made it already.
    async fn start_preparing(&self, pod: &Pod) -> Result<(), Stop> {
        let name = pod.name_any();
        match self.w.pods.get_opt(&name).await? {
            // An earlier restore's pod of that name is not this one's:
            // wait for it to go (it goes with its restore).
            Some(old) if old.labels().get(RESTORE_UID_LABEL) != Some(&self.uid()) => Err(stop(
                Reason::PodExists,
                format!(
                    "pod {name} exists and was not made by this restore (an earlier one of the same \
                     name?); it goes with its own restore: delete it, or retry in a moment"
                ),
            )),
            Some(_) => Ok(()),
            None => {
                self.w.pods.create(&Default::default(), pod).await?;
                Ok(())
            }
        }
    }

    /// The preparation pod `name` succeeded within `bound`.
    async fn wait_prepared(&self, name: &str, bound: Duration) -> Result<(), Stop> {
        let pods = self.w.pods.clone();
        let outcome = self
            .wait(bound, || {
                let (pods, name) = (pods.clone(), name.to_string());
                async move {
                    let pod = pods.get(&name).await?;
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                    match phase.as_str() {
                        "Succeeded" => Ok(None),
                        "Failed" => Err(stop(
                            Reason::Run(ErrorKind::PrepareFailed),
                            format!(
                                "preparing a restored data directory: the agent in restore mode failed \
                                 ({}); see `kubectl logs {name}`",
                                not_ready_because(&pod)
                            ),
                        )),
                        _ => Ok(Some(not_ready_because(&pod))),
                    }
                }
            })
            .await?;
        match outcome {
            None => Ok(()),
            Some(why) => Err(stop(
                Reason::PrepareTimedOut,
                format!("pod {name} did not finish preparing within {bound:?}: {why}"),
            )),
        }
    }

    /// The pod that runs the agent in restore mode on `p`'s volumes.
    pub(super) async fn prepare_pod(&self, p: &Planned) -> Result<Pod, Stop> {
        let Some(data_dir) = p.rec.data_directory.clone() else {
            return Err(stop(
                Reason::NotRestorable,
                format!(
                    "the backup does not record the data directory of pod {}",
                    p.rec.pod
                ),
            ));
        };
        let (holder, relative) = data_holder(p, &data_dir)?;
        let (pod_security, container_security) =
            self.database_user(p, holder.mount_path.as_deref()).await?;
        let wal_from = p
            .wal_part
            .as_ref()
            .map(|_| format!("{PREPARE_WAL}/{}/pg_wal", relative).replace("//", "/"));
        let mut env = vec![json!({"name": "STILLPOINT_RESTORE_DATA_DIR", "value": data_dir})];
        if p.needs_label() {
            env.push(json!({"name": "STILLPOINT_RESTORE_FROM", "value": PREPARE_ARTEFACTS}));
            env.push(json!({"name": "STILLPOINT_RESTORE_MEMBER", "value": p.rec.pod}));
        }
        if let Some(w) = &wal_from {
            env.push(json!({"name": "STILLPOINT_RESTORE_WAL_FROM", "value": w}));
        }
        if let Some(r) = self.renames.as_ref().filter(|_| self.renames_hosts(p)) {
            env.push(json!({"name": "STILLPOINT_RESTORE_HOSTS", "value": r.hosts.encode()}));
        }
        let (mounts, volumes) = self.prepare_volumes(p);
        let (pod_security, container_security) = restricted(pod_security, container_security);
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("{}-prepare-{}", self.name, p.rec.pod),
                "labels": self.labels(),
                "ownerReferences": self.restore.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": pod_security,
                "containers": [{
                    "name": "restore",
                    "image": self.ctx.settings.agent_image,
                    "args": ["restore"],
                    "env": env,
                    "securityContext": container_security,
                    "resources": {
                        "requests": {"cpu": PREPARE_CPU_REQUEST, "memory": PREPARE_MEMORY},
                        "limits": {"memory": PREPARE_MEMORY},
                    },
                    "volumeMounts": mounts,
                }],
                "volumes": volumes,
            },
        });
        serde_json::from_value(pod).map_err(|e| stop(Reason::InvalidSpec, e.to_string()))
    }

    /// Who the database runs as (the restored files must be its): the pod
    /// security context of its workload, and the user and group of the
    /// container that mounts `data` (the volume holding the data directory).
    async fn database_user(
        &self,
        p: &Planned,
        data: Option<&str>,
    ) -> Result<(Option<PodSecurityContext>, Option<SecurityContext>), Stop> {
        let template = match &p.target {
            Some(t) => self.w.get(t).await?.and_then(|i| i.template),
            None => None,
        };
        let spec = template.and_then(|t| t.spec);
        let pod = spec.as_ref().and_then(|s| s.security_context.clone());
        let container = spec
            .as_ref()
            .and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| {
                        c.volume_mounts
                            .iter()
                            .flatten()
                            .any(|m| Some(m.mount_path.as_str()) == data)
                    })
                    .and_then(|c| c.security_context.clone())
            })
            .map(|c| SecurityContext {
                run_as_user: c.run_as_user,
                run_as_group: c.run_as_group,
                run_as_non_root: c.run_as_non_root,
                ..Default::default()
            });
        Ok((pod, container))
    }

    /// The preparation pod's mounts and volumes: the restored volumes where
    /// the server mounts them, the WAL part's, and the artefacts Secret.
    fn prepare_volumes(&self, p: &Planned) -> (Vec<Value>, Vec<Value>) {
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        for (i, (v, claim)) in p.volumes.iter().enumerate() {
            let Some(mount) = &v.mount_path else { continue };
            mounts.push(json!({"name": format!("data-{i}"), "mountPath": mount}));
            volumes.push(
                json!({"name": format!("data-{i}"), "persistentVolumeClaim": {"claimName": claim}}),
            );
        }
        if p.wal_part.is_some() {
            mounts.push(json!({"name": "wal", "mountPath": PREPARE_WAL, "readOnly": true}));
            volumes.push(json!({"name": "wal", "persistentVolumeClaim": {"claimName": self.wal_claim(p), "readOnly": true}}));
        }
        if !p.needs_label() {
            return (mounts, volumes);
        }
        let secret = &self.artefacts_secret;
        mounts.push(json!({"name": "artefacts", "mountPath": PREPARE_ARTEFACTS, "readOnly": true}));
        volumes.push(
            json!({"name": "artefacts", "secret": {"secretName": secret, "defaultMode": 0o444}}),
        );
        (mounts, volumes)
    }
}

/// The restored volume holding `data_dir` (the deepest mount that does),
/// and the data directory's path in it.
fn data_holder(p: &Planned, data_dir: &str) -> Result<(VolumeSnapshotRef, String), Stop> {
    p.volumes
        .iter()
        .filter_map(|(v, _)| {
            let mount = v.mount_path.clone()?;
            let rel = std::path::Path::new(data_dir).strip_prefix(&mount).ok()?;
            Some((v.clone(), rel.display().to_string()))
        })
        .max_by_key(|(v, _)| v.mount_path.clone().unwrap_or_default().len())
        .ok_or_else(|| {
            stop(
                Reason::NotRestorable,
                format!(
                    "pod {}: no restored volume holds its data directory {data_dir}",
                    p.rec.pod
                ),
            )
        })
}
