//! Where a volume's files are, as this agent sees them: the coverage check
//! compares the server's paths with these roots.
//!
//! Operators name a member's volume as their snapshotter knows it: a
//! directory (btrfs, a CSI mount), a block device (an LVM volume such as
//! `/dev/vg/pg`, a loop device) or a filesystem image attached to a loop
//! device. A directory is its own root. A block device's roots are its mount
//! points in `/proc/self/mountinfo`, found by device number or by source
//! path (btrfs reports an anonymous device number). An image's roots are
//! those of every loop device whose backing file it is
//! (`/sys/block/loop*/loop/backing_file`). Read on the agent's side because
//! that is where the database and its mounts are; the controller may run
//! elsewhere.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where `volume`'s files are (see the module docs); empty when it is a
/// device or image mounted nowhere this agent sees.
pub fn roots(volume: &Path) -> Vec<PathBuf> {
    let Ok(meta) = std::fs::metadata(volume) else {
        return vec![volume.to_path_buf()];
    };
    let kind = meta.file_type();
    if !kind.is_block_device() && !kind.is_file() {
        return vec![volume.to_path_buf()];
    }
    // Only a device's or an image's roots need the mount table.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if kind.is_block_device() {
        mounts_of(&mountinfo, volume, meta.rdev())
    } else {
        loop_devices_of(volume)
            .iter()
            .flat_map(|device| {
                let rdev = std::fs::metadata(device).map(|m| m.rdev()).unwrap_or(0);
                mounts_of(&mountinfo, device, rdev)
            })
            .collect()
    }
}

/// The mount points of block device `device` (device number `rdev`).
fn mounts_of(mountinfo: &str, device: &Path, rdev: u64) -> Vec<PathBuf> {
    let device = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let (major, minor) = (libc_major(rdev), libc_minor(rdev));
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in mountinfo.lines().filter_map(Entry::parse) {
        let by_number = entry.major_minor == (major, minor);
        let by_source = std::fs::canonicalize(&entry.source).is_ok_and(|s| s == device);
        if (by_number || by_source) && !found.contains(&entry.mount_point) {
            found.push(entry.mount_point);
        }
    }
    found
}

/// The loop devices backed by `image`.
fn loop_devices_of(image: &Path) -> Vec<PathBuf> {
    let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    devices
        .flatten()
        .filter_map(|d| {
            let name = d.file_name().to_string_lossy().to_string();
            let backing = std::fs::read_to_string(d.path().join("loop/backing_file")).ok()?;
            // The kernel may append " (deleted)"; such an image is not ours.
            (Path::new(backing.trim_end()) == image).then(|| PathBuf::from("/dev").join(name))
        })
        .collect()
}

// The kernel's encoding of device numbers (glibc's gnu_dev_major/minor).
fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    major_minor: (u64, u64),
    mount_point: PathBuf,
    source: String,
}

impl Entry {
    /// `id parent major:minor root mount-point options [optional...] - fstype source super-options`
    fn parse(line: &str) -> Option<Entry> {
        let mut fields = line.split_whitespace();
        let (_, _, numbers, _, mount_point) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let (major, minor) = numbers.split_once(':')?;
        let mut rest = fields.skip_while(|f| *f != "-").skip(1);
        let (_fstype, source) = (rest.next()?, rest.next()?);
        Some(Entry {
            major_minor: (major.parse().ok()?, minor.parse().ok()?),
            mount_point: PathBuf::from(unescape(mount_point)),
            source: unescape(source),
        })
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_optional_fields_and_escapes() {
        let line = "36 35 253:3 / /srv/pg\\040data rw,noatime shared:1 master:2 - ext4 /dev/mapper/vg-pg rw";
        assert_eq!(
            Entry::parse(line),
            Some(Entry {
                major_minor: (253, 3),
                mount_point: PathBuf::from("/srv/pg data"),
                source: "/dev/mapper/vg-pg".into(),
            })
        );
        assert_eq!(Entry::parse("garbage"), None);
    }

    #[test]
    fn a_device_is_found_by_its_number_or_its_source() {
        let mountinfo = "\
36 35 253:3 / /srv/pg rw - ext4 /dev/mapper/vg-pg rw
37 35 0:45 / /srv/btrfs rw - btrfs /dev/loop9 rw
38 35 253:4 / /srv/other rw - ext4 /dev/mapper/vg-other rw";
        let dev = |major: u64, minor: u64| ((major & 0xfff) << 8) | (minor & 0xff);
        assert_eq!(
            mounts_of(mountinfo, Path::new("/dev/nonexistent-x"), dev(253, 3)),
            vec![PathBuf::from("/srv/pg")]
        );
        assert!(mounts_of(mountinfo, Path::new("/dev/nonexistent-x"), dev(8, 1)).is_empty());
    }

    #[test]
    fn a_directory_is_its_own_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(roots(dir.path()), vec![dir.path().to_path_buf()]);
        let missing = dir.path().join("not-yet");
        assert_eq!(roots(&missing), vec![missing.clone()]);
    }
}
