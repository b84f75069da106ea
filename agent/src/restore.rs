//! Restore mode (`stillpoint-agent restore`): run once, before the server
//! starts (as a pod on the restored volumes, or an init container), on a
//! data directory restored from a backup. It does what the restore asks:
//!
//! - **Host renames** (`STILLPOINT_RESTORE_HOSTS`, a restore under new
//!   names): where the restored files name the original application's
//!   hosts, they name the copies instead, so that a restored replica
//!   follows its restored primary, never the running original past the
//!   cut: PostgreSQL's `primary_conninfo` in `postgresql.auto.conf` and
//!   `postgresql.conf`; MySQL's and MariaDB's `master.info` (and a
//!   multi-source `master-<name>.info`) host lines. What is renamed is
//!   what [`HostRenames`] renames.
//! - **Backup label** (`STILLPOINT_RESTORE_FROM` and
//!   `STILLPOINT_RESTORE_MEMBER`; PostgreSQL whose consistency method is
//!   `backup-label`, a class whose snapshots are not atomic):
//!   1. the WAL up to the backup stop, from the backup's `pg_wal` part
//!      (`STILLPOINT_RESTORE_WAL_FROM`), is copied over `pg_wal/`;
//!   2. `tablespace_map` and then `backup_label` are written from the
//!      backup's artefacts (files `<member>.backup_label` and
//!      `<member>.tablespace_map`, as the backup's artefacts Secret holds
//!      them).
//!
//! The label is written last, so its presence means the directory is
//! prepared. A directory that has `backup_label` (prepared) or
//! `backup_label.old` (PostgreSQL already recovered from it) gets no label
//! again: preparing it again after PostgreSQL ran would make it replay from
//! the backup's checkpoint over newer data. Renaming hosts again changes
//! nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use stillpoint_proto::hosts::HostRenames;

/// The data directory to prepare.
pub const ENV_RESTORE_DATA_DIR: &str = "STILLPOINT_RESTORE_DATA_DIR";
/// Where the backup's artefacts are (the artefacts Secret, mounted).
pub const ENV_RESTORE_FROM: &str = "STILLPOINT_RESTORE_FROM";
/// The member (pod) whose artefacts to take: `<member>.backup_label`.
pub const ENV_RESTORE_MEMBER: &str = "STILLPOINT_RESTORE_MEMBER";
/// Optional: the `pg_wal` directory of the backup's WAL part.
pub const ENV_RESTORE_WAL_FROM: &str = "STILLPOINT_RESTORE_WAL_FROM";
/// Optional: the host renames of a restore under new names, as
/// [`HostRenames::encode`] writes them.
pub const ENV_RESTORE_HOSTS: &str = "STILLPOINT_RESTORE_HOSTS";

/// What restore mode works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    pub data_dir: PathBuf,
    /// The backup label to write, if the member was cut with one.
    pub label: Option<LabelFrom>,
    /// The hosts to rename, in a restore under new names.
    pub hosts: Option<HostRenames>,
}

/// Where a member's backup label and WAL come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFrom {
    pub artefacts: PathBuf,
    pub member: String,
    pub wal_from: Option<PathBuf>,
}

impl RestoreConfig {
    /// Reads the configuration, collecting every problem.
    pub fn from_source(get: impl Fn(&str) -> Option<String>) -> Result<RestoreConfig, Vec<String>> {
        let mut problems = Vec::new();
        let value = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let mut dir = |key: &str| -> Option<PathBuf> {
            let p = PathBuf::from(value(key)?.trim());
            if !p.is_dir() {
                problems.push(format!("{key}: {} is not a directory", p.display()));
            }
            Some(p)
        };
        let data_dir = dir(ENV_RESTORE_DATA_DIR);
        let artefacts = dir(ENV_RESTORE_FROM);
        let wal_from = dir(ENV_RESTORE_WAL_FROM);
        if data_dir.is_none() {
            problems.push(format!(
                "{ENV_RESTORE_DATA_DIR} is required in restore mode"
            ));
        }
        let member = value(ENV_RESTORE_MEMBER).map(|m| m.trim().to_string());
        let label = match (artefacts, member) {
            (Some(artefacts), Some(member)) => Some(LabelFrom {
                artefacts,
                member,
                wal_from,
            }),
            (None, None) => None,
            _ => {
                problems.push(format!(
                    "{ENV_RESTORE_FROM} and {ENV_RESTORE_MEMBER} go together (the backup's artefacts \
                     and the backed-up pod whose backup_label to take)"
                ));
                None
            }
        };
        let hosts = match value(ENV_RESTORE_HOSTS).map(|h| HostRenames::decode(&h)) {
            None => None,
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => {
                problems.push(format!("{ENV_RESTORE_HOSTS}: {e}"));
                None
            }
        };
        if label.is_none() && hosts.is_none() && problems.is_empty() {
            problems.push(format!(
                "nothing to do: set {ENV_RESTORE_FROM} and {ENV_RESTORE_MEMBER} (a backup label), \
                 {ENV_RESTORE_HOSTS} (host renames), or both"
            ));
        }
        match data_dir {
            Some(data_dir) if problems.is_empty() => Ok(RestoreConfig {
                data_dir,
                label,
                hosts,
            }),
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
    let mut done = Vec::new();
    if let Some(hosts) = &cfg.hosts {
        done.push(rename_hosts(&cfg.data_dir, hosts)?);
    }
    if let Some(label) = &cfg.label {
        done.push(write_label(&cfg.data_dir, label)?);
    }
    Ok(done.join("; "))
}

/// The files of a data directory that name a replica's primary, and how
/// their lines are read: a PostgreSQL setting `primary_conninfo`, or a
/// MySQL/MariaDB `master.info` whose host is a line of its own.
fn replication_files(data: &Path) -> Result<Vec<(PathBuf, bool)>, RestoreError> {
    let mut files = Vec::new();
    for conf in ["postgresql.auto.conf", "postgresql.conf"] {
        files.push((data.join(conf), true));
    }
    for entry in std::fs::read_dir(data).map_err(io("reading", data))? {
        let name = entry.map_err(io("reading", data))?.file_name();
        let name = name.to_string_lossy();
        if name == "master.info" || (name.starts_with("master-") && name.ends_with(".info")) {
            files.push((data.join(name.as_ref()), false));
        }
    }
    Ok(files.into_iter().filter(|(f, _)| f.is_file()).collect())
}

/// Renames the original hosts in the replication settings of `data`.
fn rename_hosts(data: &Path, hosts: &HostRenames) -> Result<String, RestoreError> {
    let mut changed = Vec::new();
    for (file, conf) in replication_files(data)? {
        let text = std::fs::read_to_string(&file).map_err(io("reading", &file))?;
        let renamed: Vec<String> = text
            .split('\n')
            .map(|line| match conf {
                true if !line.trim_start().starts_with("primary_conninfo") => line.to_string(),
                true => hosts.rename(line),
                // A master.info line is a host, or not one at all.
                false => hosts.rename_host(line),
            })
            .collect();
        let renamed = renamed.join("\n");
        if renamed != text {
            let meta = std::fs::metadata(&file).map_err(io("reading", &file))?;
            write_owned(&file, renamed.as_bytes(), (meta.uid(), meta.gid()))?;
            changed.push(file.display().to_string());
        }
    }
    Ok(match changed.is_empty() {
        true => format!(
            "no replication setting of {} names a renamed host",
            data.display()
        ),
        false => format!("renamed hosts in {}", changed.join(", ")),
    })
}

/// Writes the backup label (and WAL, tablespace map) of `from` into
/// PostgreSQL data directory `data`, once.
fn write_label(data: &Path, from: &LabelFrom) -> Result<String, RestoreError> {
    let version = data.join("PG_VERSION");
    let meta = std::fs::metadata(&version).map_err(|_| RestoreError::NotPostgres(data.into()))?;
    let owner = (meta.uid(), meta.gid());
    for done in ["backup_label", "backup_label.old"] {
        if data.join(done).exists() {
            return Ok(format!(
                "{} has {done}: already prepared, or PostgreSQL already recovered from it; left as it is",
                data.display()
            ));
        }
    }
    let label_src = from.artefacts.join(format!("{}.backup_label", from.member));
    let label = std::fs::read(&label_src).map_err(|_| RestoreError::NoLabel(label_src.clone()))?;
    let segments = match &from.wal_from {
        Some(wal) => copy_wal(wal, &data.join("pg_wal"), owner)?,
        None => 0,
    };
    let map_src = from
        .artefacts
        .join(format!("{}.tablespace_map", from.member));
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
        from.member
    ))
}

/// Copies every WAL file of `wal` into `target`; returns how many.
fn copy_wal(wal: &Path, target: &Path, owner: (u32, u32)) -> Result<usize, RestoreError> {
    let mut segments = 0;
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
    Ok(segments)
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
            label: Some(LabelFrom {
                artefacts,
                member: "pg-0".into(),
                wal_from: Some(wal),
            }),
            hosts: None,
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
        let mut other = cfg.clone();
        other.label.as_mut().unwrap().member = "pg-9".into();
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
        assert_eq!(problems.len(), 1, "{problems:?}");
        let dir = cfg.data_dir.display().to_string();
        let half = |k: &str| match k {
            ENV_RESTORE_DATA_DIR | ENV_RESTORE_FROM => Some(dir.clone()),
            _ => None,
        };
        let problems = RestoreConfig::from_source(half).unwrap_err();
        assert!(problems[0].contains("go together"), "{problems:?}");
        let nothing = |k: &str| (k == ENV_RESTORE_DATA_DIR).then(|| dir.clone());
        let problems = RestoreConfig::from_source(nothing).unwrap_err();
        assert!(problems[0].contains("nothing to do"), "{problems:?}");
    }

    fn renames() -> HostRenames {
        let mut r = HostRenames::new("shop");
        r.service("pg", "copy-pg");
        r.statefulset("pg", "pg", "copy-pg");
        r.service("maria", "copy-maria");
        r.statefulset("maria", "maria", "copy-maria");
        r
    }

    #[test]
    fn a_replica_restored_under_new_names_names_the_copy_of_its_primary() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path();
        let auto = "# Do not edit this file manually!\nprimary_conninfo = 'user=postgres host=pg-0.pg port=5432 sslmode=prefer'\nprimary_slot_name = 'pg_replica'\n";
        std::fs::write(data.join("postgresql.auto.conf"), auto).unwrap();
        std::fs::write(
            data.join("postgresql.conf"),
            "shared_buffers = 128MB # pg-0.pg\n",
        )
        .unwrap();
        let info = "33\nmariadb-bin.000002\n1234\nmaria-0.maria\nroot\n\n3306\n60\n";
        std::fs::write(data.join("master.info"), info).unwrap();
        std::fs::write(data.join("master-b.info"), "33\nx\n4\nmaria\n").unwrap();
        let cfg = |hosts: &str| {
            let d = data.display().to_string();
            RestoreConfig::from_source(|k| match k {
                ENV_RESTORE_DATA_DIR => Some(d.clone()),
                ENV_RESTORE_HOSTS => Some(hosts.to_string()),
                _ => None,
            })
            .unwrap()
        };
        let done = run(&cfg(&renames().encode())).unwrap();
        assert!(done.contains("master.info"), "{done}");
        let read = |f: &str| std::fs::read_to_string(data.join(f)).unwrap();
        assert_eq!(
            read("postgresql.auto.conf"),
            auto.replace("host=pg-0.pg", "host=copy-pg-0.copy-pg")
        );
        assert_eq!(
            read("postgresql.conf"),
            "shared_buffers = 128MB # pg-0.pg\n",
            "only primary_conninfo"
        );
        assert_eq!(
            read("master.info"),
            info.replace("maria-0.maria", "copy-maria-0.copy-maria")
        );
        assert_eq!(read("master-b.info"), "33\nx\n4\ncopy-maria\n");
        // Again: nothing more changes.
        let again = run(&cfg(&renames().encode())).unwrap();
        assert!(again.contains("no replication setting"), "{again}");
        assert_eq!(
            read("master.info"),
            info.replace("maria-0.maria", "copy-maria-0.copy-maria")
        );
    }
}
