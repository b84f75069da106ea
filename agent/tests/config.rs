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
