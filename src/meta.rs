//! `backup.json`: what a backup records about itself besides its data: whether it is
//! sealed, its random id (bound into every seal), the fingerprint of its key, and where
//! the key was at init (the lightning dir, or a key file). Written atomically, mode 0600;
//! rewritten only to fill in the fingerprint when the key is first read, and by `encrypt`.
//!
//! Backups made before sealing existed (format 1) have no `backup.json`: plaintext.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::keys::{self, Key, KeyError, KeySource};
use crate::seal::{BackupId, Sealer};

pub const META_FILE: &str = "backup.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub sealed: bool,
    /// 32 hex digits.
    pub backup_id: String,
    /// First 16 hex digits of SHA-256 of the key; None until the key is first read.
    pub key_fingerprint: Option<String>,
    /// A key file given at init (instead of the node's hsm_secret).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The node's lightning dir at init, where its hsm_secret is.
    #[serde(default)]
    pub lightning_dir: Option<PathBuf>,
}

impl Meta {
    /// A new sealed backup's metadata, with a fresh id.
    pub fn new_sealed(
        fingerprint: Option<String>,
        key_file: Option<PathBuf>,
        lightning_dir: Option<PathBuf>,
    ) -> Result<Meta> {
        let mut id = [0u8; 16];
        keys::random(&mut id).map_err(StoreError::io("read random bytes", "getrandom"))?;
        Ok(Meta { sealed: true, backup_id: keys::hex(&id), key_fingerprint: fingerprint, key_file, lightning_dir })
    }

    pub fn new_plain(lightning_dir: Option<PathBuf>) -> Meta {
        Meta { sealed: false, backup_id: String::new(), key_fingerprint: None, key_file: None, lightning_dir }
    }

    pub fn path(root: &Path) -> PathBuf {
        root.join(META_FILE)
    }

    /// None when the backup has no metadata (a format-1 backup: plaintext).
    pub fn load(root: &Path) -> Result<Option<Meta>> {
        let p = Meta::path(root);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            // No metadata, or `root` is no directory (which the caller reports better).
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Ok(None)
            }
            Err(e) => return Err(StoreError::io("read", &p)(e)),
        };
        let m: Meta = serde_json::from_slice(&text).map_err(|e| StoreError::Damaged {
            path: p.clone(),
            offset: 0,
            what: format!("not valid JSON: {e}"),
        })?;
        if m.sealed && m.id().is_none() {
            return Err(StoreError::Damaged { path: p, offset: 0, what: "backup_id is not 32 hex digits".into() });
        }
        Ok(Some(m))
    }

    /// Writes it into `root` durably (replacing what was there).
    pub fn store(&self, root: &Path) -> Result<()> {
        let p = Meta::path(root);
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| StoreError::Invalid { path: p.clone(), what: e.to_string() })?;
        fsutil::write_atomic(&p, true, |f, tmp| {
            std::io::Write::write_all(f, &body).map_err(StoreError::io("write", tmp))
        })
    }

    pub fn id(&self) -> Option<BackupId> {
        keys::unhex(&self.backup_id)?.try_into().ok()
    }

    /// Finds the key, checks it against the recorded fingerprint and makes a sealer.
    /// `Ok(None)`: no key found (the caller decides; `missing` says where it looked).
    pub fn sealer(&self, src: &KeySource) -> std::result::Result<Option<(Sealer, Key)>, KeyError> {
        let Some(key) = src.find(self.key_file.as_deref())? else {
            return Ok(None);
        };
        self.check(&key)?;
        let id = self.id().unwrap_or_default();
        let s = Sealer::new(&key, id).map_err(|source| KeyError::Io { path: "getrandom".into(), source })?;
        Ok(Some((s, key)))
    }

    /// A wrong key is refused by its fingerprint, before anything is read or written.
    pub fn check(&self, key: &Key) -> std::result::Result<(), KeyError> {
        match &self.key_fingerprint {
            Some(fp) if *fp != key.fingerprint() => {
                Err(KeyError::Wrong { expected: fp.clone(), given: key.fingerprint(), from: key.origin.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Where `sealer` looks, with this backup's recorded lightning dir added last.
    pub fn source_with_recorded(&self, mut src: KeySource) -> KeySource {
        if let Some(d) = &self.lightning_dir {
            if !src.search.contains(d) {
                src.search.push(d.clone());
            }
        }
        src
    }

    pub fn missing(&self, src: &KeySource) -> KeyError {
        KeyError::Missing { looked: src.places(self.key_file.as_deref()) }
    }
}

/// A key error as a storage error about the backup at `root`.
pub fn key_err(root: &Path) -> impl Fn(KeyError) -> StoreError + '_ {
    move |e| StoreError::Key { path: root.into(), what: e.to_string() }
}
