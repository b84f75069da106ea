//! Restore mode (`stillpoint-agent restore`): run once, before PostgreSQL
//! starts (as an init container, or the native sidecar's first step), on a
//! data directory restored from a backup whose consistency method is
//! `backup-label` (a class whose snapshots are not atomic):
//!
//! 1. the WAL up to the backup stop, from the backup's `pg_wal` part
//!    (`STILLPOINT_RESTORE_WAL_FROM`), is copied over `pg_wal/`;
//! 2. `tablespace_map` and then `backup_label` are written from the
//!    backup's artefacts (`STILLPOINT_RESTORE_FROM`, files
//!    `<member>.backup_label` and `<member>.tablespace_map`, as the
//!    backup's artefacts Secret holds them).
//!
//! The label is written last, so its presence means the directory is
//! prepared. A directory that has `backup_label` (prepared) or
//! `backup_label.old` (PostgreSQL already recovered from it) is left as it
//! is: preparing it again after PostgreSQL ran would make it replay from
//! the backup's checkpoint over newer data.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The data directory to prepare.
pub const ENV_RESTORE_DATA_DIR: &str = "STILLPOINT_RESTORE_DATA_DIR";
/// Where the backup's artefacts are (the artefacts Secret, mounted).
pub const ENV_RESTORE_FROM: &str = "STILLPOINT_RESTORE_FROM";
/// The member (pod) whose artefacts to take: `<member>.backup_label`.
pub const ENV_RESTORE_MEMBER: &str = "STILLPOINT_RESTORE_MEMBER";
/// Optional: the `pg_wal` directory of the backup's WAL part.
pub const ENV_RESTORE_WAL_FROM: &str = "STILLPOINT_RESTORE_WAL_FROM";

/// What restore mode works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    pub data_dir: PathBuf,
    pub artefacts: PathBuf,
    pub member: String,
    pub wal_from: Option<PathBuf>,
}

impl RestoreConfig {
    /// Reads the configuration, collecting every problem.
    pub fn from_source(get: impl Fn(&str) -> Option<String>) -> Result<RestoreConfig, Vec<String>> {
        let mut problems = Vec::new();
        let mut dir = |key: &str, required: bool| -> Option<PathBuf> {
            match get(key).filter(|v| !v.trim().is_empty()) {
                None if required => {
                    problems.push(format!("{key} is required in restore mode"));
                    None
                }
                None => None,
                Some(v) => {
                    let p = PathBuf::from(v.trim());
                    if !p.is_dir() {
                        problems.push(format!("{key}: {} is not a directory", p.display()));
                    }
                    Some(p)
                }
            }
        };
        let data_dir = dir(ENV_RESTORE_DATA_DIR, true);
        let artefacts = dir(ENV_RESTORE_FROM, true);
        let wal_from = dir(ENV_RESTORE_WAL_FROM, false);
        let member = get(ENV_RESTORE_MEMBER).filter(|m| !m.trim().is_empty());
        if member.is_none() {
            problems.push(format!(
                "{ENV_RESTORE_MEMBER} is required in restore mode (the backed-up pod whose artefacts to take)"
            ));
        }
        match (data_dir, artefacts, member) {
            (Some(data_dir), Some(artefacts), Some(member)) if problems.is_empty() => {
                Ok(RestoreConfig {
                    data_dir,
                    artefacts,
                    member: member.trim().to_string(),
                    wal_from,
                })
            }
            _ => Err(problems),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} is not a PostgreSQL data directory (no PG_VERSION)")]
    NotPostgres(PathBuf),
    #[error(
        "the backup's artefacts have no {0}: is this member's consistency method backup-label?"
    )]
    NoLabel(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + use<> {
    let path = path.to_path_buf();
    move |source| RestoreError::Io { what, path, source }
}

/// Writes `contents` to `path` as the data directory's owner, atomically.
fn write_owned(path: &Path, contents: &[u8], owner: (u32, u32)) -> Result<(), RestoreError> {
    crate::durable::write_file(path, contents, 0o600, Some(owner)).map_err(io("writing", path))
}

/// Prepares the directory; returns what was done.
pub fn run(cfg: &RestoreConfig) -> Result<String, RestoreError> {
    let data = &cfg.data_dir;
    let version = data.join("PG_VERSION");
    let meta = std::fs::metadata(&version).map_err(|_| RestoreError::NotPostgres(data.clone()))?;
    let owner = (meta.uid(), meta.gid());
    for done in ["backup_label", "backup_label.old"] {
        if data.join(done).exists() {
            return Ok(format!(
                "{} has {done}: already prepared, or PostgreSQL already recovered from it; left as it is",
                data.display()
            ));
        }
    }
    let label_src = cfg.artefacts.join(format!("{}.backup_label", cfg.member));
    let label = std::fs::read(&label_src).map_err(|_| RestoreError::NoLabel(label_src.clone()))?;
    let mut segments = 0;
    if let Some(wal) = &cfg.wal_from {
        let target = data.join("pg_wal");
        for entry in std::fs::read_dir(wal).map_err(io("reading", wal))? {
            let entry = entry.map_err(io("reading", wal))?;
            if !entry.file_type().map_err(io("reading", wal))?.is_file() {
                continue;
            }
            let from = entry.path();
            let bytes = std::fs::read(&from).map_err(io("reading", &from))?;
            write_owned(&target.join(entry.file_name()), &bytes, owner)?;
            segments += 1;
        }
    }
    let map_src = cfg.artefacts.join(format!("{}.tablespace_map", cfg.member));
    let map = match std::fs::read(&map_src) {
        Ok(m) if !m.is_empty() => {
            write_owned(&data.join("tablespace_map"), &m, owner)?;
            true
        }
        _ => false,
    };
    write_owned(&data.join("backup_label"), &label, owner)?;
    let dir = std::fs::File::open(data).map_err(io("opening", data))?;
    dir.sync_all().map_err(io("syncing", data))?;
    Ok(format!(
        "prepared {}: {segments} WAL file(s) from the backup's WAL part, {}backup_label of {}",
        data.display(),
        if map { "tablespace_map, " } else { "" },
        cfg.member
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, RestoreConfig) {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let artefacts = root.path().join("artefacts");
        let wal = root.path().join("wal");
        for d in [&data.join("pg_wal"), &artefacts, &wal] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(data.join("PG_VERSION"), "16\n").unwrap();
        std::fs::write(data.join("pg_wal/000000010000000000000001"), "old").unwrap();
        std::fs::write(wal.join("000000010000000000000001"), "new").unwrap();
        std::fs::write(wal.join("000000010000000000000002"), "next").unwrap();
        std::fs::write(
            artefacts.join("pg-0.backup_label"),
            "START WAL LOCATION: 0/1\n",
        )
        .unwrap();
        let cfg = RestoreConfig {
            data_dir: data,
            artefacts,
            member: "pg-0".into(),
            wal_from: Some(wal),
        };
        (root, cfg)
    }

    #[test]
    fn prepares_once_and_never_again() {
        let (_root, cfg) = setup();
        let done = run(&cfg).unwrap();
        assert!(done.contains("2 WAL file(s)"), "{done}");
        let data = &cfg.data_dir;
        assert_eq!(
            std::fs::read_to_string(data.join("pg_wal/000000010000000000000001")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(data.join("pg_wal/000000010000000000000002")).unwrap(),
            "next"
        );
        assert!(
            std::fs::read_to_string(data.join("backup_label"))
                .unwrap()
                .starts_with("START WAL")
        );
        assert!(!data.join("tablespace_map").exists());
        // Again (a restarted pod): left as it is.
        std::fs::write(data.join("pg_wal/000000010000000000000002"), "later").unwrap();
        assert!(run(&cfg).unwrap().contains("left as it is"));
        // After recovery (backup_label.old): also left alone.
        std::fs::rename(data.join("backup_label"), data.join("backup_label.old")).unwrap();
        assert!(run(&cfg).unwrap().contains("left as it is"));
        assert_eq!(
            std::fs::read_to_string(data.join("pg_wal/000000010000000000000002")).unwrap(),
            "later"
        );
    }

    #[test]
    fn refuses_what_it_cannot_prepare() {
        let (_root, cfg) = setup();
        let other = RestoreConfig {
            member: "pg-9".into(),
            ..cfg.clone()
        };
        let err = run(&other).unwrap_err().to_string();
        assert!(err.contains("pg-9.backup_label"), "{err}");
        assert!(
            !cfg.data_dir
                .join("pg_wal/000000010000000000000002")
                .exists(),
            "nothing copied"
        );
        std::fs::remove_file(cfg.data_dir.join("PG_VERSION")).unwrap();
        assert!(run(&cfg).unwrap_err().to_string().contains("PG_VERSION"));
        let problems = RestoreConfig::from_source(|_| None).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
