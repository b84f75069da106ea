//! A backup's record carried to another cluster on the same storage:
//! `stillpoint backup export` writes a GroupBackupContent (and its kept
//! Secret) as one YAML document, a `v1` `List`; `stillpoint backup
//! import` creates them in another cluster, where a GroupRestore naming
//! the content restores it.
//!
//! - The content goes as it is recorded, cleaned of what a cluster sets
//!   (uid, resourceVersion, finalizers, managedFields, status).
//! - Its kept Secret goes with the members' artefacts (PostgreSQL's
//!   `backup_label`: a restore needs them) and, only with
//!   `--include-secrets`, the captured Secrets' data.
//! - Imported, a content is always `deletionPolicy: Retain`: the storage's
//!   snapshots belong to the cluster that took them, and deleting the
//!   imported record never deletes them. Its kept Secret goes into the
//!   importing controller's namespace, owned by the content.
//! - A `csi-group` content is carried with the handle of its group
//!   snapshot (a restore binds the members through it, see
//!   `restore::groups`); one that does not record it is refused.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::{Value, json};

use crate::kube::content::{
    ARTEFACT_KEY, SECRET_KEY, SOURCE_NAMESPACE_LABEL, keep_secret, mark_ready,
};
use crate::kube::crd::{DeletionPolicy, GroupBackupContent, ObjectRef};

/// What goes wrong carrying a content.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("not an exported backup: {0}")]
    NotExported(String),
    #[error(
        "GroupBackupContent {0} exists in this cluster already: it was imported before, or is \
         this cluster's own; delete it first to import it again"
    )]
    Exists(String),
    #[error(
        "GroupBackupContent {0} was cut as a group snapshot (csi-group) but does not record the \
         group snapshot's handle, which another cluster needs to bind its members: take the \
         backup again with this version, or with snapshot driver csi"
    )]
    GroupSnapshot(String),
    #[error("{0}")]
    Api(#[from] kube::Error),
}

/// The export of `content`, with the data of its kept Secret `kept`
/// (captured Secrets' data only with `include_secrets`).
pub fn export(
    content: &GroupBackupContent,
    kept: &BTreeMap<String, ByteString>,
    include_secrets: bool,
) -> Value {
    let name = content.name_any();
    let mut items = vec![json!({
        "apiVersion": "stillpoint.dev/v1alpha1",
        "kind": "GroupBackupContent",
        "metadata": {"name": name, "labels": content.labels()},
        "spec": content.spec,
    })];
    let data: BTreeMap<&String, &ByteString> = kept
        .iter()
        .filter(|(k, _)| {
            k.starts_with(ARTEFACT_KEY) || (include_secrets && k.starts_with(SECRET_KEY))
        })
        .collect();
    if !data.is_empty() {
        items.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": "Opaque",
            "data": data,
        }));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The content and kept data of an export (as [`export`] writes it).
pub fn parse(
    document: &Value,
) -> Result<(GroupBackupContent, BTreeMap<String, ByteString>), TransferError> {
    let items = document["items"]
        .as_array()
        .filter(|_| document["kind"] == "List")
        .ok_or_else(|| TransferError::NotExported("not a v1 List".into()))?;
    let of_kind = |kind: &str| items.iter().find(|i| i["kind"] == kind);
    let content = of_kind("GroupBackupContent")
        .ok_or_else(|| TransferError::NotExported("it holds no GroupBackupContent".into()))?;
    let content: GroupBackupContent = serde_json::from_value(content.clone())
        .map_err(|e| TransferError::NotExported(format!("its GroupBackupContent: {e}")))?;
    let kept = match of_kind("Secret") {
        Some(s) => serde_json::from_value::<Secret>(s.clone())
            .map_err(|e| TransferError::NotExported(format!("its Secret: {e}")))?
            .data
            .unwrap_or_default(),
        None => BTreeMap::new(),
    };
    Ok((content, kept))
}

/// Whether another cluster can bind `content`'s snapshots: a `csi-group`
/// one only with its group snapshot's handle.
pub fn carriable(content: &GroupBackupContent) -> Result<(), TransferError> {
    let unbindable = content
        .spec
        .members
        .iter()
        .flat_map(|m| m.volumes.iter())
        .any(|v| v.group_snapshot_handle.is_none());
    match !content.spec.volume_group_snapshot_contents.is_empty() && unbindable {
        true => Err(TransferError::GroupSnapshot(content.name_any())),
        false => Ok(()),
    }
}

/// `content` as it is created in the importing cluster: Retain, its kept
/// Secret in `namespace` if there is kept data, nothing a cluster set.
pub fn imported(
    content: &GroupBackupContent,
    kept: &BTreeMap<String, ByteString>,
    namespace: &str,
) -> GroupBackupContent {
    let name = content.name_any();
    let mut spec = content.spec.clone();
    spec.deletion_policy = DeletionPolicy::Retain;
    spec.kept_secret = (!kept.is_empty()).then(|| ObjectRef {
        namespace: namespace.to_string(),
        name: name.clone(),
    });
    let mut labels = content.labels().clone();
    labels.insert(SOURCE_NAMESPACE_LABEL.into(), spec.source.namespace.clone());
    GroupBackupContent {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// Creates an export's content, Ready, and its kept Secret in `namespace`
/// (owned by the content); returns the content's name.
pub async fn import(
    client: &kube::Client,
    document: &Value,
    namespace: &str,
) -> Result<String, TransferError> {
    let (content, kept) = parse(document)?;
    carriable(&content)?;
    let content = imported(&content, &kept, namespace);
    let name = content.name_any();
    let api: Api<GroupBackupContent> = Api::all(client.clone());
    let made = match api.create(&PostParams::default(), &content).await {
        Ok(made) => made,
        Err(kube::Error::Api(e)) if e.code == 409 => return Err(TransferError::Exists(name)),
        Err(e) => return Err(e.into()),
    };
    if let Some(at) = &made.spec.kept_secret {
        keep_secret(client, &made, at, kept).await?;
    }
    mark_ready(&api, &made).await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> GroupBackupContent {
        serde_json::from_value(json!({
            "apiVersion": "stillpoint.dev/v1alpha1",
            "kind": "GroupBackupContent",
            "metadata": {
                "name": "shop.gbc-1", "uid": "u", "resourceVersion": "7",
                "finalizers": ["stillpoint.dev/content"],
                "labels": {SOURCE_NAMESPACE_LABEL: "shop"},
            },
            "spec": {
                "source": {"namespace": "shop", "name": "nightly", "uid": "1"},
                "group": "shop", "deletionPolicy": "Delete",
                "keptSecret": {"namespace": "stillpoint-system", "name": "shop.gbc-1"},
            },
            "status": {"phase": "Ready"},
        }))
        .unwrap()
    }

    fn kept() -> BTreeMap<String, ByteString> {
        [
            ("artefact.pg-0.backup_label", "label"),
            ("secret.shop-password", "{\"PASSWORD\":\"czNjcmV0\"}"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    #[test]
    fn an_export_carries_the_artefacts_and_the_secrets_only_when_asked() {
        let without = export(&content(), &kept(), false);
        let (c, data) = parse(&without).unwrap();
        assert_eq!(c.name_any(), "shop.gbc-1");
        assert!(c.metadata.uid.is_none() && c.metadata.finalizers.is_none());
        assert!(c.status.is_none());
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["artefact.pg-0.backup_label"]
        );
        let with = export(&content(), &kept(), true);
        assert_eq!(parse(&with).unwrap().1, kept());
    }

    #[test]
    fn an_imported_content_is_retained_and_keeps_its_secret_where_it_is_imported() {
        let c = imported(&content(), &kept(), "backup-system");
        assert_eq!(c.spec.deletion_policy, DeletionPolicy::Retain);
        let at = c.spec.kept_secret.clone().unwrap();
        assert_eq!(
            (at.namespace.as_str(), at.name.as_str()),
            ("backup-system", "shop.gbc-1")
        );
        assert_eq!(c.labels()[SOURCE_NAMESPACE_LABEL], "shop");
        let none = imported(&content(), &BTreeMap::new(), "backup-system");
        assert!(none.spec.kept_secret.is_none());
    }

    #[test]
    fn a_group_snapshot_is_carried_only_with_its_handle() {
        let mut c = content();
        assert!(carriable(&c).is_ok());
        c.spec.volume_group_snapshot_contents = vec!["groupcontent-1".into()];
        c.spec.members = serde_json::from_value(json!([{"pod": "pg-0", "volumes": [
            {"pvc": "data-pg-0", "volumeSnapshot": "s", "snapshotHandle": "h", "driver": "d"}
        ]}]))
        .unwrap();
        let err = carriable(&c).unwrap_err().to_string();
        assert!(
            err.contains("does not record the group snapshot's handle"),
            "{err}"
        );
        c.spec.members[0].volumes[0].group_snapshot_handle = Some("g".into());
        assert!(carriable(&c).is_ok());
    }

    #[test]
    fn what_is_not_an_export_is_refused_with_what_it_lacks() {
        let err = parse(&json!({"kind": "List", "items": []})).unwrap_err();
        assert!(err.to_string().contains("no GroupBackupContent"), "{err}");
        let err = parse(&json!({"kind": "Secret"})).unwrap_err();
        assert!(err.to_string().contains("not a v1 List"), "{err}");
    }
}
