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

/// What the lightning dir says about its copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    Kept(Behind),
    /// No list: a backup made before there was one (or a lightning dir rebuilt by hand).
    Missing,
    /// It cannot be read: why, and what to do.
    Unreadable(String),
}

/// Whether two URLs name the same copy, as backup.lock's checks decide (two spellings of
/// one path are one copy).
pub fn same_copy(a: &str, b: &str, base: &Path) -> bool {
    a == b || matches!((super::parse(a, base), super::parse(b, base)), (Ok(x), Ok(y)) if x == y)
}

impl Behind {
    /// The list in `ldir`.
    pub fn load(ldir: &Path) -> Listing {
        let p = path(ldir);
        let fix = "check which copies hold lightningd's latest state, remove the others with \
                   `backup-cli remove-destination` and add them again with `backup-cli add-destination` \
                   (lightningd stopped), then delete the file";
        match std::fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(b) => Listing::Kept(b),
                Err(e) => Listing::Unreadable(format!(
                    "{} is damaged ({e}): it lists the destinations that missed writes. To go on, {fix}",
                    p.display()
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Listing::Missing,
            Err(e) => Listing::Unreadable(format!(
                "cannot read {} ({e}): it lists the destinations that missed writes. Check the lightning \
                 dir's disk; if the file is lost, {fix}",
                p.display()
            )),
        }
    }

    /// The list for a tool that must not guess: an error unless it can be read (none is an
    /// empty list: a backup from before there was one).
    pub fn load_or_empty(ldir: &Path) -> Result<Behind, String> {
        match Behind::load(ldir) {
            Listing::Kept(b) => Ok(b),
            Listing::Missing => Ok(Behind::default()),
            Listing::Unreadable(e) => Err(e),
        }
    }

    /// Replaces the list in `ldir` durably (tmp, write, fsync, rename, fsync dir).
    pub fn save(&self, ldir: &Path) -> Result<(), StoreError> {
        let p = path(ldir);
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| StoreError::Invalid { path: p.clone(), what: format!("cannot encode the list: {e}") })?;
        fsutil::write_atomic(&p, true, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))
    }

    /// The entry for the copy `url` names (relative to `base`, the lightning dir).
    pub fn find(&self, url: &str, base: &Path) -> Option<&Entry> {
        self.behind.iter().find(|e| same_copy(&e.url, url, base))
    }

    /// Lists `url` unless it is; true when the list changed.
    pub fn add(&mut self, url: &str, since_version: u32, base: &Path) -> bool {
        if self.find(url, base).is_some() {
            return false;
        }
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.behind.push(Entry { url: url.to_string(), since_version, since });
        true
    }

    /// Takes the copy `url` names off the list; true when the list changed.
    pub fn remove(&mut self, url: &str, base: &Path) -> bool {
        let before = self.behind.len();
        self.behind.retain(|e| !same_copy(&e.url, url, base));
        self.behind.len() != before
    }

    /// How a listed copy is described to the operator.
    pub fn describe(e: &Entry) -> String {
        format!(
            "it lacks writes lightningd committed: it fell behind at data_version {} ({}, listed in {FILE_NAME})",
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
        let base = d.path();
        assert_eq!(Behind::load(base), Listing::Missing);
        let b_url = format!("file://{}/b.bkp", base.display());
        let mut b = Behind::default();
        assert!(b.add(&b_url, 7, base) && !b.add(&format!("{b_url}/"), 9, base), "one copy, two spellings");
        b.save(base).unwrap();
        assert_eq!(Behind::load(base), Listing::Kept(b.clone()));
        assert_eq!(b.find(&format!("{b_url}/"), base).map(|e| e.since_version), Some(7));
        assert!(b.remove(&format!("{b_url}/"), base) && !b.remove(&b_url, base));
        std::fs::write(path(base), b"{\"behind\": [").unwrap();
        let Listing::Unreadable(e) = Behind::load(base) else { panic!("a damaged list read") };
        assert!(e.contains(FILE_NAME) && e.contains("remove-destination"), "{e}");
        assert!(Behind::load_or_empty(base).is_err());
    }
}
