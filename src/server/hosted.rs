//! One backup served by `backup-cli server`: its writer (held for the server's life, so the
//! file lock keeps every other writer out), its paired client, and the operations a session
//! runs on it. Everything here blocks on the disk; sessions call it off the async threads.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::StoreError;
use crate::fsutil;
use crate::journal::{self, Base, Header, Kind};
use crate::layout::GenName;
use crate::meta::Meta;
use crate::net::identity::{self, PublicKey};
use crate::net::message::{Code, Manifest, State};
use crate::writer::{NextGeneration, Refusal, Writer};

pub type Failure = (Code, String);

/// Bytes a second for the server's background disk work (an installed snapshot, freeing a
/// replaced generation), as the plugin's `backup-compact-io-rate` default: the disk stays
/// free most of the time for the writers' fdatasyncs.
pub const IO_RATE: u64 = 32 << 20;

fn store(e: StoreError) -> Failure {
    (Code::Storage, e.explain())
}

struct Slot {
    /// None only after a failed reopen: every request then fails until the server restarts.
    writer: Option<Writer>,
    writer_session: Option<u64>,
}

pub struct Hosted {
    pub root: PathBuf,
    pub url: String,
    pub pairing_path: PathBuf,
    client: Mutex<Option<PublicKey>>,
    slot: Mutex<Slot>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A file beside the backup directory: `<dir>/<name><suffix>`. Beside, not inside, because
/// the writer removes whatever it does not know inside a backup.
pub fn beside(root: &Path, suffix: &str) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    root.with_file_name(name)
}

/// Counts records from `from` to `end`: (records, where it stopped).
fn scan(file: &File, path: &Path, from: u64, end: u64) -> Result<(u64, u64), StoreError> {
    let mut n = 0;
    let off = journal::walk_headers(file, path, from, end, |_, _| n += 1)?;
    Ok((n, off))
}

/// What a client is told of the backup; `tail` names its last record, which a resuming
/// client compares.
fn state_of(w: &Writer) -> State {
    State {
        generation: w.header().generation,
        journal_len: w.journal_len(),
        version: w.position().version,
        droppable: w.position().droppable,
        last_tx_offset: w.last_tx_offset().unwrap_or(0),
        tail: w.tail(),
    }
}

/// What a download sends, fixed when it starts.
pub struct Download {
    pub manifest: Manifest,
    pub snapshot: Option<File>,
    pub journal: File,
    /// Journal bytes [0, stable) never change; [stable, journal_len) were read under the lock.
    pub stable: u64,
    pub tail: Vec<u8>,
}

impl Hosted {
    /// Opens the backup as its writer and reads its pairing. `pinned`: --client-key.
    pub fn open(root: &Path, pinned: Option<PublicKey>) -> anyhow::Result<Hosted> {
        // The server never looks for a key: a sealed backup takes records the node sealed.
        let (writer, report) = match Writer::open_keyless(root) {
            Err(StoreError::Locked { path }) => anyhow::bail!(
                "{} is in use by another writer (a running plugin, backup-cli or another server): stop it first",
                path.display()
            ),
            r => r.map_err(|e| anyhow::anyhow!(e.explain()))?,
        };
        if let Some((off, len)) = report.torn_tail {
            log::warn!("{}: cut a torn record of {len} bytes at offset {off}", root.display());
        }
        if report.sealing_change_undone {
            log::warn!(
                "{}: a node's backup.json was being stored when the server stopped; the empty backup is back as it \
                 was, and the node sends it again when it next connects",
                root.display()
            );
        }
        let pairing_path = beside(root, ".paired-client");
        let recorded = match std::fs::read_to_string(&pairing_path) {
            Ok(t) => Some(
                identity::parse_public(&t)
                    .map_err(|e| anyhow::anyhow!("{}: {e}; move it away to pair again", pairing_path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("read {}: {e}", pairing_path.display()),
        };
        let client = match (recorded, pinned) {
            (Some(r), Some(p)) if r != p => anyhow::bail!(
                "{} is already paired with client {}, not the --client-key {}: move {} away to pair another",
                root.display(),
                identity::to_hex(&r),
                identity::to_hex(&p),
                pairing_path.display()
            ),
            (Some(r), _) => Some(r),
            (None, Some(p)) => {
                write_pairing(&pairing_path, &p)?;
                Some(p)
            }
            (None, None) => None,
        };
        Ok(Hosted {
            root: root.into(),
            url: crate::layout::url_for(root),
            pairing_path,
            client: Mutex::new(client),
            slot: Mutex::new(Slot { writer: Some(writer), writer_session: None }),
        })
    }

    pub fn client(&self) -> Option<PublicKey> {
        *lock(&self.client)
    }

    /// Pairs `key` if no client is paired yet; true if `key` is (now) this backup's client.
    pub fn pair(&self, key: &PublicKey) -> anyhow::Result<bool> {
        let mut c = lock(&self.client);
        match *c {
            Some(k) => Ok(k == *key),
            None => {
                write_pairing(&self.pairing_path, key)?;
                *c = Some(*key);
                Ok(true)
            }
        }
    }

    fn with_writer<T>(&self, f: impl FnOnce(&mut Slot) -> Result<T, Failure>) -> Result<T, Failure> {
        let mut slot = lock(&self.slot);
        if slot.writer.is_none() {
            return Err((Code::Storage, format!("{}: the backup could not be reopened: restart the server", self.url)));
        }
        f(&mut slot)
    }

    pub fn state(&self) -> Result<State, Failure> {
        self.with_writer(|s| Ok(state_of(s.writer.as_ref().ok_or_else(gone)?)))
    }

    /// Makes `session` the writer, unless another session is.
    pub fn claim_writer(&self, session: u64) -> Result<State, Failure> {
        self.with_writer(|s| {
            if s.writer_session.is_some_and(|o| o != session) {
                return Err((
                    Code::Busy,
                    format!("{} already has a writer connected: only one node may write a backup", self.url),
                ));
            }
            s.writer_session = Some(session);
            Ok(state_of(s.writer.as_ref().ok_or_else(gone)?))
        })
    }

    pub fn release(&self, session: u64) {
        let mut s = lock(&self.slot);
        if s.writer_session == Some(session) {
            s.writer_session = None;
        }
    }

    pub fn append(&self, session: u64, dv: u32, kind: u8, replace_last: bool, record: &[u8]) -> Result<State, Failure> {
        let kind = match kind {
            1 => Kind::Transaction,
            2 => Kind::Outside,
            k => return Err((Code::Protocol, format!("unknown record kind {k}"))),
        };
        check_record(dv, kind, record)?;
        self.with_writer(|s| {
            if s.writer_session != Some(session) {
                return Err((Code::NotWriter, "append needs a writer session (Hello with writer=1)".into()));
            }
            let w = s.writer.as_mut().ok_or_else(gone)?;
            w.apply_framed(dv, kind, replace_last, record).map_err(|r| match r {
                Refusal::Versions(m) => (Code::Versions, m),
                Refusal::Store(e) => store(e),
            })?;
            Ok(state_of(w))
        })
    }

    /// Fixes what a download sends: the generation's files, opened (so a compaction cannot
    /// remove them under it), and the journal's changeable tail, copied under the lock.
    /// `limit` (0: all): send the journal only up to there (a compaction's fold point).
    pub fn prepare_download(&self, limit: u64) -> Result<Download, Failure> {
        self.with_writer(|s| {
            let w = s.writer.as_ref().ok_or_else(gone)?;
            let end = w.journal_len();
            let mut stable = w.last_tx_offset().unwrap_or(end);
            let mut jlen = end;
            if limit > 0 {
                if limit > stable || limit < journal::HEADER_LEN {
                    return Err((
                        Code::Refused,
                        format!("cannot download up to {limit}: only up to {stable} is fixed"),
                    ));
                }
                stable = limit;
                jlen = limit;
            }
            let open = |p: &Path| match fsutil::open_for_reading(p) {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err(store(StoreError::Invalid { path: p.into(), what: "removed while opening".into() })),
                Err(e) => Err(store(StoreError::io("open", p)(e))),
            };
            let journal = open(w.journal_path())?;
            let snapshot = match w.snapshot_path() {
                Some(p) => Some(open(&p)?),
                None => None,
            };
            let mut tail = vec![0u8; (jlen - stable) as usize];
            journal
                .read_exact_at(&mut tail, stable)
                .map_err(|e| store(StoreError::io("read journal", w.journal_path())(e)))?;
            let snapshot_len = match &snapshot {
                Some(f) => f.metadata().map_err(|e| store(StoreError::io("stat snapshot", &self.root)(e)))?.len(),
                None => 0,
            };
            let h = w.header();
            Ok(Download {
                manifest: Manifest {
                    generation: h.generation,
                    base_version: h.base.version(),
                    snapshot_len,
                    journal_len: jlen,
                },
                snapshot,
                journal,
                stable,
                tail,
            })
        })
    }

    /// Where an install's snapshot is written while it arrives (a leftover if interrupted,
    /// removed by the writer's next open).
    pub fn install_tmp(&self, from_generation: u64, base_version: u32) -> PathBuf {
        let g = GenName { generation: from_generation + 1, base_version };
        fsutil::tmp_path(&crate::layout::Layout::new(&self.root).snapshot_path(g))
    }

    /// Switches the backup to a new generation: the snapshot uploaded to `snapshot_tmp`
    /// (fsynced), plus the current journal from `fold_end` on. `fold_end` is the journal
    /// header's end for a first upload into an empty backup, or a compaction's fold point.
    pub fn install(
        &self,
        session: u64,
        from_generation: u64,
        base_version: u32,
        fold_end: u64,
        snapshot_tmp: &Path,
        tail: &[u8],
    ) -> Result<State, Failure> {
        let refused = |m: String| -> Result<State, Failure> { Err((Code::Refused, m)) };
        // the prefix before fold_end never changes: count its records outside the lock
        let jpath = self.with_writer(|s| Ok(s.writer.as_ref().ok_or_else(gone)?.journal_path().to_path_buf()))?;
        let jf = File::open(&jpath).map_err(|e| store(StoreError::io("open journal", &jpath)(e)))?;
        let (folded, stop) = scan(&jf, &jpath, journal::HEADER_LEN, fold_end).map_err(store)?;
        if stop != fold_end {
            return refused(format!("{fold_end} is not a record boundary of {}", jpath.display()));
        }
        // Any session of the paired client may install (a compaction runs on a second
        // connection while the writer appends): it is checked against the backup as it is.
        let _ = session;
        let mut slot = lock(&self.slot);
        let Some(w) = slot.writer.as_mut() else { return Err(gone()) };
        let cur = w.header().generation;
        // A first upload may skip generations: a copy of another backup keeps its own number
        // (sealed data is bound to it).
        let fits = if fold_end == journal::HEADER_LEN { from_generation >= cur } else { from_generation == cur };
        if !fits || w.journal_path() != jpath {
            return refused(format!("the backup is at generation {cur} now, not {from_generation}: plan again"));
        }
        if fold_end == journal::HEADER_LEN {
            if w.records() != 0 || w.header().base != Base::Empty {
                return refused(format!(
                    "{} already holds data (generation {cur}, {} record(s)): a first generation goes only into \
                     an empty backup (make a new one with `backup-cli init` on the server)",
                    self.url,
                    w.records()
                ));
            }
        } else if w.last_tx_offset().is_some_and(|o| o < fold_end) || fold_end > w.journal_len() {
            return refused(format!("fold point {fold_end} is past the last transaction: plan again"));
        }
        let end = w.journal_len();
        if tail.is_empty() && w.is_sealed() && end > fold_end {
            return refused(format!(
                "the sealed records from {fold_end} to {end} must come resealed for the new generation: this \
                 server holds no key to move them"
            ));
        }
        if !tail.is_empty() {
            check_tail(&jpath, fold_end, end, tail)?;
        }
        let g = GenName { generation: from_generation + 1, base_version };
        // What the snapshot's header says, outside its seal, must fit: a plaintext one never
        // goes into a sealed backup.
        let h = std::fs::File::open(snapshot_tmp)
            .map_err(StoreError::io("open", snapshot_tmp))
            .and_then(|mut f| crate::snapshot::read_header(snapshot_tmp, &mut f))
            .map_err(|e| (Code::Refused, format!("the snapshot sent is not one: {}", e.explain())))?;
        if h.sealed != w.is_sealed() || h.generation != g.generation || h.data_version != base_version {
            return refused(format!(
                "the snapshot sent is {} for generation {} at data_version {}; this backup is {} and would make \
                 generation {} at {base_version}",
                if h.sealed { "sealed" } else { "plaintext" },
                h.generation,
                h.data_version,
                if w.is_sealed() { "sealed" } else { "plaintext" },
                g.generation
            ));
        }
        let layout = w.layout().clone();
        let snap = layout.snapshot_path(g);
        std::fs::rename(snapshot_tmp, &snap).map_err(|e| store(StoreError::io("rename into place", &snap)(e)))?;
        fsutil::fsync_dir(&layout.root).map_err(store)?;
        let header = Header { generation: g.generation, base: Base::Snapshot(base_version), sealed: w.header().sealed };
        let final_path = layout.journal_path(g);
        let tmp_path = fsutil::tmp_path(&final_path);
        let _ = std::fs::remove_file(&tmp_path);
        let mut tmp = fsutil::create_private(&tmp_path).map_err(store)?;
        tmp.write_all(&header.encode()).map_err(|e| store(StoreError::io("write", &tmp_path)(e)))?;
        // A resealed tail goes in as the node sent it; else the switch copies the old bytes.
        tmp.write_all(tail).map_err(|e| store(StoreError::io("write", &tmp_path)(e)))?;
        let next = NextGeneration {
            header,
            tmp,
            tmp_path,
            final_path,
            fold_end,
            copied_to: fold_end + tail.len() as u64,
            truncations: w.truncations(),
            records_folded: folded,
        };
        let old_snapshot = w.snapshot_path();
        w.switch_to(next).map_err(store)?;
        if fold_end > journal::HEADER_LEN {
            // A compaction: the writer went on in the new generation. Free the old files
            // outside the lock, paced, as the file destination does.
            let st = state_of(slot.writer.as_ref().ok_or_else(gone)?);
            drop(slot);
            // In the background: removal waits for downloads still reading the old files.
            let url = self.url.clone();
            std::thread::spawn(move || {
                fsutil::background_priority();
                let mut throttle = fsutil::Throttle::new(IO_RATE);
                for p in std::iter::once(jpath).chain(old_snapshot) {
                    if let Err(e) = fsutil::remove_gradually(&p, &mut throttle, &mut |_| {}) {
                        log::warn!("{url}: could not remove the old generation's {}: {}", p.display(), e.explain());
                    }
                }
            });
            return Ok(st);
        }
        // A first upload: reopen, so the position comes from the new snapshot.
        slot.writer = None;
        let (w, _) = Writer::open_keyless(&self.root).map_err(store)?;
        let st = state_of(&w);
        slot.writer = Some(w);
        Ok(st)
    }

    /// Where a reseed's journal is written while it arrives (a leftover if interrupted:
    /// its name is no generation's, so the writer's next open removes it).
    pub fn reseed_tmp(&self, generation: u64, base_version: u32) -> PathBuf {
        self.root.join(format!("{generation:016x}-{base_version:08x}.reseed.tmp"))
    }

    /// Replaces the backup with another copy's generation (the writer's catch-up of a copy
    /// that fell behind): `journal_tmp` (fsynced) becomes the journal, after the snapshot a
    /// Stage left at `snapshot_tmp` when the generation has one. Checked first: the same
    /// backup (`meta`), a generation that becomes current, never an older data_version.
    /// One rename commits it; downloads already started keep the old files open.
    pub fn reseed(
        &self,
        session: u64,
        generation: u64,
        base_version: u32,
        meta: &[u8],
        journal_tmp: &Path,
        snapshot_tmp: &Path,
    ) -> Result<State, Failure> {
        let refused = |m: String| -> Result<State, Failure> { Err((Code::Refused, m)) };
        // The journal sent, walked outside the lock: whole, well framed, a valid chain.
        let bad = |e: StoreError| (Code::Refused, format!("the journal sent is not valid: {}", e.explain()));
        let mut r = journal::JournalReader::open(journal_tmp).map_err(bad)?;
        let header = r.header;
        if header.generation != generation || header.base.version() != base_version || generation == 0 {
            return refused(format!(
                "the journal sent is generation {} at base {}, announced as generation {generation} at base \
                {base_version}",
                header.generation,
                header.base.version()
            ));
        }
        let mut pos = crate::versions::Position { version: base_version, droppable: false };
        while let Some(rec) = r.next_record().map_err(bad)? {
            crate::writer::check_chain(journal_tmp, pos, &rec).map_err(bad)?;
            if rec.kind == Kind::Transaction {
                pos = crate::versions::Position { version: rec.data_version, droppable: true };
            }
        }
        if r.torn_tail.is_some() || r.position() != r.len() {
            return refused(format!("the journal sent ends in a cut record at {}", r.position()));
        }
        let new_meta: Option<Meta> = if meta.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(meta)
                    .map_err(|e| (Code::Protocol, format!("backup.json sent is not valid: {e}")))?,
            )
        };
        let new_sealed = new_meta.as_ref().is_some_and(|m| m.sealed);
        let mut slot = lock(&self.slot);
        if slot.writer_session != Some(session) {
            return Err((Code::NotWriter, "a reseed needs the writer session (Hello with writer=1)".into()));
        }
        let Some(w) = slot.writer.as_mut() else { return Err(gone()) };
        let old_meta = Meta::load(&self.root).map_err(store)?;
        let old_sealed = old_meta.as_ref().is_some_and(|m| m.sealed);
        let same_backup = old_sealed == new_sealed
            && header.sealed == new_sealed
            && w.header().sealed == old_sealed
            && (!new_sealed || old_meta.as_ref().map(|m| &m.backup_id) == new_meta.as_ref().map(|m| &m.backup_id));
        if !same_backup {
            return refused(format!(
                "{} holds another backup (backup id {}, {}) than the generation sent (backup id {}, {}): a copy is \
                re-seeded only from its own backup. Check the destination's URL; to host this backup there, \
                make a new one with `backup-cli init` on the server",
                self.url,
                old_meta.as_ref().map_or("none", |m| m.backup_id.as_str()),
                if old_sealed { "sealed" } else { "plaintext" },
                new_meta.as_ref().map_or("none", |m| m.backup_id.as_str()),
                if new_sealed { "sealed" } else { "plaintext" },
            ));
        }
        let held = w.position().version;
        if pos.version.wrapping_sub(held) >= 1 << 31 {
            return refused(format!(
                "{} holds data_version {held}, the generation sent only {}: a copy is never rolled back to an \
                older state. Re-seed it from the copy that holds the node's latest state",
                self.url, pos.version
            ));
        }
        let cur = GenName { generation: w.header().generation, base_version: w.header().base.version() };
        let new = GenName { generation, base_version };
        if new < cur {
            return refused(format!(
                "{} is at generation {} (base {}), past the generation sent ({generation}, base {base_version}): \
                it would not become current. It is re-seeded once the node's copy is compacted past it",
                self.url, cur.generation, cur.base_version
            ));
        }
        let layout = w.layout().clone();
        let has_snapshot = matches!(header.base, Base::Snapshot(_));
        if has_snapshot {
            let h = File::open(snapshot_tmp)
                .map_err(StoreError::io("open", snapshot_tmp))
                .and_then(|mut f| crate::snapshot::read_header(snapshot_tmp, &mut f))
                .map_err(|e| (Code::Refused, format!("no snapshot staged for the generation: {}", e.explain())))?;
            if h.sealed != header.sealed || h.generation != generation || h.data_version != base_version {
                return refused(format!(
                    "the snapshot staged is generation {} at data_version {}, not {generation} at {base_version}",
                    h.generation, h.data_version
                ));
            }
            // The same generation and base keep their snapshot (no second rename to commit):
            // only when it is that very snapshot.
            if new == cur && !same_contents(snapshot_tmp, &layout.snapshot_path(cur)).map_err(store)? {
                return refused(format!(
                    "{} holds generation {generation} at base {base_version} with another snapshot (each copy \
                    compacted on its own): it is re-seeded once the node's copy is compacted into a later \
                    generation",
                    self.url
                ));
            }
        }
        if let Some(m) = &new_meta {
            if old_meta.as_ref() != Some(m) {
                m.store(&self.root).map_err(store)?; // the same backup: fits the old files too
            }
        }
        if has_snapshot && new != cur {
            let snap = layout.snapshot_path(new);
            std::fs::rename(snapshot_tmp, &snap).map_err(|e| store(StoreError::io("rename into place", &snap)(e)))?;
            fsutil::fsync_dir(&layout.root).map_err(store)?;
        }
        // The commit point: the new journal becomes the current generation's.
        let jpath = layout.journal_path(new);
        std::fs::rename(journal_tmp, &jpath).map_err(|e| store(StoreError::io("rename into place", &jpath)(e)))?;
        if let Err(e) = fsutil::fsync_dir(&layout.root).and_then(|_| w.reopen()) {
            slot.writer = None; // it may still name the replaced journal: nothing goes there
            return Err(store(e));
        }
        Ok(state_of(slot.writer.as_ref().ok_or_else(gone)?))
    }

    /// The journal's bytes from `from` to its end, as they are now (a compaction's tail,
    /// for the node to reseal for the new generation).
    pub fn tail(&self, from: u64) -> Result<Vec<u8>, Failure> {
        self.with_writer(|s| {
            let w = s.writer.as_ref().ok_or_else(gone)?;
            let end = w.journal_len();
            if from < journal::HEADER_LEN || from > end {
                return Err((Code::Refused, format!("no journal bytes from {from}: the journal ends at {end}")));
            }
            let f =
                File::open(w.journal_path()).map_err(|e| store(StoreError::io("open journal", w.journal_path())(e)))?;
            let mut b = vec![0u8; (end - from) as usize];
            f.read_exact_at(&mut b, from).map_err(|e| store(StoreError::io("read journal", w.journal_path())(e)))?;
            Ok(b)
        })
    }

    /// The backup's backup.json as stored (empty: none, a format-1 backup).
    pub fn meta(&self) -> Result<Vec<u8>, Failure> {
        let _slot = lock(&self.slot);
        match std::fs::read(Meta::path(&self.root)) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(store(StoreError::io("read", Meta::path(&self.root))(e))),
        }
    }

    /// Stores the node's backup.json: any into an empty backup (its journal header then
    /// follows the sealing), else only the same backup id and sealing.
    pub fn put_meta(&self, body: &[u8]) -> Result<State, Failure> {
        let new: Meta = serde_json::from_slice(body)
            .map_err(|e| (Code::Protocol, format!("backup.json sent is not valid: {e}")))?;
        if new.sealed && new.id().is_none() {
            return Err((Code::Protocol, "backup.json sent has no valid backup_id".into()));
        }
        let mut slot = lock(&self.slot);
        let Some(w) = slot.writer.as_ref() else { return Err(gone()) };
        let old = Meta::load(&self.root).map_err(store)?;
        let empty = w.records() == 0 && w.header().base == Base::Empty;
        let same = old.as_ref().is_some_and(|o| o.sealed == new.sealed && o.backup_id == new.backup_id);
        if !empty && !same {
            return Err((
                Code::Refused,
                format!(
                    "{} already holds data of another backup (or one sealed otherwise): a node's backup.json goes \
                     only into an empty backup (make a new one with `backup-cli init` on the server)",
                    self.url
                ),
            ));
        }
        if w.header().sealed == new.sealed {
            new.store(&self.root).map_err(store)?;
            let st = state_of(w);
            return Ok(st);
        }
        // An empty journal made with the other sealing: rewritten with the node's, then the
        // metadata (a crash between is undone at the next open: `open_keyless`).
        let h = w.header();
        let path = w.journal_path().to_path_buf();
        slot.writer = None;
        let r = crate::writer::replace_empty_journal(&path, Header { sealed: new.sealed, ..h })
            .and_then(|_| new.store(&self.root))
            .and_then(|_| Writer::open_keyless(&self.root));
        let (w, _) = r.map_err(store)?;
        let st = state_of(&w);
        slot.writer = Some(w);
        Ok(st)
    }
}

/// A resealed tail must be the journal's records from `fold_end` to `end` record for
/// record (same lengths, versions and kinds), each well framed.
fn check_tail(jpath: &Path, fold_end: u64, end: u64, tail: &[u8]) -> Result<(), Failure> {
    if fold_end + tail.len() as u64 != end {
        return Err((
            Code::Refused,
            format!(
                "the resealed tail has {} bytes, the journal holds {} past {fold_end}: plan again",
                tail.len(),
                end - fold_end
            ),
        ));
    }
    let f = File::open(jpath).map_err(|e| store(StoreError::io("open journal", jpath)(e)))?;
    let mut old = [0u8; journal::RECORD_HEADER_LEN];
    let mut p = 0usize;
    while p < tail.len() {
        let at = fold_end + p as u64;
        let r = journal::check_framed(&tail[p..])
            .map_err(|e| (Code::Protocol, format!("the resealed tail's record at {at}: {e}")))?;
        let n = r.record_len();
        f.read_exact_at(&mut old, at).map_err(|e| store(StoreError::io("read journal", jpath)(e)))?;
        // the same length, data_version and kind: sealed again, not changed
        if old[0..9] != tail[p..p + 9] {
            return Err((
                Code::Refused,
                format!("the resealed tail's record at {} is not the journal's: plan again", fold_end + p as u64),
            ));
        }
        p += n;
    }
    Ok(())
}

/// Whether two files hold the same bytes.
fn same_contents(a: &Path, b: &Path) -> Result<bool, StoreError> {
    let (fa, fb) =
        (File::open(a).map_err(StoreError::io("open", a))?, File::open(b).map_err(StoreError::io("open", b))?);
    let la = fa.metadata().map_err(StoreError::io("stat", a))?.len();
    if la != fb.metadata().map_err(StoreError::io("stat", b))?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < la {
        let n = ((la - off) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], off).map_err(StoreError::io("read", a))?;
        fb.read_exact_at(&mut bb[..n], off).map_err(StoreError::io("read", b))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

fn gone() -> Failure {
    (Code::Storage, "the backup could not be reopened: restart the server".into())
}

fn write_pairing(path: &Path, key: &PublicKey) -> anyhow::Result<()> {
    let text = format!("{}\n", identity::to_hex(key));
    fsutil::write_atomic(path, true, |f, tmp| f.write_all(text.as_bytes()).map_err(StoreError::io("write", tmp)))
        .map_err(|e| anyhow::anyhow!(e.explain()))
}

/// The record's own header and checksums must hold and agree with the request. Its payload
/// may be sealed: the server never reads it.
/// One whole valid record for `dv` and `kind`. The CRCs cover the stored bytes, sealed or
/// not: a record the writer would cut as damaged at its next open is never acknowledged.
fn check_record(dv: u32, kind: Kind, r: &[u8]) -> Result<(), Failure> {
    let bad = |m: String| Err((Code::Protocol, format!("record for data_version {dv}: {m}")));
    let f = match journal::check_framed(r) {
        Ok(f) => f,
        Err(e) => return bad(e.to_string()),
    };
    if f.record_len() != r.len() {
        return bad("length does not match its header".into());
    }
    if f.data_version != dv || f.kind != kind {
        return bad("header names another version or kind".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(dv: u32, kind: Kind) -> Vec<u8> {
        let mut b = vec![];
        let bump = format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1);
        journal::encode_record(&mut b, dv, kind, &["INSERT INTO t VALUES (1)", bump.as_str()]);
        b
    }

    #[test]
    fn writer_session_append_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        crate::writer::create(&root, None, None, None).unwrap();
        let h = Hosted::open(&root, None).unwrap();
        assert!(Hosted::open(&root, None).err().unwrap().to_string().contains("in use by another writer"));
        let st = h.claim_writer(1).unwrap();
        assert_eq!((st.version, st.tail), (0, 0));
        assert_eq!(h.claim_writer(2).unwrap_err().0, Code::Busy);
        assert_eq!(h.append(2, 1, 1, false, &rec(1, Kind::Transaction)).unwrap_err().0, Code::NotWriter);
        let r1 = rec(1, Kind::Transaction);
        let st = h.append(1, 1, 1, false, &r1).unwrap();
        assert_eq!(st.version, 1);
        assert_eq!(st.journal_len, journal::HEADER_LEN + r1.len() as u64);
        assert_eq!(st.tail, u32::from_le_bytes(r1[13..17].try_into().unwrap()));
        // replace_last must agree with the rules
        assert_eq!(h.append(1, 1, 1, false, &r1).unwrap_err().0, Code::Versions);
        assert!(h.append(1, 1, 1, true, &r1).is_ok());
        assert_eq!(h.append(1, 5, 1, false, &rec(5, Kind::Transaction)).unwrap_err().0, Code::Versions);
        // a record whose header lies is refused
        let mut bad = rec(2, Kind::Transaction);
        bad[20] ^= 1;
        assert_eq!(h.append(1, 2, 1, false, &bad).unwrap_err().0, Code::Protocol);
        assert!(h.append(1, 2, 1, false, &rec(2, Kind::Transaction)).is_ok());
        let mut bad = rec(3, Kind::Transaction);
        bad[5] ^= 1;
        assert_eq!(h.append(1, 3, 1, false, &bad).unwrap_err().0, Code::Protocol);
        assert_eq!(h.append(1, 4, 1, false, &rec(3, Kind::Transaction)).unwrap_err().0, Code::Protocol);
        h.release(1);
        assert!(h.claim_writer(2).is_ok());
        // a reopen finds the same tail
        let before = h.state().unwrap();
        drop(h);
        let h = Hosted::open(&root, None).unwrap();
        assert_eq!(h.state().unwrap(), before);
    }

    /// A sealed backup is served without its key (not even one where backup.json says it
    /// is), takes records the node sealed, and refuses what would need the key: moving the
    /// sealed records past a fold point, a tail that is not the journal's, another backup's
    /// metadata once it holds data.
    #[test]
    fn sealed_backup_served_keyless() {
        use crate::journal::Payloads;
        let d = tempfile::tempdir().unwrap();
        let (root, ldir) = (d.path().join("b.bkp"), d.path().join("ln"));
        std::fs::create_dir(&ldir).unwrap();
        // a server that tried to read this would fail: it is no hsm_secret
        std::fs::write(ldir.join("hsm_secret"), b"garbage").unwrap();
        let meta = Meta::new_sealed(None, None, Some(ldir.clone())).unwrap();
        crate::writer::create(&root, None, Some(&meta), None).unwrap();
        let h = Hosted::open(&root, None).unwrap();
        h.claim_writer(1).unwrap();
        let key = crate::keys::Key::from_bytes([3u8; 32], "test");
        let sealer = crate::seal::Sealer::new(&key, meta.id().unwrap()).unwrap();
        let mut at = journal::HEADER_LEN;
        let mut offsets = vec![];
        for dv in 1..=3u32 {
            let bump =
                format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1);
            let mut b = vec![];
            let p = Payloads::Sealed { sealer: &sealer, generation: 1 };
            journal::encode_record_as(
                &mut b,
                at,
                dv,
                Kind::Transaction,
                &["INSERT INTO t VALUES ('secret')", &bump],
                p,
            );
            let st = h.append(1, dv, 1, false, &b).unwrap();
            offsets.push(at);
            at = st.journal_len;
        }
        let bytes = std::fs::read(crate::layout::Layout::new(&root).list().unwrap().journal).unwrap();
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
        // holds data now: another backup's metadata is refused, the same one's taken
        let other = Meta::new_sealed(None, None, None).unwrap();
        let e = h.put_meta(&serde_json::to_vec(&other).unwrap()).unwrap_err();
        assert_eq!(e.0, Code::Refused, "{}", e.1);
        let filled = Meta { key_fingerprint: Some(key.fingerprint()), ..meta.clone() };
        h.put_meta(&serde_json::to_vec(&filled).unwrap()).unwrap();
        assert_eq!(Meta::load(&root).unwrap().unwrap(), filled);
        // a compaction's switch needs the tail resealed by the node
        let fold = offsets[2];
        let snap = d.path().join("snap");
        std::fs::write(&snap, b"x").unwrap();
        let e = h.install(1, 1, 2, fold, &snap, &[]).unwrap_err();
        assert!(e.0 == Code::Refused && e.1.contains("resealed"), "{}", e.1);
        let tail = h.tail(fold).unwrap();
        assert_eq!(tail.len() as u64, at - fold);
        let e = h.install(1, 1, 2, fold, &snap, &tail[..tail.len() - 1]).unwrap_err();
        assert_eq!(e.0, Code::Refused, "{}", e.1);
        // a record from elsewhere in the journal, framed well, is not the journal's tail
        let first = h.tail(offsets[0]).unwrap();
        let e = h.install(1, 1, 2, fold, &snap, &first[..tail.len()]).unwrap_err();
        assert!(e.1.contains("is not the journal's") || e.1.contains("checksum"), "{}", e.1);
        assert_eq!(h.tail(at + 1).unwrap_err().0, Code::Refused);
        // the right tail, but a plaintext snapshot: never into a sealed backup
        let plain = d.path().join("plain.snapshot");
        let mut t = crate::fsutil::Throttle::unlimited();
        crate::snapshot::write(&plain, 2, 2, &ldir.join("hsm_secret"), &mut t, None).unwrap();
        let resealed = crate::journal::transcode(
            &root,
            &tail,
            fold,
            Payloads::Sealed { sealer: &sealer, generation: 1 },
            journal::HEADER_LEN,
            Payloads::Sealed { sealer: &sealer, generation: 2 },
        )
        .unwrap();
        let e = h.install(1, 1, 2, fold, &plain, &resealed).unwrap_err();
        assert!(e.0 == Code::Refused && e.1.contains("plaintext"), "{}", e.1);
        // nothing changed, and a reopen (still keyless) finds the same
        let before = h.state().unwrap();
        assert_eq!(before.generation, 1);
        drop(h);
        assert_eq!(Hosted::open(&root, None).unwrap().state().unwrap(), before);
    }

    /// A reseed is the writer's, of the same backup, never to an older data_version, and
    /// switches whole; refused ones leave the backup as it was.
    #[test]
    fn reseed_refusals_and_switch() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        crate::writer::create(&root, None, None, None).unwrap();
        let h = Hosted::open(&root, None).unwrap();
        h.claim_writer(1).unwrap();
        for dv in 1..=3 {
            h.append(1, dv, 1, false, &rec(dv, Kind::Transaction)).unwrap();
        }
        let before = h.state().unwrap();
        let journal = |n: u32| {
            let p = h.reseed_tmp(1, 0);
            let recs: Vec<u8> = (1..=n).flat_map(|dv| rec(dv, Kind::Transaction)).collect();
            let _ = std::fs::remove_file(&p);
            crate::writer::write_journal(&p, &Header { generation: 1, base: Base::Empty, sealed: false }, &recs)
                .unwrap();
            p
        };
        let snap = h.install_tmp(0, 0);
        let e = h.reseed(1, 1, 0, b"", &journal(2), &snap).unwrap_err();
        assert!(e.0 == Code::Refused && e.1.contains("never rolled back"), "{}", e.1);
        assert_eq!(h.reseed(2, 1, 0, b"", &journal(5), &snap).unwrap_err().0, Code::NotWriter);
        let other = serde_json::to_vec(&Meta::new_sealed(None, None, None).unwrap()).unwrap();
        let e = h.reseed(1, 1, 0, &other, &journal(5), &snap).unwrap_err();
        assert!(e.0 == Code::Refused && e.1.contains("another backup"), "{}", e.1);
        let e = h.reseed(1, 2, 0, b"", &journal(5), &snap).unwrap_err();
        assert!(e.0 == Code::Refused && e.1.contains("announced"), "{}", e.1);
        assert_eq!(h.state().unwrap(), before);
        let st = h.reseed(1, 1, 0, b"", &journal(5), &snap).unwrap();
        assert_eq!((st.generation, st.version), (1, 5));
        assert_ne!(st.tail, 0);
        drop(h);
        assert_eq!(Hosted::open(&root, None).unwrap().state().unwrap(), st);
    }

    #[test]
    fn pairing_is_recorded_and_pinned() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("b.bkp");
        crate::writer::create(&root, None, None, None).unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let h = Hosted::open(&root, None).unwrap();
        assert!(h.pair(&a).unwrap());
        assert!(!h.pair(&b).unwrap());
        drop(h);
        let h = Hosted::open(&root, None).unwrap();
        assert_eq!(h.client(), Some(a));
        drop(h);
        assert!(Hosted::open(&root, Some(b)).err().unwrap().to_string().contains("already paired"));
        std::fs::remove_file(beside(&root, ".paired-client")).unwrap();
        let h = Hosted::open(&root, Some(b)).unwrap();
        assert!(!h.pair(&a).unwrap());
        assert!(h.pair(&b).unwrap());
    }
}
