//! `SocketDestination`: synchronous calls (the plugin's db_write hook waits on them) run on
//! a current-thread tokio runtime the destination owns. Call them from a thread that is not
//! running async tasks (a plain thread, or inside `tokio::task::spawn_blocking`); dropping
//! it is fine anywhere.
//!
//! Reconnects: a dropped connection is retried while the call waits, up to
//! `reconnect_timeout`. Resuming is exactly-once: after reconnecting, the server's state
//! (generation, journal length, header CRC of its last record) says whether the record
//! landed before the drop; it is sent again only if not.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::fsutil;
use crate::journal::{self, Kind, Payloads};
use crate::keys::KeySource;
use crate::layout::{GenName, Layout};
use crate::meta::Meta;
use crate::net::identity::{self, PublicKey, SecretKey};
use crate::net::message::{Code, Manifest, Reply, Request, State, PROTO};
use crate::net::transport::{Channel, Stream, TransportError};
use crate::net::url::{self, Host, SocketUrl};
use crate::seal::Sealer;
use crate::versions::Position;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}")]
    Url(String),
    #[error("{url}: {source}")]
    ServerKey {
        url: String,
        #[source]
        source: TransportError,
    },
    #[error(
        "{url}: no answer from the backup server for {waited:.1} s (last error: {last}). Check that \
         `backup-cli server` runs there and the network (or the proxy) is up"
    )]
    Unreachable { url: String, waited: f64, last: String },
    #[error(
        "{url}: the connection dropped during {during}: {error}. Run it again: a download leaves nothing \
         behind, and an install happened whole or not at all"
    )]
    Dropped { url: String, during: &'static str, error: String },
    #[error("{url}: the server refused: {message}")]
    Refused { url: String, code: Code, message: String },
    #[error("{url}: {what}")]
    Protocol { url: String, what: String },
    #[error("{url}: {what}")]
    Local { url: String, what: String },
}

impl SocketError {
    /// A version-rule refusal: halt with this message.
    pub fn is_versions(&self) -> bool {
        matches!(self, SocketError::Refused { code: Code::Versions, .. })
    }
}

/// Why one connection attempt failed; `retry` says whether another may succeed.
struct Attempt {
    error: SocketError,
    retry: bool,
}

pub struct SocketDestination {
    /// Shut down without waiting in Drop: dropping a runtime that way is allowed anywhere,
    /// also on an async thread of the plugin's own runtime.
    rt: std::mem::ManuallyDrop<tokio::runtime::Runtime>,
    link: Link,
}

/// A reading connection yet to be opened (see `SocketDestination::reader`).
pub struct ReaderSpec {
    url: String,
    key: SecretKey,
    server_key: Option<PublicKey>,
    timeout: Duration,
}

impl ReaderSpec {
    pub fn connect(self) -> Result<SocketDestination, SocketError> {
        SocketDestination::connect(&self.url, self.key, self.server_key, self.timeout, false)
    }
}

impl Drop for SocketDestination {
    fn drop(&mut self) {
        self.link.conn = None;
        // SAFETY: taken once, here, and never used again.
        let rt = unsafe { std::mem::ManuallyDrop::take(&mut self.rt) };
        rt.shutdown_background();
    }
}

struct Link {
    url: String,
    target: SocketUrl,
    key: SecretKey,
    server_key: Option<PublicKey>,
    writer: bool,
    reconnect_timeout: Duration,
    conn: Option<Channel>,
    state: State,
    // for backup-status
    rtts_us: Vec<u32>,
    rtt_next: usize,
    connected_since: Option<SystemTime>,
    reconnects: u64,
    /// Appends found already applied after a reconnect (not sent again).
    landed_before_drop: u64,
    /// Appends sent again after a reconnect.
    resent: u64,
}

const RTT_WINDOW: usize = 1024;

impl SocketDestination {
    /// Connects (within `reconnect_timeout`) and, when `writer`, becomes the backup's one
    /// writer. `server_key`: the key pinned at init; None only to learn it (init).
    pub fn connect(
        url: &str,
        key: SecretKey,
        server_key: Option<PublicKey>,
        reconnect_timeout: Duration,
        writer: bool,
    ) -> Result<SocketDestination, SocketError> {
        let target = url::parse(url).map_err(SocketError::Url)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| {
            SocketError::Local { url: url.into(), what: format!("cannot start the network runtime: {e}") }
        })?;
        let mut link = Link {
            url: url.into(),
            target,
            key,
            server_key,
            writer,
            reconnect_timeout,
            conn: None,
            state: State::default(),
            rtts_us: Vec::new(),
            rtt_next: 0,
            connected_since: None,
            reconnects: 0,
            landed_before_drop: 0,
            resent: 0,
        };
        let deadline = Instant::now() + reconnect_timeout;
        link.state = rt.block_on(link.reconnect(deadline))?;
        link.reconnects = 0;
        Ok(SocketDestination { rt: std::mem::ManuallyDrop::new(rt), link })
    }

    pub fn url(&self) -> &str {
        &self.link.url
    }
    pub fn kind(&self) -> &'static str {
        "socket"
    }
    /// The server's key (learned at the first connection when none was pinned).
    pub fn server_key(&self) -> Option<PublicKey> {
        self.link.server_key
    }
    pub fn node_public_key(&self) -> PublicKey {
        self.link.key.public()
    }
    /// What it takes to open a second, reading connection to the same backup (for
    /// compaction beside the writer); connecting is left to the caller's thread.
    pub fn reader(&self) -> ReaderSpec {
        let l = &self.link;
        ReaderSpec { url: l.url.clone(), key: l.key.clone(), server_key: l.server_key, timeout: l.reconnect_timeout }
    }
    /// The bound on reconnects and stalled calls (`backup-reconnect-timeout`).
    pub fn set_reconnect_timeout(&mut self, timeout: Duration) {
        self.link.reconnect_timeout = timeout;
    }
    /// The server's state as of the last answer.
    pub fn server_state(&self) -> State {
        self.link.state
    }

    /// As of the last answer (every call updates it; `refresh` asks).
    pub fn position(&self) -> Position {
        Position { version: self.link.state.version, droppable: self.link.state.droppable }
    }

    pub fn refresh(&mut self) -> Result<Position, SocketError> {
        let r = self.rt.block_on(self.link.call(&Request::GetState))?;
        self.link.state = self.link.expect_state(r)?;
        Ok(self.position())
    }

    /// Durably appends one record on the server (answered after its fdatasync). See the
    /// module doc for reconnects; after `reconnect_timeout` without success, an error.
    pub fn append(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), SocketError> {
        self.rt.block_on(self.link.append(data_version, kind, replace_last, record))
    }

    /// One bare round trip on the connection (for the benchmark's baseline).
    pub fn ping(&mut self) -> Result<Duration, SocketError> {
        let t = Instant::now();
        match self.rt.block_on(self.link.call(&Request::Ping))? {
            Reply::Pong => Ok(t.elapsed()),
            r => Err(self.link.unexpected(&r)),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let l = &self.link;
        let mut t: Vec<u32> = l.rtts_us.clone();
        t.sort_unstable();
        let pct = |q: f64| t.get(((q * t.len() as f64) as usize).min(t.len().saturating_sub(1))).copied();
        json!({
            "peer": l.target.to_string(),
            "server_key_fingerprint": l.server_key.as_ref().map(identity::fingerprint),
            "connected": l.conn.is_some(),
            "connected_since": l.connected_since.map(crate::clock::fmt_time),
            "reconnects": l.reconnects,
            "resumed_landed": l.landed_before_drop,
            "resumed_resent": l.resent,
            "rtt_p50_us": pct(0.5),
            "rtt_p99_us": pct(0.99),
            "server_generation": l.state.generation,
            "server_journal_bytes": l.state.journal_len,
        })
    }

    /// Materializes a consistent copy of the remote backup in `dir` (created, must not exist):
    /// the files `writer::create` makes, streamed to disk. `limit` (0: all) stops the
    /// journal at that offset. Works while the node writes. Returns what was copied.
    pub fn download(
        &mut self,
        dir: &Path,
        limit: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, SocketError> {
        let r = self.rt.block_on(self.link.download(dir, limit, progress));
        if r.is_err() {
            let _ = std::fs::remove_dir_all(dir);
            self.link.conn = None; // may stop mid-stream: the next call starts afresh
        }
        r
    }

    /// Uploads a generation built locally and has the server switch to it atomically:
    /// `snapshot` (a snapshot file at `base_version`) replaces the current generation's
    /// journal up to `fold_end`; what follows it is kept. `fold_end` = the journal header's
    /// length uploads a first generation into an empty backup (init).
    pub fn install_generation(
        &mut self,
        from_generation: u64,
        base_version: u32,
        fold_end: u64,
        snapshot: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<State, SocketError> {
        let r = self.rt.block_on(self.link.install(
            Request::Install { from_generation, base_version, fold_end, snapshot_len: 0, tail: vec![] },
            snapshot,
            progress,
        ));
        self.after_upload(r)
    }

    /// Uploads a snapshot for generation `from_generation + 1` and leaves it on the server
    /// for an Install without one (`switch_staged`): the long part of a compaction, off the
    /// writer's connection.
    pub fn stage(
        &mut self,
        from_generation: u64,
        base_version: u32,
        snapshot: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<State, SocketError> {
        let req = Request::Stage { from_generation, base_version, snapshot_len: 0 };
        let r = self.rt.block_on(self.link.install(req, snapshot, progress));
        if r.is_err() {
            self.link.conn = None;
        }
        r
    }

    /// Replaces the server's backup with `from`, another copy's whole generation as it is
    /// (its sealed bytes bound to their places): the snapshot staged first, then the journal
    /// up to `from.journal_len` with `meta` (the backup's backup.json), switched to by the
    /// server in one step, or refused (see `Request::Reseed`) with the backup left as it was.
    pub fn reseed(
        &mut self,
        from: &crate::destination::GenerationFiles,
        meta: Option<&Meta>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<State, SocketError> {
        let url = self.link.url.clone();
        let local = |what: String| SocketError::Local { url: url.clone(), what };
        let header = journal::JournalReader::open(&from.journal).map_err(|e| local(e.explain()))?.header;
        if header.generation != from.generation || from.generation == 0 {
            return Err(local(format!("{}: the generation changed while it was read", from.journal.display())));
        }
        let base = header.base.version();
        if let (Some(snap), journal::Base::Snapshot(_)) = (&from.snapshot, header.base) {
            self.stage(from.generation - 1, base, snap, progress)?;
        }
        let body = match meta {
            Some(m) => serde_json::to_vec_pretty(m).map_err(|e| local(e.to_string()))?,
            None => vec![],
        };
        let req = Request::Reseed {
            generation: from.generation,
            base_version: base,
            journal_len: from.journal_len,
            meta: body,
        };
        let r = self.rt.block_on(self.link.install(req, &from.journal, progress));
        self.after_upload(r)
    }

    /// The server's answer to an upload: its new state, or an error; a connection that may
    /// have stopped mid-stream is not used again (a refusal leaves it whole).
    fn after_upload(&mut self, r: Result<State, SocketError>) -> Result<State, SocketError> {
        match r {
            Ok(st) => {
                self.link.state = st;
                Ok(st)
            }
            Err(e) => {
                if !matches!(e, SocketError::Refused { .. }) {
                    self.link.conn = None;
                }
                Err(e)
            }
        }
    }

    /// Switches a sealed backup to the generation staged for `from_generation + 1`: the
    /// journal's records past `fold_end` are read back and resealed for their places in the
    /// new generation (the server holds no key). Call it with the node's writes held.
    pub fn switch_staged(
        &mut self,
        from_generation: u64,
        base_version: u32,
        fold_end: u64,
        sealer: &Sealer,
    ) -> Result<State, SocketError> {
        let tail = match self.rt.block_on(self.link.call(&Request::Tail { from: fold_end }))? {
            Reply::Chunk(b) => b,
            r => return Err(self.link.unexpected(&r)),
        };
        let at = Path::new(&self.link.url);
        let from = Payloads::Sealed { sealer, generation: from_generation };
        let to = Payloads::Sealed { sealer, generation: from_generation + 1 };
        let tail = journal::transcode(at, &tail, fold_end, from, journal::HEADER_LEN, to)
            .map_err(|e| SocketError::Local { url: self.link.url.clone(), what: e.explain() })?;
        let req = Request::Install { from_generation, base_version, fold_end, snapshot_len: 0, tail };
        let r = self.rt.block_on(self.link.call(&req))?;
        let st = self.link.expect_state(r)?;
        self.link.state = st;
        Ok(st)
    }

    /// The backup's backup.json as the server stores it (None: it has none).
    pub fn meta(&mut self) -> Result<Option<Meta>, SocketError> {
        let b = match self.rt.block_on(self.link.call(&Request::GetMeta))? {
            Reply::Meta(b) => b,
            r => return Err(self.link.unexpected(&r)),
        };
        if b.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| self.link.err_protocol(format!("the server's backup.json is not valid: {e}")))
    }

    /// Stores `meta` as the backup's backup.json on the server (into an empty backup, or
    /// the same backup with more filled in).
    pub fn put_meta(&mut self, meta: &Meta) -> Result<State, SocketError> {
        let body = serde_json::to_vec_pretty(meta).map_err(|e| self.link.err_protocol(e.to_string()))?;
        let r = self.rt.block_on(self.link.call(&Request::PutMeta(body)))?;
        let st = self.link.expect_state(r)?;
        self.link.state = st;
        Ok(st)
    }

    /// The long part of a sealed backup's compaction, on a reading connection: downloads up
    /// to the last transaction, opens and folds it with the key (`keys`), and stages the
    /// new generation's snapshot, sealed, on the server. None when there is nothing to fold.
    pub fn stage_compaction(
        &mut self,
        work: &Path,
        keys: &KeySource,
        sealer: &Sealer,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<Staged>, SocketError> {
        self.fold(work, keys, Some(sealer), progress, |c, from_generation, base_version, fold_end, snap, progress| {
            c.stage(from_generation, base_version, snap, progress)?;
            Ok(Staged { from_generation, base_version, fold_end })
        })
    }

    /// Compaction by reading the remote back: downloads up to the last transaction, rebuilds
    /// the database there, and installs it as a snapshot. None when there is nothing to fold.
    /// `work`: a scratch directory (created, removed after).
    pub fn compact(&mut self, work: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Option<State>, SocketError> {
        self.fold(
            work,
            &KeySource::default(),
            None,
            progress,
            |c, from_generation, base_version, fold_end, snap, progress| {
                c.install_generation(from_generation, base_version, fold_end, snap, progress)
            },
        )
    }

    /// The long part of a compaction over the wire: downloads the server's backup up to its
    /// last transaction into `work`, folds it into a snapshot of the next generation (sealed
    /// with `sealer`), and hands that to `then` (from_generation, base_version, fold_end,
    /// snapshot). None when there is nothing to fold. `work` is removed after.
    fn fold<T>(
        &mut self,
        work: &Path,
        keys: &KeySource,
        sealer: Option<&Sealer>,
        progress: &mut dyn FnMut(u64, u64),
        then: impl FnOnce(&mut Self, u64, u32, u64, &Path, &mut dyn FnMut(u64, u64)) -> Result<T, SocketError>,
    ) -> Result<Option<T>, SocketError> {
        let st = self.rt.block_on(self.link.call(&Request::GetState))?;
        let st = self.link.expect_state(st)?;
        let fold_end = st.last_tx_offset;
        if fold_end <= journal::HEADER_LEN {
            return Ok(None);
        }
        let url = self.link.url.clone();
        let local = |what: String| SocketError::Local { url: url.clone(), what };
        std::fs::create_dir_all(work).map_err(|e| local(format!("create {}: {e}", work.display())))?;
        let r = (|| {
            let dl = work.join("copy");
            let m = self.download(&dl, fold_end, progress)?;
            let db = work.join("folded.sqlite3");
            let (db, sum) =
                crate::restore::restore_with(&dl, &db, keys, &mut |_, _| {}).map_err(|e| local(e.explain()))?;
            let snap = work.join("folded.snapshot");
            let g = m.generation + 1;
            crate::snapshot::write(&snap, g, sum.version, &db, &mut fsutil::Throttle::unlimited(), sealer)
                .map_err(|e| local(e.explain()))?;
            then(self, m.generation, sum.version, fold_end, &snap, progress).map(Some)
        })();
        let _ = std::fs::remove_dir_all(work);
        r
    }
}

/// A new generation staged on the server by `stage_compaction`, for `switch_staged`.
#[derive(Debug, Clone, Copy)]
pub struct Staged {
    pub from_generation: u64,
    pub base_version: u32,
    pub fold_end: u64,
}

/// TCP to the server, directly or through the SOCKS5 proxy (which then resolves the name).
async fn dial(target: &SocketUrl) -> Result<Box<dyn Stream>, String> {
    let server = &target.server;
    match &target.socks5 {
        None => {
            let s = tokio::net::TcpStream::connect((server.host_str().as_str(), server.port))
                .await
                .map_err(|e| format!("connect to {server}: {e}"))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Some(proxy) => {
            let paddr = (proxy.host_str(), proxy.port);
            // The name goes to the proxy unresolved (socks5h), so .onion works.
            let r = match &server.host {
                Host::Ip(ip) => {
                    tokio_socks::tcp::Socks5Stream::connect(
                        (paddr.0.as_str(), paddr.1),
                        std::net::SocketAddr::new(*ip, server.port),
                    )
                    .await
                }
                Host::Name(n) => {
                    tokio_socks::tcp::Socks5Stream::connect((paddr.0.as_str(), paddr.1), (n.as_str(), server.port))
                        .await
                }
            };
            let s = r.map_err(|e| format!("connect to {server} through SOCKS5 proxy {proxy}: {e}"))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
    }
}

/// The server's static key, from a handshake with a throwaway key and no request: for a
/// node that has no hsm_secret yet (init before lightningd's first start). Pairs nothing.
pub fn learn_server_key(url: &str, timeout: Duration) -> Result<PublicKey, SocketError> {
    let target = url::parse(url).map_err(SocketError::Url)?;
    let local = |what: String| SocketError::Local { url: url.into(), what };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| local(e.to_string()))?;
    let key = SecretKey::generate().map_err(local)?;
    // The timer is made inside the runtime: it needs its clock.
    let r = rt.block_on(async {
        tokio::time::timeout(timeout, async {
            let stream = dial(&target).await?;
            Channel::client(stream, &key, None).await.map(|ch| ch.remote).map_err(|e| e.to_string())
        })
        .await
    });
    match r {
        Ok(Ok(k)) => Ok(k),
        Ok(Err(last)) => Err(SocketError::Unreachable { url: url.into(), waited: timeout.as_secs_f64(), last }),
        Err(_) => {
            Err(SocketError::Unreachable { url: url.into(), waited: timeout.as_secs_f64(), last: "timed out".into() })
        }
    }
}

impl Link {
    fn err_protocol(&self, what: impl Into<String>) -> SocketError {
        SocketError::Protocol { url: self.url.clone(), what: what.into() }
    }

    fn unexpected(&self, r: &Reply) -> SocketError {
        match r {
            Reply::Error { code, message } => {
                SocketError::Refused { url: self.url.clone(), code: *code, message: message.clone() }
            }
            r => self.err_protocol(format!("unexpected answer {r:?}")),
        }
    }

    fn expect_state(&self, r: Reply) -> Result<State, SocketError> {
        match r {
            Reply::State(s) => Ok(s),
            r => Err(self.unexpected(&r)),
        }
    }

    /// One attempt: TCP (or SOCKS5), handshake, Hello.
    async fn open(&self) -> Result<(Channel, State), Attempt> {
        let retry = |e: String| Attempt { error: SocketError::Local { url: self.url.clone(), what: e }, retry: true };
        let server = &self.target.server;
        let stream = dial(&self.target).await.map_err(retry)?;
        let mut ch = match Channel::client(stream, &self.key, self.server_key.as_ref()).await {
            Ok(c) => c,
            Err(e @ TransportError::ServerKeyMismatch { .. }) => {
                return Err(Attempt {
                    error: SocketError::ServerKey { url: self.url.clone(), source: e },
                    retry: false,
                })
            }
            Err(e) => return Err(retry(format!("handshake with {server}: {e}"))),
        };
        let hello = Request::Hello { proto: PROTO, writer: self.writer };
        ch.send(&hello.encode()).await.map_err(|e| retry(format!("send to {server}: {e}")))?;
        let answer = match ch.recv().await {
            Ok(b) => Reply::decode(&b).map_err(|e| Attempt { error: self.err_protocol(e), retry: false })?,
            // Closed right after the handshake: the server does not know our key.
            Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Attempt {
                    error: SocketError::Refused {
                        url: self.url.clone(),
                        code: Code::Refused,
                        message: format!(
                            "the server closed the connection after the handshake: it has no backup paired with \
                             this node's key {}. Pair it: on the server, move <backup>.paired-client away or \
                             start it with --client-key {}",
                            identity::to_hex(&self.key.public()),
                            identity::to_hex(&self.key.public())
                        ),
                    },
                    retry: false,
                })
            }
            Err(e) => return Err(retry(format!("receive from {server}: {e}"))),
        };
        match answer {
            Reply::State(s) => Ok((ch, s)),
            // The server has not yet noticed our previous connection is gone.
            Reply::Error { code: Code::Busy, message } => Err(Attempt {
                error: SocketError::Refused { url: self.url.clone(), code: Code::Busy, message },
                retry: true,
            }),
            r => Err(Attempt { error: self.unexpected(&r), retry: false }),
        }
    }

    /// Connects, retrying until `deadline`; returns the server's state.
    async fn reconnect(&mut self, deadline: Instant) -> Result<State, SocketError> {
        self.conn = None;
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut last = String::from("timed out");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.open()).await {
                Ok(Ok((ch, st))) => {
                    if self.server_key.is_none() {
                        self.server_key = Some(ch.remote);
                    }
                    self.conn = Some(ch);
                    self.connected_since = Some(SystemTime::now());
                    self.reconnects += 1;
                    return Ok(st);
                }
                Ok(Err(a)) if !a.retry => return Err(a.error),
                Ok(Err(a)) => last = a.error.to_string(),
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SocketError::Unreachable {
                    url: self.url.clone(),
                    waited: started.elapsed().as_secs_f64(),
                    last,
                });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn note_rtt(&mut self, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        if self.rtts_us.len() < RTT_WINDOW {
            self.rtts_us.push(us);
        } else {
            self.rtts_us[self.rtt_next] = us;
        }
        self.rtt_next = (self.rtt_next + 1) % RTT_WINDOW;
    }

    /// One request and its answer on the current connection (reconnecting first if needed,
    /// within the bound); no resend after a drop: for requests that are not writes.
    async fn call(&mut self, req: &Request) -> Result<Reply, SocketError> {
        let deadline = Instant::now() + self.reconnect_timeout;
        loop {
            if self.conn.is_none() {
                self.state = self.reconnect(deadline).await?;
            }
            let Some(ch) = self.conn.as_mut() else { continue };
            let t = Instant::now();
            let r = tokio::time::timeout_at(deadline.into(), async {
                ch.send(&req.encode()).await?;
                ch.recv().await
            })
            .await;
            match r {
                Ok(Ok(b)) => {
                    self.note_rtt(t.elapsed());
                    return Reply::decode(&b).map_err(|e| self.err_protocol(e));
                }
                Ok(Err(_)) => self.conn = None,
                Err(_) => {
                    self.conn = None;
                    return Err(SocketError::Unreachable {
                        url: self.url.clone(),
                        waited: self.reconnect_timeout.as_secs_f64(),
                        last: "no answer".into(),
                    });
                }
            }
        }
    }

    async fn append(&mut self, dv: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), SocketError> {
        let deadline = Instant::now() + self.reconnect_timeout;
        let known = self.state;
        let expected_len = if replace_last { known.last_tx_offset } else { known.journal_len } + record.len() as u64;
        let tail = journal::header_crc(record);
        // Where the record leaves the backup: its version rules, and (same generation) its length.
        let expected_pos = match (kind, replace_last) {
            (Kind::Transaction, _) => (dv, true),
            (Kind::Outside, true) => (known.version.wrapping_sub(1), false),
            (Kind::Outside, false) => (known.version, known.droppable),
        };
        // After a reconnect: did the record land? A compaction (by another connection) may
        // have changed the generation meanwhile; then lengths say nothing, the rest does.
        let landed = |st: &State| {
            st.tail == tail
                && (st.version, st.droppable) == expected_pos
                && (st.generation != known.generation || st.journal_len == expected_len)
        };
        let unchanged = |st: &State| {
            st.tail == known.tail
                && (st.version, st.droppable) == (known.version, known.droppable)
                && (st.generation != known.generation || st.journal_len == known.journal_len)
        };
        let req =
            Request::Append { data_version: dv, kind: kind as u8, replace_last, record: record.to_vec() }.encode();
        let mut sent = false;
        loop {
            if self.conn.is_none() {
                let st = self.reconnect(deadline).await?;
                if sent && landed(&st) && !unchanged(&st) {
                    // It landed before the connection dropped: done, exactly once.
                    self.state = st;
                    self.landed_before_drop += 1;
                    return Ok(());
                }
                if !unchanged(&st) || (sent && landed(&st)) {
                    return Err(self.err_protocol(format!(
                        "after reconnecting, the server's backup is at generation {} version {} with {} journal \
                         bytes: it cannot be told whether data_version {dv} was written before the drop (it was \
                         at generation {} version {}, {} bytes). Check that only one node writes this backup, \
                         then restart lightningd",
                        st.generation, st.version, st.journal_len, known.generation, known.version, known.journal_len
                    )));
                }
                self.state = st;
                if sent {
                    self.resent += 1;
                }
            }
            let Some(ch) = self.conn.as_mut() else { continue };
            let t = Instant::now();
            sent = true;
            let r = tokio::time::timeout_at(deadline.into(), async {
                ch.send(&req).await?;
                ch.recv().await
            })
            .await;
            match r {
                Ok(Ok(b)) => {
                    self.note_rtt(t.elapsed());
                    let reply = Reply::decode(&b).map_err(|e| self.err_protocol(e))?;
                    self.state = self.expect_state(reply)?;
                    return Ok(());
                }
                Ok(Err(_)) => self.conn = None,
                Err(_) => {
                    self.conn = None;
                    return Err(SocketError::Unreachable {
                        url: self.url.clone(),
                        waited: self.reconnect_timeout.as_secs_f64(),
                        last: format!("no answer to the append of data_version {dv}"),
                    });
                }
            }
        }
    }

    async fn download(
        &mut self,
        dir: &Path,
        limit: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, SocketError> {
        let url = self.url.clone();
        let local = |what: String| SocketError::Local { url: url.clone(), what };
        if std::fs::symlink_metadata(dir).is_ok() {
            return Err(local(format!("{} already exists", dir.display())));
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| local(format!("create {}: {e}", dir.display())))?;
        // The backup's metadata first (it changes only while the backup is empty): what a
        // restore needs to find the key and open the seals.
        match self.call(&Request::GetMeta).await? {
            Reply::Meta(b) if b.is_empty() => {}
            Reply::Meta(b) => {
                let meta: Meta = serde_json::from_slice(&b)
                    .map_err(|e| self.err_protocol(format!("the server's backup.json is not valid: {e}")))?;
                meta.store(dir).map_err(|e| local(e.explain()))?;
            }
            r => return Err(self.unexpected(&r)),
        }
        let m = match self.call(&Request::Download { limit }).await? {
            Reply::Manifest(m) => m,
            r => return Err(self.unexpected(&r)),
        };
        let layout = Layout::new(dir);
        let g = GenName { generation: m.generation, base_version: m.base_version };
        let total = m.snapshot_len + m.journal_len;
        let mut done = 0u64;
        let mut files = vec![];
        if m.snapshot_len > 0 {
            files.push((layout.snapshot_path(g), m.snapshot_len));
        }
        files.push((layout.journal_path(g), m.journal_len));
        let lost =
            |e: TransportError| SocketError::Dropped { url: url.clone(), during: "a download", error: e.to_string() };
        let Some(ch) = self.conn.as_mut() else { return Err(local("connection lost".into())) };
        let mut pending: Vec<u8> = vec![];
        for (path, len) in files {
            let f = fsutil::create_private(&path).map_err(|e| local(e.explain()))?;
            let mut out = fsutil::Stepped::streaming(&f, 0);
            let mut left = len;
            while left > 0 {
                if pending.is_empty() {
                    match Reply::decode(&ch.recv().await.map_err(lost)?) {
                        Ok(Reply::Chunk(b)) => pending = b,
                        Ok(r) => {
                            return Err(SocketError::Protocol {
                                url: self.url.clone(),
                                what: format!("download: {r:?}"),
                            })
                        }
                        Err(e) => return Err(SocketError::Protocol { url: self.url.clone(), what: e }),
                    }
                }
                let n = (left as usize).min(pending.len());
                out.write_all(&pending[..n]).map_err(|e| local(format!("write {}: {e}", path.display())))?;
                pending.drain(..n);
                left -= n as u64;
                done += n as u64;
                progress(done, total);
            }
            f.sync_all().map_err(|e| local(format!("fsync {}: {e}", path.display())))?;
        }
        match Reply::decode(&ch.recv().await.map_err(lost)?) {
            Ok(Reply::End) if pending.is_empty() => {}
            r => {
                return Err(SocketError::Protocol {
                    url: self.url.clone(),
                    what: format!("download did not end cleanly: {r:?}"),
                })
            }
        }
        fsutil::fsync_dir(dir).map_err(|e| local(e.explain()))?;
        Ok(m)
    }

    /// Sends `req` (an Install or a Stage, its snapshot_len filled in, with the snapshot; a
    /// Reseed with the journal) and the file.
    async fn install(
        &mut self,
        mut req: Request,
        snapshot: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<State, SocketError> {
        let url = self.url.clone();
        let local = |what: String| SocketError::Local { url: url.clone(), what };
        let mut f = File::open(snapshot).map_err(|e| local(format!("open {}: {e}", snapshot.display())))?;
        let len = f.metadata().map_err(|e| local(format!("stat {}: {e}", snapshot.display())))?.len();
        if self.conn.is_none() {
            self.state = self.reconnect(Instant::now() + self.reconnect_timeout).await?;
        }
        let Some(ch) = self.conn.as_mut() else { return Err(local("connection lost".into())) };
        let lost =
            |e: TransportError| SocketError::Dropped { url: url.clone(), during: "an install", error: e.to_string() };
        let len = match &mut req {
            Request::Install { snapshot_len, .. } | Request::Stage { snapshot_len, .. } => {
                *snapshot_len = len;
                len
            }
            // a journal may grow while it is sent: only its first journal_len bytes go
            Request::Reseed { journal_len, .. } if *journal_len <= len => *journal_len,
            Request::Reseed { journal_len, .. } => {
                return Err(local(format!("{} has fewer than {journal_len} bytes", snapshot.display())))
            }
            _ => return Err(local("not an install".into())),
        };
        ch.send(&req.encode()).await.map_err(lost)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while sent < len {
            let n = ((len - sent) as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).map_err(|e| local(format!("read {}: {e}", snapshot.display())))?;
            ch.send(&Request::Chunk(buf[..n].to_vec()).encode()).await.map_err(lost)?;
            sent += n as u64;
            progress(sent, len);
        }
        ch.send(&Request::End.encode()).await.map_err(lost)?;
        let r = ch.recv().await.map_err(lost)?;
        let r = Reply::decode(&r).map_err(|e| self.err_protocol(e))?;
        self.expect_state(r)
    }
}
