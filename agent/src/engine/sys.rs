//! `FIFREEZE` / `FITHAW`, `syncfs(2)` and `kill(2)` on a process group: the
//! only `unsafe` in the agent.
//!
//! Freezing a filesystem, syncing one filesystem and signalling a process
//! group have no safe wrapper in std or libc's Rust surface (std signals
//! only its own children, one process at a time). The first two are calls
//! on a descriptor of a path on that filesystem, the third takes two
//! integers. They are unsafe only because they are FFI (`ioctl` is
//! variadic): the descriptor is owned and open for the whole call and the
//! other arguments are integers, so no memory is shared.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOWR('X', 119, int)`
const FIFREEZE: u32 = 0xC004_5877;
/// `_IOWR('X', 120, int)`
const FITHAW: u32 = 0xC004_5878;

fn ioctl(path: &Path, request: u32) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call and
    // the third argument is a plain integer the kernel ignores.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at `path` (needs CAP_SYS_ADMIN).
pub fn freeze(path: &Path) -> io::Result<()> {
    ioctl(path, FIFREEZE)
}

/// Thaws it. `EINVAL` means it was not frozen.
pub fn thaw(path: &Path) -> io::Result<()> {
    ioctl(path, FITHAW)
}

/// Writes every dirty page and inode of the filesystem holding `path` to
/// its device (`syncfs(2)`; no privilege needed). Returns when the device
/// has them.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: `file` is an open descriptor for the duration of the call;
    // syncfs takes nothing else.
    let rc = unsafe { libc::syncfs(file.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to every process of the process group `pgid`. A `pgid`
/// of 0 (which `kill(2)` reads as the caller's own group) or one that does
/// not fit a `pid_t` signals nothing. A group already gone is not an error.
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 0 {
        return;
    }
    // SAFETY: two integers; a negative pid names a process group.
    let _ = unsafe { libc::kill(-pgid, signal) };
}
