//! `cargo xtask demo` and `cargo xtask test`: the README's two commands;
//! `cargo xtask docs`: the book in `docs/`, built into `target/book`.
//!
//! Both first make sure this machine has what they need: the Debian
//! packages of the real servers and tools (installed with `apt-get` when
//! run as root; otherwise the exact command is printed and nothing runs),
//! and, for the tests, the Python MongoDB wire peer; and the Kubernetes
//! lab's upstream binaries and the chart's tools (prometheus, promtool,
//! helm), built from their Go modules (`tests/k8s/build.sh`,
//! `tests/k8s/tools.sh`, cached outside the tree, so a warm run costs a
//! second). Then `demo`
//! builds the workspace and runs `stillpoint demo`, and `test` runs the
//! whole suite (`cargo test --workspace`, extra arguments passed on).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// What the demo needs: the servers it runs, btrfs for its snapshots.
const DEMO_PACKAGES: &[&str] = &[
    "postgresql",
    "mariadb-server",
    "mariadb-client",
    "redis-server",
    "btrfs-progs",
    "e2fsprogs",
    "util-linux",
];

/// What the tests need on top: pip for the MongoDB wire peer; for the
/// Kubernetes lab, iproute2 (network namespaces), curl (readiness checks)
/// and util-linux (unshare, nsenter, setpriv).
const TEST_PACKAGES: &[&str] = &["python3-pip", "iproute2", "curl"];

/// The oldest Go the Kubernetes lab's modules build with.
const GO_MINOR: u32 = 26;

/// The MongoDB wire peer's Python modules (PyPI).
const PYTHON_MODULES: &[(&str, &str)] = &[("mockupdb", "mockupdb"), ("pymongo", "pymongo")];

const USAGE: &str =
    "usage: cargo xtask demo [--backups N]   install what is missing, build, run the demo
       cargo xtask test [ARGS...]      install what is missing, run the whole test suite
                                       (ARGS go to `cargo test --workspace`)
       cargo xtask docs                build the book in docs/ into target/book";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("demo") => demo(args.collect()),
        Some("test") => test(args.collect()),
        Some("docs") => docs(),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the missing Debian packages (as root), or says how.
fn packages(wanted: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        return Err(format!(
            "missing Debian packages: {}. Install them as root:\n    {command}",
            missing.join(" ")
        ));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Installs the MongoDB wire peer's modules for `python3` when missing.
fn python_modules() -> Result<(), String> {
    let missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (PyPI)", missing.join(" "));
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(extra)
            .args(&missing)
            .status()
            .is_ok_and(|s| s.success())
    };
    // Debian's own python3 refuses system-wide installs (PEP 668) unless told.
    if pip(&[]) || pip(&["--break-system-packages"]) {
        Ok(())
    } else {
        Err(format!(
            "installing {} failed: run `python3 -m pip install {}`",
            missing.join(" "),
            missing.join(" ")
        ))
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

fn demo(args: Vec<String>) -> Result<(), String> {
    if !is_root() {
        return Err(
            "the demo loop-mounts a btrfs image and runs database servers as their service \
             users: run `cargo xtask demo` as root"
                .into(),
        );
    }
    packages(DEMO_PACKAGES)?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let bin = workspace().join("target/debug/stillpoint");
    run(Command::new(bin).arg("demo").args(args))
}

/// Checks that Go is new enough, then builds (or finds cached) the lab.
fn kubernetes_lab() -> Result<(), String> {
    let version = Command::new("go").arg("version").output().map_err(|_| {
        format!(
            "the Kubernetes lab is built from Go modules: install Go 1.{GO_MINOR} or newer \
                 (https://go.dev/dl) and put `go` on the PATH"
        )
    })?;
    let text = String::from_utf8_lossy(&version.stdout).to_string();
    let minor = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("go1."))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok())
        .unwrap_or(0);
    if minor < GO_MINOR {
        return Err(format!(
            "{} is too old for the Kubernetes lab: Go 1.{GO_MINOR} or newer is needed",
            text.trim()
        ));
    }
    eprintln!("xtask: the Kubernetes lab's binaries (built once, then cached)");
    run(Command::new(workspace().join("tests/k8s/build.sh")).stdout(std::process::Stdio::null()))?;
    eprintln!(
        "xtask: prometheus, promtool and helm for the chart's tests (built once, then cached)"
    );
    run(Command::new(workspace().join("tests/k8s/tools.sh")).stdout(std::process::Stdio::null()))
}

fn test(args: Vec<String>) -> Result<(), String> {
    let all: Vec<&str> = DEMO_PACKAGES.iter().chain(TEST_PACKAGES).copied().collect();
    packages(&all)?;
    python_modules()?;
    kubernetes_lab()?;
    run(cargo().args(["test", "--workspace"]).args(args))
}

/// Builds the book (`docs/book.toml` puts it in `target/book`).
fn docs() -> Result<(), String> {
    let book = mdbook::MDBook::load(workspace().join("docs"))
        .map_err(|e| format!("loading the book in docs/: {e:#}"))?;
    book.build()
        .map_err(|e| format!("building the book: {e:#}"))?;
    eprintln!(
        "xtask: the book is in {}",
        workspace().join("target/book/index.html").display()
    );
    Ok(())
}
