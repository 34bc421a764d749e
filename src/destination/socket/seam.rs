//! The `socket:` destination behind the destination seam.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::client::{SocketDestination, SocketError, Staged};
use crate::compact::lock;
use crate::destination::{BackgroundCompaction, Destination, GenerationFiles, Shared, Tip};
use crate::error::StoreError;
use crate::journal::Kind;
use crate::journal::{self, Payloads};
use crate::keys::{KeyError, KeySource};
use crate::meta::Meta;
use crate::seal::Sealer;
use crate::versions::Position;

impl From<SocketError> for StoreError {
    fn from(e: SocketError) -> StoreError {
        let hint = if e.is_versions() {
            "the backup server's copy disagrees with the node: see the message, and `backup-cli verify` the server's copy"
        } else {
            "check the network path to the backup server and that `backup-cli server` runs there"
        };
        StoreError::Remote { what: e.to_string(), hint, retryable: !e.is_versions() }
    }
}

/// How the node seals for the server's copy: as its backup.json there says. The server
/// stores the sealed bytes and never holds the key.
enum Sealing {
    Plain,
    Ready {
        sealer: Arc<Sealer>,
        keys: KeySource,
    },
    /// Sealed, the key not read yet (a node before lightningd's first start).
    Pending {
        meta: Meta,
        keys: KeySource,
    },
}

/// A socket destination and how the node seals for it.
pub struct Socket {
    pub dest: SocketDestination,
    last_write: Option<SystemTime>,
    sealing: Sealing,
    buf: Vec<u8>,
    /// The node's lightning dir, where its key is looked for.
    ldir: PathBuf,
}

impl Socket {
    /// The seam over `dest`, sealing as the server's backup.json says, with the key found
    /// from `ldir` (the node's lightning dir) or where backup.json says it was.
    pub fn open(dest: SocketDestination, ldir: &Path) -> Result<Socket, StoreError> {
        let mut s = Socket {
            dest,
            last_write: None,
            sealing: Sealing::Plain,
            buf: Vec::with_capacity(1 << 16),
            ldir: ldir.to_path_buf(),
        };
        s.load_sealing()?;
        Ok(s)
    }

    /// Follows the server's backup.json (at open, and after an install replaced it).
    fn load_sealing(&mut self) -> Result<(), StoreError> {
        let mut meta = self.dest.meta()?;
        let st = self.dest.server_state();
        let empty = st.journal_len == journal::HEADER_LEN && st.version == 0;
        let sealed = meta.as_ref().is_some_and(|m| m.sealed);
        let chosen = super::node::chosen_sealing(&self.ldir);
        let pinned = super::super::pinned_backup_id(&self.ldir);
        let wants_sealed = chosen != Some(false);
        if !empty {
            // Checked here, not only at open (`check_pin`): a re-seed reads backup.json back
            // from the server, and a plaintext one would have the node write plaintext.
            let found = meta.as_ref().filter(|m| m.sealed).and_then(|m| m.id()).map(|id| crate::keys::hex(&id));
            super::super::check_copy(&self.ldir, self.dest.url(), found).map_err(|what| StoreError::Remote {
                what,
                hint: "check the server's copy with its operator; the message says what to do",
                retryable: false,
            })?;
        }
        if empty && sealed != wants_sealed && pinned.is_none() {
            // A new node's first connection to an empty server backup made with the other
            // sealing: the node's choice (recorded in backup.lock by init, which could not
            // send its backup.json without a key) goes in. Not for a node whose backup.lock
            // pins a sealed backup already: an empty copy in its place was put there by
            // someone else, and is refused as it is (`check_pin`), not made a new backup.
            let ldir = std::path::absolute(&self.ldir).unwrap_or_else(|_| self.ldir.clone());
            let m = match wants_sealed {
                true => Meta::new_sealed(None, None, Some(ldir))?,
                false => Meta::new_plain(Some(ldir)),
            };
            self.dest.put_meta(&m)?;
            meta = Some(m);
        }
        self.sealing = match meta {
            Some(m) if m.sealed => {
                let keys = m.source_with_recorded(KeySource::lightning_dir(&self.ldir));
                Sealing::Pending { meta: m, keys }
            }
            _ => Sealing::Plain,
        };
        if let Sealing::Pending { meta, keys } = &self.sealing {
            // read now if it is there (a new node has no hsm_secret until lightningd made it)
            if keys.find(meta.key_file.as_deref()).map_err(|e| self.key_error(e))?.is_some() {
                self.sealer()?;
            }
        }
        Ok(())
    }

    fn key_error(&self, e: KeyError) -> StoreError {
        StoreError::Key { path: self.dest.url().into(), what: e.to_string() }
    }

    /// The sealer of a sealed backup, reading the key now if it was not read yet; None for
    /// a plaintext one. The first read also records the key's fingerprint on the server.
    fn sealer(&mut self) -> Result<Option<Arc<Sealer>>, StoreError> {
        if let Sealing::Pending { meta, keys } = &self.sealing {
            let (meta, keys) = (meta.clone(), keys.clone());
            let Some((s, key)) = meta.sealer(&keys).map_err(|e| self.key_error(e))? else {
                return Err(self.key_error(meta.missing(&keys)));
            };
            if meta.key_fingerprint.is_none() {
                let ldir = meta.lightning_dir.clone().or_else(|| {
                    keys.search
                        .iter()
                        .find(|d| d.join(crate::keys::HSM_SECRET).exists())
                        .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
                });
                let filled = Meta { key_fingerprint: Some(key.fingerprint()), lightning_dir: ldir, ..meta };
                self.dest.put_meta(&filled)?;
            }
            self.sealing = Sealing::Ready { sealer: Arc::new(s), keys };
        }
        Ok(match &self.sealing {
            Sealing::Ready { sealer, .. } => Some(sealer.clone()),
            _ => None,
        })
    }
}

impl Destination for Socket {
    fn url(&self) -> &str {
        self.dest.url()
    }
    fn kind(&self) -> &'static str {
        "socket"
    }
    fn tip(&self) -> Tip {
        let st = self.dest.server_state();
        Tip {
            position: Position { version: st.version, droppable: st.droppable },
            generation: st.generation,
            journal_len: st.journal_len,
            tail: st.tail,
            last_tx_offset: st.droppable.then_some(st.last_tx_offset),
        }
    }
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = super::super::seal_and_append(self, &mut buf, data_version, kind, replace_last, record);
        self.buf = buf;
        r
    }
    /// Seals for the place the server's journal gives the record next (where its last
    /// transaction starts, when it replaces it), as the file writer does for its own.
    fn seal_for_next(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        statements: &[&str],
        out: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        let Some(sealer) = self.sealer()? else { return Ok(false) };
        let st = self.dest.server_state();
        let offset = match (replace_last, st.droppable) {
            (false, _) => st.journal_len,
            (true, true) => st.last_tx_offset,
            (true, false) => {
                return Err(StoreError::Invalid { path: self.dest.url().into(), what: "no transaction to drop".into() })
            }
        };
        out.clear();
        let payloads = Payloads::Sealed { sealer: &sealer, generation: st.generation };
        journal::encode_record_as(out, offset, data_version, kind, statements, payloads);
        Ok(true)
    }
    fn append_copy(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), StoreError> {
        self.dest.append(data_version, kind, replace_last, record)?;
        self.last_write = Some(SystemTime::now());
        Ok(())
    }
    fn backup_id(&self) -> Option<crate::seal::BackupId> {
        match &self.sealing {
            Sealing::Plain => None,
            Sealing::Ready { sealer, .. } => Some(*sealer.backup_id()),
            Sealing::Pending { meta, .. } => meta.id(),
        }
    }
    fn bytes(&self) -> u64 {
        self.dest.server_state().journal_len
    }
    fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }
    fn details(&self) -> serde_json::Value {
        self.dest.status()
    }
    /// On a second connection: the node reads the backup back, folds it, uploads the new
    /// snapshot, and the server swaps generations; the writer's appends go on meanwhile.
    /// A sealed backup: the new snapshot is sealed by the node and staged by the reading
    /// connection; the switch, which needs the records past the fold point resealed, runs
    /// on the writer's connection with db_write held (`switch_generation`).
    fn background_compaction(&self, me: Shared) -> Option<BackgroundCompaction> {
        let url = self.dest.url().to_string();
        let reader = self.dest.reader();
        if let Sealing::Ready { sealer, keys } = &self.sealing {
            let (sealer, keys) = (sealer.clone(), keys.clone());
            return Some(Box::new(move |work| {
                let mut r = reader.connect().map_err(|e| format!("{url}: {e}"))?;
                let staged = match r.stage_compaction(work, &keys, &sealer, &mut |_, _| {}) {
                    Ok(Some(s)) => s,
                    Ok(None) => return Ok(format!("{url}: nothing to fold yet")),
                    Err(e) => return Err(format!("{url}: {e}")),
                };
                drop(r);
                lock(&me).switch_generation(Box::new(staged)).map_err(|e| format!("{url}: {}", e.explain()))?;
                let st = lock(&me).tip();
                Ok(format!(
                    "{url}: compacted on the server into generation {} at data_version {} ({} journal bytes left)",
                    st.generation, st.position.version, st.journal_len
                ))
            }));
        }
        if !matches!(self.sealing, Sealing::Plain) {
            return None; // sealed, and the key not read yet: nothing to open the records with
        }
        Some(Box::new(move |work| {
            let mut r = reader.connect().map_err(|e| format!("{url}: {e}"))?;
            match r.compact(work, &mut |_, _| {}) {
                Ok(Some(st)) => Ok(format!(
                    "{url}: compacted on the server into generation {} at data_version {} ({} journal bytes left)",
                    st.generation, st.version, st.journal_len
                )),
                Ok(None) => Ok(format!("{url}: nothing to fold yet")),
                Err(e) => Err(format!("{url}: {e}")),
            }
        }))
    }
    fn set_reconnect_timeout(&mut self, timeout: std::time::Duration) {
        self.dest.set_reconnect_timeout(timeout);
    }
    fn switch_generation(&mut self, prepared: Box<dyn std::any::Any + Send>) -> Result<(), StoreError> {
        let staged = prepared.downcast::<Staged>().map_err(|_| StoreError::Invalid {
            path: self.dest.url().into(),
            what: "not a generation staged on a backup server".into(),
        })?;
        let Some(sealer) = self.sealer()? else {
            return Err(StoreError::Invalid { path: self.dest.url().into(), what: "the backup is not sealed".into() });
        };
        self.dest.switch_staged(staged.from_generation, staged.base_version, staged.fold_end, &sealer)?;
        Ok(())
    }
    /// Replaces the server's copy with a file copy's generation, as it is (one backup id:
    /// the seals hold): seeding an empty server backup (`add-destination`, which first
    /// gives it the backup's backup.json), or re-seeding one that fell too far behind. The
    /// server switches in one step or refuses (another backup, an older data_version, a
    /// generation that would not be current), leaving its copy as it was.
    fn install(&mut self, from: &GenerationFiles) -> Result<(), StoreError> {
        let url = self.dest.url().to_string();
        let refuse = |what: String| StoreError::Remote {
            what: format!("{url}: {what}"),
            hint: "the server's copy is left as it was: see the message",
            retryable: false,
        };
        // The copy's end, checked before anything is sent: a record boundary, its version.
        let mut reader = journal::JournalReader::open(&from.journal)?;
        reader.limit(from.journal_len);
        let mut version = reader.header.base.version();
        while let Some(rec) = reader.next_record()? {
            if rec.kind == Kind::Transaction {
                version = rec.data_version;
            }
        }
        if reader.position() != from.journal_len {
            return Err(StoreError::Invalid {
                path: from.journal.clone(),
                what: format!("{} is not the end of a record (it ends at {})", from.journal_len, reader.position()),
            });
        }
        let meta = Meta::load(crate::fsutil::parent_of(&from.journal))?;
        self.dest.refresh()?; // as the server is now, not as last seen (it may have been down)
        let st = self.dest.server_state();
        let empty = st.journal_len == journal::HEADER_LEN && st.version == 0;
        if empty {
            if let Some(m) = &meta {
                self.dest.put_meta(m)?;
            }
        } else {
            // What the server checks again, said here before a whole generation is sent.
            let theirs = self.dest.meta()?;
            let same = match (&theirs, &meta) {
                (Some(a), Some(b)) => a.sealed == b.sealed && (!a.sealed || a.backup_id == b.backup_id),
                (a, b) => !a.as_ref().is_some_and(|m| m.sealed) && !b.as_ref().is_some_and(|m| m.sealed),
            };
            if !same {
                return Err(refuse(format!(
                    "it holds another backup (backup id {}) than the copy to seed from ({}): check the URL",
                    theirs.as_ref().map_or("none", |m| m.backup_id.as_str()),
                    meta.as_ref().map_or("none", |m| m.backup_id.as_str())
                )));
            }
            if version.wrapping_sub(st.version) >= 1 << 31 {
                return Err(refuse(format!(
                    "it holds data_version {}, the copy to seed from only {version}: a copy is never rolled back",
                    st.version
                )));
            }
            if from.generation < st.generation {
                return Err(refuse(format!(
                    "it is at generation {}, past the copy to seed from ({}): it is re-seeded once that copy is \
                    compacted past it",
                    st.generation, from.generation
                )));
            }
        }
        self.dest.reseed(from, meta.as_ref(), &mut |_, _| {})?;
        self.load_sealing()
    }
}
