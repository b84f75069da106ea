//! A loop-mounted ext4 image, for filesystem freezes that never touch the
//! filesystem the tests run on. Thawed, unmounted and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::servers::{require, run};

#[derive(Debug)]
pub struct LoopMount {
    /// Removed on drop, after the unmount (none for [`LoopMount::image`]).
    _dir: Option<tempfile::TempDir>,
    mount: PathBuf,
}

impl LoopMount {
    /// Creates and mounts an ext4 image of `size_mb` MiB (needs root).
    pub fn ext4(size_mb: u32) -> Result<Self> {
        require(&["fsfreeze"], "util-linux")?;
        Self::make("mkfs.ext4", "e2fsprogs", &["-q", "-F"], size_mb)
    }

    /// Creates and mounts a btrfs image of `size_mb` MiB (at least 128; needs root).
    pub fn btrfs(size_mb: u32) -> Result<Self> {
        require(&["btrfs"], "btrfs-progs")?;
        Self::make("mkfs.btrfs", "btrfs-progs", &["-q", "-f"], size_mb.max(128))
    }

    fn make(mkfs: &str, package: &str, args: &[&str], size_mb: u32) -> Result<Self> {
        if !crate::servers::is_root() {
            bail!("loop-mounting a filesystem needs root");
        }
        let mkfs = require(&[mkfs], package)?;
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-loopfs-")
            .tempdir()?;
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount)?;
        std::fs::File::create(&image)?.set_len(u64::from(size_mb) << 20)?;
        run(Command::new(&mkfs).args(args).arg(&image), "mkfs")?;
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mount),
            "mount -o loop",
        )?;
        Ok(LoopMount {
            _dir: Some(dir),
            mount,
        })
    }

    /// Mounts an existing filesystem image at `mount` (created if missing);
    /// unmounted on drop, the image kept. Needs root.
    pub fn image(image: &Path, mount: &Path) -> Result<Self> {
        if !crate::servers::is_root() {
            bail!("loop-mounting a filesystem needs root");
        }
        std::fs::create_dir_all(mount)?;
        run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(mount),
            "mount -o loop",
        )?;
        Ok(LoopMount {
            _dir: None,
            mount: mount.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Thaws the mount whatever froze it (`fsfreeze -u`; an error means it
    /// was not frozen).
    pub fn force_thaw(&self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mount)
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// Starts a writer that blocks while the filesystem is frozen.
    pub fn writer(&self, name: &str) -> std::process::Child {
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", self.mount.join(name).display()))
            .args(["bs=4096", "count=4", "conv=fsync", "status=none"])
            .spawn()
            .expect("starting dd")
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // A frozen filesystem would hang the unmount and every writer: thaw first.
        self.force_thaw();
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}
