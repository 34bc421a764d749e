//! Where a backup lives: its URL, and the files in its directory.
//!
//! `file:///mnt/backup/node.bkp` names a directory:
//!
//! ```text
//! lock                                   flock'ed by the one writer; readers never take it
//! backup.json                            sealed or not, backup id, key fingerprint (`meta`)
//! 0000000000000003-000004d2.snapshot     generation 3's database at data_version 0x4d2 (zstd)
//! 0000000000000003-000004d2.journal      generation 3's records after that version
//! ```
//!
//! Names are `<generation:016x>-<base data_version:08x>`, so a listing alone plans a restore:
//! the highest generation that has a journal is the backup; anything else is a leftover of
//! an interrupted compaction, removed by the next writer. A generation becomes current when
//! its journal is renamed into place, after its snapshot: one rename, so there is never a
//! second candidate.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

pub const LOCK_FILE: &str = "lock";

/// Turns a backup URL into the backup's path; relative paths are taken from `base`.
pub fn parse_url(url: &str, base: &Path) -> std::result::Result<PathBuf, String> {
    let path = if let Some(rest) = url.strip_prefix("file://") {
        rest
    } else if let Some(rest) = url.strip_prefix("file:") {
        rest
    } else if url.starts_with("socket:") {
        return Err(format!(
            "'{url}': socket: backends are not supported by this version of cln-backup; \
             use a file:// URL on a mounted filesystem"
        ));
    } else {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or(url);
        return Err(format!("'{url}': unknown backup URL scheme '{scheme}'; use file:///absolute/path/to/backup"));
    };
    if path.is_empty() {
        return Err(format!("'{url}' names no path; use file:///absolute/path/to/backup"));
    }
    Ok(base.join(path))
}

/// The file URL for a path, absolute so it means the same from any directory.
pub fn url_for(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("file://{}", abs.display())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GenName {
    pub generation: u64,
    pub base_version: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Journal,
    Snapshot,
}

/// The generation a journal or snapshot file name belongs to.
pub fn generation_of(name: &str) -> Option<u64> {
    parse_name(name).map(|(g, _)| g.generation)
}

fn parse_name(name: &str) -> Option<(GenName, FileKind)> {
    let (stem, kind) = if let Some(s) = name.strip_suffix(".journal") {
        (s, FileKind::Journal)
    } else if let Some(s) = name.strip_suffix(".snapshot") {
        (s, FileKind::Snapshot)
    } else {
        return None;
    };
    let (g, v) = stem.split_once('-')?;
    if g.len() != 16 || v.len() != 8 {
        return None;
    }
    Some((
        GenName { generation: u64::from_str_radix(g, 16).ok()?, base_version: u32::from_str_radix(v, 16).ok()? },
        kind,
    ))
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

/// What a listing of the backup directory says.
#[derive(Debug, Clone)]
pub struct Listing {
    pub current: GenName,
    pub journal: PathBuf,
    pub snapshot: Option<PathBuf>,
    /// Files that belong to no current generation (interrupted compactions, temp files).
    pub leftovers: Vec<PathBuf>,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn journal_path(&self, g: GenName) -> PathBuf {
        self.root.join(format!("{:016x}-{:08x}.journal", g.generation, g.base_version))
    }

    pub fn snapshot_path(&self, g: GenName) -> PathBuf {
        self.root.join(format!("{:016x}-{:08x}.snapshot", g.generation, g.base_version))
    }

    pub fn lock_path(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    /// Reads the directory and finds the current generation.
    pub fn list(&self) -> Result<Listing> {
        let meta = fs::metadata(&self.root).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotBackup { path: self.root.clone(), what: "it does not exist".into() }
            } else {
                StoreError::io("stat", &self.root)(e)
            }
        })?;
        if !meta.is_dir() {
            let what = if crate::legacy::is_v1_file(&self.root) {
                "it is a backup file of the Python backup plugin (format v1); convert it with `backup-cli migrate`"
            } else {
                "it is a file, not a backup directory"
            };
            return Err(StoreError::NotBackup { path: self.root.clone(), what: what.into() });
        }
        let mut files = vec![];
        for entry in fs::read_dir(&self.root).map_err(StoreError::io("list", &self.root))? {
            let entry = entry.map_err(StoreError::io("list", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != LOCK_FILE && name != crate::meta::META_FILE {
                files.push(name);
            }
        }
        let current = files
            .iter()
            .filter_map(|n| parse_name(n))
            .filter(|(_, k)| *k == FileKind::Journal)
            .map(|(g, _)| g)
            .max()
            .ok_or_else(|| StoreError::NotBackup {
                path: self.root.clone(),
                what: "no journal file in it (not made by `backup-cli init`?)".into(),
            })?;
        let mut snapshot = None;
        let mut leftovers = vec![];
        for n in files {
            match parse_name(&n) {
                Some((g, FileKind::Journal)) if g == current => {}
                Some((g, FileKind::Snapshot)) if g == current => snapshot = Some(self.root.join(&n)),
                _ => leftovers.push(self.root.join(&n)),
            }
        }
        leftovers.sort();
        Ok(Listing { current, journal: self.journal_path(current), snapshot, leftovers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let b = Path::new("/ln");
        assert_eq!(parse_url("file:///mnt/b.bkp", b).unwrap(), PathBuf::from("/mnt/b.bkp"));
        assert_eq!(parse_url("file:rel/b", b).unwrap(), PathBuf::from("/ln/rel/b"));
        assert!(parse_url("socket:localhost:1234", b).unwrap_err().contains("not supported"));
        assert!(parse_url("s3://bucket/x", b).unwrap_err().contains("unknown backup URL scheme 's3'"));
        assert!(parse_url("file://", b).is_err());
        assert!(parse_url("/plain/path", b).unwrap_err().contains("unknown backup URL scheme"));
    }

    #[test]
    fn names_and_listing() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        let g1 = GenName { generation: 1, base_version: 0 };
        let g2 = GenName { generation: 2, base_version: 0x4d2 };
        assert!(l.journal_path(g2).ends_with("0000000000000002-000004d2.journal"));
        assert!(matches!(l.list(), Err(StoreError::NotBackup { .. })));
        for p in [l.journal_path(g1), l.journal_path(g2), l.snapshot_path(g2), l.lock_path(), d.path().join("x.tmp")] {
            fs::write(p, b"").unwrap();
        }
        let ls = l.list().unwrap();
        assert_eq!(ls.current, g2);
        assert_eq!(ls.snapshot, Some(l.snapshot_path(g2)));
        assert_eq!(ls.leftovers, vec![l.journal_path(g1), d.path().join("x.tmp")]);
    }
}
