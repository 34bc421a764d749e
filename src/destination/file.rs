//! The file destination: a backup directory on a mounted filesystem (a local disk, a USB
//! disk, NFS). Its layout, writer and reader are `layout`, `writer` and `reader`; this is
//! the seam's face of them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::json;

use super::{Destination, GenerationFiles, Tip};
use crate::compact::lock;
use crate::error::StoreError;
use crate::journal::Kind;
use crate::keys::KeySource;
use crate::writer::{self, Writer};

pub struct FileDestination {
    url: String,
    root: PathBuf,
    writer: Arc<Mutex<Writer>>,
}

impl FileDestination {
    /// Opens the backup at `root` as its one writer. Also gives, in words, what opening
    /// repaired (a torn tail cut, leftovers of a compaction removed).
    pub fn open(url: &str, root: &Path, keys: &KeySource) -> Result<(FileDestination, Vec<String>), String> {
        let (w, report) =
            Writer::open(root, keys).map_err(|e| format!("Cannot open the backup at {url}: {}", e.explain()))?;
        let mut notes = Vec::new();
        if !report.removed.is_empty() {
            let names: Vec<_> =
                report.removed.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect();
            notes.push(format!(
                "Removed {} leftover file(s) of an interrupted compaction in {url}: {}",
                names.len(),
                names.join(", ")
            ));
        }
        if let Some((off, len)) = report.torn_tail {
            notes.push(format!(
                "Cut a torn record of {len} bytes at offset {off} of {}: a write cut short by a crash, never \
                 acknowledged to lightningd",
                w.journal_path().display()
            ));
        }
        let d = FileDestination { url: url.to_string(), root: root.to_path_buf(), writer: Arc::new(Mutex::new(w)) };
        Ok((d, notes))
    }

    /// The current generation's files, for seeding another copy from this one.
    pub fn generation_files(w: &Writer) -> GenerationFiles {
        GenerationFiles {
            generation: w.header().generation,
            snapshot: w.snapshot_path(),
            journal: w.journal_path().to_path_buf(),
            journal_len: w.journal_len(),
        }
    }
}

pub fn tip_of(w: &Writer) -> Tip {
    Tip {
        position: w.position(),
        generation: w.header().generation,
        journal_len: w.journal_len(),
        last_crc: w.last_crc(),
        last_tx_offset: w.last_tx_offset(),
    }
}

impl Destination for FileDestination {
    fn url(&self) -> &str {
        &self.url
    }
    fn kind(&self) -> &'static str {
        "file"
    }
    fn tip(&self) -> Tip {
        tip_of(&lock(&self.writer))
    }
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        if replace_last {
            w.drop_last_transaction()?;
        }
        w.append_framed(data_version, kind, record)
    }
    fn seal_for_next(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        statements: &[&str],
        out: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        lock(&self.writer).seal_for_next(data_version, kind, replace_last, statements, out)
    }
    fn append_copy(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        if replace_last {
            w.drop_last_transaction()?;
        }
        w.append_copy(data_version, kind, record)
    }
    fn backup_id(&self) -> Option<crate::seal::BackupId> {
        crate::meta::Meta::load(&self.root).ok().flatten().filter(|m| m.sealed).and_then(|m| m.id())
    }
    fn bytes(&self) -> u64 {
        let w = lock(&self.writer);
        w.journal_len() + w.snapshot_len()
    }
    fn last_write(&self) -> Option<SystemTime> {
        lock(&self.writer).last_write
    }
    fn details(&self) -> serde_json::Value {
        let w = lock(&self.writer);
        json!({
            "path": self.root,
            "journal": w.journal_path(),
            "generation": w.header().generation,
            "sealed": w.is_sealed(),
            "key_fingerprint": w.key_fingerprint(),
        })
    }
    fn writer(&self) -> Option<Arc<Mutex<Writer>>> {
        Some(self.writer.clone())
    }
    fn install(&mut self, from: &GenerationFiles) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        writer::install_generation(&self.root, from)?;
        w.reopen().map(|_| ())
    }
}
