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
