//! The agent binary refuses a bad configuration: every problem listed, exit 64.

use std::process::{Command, Output};

fn agent(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stillpoint-agent"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("running stillpoint-agent")
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_64() {
    let secret = "postgres://app:hunter2@db:5432/app";
    let out = agent(
        &[
            ("STILLPOINT_ENGINE", "oracle"),
            ("STILLPOINT_LISTEN_ADDR", "not-an-address"),
            ("STILLPOINT_ADMIN_ADDR", "127.0.0.1:99999"),
            ("STILLPOINT_TLS_CERT", "/nonexistent/tls.crt"),
            ("STILLPOINT_TLS_KEY", "/nonexistent/tls.key"),
            ("STILLPOINT_TLS_CA", "/nonexistent/ca.crt"),
            ("STILLPOINT_CONTROLLER_IDENTITY", "https://controller"),
            ("STILLPOINT_MAX_TTL", "forever"),
            ("STILLPOINT_FREEZE_TIMEOUT", "0s"),
            ("STILLPOINT_LOG_FORMAT", "xml"),
            ("STILLPOINT_DSN", secret),
            ("STILLPOINT_DSN_FILE", "/nonexistent/dsn"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "STILLPOINT_ENGINE",
        "STILLPOINT_LISTEN_ADDR",
        "STILLPOINT_ADMIN_ADDR",
        "STILLPOINT_TLS_CERT",
        "STILLPOINT_TLS_KEY",
        "STILLPOINT_TLS_CA",
        "STILLPOINT_CONTROLLER_IDENTITY",
        "STILLPOINT_MAX_TTL",
        "STILLPOINT_FREEZE_TIMEOUT",
        "STILLPOINT_LOG_FORMAT",
        "STILLPOINT_DSN_FILE",
    ] {
        assert!(stderr.contains(key), "{key} not reported in:\n{stderr}");
    }
    assert!(
        stderr.contains("12 problem(s)") || stderr.matches("\n  - ").count() >= 11,
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the DSN leaked into the error output:\n{stderr}"
    );
}

#[test]
fn missing_required_settings_are_named() {
    let out = agent(&[], &[]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STILLPOINT_ENGINE is required"), "{stderr}");
    assert!(
        stderr.contains("STILLPOINT_CONTROLLER_IDENTITY is required"),
        "{stderr}"
    );
}

#[test]
fn command_line_arguments_are_refused() {
    // Credentials must never travel on the command line, so nothing does.
    let out = agent(&[], &["--dsn", "postgres://x:y@z/db"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("environment variables"));
}

#[test]
fn help_lists_every_key() {
    let out = agent(&[], &["--help"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for key in stillpoint_agent::config::ALL_KEYS {
        assert!(stdout.contains(key), "{key} missing from --help");
    }
}

#[test]
fn a_bad_dsn_is_refused_at_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, "placeholder").unwrap();
        path.to_str().unwrap().to_string()
    };
    let (cert, key, ca) = (file("tls.crt"), file("tls.key"), file("ca.crt"));
    for (engine, dsn) in [
        ("postgres", "host=db password=hunter2 port=notaport"),
        ("mysql", "mysql://app:hunter2@db:notaport/app"),
        ("redis", "redis://app:hunter2@db:notaport"),
        ("mongodb", "http://app:hunter2@db"),
    ] {
        let out = agent(
            &[
                ("STILLPOINT_ENGINE", engine),
                ("STILLPOINT_DSN", dsn),
                ("STILLPOINT_TLS_CERT", &cert),
                ("STILLPOINT_TLS_KEY", &key),
                ("STILLPOINT_TLS_CA", &ca),
                ("STILLPOINT_CONTROLLER_IDENTITY", "spiffe://t/ns/a/sa/b"),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(64), "{engine}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("not a usable {engine} connection string")),
            "{stderr}"
        );
        assert!(
            !stderr.contains("hunter2"),
            "{engine} leaked the DSN:\n{stderr}"
        );
    }
}

#[test]
fn database_engines_need_a_dsn_and_fsfreeze_needs_mounts() {
    let out = agent(&[("STILLPOINT_ENGINE", "postgres")], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a connection string"));
    let out = agent(&[("STILLPOINT_ENGINE", "fsfreeze")], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("STILLPOINT_FSFREEZE_MOUNTS"));
    let out = agent(&[("STILLPOINT_ENGINE", "exec")], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("STILLPOINT_EXEC_COMMAND"));
}
