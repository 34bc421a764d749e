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
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::journal::{self, Base, Header, JournalReader, Kind, Payloads};
use crate::keys::KeySource;
use crate::layout::{GenName, Layout};
use crate::meta::{key_err, Meta};
use crate::seal::Sealer;
use crate::snapshot;
use crate::versions::{self, Decision, Position};

/// What opening the backup found and repaired, for the log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// A torn final record that was cut off: (offset, bytes).
    pub torn_tail: Option<(u64, u64)>,
    /// Files of interrupted compactions that were removed.
    pub removed: Vec<PathBuf>,
    /// An interrupted change of an empty backup's sealing was undone (`open_keyless`).
    pub sealing_change_undone: bool,
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

/// How the writer stores records. Follows the journal's header: a sealed journal never
/// gets a plaintext record.
enum Sealing {
    Plain,
    Ready(Arc<Sealer>),
    /// Sealed, the key not read yet (a new node has no hsm_secret before lightningd's
    /// first start): read at the first write.
    Pending {
        meta: Meta,
        keys: KeySource,
    },
    /// Sealed, and the key is never read here (`backup-cli server`): only records sealed by
    /// the node are stored.
    Keyless,
}

pub struct Writer {
    layout: Layout,
    sealing: Sealing,
    _lock: File,
    file: File,
    path: PathBuf,
    header: Header,
    end: u64,
    /// How far the journal is allocated and zero-filled (`fsutil::append_durable`).
    alloc: u64,
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
    /// The header CRC of the journal's last record (0 when it has none): with the
    /// position, what tells two copies of a backup apart.
    tail: u32,
    /// The same for the record before the last transaction: the last one once it is dropped.
    crc_before_last_tx: u32,
    /// Where the key is looked for, kept for `reopen`.
    keys: KeySource,
    /// Opened by `open_keyless`: no key is ever looked for.
    keyless: bool,
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
    /// The sealer of a sealed journal (None: plaintext, or the key is not read yet).
    pub sealer: Option<Arc<Sealer>>,
    pub sealed: bool,
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
/// empty. All or nothing: built in a temp directory, then renamed into place. With `meta`
/// it records it (backup.json); a sealed `meta` makes a sealed backup, for which `sealer`
/// is needed when there is a base or records to seal (else the key is read at the first
/// write).
pub fn create(root: &Path, base: Option<(&Path, u32)>, meta: Option<&Meta>, sealer: Option<&Sealer>) -> Result<Layout> {
    create_with_records(root, base, &[], meta, sealer)
}

/// As `create`, with a journal that already holds `records` (framed plaintext, after the
/// base); they are sealed when the backup is.
pub fn create_with_records(
    root: &Path,
    base: Option<(&Path, u32)>,
    records: &[u8],
    meta: Option<&Meta>,
    sealer: Option<&Sealer>,
) -> Result<Layout> {
    let sealed = meta.is_some_and(|m| m.sealed);
    let sealer = if sealed { sealer } else { None };
    if sealed && sealer.is_none() && (base.is_some() || !records.is_empty()) {
        return Err(StoreError::Invalid {
            path: root.into(),
            what: "a sealed backup of an existing database needs its key now".into(),
        });
    }
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
                let mut t = crate::fsutil::Throttle::unlimited();
                snapshot::write(&staging.snapshot_path(g), 1, v, db, &mut t, sealer)?;
                Header { generation: 1, base: Base::Snapshot(v), sealed }
            }
            None => Header { generation: 1, base: Base::Empty, sealed },
        };
        let jpath = staging.journal_path(g);
        let records = match sealer {
            Some(s) => std::borrow::Cow::Owned(journal::transcode(
                &jpath,
                records,
                journal::HEADER_LEN,
                Payloads::Plain,
                journal::HEADER_LEN,
                Payloads::Sealed { sealer: s, generation: 1 },
            )?),
            None => std::borrow::Cow::Borrowed(records),
        };
        if let Some(m) = meta {
            m.store(&tmp)?;
        }
        write_journal(&jpath, &header, &records)?;
        fsutil::fsync_dir(&tmp)?;
        fs::rename(&tmp, root).map_err(StoreError::io("rename into place", root))?;
        fsutil::fsync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|_| Layout::new(root))
}

/// Makes another copy's generation the current one of the backup at `root`: its snapshot,
/// then its journal up to `journal_len` (each tmp, write, fsync, rename, fsync dir; the
/// journal's rename is the commit point), then removes newer generations so it is current.
/// Older files are leftovers that the next open removes.
pub fn install_generation(root: &Path, from: &crate::destination::GenerationFiles) -> Result<()> {
    let layout = Layout::new(root);
    let header = journal::JournalReader::open(&from.journal)?.header;
    if header.generation != from.generation {
        return Err(StoreError::Invalid {
            path: from.journal.clone(),
            what: "generation changed while copying".into(),
        });
    }
    let g = GenName { generation: header.generation, base_version: header.base.version() };
    let copy = |src: &Path, dst: &Path, len: Option<u64>| {
        fsutil::write_atomic(dst, true, |f, tmp| {
            let mut input = File::open(src).map_err(StoreError::io("open", src))?;
            let copied = match len {
                Some(n) => std::io::copy(&mut std::io::Read::take(&mut input, n), f),
                None => std::io::copy(&mut input, f),
            }
            .map_err(StoreError::io("copy into", tmp))?;
            match len {
                Some(n) if copied != n => {
                    Err(StoreError::Invalid { path: src.into(), what: "shorter than expected".into() })
                }
                _ => Ok(()),
            }
        })
    };
    // The backup's metadata (its id binds sealed records) comes along first.
    let meta = crate::meta::Meta::path(fsutil::parent_of(&from.journal));
    if meta.exists() {
        copy(&meta, &crate::meta::Meta::path(root), None)?;
    }
    if let Some(snap) = &from.snapshot {
        copy(snap, &layout.snapshot_path(g), None)?;
    }
    copy(&from.journal, &layout.journal_path(g), Some(from.journal_len))?;
    let mut removed = false;
    for entry in fs::read_dir(root).map_err(StoreError::io("list", root))? {
        let p = entry.map_err(StoreError::io("list", root))?.path();
        let newer = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(crate::layout::generation_of)
            .is_some_and(|n| n > g.generation);
        if newer {
            fs::remove_file(&p).map_err(StoreError::io("remove", &p))?;
            removed = true;
        }
    }
    if removed {
        fsutil::fsync_dir(root)?;
    }
    Ok(())
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
    /// A sealed backup's key is looked for in `keys` (plus the key file or lightning dir
    /// recorded at init); if it is not there yet, it is read at the first write.
    pub fn open(root: &Path, keys: &KeySource) -> Result<(Writer, OpenReport)> {
        Writer::open_with(root, keys, false)
    }

    /// As `open`; `converting` allows the plaintext journal of a backup whose metadata
    /// already says sealed (an interrupted `backup-cli encrypt`, which calls this).
    pub fn open_with(root: &Path, keys: &KeySource, converting: bool) -> Result<(Writer, OpenReport)> {
        let layout = Layout::new(root);
        layout.list()?; // says clearly what is wrong before we create a lock file in it
        let lock = lock(&layout)?;
        Writer::open_locked(layout, lock, keys, converting, false)
    }

    /// As `open`, for a holder that never has the key (`backup-cli server`): a sealed
    /// backup takes only records sealed elsewhere, and no key is looked for, even where
    /// backup.json says it was.
    pub fn open_keyless(root: &Path) -> Result<(Writer, OpenReport)> {
        let layout = Layout::new(root);
        layout.list()?;
        let lock = lock(&layout)?;
        let undone = undo_cut_sealing_change(&layout)?;
        let (w, mut report) = Writer::open_locked(layout, lock, &KeySource::default(), false, true)?;
        report.sealing_change_undone = undone;
        Ok((w, report))
    }

    /// Opens the backup again, keeping the writer's lock: after another generation was
    /// installed under it.
    pub fn reopen(&mut self) -> Result<OpenReport> {
        let lock = self._lock.try_clone().map_err(StoreError::io("lock", self.layout.lock_path()))?;
        let keys = self.keys.clone();
        let (w, report) = Writer::open_locked(self.layout.clone(), lock, &keys, false, self.keyless)?;
        *self = w;
        Ok(report)
    }

    fn open_locked(
        layout: Layout,
        lock: File,
        keys: &KeySource,
        converting: bool,
        keyless: bool,
    ) -> Result<(Writer, OpenReport)> {
        let root = layout.root.clone();
        let root = root.as_path();
        let meta = Meta::load(root)?;
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
        let sealing = match (header.sealed, meta) {
            (false, Some(m)) if m.sealed && !converting => {
                return Err(StoreError::Invalid {
                    path: path.clone(),
                    what: "backup.json says sealed, but the current journal is plaintext: a conversion \
                           (`backup-cli encrypt`) was interrupted; run it again with lightningd stopped"
                        .into(),
                })
            }
            (false, _) => Sealing::Plain,
            (true, Some(m)) if m.sealed && keyless => Sealing::Keyless,
            (true, Some(m)) if m.sealed => {
                let keys = m.source_with_recorded(keys.clone());
                match m.sealer(&keys).map_err(key_err(root))? {
                    Some((s, key)) => {
                        record_first_key(root, &m, &keys, &key)?;
                        Sealing::Ready(Arc::new(s))
                    }
                    None => Sealing::Pending { meta: m, keys },
                }
            }
            (true, _) => {
                return Err(StoreError::Invalid {
                    path: Meta::path(root),
                    what: "the journal is sealed, but backup.json is missing or says plaintext: put back \
                           backup.json from a copy of this backup"
                        .into(),
                })
            }
        };
        let mut position = Position { version: header.base.version(), droppable: false };
        let mut last_tx_offset = None;
        let mut records = 0;
        let mut records_before_last_tx = 0;
        let (mut tail, mut crc_before_last_tx) = (0, 0);
        while let Some(rec) = reader.next_record()? {
            check_chain(&path, position, &rec)?;
            if rec.kind == Kind::Transaction {
                position = Position { version: rec.data_version, droppable: true };
                last_tx_offset = Some(rec.offset);
                records_before_last_tx = records;
                crc_before_last_tx = tail;
            }
            records += 1;
            tail = rec.header_crc();
        }
        let end = reader.position();
        if let Some(t) = reader.torn_tail {
            file.set_len(end).and_then(|_| file.sync_all()).map_err(StoreError::io("truncate torn tail", &path))?;
            report.torn_tail = Some(t);
        }
        let alloc = file.metadata().map_or(end, |m| m.len().max(end));
        let last_write = fs::metadata(&path).and_then(|m| m.modified()).ok();
        let w = Writer {
            layout,
            sealing,
            _lock: lock,
            file,
            path,
            header,
            end,
            alloc,
            position,
            last_tx_offset,
            records,
            buf: Vec::with_capacity(1 << 16),
            last_write,
            poisoned: false,
            truncations: 0,
            records_before_last_tx,
            tail,
            crc_before_last_tx,
            keys: keys.clone(),
            keyless,
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
    /// Whether records are sealed (format 2).
    pub fn is_sealed(&self) -> bool {
        self.header.sealed
    }
    /// The fingerprint of the key once it is read.
    pub fn key_fingerprint(&self) -> Option<&str> {
        match &self.sealing {
            Sealing::Ready(s) => Some(s.fingerprint()),
            _ => None,
        }
    }

    /// The sealer of a sealed journal, reading the key now if it was not read yet.
    /// None for a plaintext journal.
    pub fn sealer(&mut self) -> Result<Option<Arc<Sealer>>> {
        if let Sealing::Pending { meta, keys } = &self.sealing {
            let root = &self.layout.root;
            let Some((s, key)) = meta.sealer(keys).map_err(key_err(root))? else {
                return Err(key_err(root)(meta.missing(keys)));
            };
            record_first_key(root, meta, keys, &key)?;
            self.sealing = Sealing::Ready(Arc::new(s));
        }
        Ok(match &self.sealing {
            Sealing::Ready(s) => Some(s.clone()),
            _ => None,
        })
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

    /// Appends one record and makes it durable (sealed, in a sealed backup).
    pub fn append<S: AsRef<str>>(&mut self, data_version: u32, kind: Kind, writes: &[S]) -> Result<()> {
        self.check_poisoned()?;
        if matches!(self.sealing, Sealing::Pending { .. }) {
            self.sealer()?;
        }
        let offset = self.end;
        let payloads = match (&self.sealing, self.header.sealed) {
            (Sealing::Ready(s), true) => Payloads::Sealed { sealer: s, generation: self.header.generation },
            (Sealing::Plain, false) => Payloads::Plain,
            _ => return Err(self.no_key()),
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        journal::encode_record_as(&mut buf, offset, data_version, kind, writes, payloads);
        let r = self.write_record(data_version, kind, &buf);
        self.buf = buf;
        r
    }

    /// Appends one plaintext record framed by `journal::encode_record` (once, for every
    /// destination): as it is into a plaintext backup, sealed for its place into a sealed one.
    pub fn append_framed(&mut self, data_version: u32, kind: Kind, record: &[u8]) -> Result<()> {
        if !self.header.sealed {
            self.check_poisoned()?;
            return self.write_record(data_version, kind, record);
        }
        let statements =
            journal::statements_of(record).map_err(|what| StoreError::Invalid { path: self.path.clone(), what })?;
        self.append(data_version, kind, &statements)
    }

    /// Appends a record exactly as another copy of this backup holds it at the same place
    /// (same backup, generation and offset): bringing a lagging copy up to date.
    pub fn append_copy(&mut self, data_version: u32, kind: Kind, record: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.write_record(data_version, kind, record)
    }

    /// One write at the journal's end, then fdatasync; the state follows only on success.
    fn write_record(&mut self, data_version: u32, kind: Kind, record: &[u8]) -> Result<()> {
        let offset = self.end;
        if let Err(e) = fsutil::append_durable(&self.file, offset, record, &mut self.alloc) {
            // Best effort: take the partial record back; the next open cuts it anyway.
            self.alloc = offset;
            self.poisoned = self.file.set_len(offset).and_then(|_| self.file.sync_all()).is_err();
            return Err(StoreError::io("append to journal", &self.path)(e));
        }
        self.end += record.len() as u64;
        self.records += 1;
        if kind == Kind::Transaction {
            self.crc_before_last_tx = self.tail;
        }
        self.tail = journal::header_crc(record);
        self.last_write = Some(SystemTime::now());
        if kind == Kind::Transaction {
            self.position = Position { version: data_version, droppable: true };
            self.last_tx_offset = Some(offset);
            self.records_before_last_tx = self.records - 1;
        }
        Ok(())
    }

    /// The header CRC of the last record (0 for none).
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// Where the last transaction starts, while it can still be dropped.
    pub fn last_tx_offset(&self) -> Option<u64> {
        self.last_tx_offset
    }

    /// Applies one record framed (and maybe sealed) by the client of a remote destination
    /// (`backup-cli server`): the version rules must agree with `replace_last`, then it is
    /// written as it is, durably.
    pub fn apply_framed(
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
        self.append_copy(data_version, kind, record).map_err(Refusal::Store)
    }

    /// Frames and seals a db_write's statements for the place they take next here (where the last transaction starts, when it replaces it) into `out`, so that
    /// every copy of the backup at the same place can store the same bytes. False for a
    /// plaintext backup (`out` untouched).
    pub fn seal_for_next(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        statements: &[&str],
        out: &mut Vec<u8>,
    ) -> Result<bool> {
        if !self.header.sealed {
            return Ok(false);
        }
        let Some(sealer) = self.sealer()? else { return Err(self.no_key()) };
        let offset = match (replace_last, self.last_tx_offset) {
            (false, _) => self.end,
            (true, Some(o)) => o,
            (true, None) => {
                return Err(StoreError::Invalid { path: self.path.clone(), what: "no transaction to drop".into() })
            }
        };
        out.clear();
        let payloads = Payloads::Sealed { sealer: &sealer, generation: self.header.generation };
        journal::encode_record_as(out, offset, data_version, kind, statements, payloads);
        Ok(true)
    }

    /// Drops the last transaction record and everything after it.
    pub fn drop_last_transaction(&mut self) -> Result<()> {
        self.check_poisoned()?;
        let Some(offset) = self.last_tx_offset else {
            return Err(StoreError::Invalid { path: self.path.clone(), what: "no transaction to drop".into() });
        };
        if let Err(e) = self.file.set_len(offset).and_then(|_| self.file.sync_all()) {
            // The file's end is unknown now: no append may follow until it is reopened.
            self.poisoned = true;
            return Err(StoreError::io("truncate journal", &self.path)(e));
        }
        self.records = self.records_before_last_tx;
        self.end = offset;
        self.alloc = offset;
        self.position = Position { version: self.position.version.wrapping_sub(1), droppable: false };
        self.last_tx_offset = None;
        self.truncations += 1;
        self.tail = self.crc_before_last_tx;
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
            sealer: match &self.sealing {
                Sealing::Ready(s) => Some(s.clone()),
                _ => None,
            },
            sealed: self.header.sealed,
        })
    }

    /// Everything an offline rewrite (`compact::seal_offline`) may fold: all before the
    /// last transaction, or everything when there is none.
    pub fn plan_all(&self) -> Plan {
        Plan {
            generation: self.header.generation,
            base: self.header.base,
            journal: self.path.clone(),
            snapshot: self.snapshot_path(),
            fold_end: self.last_tx_offset.unwrap_or(self.end),
            truncations: self.truncations,
            sealer: None,
            sealed: self.header.sealed,
        }
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
        if delta == 0 {
            // all in place already (a server's tail comes resealed by the node)
        } else if let Sealing::Ready(s) = &self.sealing {
            // Sealed records are bound to their generation and offset: reseal (same length).
            let from = Payloads::Sealed { sealer: s, generation: self.header.generation };
            let to = Payloads::Sealed { sealer: s, generation: next.header.generation };
            buf = journal::transcode(&self.path, &buf, next.copied_to, from, at, to)?;
        } else if self.header.sealed {
            return Err(self.no_key());
        }
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
        self.alloc = self.end;
        self.last_tx_offset = self.last_tx_offset.map(shift);
        self.records -= next.records_folded;
        self.records_before_last_tx -= next.records_folded;
        // resealed records carry new checksums: the end is named by the new ones
        match self.read_tail() {
            Ok((tail, before)) => (self.tail, self.crc_before_last_tx) = (tail, before),
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        }
        self.snapshot_bytes = self.snapshot_path().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len());
        Ok(())
    }

    /// The header CRCs of the last record and of the one before the last transaction,
    /// read back from the journal's record headers.
    fn read_tail(&self) -> Result<(u32, u32)> {
        let (mut tail, mut before) = (0, 0);
        let off = journal::walk_headers(&self.file, &self.path, journal::HEADER_LEN, self.end, |off, h| {
            if Some(off) == self.last_tx_offset {
                before = tail;
            }
            tail = journal::header_crc(h);
        })?;
        if off != self.end {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                offset: off,
                what: format!("records run past the journal's end ({})", self.end),
            });
        }
        Ok((tail, before))
    }

    /// A sealed journal and no key in hand: nothing may be written, least of all plaintext.
    fn no_key(&self) -> StoreError {
        StoreError::Invalid {
            path: self.path.clone(),
            what: "the journal is sealed and its key has not been read: nothing is written".into(),
        }
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

/// Makes an empty journal one with only `header`, as one step (tmp, write, fsync, rename,
/// fsync dir): how a server's empty backup takes the sealing of the node's backup.json,
/// written after it (`Hosted::put_meta`).
pub fn replace_empty_journal(path: &Path, header: Header) -> Result<()> {
    let bytes = header.encode();
    fsutil::write_atomic(path, true, |f, tmp| f.write_all_at(&bytes, 0).map_err(StoreError::io("write", tmp)))
}

/// A cut sealing change (`replace_empty_journal`, then backup.json, with a crash between)
/// leaves the journal's header disagreeing with backup.json over a journal that holds
/// nothing. The header is put back as backup.json says: the backup as it was before the
/// change, which was never acknowledged. True if it was.
fn undo_cut_sealing_change(layout: &Layout) -> Result<bool> {
    let listing = layout.list()?;
    let mut r = JournalReader::open(&listing.journal)?;
    if listing.snapshot.is_some() || r.header.base != Base::Empty || r.next_record()?.is_some() {
        return Ok(false);
    }
    // Without backup.json there is nothing to follow: the open says what to put back.
    let Some(meta) = Meta::load(&layout.root)? else { return Ok(false) };
    let sealed = meta.sealed;
    if r.header.sealed == sealed {
        return Ok(false);
    }
    replace_empty_journal(&listing.journal, Header { sealed, ..r.header })?;
    Ok(true)
}

/// The first time a sealed backup's key is read (a backup made before the node had an
/// hsm_secret), backup.json gets its fingerprint, and the lightning dir it came from, so
/// that offline tools find it too.
fn record_first_key(root: &Path, meta: &Meta, keys: &KeySource, key: &crate::keys::Key) -> Result<()> {
    if meta.key_fingerprint.is_some() {
        return Ok(());
    }
    let ldir = meta.lightning_dir.clone().or_else(|| {
        (meta.key_file.is_none() && keys.hsm_secret.is_none() && keys.key_file.is_none())
            .then(|| keys.search.iter().find(|d| d.join(crate::keys::HSM_SECRET).exists()).cloned())
            .flatten()
            .map(|d| std::path::absolute(&d).unwrap_or(d))
    });
    Meta { key_fingerprint: Some(key.fingerprint()), lightning_dir: ldir, ..meta.clone() }.store(root)
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
        create(&root, None, None, None).unwrap();
        assert!(matches!(create(&root, None, None, None), Err(StoreError::Exists { .. })));
        let (mut w, rep) = Writer::open(&root, &KeySource::default()).unwrap();
        assert!(rep.torn_tail.is_none() && rep.removed.is_empty());
        assert_eq!(w.apply(1, &tx(1, "A")).unwrap(), Applied::Appended);
        assert_eq!(w.apply(1, &["PRAGMA foreign_keys = OFF;".to_string()]).unwrap(), Applied::Appended);
        assert_eq!(w.apply(2, &tx(2, "B")).unwrap(), Applied::Appended);
        assert_eq!(w.apply(2, &tx(2, "B2")).unwrap(), Applied::Replaced);
        assert_eq!(w.records(), 3);
        assert!(matches!(w.apply(5, &tx(5, "C")), Err(Refusal::Versions(m)) if m.starts_with("Backup is out of date")));
        // a second writer is refused while this one lives
        assert!(matches!(Writer::open(&root, &KeySource::default()), Err(StoreError::Locked { .. })));
        drop(w);
        let (w, _) = Writer::open(&root, &KeySource::default()).unwrap();
        assert_eq!(w.position(), Position { version: 2, droppable: true });
        assert_eq!(w.records(), 3);
    }

    #[test]
    fn appends_go_into_zero_filled_room_and_reopen_finds_the_end() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        create(&root, None, None, None).unwrap();
        let (mut w, _) = Writer::open(&root, &KeySource::default()).unwrap();
        for v in 1..=50 {
            w.apply(v, &tx(v, "INSERT INTO t VALUES (1)")).unwrap();
        }
        let (end, path) = (w.journal_len(), w.journal_path().to_path_buf());
        let physical = std::fs::metadata(&path).unwrap().len();
        assert_eq!(physical % fsutil::PREALLOC, 0, "allocated in whole steps");
        assert!(physical > end);
        w.apply(51, &tx(51, "INSERT INTO t VALUES (2)")).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), physical, "no growth for an append that fits");
        w.apply(51, &tx(51, "INSERT INTO t VALUES (3)")).unwrap(); // replaced: truncated, then grown again
        let end = w.journal_len();
        drop(w);
        let (mut w, rep) = Writer::open(&root, &KeySource::default()).unwrap();
        assert!(rep.torn_tail.is_none(), "padding is not a torn tail");
        assert_eq!((w.journal_len(), w.position().version, w.records()), (end, 51, 51));
        // a crash mid-append into the padding: the partial record is cut at the next open
        w.apply(52, &tx(52, "INSERT INTO t VALUES (4)")).unwrap();
        let end = w.journal_len();
        drop(w);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let mut half = Vec::new();
        journal::encode_record(&mut half, 53, Kind::Transaction, &tx(53, "INSERT INTO t VALUES (5)"));
        f.write_all_at(&half[..half.len() / 2], end).unwrap();
        let (w, rep) = Writer::open(&root, &KeySource::default()).unwrap();
        assert_eq!(rep.torn_tail.map(|t| t.0), Some(end));
        assert_eq!((w.journal_len(), w.position().version), (end, 52));
    }

    #[test]
    fn sealed_backup_never_gets_plaintext() {
        let d = tempfile::tempdir().unwrap();
        let (root, ldir) = (d.path().join("b.bkp"), d.path().join("ln"));
        std::fs::create_dir(&ldir).unwrap();
        let meta = Meta::new_sealed(None, None, Some(ldir.clone())).unwrap();
        create(&root, None, Some(&meta), None).unwrap();
        let keys = KeySource::lightning_dir(&ldir);
        // no hsm_secret yet: the key is read at the first write, which fails without it
        let (mut w, _) = Writer::open(&root, &keys).unwrap();
        assert!(w.is_sealed() && w.key_fingerprint().is_none());
        let len = std::fs::metadata(w.journal_path()).unwrap().len();
        let e = w.apply(1, &tx(1, "INSERT INTO t VALUES ('secret')")).unwrap_err().to_string();
        assert!(e.contains("no key for this sealed backup") && e.contains("ln/hsm_secret"), "{e}");
        assert_eq!(std::fs::metadata(w.journal_path()).unwrap().len(), len, "nothing written");
        std::fs::write(ldir.join("hsm_secret"), [5u8; 32]).unwrap();
        w.apply(1, &tx(1, "INSERT INTO t VALUES ('secret')")).unwrap();
        let fp = w.key_fingerprint().unwrap().to_string();
        assert_eq!(Meta::load(&root).unwrap().unwrap().key_fingerprint.as_deref(), Some(fp.as_str()));
        let bytes = std::fs::read(w.journal_path()).unwrap();
        assert!(!bytes.windows(6).any(|x| x == b"secret"));
        drop(w);
        // another node's hsm_secret is refused at open, by fingerprint
        std::fs::write(ldir.join("hsm_secret"), [6u8; 32]).unwrap();
        let e = Writer::open(&root, &keys).err().unwrap().to_string();
        assert!(e.contains(&format!("sealed with key {fp}")), "{e}");
    }

    #[test]
    fn create_refuses_missing_parent() {
        let e = create(Path::new("/nonexistent-xyz/b.bkp"), None, None, None).unwrap_err();
        assert!(e.to_string().contains("parent directory does not exist"), "{e}");
    }

    #[test]
    fn leftovers_removed_on_open() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        create(&root, None, None, None).unwrap();
        let stale = root.join("0000000000000002-00000005.snapshot");
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(root.join("0000000000000002-00000005.journal.tmp"), b"x").unwrap();
        let (_w, rep) = Writer::open(&root, &KeySource::default()).unwrap();
        assert_eq!(rep.removed.len(), 2);
        assert!(!stale.exists());
    }
}
