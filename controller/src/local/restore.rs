//! Local restore: copies each member's snapshots to a target directory,
//! stage by stage, and applies the member's consistency method.
//!
//! A restore never needs, reads or touches the source. Before anything is
//! copied, every member is checked: its snapshots exist (and a `copy`'s
//! checksum still matches), its targets are free, and everything in its
//! snapshots that points outside a volume (MariaDB/MySQL binlog and
//! relay-log indexes, PostgreSQL tablespace links and a `pg_wal` link)
//! points into one of the member's own volumes. After the copy those
//! pointers are rewritten to the restored volumes; one that points
//! anywhere else stops the restore with an error that names it.
//!
//! - `backup-label`: the copy needs PostgreSQL's `backup_label` (and
//!   `tablespace_map`) written into it: recovery then replays the WAL that
//!   was copied with it up to the backup's stop LSN.
//! - `crash-consistent` / `frozen` / `frozen-copy`: restored as cut; a
//!   stale `backup_label` is removed so that a crash-consistent image is not
//!   asked for WAL past the snapshot.

use std::path::{Path, PathBuf};

pub use crate::core::plan::*;
use crate::core::record::{Consistency, Manifest, MemberRecord};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("backup {id} did not succeed ({outcome}); only a succeeded backup restores")]
    NotRestorable { id: String, outcome: String },
    #[error("{0} already exists; restore into an empty or new directory")]
    Exists(PathBuf),
    #[error("member {member}: {message}")]
    Member { member: String, message: String },
}

/// One restored volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub member: String,
    pub stage: u32,
    pub path: PathBuf,
    pub consistency: Option<Consistency>,
}

fn member_error(member: &str, message: impl Into<String>) -> RestoreError {
    RestoreError::Member {
        member: member.to_string(),
        message: message.into(),
    }
}

/// One volume of one member: its snapshot, where the volume was when it
/// was backed up, and where it is restored to.
#[derive(Debug, Clone)]
struct Move {
    from: PathBuf,
    source: PathBuf,
    target: PathBuf,
}

/// The volume that held a path of the source (the deepest, when one is
/// mounted inside another) and the path's rest below it.
fn volume_of<'m, 'p>(moves: &'m [Move], path: &'p Path) -> Option<(&'m Move, &'p Path)> {
    moves
        .iter()
        .filter_map(|m| Some((m, path.strip_prefix(&m.source).ok()?)))
        .max_by_key(|(m, _)| m.source.components().count())
}

/// Where a path of the source lands in the restore: the same place below
/// the restored copy of the volume that held it, or `None` when it was on
/// none of the member's volumes.
fn redirect(moves: &[Move], path: &Path) -> Option<PathBuf> {
    volume_of(moves, path).map(|(m, rest)| m.target.join(rest))
}

/// Where the path lies inside the snapshot `moves` came from (to read it
/// before anything is copied).
fn in_snapshot(moves: &[Move], path: &Path) -> Option<PathBuf> {
    volume_of(moves, path).map(|(m, rest)| m.from.join(rest))
}

/// A member's server path of kind `what`, as recorded.
fn server_path<'m>(m: &'m MemberRecord, what: &str) -> Option<&'m Path> {
    m.paths
        .iter()
        .find(|p| p.what == what)
        .map(|p| p.path.as_path())
}

/// What each engine calls its data directory in its reported paths.
const DATA_DIRECTORY: &[&str] = &["data_directory", "datadir", "dir", "storage.dbPath"];

/// The member's data directory inside its snapshots and in the restore:
/// where its server kept it (from the manifest), or else the first volume.
fn data_dir(m: &MemberRecord, moves: &[Move]) -> Result<(PathBuf, PathBuf), RestoreError> {
    let recorded = DATA_DIRECTORY.iter().find_map(|what| server_path(m, what));
    match recorded {
        Some(path) => match (in_snapshot(moves, path), redirect(moves, path)) {
            (Some(from), Some(to)) => Ok((from, to)),
            _ => Err(member_error(
                &m.name,
                format!(
                    "its data directory {} is on none of its volumes: it cannot be restored",
                    path.display()
                ),
            )),
        },
        None => moves
            .first()
            .map(|first| (first.from.clone(), first.target.clone()))
            .ok_or_else(|| member_error(&m.name, "the backup holds no volume of it")),
    }
}

/// A pointer in a restored volume to a path of the source, and its new target.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pointer {
    /// A symbolic link (relative to the restored data directory).
    Link { at: PathBuf, to: PathBuf },
    /// An index file whose lines name files (relative to the restore).
    Index { at: PathBuf, lines: Vec<String> },
}

/// What in one member's snapshots points at paths (read from the snapshots,
/// before anything is copied), with each target mapped to the restore.
/// A pointer to a path on none of the member's volumes is an error.
fn pointers(m: &MemberRecord, moves: &[Move]) -> Result<Vec<Pointer>, RestoreError> {
    let outside = |what: String, target: &Path| {
        member_error(
            &m.name,
            format!(
                "{what} points at {}, which is on none of the member's volumes: a restore would \
                 need the source. Back up that location too (add its volume to the member), \
                 or restore it by hand",
                target.display()
            ),
        )
    };
    let mut found = Vec::new();
    match m.engine.as_str() {
        "postgres" => {
            let (data, _) = data_dir(m, moves)?;
            let mut links: Vec<PathBuf> = vec![PathBuf::from("pg_wal")];
            if let Ok(entries) = std::fs::read_dir(data.join("pg_tblspc")) {
                links.extend(
                    entries
                        .flatten()
                        .map(|e| Path::new("pg_tblspc").join(e.file_name())),
                );
            }
            for link in links {
                let Ok(target) = std::fs::read_link(data.join(&link)) else {
                    continue;
                };
                let source_data = server_path(m, "data_directory")
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let absolute = source_data.join(&target);
                let to = redirect(moves, &absolute)
                    .ok_or_else(|| outside(format!("link {}", link.display()), &absolute))?;
                found.push(Pointer::Link { at: link, to });
            }
        }
        "mysql" | "mariadb" => {
            for mv in moves {
                for index in index_files(&mv.from) {
                    let text = std::fs::read_to_string(&index).map_err(|e| {
                        member_error(&m.name, format!("reading {}: {e}", index.display()))
                    })?;
                    let mut lines = Vec::new();
                    for line in text.lines() {
                        let path = Path::new(line.trim());
                        if !path.is_absolute() {
                            lines.push(line.to_string());
                            continue;
                        }
                        let name = index.strip_prefix(&mv.from).unwrap_or(&index);
                        let to = redirect(moves, path)
                            .ok_or_else(|| outside(format!("{}", name.display()), path))?;
                        lines.push(to.display().to_string());
                    }
                    let at = mv
                        .target
                        .join(index.strip_prefix(&mv.from).unwrap_or(&index));
                    found.push(Pointer::Index { at, lines });
                }
            }
        }
        _ => {}
    }
    Ok(found)
}

/// The binlog / relay-log index files (and `relay-log.info`) in a volume.
fn index_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(t) if t.is_file() && (name.ends_with(".index") || name == "relay-log.info") => {
                    out.push(path)
                }
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// One member, checked and ready to copy.
#[derive(Debug)]
struct Checked<'m> {
    record: &'m MemberRecord,
    moves: Vec<Move>,
    pointers: Vec<Pointer>,
}

/// Checks one member: snapshots present and intact, targets free,
/// pointers inside the backup. Reads only the snapshots.
fn check_member<'m>(m: &'m MemberRecord, to: &Path) -> Result<Checked<'m>, RestoreError> {
    let mut moves = Vec::new();
    for (index, snapshot) in m.snapshots.iter().enumerate() {
        if snapshot.driver == "exec" {
            return Err(member_error(
                &m.name,
                format!(
                    "snapshot {} was made by the exec snapshotter: restore it with your storage tools",
                    snapshot.handle
                ),
            ));
        }
        let from = PathBuf::from(&snapshot.handle);
        if !from.is_dir() {
            return Err(member_error(
                &m.name,
                format!("snapshot {} is missing", snapshot.handle),
            ));
        }
        if let Some(recorded) = &snapshot.checksum {
            let now = crate::local::snapshot::copy::checksum(&from).map_err(|e| {
                member_error(&m.name, format!("checksumming {}: {e}", from.display()))
            })?;
            if &now != recorded {
                return Err(member_error(
                    &m.name,
                    format!(
                        "snapshot {} has changed since the backup (checksum {now}, recorded \
                         {recorded}): it is not restored",
                        snapshot.handle
                    ),
                ));
            }
        }
        let target = to.join(&m.name).join(index.to_string());
        if target.exists() {
            return Err(RestoreError::Exists(target));
        }
        moves.push(Move {
            from,
            source: snapshot.volume.clone(),
            target,
        });
    }
    if m.consistency == Some(Consistency::BackupLabel) && !m.artefacts.contains_key("backup_label")
    {
        return Err(member_error(
            &m.name,
            "the manifest has no backup_label for a backup-label restore",
        ));
    }
    let pointers = pointers(m, &moves)?;
    data_dir(m, &moves)?;
    Ok(Checked {
        record: m,
        moves,
        pointers,
    })
}

/// Restores every volume of `manifest` under `to/<member>/<index>`, after
/// checking every member (nothing is copied unless all of them can be
/// restored).
pub fn restore_files(manifest: &Manifest, to: &Path) -> Result<Vec<Restored>, RestoreError> {
    if manifest.outcome != crate::local::catalog::Outcome::Succeeded {
        return Err(RestoreError::NotRestorable {
            id: manifest.id.clone(),
            outcome: format!("{:?}", manifest.outcome).to_lowercase(),
        });
    }
    let checked = order(manifest)
        .into_iter()
        .map(|m| check_member(m, to))
        .collect::<Result<Vec<_>, _>>()?;
    let mut restored = Vec::new();
    for c in checked {
        let m = c.record;
        for mv in &c.moves {
            std::fs::create_dir_all(mv.target.parent().expect("has a parent"))
                .map_err(|e| member_error(&m.name, e.to_string()))?;
            let status = std::process::Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&mv.from)
                .arg(&mv.target)
                .status()
                .map_err(|e| member_error(&m.name, format!("cp: {e}")))?;
            if !status.success() {
                return Err(member_error(
                    &m.name,
                    format!("copying {} failed", mv.from.display()),
                ));
            }
            restored.push(Restored {
                member: m.name.clone(),
                stage: m.restore_stage,
                path: mv.target.clone(),
                consistency: m.consistency,
            });
        }
        let (_, data) = data_dir(m, &c.moves)?;
        rewrite(m, &data, &c.pointers)?;
        apply_consistency(m, &data, &c.moves)?;
    }
    Ok(restored)
}

/// Points what pointed at the source at the restored volumes.
fn rewrite(m: &MemberRecord, data: &Path, pointers: &[Pointer]) -> Result<(), RestoreError> {
    let fail = |what: &Path, e: std::io::Error| {
        member_error(&m.name, format!("rewriting {}: {e}", what.display()))
    };
    for p in pointers {
        match p {
            Pointer::Link { at, to } => {
                let link = data.join(at);
                std::fs::remove_file(&link).map_err(|e| fail(&link, e))?;
                std::os::unix::fs::symlink(to, &link).map_err(|e| fail(&link, e))?;
            }
            Pointer::Index { at, lines } => {
                let mut text = lines.join("\n");
                text.push('\n');
                std::fs::write(at, text).map_err(|e| fail(at, e))?;
            }
        }
    }
    Ok(())
}

/// A member's volumes: where each was backed up from, and where its
/// restored copy is.
fn moves_to(volumes: &[(PathBuf, PathBuf)]) -> Vec<Move> {
    volumes
        .iter()
        .map(|(source, target)| Move {
            from: target.clone(),
            source: source.clone(),
            target: target.clone(),
        })
        .collect()
}

/// The restored volumes of a member restored under `to` by [`restore_files`].
fn restored_volumes(m: &MemberRecord, to: &Path) -> Vec<(PathBuf, PathBuf)> {
    m.snapshots
        .iter()
        .enumerate()
        .map(|(index, s)| (s.volume.clone(), to.join(&m.name).join(index.to_string())))
        .collect()
}

/// The restored data directory of a member restored under `to` (the
/// volume holding the server's data directory, at the same place inside it).
pub fn restored_data_dir(m: &MemberRecord, to: &Path) -> Option<PathBuf> {
    let moves = moves_to(&restored_volumes(m, to));
    data_dir(m, &moves).ok().map(|(_, data)| data)
}

/// Where a server path of the member (`log_bin_basename`, ...) lands in
/// the restore under `to`.
pub fn restored_path(m: &MemberRecord, to: &Path, what: &str) -> Option<PathBuf> {
    relocated_path(m, &restored_volumes(m, to), what)
}

/// Where a server path of the member lands when its volumes (backed up
/// from, restored to) are where `volumes` says.
pub fn relocated_path(
    m: &MemberRecord,
    volumes: &[(PathBuf, PathBuf)],
    what: &str,
) -> Option<PathBuf> {
    redirect(&moves_to(volumes), server_path(m, what)?)
}

/// Makes volumes restored by other means (a storage snapshot mounted by
/// hand: the exec snapshotter's) self-contained, as [`restore_files`]
/// does: what points at the source is pointed at the restored volumes
/// (or refused), and the consistency method is applied. `volumes`: each
/// volume's path when it was backed up, and where it is restored now.
/// Returns the restored data directory.
pub fn relocate(m: &MemberRecord, volumes: &[(PathBuf, PathBuf)]) -> Result<PathBuf, RestoreError> {
    let moves = moves_to(volumes);
    let pointers = pointers(m, &moves)?;
    let (_, data) = data_dir(m, &moves)?;
    rewrite(m, &data, &pointers)?;
    apply_consistency(m, &data, &moves)?;
    Ok(data)
}

/// Writes (or removes) what the member's consistency method asks for, in
/// its data directory; stale pid files go from every volume.
fn apply_consistency(m: &MemberRecord, data: &Path, moves: &[Move]) -> Result<(), RestoreError> {
    let write = |name: &str, text: &str| {
        std::fs::write(data.join(name), text)
            .map_err(|e| member_error(&m.name, format!("writing {name}: {e}")))
    };
    match m.consistency {
        Some(Consistency::BackupLabel) => {
            let label = m.artefacts.get("backup_label").ok_or_else(|| {
                member_error(
                    &m.name,
                    "the manifest has no backup_label for a backup-label restore",
                )
            })?;
            write("backup_label", label)?;
            if let Some(map) = m.artefacts.get("tablespace_map") {
                write("tablespace_map", &tablespace_map(m, map, moves)?)?;
            }
        }
        _ if m.engine == "postgres" => {
            let _ = std::fs::remove_file(data.join("backup_label"));
            let _ = std::fs::remove_file(data.join("tablespace_map"));
        }
        _ => {}
    }
    // A pid file in a snapshot is stale by definition.
    for dir in moves.iter().map(|mv| mv.target.as_path()).chain([data]) {
        let _ = std::fs::remove_file(dir.join("postmaster.pid"));
    }
    Ok(())
}

/// `tablespace_map` with each location moved to its restored place (the
/// server recreates `pg_tblspc` links from it).
fn tablespace_map(m: &MemberRecord, map: &str, moves: &[Move]) -> Result<String, RestoreError> {
    let mut out = String::new();
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let (oid, location) = line.split_once(' ').unwrap_or((line, ""));
        let to = redirect(moves, Path::new(location)).ok_or_else(|| {
            member_error(
                &m.name,
                format!(
                    "tablespace {oid} is at {location}, on none of the member's volumes: a \
                     restore would need the source"
                ),
            )
        })?;
        out.push_str(&format!("{oid} {}\n", to.display()));
    }
    Ok(out)
}
