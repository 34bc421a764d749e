//! Which destinations missed acknowledged writes: `backup-behind.json`, beside backup.lock
//! in the lightning dir.
//!
//! Why it is kept on disk: a copy away while lightningd replaced its never-committed last
//! transaction still holds the old one, at the same data_version. Its end alone cannot say
//! which of the two lightningd committed, so at the next start only this record can. A copy
//! is listed (durably) before the first write it lacks is acknowledged, and taken off once
//! it holds every write again. A copy listed here is never the one others are brought up
//! to date from, restored from or seeded from, while one that is not listed can be.
//!
//! Format: `{"behind": [{"url": URL as in backup.lock, "since_version": N, "since": unix s}]}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::fsutil;

pub const FILE_NAME: &str = "backup-behind.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behind {
    pub behind: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub url: String,
    /// The first data_version it lacks.
    pub since_version: u32,
    /// When it was listed (unix seconds).
    pub since: u64,
}

pub fn path(ldir: &Path) -> PathBuf {
    ldir.join(FILE_NAME)
}

impl Behind {
    /// The list in `ldir`; empty when there is none.
    pub fn load(ldir: &Path) -> Result<Behind, String> {
        let p = path(ldir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{} is damaged ({e}). It lists the destinations that missed writes: check each with \
                     `backup-cli verify --lightning-dir`, then remove the damaged ones, add them again and delete \
                     this file, lightningd stopped",
                    p.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Behind::default()),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }

    /// Replaces the list in `ldir` durably (tmp, write, fsync, rename, fsync dir).
    pub fn save(&self, ldir: &Path) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_atomic(&path(ldir), true, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))
    }

    pub fn get(&self, url: &str) -> Option<&Entry> {
        self.behind.iter().find(|e| e.url == url)
    }

    /// Lists `url` unless it is; true when the list changed.
    pub fn add(&mut self, url: &str, since_version: u32) -> bool {
        if self.get(url).is_some() {
            return false;
        }
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.behind.push(Entry { url: url.to_string(), since_version, since });
        true
    }

    /// Takes off every listed URL `same` says is the one; true when the list changed.
    pub fn remove(&mut self, mut same: impl FnMut(&str) -> bool) -> bool {
        let before = self.behind.len();
        self.behind.retain(|e| !same(&e.url));
        self.behind.len() != before
    }

    /// How a listed copy is described to the operator.
    pub fn describe(e: &Entry) -> String {
        format!(
            "it missed the writes from data_version {} on (listed in {FILE_NAME} since {})",
            e.since_version,
            crate::clock::fmt_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.since))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_survives_a_save_and_a_damaged_one_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Behind::load(d.path()).unwrap(), Behind::default());
        let mut b = Behind::default();
        assert!(b.add("file:///b", 7) && !b.add("file:///b", 9));
        b.save(d.path()).unwrap();
        let back = Behind::load(d.path()).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.get("file:///b").unwrap().since_version, 7);
        assert!(b.remove(|u| u == "file:///b") && !b.remove(|u| u == "file:///b"));
        std::fs::write(path(d.path()), b"{\"behind\": [").unwrap();
        let e = Behind::load(d.path()).unwrap_err();
        assert!(e.contains(FILE_NAME) && e.contains("verify"), "{e}");
    }
}
