//! `stillpoint-lab` as a program: its commands and their options.
//! (Cargo builds the program for these tests, so `stillpoint demo|bench`
//! find it beside `stillpoint` after `cargo test --workspace`.)

use std::process::Command;

fn lab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stillpoint-lab"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_names_the_demo_and_the_benchmarks() {
    let out = lab(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("demo") && help.contains("bench"), "{help}");
    let out = lab(&["bench", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--parts") && help.contains("--json"),
        "{help}"
    );
}

#[test]
fn unknown_commands_and_options_are_refused() {
    for args in [&["backup"][..], &["demo", "--backups", "many"]] {
        let out = lab(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

/// `stillpoint-lab bench` with `args` (its JSON into `json`), the CLI it
/// measures taken from `stillpoint` (`$STILLPOINT_BIN`).
fn bench(args: &[&str], json: &std::path::Path, stillpoint: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stillpoint-lab"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(json)
        .env("STILLPOINT_BIN", stillpoint)
        // The suite's binaries are built: no nested build.
        .env_remove("CARGO")
        .output()
        .unwrap()
}

#[test]
fn the_memory_part_runs_on_its_own_and_a_failed_part_leaves_the_others_written() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_stillpoint-lab"));
    let stillpoint = exe.with_file_name("stillpoint");
    let stillpoint = stillpoint.to_str().unwrap();
    let out = bench(&["--parts", "memory", "--channels", "8"], &json, stillpoint);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4. Controller memory"), "{stdout}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(written["memory"]["channels"], 8, "{written}");
    assert!(
        written["memory"]["rss_mib"].as_f64().unwrap() > 0.0,
        "{written}"
    );
    assert!(written.get("failed").is_none(), "{written}");

    // The CLI it measures cannot run: that part fails, the other is kept.
    let out = bench(
        &[
            "--parts",
            "fanout,memory",
            "--fanout",
            "2",
            "--runs",
            "1",
            "--channels",
            "2",
        ],
        &json,
        "/bin/false",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("1 part(s) failed: memory"), "{stderr}");
    assert!(stdout.contains("memory: FAILED"), "{stdout}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(written["fanout"].is_array(), "{written}");
    assert!(written["failed"]["memory"].is_string(), "{written}");
    assert!(written.get("memory").is_none(), "{written}");
}
