//! The plugin: lightningd runs it, sends getmanifest, then db_write calls (some before
//! init), init, more db_write calls and passthrough commands, then closes stdin.
//!
//! A db_write is answered `continue` only once its batch is on stable storage. Any failure,
//! or a version that the backup cannot vouch for, halts: the answer is not `continue`, so
//! lightningd stops without committing. A halt is final for the process.

use std::borrow::Cow;
use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::compact::{self, lock, Outcome};
use crate::layout::{self, Layout};
use crate::legacy;
use crate::options::{self, Settings};
use crate::protocol::{Framer, Incoming, Level, Output};
use crate::rpc;
use crate::stats::Latency;
use crate::writer::{Applied, Writer};

pub const LOCK_NAME: &str = "backup.lock";

#[derive(Deserialize)]
struct DbWrite<'a> {
    data_version: u32,
    #[serde(borrow)]
    writes: Vec<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct BackupLock {
    backend_url: String,
}

enum Backend {
    Ready(Arc<Mutex<Writer>>),
    Halted(String),
}

pub struct Plugin {
    out: Output,
    lightning_dir: PathBuf,
    url: Option<String>,
    backend: Backend,
    first_write_done: bool,
    latency: Latency,
    started: SystemTime,
    settings: Settings,
    initialized: bool,
    open_attempted: bool,
    compaction: Arc<Mutex<compact::Status>>,
    compacting: Arc<AtomicBool>,
    /// Automatic compaction found nothing to fold: wait until the journal reaches this.
    auto_backoff: u64,
}

/// Runs the plugin on stdin/stdout until lightningd closes stdin.
pub fn run() -> anyhow::Result<()> {
    let out = Output::stdout();
    let dir = env::current_dir()?;
    let mut plugin = Plugin::new(out.clone(), dir);
    let mut input = Framer::new(io::stdin().lock());
    while let Some(msg) = input.next_value() {
        match msg {
            Ok(bytes) => plugin.handle(bytes),
            Err(e) => {
                out.log(Level::Warn, &format!("cannot parse what lightningd sent ({e}); exiting"));
                return Err(e.into());
            }
        }
    }
    Ok(())
}

impl Plugin {
    pub fn new(out: Output, lightning_dir: PathBuf) -> Plugin {
        Plugin {
            out,
            lightning_dir,
            url: None,
            backend: Backend::Halted("the backup has not been opened yet".into()),
            first_write_done: false,
            latency: Latency::default(),
            started: SystemTime::now(),
            settings: Settings::default(),
            initialized: false,
            open_attempted: false,
            compaction: Arc::new(Mutex::new(compact::Status::idle())),
            compacting: Arc::new(AtomicBool::new(false)),
            auto_backoff: 0,
        }
    }

    /// Handles one message (the bytes of one JSON value).
    pub fn handle(&mut self, bytes: &[u8]) {
        let msg: Incoming = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.out.log(
                    Level::Warn,
                    &format!("Ignoring a message from lightningd that is not a JSON-RPC object: {e}"),
                );
                return;
            }
        };
        // Notifications (no id) and responses (no method): we subscribe to none, ask none.
        let (Some(method), Some(id)) = (msg.method.as_deref(), msg.id) else {
            return;
        };
        let params = msg.params.map_or("null", RawValue::get);
        // A failed write to stdout means lightningd is gone; stdin EOF follows.
        let _ = match method {
            "getmanifest" => {
                self.open_backend();
                self.out.respond(id, &manifest())
            }
            "init" => self.init(id, params),
            "db_write" => self.db_write(id, params),
            "backup-status" => self.out.respond(id, &self.status()),
            "backup-compact" => {
                let answer = self.compact_command();
                self.out.respond(id, &answer)
            }
            _ => self.out.respond_error(id, -32601, &format!("cln-backup has no method '{method}'")),
        };
    }

    fn lock_path(&self) -> PathBuf {
        self.lightning_dir.join(LOCK_NAME)
    }

    /// Opens the backup once; a failure is logged once and halts every db_write.
    fn open_backend(&mut self) {
        if self.open_attempted {
            return;
        }
        self.open_attempted = true;
        self.backend = match self.try_open() {
            Ok(w) => Backend::Ready(Arc::new(Mutex::new(w))),
            Err(reason) => {
                self.out.log(Level::Warn, &reason);
                Backend::Halted(reason)
            }
        };
    }

    fn try_open(&mut self) -> Result<Writer, String> {
        let lock = self.lock_path();
        let text = match fs::read_to_string(&lock) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(format!(
                    "Could not find backup.lock in the lightning-dir ({}). lightningd will not be allowed to \
                     write to its database without a backup. Create one first, with lightningd stopped: \
                     backup-cli init --lightning-dir {} file:///path/to/backup",
                    self.lightning_dir.display(),
                    self.lightning_dir.display()
                ))
            }
            Err(e) => return Err(format!("Cannot read {}: {e}", lock.display())),
        };
        let bl: BackupLock = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not valid ({e}); it should hold {{\"backend_url\": \"file:///path/to/backup\"}}",
                lock.display()
            )
        })?;
        self.url = Some(bl.backend_url.clone());
        let root = layout::parse_url(&bl.backend_url, &self.lightning_dir)
            .map_err(|e| format!("backup.lock names an unusable backup URL: {e}"))?;
        if legacy::is_v1_file(&root) {
            return Err(format!(
                "backup.lock points at {}, a backup of the Python backup plugin (format v1); cln-backup does not \
                 write into it. With lightningd stopped, convert it: backup-cli migrate {} {} --lightning-dir {}",
                root.display(),
                bl.backend_url,
                layout::url_for(&root.with_extension("cln-backup")),
                self.lightning_dir.display()
            ));
        }
        let (w, report) = Writer::open(&root, &crate::keys::KeySource::lightning_dir(&self.lightning_dir))
            .map_err(|e| format!("Cannot open the backup at {}: {}", bl.backend_url, e.explain()))?;
        if !report.removed.is_empty() {
            let names: Vec<_> =
                report.removed.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect();
            self.out.log(
                Level::Info,
                &format!("Removed {} leftover file(s) of an interrupted compaction: {}", names.len(), names.join(", ")),
            );
        }
        if let Some((off, len)) = report.torn_tail {
            self.out.log(
                Level::Info,
                &format!(
                    "Cut a torn record of {len} bytes at offset {off} of {}: a write cut short by a crash, never \
                     acknowledged to lightningd",
                    w.journal_path().display()
                ),
            );
        }
        self.out.log(
            Level::Info,
            &format!(
                "Opened backup {} (generation {}, {} records since the snapshot, data_version {})",
                bl.backend_url,
                w.header().generation,
                w.records(),
                w.position().version
            ),
        );
        Ok(w)
    }

    fn init(&mut self, id: &RawValue, params: &str) -> io::Result<()> {
        self.open_backend();
        let params: Value = serde_json::from_str(params).unwrap_or(Value::Null);
        match Settings::from_init(&params["options"]) {
            Ok(s) => self.settings = s,
            Err(e) => {
                self.out.log(Level::Warn, &e);
                return self.out.respond(id, &json!({ "disable": e }));
            }
        }
        self.initialized = true;
        self.out.respond(id, &json!({}))?;
        let conf = &params["configuration"];
        if let (Some(dir), Some(file)) = (conf["lightning-dir"].as_str(), conf["rpc-file"].as_str()) {
            let socket = Path::new(dir).join(file);
            let out = self.out.clone();
            // Off the hook path: lightningd answers RPC only between db_write calls.
            std::thread::spawn(move || check_config(&out, &socket));
        }
        Ok(())
    }

    fn db_write(&mut self, id: &RawValue, params: &str) -> io::Result<()> {
        let t0 = Instant::now();
        self.open_backend();
        let result = self.apply(params);
        self.first_write_done = true;
        let r = match result {
            Ok(()) => self.out.respond(id, &json!({"result": "continue"})),
            Err(reason) => {
                let first = !matches!(self.backend, Backend::Halted(_));
                if first {
                    self.out.log(Level::Warn, &reason);
                }
                self.backend = Backend::Halted(reason.clone());
                self.out.log(Level::Warn, "Refusing the db_write so that lightningd stops without committing it");
                self.out.respond(id, &json!({"result": "halt", "reason": format!("cln-backup: {reason}")}))
            }
        };
        self.latency.record(t0.elapsed().as_micros() as u64);
        self.maybe_autocompact();
        r
    }

    fn apply(&mut self, params: &str) -> Result<(), String> {
        let writer = match &self.backend {
            Backend::Ready(w) => w.clone(),
            Backend::Halted(reason) => return Err(reason.clone()),
        };
        if !params.trim_start().starts_with('{') {
            return Err(format!("Malformed db_write call from lightningd: params are {params}, not an object"));
        }
        let call: DbWrite = serde_json::from_str(params).map_err(|e| {
            format!("Malformed db_write call from lightningd ({e}); expected {{\"data_version\": u32, \"writes\": [SQL, ...]}}")
        })?;
        let waited = Instant::now();
        let mut w = lock(&writer);
        if self.compacting.load(Ordering::Relaxed) {
            let us = waited.elapsed().as_micros() as u64;
            let mut st = lock(&self.compaction);
            st.max_hook_stall_us = st.max_hook_stall_us.max(us);
        }
        let before = w.position().version;
        match w.apply(call.data_version, &call.writes) {
            Ok(Applied::Appended) => {
                if !self.first_write_done {
                    self.out.log(
                        Level::Info,
                        &format!("Versions match up: backup at {before}, lightningd sent {}", call.data_version),
                    );
                }
                Ok(())
            }
            Ok(Applied::Replaced) => {
                self.out.log(
                    Level::Info,
                    &format!(
                        "Last changes not applied: lightningd never committed data_version {before}; \
                         replaced it in the backup with the batch it sent now"
                    ),
                );
                Ok(())
            }
            Err(refusal) => Err(refusal.to_string()),
        }
    }

    fn compact_command(&mut self) -> Value {
        let writer = match &self.backend {
            Backend::Ready(w) => w.clone(),
            Backend::Halted(reason) => return json!({"result": "backup halted", "reason": reason}),
        };
        if self.compacting.load(Ordering::Relaxed) {
            return json!({"result": "compaction already running", "compaction": *lock(&self.compaction)});
        }
        let (plan, len, records) = {
            let w = lock(&writer);
            (w.plan(), w.journal_len(), w.records())
        };
        if plan.is_none() {
            return json!({
                "result": "nothing to compact",
                "reason": format!("the journal holds {records} record(s); its last transaction stays until lightningd commits the next one"),
            });
        }
        self.start_compaction(writer, "requested by backup-compact".into());
        json!({"result": "compaction started", "journal_bytes": len, "records": records})
    }

    fn maybe_autocompact(&mut self) {
        if !self.initialized || self.compacting.load(Ordering::Relaxed) {
            return;
        }
        let Backend::Ready(writer) = &self.backend else { return };
        let (journal, snapshot) = {
            let w = lock(writer);
            (w.journal_len(), w.snapshot_len())
        };
        if journal < self.auto_backoff {
            return;
        }
        if let Some(reason) = self.settings.reason_to_compact(journal, snapshot) {
            self.auto_backoff = journal + self.settings.min_journal.max(1 << 20);
            let writer = writer.clone();
            self.start_compaction(writer, reason);
        }
    }

    fn start_compaction(&mut self, writer: Arc<Mutex<Writer>>, reason: String) {
        self.compacting.store(true, Ordering::Relaxed);
        lock(&self.compaction).begin();
        let rate = self.settings.io_rate;
        let pace = match rate {
            0 => "disk work not rate-limited".to_string(),
            r => format!("disk work paced to {:.1} MB/s by {}", r as f64 / 1e6, options::COMPACT_IO_RATE.name),
        };
        self.out.log(Level::Info, &format!("Starting compaction: {reason}; {pace}"));
        let (out, status, flag) = (self.out.clone(), self.compaction.clone(), self.compacting.clone());
        std::thread::spawn(move || {
            crate::fsutil::background_priority();
            let log = |m: &str| out.log(Level::Info, m);
            match compact::run_tracked(&writer, &status, &log, &mut crate::fsutil::Throttle::new(rate)) {
                Ok(Outcome::Done(s)) => out.log(
                    Level::Info,
                    &format!(
                        "Compaction done: folded {} records into generation {} at data_version {}; {:.1} MB -> {:.1} MB \
                         in {:.2} s; the final switch held db_write for {} µs",
                        s.records_folded,
                        s.generation,
                        s.snapshot_version,
                        s.before_bytes as f64 / 1e6,
                        s.after_bytes as f64 / 1e6,
                        s.seconds,
                        s.switch_hold_us
                    ),
                ),
                Ok(Outcome::Nothing(why)) => out.log(Level::Info, &format!("Compaction: {why}")),
                Err(e) => out.log(
                    Level::Warn,
                    &format!("Compaction failed; the backup is unchanged and complete, db_write goes on: {e}"),
                ),
            }
            flag.store(false, Ordering::Relaxed);
        });
    }

    pub fn status(&self) -> Value {
        let hooks = json!({
            "count": self.latency.count,
            "p50_us": self.latency.quantile(0.5),
            "p99_us": self.latency.quantile(0.99),
            "max_us": self.latency.max_us,
        });
        let base = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "destination": self.url,
            "backend": "file",
            "hooks": hooks,
            "started": fmt_time(self.started),
        });
        let mut v = base;
        match &self.backend {
            Backend::Halted(reason) => {
                v["state"] = json!("halted");
                v["halt_reason"] = json!(reason);
            }
            Backend::Ready(w) => {
                let w = lock(w);
                let h = w.header();
                let layout: &Layout = w.layout();
                let journal_bytes = w.journal_len();
                let snapshot = w.snapshot_path().map(|p| (p, w.snapshot_len(), h.base.version()));
                let mut files = vec![json!({"path": w.journal_path(), "bytes": journal_bytes})];
                if let Some((p, bytes, _)) = &snapshot {
                    files.push(json!({"path": p, "bytes": bytes}));
                }
                v["state"] = json!("ok");
                v["path"] = json!(layout.root);
                v["files"] = json!(files);
                v["total_bytes"] = json!(journal_bytes + snapshot.as_ref().map_or(0, |s| s.1));
                v["generation"] = json!(h.generation);
                v["snapshot_version"] = json!(snapshot.as_ref().map(|s| s.2));
                v["latest_version"] = json!(w.position().version);
                v["records_since_snapshot"] = json!(w.records());
                v["last_write"] = json!(w.last_write.map(fmt_time));
                v["compaction"] = json!(*lock(&self.compaction));
            }
        }
        v
    }
}

pub fn manifest() -> Value {
    json!({
        "options": options::manifest_options(),
        "rpcmethods": [{
            "name": "backup-status",
            "usage": "",
            "description": "Show the backup: destination, files and sizes, versions, hook latency, last write, compaction.",
        }, {
            "name": "backup-compact",
            "usage": "",
            "description": "Fold the journal into a new compressed snapshot, in the background; db_write goes on.",
        }],
        "hooks": [{"name": "db_write"}],
        "subscriptions": [],
        "dynamic": false,
        "nonnumericids": true,
    })
}

/// After init, checks that lightningd is set up so that the backup means something.
fn check_config(out: &Output, socket: &Path) {
    let configs = match rpc::call(socket, "listconfigs", json!({})) {
        Ok(v) => v,
        Err(e) => {
            out.log(Level::Debug, &format!("Could not check lightningd's configuration: {e:#}"));
            return;
        }
    };
    let c = &configs["configs"];
    if let Some(wallet) = c["wallet"]["value_str"].as_str() {
        if !wallet.starts_with("sqlite3") {
            out.log(
                Level::Warn,
                &format!(
                    "lightningd's wallet is '{wallet}', not SQLite: lightningd never sends db_write there, so \
                     cln-backup cannot back it up. Stopping lightningd. Use your database's own replication \
                     instead, and remove cln-backup from the configuration."
                ),
            );
            if let Err(e) = rpc::call(socket, "stop", json!({})) {
                out.log(Level::Warn, &format!("Could not stop lightningd: {e:#}"));
            }
            return;
        }
    }
    let me = env::current_exe().ok().and_then(|p| fs::canonicalize(p).ok());
    let important = c["important-plugin"]["values_str"]
        .as_array()
        .map(|a| {
            a.iter().filter_map(Value::as_str).any(|p| {
                let p = fs::canonicalize(p).ok();
                p.is_some() && p == me
            })
        })
        .unwrap_or(false);
    if !important {
        out.log(
            Level::Warn,
            &format!(
                "cln-backup is not loaded as an important plugin: if it stops, lightningd goes on without a \
                 backup. Use important-plugin={} in the configuration instead of plugin=",
                me.map(|p| p.display().to_string()).unwrap_or_else(|| "/path/to/cln-backup".into())
            ),
        );
    }
}

/// RFC 3339 UTC time, without a date library.
pub fn fmt_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format() {
        assert_eq!(fmt_time(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000)), "2026-11-18T11:06:40Z");
        assert_eq!(fmt_time(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400 + 86_399)), "2000-02-29T23:59:59Z");
    }
}
