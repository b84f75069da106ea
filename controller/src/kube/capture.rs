//! The application's own objects, kept with a backup so that a restore can
//! rebuild it in an empty namespace.
//!
//! For each member's workload (its StatefulSet or Deployment; a pod run by
//! neither gives only what its spec references): the workload, its
//! ServiceAccount (not `default`), the ConfigMaps and Secrets its pod
//! template references (env, envFrom, volumes, projected volumes, image
//! pull Secrets, and the DSN Secret the injector reads), the Services that
//! select its pods, and the PVCs of its snapshots; and the ConsistencyGroup
//! itself. Each is cleaned of what the cluster sets (see [`clean`]).
//!
//! Not kept: cluster-scoped objects (StorageClasses, ClusterRoles,
//! PersistentVolumes: the snapshots stand for those), RBAC objects of the
//! namespace, other workloads and their objects, objects of other
//! operators' CRDs, a namespace's own `kube-root-ca.crt` and the
//! injector's `stillpoint-ca` ConfigMaps (made again there), and
//! ServiceAccount token Secrets (the cluster makes them).
//!
//! A Secret's data never goes into the content (a custom resource anyone
//! who may list contents reads): it is returned apart, for the Secret the
//! controller keeps in its own namespace.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, Secret, Service,
    ServiceAccount,
};
use kube::api::{Api, ListParams};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::kube::crd::{BackupMember, CapturedObject, ConsistencyGroup};
use crate::kube::inject::{AGENT_CONTAINER, CA_BUNDLE_CONFIGMAP, INJECTED_ANNOTATION};

/// What a backup keeps of its application.
#[derive(Debug, Default)]
pub struct Captured {
    /// In the order a restore creates them.
    pub objects: Vec<CapturedObject>,
    /// Each captured Secret's data, by the Secret's name.
    pub secret_data: BTreeMap<String, BTreeMap<String, ByteString>>,
}

/// The order a restore creates kinds in: what a pod needs before the
/// workloads, the group last.
const ORDER: &[&str] = &[
    "ServiceAccount",
    "ConfigMap",
    "Secret",
    "Service",
    "PersistentVolumeClaim",
    "StatefulSet",
    "Deployment",
    "ConsistencyGroup",
];

/// What the members' pod templates reference.
#[derive(Debug, Default)]
struct References {
    service_accounts: BTreeSet<String>,
    config_maps: BTreeSet<String>,
    secrets: BTreeSet<String>,
    /// Each template's pod labels (a Service selecting them is kept).
    pod_labels: Vec<BTreeMap<String, String>>,
}

/// Reads what a backup of `group` in `ns` with `members` keeps.
pub async fn capture(
    client: &kube::Client,
    ns: &str,
    group: &str,
    members: &[BackupMember],
) -> Result<Captured, kube::Error> {
    let mut captured = Captured::default();
    let mut refs = References::default();
    let workloads: BTreeSet<(String, String)> = members
        .iter()
        .filter_map(|m| m.workload.as_ref())
        .map(|w| (w.kind.clone(), w.name.clone()))
        .collect();
    for (kind, name) in &workloads {
        if let Some(template) = workload(client, ns, kind, name, &mut captured).await? {
            refs.add(&template);
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for m in members.iter().filter(|m| m.workload.is_none()) {
        if let Some(pod) = pods.get_opt(&m.pod).await? {
            refs.add(&PodTemplateSpec {
                metadata: Some(pod.metadata),
                spec: pod.spec,
            });
        }
    }
    refs.read(client, ns, &mut captured).await?;
    claims(client, ns, members, &mut captured).await?;
    let groups: Api<ConsistencyGroup> = Api::namespaced(client.clone(), ns);
    if let Some(g) = groups.get_opt(group).await? {
        captured.push(&g)?;
    }
    captured.objects.sort_by_key(|o| {
        let rank = ORDER
            .iter()
            .position(|k| *k == o.kind)
            .unwrap_or(ORDER.len());
        (rank, o.name.clone())
    });
    Ok(captured)
}

/// Keeps workload `kind`/`name`; returns its pod template.
async fn workload(
    client: &kube::Client,
    ns: &str,
    kind: &str,
    name: &str,
    captured: &mut Captured,
) -> Result<Option<PodTemplateSpec>, kube::Error> {
    match kind {
        "StatefulSet" => {
            let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
            let Some(sts) = api.get_opt(name).await? else {
                return Ok(None);
            };
            captured.push(&sts)?;
            Ok(sts.spec.map(|s| s.template))
        }
        "Deployment" => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
            let Some(d) = api.get_opt(name).await? else {
                return Ok(None);
            };
            captured.push(&d)?;
            Ok(d.spec.map(|s| s.template))
        }
        _ => Ok(None),
    }
}

/// Keeps the PVCs the members' snapshots were taken of.
async fn claims(
    client: &kube::Client,
    ns: &str,
    members: &[BackupMember],
    captured: &mut Captured,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let names: BTreeSet<&str> = members
        .iter()
        .flat_map(|m| &m.volume_snapshots)
        .filter(|v| v.part.is_none())
        .map(|v| v.pvc.as_str())
        .collect();
    for name in names {
        if let Some(pvc) = api.get_opt(name).await? {
            captured.push(&pvc)?;
        }
    }
    Ok(())
}

impl References {
    /// Notes what `template` references.
    fn add(&mut self, template: &PodTemplateSpec) {
        let meta = template.metadata.clone().unwrap_or_default();
        self.pod_labels.push(meta.labels.unwrap_or_default());
        if let Some(dsn) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get("stillpoint.dev/dsn-secret"))
        {
            self.secrets.insert(dsn.clone());
        }
        if let Some(spec) = &template.spec {
            self.add_spec(spec);
        }
    }

    fn add_spec(&mut self, spec: &PodSpec) {
        if let Some(sa) = spec
            .service_account_name
            .as_ref()
            .filter(|s| *s != "default")
        {
            self.service_accounts.insert(sa.clone());
        }
        for s in spec.image_pull_secrets.iter().flatten() {
            self.secrets.insert(s.name.clone());
        }
        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for c in containers.filter(|c| c.name != AGENT_CONTAINER) {
            for e in c.env.iter().flatten() {
                let from = e.value_from.as_ref();
                if let Some(r) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                    self.config_maps.insert(r.name.clone());
                }
                if let Some(r) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                    self.secrets.insert(r.name.clone());
                }
            }
            for e in c.env_from.iter().flatten() {
                if let Some(r) = &e.config_map_ref {
                    self.config_maps.insert(r.name.clone());
                }
                if let Some(r) = &e.secret_ref {
                    self.secrets.insert(r.name.clone());
                }
            }
        }
        for v in spec.volumes.iter().flatten() {
            if let Some(c) = &v.config_map {
                self.config_maps.insert(c.name.clone());
            }
            if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                self.secrets.insert(name);
            }
            let sources = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
            for s in sources {
                if let Some(c) = &s.config_map {
                    self.config_maps.insert(c.name.clone());
                }
                if let Some(c) = &s.secret {
                    self.secrets.insert(c.name.clone());
                }
            }
        }
        self.config_maps.remove("kube-root-ca.crt");
        self.config_maps.remove(CA_BUNDLE_CONFIGMAP);
    }

    /// Reads and keeps what was referenced, and the Services that select
    /// the pods. A reference to an object that does not exist (an
    /// optional one) keeps nothing.
    async fn read(
        &self,
        client: &kube::Client,
        ns: &str,
        captured: &mut Captured,
    ) -> Result<(), kube::Error> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        for name in &self.service_accounts {
            if let Some(sa) = accounts.get_opt(name).await? {
                captured.push(&sa)?;
            }
        }
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        for name in &self.config_maps {
            if let Some(cm) = maps.get_opt(name).await? {
                captured.push(&cm)?;
            }
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        for name in &self.secrets {
            match secrets.get_opt(name).await? {
                Some(s) if s.type_.as_deref() != Some("kubernetes.io/service-account-token") => {
                    captured.push_secret(s)?
                }
                _ => {}
            }
        }
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        for svc in services.list(&ListParams::default()).await? {
            if self.selected(&svc) {
                captured.push(&svc)?;
            }
        }
        Ok(())
    }

    /// Whether `svc` selects the pods of a member's template.
    fn selected(&self, svc: &Service) -> bool {
        let selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        !selector.is_empty()
            && self
                .pod_labels
                .iter()
                .any(|labels| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

impl Captured {
    /// Keeps `object`, cleaned.
    fn push<K>(&mut self, object: &K) -> Result<(), kube::Error>
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let value = serde_json::to_value(object).map_err(kube::Error::SerdeError)?;
        self.objects.push(CapturedObject {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            name: object.meta().name.clone().unwrap_or_default(),
            manifest: clean(value),
        });
        Ok(())
    }

    /// Keeps Secret `s`: its data apart from its manifest.
    fn push_secret(&mut self, mut s: Secret) -> Result<(), kube::Error> {
        let mut data = s.data.take().unwrap_or_default();
        for (k, v) in s.string_data.take().unwrap_or_default() {
            data.insert(k, ByteString(v.into_bytes()));
        }
        let name = s.metadata.name.clone().unwrap_or_default();
        self.secret_data.insert(name, data);
        self.push(&s)
    }
}

/// `object` without what the cluster sets: `status`; of its metadata all
/// but name, labels and annotations (and of these, those the cluster or
/// kubectl wrote); a Service's cluster IPs (but `None`, which makes it
/// headless) and node ports; a PVC's volume and data source; a
/// ServiceAccount's token Secrets; an injected agent in a pod template.
pub fn clean(mut object: Value) -> Value {
    let Some(o) = object.as_object_mut() else {
        return object;
    };
    o.remove("status");
    if let Some(meta) = o.get_mut("metadata") {
        *meta = clean_meta(meta);
    }
    let kind = o
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match kind.as_str() {
        "Service" => clean_service(o),
        "PersistentVolumeClaim" => {
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                for k in ["volumeName", "dataSource", "dataSourceRef"] {
                    spec.remove(k);
                }
            }
        }
        "ServiceAccount" => {
            o.remove("secrets");
        }
        "Secret" => {
            o.remove("data");
            o.remove("stringData");
        }
        "StatefulSet" | "Deployment" => clean_workload(o),
        _ => {}
    }
    object
}

/// Annotations the cluster, kubectl or the injector write.
fn cluster_set(annotation: &str) -> bool {
    annotation == "kubectl.kubernetes.io/last-applied-configuration"
        || annotation == "deployment.kubernetes.io/revision"
        || annotation == INJECTED_ANNOTATION
        || annotation.starts_with("pv.kubernetes.io/")
        || annotation.starts_with("volume.kubernetes.io/")
        || annotation.starts_with("volume.beta.kubernetes.io/")
}

fn clean_meta(meta: &Value) -> Value {
    let mut kept = Map::new();
    for k in ["name", "labels"] {
        if let Some(v) = meta.get(k) {
            kept.insert(k.into(), v.clone());
        }
    }
    if let Some(a) = meta.get("annotations").and_then(Value::as_object) {
        let a: Map<String, Value> = a
            .iter()
            .filter(|(k, _)| !cluster_set(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !a.is_empty() {
            kept.insert("annotations".into(), Value::Object(a));
        }
    }
    Value::Object(kept)
}

fn clean_service(o: &mut Map<String, Value>) {
    let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    spec.remove("clusterIP");
    spec.remove("clusterIPs");
    spec.remove("healthCheckNodePort");
    if headless {
        spec.insert("clusterIP".into(), Value::from("None"));
    }
    for port in spec
        .get_mut("ports")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(p) = port.as_object_mut() {
            p.remove("nodePort");
        }
    }
}

fn clean_workload(o: &mut Map<String, Value>) {
    let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(t) = spec.get_mut("template").and_then(Value::as_object_mut) {
        // An agent the injector put there (a template copied from an
        // injected pod) is injected again; one written into the template
        // by hand is the application's own.
        let injected = t
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(INJECTED_ANNOTATION))
            .is_some();
        if let Some(meta) = t.get_mut("metadata") {
            *meta = clean_meta(meta);
        }
        let containers = t
            .get_mut("spec")
            .and_then(|s| s.get_mut("containers"))
            .and_then(Value::as_array_mut);
        if let Some(cs) = containers.filter(|_| injected) {
            cs.retain(|c| c.get("name").and_then(Value::as_str) != Some(AGENT_CONTAINER));
        }
    }
    for claim in spec
        .get_mut("volumeClaimTemplates")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(c) = claim.as_object_mut() {
            c.remove("status");
            if let Some(meta) = c.get_mut("metadata") {
                *meta = clean_meta(meta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_service_keeps_its_spec_but_not_what_the_cluster_assigned() {
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                "creationTimestamp": "2026-01-01T00:00:00Z", "managedFields": [{}],
                "labels": {"app": "db"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}},
            "spec": {"clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7"], "type": "NodePort",
                "selector": {"app": "db"}, "ports": [{"port": 5432, "nodePort": 30001}]},
            "status": {"loadBalancer": {}}
        });
        let want = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "labels": {"app": "db"}, "annotations": {"team": "a"}},
            "spec": {"type": "NodePort", "selector": {"app": "db"}, "ports": [{"port": 5432}]}
        });
        assert_eq!(clean(svc), want);
    }

    #[test]
    fn a_headless_service_stays_headless() {
        let svc = json!({"kind": "Service", "metadata": {"name": "db"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}});
        assert_eq!(clean(svc)["spec"], json!({"clusterIP": "None"}));
    }

    #[test]
    fn a_claim_loses_its_volume_and_binding_annotations() {
        let pvc = json!({"kind": "PersistentVolumeClaim",
            "metadata": {"name": "data-db-0", "annotations": {
                "pv.kubernetes.io/bind-completed": "yes",
                "volume.kubernetes.io/storage-provisioner": "x"}},
            "spec": {"volumeName": "pv-1", "storageClassName": "fast",
                "dataSource": {"kind": "VolumeSnapshot", "name": "s"}}});
        assert_eq!(
            clean(pvc),
            json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "data-db-0"},
                "spec": {"storageClassName": "fast"}})
        );
    }

    #[test]
    fn a_workload_loses_the_injected_agent_and_its_claims_their_status() {
        let sts = json!({"kind": "StatefulSet", "metadata": {"name": "db", "generation": 3},
            "spec": {"template": {"metadata": {"creationTimestamp": null,
                    "annotations": {"stillpoint.dev/engine": "postgres", INJECTED_ANNOTATION: "1"}},
                "spec": {"containers": [{"name": "postgres"}, {"name": AGENT_CONTAINER}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "status": {"phase": "Pending"}}]},
            "status": {"replicas": 1}});
        assert_eq!(
            clean(sts),
            json!({"kind": "StatefulSet", "metadata": {"name": "db"},
                "spec": {"template": {"metadata": {"annotations": {"stillpoint.dev/engine": "postgres"}},
                    "spec": {"containers": [{"name": "postgres"}]}},
                    "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}})
        );
    }

    #[test]
    fn an_agent_written_into_the_template_by_hand_is_kept() {
        let sts = json!({"kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"template": {"spec": {"containers": [{"name": "postgres"}, {"name": AGENT_CONTAINER}]}}}});
        assert_eq!(clean(sts.clone()), sts);
    }

    #[test]
    fn a_template_references_what_its_pods_read() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "db"},
                "annotations": {"stillpoint.dev/dsn-secret": "db-dsn"}},
            "spec": {
                "serviceAccountName": "db",
                "imagePullSecrets": [{"name": "pull"}],
                "containers": [{"name": "db",
                    "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "a"}}},
                            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "b"}}}],
                    "envFrom": [{"configMapRef": {"name": "cm-from"}}, {"secretRef": {"name": "s-from"}}]}],
                "initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
                "volumes": [
                    {"name": "c", "configMap": {"name": "cm-vol"}},
                    {"name": "s", "secret": {"secretName": "s-vol"}},
                    {"name": "r", "configMap": {"name": "kube-root-ca.crt"}},
                    {"name": "p", "projected": {"sources": [
                        {"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}]}
        }))
        .unwrap();
        let mut refs = References::default();
        refs.add(&template);
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(refs.service_accounts, set(&["db"]));
        assert_eq!(
            refs.config_maps,
            set(&["cm-env", "cm-from", "cm-proj", "cm-vol"])
        );
        assert_eq!(
            refs.secrets,
            set(&[
                "db-dsn", "pull", "s-env", "s-from", "s-init", "s-proj", "s-vol"
            ])
        );
        let svc = |sel: Value| -> Service {
            serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"selector": sel}}))
                .unwrap()
        };
        assert!(refs.selected(&svc(json!({"app": "db"}))));
        assert!(!refs.selected(&svc(json!({"app": "web"}))));
        assert!(!refs.selected(&svc(json!({}))));
    }
}
