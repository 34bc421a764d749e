//! The `postgres://` destination: each db_write is one PostgreSQL transaction, committed
//! (and so on every synchronous standby the cluster waits for) before the plugin answers.
//!
//! Tables live in the schema `cln_backup`; several backups share them, kept apart by name:
//!
//! ```text
//! backups(name, generation, next_seq, last_version, droppable, last_tx_seq, meta)  the position;
//!                                               meta: backup.json's fields (NULL: plaintext, made before)
//! generations(name, generation, base_version, journal_header, snapshot_len, chunks)
//! snapshot_chunks(name, generation, idx, bytes)      the snapshot file, in 1 MiB chunks
//! records(name, generation, seq, data_version, kind, data)   each framed journal record
//! ```
//!
//! The bytes are exactly the file backup's (`<gen>-<base>.snapshot`, journal header and
//! records, sealed with encryption), so restore materializes the file layout and runs the
//! one restore engine on it. A record is sealed for its offset in that rebuilt journal
//! (header, then the generation's records by seq), so a file copy at the same place holds
//! the same bytes. One writer per backup: a session-level advisory lock.
//!
//! The API is synchronous (the hook path is); it runs tokio-postgres on a private
//! current-thread runtime. Call it from a plain thread or `spawn_blocking`; called from
//! inside a tokio task it still works, on a scoped thread, at the cost of a thread spawn.

mod seam;
mod tls;
pub mod transfer;
pub mod url;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::runtime::Runtime;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::StoreError;
use crate::journal::{self, Kind, Payloads};
use crate::keys::KeySource;
use crate::meta::Meta;
use crate::plugin::stats::Latency;
use crate::seal::Sealer;
use crate::versions::{self, Decision, Position};

pub use transfer::{
    build_generation, create, download, drop_backup, remove_old_generations, restore_from, verify_from, Downloaded,
    PgPlan, PreparedGeneration,
};
pub use url::is_postgres_url;

pub const SCHEMA: &str = "cln_backup";
/// Snapshot files are stored in chunks of this size, so no single value is huge.
pub const CHUNK: usize = 1 << 20;
/// How long open waits for a just-dead writer's advisory lock before refusing.
const LOCK_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{url}: bad PostgreSQL URL: {what}")]
    Url { url: String, what: String },
    #[error("{url}: TLS setup failed: {what}")]
    Tls { url: String, what: String },
    #[error("{url}: cannot connect: {what}")]
    Connect { url: String, what: String, retryable: bool },
    #[error("{url}: {op} failed: {what}")]
    Db { url: String, op: &'static str, what: String, retryable: bool },
    #[error("{url}: the database has no {SCHEMA} schema, so it holds no backup")]
    NoSchema { url: String },
    #[error("{url}: there is no backup named '{name}' in schema {SCHEMA}{known}")]
    NotFound { url: String, name: String, known: String },
    #[error("{url}: a backup named '{name}' already exists")]
    Exists { url: String, name: String },
    #[error("{url}: backup '{name}' is in use by another writer (its PostgreSQL advisory lock is held)")]
    Locked { url: String, name: String },
    #[error("{url}: backup '{name}': {what}")]
    Chain { url: String, name: String, what: String },
    #[error("{url}: {op} did not complete within {secs:.1} s (backup-reconnect-timeout); last error: {last}")]
    Timeout { url: String, op: &'static str, secs: f64, last: String },
    #[error("{url}: backup '{name}' is damaged: {what}")]
    Damaged { url: String, name: String, what: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PgError {
    pub fn hint(&self) -> &'static str {
        match self {
            PgError::Url { .. } => "write postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=require&backup=NAME]",
            PgError::Tls { .. } => "check sslmode and sslrootcert (a PEM file with the server's CA)",
            PgError::Connect { what, .. } if what.contains("certificate") => {
                "the server's certificate did not verify: check sslrootcert (the CA that signed it) and that the \
                 URL's host name is in the certificate"
            }
            PgError::Connect { .. } => {
                "check that PostgreSQL runs and accepts this user from this host (pg_hba.conf), the password \
                 (URL, PGPASSWORD or PGPASSFILE) and that the database exists"
            }
            PgError::Db { .. } => "check the PostgreSQL server's log and the user's privileges on schema cln_backup",
            PgError::NoSchema { .. } => "create the backup first with `backup-cli init postgres://...`",
            PgError::NotFound { .. } => "check the URL's backup=NAME, or create it with `backup-cli init postgres://...`",
            PgError::Exists { .. } => "choose another backup=NAME, or drop the old backup's rows first",
            PgError::Locked { .. } => "stop the other writer first (only one plugin may write a backup)",
            PgError::Chain { .. } => {
                "the backup in PostgreSQL is not where this node is: stop lightningd and check which node writes this backup name"
            }
            PgError::Timeout { .. } => {
                "PostgreSQL (or a synchronous standby it waits for) did not answer in time: check the cluster, \
                 then start lightningd again"
            }
            PgError::Damaged { .. } => "keep the rows, run `backup-cli verify`, and make a new backup with `backup-cli init`",
            PgError::Store(e) => e.hint(),
        }
    }

    pub fn explain(&self) -> String {
        format!("{self}. What to do: {}", self.hint())
    }

    /// Whether waiting and trying again (reconnecting) may help.
    pub fn retryable(&self) -> bool {
        matches!(self, PgError::Connect { retryable: true, .. } | PgError::Db { retryable: true, .. })
    }
}

/// Whether an error means "the server went away or is not ready", as opposed to a refusal.
fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            let code = c.code();
            code.starts_with("08")
                || code.starts_with("57P")
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::QUERY_CANCELED
        }
        // no SQLSTATE: an I/O or protocol error on the socket
        None => true,
    }
}

/// The message of a client error, with the server's detail when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

pub(crate) fn db_err<'a>(url: &'a str, op: &'static str) -> impl Fn(tokio_postgres::Error) -> PgError + 'a {
    move |e| PgError::Db { url: url.into(), op, what: describe(&e), retryable: transient(&e) }
}

pub(crate) fn runtime() -> Result<Runtime, PgError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
        PgError::Store(StoreError::Io { op: "start the PostgreSQL client runtime", path: "tokio".into(), source: e })
    })
}

/// Runs `f` on our runtime. Called from inside another tokio runtime (an async hook
/// handler that forgot `spawn_blocking`), it runs on a scoped thread instead of panicking.
fn block_on<F>(rt: &Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

/// The advisory lock key of a backup name (FNV-1a, 64 bits).
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"cln-backup:".iter().chain(name.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// A connected session: the client and its connection task.
pub(crate) struct Session {
    pub client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects once (each host of the URL in turn, as libpq does). Call inside the runtime.
pub(crate) async fn connect(pg: &url::PgUrl, tls: &MakeRustlsConnect) -> Result<Session, PgError> {
    let (client, connection) = pg.config.connect(tls.clone()).await.map_err(|e| {
        let permanent = matches!(
            e.code(),
            Some(c) if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *c == SqlState::INVALID_CATALOG_NAME
        );
        let what = describe(&e);
        // a certificate that does not verify will not verify on the next try either
        let permanent = permanent || what.contains("invalid peer certificate");
        PgError::Connect { url: pg.display.clone(), what, retryable: !permanent }
    })?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Session { client, task })
}

/// Fails with NoSchema unless the backup tables exist.
pub(crate) async fn check_schema(client: &Client, url: &str) -> Result<(), PgError> {
    let row = client
        .query_one("SELECT to_regclass('cln_backup.backups') IS NOT NULL", &[])
        .await
        .map_err(db_err(url, "look for the cln_backup schema"))?;
    if row.get::<_, bool>(0) {
        Ok(())
    } else {
        Err(PgError::NoSchema { url: url.into() })
    }
}

/// Names of the backups in the database, for messages.
pub(crate) async fn known_names(client: &Client) -> String {
    match client.query("SELECT name FROM cln_backup.backups ORDER BY name", &[]).await {
        Ok(rows) if !rows.is_empty() => {
            let names: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            format!(" (it holds: {})", names.join(", "))
        }
        _ => " (it holds none)".into(),
    }
}

/// The writer's view of the `backups` row, with where its records sit in the journal a
/// download rebuilds (header, then the generation's records by seq): a sealed record is
/// bound to that offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    generation: i64,
    next_seq: i64,
    version: u32,
    droppable: bool,
    last_tx_seq: i64,
    /// Bytes of that journal, header included.
    journal_len: i64,
    /// Where the record `last_tx_seq` starts in it (meaningful while droppable).
    last_tx_offset: i64,
}

impl State {
    fn position(&self) -> Position {
        Position { version: self.version, droppable: self.droppable }
    }

    /// The state after appending a record of `len` bytes and `kind` at `dv` (after
    /// dropping the last transaction first when `replace`).
    fn after(&self, dv: u32, kind: Kind, replace: bool, len: usize) -> State {
        let mut s = *self;
        if replace {
            s.version = s.version.wrapping_sub(1);
            s.droppable = false;
            s.last_tx_seq = -1;
            s.journal_len = self.last_tx_offset;
        }
        if kind == Kind::Transaction {
            s.version = dv;
            s.droppable = true;
            s.last_tx_seq = s.next_seq;
            s.last_tx_offset = s.journal_len;
        }
        s.next_seq += 1;
        s.journal_len += len as i64;
        s
    }

    /// Where the next record goes: the end, or where the last transaction starts when it
    /// replaces it.
    fn next_offset(&self, replace: bool) -> Option<u64> {
        match replace {
            false => Some(self.journal_len as u64),
            true if self.droppable => Some(self.last_tx_offset as u64),
            true => None,
        }
    }
}

const LOAD_STATE: &str = "SELECT b.generation, b.next_seq, b.last_version, b.droppable, b.last_tx_seq,
    (SELECT coalesce(sum(length(r.data)), 0)::bigint FROM cln_backup.records r
      WHERE r.name = b.name AND r.generation = b.generation),
    (SELECT coalesce(sum(length(r.data)), 0)::bigint FROM cln_backup.records r
      WHERE r.name = b.name AND r.generation = b.generation AND r.seq < b.last_tx_seq)
  FROM cln_backup.backups b WHERE b.name = $1";

async fn load_state(client: &Client, url: &str, name: &str) -> Result<State, PgError> {
    let row = client.query_opt(LOAD_STATE, &[&name]).await.map_err(db_err(url, "read the backup's position"))?;
    let Some(row) = row else {
        return Err(PgError::NotFound { url: url.into(), name: name.into(), known: known_names(client).await });
    };
    let header = crate::journal::HEADER_LEN as i64;
    Ok(State {
        generation: row.get(0),
        next_seq: row.get(1),
        version: row.get::<_, i64>(2) as u32,
        droppable: row.get(3),
        last_tx_seq: row.get(4),
        journal_len: header + row.get::<_, i64>(5),
        last_tx_offset: header + row.get::<_, i64>(6),
    })
}

/// The backup's metadata (what `backup.json` holds for a file backup), from the same view
/// as the caller's other reads. None: a backup made before sealing existed (plaintext),
/// also when the column is not there yet (a schema from before it).
pub(crate) async fn load_meta(client: &Client, url: &str, name: &str) -> Result<Option<Meta>, PgError> {
    let row = client
        .query_opt("SELECT to_jsonb(b) ->> 'meta' FROM cln_backup.backups b WHERE b.name = $1", &[&name])
        .await
        .map_err(db_err(url, "read the backup's metadata"))?;
    let Some(text) = row.and_then(|r| r.get::<_, Option<String>>(0)) else { return Ok(None) };
    let damaged = |what: String| PgError::Damaged { url: url.into(), name: name.into(), what };
    let m: Meta = serde_json::from_str(&text).map_err(|e| damaged(format!("its metadata is not valid JSON: {e}")))?;
    if m.sealed && m.id().is_none() {
        return Err(damaged("its metadata's backup_id is not 32 hex digits".into()));
    }
    Ok(Some(m))
}

/// Stores the backup's metadata (inside the caller's transaction, when there is one).
pub(crate) async fn store_meta(client: &Client, url: &str, name: &str, meta: &Meta) -> Result<(), PgError> {
    let text = serde_json::to_string(meta).map_err(|e| PgError::Damaged {
        url: url.into(),
        name: name.into(),
        what: e.to_string(),
    })?;
    client
        .execute("UPDATE cln_backup.backups SET meta = $2 WHERE name = $1", &[&name, &text])
        .await
        .map_err(db_err(url, "store the backup's metadata"))?;
    Ok(())
}

/// One statement, so one round trip and one implicit transaction: the guard (the row still
/// says what this writer believes) makes the version decision hold on the server too; the
/// delete (replace) and the insert commit together or not at all.
const APPEND: &str = "WITH b AS (
    UPDATE cln_backup.backups
       SET next_seq = next_seq + 1, last_version = $8, droppable = $9, last_tx_seq = $10, updated = now()
     WHERE name = $1 AND generation = $2 AND next_seq = $3 AND last_version = $4 AND droppable = $5
    RETURNING generation),
  d AS (DELETE FROM cln_backup.records
         WHERE $6 AND name = $1 AND generation = $2 AND seq >= $7 AND EXISTS (SELECT 1 FROM b))
INSERT INTO cln_backup.records (name, generation, seq, data_version, kind, data)
SELECT $1, generation, $3, $11, $12, $13 FROM b";

/// What the session says about replication, for status.
#[derive(Debug, Clone, Default)]
struct Replication {
    synchronous_commit: String,
    standby_names: String,
    sync_standbys: Option<i64>,
    server: String,
}

struct Conn {
    session: Session,
    append: Statement,
}

/// A backup in PostgreSQL, opened for writing (the one writer).
pub struct PgDestination {
    rt: Runtime,
    pg: url::PgUrl,
    tls: MakeRustlsConnect,
    name: String,
    timeout: Duration,
    conn: Option<Conn>,
    state: State,
    /// A failed append may or may not have committed: read the position back first.
    uncertain: bool,
    latency: Latency,
    reconnects: u64,
    replication: Replication,
    last_error: Option<String>,
    /// Header CRC of the last record (0 when unknown): what tells copies apart, with the position.
    tail: u32,
    last_write: Option<std::time::SystemTime>,
    /// The URL as given (with its password), for the connections compaction opens.
    raw_url: String,
    sealing: Sealing,
    /// Where the key is looked for (the node's lightning dir), also by compaction.
    keys: KeySource,
    /// The id bound into every seal (None: plaintext).
    backup_id: Option<crate::seal::BackupId>,
    /// The record being sealed for this copy by `append`.
    seal_buf: Vec<u8>,
}

/// How records are stored: as the current generation's journal header says. A sealed
/// backup never gets a plaintext record.
enum Sealing {
    Plain,
    Ready(Arc<Sealer>),
    /// Sealed, the key not read yet (a node before its first start has no hsm_secret):
    /// read at the first write.
    Pending(Meta),
}

impl PgDestination {
    /// Opens backup `name` (the URL's `backup=` wins over it) for writing: connects, takes the
    /// backup's advisory lock for the life of this value, sets `synchronous_commit` to at least
    /// `on`, and reads the position. Connection failures are retried within `reconnect_timeout`;
    /// refusals (bad password, no such database or backup, lock held) fail at once.
    pub fn open(url: &str, name: &str, reconnect_timeout: Duration) -> Result<PgDestination, PgError> {
        PgDestination::open_with(url, name, reconnect_timeout, &KeySource::default())
    }

    /// As `open`; a sealed backup's key is looked for in `keys` (the plugin gives the
    /// node's lightning dir), then where the backup's metadata says it was at init. Not
    /// found, it is read at the first write (which fails, writing nothing, without it).
    pub fn open_with(
        url: &str,
        name: &str,
        reconnect_timeout: Duration,
        keys: &KeySource,
    ) -> Result<PgDestination, PgError> {
        let pg = url::parse(url)?;
        let name = pg.backup.clone().unwrap_or_else(|| name.to_string());
        url::check_name(&name).map_err(|what| PgError::Url { url: pg.display.clone(), what })?;
        let tls = tls::connector(&pg.tls, &pg.display)?;
        let mut d = PgDestination {
            rt: runtime()?,
            pg,
            tls,
            name,
            timeout: reconnect_timeout,
            conn: None,
            state: State {
                generation: 0,
                next_seq: 0,
                version: 0,
                droppable: false,
                last_tx_seq: -1,
                journal_len: 0,
                last_tx_offset: 0,
            },
            uncertain: false,
            latency: Latency::default(),
            reconnects: 0,
            replication: Replication::default(),
            last_error: None,
            tail: 0,
            last_write: None,
            raw_url: url.to_string(),
            sealing: Sealing::Plain,
            keys: keys.clone(),
            backup_id: None,
            seal_buf: Vec::new(),
        };
        let deadline = Instant::now() + reconnect_timeout;
        d.ensure_connected(deadline, true)?;
        d.tail = d.read_tail()?;
        d.read_sealing()?;
        Ok(d)
    }

    /// Reads the backup's metadata and its generation's header, which must agree on
    /// sealing, and the key if it is at hand.
    fn read_sealing(&mut self) -> Result<(), PgError> {
        let Some(conn) = self.conn.as_ref() else { return Ok(()) };
        let (url, name) = (self.pg.display.as_str(), self.name.as_str());
        let client = &conn.session.client;
        let generation = self.state.generation;
        let (meta, header) = block_on(&self.rt, async {
            let meta = load_meta(client, url, name).await?;
            let row = client
                .query_opt(
                    "SELECT journal_header FROM cln_backup.generations WHERE name = $1 AND generation = $2",
                    &[&name, &generation],
                )
                .await
                .map_err(db_err(url, "read the generation"))?;
            Ok::<_, PgError>((meta, row.map(|r| r.get::<_, Vec<u8>>(0))))
        })?;
        let damaged = |what: &str| PgError::Damaged { url: url.into(), name: name.into(), what: what.into() };
        let header = header.ok_or_else(|| damaged("its current generation has no row in cln_backup.generations"))?;
        let header = journal::Header::decode(std::path::Path::new(url), &header)?;
        self.sealing = match meta {
            Some(m) if m.sealed && !header.sealed => {
                return Err(damaged(
                    "its metadata says sealed, but its current generation is plaintext: the rows were replaced; \
                     nothing is written into it",
                ))
            }
            Some(m) if m.sealed => {
                self.backup_id = m.id();
                Sealing::Pending(m)
            }
            _ if header.sealed => {
                return Err(damaged("its current generation is sealed, but its metadata is missing or says plaintext"))
            }
            _ => Sealing::Plain,
        };
        if let Sealing::Pending(m) = &self.sealing {
            let keys = m.source_with_recorded(self.keys.clone());
            // at hand now: checked (by fingerprint) now; else at the first write
            if m.sealer(&keys).map_err(|e| self.key_err(e))?.is_some() {
                self.sealer()?;
            }
        }
        Ok(())
    }

    fn key_err(&self, e: crate::keys::KeyError) -> PgError {
        StoreError::Key { path: format!("{} (backup '{}')", self.pg.display, self.name).into(), what: e.to_string() }
            .into()
    }

    /// The backup id, when it is sealed.
    pub fn sealed_backup_id(&self) -> Option<crate::seal::BackupId> {
        self.backup_id.filter(|_| self.is_sealed())
    }

    /// Whether records are sealed.
    pub fn is_sealed(&self) -> bool {
        !matches!(self.sealing, Sealing::Plain)
    }

    /// The fingerprint of the key once it is read.
    pub fn key_fingerprint(&self) -> Option<&str> {
        match &self.sealing {
            Sealing::Ready(s) => Some(s.fingerprint()),
            _ => None,
        }
    }

    /// The sealer of a sealed backup, reading the key now if it was not read yet; the first
    /// time, its fingerprint is recorded in the metadata (as `backup.json` gets it). None
    /// for a plaintext backup.
    pub fn sealer(&mut self) -> Result<Option<Arc<Sealer>>, PgError> {
        if let Sealing::Pending(m) = &self.sealing {
            let keys = m.source_with_recorded(self.keys.clone());
            let found = m.sealer(&keys).map_err(|e| self.key_err(e))?;
            let Some((s, key)) = found else { return Err(self.key_err(m.missing(&keys))) };
            if m.key_fingerprint.is_none() {
                // the lightning dir whose hsm_secret it was, so offline tools find it too
                let ldir = m.lightning_dir.clone().or_else(|| {
                    (m.key_file.is_none() && keys.hsm_secret.is_none() && keys.key_file.is_none())
                        .then(|| keys.search.iter().find(|d| d.join(crate::keys::HSM_SECRET).exists()).cloned())
                        .flatten()
                        .map(|d| std::path::absolute(&d).unwrap_or(d))
                });
                let m = Meta { key_fingerprint: Some(key.fingerprint()), lightning_dir: ldir, ..m.clone() };
                self.ensure_connected(Instant::now() + self.timeout, false)?;
                if let Some(conn) = self.conn.as_ref() {
                    block_on(&self.rt, store_meta(&conn.session.client, &self.pg.display, &self.name, &m))?;
                }
            }
            self.sealing = Sealing::Ready(Arc::new(s));
        }
        Ok(match &self.sealing {
            Sealing::Ready(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// The sealer a compaction seals the new generation with (None: plaintext); an error
    /// while the key of a sealed backup has not been read.
    pub(crate) fn compaction_sealer(&self) -> Result<Option<Arc<Sealer>>, PgError> {
        match &self.sealing {
            Sealing::Plain => Ok(None),
            Sealing::Ready(s) => Ok(Some(s.clone())),
            Sealing::Pending(_) => Err(PgError::Chain {
                url: self.pg.display.clone(),
                name: self.name.clone(),
                what: "the backup is sealed and its key has not been read yet (no write since the start): not \
                       compacted now"
                    .into(),
            }),
        }
    }

    /// The key source compaction uses to open what it folds.
    pub(crate) fn keys(&self) -> KeySource {
        self.keys.clone()
    }

    /// Seals a plaintext record framed by `journal::encode_record` for the place it takes
    /// next here (where the last transaction starts, when it replaces it) into `out`, with
    /// the same routine as a file backup, so copies at the same place store the same bytes.
    /// False for a plaintext backup (`out` untouched).
    pub fn seal_for_next(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        statements: &[&str],
        out: &mut Vec<u8>,
    ) -> Result<bool, PgError> {
        if !self.is_sealed() {
            return Ok(false);
        }
        let Some(sealer) = self.sealer()? else { return Ok(false) };
        let chain =
            |what: &str| PgError::Chain { url: self.pg.display.clone(), name: self.name.clone(), what: what.into() };
        let offset = self.state.next_offset(replace_last).ok_or_else(|| chain("no transaction to replace"))?;
        out.clear();
        let payloads = Payloads::Sealed { sealer: &sealer, generation: self.state.generation as u64 };
        journal::encode_record_as(out, offset, data_version, kind, statements, payloads);
        Ok(true)
    }

    /// Bytes of the current generation's journal as a download rebuilds it.
    pub fn journal_len(&self) -> u64 {
        self.state.journal_len as u64
    }

    /// Where the last transaction starts in it, while it can be dropped.
    pub fn last_tx_offset(&self) -> Option<u64> {
        self.state.droppable.then_some(self.state.last_tx_offset as u64)
    }

    pub fn tail(&self) -> u32 {
        self.tail
    }

    pub fn last_write(&self) -> Option<std::time::SystemTime> {
        self.last_write
    }

    /// The header CRC of the current generation's last record (0 when it has none).
    fn read_tail(&self) -> Result<u32, PgError> {
        let Some(conn) = self.conn.as_ref() else { return Ok(0) };
        let row = block_on(
            &self.rt,
            conn.session.client.query_opt(
                "SELECT data FROM cln_backup.records WHERE name = $1 AND generation = $2 ORDER BY seq DESC LIMIT 1",
                &[&self.name, &self.state.generation],
            ),
        )
        .map_err(db_err(&self.pg.display, "read the last record"))?;
        Ok(row.map_or(0, |r| crate::journal::header_crc(r.get::<_, &[u8]>(0))))
    }

    pub fn url(&self) -> &str {
        &self.pg.display
    }

    pub fn kind(&self) -> &'static str {
        "postgres"
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn position(&self) -> Position {
        self.state.position()
    }

    pub fn generation(&self) -> u64 {
        self.state.generation as u64
    }

    /// The bound for reconnecting and for a commit that does not return.
    pub fn set_reconnect_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Reads the position back from the server (after a failed append, it may have moved).
    pub fn refresh(&mut self) -> Result<Position, PgError> {
        let deadline = Instant::now() + self.timeout;
        self.ensure_connected(deadline, false)?;
        Ok(self.position())
    }
    /// Durably stores one record as it is (sealed for this place already, or plaintext in a
    /// plaintext backup; `Destination::append` seals one first): when `replace_last`, drops
    /// the last transaction first, in one PostgreSQL transaction, committed before this
    /// returns. Retries a lost connection within the reconnect timeout, exactly once; a
    /// commit that does not return in that time is cancelled and reported as an error.
    pub fn append_copy(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), PgError> {
        self.store(data_version, kind, replace_last, record)?;
        self.tail = journal::header_crc(record);
        self.last_write = Some(std::time::SystemTime::now());
        Ok(())
    }

    fn store(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), PgError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut last = String::new();
        loop {
            if let Err(e) = self.ensure_connected(deadline, false) {
                self.last_error = Some(e.to_string());
                return Err(e);
            }
            // The rules, against what the server holds (the guard below proves it).
            let before = self.state;
            match (versions::decide(before.position(), data_version, kind), replace_last) {
                (Decision::Append, false) | (Decision::ReplaceLast, true) => {}
                (d, _) => {
                    return Err(PgError::Chain {
                        url: self.pg.display.clone(),
                        name: self.name.clone(),
                        what: format!(
                            "refusing a {} at data_version {data_version} (replace_last={replace_last}): the backup \
                             holds up to version {} (droppable: {}), which calls for {d:?}",
                            kind_name(kind),
                            before.version,
                            before.droppable
                        ),
                    })
                }
            }
            let after = before.after(data_version, kind, replace_last, record.len());
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = {
                let Some(conn) = self.conn.as_ref() else { continue };
                let client = &conn.session.client;
                let stmt = conn.append.clone();
                let cancel = client.cancel_token();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
                    &self.name,
                    &before.generation,
                    &before.next_seq,
                    &(before.version as i64),
                    &before.droppable,
                    &replace_last,
                    &before.last_tx_seq,
                    &(after.version as i64),
                    &after.droppable,
                    &after.last_tx_seq,
                    &(data_version as i64),
                    &(kind as i16),
                    &record,
                ];
                let tls = self.tls.clone();
                block_on(&self.rt, async {
                    match tokio::time::timeout(remaining, client.execute(&stmt, &params)).await {
                        Ok(r) => Some(r),
                        Err(_) => {
                            // Stalled (a synchronous standby gone?): cancel, never wait longer.
                            let _ = tokio::time::timeout(Duration::from_secs(1), cancel.cancel_query(tls)).await;
                            None
                        }
                    }
                })
            };
            match outcome {
                Some(Ok(1)) => {
                    self.state = after;
                    self.latency.record(started.elapsed().as_micros() as u64);
                    self.last_error = None;
                    return Ok(());
                }
                Some(Ok(_)) => {
                    // The guard did not hold: someone else moved the backup.
                    self.uncertain = true;
                    self.drop_connection();
                    return Err(PgError::Chain {
                        url: self.pg.display.clone(),
                        name: self.name.clone(),
                        what: format!(
                            "the backup in PostgreSQL changed under this writer (it expected version {} at \
                             record {} of generation {}): was it written by another node, or re-created?",
                            before.version, before.next_seq, before.generation
                        ),
                    });
                }
                Some(Err(e)) if transient(&e) => {
                    last = describe(&e);
                    self.uncertain = true;
                    self.drop_connection();
                    if !self.resolve_uncertain(before, after, data_version, kind, record, deadline)? {
                        continue;
                    }
                    self.latency.record(started.elapsed().as_micros() as u64);
                    return Ok(());
                }
                Some(Err(e)) => {
                    self.uncertain = true;
                    self.drop_connection();
                    let e = db_err(&self.pg.display, "append a record")(e);
                    self.last_error = Some(e.to_string());
                    return Err(e);
                }
                None => {
                    self.uncertain = true;
                    self.drop_connection();
                    let e = PgError::Timeout {
                        url: self.pg.display.clone(),
                        op: "committing a record",
                        secs: self.timeout.as_secs_f64(),
                        last: if last.is_empty() {
                            "the commit did not return (a synchronous standby down?)".into()
                        } else {
                            last
                        },
                    };
                    self.last_error = Some(e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// After an append whose outcome is unknown: reconnect, read the position back, and
    /// say whether the record is already there (true) or must be sent again (false).
    #[allow(clippy::too_many_arguments)]
    fn resolve_uncertain(
        &mut self,
        before: State,
        after: State,
        dv: u32,
        kind: Kind,
        record: &[u8],
        deadline: Instant,
    ) -> Result<bool, PgError> {
        std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
        if let Err(e) = self.ensure_connected(deadline, false) {
            self.last_error = Some(e.to_string());
            return Err(e);
        }
        if self.state == before {
            return Ok(false);
        }
        if self.state == after {
            let conn = self.conn.as_ref().map(|c| &c.session.client);
            let Some(client) = conn else { return Ok(false) };
            let seq = before.next_seq;
            let same = block_on(
                &self.rt,
                client.query_opt(
                    "SELECT data_version = $3 AND kind = $4 AND data = $5 FROM cln_backup.records
                  WHERE name = $1 AND generation = $2 AND seq = $6",
                    &[&self.name, &after.generation, &(dv as i64), &(kind as i16), &record, &seq],
                ),
            );
            if let Ok(Some(row)) = same {
                if row.get::<_, bool>(0) {
                    return Ok(true);
                }
            }
        }
        Err(PgError::Chain {
            url: self.pg.display.clone(),
            name: self.name.clone(),
            what: format!(
                "after reconnecting, the backup holds version {} (record {}), neither before nor after the \
                 record that was being written (data_version {dv})",
                self.state.version, self.state.next_seq
            ),
        })
    }

    fn drop_connection(&mut self) {
        self.conn = None;
    }

    /// Connects (again) if needed, retrying transient failures until `deadline`.
    fn ensure_connected(&mut self, deadline: Instant, first: bool) -> Result<(), PgError> {
        if self.conn.is_some() && !self.uncertain {
            if let Some(c) = &self.conn {
                if !c.session.client.is_closed() {
                    return Ok(());
                }
            }
        }
        let mut last = String::from("no attempt finished");
        let mut pause = Duration::from_millis(50);
        // A writer that just died (killed plugin) may hold the lock until the server sees
        // its socket close: wait that long, then say who holds it.
        let lock_grace = Instant::now() + LOCK_GRACE.min(self.timeout);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(PgError::Timeout {
                    url: self.pg.display.clone(),
                    op: if first { "connecting" } else { "reconnecting" },
                    secs: self.timeout.as_secs_f64(),
                    last,
                });
            }
            self.conn = None;
            let attempt = block_on(&self.rt, async {
                match tokio::time::timeout(remaining, self.connect_and_lock()).await {
                    Ok(r) => r,
                    Err(_) => Err(PgError::Connect {
                        url: self.pg.display.clone(),
                        what: "timed out".into(),
                        retryable: true,
                    }),
                }
            });
            match attempt {
                Ok((conn, state, repl)) => {
                    if !first {
                        self.reconnects += 1;
                    }
                    if !first && !self.uncertain && state != self.state {
                        return Err(PgError::Chain {
                            url: self.pg.display.clone(),
                            name: self.name.clone(),
                            what: format!(
                                "after reconnecting, the backup is at version {} (record {}) but this writer left \
                                 it at {} (record {}): was it written by another node?",
                                state.version, state.next_seq, self.state.version, self.state.next_seq
                            ),
                        });
                    }
                    self.conn = Some(conn);
                    self.state = state;
                    self.replication = repl;
                    if self.uncertain {
                        // a commit that may have landed: the end is read back, as the state
                        self.tail = 0;
                        self.tail = self.read_tail()?;
                    }
                    self.uncertain = false;
                    return Ok(());
                }
                // Our own old session may still hold the lock on a half-open connection.
                Err(PgError::Locked { .. }) if !first => last = "the advisory lock is still held".into(),
                Err(PgError::Locked { .. }) if Instant::now() < lock_grace => {}
                Err(e) if e.retryable() => last = e.to_string(),
                Err(e) => return Err(e),
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn connect_and_lock(&self) -> Result<(Conn, State, Replication), PgError> {
        let url = self.pg.display.as_str();
        let session = connect(&self.pg, &self.tls).await?;
        let client = &session.client;
        let row = client
            .query_one("SELECT pg_is_in_recovery(), current_setting('synchronous_commit')", &[])
            .await
            .map_err(db_err(url, "check the server"))?;
        if row.get::<_, bool>(0) {
            // a standby (failover in progress, or target_session_attrs missing)
            return Err(PgError::Connect {
                url: url.into(),
                what: "the server is a read-only standby; add target_session_attrs=read-write to try the others".into(),
                retryable: true,
            });
        }
        check_schema(client, url).await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(&self.name)])
            .await
            .map_err(db_err(url, "take the backup's advisory lock"))?
            .get(0);
        if !locked {
            return Err(PgError::Locked { url: url.into(), name: self.name.clone() });
        }
        // "at least on": off, local and remote_write do not wait for the standbys' flush
        let sc: String = row.get(1);
        if matches!(sc.as_str(), "off" | "local" | "remote_write") {
            client.batch_execute("SET synchronous_commit = on").await.map_err(db_err(url, "set synchronous_commit"))?;
        }
        let state = load_state(client, url, &self.name).await?;
        let append = client.prepare(APPEND).await.map_err(db_err(url, "prepare the append statement"))?;
        let repl = replication(client).await;
        Ok((Conn { session, append }, state, repl))
    }

    /// Per-destination fields for backup-status.
    pub fn status(&self) -> serde_json::Value {
        let r = &self.replication;
        let waits =
            !r.standby_names.trim().is_empty() && matches!(r.synchronous_commit.as_str(), "on" | "remote_apply");
        json!({
            "kind": "postgres",
            "url": self.pg.display,
            "host": if r.server.is_empty() { url::hosts(&self.pg.config).join(",") } else { r.server.clone() },
            "hosts": url::hosts(&self.pg.config),
            "server": r.server,
            "database": self.pg.config.get_dbname(),
            "backup": self.name,
            "connected": self.conn.is_some(),
            "generation": self.state.generation,
            "latest_version": self.state.version,
            "next_seq": self.state.next_seq,
            "commit_latency": {
                "count": self.latency.count,
                "p50_us": self.latency.quantile(0.5),
                "p99_us": self.latency.quantile(0.99),
                "max_us": self.latency.max_us,
            },
            "synchronous_replication": waits,
            "synchronous_commit": r.synchronous_commit,
            "synchronous_standby_names": r.standby_names,
            "sync_standbys_connected": r.sync_standbys,
            "reconnects": self.reconnects,
            "reconnect_timeout_s": self.timeout.as_secs_f64(),
            "last_error": self.last_error,
            "sealed": self.is_sealed(),
            "key_fingerprint": self.key_fingerprint(),
        })
    }

    /// What a compaction may fold now: the records before the last transaction.
    pub fn plan(&self) -> Option<PgPlan> {
        let fold_seq = if self.state.droppable { self.state.last_tx_seq } else { self.state.next_seq };
        (fold_seq > 0).then_some(PgPlan { generation: self.state.generation, fold_seq })
    }

    /// Makes a generation built by `build_generation` current, in one short transaction that
    /// moves the records after its fold point into it. Call it from the writer's thread
    /// (between appends), like the file writer's switch.
    pub fn install_generation(&mut self, next: &PreparedGeneration) -> Result<(), PgError> {
        let deadline = Instant::now() + self.timeout;
        self.ensure_connected(deadline, false)?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(PgError::Connect {
                url: self.pg.display.clone(),
                what: "not connected".into(),
                retryable: true,
            });
        };
        let url = self.pg.display.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let sealer = match &self.sealing {
            Sealing::Ready(s) => Some(s.clone()),
            Sealing::Pending(_) => {
                return Err(PgError::Chain {
                    url,
                    name: self.name.clone(),
                    what: "the backup is sealed and its key has not been read: nothing is switched".into(),
                })
            }
            Sealing::Plain => None,
        };
        let r = block_on(&self.rt, async {
            let client = &conn.session.client;
            let switch = async {
                transfer::switch(client, &url, &self.name, self.state, next, sealer.as_deref()).await?;
                // where its records now sit in the new generation's journal
                load_state(client, &url, &self.name).await
            };
            tokio::time::timeout(remaining, switch).await
        });
        match r {
            Ok(Ok(state)) => {
                self.state = state;
                // the records after the fold point were resealed: the end has a new name
                self.tail = 0;
                self.tail = self.read_tail()?;
                Ok(())
            }
            Ok(Err(e)) => {
                self.uncertain = true;
                self.drop_connection();
                Err(e)
            }
            Err(_) => {
                self.uncertain = true;
                self.drop_connection();
                Err(PgError::Timeout {
                    url,
                    op: "switching to a new generation",
                    secs: self.timeout.as_secs_f64(),
                    last: String::new(),
                })
            }
        }
    }
}

impl PgDestination {
    /// Replaces what the database holds for this backup with a whole generation of a file
    /// copy (catch-up when it is far behind): stored as it is (same backup id, same
    /// seals), made current in one transaction; older generations then go in steps.
    pub fn install_files(&mut self, from: &crate::destination::GenerationFiles) -> Result<(), PgError> {
        let chain = |what: String| PgError::Chain { url: self.pg.display.clone(), name: self.name.clone(), what };
        let local = transfer::read_install(from, self.is_sealed(), self.backup_id).map_err(chain)?;
        self.ensure_connected(Instant::now() + self.timeout, false)?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(PgError::Connect {
                url: self.pg.display.clone(),
                what: "not connected".into(),
                retryable: true,
            });
        };
        let (url, name) = (self.pg.display.as_str(), self.name.as_str());
        let client = &conn.session.client;
        let r = block_on(&self.rt, async {
            transfer::install(client, url, name, &local).await?;
            load_state(client, url, name).await
        });
        match r {
            Ok(state) => self.state = state,
            Err(e) => {
                self.uncertain = true;
                self.drop_connection();
                return Err(e);
            }
        }
        self.tail = self.read_tail()?;
        self.last_write = Some(std::time::SystemTime::now());
        if let Err(e) = transfer::remove_old_generations(&self.raw_url, &self.name, &mut |_| {}) {
            log::warn!("{}: old generations stay until the next compaction: {}", self.pg.display, e.explain());
        }
        Ok(())
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Transaction => "transaction",
        Kind::Outside => "statement outside a transaction",
    }
}

async fn replication(client: &Client) -> Replication {
    let row = client
        .query_one(
            "SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names'),
                    (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')),
                    coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'local socket')",
            &[],
        )
        .await;
    match row {
        Ok(r) => Replication {
            synchronous_commit: r.get(0),
            standby_names: r.get(1),
            sync_standbys: Some(r.get(2)),
            server: r.get(3),
        },
        Err(_) => Replication::default(),
    }
}
