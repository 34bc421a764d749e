//! The one writer of a backup: creates it, opens it (lock, leftovers, torn tail), and appends
//! each db_write call durably before the plugin answers.
//!
//! Durability: a record is written with one `pwrite` at the end of the journal and then
//! `fdatasync`ed; only then is the call acknowledged. Dropping the last transaction (it was
//! never committed) truncates the journal and fsyncs before anything new is written, so a
//! crash cannot leave new bytes over old ones.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::journal::{self, Base, Header, JournalReader, Kind};
use crate::layout::{GenName, Layout};
use crate::snapshot;
use crate::versions::{self, Decision, Position};

/// What opening the backup found and repaired, for the log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// A torn final record that was cut off: (offset, bytes).
    pub torn_tail: Option<(u64, u64)>,
    /// Files of interrupted compactions that were removed.
    pub removed: Vec<PathBuf>,
}

/// What one db_write call did to the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Appended,
    /// The previous transaction at this version was never committed and was replaced.
    Replaced,
}

/// A reason to stop lightningd, or a storage failure.
#[derive(Debug)]
pub enum Refusal {
    Versions(String),
    Store(StoreError),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Versions(m) => f.write_str(m),
            Refusal::Store(e) => f.write_str(&e.explain()),
        }
    }
}

pub struct Writer {
    layout: Layout,
    _lock: File,
    file: File,
    path: PathBuf,
    header: Header,
    end: u64,
    position: Position,
    last_tx_offset: Option<u64>,
    records: u64,
    buf: Vec<u8>,
    pub last_write: Option<SystemTime>,
    /// Set after a failed write: the file's tail is unknown until reopened.
    poisoned: bool,
    /// How many times a transaction was dropped (bytes after its offset changed).
    truncations: u64,
    snapshot_bytes: u64,
    /// Records before the last transaction: the count once it is dropped.
    records_before_last_tx: u64,
}

/// What a compaction may fold: everything before the last transaction, which stays in the
/// journal until lightningd is known to have committed it. Those bytes never change.
#[derive(Debug, Clone)]
pub struct Plan {
    pub generation: u64,
    pub base: Base,
    pub journal: PathBuf,
    pub snapshot: Option<PathBuf>,
    pub fold_end: u64,
    pub truncations: u64,
}

/// A new generation, built and pre-copied outside the writer's lock.
pub struct NextGeneration {
    pub header: Header,
    /// The new journal's temp file: header plus old bytes [fold_end, copied_to).
    pub tmp: File,
    pub tmp_path: PathBuf,
    pub final_path: PathBuf,
    pub fold_end: u64,
    pub copied_to: u64,
    pub truncations: u64,
    pub records_folded: u64,
}

/// Takes the writer's lock of a backup directory, or says who holds it.
pub fn lock(layout: &Layout) -> Result<File> {
    let path = layout.lock_path();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(StoreError::io("open lock file", &path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: layout.root.clone() }),
        Err(fs::TryLockError::Error(e)) => Err(StoreError::io("lock", &path)(e)),
    }
}

/// Creates a new backup at `root`, from a database image at `base` (path, data_version) or
/// empty. All or nothing: built in a temp directory, then renamed into place.
pub fn create(root: &Path, base: Option<(&Path, u32)>) -> Result<Layout> {
    create_with_records(root, base, &[])
}

/// As `create`, with a journal that already holds `records` (framed, after the base).
pub fn create_with_records(root: &Path, base: Option<(&Path, u32)>, records: &[u8]) -> Result<Layout> {
    let parent = fsutil::parent_of(root);
    if !parent.is_dir() {
        return Err(StoreError::Invalid {
            path: parent.into(),
            what: "the backup's parent directory does not exist (is the backup disk mounted?)".into(),
        });
    }
    if fs::symlink_metadata(root).is_ok() {
        return Err(StoreError::Exists { path: root.into() });
    }
    let tmp = fsutil::tmp_path(root);
    let _ = fs::remove_dir_all(&tmp);
    fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(StoreError::io("create directory", &tmp))?;
    let result = (|| {
        let staging = Layout::new(&tmp);
        let g = GenName { generation: 1, base_version: base.map_or(0, |b| b.1) };
        let header = match base {
            Some((db, v)) => {
                snapshot::write(&staging.snapshot_path(g), 1, v, db, &mut crate::fsutil::Throttle::unlimited())?;
                Header { generation: 1, base: Base::Snapshot(v) }
            }
            None => Header { generation: 1, base: Base::Empty },
        };
        write_journal(&staging.journal_path(g), &header, records)?;
        fsutil::fsync_dir(&tmp)?;
        fs::rename(&tmp, root).map_err(StoreError::io("rename into place", root))?;
        fsutil::fsync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|_| Layout::new(root))
}

/// Writes a new journal file: header then `records` (already framed), durably.
pub fn write_journal(path: &Path, header: &Header, records: &[u8]) -> Result<()> {
    fsutil::write_atomic(path, false, |f, tmp| {
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(records);
        f.write_all_at(&bytes, 0).map_err(StoreError::io("write journal", tmp))
    })
}

impl Writer {
    /// Opens an existing backup for writing: takes the lock, removes leftovers of interrupted
    /// compactions, checks every record and cuts a torn tail.
    pub fn open(root: &Path) -> Result<(Writer, OpenReport)> {
        let layout = Layout::new(root);
        layout.list()?; // says clearly what is wrong before we create a lock file in it
        let lock = lock(&layout)?;
        let listing = layout.list()?;
        let mut report = OpenReport::default();
        for p in &listing.leftovers {
            let r = if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) };
            r.map_err(StoreError::io("remove leftover", p))?;
            report.removed.push(p.clone());
        }
        if !report.removed.is_empty() {
            fsutil::fsync_dir(&layout.root)?;
        }
        let path = listing.journal.clone();
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(StoreError::io("open journal", &path))?;
        let reader_file = file.try_clone().map_err(StoreError::io("open journal", &path))?;
        let mut reader = JournalReader::from_file(&path, reader_file)?;
        let header = reader.header;
        if header.generation != listing.current.generation || header.base.version() != listing.current.base_version {
            return Err(StoreError::Damaged {
                path: path.clone(),
                offset: 0,
                what: "journal header does not match its file name".into(),
            });
        }
        if let Base::Snapshot(_) = header.base {
            if listing.snapshot.is_none() {
                return Err(StoreError::Invalid {
                    path: layout.snapshot_path(listing.current),
                    what: "the journal's snapshot is missing".into(),
                });
            }
        }
        let mut position = Position { version: header.base.version(), droppable: false };
        let mut last_tx_offset = None;
        let mut records = 0;
        let mut records_before_last_tx = 0;
        while let Some(rec) = reader.next_record()? {
            check_chain(&path, position, &rec)?;
            if rec.kind == Kind::Transaction {
                position = Position { version: rec.data_version, droppable: true };
                last_tx_offset = Some(rec.offset);
                records_before_last_tx = records;
            }
            records += 1;
        }
        let end = reader.position();
        if let Some(t) = reader.torn_tail {
            file.set_len(end).and_then(|_| file.sync_all()).map_err(StoreError::io("truncate torn tail", &path))?;
            report.torn_tail = Some(t);
        }
        let last_write = fs::metadata(&path).and_then(|m| m.modified()).ok();
        let w = Writer {
            layout,
            _lock: lock,
            file,
            path,
            header,
            end,
            position,
            last_tx_offset,
            records,
            buf: Vec::with_capacity(1 << 16),
            last_write,
            poisoned: false,
            truncations: 0,
            records_before_last_tx,
            snapshot_bytes: listing.snapshot.as_ref().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len()),
        };
        Ok((w, report))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn journal_path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> Header {
        self.header
    }
    pub fn position(&self) -> Position {
        self.position
    }
    pub fn journal_len(&self) -> u64 {
        self.end
    }
    /// Bytes of the current snapshot file (0 for an empty base).
    pub fn snapshot_len(&self) -> u64 {
        self.snapshot_bytes
    }
    pub fn snapshot_path(&self) -> Option<PathBuf> {
        let g = GenName { generation: self.header.generation, base_version: self.header.base.version() };
        matches!(self.header.base, Base::Snapshot(_)).then(|| self.layout.snapshot_path(g))
    }
    /// Records in the journal since its snapshot.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Applies one db_write call: decides by the version rules, then writes durably.
    pub fn apply<S: AsRef<str>>(&mut self, data_version: u32, writes: &[S]) -> std::result::Result<Applied, Refusal> {
        let kind = versions::classify(data_version, writes).map_err(Refusal::Versions)?;
        let decision = versions::decide(self.position, data_version, kind);
        if let Some(m) = decision.halt_message() {
            return Err(Refusal::Versions(m));
        }
        let applied = if decision == Decision::ReplaceLast {
            self.drop_last_transaction().map_err(Refusal::Store)?;
            Applied::Replaced
        } else {
            Applied::Appended
        };
        self.append(data_version, kind, writes).map_err(Refusal::Store)?;
        Ok(applied)
    }

    /// Appends one record and makes it durable.
    pub fn append<S: AsRef<str>>(&mut self, data_version: u32, kind: Kind, writes: &[S]) -> Result<()> {
        self.check_poisoned()?;
        self.buf.clear();
        journal::encode_record(&mut self.buf, data_version, kind, writes);
        self.write_buf(data_version, kind)
    }

    /// Writes the framed record in `buf` at the end and makes it durable.
    fn write_buf(&mut self, data_version: u32, kind: Kind) -> Result<()> {
        self.check_poisoned()?;
        let offset = self.end;
        let r = self.file.write_all_at(&self.buf, offset).and_then(|_| self.file.sync_data());
        if let Err(e) = r {
            // Best effort: take the partial record back; the next open cuts it anyway.
            self.poisoned = self.file.set_len(offset).and_then(|_| self.file.sync_all()).is_err();
            return Err(StoreError::io("append to journal", &self.path)(e));
        }
        self.end += self.buf.len() as u64;
        self.records += 1;
        self.last_write = Some(SystemTime::now());
        if kind == Kind::Transaction {
            self.position = Position { version: data_version, droppable: true };
            self.last_tx_offset = Some(offset);
            self.records_before_last_tx = self.records - 1;
        }
        Ok(())
    }

    /// Applies one record framed (and maybe sealed) by the client of a remote destination:
    /// the version rules must agree with `replace_last`, then it is written as is, durably.
    pub fn append_framed(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> std::result::Result<(), Refusal> {
        let decision = versions::decide(self.position, data_version, kind);
        if let Some(m) = decision.halt_message() {
            return Err(Refusal::Versions(m));
        }
        if (decision == Decision::ReplaceLast) != replace_last {
            return Err(Refusal::Versions(format!(
                "the client asked to {} data_version {data_version}, but this backup is at {} ({}): \
                 client and backup disagree; check that only one node writes this backup",
                if replace_last { "replace the last transaction with" } else { "append" },
                self.position.version,
                if self.position.droppable { "its last transaction can be replaced" } else { "nothing to replace" },
            )));
        }
        if replace_last {
            self.drop_last_transaction().map_err(Refusal::Store)?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(record);
        self.buf = buf;
        self.write_buf(data_version, kind).map_err(Refusal::Store)
    }

    /// Offset of the last transaction record, if the journal has one.
    pub fn last_transaction_offset(&self) -> Option<u64> {
        self.last_tx_offset
    }

    /// Drops the last transaction record and everything after it.
    fn drop_last_transaction(&mut self) -> Result<()> {
        self.check_poisoned()?;
        let Some(offset) = self.last_tx_offset else {
            return Err(StoreError::Invalid { path: self.path.clone(), what: "no transaction to drop".into() });
        };
        self.file
            .set_len(offset)
            .and_then(|_| self.file.sync_all())
            .map_err(StoreError::io("truncate journal", &self.path))?;
        self.records = self.records_before_last_tx;
        self.end = offset;
        self.position = Position { version: self.position.version.wrapping_sub(1), droppable: false };
        self.last_tx_offset = None;
        self.truncations += 1;
        Ok(())
    }

    pub fn truncations(&self) -> u64 {
        self.truncations
    }

    /// What a compaction may fold now, or None when nothing precedes the last transaction.
    pub fn plan(&self) -> Option<Plan> {
        let fold_end = self.last_tx_offset?;
        if fold_end <= journal::HEADER_LEN {
            return None;
        }
        Some(Plan {
            generation: self.header.generation,
            base: self.header.base,
            journal: self.path.clone(),
            snapshot: self.snapshot_path(),
            fold_end,
            truncations: self.truncations,
        })
    }

    /// Makes `next` the backup: copies what was appended since the pre-copy, fsyncs, renames
    /// (the commit point), fsyncs the directory, and continues on the new journal. The
    /// caller holds the writer's lock for exactly this long.
    pub fn switch_to(&mut self, mut next: NextGeneration) -> Result<()> {
        self.check_poisoned()?;
        let io = |op| StoreError::io(op, &next.tmp_path);
        if self.truncations != next.truncations {
            // The last transaction was replaced meanwhile: the pre-copied tail is stale.
            next.tmp.set_len(journal::HEADER_LEN).map_err(io("truncate"))?;
            next.copied_to = next.fold_end;
        }
        let delta = self.end - next.copied_to;
        let mut buf = vec![0u8; delta as usize];
        self.file.read_exact_at(&mut buf, next.copied_to).map_err(StoreError::io("read journal", &self.path))?;
        let at = journal::HEADER_LEN + (next.copied_to - next.fold_end);
        next.tmp.write_all_at(&buf, at).map_err(io("write"))?;
        next.tmp.set_len(at + delta).and_then(|_| next.tmp.sync_all()).map_err(io("fsync"))?;
        fs::rename(&next.tmp_path, &next.final_path).map_err(StoreError::io("rename into place", &next.final_path))?;
        // From here on the new generation is the backup: if we cannot continue on it, no
        // write may go to the old journal any more.
        let reopened = fsutil::fsync_dir(&self.layout.root).and_then(|_| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&next.final_path)
                .map_err(StoreError::io("open journal", &next.final_path))
        });
        let file = match reopened {
            Ok(f) => f,
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        };
        let shift = |off: u64| off - next.fold_end + journal::HEADER_LEN;
        self.file = file;
        self.path = next.final_path;
        self.header = next.header;
        self.end = shift(self.end);
        self.last_tx_offset = self.last_tx_offset.map(shift);
        self.records -= next.records_folded;
        self.records_before_last_tx -= next.records_folded;
        self.snapshot_bytes = self.snapshot_path().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len());
        Ok(())
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: "an earlier write failed and could not be taken back; restart to recover".into(),
            });
        }
        Ok(())
    }
}

/// Every record must follow from the one before by the version rules (replacements were
/// already cut by the writer, so only appends are valid in a file).
pub fn check_chain(path: &Path, pos: Position, rec: &journal::Record) -> Result<()> {
    match versions::decide(pos, rec.data_version, rec.kind) {
        Decision::Append => Ok(()),
        _ => Err(StoreError::Damaged {
            path: path.into(),
            offset: rec.offset,
            what: format!(
                "version chain broken: a {} at data_version {} follows version {}",
                match rec.kind {
                    Kind::Transaction => "transaction",
                    Kind::Outside => "statement",
                },
                rec.data_version,
                pos.version
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(v: u32, stmt: &str) -> Vec<String> {
        vec![
            stmt.to_string(),
            format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1),
        ]
    }

    #[test]
    fn create_open_append_replace_reopen() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        create(&root, None).unwrap();
        assert!(matches!(create(&root, None), Err(StoreError::Exists { .. })));
        let (mut w, rep) = Writer::open(&root).unwrap();
        assert!(rep.torn_tail.is_none() && rep.removed.is_empty());
        assert_eq!(w.apply(1, &tx(1, "A")).unwrap(), Applied::Appended);
        assert_eq!(w.apply(1, &["PRAGMA foreign_keys = OFF;".to_string()]).unwrap(), Applied::Appended);
        assert_eq!(w.apply(2, &tx(2, "B")).unwrap(), Applied::Appended);
        assert_eq!(w.apply(2, &tx(2, "B2")).unwrap(), Applied::Replaced);
        assert_eq!(w.records(), 3);
        assert!(matches!(w.apply(5, &tx(5, "C")), Err(Refusal::Versions(m)) if m.starts_with("Backup is out of date")));
        // a second writer is refused while this one lives
        assert!(matches!(Writer::open(&root), Err(StoreError::Locked { .. })));
        drop(w);
        let (w, _) = Writer::open(&root).unwrap();
        assert_eq!(w.position(), Position { version: 2, droppable: true });
        assert_eq!(w.records(), 3);
    }

    #[test]
    fn create_refuses_missing_parent() {
        let e = create(Path::new("/nonexistent-xyz/b.bkp"), None).unwrap_err();
        assert!(e.to_string().contains("parent directory does not exist"), "{e}");
    }

    #[test]
    fn leftovers_removed_on_open() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        create(&root, None).unwrap();
        let stale = root.join("0000000000000002-00000005.snapshot");
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(root.join("0000000000000002-00000005.journal.tmp"), b"x").unwrap();
        let (_w, rep) = Writer::open(&root).unwrap();
        assert_eq!(rep.removed.len(), 2);
        assert!(!stale.exists());
    }
}
