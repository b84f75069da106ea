//! Under new names, the copies the members are restored into, made from
//! the workloads the backup kept where no copy exists (a copy written by
//! hand is used as it is).
//!
//! For each member's workload `<name>` without a copy `<pvcPrefix><name>`:
//!
//! - **ConfigMaps** its pod template references are copied as
//!   `<pvcPrefix><configmap>`, and the copy references those;
//! - **Services** that select its pods are copied as `<pvcPrefix><service>`
//!   (a StatefulSet's copy names its copied Service);
//! - **the workload** is copied as `<pvcPrefix><name>` with `replicas: 0`
//!   (the stages scale it up), its claims renamed as the restored PVCs are,
//!   and every label of its pods (but `stillpoint.dev/` ones, so that the
//!   agent is injected again) prefixed: `app: pg` becomes `app:
//!   restored-pg`, which its group does not select (checked: a copy its
//!   group would select is refused, or the next backup would take it);
//! - **host names** of the originals in the copies' commands, arguments,
//!   environment values and ConfigMap lines are renamed to the copies'
//!   (`pg-0.pg` to `restored-pg-0.restored-pg`; the rules are
//!   [`HostRenames`]'), and so are those in the restored replicas' data
//!   directories, by the agent in restore mode (step 4): a restored
//!   replica follows the restored primary, never the running original.
//!
//! Secrets and ServiceAccounts are shared with the original (a content's
//! are made under their names where they are missing). Every copy is
//! labelled with the restore and outlives it: it is the restored
//! application.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::PodSpec;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Map, Value, json};
use stillpoint_proto::hosts::{HostRenames, is_host_flag};

use super::plan::Planned;
use super::run::{Renamed, Run};
use super::{DEFAULT_PREFIX, Stop, stop};
use crate::kube::crd::{CapturedObject, ConsistencyGroup, RESTORE_UID_LABEL, WorkloadRef};
use crate::kube::reason::Reason;

/// A member's workload, its copy, and the kept manifest it is made from.
struct Source {
    copy: WorkloadRef,
    manifest: Value,
    /// Whether this restore creates it (no copy exists yet).
    make: bool,
}

impl Run {
    /// The prefix of this restore's names, if it restores under new names.
    pub(super) fn new_names(&self) -> Option<String> {
        let spec = &self.restore.spec;
        let renamed = !spec.in_place && (spec.content.is_none() || spec.pvc_prefix.is_some());
        renamed.then(|| spec.pvc_prefix.clone().unwrap_or(DEFAULT_PREFIX.into()))
    }

    /// Makes the missing copies of `planned`'s workloads from the kept
    /// objects and records the host renames of every copy this restore made.
    pub(super) async fn copies(&mut self, planned: &[Planned], group: &str) -> Result<(), Stop> {
        let Some(prefix) = self.new_names() else {
            return Ok(());
        };
        let sources = self.sources(planned).await?;
        if sources.is_empty() {
            return Ok(());
        }
        let (renames, services, maps) = renames(&self.ns, &prefix, &sources, &self.captured);
        let made: Vec<&Source> = sources.iter().filter(|s| s.make).collect();
        if !made.is_empty() {
            let mut copies = Vec::new();
            for name in &maps {
                copies.push(self.copy_config_map(name, &prefix, &renames)?);
            }
            for name in &services {
                copies.push(self.copy_service(name, &prefix)?);
            }
            for s in &made {
                let claims = claims_of(planned, &s.copy);
                let mut copy = copy_workload(s, &prefix, &renames, &maps, &claims, self.labels())?;
                copy["metadata"]["namespace"] = json!(self.ns);
                self.not_selected(group, &s.copy, &copy).await?;
                copies.push(copy);
            }
            self.create_copies(copies).await?;
        }
        let copies = sources.into_iter().map(|s| s.copy).collect();
        self.renames = Some(Renamed {
            hosts: renames,
            copies,
        });
        Ok(())
    }

    /// The members' workloads this restore makes or made copies of, with
    /// their kept manifests. A copy made otherwise (by hand) is not one.
    async fn sources(&self, planned: &[Planned]) -> Result<Vec<Source>, Stop> {
        let mut seen = BTreeSet::new();
        let mut sources = Vec::new();
        for p in planned {
            let (Some(original), Some(copy)) = (&p.rec.workload, &p.target) else {
                continue;
            };
            if !seen.insert(copy.clone()) {
                continue;
            }
            let make = match self.copy_labels(copy).await? {
                None => true,
                Some(l) if l.get(RESTORE_UID_LABEL) == Some(&self.uid()) => false,
                Some(_) => continue,
            };
            let kept = self
                .captured
                .iter()
                .find(|o| o.kind == original.kind && o.name == original.name);
            if let Some(o) = kept {
                let manifest = o.manifest.clone();
                sources.push(Source {
                    copy: copy.clone(),
                    manifest,
                    make,
                });
            }
        }
        Ok(sources)
    }

    /// The labels of workload `w`, if it exists.
    async fn copy_labels(&self, w: &WorkloadRef) -> Result<Option<BTreeMap<String, String>>, Stop> {
        Ok(match w.kind.as_str() {
            "StatefulSet" => self
                .w
                .sts
                .get_opt(&w.name)
                .await?
                .map(|o| o.labels().clone()),
            _ => self
                .w
                .deploy
                .get_opt(&w.name)
                .await?
                .map(|o| o.labels().clone()),
        })
    }

    /// Kept ConfigMap `name` as its copy, each line's hosts renamed.
    fn copy_config_map(
        &self,
        name: &str,
        prefix: &str,
        renames: &HostRenames,
    ) -> Result<Value, Stop> {
        let mut m = self.kept_manifest("ConfigMap", name)?;
        if let Some(data) = m["data"].as_object_mut() {
            for v in data.values_mut() {
                if let Some(text) = v.as_str() {
                    let lines: Vec<String> = text.split('\n').map(|l| renames.rename(l)).collect();
                    *v = json!(lines.join("\n"));
                }
            }
        }
        self.copy_meta(&mut m, &format!("{prefix}{name}"), prefix)?;
        Ok(m)
    }

    /// Kept Service `name` as its copy, selecting the copies' pods.
    fn copy_service(&self, name: &str, prefix: &str) -> Result<Value, Stop> {
        let mut m = self.kept_manifest("Service", name)?;
        relabel(&mut m["spec"]["selector"], prefix)?;
        self.copy_meta(&mut m, &format!("{prefix}{name}"), prefix)?;
        Ok(m)
    }

    /// The kept manifest of `kind` `name`.
    fn kept_manifest(&self, kind: &str, name: &str) -> Result<Value, Stop> {
        let o = self
            .captured
            .iter()
            .find(|o| o.kind == kind && o.name == name)
            .ok_or_else(|| {
                stop(
                    Reason::NotRestorable,
                    format!("the backup keeps no {kind} {name}"),
                )
            })?;
        Ok(with_type(o))
    }

    /// A copy's metadata: its name, this namespace, its labels prefixed
    /// and the restore's.
    fn copy_meta(&self, m: &mut Value, name: &str, prefix: &str) -> Result<(), Stop> {
        m["metadata"]["name"] = json!(name);
        m["metadata"]["namespace"] = json!(self.ns);
        relabel(&mut m["metadata"]["labels"], prefix)?;
        for (k, v) in self.labels().as_object().into_iter().flatten() {
            m["metadata"]["labels"][k] = v.clone();
        }
        Ok(())
    }

    /// Copy `copy` of `w` must not be a member of the group it restores.
    async fn not_selected(&self, group: &str, w: &WorkloadRef, copy: &Value) -> Result<(), Stop> {
        let groups: Api<ConsistencyGroup> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let Some(g) = groups.get_opt(group).await? else {
            return Ok(());
        };
        let labels: BTreeMap<String, String> =
            serde_json::from_value(copy["spec"]["template"]["metadata"]["labels"].clone())
                .unwrap_or_default();
        for m in &g.spec.members {
            let selects = m.selector.as_ref().is_some_and(|s| {
                !s.match_labels.is_empty()
                    && s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            });
            if selects {
                return Err(stop(
                    Reason::WorkloadMismatch,
                    format!(
                        "the copy {w} would run pods that member {} of ConsistencyGroup {group} \
                         selects (its labels but stillpoint.dev/ ones are prefixed): its next \
                         backup would take them; select the members by labels the prefix changes, \
                         or write the copy by hand",
                        m.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Creates the copies; one this restore made before is kept.
    async fn create_copies(&self, copies: Vec<Value>) -> Result<(), Stop> {
        let mut made = Vec::new();
        for c in copies {
            let object: DynamicObject = serde_json::from_value(c)
                .map_err(|e| stop(Reason::NotRestorable, e.to_string()))?;
            let what = format!(
                "{} {}",
                object
                    .types
                    .as_ref()
                    .map(|t| t.kind.as_str())
                    .unwrap_or_default(),
                object.name_any()
            );
            let api = self.dynamic(&object)?;
            match api.create(&PostParams::default(), &object).await {
                Ok(_) => made.push(what),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !made.is_empty() {
            let note = format!("made copies under new names: {}", made.join(", "));
            self.ctx
                .event(&self.restore, false, Reason::Restoring, note)
                .await;
        }
        Ok(())
    }

    /// The namespaced API of `object`'s kind.
    fn dynamic(&self, object: &DynamicObject) -> Result<Api<DynamicObject>, Stop> {
        let t = object.types.clone().unwrap_or_default();
        let resource = super::content::resource_of(&t.api_version, &t.kind)
            .ok_or_else(|| stop(Reason::NotRestorable, format!("cannot copy a {}", t.kind)))?;
        Ok(Api::namespaced_with(
            self.ctx.client.clone(),
            &self.ns,
            &resource,
        ))
    }
}

/// The renames of `sources`' copies, the kept Services and ConfigMaps
/// they copy.
fn renames(
    ns: &str,
    prefix: &str,
    sources: &[Source],
    kept: &[CapturedObject],
) -> (HostRenames, BTreeSet<String>, BTreeSet<String>) {
    let mut r = HostRenames::new(ns);
    let mut services = BTreeSet::new();
    let mut maps = BTreeSet::new();
    let pod_labels: Vec<Map<String, Value>> = sources
        .iter()
        .filter_map(|s| {
            s.manifest["spec"]["template"]["metadata"]["labels"]
                .as_object()
                .cloned()
        })
        .collect();
    for svc in kept.iter().filter(|o| o.kind == "Service") {
        let Some(selector) = svc.manifest["spec"]["selector"].as_object() else {
            continue;
        };
        let selects =
            |labels: &Map<String, Value>| selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        if !selector.is_empty() && pod_labels.iter().any(selects) {
            r.service(&svc.name, &format!("{prefix}{}", svc.name));
            services.insert(svc.name.clone());
        }
    }
    for s in sources {
        let spec = &s.manifest["spec"];
        if let Some(svc) = spec["serviceName"]
            .as_str()
            .filter(|n| services.contains(*n))
            && let Some(name) = s.manifest["metadata"]["name"].as_str()
        {
            r.statefulset(name, svc, &s.copy.name);
        }
        let pod: PodSpec =
            serde_json::from_value(spec["template"]["spec"].clone()).unwrap_or_default();
        for name in config_maps(&pod) {
            if kept.iter().any(|o| o.kind == "ConfigMap" && o.name == name) {
                maps.insert(name);
            }
        }
    }
    (r, services, maps)
}

/// The restored claim of each of the original PVCs that `copy` mounts.
fn claims_of(planned: &[Planned], copy: &WorkloadRef) -> BTreeMap<String, String> {
    planned
        .iter()
        .filter(|p| p.target.as_ref() == Some(copy))
        .flat_map(|p| {
            p.volumes
                .iter()
                .map(|(v, claim)| (v.pvc.clone(), claim.clone()))
        })
        .collect()
}

/// The workload copy of `s`.
fn copy_workload(
    s: &Source,
    prefix: &str,
    renames: &HostRenames,
    maps: &BTreeSet<String>,
    claims: &BTreeMap<String, String>,
    restore_labels: Value,
) -> Result<Value, Stop> {
    let mut m = s.manifest.clone();
    m["apiVersion"] = json!("apps/v1");
    m["kind"] = json!(s.copy.kind);
    m["metadata"]["name"] = json!(s.copy.name);
    relabel(&mut m["metadata"]["labels"], prefix)?;
    for (k, v) in restore_labels.as_object().into_iter().flatten() {
        m["metadata"]["labels"][k] = v.clone();
    }
    let spec = &mut m["spec"];
    spec["replicas"] = json!(0);
    if spec["selector"]["matchExpressions"]
        .as_array()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(stop(
            Reason::WorkloadMismatch,
            format!(
                "{} selects its pods with matchExpressions, which a copy cannot be made to miss: \
                 write its copy {} by hand",
                s.manifest["metadata"]["name"].as_str().unwrap_or_default(),
                s.copy
            ),
        ));
    }
    relabel(&mut spec["selector"]["matchLabels"], prefix)?;
    relabel(&mut spec["template"]["metadata"]["labels"], prefix)?;
    if let Some(svc) = spec["serviceName"].as_str().map(String::from) {
        let renamed = renames.rename_host(&svc);
        spec["serviceName"] = json!(renamed);
    }
    let mut pod: PodSpec = serde_json::from_value(spec["template"]["spec"].clone())
        .map_err(|e| stop(Reason::NotRestorable, format!("the kept pod template: {e}")))?;
    copy_pod(&mut pod, prefix, renames, maps, claims);
    spec["template"]["spec"] =
        serde_json::to_value(pod).map_err(|e| stop(Reason::NotRestorable, e.to_string()))?;
    Ok(m)
}

/// Pod spec `pod` as its copy runs it: claims and ConfigMaps renamed, the
/// originals' hosts renamed in its containers' commands, arguments and
/// environment values.
fn copy_pod(
    pod: &mut PodSpec,
    prefix: &str,
    renames: &HostRenames,
    maps: &BTreeSet<String>,
    claims: &BTreeMap<String, String>,
) {
    let map = |name: &mut String| {
        if maps.contains(name.as_str()) {
            *name = format!("{prefix}{name}");
        }
    };
    for v in pod.volumes.iter_mut().flatten() {
        if let Some(c) = &mut v.persistent_volume_claim
            && let Some(restored) = claims.get(&c.claim_name)
        {
            c.claim_name = restored.clone();
        }
        if let Some(c) = &mut v.config_map {
            map(&mut c.name);
        }
        for s in v
            .projected
            .iter_mut()
            .flat_map(|p| p.sources.iter_mut().flatten())
        {
            if let Some(c) = &mut s.config_map {
                map(&mut c.name);
            }
        }
    }
    let containers = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for c in containers {
        for words in [c.command.as_mut(), c.args.as_mut()].into_iter().flatten() {
            rename_words(words, renames);
        }
        for e in c.env.iter_mut().flatten() {
            let host = ["HOST", "PRIMARY", "MASTER"]
                .iter()
                .any(|w| e.name.to_ascii_uppercase().contains(w));
            if let Some(v) = &mut e.value {
                *v = match host {
                    true => renames.rename_host(v),
                    false => renames.rename(v),
                };
            }
            if let Some(r) = e
                .value_from
                .as_mut()
                .and_then(|f| f.config_map_key_ref.as_mut())
            {
                map(&mut r.name);
            }
        }
        for e in c.env_from.iter_mut().flatten() {
            if let Some(r) = &mut e.config_map_ref {
                map(&mut r.name);
            }
        }
    }
}

/// A command's or arguments' words with the originals' hosts renamed: a
/// word after a host flag (`-h`, `--replicaof`, …) as a host.
fn rename_words(words: &mut [String], renames: &HostRenames) {
    let mut after_flag = false;
    for w in words.iter_mut() {
        let flag = is_host_flag(w);
        *w = match after_flag {
            true => renames.rename_host(w),
            false => renames.rename(w),
        };
        after_flag = flag;
    }
}

/// The ConfigMaps pod spec `pod` references.
fn config_maps(pod: &PodSpec) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for v in pod.volumes.iter().flatten() {
        names.extend(v.config_map.iter().map(|c| c.name.clone()));
        for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            names.extend(s.config_map.iter().map(|c| c.name.clone()));
        }
    }
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in containers {
        for e in c.env.iter().flatten() {
            let r = e
                .value_from
                .as_ref()
                .and_then(|f| f.config_map_key_ref.as_ref());
            names.extend(r.map(|r| r.name.clone()));
        }
        for e in c.env_from.iter().flatten() {
            names.extend(e.config_map_ref.as_ref().map(|r| r.name.clone()));
        }
    }
    names
}

/// Every label of `labels` (an object, or nothing) but `stillpoint.dev/`
/// ones with `prefix` before its value.
fn relabel(labels: &mut Value, prefix: &str) -> Result<(), Stop> {
    let Some(map) = labels.as_object_mut() else {
        *labels = json!({});
        return Ok(());
    };
    for (k, v) in map.iter_mut() {
        if k.starts_with("stillpoint.dev/") {
            continue;
        }
        let value = format!("{prefix}{}", v.as_str().unwrap_or_default());
        if value.len() > 63 {
            return Err(stop(
                Reason::InvalidSpec,
                format!(
                    "label {k}: {value} is longer than 63 characters: choose a shorter pvcPrefix"
                ),
            ));
        }
        *v = json!(value);
    }
    Ok(())
}

/// Kept object `o`'s manifest with its type.
fn with_type(o: &CapturedObject) -> Value {
    let mut m = o.manifest.clone();
    m["apiVersion"] = json!(o.api_version);
    m["kind"] = json!(o.kind);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(kind: &str, name: &str, manifest: Value) -> CapturedObject {
        let api_version = match kind {
            "StatefulSet" | "Deployment" => "apps/v1",
            _ => "v1",
        };
        CapturedObject {
            api_version: api_version.into(),
            kind: kind.into(),
            name: name.into(),
            manifest,
        }
    }

    fn shop() -> (Vec<Source>, Vec<CapturedObject>) {
        let sts = json!({
            "metadata": {"name": "redis-replica", "labels": {"tier": "cache"}},
            "spec": {
                "serviceName": "redis-replica",
                "replicas": 1,
                "selector": {"matchLabels": {"app": "redis-replica"}},
                "template": {
                    "metadata": {"labels": {"app": "redis-replica", "stillpoint.dev/inject": "true"}},
                    "spec": {
                        "containers": [{
                            "name": "redis",
                            "args": ["--replicaof", "redis-0.redis", "6379"],
                            "env": [
                                {"name": "PRIMARY", "value": "redis"},
                                {"name": "USER", "value": "pg"},
                                {"name": "ENGINE", "value": "redis"},
                                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cache-conf", "key": "mode"}}},
                            ],
                            "volumeMounts": [{"name": "conf", "mountPath": "/conf"}],
                        }],
                        "volumes": [
                            {"name": "conf", "configMap": {"name": "cache-conf"}},
                            {"name": "old", "persistentVolumeClaim": {"claimName": "scratch"}},
                        ],
                    },
                },
            },
        });
        let objects = vec![
            kept("StatefulSet", "redis-replica", sts.clone()),
            kept(
                "Service",
                "redis",
                json!({"metadata": {"name": "redis"}, "spec": {"clusterIP": "None", "selector": {"app": "redis"}}}),
            ),
            kept(
                "Service",
                "redis-replica",
                json!({"metadata": {"name": "redis-replica"}, "spec": {"selector": {"app": "redis-replica"}}}),
            ),
            kept(
                "Service",
                "other",
                json!({"metadata": {"name": "other"}, "spec": {"selector": {"app": "other"}}}),
            ),
            kept(
                "ConfigMap",
                "cache-conf",
                json!({"metadata": {"name": "cache-conf"}, "data": {"conf": "replicaof redis-0.redis 6379\nport 6379\n"}}),
            ),
            kept(
                "StatefulSet",
                "redis",
                json!({"metadata": {"name": "redis"}, "spec": {"serviceName": "redis", "selector": {"matchLabels": {"app": "redis"}}, "template": {"metadata": {"labels": {"app": "redis"}}, "spec": {"containers": []}}}}),
            ),
        ];
        let source = |name: &str, manifest: &Value| Source {
            copy: WorkloadRef {
                kind: "StatefulSet".into(),
                name: format!("copy-{name}"),
            },
            manifest: manifest.clone(),
            make: true,
        };
        let sources = vec![
            source("redis-replica", &sts),
            source("redis", &objects[5].manifest),
        ];
        (sources, objects)
    }

    #[test]
    fn a_copy_runs_under_new_names_and_names_the_copies_it_follows() {
        let (sources, objects) = shop();
        let (renames, services, maps) = renames("shop", "copy-", &sources, &objects);
        assert_eq!(
            services,
            BTreeSet::from(["redis".to_string(), "redis-replica".into()]),
            "the Services that select the copied pods, not the others"
        );
        assert_eq!(maps, BTreeSet::from(["cache-conf".to_string()]));
        let claims = BTreeMap::from([("scratch".to_string(), "copy-scratch".to_string())]);
        let copy = copy_workload(
            &sources[0],
            "copy-",
            &renames,
            &maps,
            &claims,
            json!({"stillpoint.dev/restore": "r"}),
        )
        .unwrap();
        let spec = &copy["spec"];
        assert_eq!(copy["metadata"]["name"], "copy-redis-replica");
        assert_eq!(
            copy["metadata"]["labels"],
            json!({"tier": "copy-cache", "stillpoint.dev/restore": "r"})
        );
        assert_eq!(spec["replicas"], 0);
        assert_eq!(spec["serviceName"], "copy-redis-replica");
        assert_eq!(
            spec["selector"]["matchLabels"],
            json!({"app": "copy-redis-replica"})
        );
        assert_eq!(
            spec["template"]["metadata"]["labels"],
            json!({"app": "copy-redis-replica", "stillpoint.dev/inject": "true"}),
            "the agent is injected into the copy again"
        );
        let c = &spec["template"]["spec"]["containers"][0];
        assert_eq!(
            c["args"],
            json!(["--replicaof", "copy-redis-0.copy-redis", "6379"])
        );
        assert_eq!(c["env"][0]["value"], "copy-redis");
        assert_eq!(c["env"][1]["value"], "pg", "not a Service of the copies");
        assert_eq!(c["env"][2]["value"], "redis", "a bare word that is no host");
        assert_eq!(
            c["env"][3]["valueFrom"]["configMapKeyRef"]["name"],
            "copy-cache-conf"
        );
        let volumes = &spec["template"]["spec"]["volumes"];
        assert_eq!(volumes[0]["configMap"]["name"], "copy-cache-conf");
        assert_eq!(
            volumes[1]["persistentVolumeClaim"]["claimName"],
            "copy-scratch"
        );
    }

    #[test]
    fn a_copy_that_cannot_miss_its_group_is_refused() {
        let (mut sources, _) = shop();
        sources[0].manifest["spec"]["selector"]["matchExpressions"] =
            json!([{"key": "app", "operator": "Exists"}]);
        let e = copy_workload(
            &sources[0],
            "copy-",
            &HostRenames::new("shop"),
            &BTreeSet::new(),
            &BTreeMap::new(),
            json!({}),
        )
        .unwrap_err();
        assert!(e.message.contains("matchExpressions"), "{}", e.message);
        let mut long = json!({"app": "x".repeat(60)});
        assert!(
            relabel(&mut long, "copy-")
                .unwrap_err()
                .message
                .contains("shorter pvcPrefix")
        );
    }
}
