//! `FIFREEZE` / `FITHAW` and `syncfs(2)`: the only `unsafe` in the agent.
//!
//! Freezing a filesystem and syncing one filesystem have no safe wrapper in
//! std or libc's Rust surface; both are calls on a descriptor of a path on
//! that filesystem. They are unsafe only because they are FFI (`ioctl` is
//! variadic): the descriptor is owned and open for the whole call and the
//! only other argument is an integer, so no memory is shared.
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
