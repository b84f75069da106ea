use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};
use serde_json::json;

use super::plan::{Planned, ordinal, replicas_up_to, restored_pvc, validate};
use super::positions::{compare, exact, reached};
use super::prepare::restricted;
use super::{DEFAULT_PREFIX, DEFAULT_STAGE_TIMEOUT};
use crate::kube::crd::{BackupMember, GroupRestore, GroupRestoreSpec, WorkloadRef};
use crate::kube::reason::Reason;

fn sts(name: &str) -> WorkloadRef {
    WorkloadRef {
        kind: "StatefulSet".into(),
        name: name.into(),
    }
}

#[test]
fn a_statefulsets_claims_are_renamed_for_its_copy() {
    let w = sts("pg");
    assert_eq!(
        restored_pvc("data-pg-0", Some(&w), Some(0), Some("restored-")),
        "data-restored-pg-0"
    );
    assert_eq!(
        restored_pvc("wal-pg-12", Some(&w), Some(12), Some("r-")),
        "wal-r-pg-12"
    );
    // Not a claim of its templates: prefixed.
    assert_eq!(
        restored_pvc("shared", Some(&w), Some(0), Some("restored-")),
        "restored-shared"
    );
    assert_eq!(
        restored_pvc("data-app", None, None, Some("restored-")),
        "restored-data-app"
    );
    // In place: the same names.
    assert_eq!(
        restored_pvc("data-pg-0", Some(&w), Some(0), None),
        "data-pg-0"
    );
    assert_eq!(ordinal("pg-replica-3", "pg-replica"), Some(3));
    assert_eq!(ordinal("pg-replica-3", "pg"), None);
}

fn member(pod: &str, stage: u32, role: &str, w: &WorkloadRef) -> Planned {
    Planned {
        rec: BackupMember {
            pod: pod.into(),
            role: Some(role.into()),
            restore_stage: stage,
            workload: Some(w.clone()),
            ..Default::default()
        },
        target: Some(w.clone()),
        ordinal: ordinal(pod, &w.name),
        restored_pod: None,
        volumes: Vec::new(),
        wal_part: None,
    }
}

#[test]
fn a_workload_grows_step_by_step() {
    // One StatefulSet: its primary (0) starts before its replica (1).
    let pg = sts("pg");
    let cache = WorkloadRef {
        kind: "Deployment".into(),
        name: "cache".into(),
    };
    let planned = vec![
        member("pg-0", 2, "primary", &pg),
        member("pg-1", 2, "replica", &pg),
        member("cache-abc", 3, "standalone", &cache),
    ];
    assert_eq!(replicas_up_to(&planned, &pg, None), 0);
    assert_eq!(replicas_up_to(&planned, &pg, Some((2, false))), 1);
    assert_eq!(replicas_up_to(&planned, &pg, Some((2, true))), 2);
    assert_eq!(replicas_up_to(&planned, &cache, Some((2, true))), 0);
    assert_eq!(replicas_up_to(&planned, &cache, Some((3, false))), 1);
}

#[test]
fn the_deploy_example_reads_as_a_group_restore() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/restore.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let restore = text
        .split("\n---\n")
        .find(|d| d.contains("kind: GroupRestore"))
        .unwrap();
    let r: GroupRestore = serde_yaml::from_str(restore).unwrap();
    assert_eq!(r.spec.pvc_prefix.as_deref(), Some(DEFAULT_PREFIX));
    assert!(!r.spec.in_place && !r.spec.volumes_only);
    let sts: StatefulSet = serde_yaml::from_str(text.split("\n---\n").next().unwrap()).unwrap();
    assert_eq!(sts.metadata.name.as_deref(), Some("restored-pg"));
    assert_eq!(sts.spec.unwrap().replicas, Some(0));
}

#[test]
fn a_spec_that_cannot_be_meant_is_refused_with_why() {
    let spec = |yaml: &str| -> GroupRestoreSpec { serde_yaml::from_str(yaml).unwrap() };
    assert_eq!(
        validate(&spec("{backup: b}")).unwrap(),
        DEFAULT_STAGE_TIMEOUT
    );
    assert_eq!(
        validate(&spec("{backup: b, stageTimeout: 90s}")).unwrap(),
        Duration::from_secs(90)
    );
    for (yaml, says) in [
        (
            "{backup: b, inPlace: true, volumesOnly: true}",
            "running pods still use",
        ),
        ("{backup: b, pvcPrefix: ''}", "pvcPrefix is empty"),
        ("{backup: b, stageTimeout: 0s}", "longer than zero"),
        ("{backup: b, stageTimeout: soon}", "stageTimeout \"soon\""),
        ("{}", "exactly one of"),
        ("{backup: b, content: c}", "exactly one of"),
        ("{content: c, inPlace: true}", "original names"),
        ("{content: c, pvcPrefix: ''}", "pvcPrefix is empty"),
    ] {
        let e = validate(&spec(yaml)).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidSpec);
        assert!(e.message.contains(says), "{yaml}: {}", e.message);
    }
    assert!(validate(&spec("{content: c}")).is_ok());
    assert!(validate(&spec("{content: c, pvcPrefix: copy-}")).is_ok());
    // In place, an empty prefix is beside the point.
    assert!(validate(&spec("{backup: b, inPlace: true, pvcPrefix: ''}")).is_ok());
}

#[test]
fn the_preparation_pod_is_restricted_and_runs_as_the_database() {
    let (pod, container) = restricted(
        Some(PodSecurityContext {
            fs_group: Some(999),
            ..Default::default()
        }),
        Some(SecurityContext {
            run_as_user: Some(999),
            ..Default::default()
        }),
    );
    assert_eq!(pod["fsGroup"], 999);
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(container["runAsUser"], 999);
    assert_eq!(container["allowPrivilegeEscalation"], false);
    assert_eq!(container["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["runAsNonRoot"], true);
    let (pod, container) = restricted(None, None);
    assert_eq!(pod["runAsNonRoot"], true);
    assert_eq!(container["readOnlyRootFilesystem"], true);
}

#[test]
fn positions_are_compared_by_engine() {
    assert_eq!(reached("postgres", "0/3000060", "0/3000060"), Some(true));
    assert_eq!(reached("postgres", "0/2FFFFFF", "0/3000060"), Some(false));
    assert_eq!(reached("postgres", "1/0", "0/FFFFFFFF"), Some(true));
    assert_eq!(reached("mariadb", "0-1-10,1-2-5", "0-1-9"), Some(true));
    assert_eq!(reached("mariadb", "0-1-8", "0-1-9"), Some(false));
    assert_eq!(reached("redis", "x", "y"), None);
    // As the agents show them: with binlog coordinates.
    let shown = "gtid '0-1-10' (binlog.000002:4)";
    assert_eq!(
        reached("mariadb", shown, "gtid '0-1-9' (binlog.000002:1)"),
        Some(true)
    );
    assert_eq!(
        compare("mariadb", shown, "0-1-10"),
        Some(std::cmp::Ordering::Equal)
    );
    let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
    let other = "4e11fa47-71ca-11e1-9e33-c80aa9429562";
    let set = |s: &str| format!("gtid '{s}' (binlog.000001:4)");
    assert_eq!(
        reached(
            "mysql",
            &set(&format!("{uuid}:1-9")),
            &format!("{uuid}:1-5")
        ),
        Some(true)
    );
    // Each lacks what the other has: not at the recorded position.
    assert_eq!(
        reached(
            "mysql",
            &set(&format!("{uuid}:1-9")),
            &format!("{uuid}:1-5,{other}:1")
        ),
        Some(false)
    );
    assert!(exact("mariadb") && exact("mysql") && !exact("postgres"));
}
