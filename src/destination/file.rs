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
        tail: w.tail(),
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
    /// Under the writer's lock, which a compaction's `switch_to` takes too.
    fn append_at(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        sealed: &[u8],
        place: &Tip,
        plain: &[u8],
    ) -> Result<(), StoreError> {
        let mut w = lock(&self.writer);
        let here = tip_of(&w).same_place(place);
        if replace_last {
            w.drop_last_transaction()?;
        }
        if here {
            w.append_copy(data_version, kind, sealed)
        } else {
            w.append_framed(data_version, kind, plain)
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal;
    use crate::meta::Meta;

    fn tx(v: u32) -> Vec<String> {
        vec![
            format!("INSERT INTO t VALUES ({v})"),
            format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1),
        ]
    }

    /// A record sealed for a place this copy no longer has next (a compaction switched it,
    /// or another record went in first) is sealed again for where it goes, never stored as
    /// it is: its seal would not open there.
    #[test]
    fn append_at_a_stale_place_seals_for_the_place_it_takes() {
        let d = tempfile::tempdir().unwrap();
        let (root, ldir) = (d.path().join("b.bkp"), d.path().join("ln"));
        std::fs::create_dir(&ldir).unwrap();
        std::fs::write(ldir.join("hsm_secret"), [9u8; 32]).unwrap();
        let meta = Meta::new_sealed(None, None, Some(ldir.clone())).unwrap();
        writer::create(&root, None, Some(&meta), None).unwrap();
        let keys = KeySource::lightning_dir(&ldir);
        let (mut dest, _) = FileDestination::open(&crate::layout::url_for(&root), &root, &keys).unwrap();
        let plain = |v: u32| {
            let mut b = Vec::new();
            journal::encode_record(&mut b, v, Kind::Transaction, &tx(v));
            b
        };
        let stale_place = dest.tip();
        // record 2 sealed for the place after the header...
        let sealer = lock(&dest.writer).sealer().unwrap().unwrap();
        let mut stale = Vec::new();
        let payloads = journal::Payloads::Sealed { sealer: &sealer, generation: stale_place.generation };
        journal::encode_record_as(&mut stale, stale_place.journal_len, 2, Kind::Transaction, &tx(2), payloads);
        // ...which record 1 takes first
        dest.append(1, Kind::Transaction, false, &plain(1)).unwrap();
        dest.append_at(2, Kind::Transaction, false, &stale, &stale_place, &plain(2)).unwrap();
        // at the place it was sealed for, sealed bytes are stored as they are
        let here = dest.tip();
        let mut fresh = Vec::new();
        let tx3: Vec<String> = tx(3);
        let stmts: Vec<&str> = tx3.iter().map(String::as_str).collect();
        assert!(dest.seal_for_next(3, Kind::Transaction, false, &stmts, &mut fresh).unwrap());
        dest.append_at(3, Kind::Transaction, false, &fresh, &here, &plain(3)).unwrap();
        let end = dest.tip().journal_len;
        drop(dest);
        let s = crate::restore::verify_with(&root, &keys, &mut |_, _| {}).unwrap();
        assert_eq!((s.version, s.records), (3, 3), "{s:?}");
        let j = std::fs::read(crate::layout::Layout::new(&root).list().unwrap().journal).unwrap();
        assert_eq!(&j[(end as usize - fresh.len())..end as usize], &fresh[..], "stored as it was sealed");
    }
}
