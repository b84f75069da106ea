//! Database servers run locally as their service users: the restored
//! servers `stillpoint restore --start` brings up, stage by stage, on free
//! local ports, and the process helpers they are built from.
//!
//! Each server runs in a temp dir of its own (on btrfs, each owned dir is a
//! subvolume) as the Debian service user (`postgres`, `mysql`, `redis`)
//! when run as root, and is stopped and its run files removed on drop; a
//! restored data directory itself is kept.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod mariadb;
pub mod postgres;
pub mod redis;

/// Size of each block-layout volume (sparse).
const BLOCK_VOLUME_MB: u64 = 512;

/// A temp dir for one cluster, readable by the service users, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    /// On btrfs, every owned dir is a subvolume (snapshottable on its own).
    subvolumes: bool,
    /// Data directories on loop-mounted images ([`Scratch::use_block_volumes`]).
    block: bool,
    mounts: std::sync::Mutex<Vec<PathBuf>>,
}

impl Scratch {
    pub fn new(what: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), what)
    }

    /// A scratch dir under `base` (e.g. a btrfs mount).
    pub fn new_in(base: &Path, what: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stillpoint-{what}-"))
            .tempdir_in(base)
            .context("creating a temp dir")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let subvolumes = is_btrfs(base);
        Ok(Scratch {
            dir,
            subvolumes,
            block: false,
            mounts: Default::default(),
        })
    }

    /// Puts every data directory on its own loop-mounted ext4 filesystem
    /// (see [`Scratch::data_dir`]); needs root and `mkfs.ext4`.
    pub fn use_block_volumes(&mut self) -> Result<()> {
        require(&["mkfs.ext4"], "e2fsprogs")?;
        if !is_root() {
            bail!("the block layout loop-mounts filesystems, which needs root");
        }
        self.block = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a server's data directory `name`, owned by `user`: an owned
    /// dir, or in the block layout `data` on a new loop-mounted filesystem
    /// (`name.vol`, its image `name.vol.img`).
    pub fn data_dir(&self, name: &str, user: Option<&ServiceUser>) -> Result<PathBuf> {
        if !self.block {
            return self.owned_dir(name, user);
        }
        let volume = self.dir.path().join(format!("{name}.vol"));
        let image = self.dir.path().join(format!("{name}.vol.img"));
        std::fs::File::create(&image)?.set_len(BLOCK_VOLUME_MB << 20)?;
        run(
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image),
            "mkfs.ext4",
        )?;
        std::fs::create_dir(&volume)?;
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&volume),
            "mount -o loop",
        )?;
        self.mounts.lock().unwrap().push(volume.clone());
        std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o755))?;
        let data = volume.join("data");
        std::fs::create_dir(&data)?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = user {
            std::os::unix::fs::chown(&data, Some(user.uid), Some(user.gid))?;
        }
        Ok(data)
    }

    /// The volume a data directory is on: its loop mount in the block
    /// layout, the directory itself otherwise.
    pub fn volume_of(&self, data: &Path) -> PathBuf {
        match data.parent() {
            Some(mount) if self.block && self.mounts.lock().unwrap().iter().any(|m| m == mount) => {
                mount.to_path_buf()
            }
            _ => data.to_path_buf(),
        }
    }

    /// Unmounts the block layout's filesystems (the servers must be
    /// stopped). Idempotent.
    pub fn release(&self) {
        for mount in self.mounts.lock().unwrap().drain(..) {
            let _ = Command::new("umount")
                .arg(&mount)
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Creates `name` inside, owned by `user` (when running as root).
    pub fn owned_dir(&self, name: &str, user: Option<&ServiceUser>) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        if self.subvolumes {
            run(
                Command::new("btrfs")
                    .args(["subvolume", "create"])
                    .arg(&path),
                "btrfs subvolume create",
            )?;
        } else {
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        if let Some(user) = user {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {} to {}", path.display(), user.name))?;
        }
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether `path` is on a btrfs filesystem.
pub fn is_btrfs(path: &Path) -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "btrfs")
}

/// Removes a tree that may hold btrfs subvolumes (`rm -rf` cannot remove a
/// subvolume on every kernel; deleting it as a subvolume always works).
pub fn remove_tree(path: &Path) {
    if is_btrfs(path)
        && let Ok(entries) = std::fs::read_dir(path)
    {
        {
            for entry in entries.flatten() {
                let p = entry.path();
                let is_subvolume = Command::new("btrfs")
                    .args(["subvolume", "show"])
                    .arg(&p)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if is_subvolume {
                    let _ = Command::new("btrfs")
                        .args(["subvolume", "delete"])
                        .arg(&p)
                        .stdout(Stdio::null())
                        .status();
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(path);
}

/// One running database server.
pub trait Server {
    /// Its main process, while it runs.
    fn pid(&self) -> Option<u32>;
    /// Stops it (cleanly if it can, killed if it must). Idempotent.
    fn stop(&self);
}

/// The last lines of a server's log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "last lines of {}:\n{}",
        log.display(),
        lines[lines.len().saturating_sub(20)..].join("\n")
    )
}

/// A system user that a server runs as.
#[derive(Debug, Clone)]
pub struct ServiceUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The user to run a server as: `name` when we are root, nobody else otherwise.
pub fn service_user(name: &str) -> Result<Option<ServiceUser>> {
    if !is_root() {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, name]).output()?;
        if !out.status.success() {
            bail!(
                "system user '{name}' does not exist; it comes with the server's Debian package \
                 (see .ci/run)"
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok(Some(ServiceUser {
        name: name.to_string(),
        uid: id("-u")?,
        gid: id("-g")?,
    }))
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A command that runs as `user` (if any), in `dir`.
pub fn command_as(program: &Path, user: Option<&ServiceUser>, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).stdin(Stdio::null());
    if let Some(user) = user {
        cmd.uid(user.uid)
            .gid(user.gid)
            .env("HOME", dir)
            .env("USER", &user.name);
    }
    cmd
}

/// Runs a command to completion; a failure carries its output.
pub fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// Finds an installed program, or says which Debian package provides it.
pub fn require(candidates: &[&str], package: &str) -> Result<PathBuf> {
    for candidate in candidates {
        let path = Path::new(candidate);
        if path.is_absolute() {
            if path.is_file() {
                return Ok(path.to_path_buf());
            }
            continue;
        }
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let full = Path::new(dir).join(candidate);
            if full.is_file() {
                return Ok(full);
            }
        }
        for dir in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
            let full = Path::new(dir).join(candidate);
            if full.is_file() {
                return Ok(full);
            }
        }
    }
    Err(anyhow!(
        "{} not found: install it with `apt-get install -y {package}` (.ci/run does this)",
        candidates[0]
    ))
}

/// A free TCP port on 127.0.0.1 for a server to bind next, never one
/// handed out before in this process.
///
/// Not the kernel's `bind(…:0)`: that port is free only until the listener
/// closes, and as it comes from the ephemeral range, any outgoing
/// connection of any process may take it as its local port before the
/// server binds it (a MariaDB replica was seen to fail so: "Address already
/// in use"). Ports below the ephemeral range are never taken that way.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = ephemeral_start();
    if low < FIRST_PORT + 1000 {
        return kernel_port();
    }
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = fastrand::u16(FIRST_PORT..low);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    kernel_port()
}

/// Where [`free_port`] starts looking.
const FIRST_PORT: u16 = 10000;

/// The first port of the kernel's ephemeral range (32768 unless set).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn kernel_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Polls `check` until it returns true, at most `bound`.
pub fn wait_for(
    what: &str,
    bound: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + bound;
    let mut last_err = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("{what}: not within {bound:?}")),
                None => anyhow!("{what}: not within {bound:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A server process this code started and owns (not daemonized).
#[derive(Debug, Default)]
pub struct ServerProcess(std::sync::Mutex<Option<std::process::Child>>);

impl ServerProcess {
    pub fn set(&self, child: std::process::Child) {
        *self.0.lock().unwrap() = Some(child);
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.0
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.id())
            .filter(|pid| pid_alive(*pid))
    }

    /// Fails if the process has already exited.
    pub fn ensure_running(&self, what: &str) -> Result<()> {
        if let Some(child) = self.0.lock().unwrap().as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{what} exited ({status})");
        }
        Ok(())
    }

    /// Asks it to stop (`ask`), waits up to `bound`, then kills it. Idempotent.
    pub fn stop(&self, what: &str, bound: Duration, ask: impl FnOnce()) {
        let Some(mut child) = self.0.lock().unwrap().take() else {
            return;
        };
        ask();
        let exited = wait_for(what, bound, || Ok(child.try_wait()?.is_some()));
        if exited.is_err() {
            kill_and_wait(child.id());
        }
        let _ = child.wait();
    }
}

/// Sends a signal with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Kills `pid` and waits (bounded) until it is gone.
pub fn kill_and_wait(pid: u32) {
    if pid_alive(pid) {
        signal(pid, "KILL");
        let _ = wait_for("process exit", Duration::from_secs(5), || {
            Ok(!pid_alive(pid))
        });
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_never_given_twice() {
        let low = ephemeral_start();
        assert!(low >= FIRST_PORT + 1000, "ephemeral range starts at {low}");
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        for port in ports {
            assert!(
                (FIRST_PORT..low).contains(&port),
                "{port} is in the ephemeral range"
            );
        }
    }
}
