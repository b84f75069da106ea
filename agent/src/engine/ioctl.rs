//! `FIFREEZE` / `FITHAW`: the only `unsafe` in the agent.
//!
//! Freezing a filesystem has no safe wrapper in std or libc's Rust surface;
//! it is an ioctl on a descriptor of the mount point. The calls are unsafe
//! only because `ioctl` is variadic FFI: the descriptor is owned and open
//! for the whole call and the argument is an integer, so no memory is shared.
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
