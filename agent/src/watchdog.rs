//! The watchdog: a child process (this binary, re-run with
//! [`WATCHDOG_ENV`] set) that undoes what the agent holds if the agent dies.
//!
//! The agent writes lines to the watchdog's stdin:
//! `freeze <path>` / `thaw <path>` for frozen mounts and `group <pgid>` /
//! `ungroup <pgid>` for exec hold commands. When the pipe closes — the agent
//! exited or was killed — the watchdog thaws every mount and terminates
//! every process group still listed, then exits.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::sys;

/// Environment variable that starts this binary as the watchdog.
pub const WATCHDOG_ENV: &str = "STILLPOINT_INTERNAL_WATCHDOG";

/// The watchdog's main loop. Returns the exit code.
pub fn run() -> i32 {
    let mut mounts: Vec<PathBuf> = Vec::new();
    let mut groups: Vec<u32> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("freeze", path)) => mounts.push(PathBuf::from(path)),
            Some(("thaw", path)) => mounts.retain(|p| p != Path::new(path)),
            Some(("group", pgid)) => groups.extend(pgid.parse::<u32>().ok()),
            Some(("ungroup", pgid)) => groups.retain(|g| pgid.parse() != Ok(*g)),
            _ => {}
        }
    }
    for path in &mounts {
        match sys::thaw(path) {
            Ok(()) => eprintln!(
                "stillpoint-agent watchdog: the agent is gone; thawed {}",
                path.display()
            ),
            Err(e) => eprintln!("stillpoint-agent watchdog: thawing {}: {e}", path.display()),
        }
    }
    for pgid in &groups {
        sys::signal_group(*pgid, libc::SIGTERM);
    }
    if !groups.is_empty() {
        std::thread::sleep(Duration::from_secs(1));
        for pgid in &groups {
            sys::signal_group(*pgid, libc::SIGKILL);
        }
        eprintln!("stillpoint-agent watchdog: the agent is gone; ended hold commands {groups:?}");
    }
    0
}

#[derive(Debug)]
struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

static WATCHDOG: Mutex<Option<Watchdog>> = Mutex::new(None);

/// Tells the watchdog one line, starting it first if it is not running.
pub fn tell(line: &str) -> std::io::Result<()> {
    let mut guard = WATCHDOG.lock().unwrap_or_else(|p| p.into_inner());
    let alive = guard
        .as_mut()
        .is_some_and(|w| matches!(w.child.try_wait(), Ok(None)));
    if !alive {
        let mut child = Command::new(std::env::current_exe()?)
            .env(WATCHDOG_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        *guard = Some(Watchdog { child, stdin });
    }
    let w = guard.as_mut().expect("running");
    writeln!(w.stdin, "{line}")?;
    w.stdin.flush()
}
