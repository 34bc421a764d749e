//! The plugin's work, apart from the protocol: the db_write handler, status and compaction.
//! The pre-init adapter and cln-plugin both call into one `Core`.
//!
//! A db_write is answered `continue` only once its batch is on stable storage. Any failure,
//! or a version that the backup cannot vouch for, halts: the answer is not `continue`, so
//! lightningd stops without committing. A halt is final for the process.

use std::borrow::Cow;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use log::{info, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use super::options::{self, Settings};
use super::stats::Latency;
use crate::clock::fmt_time;
use crate::compact::{self, lock, Outcome};
use crate::layout::{self, Layout};
use crate::legacy;
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

pub struct Core {
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

impl Core {
    pub fn new(lightning_dir: PathBuf) -> Core {
        Core {
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

    fn lock_path(&self) -> PathBuf {
        self.lightning_dir.join(LOCK_NAME)
    }

    /// Opens the backup once; a failure is logged once and halts every db_write.
    pub fn open_backend(&mut self) {
        if self.open_attempted {
            return;
        }
        self.open_attempted = true;
        self.backend = match self.try_open() {
            Ok(w) => Backend::Ready(Arc::new(Mutex::new(w))),
            Err(reason) => {
                warn!("{reason}");
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
        let (w, report) = Writer::open(&root)
            .map_err(|e| format!("Cannot open the backup at {}: {}", bl.backend_url, e.explain()))?;
        if !report.removed.is_empty() {
            let names: Vec<_> =
                report.removed.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy()).collect();
            info!("Removed {} leftover file(s) of an interrupted compaction: {}", names.len(), names.join(", "));
        }
        if let Some((off, len)) = report.torn_tail {
            info!(
                "Cut a torn record of {len} bytes at offset {off} of {}: a write cut short by a crash, never \
                 acknowledged to lightningd",
                w.journal_path().display()
            );
        }
        info!(
            "Opened backup {} (generation {}, {} records since the snapshot, data_version {})",
            bl.backend_url,
            w.header().generation,
            w.records(),
            w.position().version
        );
        Ok(w)
    }

    /// lightningd's init came with these settings: automatic compaction may start now.
    pub fn initialized(&mut self, settings: Settings) {
        self.open_backend();
        self.settings = settings;
        self.initialized = true;
    }

    /// Changes the compaction pace; it applies from the next compaction.
    pub fn set_io_rate(&mut self, rate: u64) {
        self.settings.io_rate = rate;
    }

    /// Handles one db_write call's params (raw JSON, parsed borrowed) and gives the answer.
    pub fn db_write(&mut self, params: &str) -> Value {
        let t0 = Instant::now();
        self.open_backend();
        let call = parse_db_write(params);
        self.answer(t0, call)
    }

    /// The same, for params that are already a JSON value (cln-plugin's hook callback).
    pub fn db_write_value(&mut self, params: &Value) -> Value {
        let t0 = Instant::now();
        self.open_backend();
        let call = DbWrite::deserialize(params).map_err(malformed);
        self.answer(t0, call)
    }

    fn answer(&mut self, t0: Instant, call: Result<DbWrite<'_>, String>) -> Value {
        let result = call.and_then(|c| self.apply(c));
        self.first_write_done = true;
        let answer = match result {
            Ok(()) => json!({"result": "continue"}),
            Err(reason) => {
                if !matches!(self.backend, Backend::Halted(_)) {
                    warn!("{reason}");
                }
                self.backend = Backend::Halted(reason.clone());
                warn!("Refusing the db_write so that lightningd stops without committing it");
                json!({"result": "halt", "reason": format!("cln-backup: {reason}")})
            }
        };
        self.latency.record(t0.elapsed().as_micros() as u64);
        self.maybe_autocompact();
        answer
    }

    fn apply(&mut self, call: DbWrite<'_>) -> Result<(), String> {
        let writer = match &self.backend {
            Backend::Ready(w) => w.clone(),
            Backend::Halted(reason) => return Err(reason.clone()),
        };
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
                    info!("Versions match up: backup at {before}, lightningd sent {}", call.data_version);
                }
                Ok(())
            }
            Ok(Applied::Replaced) => {
                info!(
                    "Last changes not applied: lightningd never committed data_version {before}; \
                     replaced it in the backup with the batch it sent now"
                );
                Ok(())
            }
            Err(refusal) => Err(refusal.to_string()),
        }
    }

    pub fn compact_command(&mut self) -> Value {
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
        info!("Starting compaction: {reason}; {pace}");
        let (status, flag) = (self.compaction.clone(), self.compacting.clone());
        std::thread::spawn(move || {
            crate::fsutil::background_priority();
            let log = |m: &str| info!("{m}");
            match compact::run_tracked(&writer, &status, &log, &mut crate::fsutil::Throttle::new(rate)) {
                Ok(Outcome::Done(s)) => info!(
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
                Ok(Outcome::Nothing(why)) => info!("Compaction: {why}"),
                Err(e) => warn!("Compaction failed; the backup is unchanged and complete, db_write goes on: {e}"),
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

fn malformed(e: serde_json::Error) -> String {
    format!("Malformed db_write call from lightningd ({e}); expected {{\"data_version\": u32, \"writes\": [SQL, ...]}}")
}

fn parse_db_write(params: &str) -> Result<DbWrite<'_>, String> {
    if !params.trim_start().starts_with('{') {
        return Err(format!("Malformed db_write call from lightningd: params are {params}, not an object"));
    }
    serde_json::from_str(params).map_err(malformed)
}
