//! Where a backup's bytes live. One trait for every kind of destination; `replicas` fans
//! each db_write out to all of them and brings a lagging one back up to date.
//!
//! A destination stores what `format` modules make (journal records framed once by
//! `journal::encode_record`, snapshots) and enforces nothing about their meaning beyond
//! the version rules: the plugin decides once, above the destinations, what a db_write is
//! (append, or replace the uncommitted last transaction).
//!
//! Kinds: `file` (a directory on a mounted filesystem: today's layout, writer and reader),
//! `socket` (`backup-cli server`), `postgres`, and `legacy`: the Python plugin's v1 file,
//! read-only (restore, verify and `migrate` read it; nothing writes it).
//! A new kind is one module here and one arm in `parse`.

pub mod behind;
pub mod file;
pub mod inspect;
pub mod postgres;
pub mod replicas;
pub mod socket;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::StoreError;
use crate::journal::Kind;
use crate::versions::Position;
use crate::writer::Writer;

/// What a destination holds at its end: enough to tell two copies of a backup apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    pub position: Position,
    /// The compaction generation its journal belongs to.
    pub generation: u64,
    /// Bytes of its current journal (header included).
    pub journal_len: u64,
    /// Header CRC of its last record (0 when the journal has none): it covers the record's
    /// length, version, kind and payload CRC, and a server reports it, so it is known after
    /// a restart for every kind of destination.
    pub tail: u32,
    /// Where its last transaction starts, while it can be dropped.
    pub last_tx_offset: Option<u64>,
}

impl Tip {
    /// Both would put the next record at the same place, so can store the same sealed bytes.
    pub fn same_place(&self, other: &Tip) -> bool {
        self.generation == other.generation
            && self.journal_len == other.journal_len
            && self.last_tx_offset == other.last_tx_offset
    }

    /// Both end with the same record at the same version.
    pub fn same_end(&self, other: &Tip) -> bool {
        let crc_known = self.tail != 0 && other.tail != 0;
        self.position.version == other.position.version
            && if crc_known {
                self.tail == other.tail
            } else {
                // an empty journal, or a v1 file: its place must match
                self.generation == other.generation && self.journal_len == other.journal_len
            }
    }
}

/// A generation's files as a file destination stores them, for seeding another destination.
#[derive(Debug, Clone)]
pub struct GenerationFiles {
    pub generation: u64,
    pub snapshot: Option<PathBuf>,
    pub journal: PathBuf,
    /// How much of the journal belongs to the copy (it may grow while being copied).
    pub journal_len: u64,
}

pub trait Destination: Send {
    fn url(&self) -> &str;
    /// "file", "socket", "postgres".
    fn kind(&self) -> &'static str;
    fn tip(&self) -> Tip;
    /// Durably applies one db_write: when `replace_last`, drops the last transaction (never
    /// committed by lightningd) first; then appends `record`, framed once for every
    /// destination. Returns only when the record is on stable storage.
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError>;
    /// Frames and seals a db_write's statements for the place they take next here, into
    /// `out`, when this copy is sealed (false otherwise, `out` untouched): the record is
    /// sealed once, and copies at the same place store the same bytes.
    fn seal_for_next(
        &mut self,
        _data_version: u32,
        _kind: Kind,
        _replace_last: bool,
        _statements: &[&str],
        _out: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// As `append`, for a record as another copy of this backup holds it at the same place
    /// (sealed records are bound to their place): catching a lagging copy up.
    fn append_copy(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), StoreError> {
        self.append(data_version, kind, replace_last, record)
    }
    /// The backup id of a sealed copy; None for a plaintext one.
    fn backup_id(&self) -> Option<crate::seal::BackupId> {
        None
    }
    /// Stores `sealed`, sealed for `place` (where this copy's next record went when it was
    /// sealed), if the next record still goes there; else `plain` (framed, not sealed), sealed
    /// for where it goes now. Checked and written under the lock a compaction's switch takes,
    /// so no switch can come between: sealed bytes never land where they do not open.
    fn append_at(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        sealed: &[u8],
        place: &Tip,
        plain: &[u8],
    ) -> Result<(), StoreError> {
        // Network kinds switch generations under the destination's own lock (`&mut self`).
        if self.tip().same_place(place) {
            self.append_copy(data_version, kind, replace_last, sealed)
        } else {
            self.append(data_version, kind, replace_last, plain)
        }
    }
    /// Bytes the destination holds for this backup.
    fn bytes(&self) -> u64;
    fn last_write(&self) -> Option<SystemTime>;
    /// Fields of its own for `backup-status` (paths, peer, ...).
    fn details(&self) -> serde_json::Value;
    /// A file destination's writer: compaction runs on it, and it can seed other copies.
    fn writer(&self) -> Option<Arc<Mutex<Writer>>> {
        None
    }
    /// A compaction that runs on the destination's side, beside the writer, without its
    /// lock: given a scratch directory, it says what it did. None for kinds compacted
    /// through their file writer (or not yet from the plugin).
    /// `me` is this destination as the replicas hold it, for a short switch at the end.
    fn background_compaction(&self, _me: Shared) -> Option<BackgroundCompaction> {
        None
    }
    /// Makes a generation that `background_compaction` built current (a short step, with
    /// db_write held by this destination's lock). `prepared` is what the job built.
    fn switch_generation(&mut self, _prepared: Box<dyn std::any::Any + Send>) -> Result<(), StoreError> {
        Err(StoreError::Invalid { path: self.url().into(), what: "this kind has no generations to switch".into() })
    }
    /// The bound on a network destination's reconnects and stalled commits.
    fn set_reconnect_timeout(&mut self, _timeout: std::time::Duration) {}
    /// Replaces what the destination holds with `from`, a whole generation (catch-up when
    /// it is far behind, and `add-destination`).
    fn install(&mut self, from: &GenerationFiles) -> Result<(), StoreError>;
}

/// A destination as the replicas hold it: shared with its worker thread and the catch-up.
/// `append` for a kind that seals for itself (socket, postgres): seals the framed
/// plaintext `record`'s statements for where this copy's next record goes and stores that
/// with `append_copy`; a plaintext copy stores `record` as it is. `buf`: scratch space the
/// caller keeps between calls.
pub(crate) fn seal_and_append<D: Destination + ?Sized>(
    d: &mut D,
    buf: &mut Vec<u8>,
    data_version: u32,
    kind: Kind,
    replace_last: bool,
    record: &[u8],
) -> Result<(), StoreError> {
    let statements = crate::journal::statements_of(record).map_err(|what| StoreError::Invalid {
        path: d.url().into(),
        what: format!("a record to seal does not decode: {what}"),
    })?;
    if d.seal_for_next(data_version, kind, replace_last, &statements, buf)? {
        d.append_copy(data_version, kind, replace_last, buf)
    } else {
        d.append_copy(data_version, kind, replace_last, record)
    }
}

pub type Shared = Arc<Mutex<Box<dyn Destination>>>;

/// A compaction job for a network destination (see `Destination::background_compaction`).
pub type BackgroundCompaction = Box<dyn FnOnce(&Path) -> Result<String, String> + Send>;

/// A destination URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(PathBuf),
    /// A `file://` URL naming the Python plugin's v1 file: read-only.
    Legacy(PathBuf),
    /// A libpq URL (`?backup=NAME` names the backup among others in the database).
    Postgres(String),
    /// `socket:HOST:PORT[?proxy=socks5:H:P]`, a `backup-cli server`.
    Socket(String),
}

/// Parses a destination URL; relative file paths are taken from `base`.
pub fn parse(url: &str, base: &Path) -> Result<Target, String> {
    if crate::net::url::is_socket_url(url) {
        return crate::net::url::parse(url).map(|_| Target::Socket(url.to_string()));
    }
    if postgres::is_postgres_url(url) {
        return postgres::url::parse(url).map(|_| Target::Postgres(url.to_string())).map_err(|e| e.explain());
    }
    let path = crate::layout::parse_url(url, base)?;
    Ok(if crate::legacy::is_v1_file(&path) { Target::Legacy(path) } else { Target::File(path) })
}

/// A URL as logs, status and messages show it: a PostgreSQL password is hidden.
pub fn shown(url: &str) -> String {
    if postgres::is_postgres_url(url) {
        postgres::url::redact(url)
    } else {
        url.to_string()
    }
}

/// How long a network destination may take to reconnect or commit before it counts as
/// failed (`backup-reconnect-timeout`); before init, its default.
pub const DEFAULT_RECONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens a destination for writing (the one writer), with what opening repaired, in words.
/// A network destination gets `reconnect_timeout` to connect, and keeps it as its bound.
pub fn open(
    url: &str,
    base: &Path,
    reconnect_timeout: std::time::Duration,
) -> Result<(Box<dyn Destination>, Vec<String>), String> {
    let (d, notes) = open_unchecked(url, base, reconnect_timeout)?;
    check_pin(d.as_ref(), base)?;
    Ok((d, notes))
}

fn check_pin(d: &dyn Destination, base: &Path) -> Result<(), String> {
    check_copy(base, d.url(), d.backup_id().map(|id| crate::keys::hex(&id)))
}

/// Whether a copy holding `found` (its sealed backup id in hex, None for plaintext) may be
/// this node's backup, as `base`'s backup.lock records it: the pinned sealed backup, or
/// (before the first start pinned it) a sealed one where init recorded that the node chose
/// encryption. Whoever holds a copy's storage could otherwise rewrite its metadata as
/// plaintext, or put another backup there, and have the node write plaintext into it or
/// restore a forged database from it. The pin lives beside `hsm_secret`, on the node's disk.
pub(crate) fn check_copy(base: &Path, url: &str, found: Option<String>) -> Result<(), String> {
    let path = base.join(crate::plugin::LOCK_NAME);
    let pin = pinned_backup_id(base);
    let why = match (&found, &pin) {
        (Some(id), Some(pin)) if id == pin => return Ok(()),
        (Some(_), None) => return Ok(()),
        (_, Some(pin)) => format!("{} pins this node's backup as sealed backup {pin}", path.display()),
        (None, None) if socket::node::chosen_sealing(base) == Some(true) => {
            format!("this node's backup is encrypted ({} says so)", path.display())
        }
        (None, None) => return Ok(()),
    };
    Err(format!(
        "{} holds {}, but {why}: nothing is written to it or taken from it. Its storage was changed by someone \
         else, or the copy was replaced. Check it (backup-cli verify), then remove it (backup-cli \
         remove-destination) and add a fresh copy (backup-cli add-destination)",
        shown(url),
        match found {
            Some(other) => format!("another sealed backup ({other})"),
            None => "a plaintext backup".into(),
        },
    ))
}

/// The sealed backup id (hex) the lightning dir's backup.lock pins its copies to, if any.
pub(crate) fn pinned_backup_id(base: &Path) -> Option<String> {
    let path = base.join(crate::plugin::LOCK_NAME);
    let text = std::fs::read_to_string(&path).ok()?;
    LockFile::parse(&text, &path).ok()?.sealed_backup_id
}

fn open_unchecked(
    url: &str,
    base: &Path,
    reconnect_timeout: std::time::Duration,
) -> Result<(Box<dyn Destination>, Vec<String>), String> {
    match parse(url, base)? {
        Target::File(root) => {
            let keys = crate::keys::KeySource::lightning_dir(base);
            let (d, notes) = file::FileDestination::open(url, &root, &keys)?;
            Ok((Box::new(d), notes))
        }
        Target::Legacy(root) => Err(format!(
            "{url} is a backup of the Python backup plugin (format v1); cln-backup does not write into it. \
             With lightningd stopped, convert it: backup-cli migrate {url} {} --lightning-dir <lightning-dir>",
            crate::layout::url_for(&root.with_extension("cln-backup")),
        )),
        Target::Postgres(u) => {
            let name = postgres::url::default_name(base).unwrap_or_default();
            let keys = crate::keys::KeySource::lightning_dir(base);
            let d = postgres::PgDestination::open_with(&u, &name, reconnect_timeout, &keys)
                .map_err(|e| format!("Cannot open the backup at {}: {}", postgres::url::redact(&u), e.explain()))?;
            Ok((Box::new(d), vec![]))
        }
        Target::Socket(u) => {
            let d = socket::node::connect_node(base, &u, reconnect_timeout)
                .map_err(|e| format!("Cannot open the backup at {u}: {e:#}"))?;
            let s = socket::seam::Socket::open(d, base)
                .map_err(|e| format!("Cannot open the backup at {u}: {}", e.explain()))?;
            Ok((Box::new(s), vec![]))
        }
    }
}

/// The URLs a lightning dir's `backup.lock` names: `backend_url` first (the Python
/// plugin's field, kept so its tools still work), then the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockFile {
    pub urls: Vec<String>,
    /// Fields of other kinds of destination (e.g. `server_key`), kept as they are.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// `backup-min-destinations` as last seen, for the writes before the next init.
    pub min_destinations: Option<usize>,
    /// `backup-reconnect-timeout` (seconds) as last seen, likewise.
    pub reconnect_timeout_s: Option<u64>,
    /// The sealed backup's id (hex), recorded by the plugin at its first start: every copy
    /// must hold this backup, sealed (`check_pin`). None for a plaintext backup.
    pub sealed_backup_id: Option<String>,
}

impl LockFile {
    pub fn parse(text: &str, path: &Path) -> Result<LockFile, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid_lock(path, &e.to_string()))?;
        let first = v["backend_url"].as_str().ok_or_else(|| invalid_lock(path, "no backend_url"))?;
        let mut urls = vec![first.to_string()];
        if let Some(all) = v.get("destinations") {
            let all = all.as_array().ok_or_else(|| invalid_lock(path, "destinations is not a list"))?;
            for u in all {
                let u = u.as_str().ok_or_else(|| invalid_lock(path, "a destination is not a string"))?;
                if !urls.iter().any(|x| x == u) {
                    urls.push(u.to_string());
                }
            }
        }
        let min_destinations = v.get("min_destinations").and_then(|m| m.as_u64()).map(|m| m as usize);
        let reconnect_timeout_s = v.get("reconnect_timeout_s").and_then(|m| m.as_u64()).filter(|s| *s > 0);
        let mut extra = v.as_object().cloned().unwrap_or_default();
        let sealed_backup_id = v.get("sealed_backup_id").and_then(|m| m.as_str()).map(str::to_string);
        for k in ["backend_url", "destinations", "min_destinations", "reconnect_timeout_s", "sealed_backup_id"] {
            extra.remove(k);
        }
        Ok(LockFile { urls, min_destinations, reconnect_timeout_s, sealed_backup_id, extra })
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::Value::Object(self.extra.clone());
        v["backend_url"] = serde_json::json!(self.urls[0]);
        if self.urls.len() > 1 {
            v["destinations"] = serde_json::json!(self.urls);
        }
        if let Some(m) = self.min_destinations {
            v["min_destinations"] = serde_json::json!(m);
        }
        if let Some(s) = self.reconnect_timeout_s {
            v["reconnect_timeout_s"] = serde_json::json!(s);
        }
        if let Some(id) = &self.sealed_backup_id {
            v["sealed_backup_id"] = serde_json::json!(id);
        }
        v.to_string()
    }
}

fn invalid_lock(path: &Path, why: &str) -> String {
    format!(
        "{} is not valid ({why}); it should hold {{\"backend_url\": \"file:///path/to/backup\"}}, and \
         \"destinations\": [...] for more than one",
        path.display()
    )
}

/// Checks a list of destination URLs for the mistakes an operator can make: the same place
/// twice (also through two spellings of one path).
pub fn check_distinct(urls: &[String], base: &Path) -> Result<Vec<Target>, String> {
    let mut seen: Vec<(Target, Option<PathBuf>, &str)> = Vec::new();
    for u in urls {
        let t = parse(u, base)?;
        let canon = match &t {
            Target::File(p) | Target::Legacy(p) => {
                crate::fsutil::parent_of(p).canonicalize().ok().zip(p.file_name()).map(|(d, n)| d.join(n))
            }
            Target::Postgres(_) | Target::Socket(_) => None,
        };
        if let Some((_, _, first)) = seen.iter().find(|(t2, c2, _)| *t2 == t || (canon.is_some() && *c2 == canon)) {
            return Err(format!("'{u}' and '{first}' are the same destination: give each place once"));
        }
        seen.push((t, canon, u));
    }
    Ok(seen.into_iter().map(|(t, _, _)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_round_trips_and_keeps_backend_url_first() {
        let p = Path::new("/ln/backup.lock");
        let one = LockFile::parse(r#"{"backend_url": "file:///a"}"#, p).unwrap();
        assert_eq!(one.urls, vec!["file:///a"]);
        assert_eq!(one.to_json(), r#"{"backend_url":"file:///a"}"#);
        let mut extra = serde_json::Map::new();
        extra.insert("server_key".into(), serde_json::json!("ab"));
        let two = LockFile {
            urls: vec!["file:///a".into(), "file:///b".into()],
            min_destinations: Some(1),
            reconnect_timeout_s: Some(5),
            sealed_backup_id: Some("00112233445566778899aabbccddeeff".into()),
            extra,
        };
        let back = LockFile::parse(&two.to_json(), p).unwrap();
        assert_eq!(back, two);
        assert!(LockFile::parse(r#"{"backend": 1}"#, p).unwrap_err().contains("is not valid"));
        assert!(LockFile::parse(r#"{"backend_url": "file:///a", "destinations": "x"}"#, p).is_err());
    }

    #[test]
    fn the_same_place_twice_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = format!("file://{}/a.bkp", d.path().display());
        let a2 = format!("file://{}/./a.bkp", d.path().display());
        let b = format!("file://{}/b.bkp", d.path().display());
        assert!(check_distinct(&[a.clone(), b.clone()], d.path()).is_ok());
        assert!(check_distinct(&[a.clone(), a.clone()], d.path()).unwrap_err().contains("same destination"));
        assert!(check_distinct(&[a, b, a2], d.path()).unwrap_err().contains("same destination"));
    }
}
