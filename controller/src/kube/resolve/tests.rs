use super::agents::host_of;
use crate::core::model::{Engine, MemberSpec};
use crate::core::protocol::{copy_refusal, coverage};
use crate::core::record::ServerPath;

#[test]
fn the_host_of_an_upstream() {
    assert_eq!(host_of("10.1.2.3:5432"), "10.1.2.3");
    assert_eq!(host_of("pg-0.pg.shop.svc:5432"), "pg-0.pg.shop.svc");
    assert_eq!(host_of("[fd00::1]:6379"), "fd00::1");
    assert_eq!(host_of("rs0"), "rs0");
}

#[test]
fn a_copy_refusal_names_the_fix_in_kubernetes_words() {
    let member = MemberSpec {
        name: "maria".into(),
        agent: crate::core::model::AgentEndpoint {
            addr: "10.0.0.1:9443".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/maria".into(),
        },
        role: crate::core::model::Role::Primary,
        primary: None,
        volumes: Vec::new(),
        restore_stage: None,
        fsfreeze: false,
        accept_uncovered: Vec::new(),
    };
    let why = copy_refusal(&member, Engine::Mariadb, crate::kube::csi::COPY_FIX).unwrap();
    for needle in [
        "member maria (mariadb",
        "`fsfreeze: true` on member maria in the ConsistencyGroup",
        "stillpoint.dev/fsfreeze",
        "spec.snapshot.atomic: true",
    ] {
        assert!(why.contains(needle), "{needle}: {why}");
    }
    assert!(!why.contains("STILLPOINT_FSFREEZE_MOUNTS"), "{why}");
    let frozen = MemberSpec {
        fsfreeze: true,
        ..member
    };
    assert!(copy_refusal(&frozen, Engine::Mariadb, crate::kube::csi::COPY_FIX).is_none());
    // A gap in coverage: accepted the Kubernetes way.
    let paths = [ServerPath {
        what: "datadir".into(),
        path: "/var/lib/mysql".into(),
    }];
    let with_volume = MemberSpec {
        volumes: vec![crate::core::model::VolumeId::Pvc {
            claim: "data-maria-0".into(),
            mount_path: Some("/data".into()),
        }],
        ..frozen
    };
    let why = coverage(
        &with_volume,
        Engine::Mariadb,
        &paths,
        &[],
        crate::kube::csi::ACCEPT_GAP,
    )
    .unwrap_err();
    assert!(
        why.contains(
            "`acceptUncovered: [\"/var/lib/mysql\"]` on member maria in the ConsistencyGroup"
        ),
        "{why}"
    );
}
