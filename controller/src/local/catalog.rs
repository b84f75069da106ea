//! The local catalog: one JSON manifest per backup in a directory, written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash
//! mid-write never leaves a manifest that reads as complete.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::core::record::*;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path} is not readable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no backup '{id}' in the catalog {dir}")]
    NotFound { id: String, dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Catalog {
    dir: PathBuf,
}

impl Catalog {
    /// Opens (creating) the catalog directory and checks it is writable.
    pub fn open(dir: &Path) -> Result<Self, CatalogError> {
        let io = |source| CatalogError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"").map_err(io)?;
        let _ = std::fs::remove_file(probe);
        Ok(Catalog {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a manifest atomically.
    pub fn write(&self, manifest: &Manifest) -> Result<(), CatalogError> {
        let io = |source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        };
        let target = self.path(&manifest.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", manifest.id));
        let json = serde_json::to_vec_pretty(manifest).expect("manifests serialize");
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &target).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Manifest, CatalogError> {
        let path = self.path(id);
        let text = std::fs::read(&path).map_err(|_| CatalogError::NotFound {
            id: id.to_string(),
            dir: self.dir.clone(),
        })?;
        serde_json::from_slice(&text).map_err(|e| CatalogError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Every manifest, oldest first. Unreadable files are reported, not hidden.
    pub fn list(&self) -> Result<Vec<Manifest>, CatalogError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(id) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            {
                out.push(self.get(id)?);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn remove(&self, id: &str) -> Result<(), CatalogError> {
        std::fs::remove_file(self.path(id)).map_err(|source| CatalogError::Io {
            dir: self.dir.clone(),
            source,
        })
    }
}

#[async_trait::async_trait]
impl crate::core::store::BackupStore for Catalog {
    async fn save(&self, manifest: &Manifest) -> Result<(), crate::core::store::StoreError> {
        let (catalog, manifest) = (self.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || catalog.write(&manifest))
            .await
            .map_err(|e| crate::core::store::StoreError(e.to_string()))?
            .map_err(|e| crate::core::store::StoreError(e.to_string()))
    }
}
