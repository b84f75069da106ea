//! `stillpoint certs` as a user runs it.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn stillpoint(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stillpoint"))
        .args(args)
        .output()
        .expect("running stillpoint")
}

#[test]
fn init_and_issue_write_keys_0600_and_never_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let leaf = dir.path().join("agent");
    let ca_arg = ca.to_str().unwrap();
    let leaf_arg = leaf.to_str().unwrap();
    assert!(
        stillpoint(&["certs", "init", "--out", ca_arg])
            .status
            .success()
    );
    let uri = "spiffe://stillpoint.local/ns/db/sa/pg-0";
    let issue = [
        "certs", "issue", "--ca", ca_arg, "--uri", uri, "--dns", "pg-0.db", "--out", leaf_arg,
    ];
    let out = stillpoint(&issue);
    assert!(out.status.success(), "{out:?}");
    for key in [ca.join("ca.key"), leaf.join("tls.key")] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let before = std::fs::read(leaf.join("tls.crt")).unwrap();
    let again = stillpoint(&issue);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(leaf.join("tls.crt")).unwrap(),
        before,
        "nothing was overwritten"
    );
    let forced: Vec<&str> = issue.iter().copied().chain(["--force"]).collect();
    assert!(stillpoint(&forced).status.success());
    assert_ne!(std::fs::read(leaf.join("tls.crt")).unwrap(), before);
}

#[test]
fn a_non_spiffe_identity_is_refused_with_the_expected_form() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    assert!(
        stillpoint(&["certs", "init", "--out", ca.to_str().unwrap()])
            .status
            .success()
    );
    let out = stillpoint(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--uri",
        "db-admin",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spiffe://"));
}
