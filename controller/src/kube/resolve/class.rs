//! The group's snapshot class: it exists, serves every driver of the
//! group's PVCs, and says (or the group says) whether its snapshots are
//! point-in-time.

use std::collections::BTreeSet;

use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;

use super::{Resolver, Verdict};
use crate::kube::crd::{ATOMIC_ANNOTATION, ConsistencyGroup, SnapshotDriver, SnapshotSettings};
use crate::kube::reason::Reason;

impl Resolver {
    /// The group's snapshot class exists and serves every driver of its
    /// PVCs; returns whether its snapshots are point-in-time.
    pub(super) async fn check_class(
        &self,
        group: &ConsistencyGroup,
        drivers: &BTreeSet<String>,
    ) -> Result<bool, Verdict> {
        let s = &group.spec.snapshot;
        let kind = self.class_kind(s).await?;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind.resource);
        let what = kind.what;
        let classes = api
            .list(&ListParams::default())
            .await
            .map_err(|e| Verdict::no(Reason::APIError, format!("listing {what}es: {e}")))?
            .items;
        let used = match &kind.named {
            Some(name) => vec![named(&classes, name, what, drivers)?],
            None => defaults(&classes, &kind, drivers)?,
        };
        atomicity(s.atomic, &used, what)
    }

    /// The kind of class the group's driver takes, and the one it names.
    async fn class_kind(&self, s: &SnapshotSettings) -> Result<ClassKind, Verdict> {
        Ok(match s.driver {
            SnapshotDriver::Csi => ClassKind {
                resource: ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass"),
                    "volumesnapshotclasses",
                ),
                named: s.volume_snapshot_class_name.clone(),
                default_annotation: "snapshot.storage.kubernetes.io/is-default-class",
                what: "VolumeSnapshotClass",
            },
            SnapshotDriver::CsiGroup => {
                let served = crate::kube::csi::volume_group_snapshot_resource(&self.client)
                    .await
                    .map_err(|e| Verdict::no(Reason::NoSnapshotClass, e))?;
                let gvk = GroupVersionKind::gvk(
                    "groupsnapshot.storage.k8s.io",
                    &served.version,
                    "VolumeGroupSnapshotClass",
                );
                ClassKind {
                    resource: ApiResource::from_gvk_with_plural(&gvk, "volumegroupsnapshotclasses"),
                    named: s.volume_group_snapshot_class_name.clone(),
                    default_annotation: "groupsnapshot.storage.kubernetes.io/is-default-class",
                    what: "VolumeGroupSnapshotClass",
                }
            }
        })
    }
}

/// A kind of snapshot class: its resource, the class the group names (if
/// any), the annotation that makes one a driver's default, and its name.
struct ClassKind {
    resource: ApiResource,
    named: Option<String>,
    default_annotation: &'static str,
    what: &'static str,
}

fn driver_of(c: &DynamicObject) -> String {
    c.data["driver"].as_str().unwrap_or_default().to_string()
}

/// The class `name`: it exists and serves every driver.
fn named<'c>(
    classes: &'c [DynamicObject],
    name: &str,
    what: &str,
    drivers: &BTreeSet<String>,
) -> Result<&'c DynamicObject, Verdict> {
    let Some(class) = classes
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
    else {
        return Err(Verdict::no(
            Reason::NoSnapshotClass,
            format!("{what} {name} does not exist"),
        ));
    };
    let driver = driver_of(class);
    if let Some(other) = drivers.iter().find(|d| **d != driver) {
        return Err(Verdict::no(
            Reason::ClassDriverMismatch,
            format!(
                "{what} {name} is for driver {driver}, but the group has PVCs of driver {other}"
            ),
        ));
    }
    Ok(class)
}

/// Each driver's default class, when the group names none.
fn defaults<'c>(
    classes: &'c [DynamicObject],
    kind: &ClassKind,
    drivers: &BTreeSet<String>,
) -> Result<Vec<&'c DynamicObject>, Verdict> {
    let (what, annotation) = (kind.what, kind.default_annotation);
    let mut used = Vec::new();
    for d in drivers {
        let default = classes.iter().find(|c| {
            driver_of(c) == *d
                && c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation))
                    .map(String::as_str)
                    == Some("true")
        });
        let Some(default) = default else {
            return Err(Verdict::no(
                Reason::NoSnapshotClass,
                format!(
                    "no {what} is named in the group's snapshot settings and none is the default for driver {d} \
                     (annotation {annotation}: \"true\")"
                ),
            ));
        };
        used.push(default);
    }
    Ok(used)
}

/// Whether snapshots of `classes` are point-in-time: the group's word
/// (`spec.snapshot.atomic`), else every class's annotation. Never assumed.
fn atomicity(spec: Option<bool>, classes: &[&DynamicObject], what: &str) -> Result<bool, Verdict> {
    if let Some(atomic) = spec {
        return Ok(atomic);
    }
    let said: Vec<(String, Option<bool>)> = classes
        .iter()
        .map(|c| {
            let value = c
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ATOMIC_ANNOTATION))
                .and_then(|v| v.parse::<bool>().ok());
            (c.metadata.name.clone().unwrap_or_default(), value)
        })
        .collect();
    match said
        .iter()
        .map(|(_, v)| *v)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()[..]
    {
        [Some(atomic)] => Ok(atomic),
        _ => {
            let names: Vec<&str> = said.iter().map(|(n, _)| n.as_str()).collect();
            Err(Verdict::no(
                Reason::AtomicityUnknown,
                format!(
                    "whether the snapshots of {what} {} are point-in-time is not known, and a backup's \
                     consistency depends on it: set spec.snapshot.atomic in the group (true for block \
                     storage that snapshots at an instant, false for drivers that copy files, such as \
                     hostpath), or annotate the class {ATOMIC_ANNOTATION}: \"true\" or \"false\"",
                    names.join(", ")
                ),
            ))
        }
    }
}
