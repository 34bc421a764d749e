//! The plugin's work, apart from the protocol: the db_write handler, status and compaction.
//! The pre-init adapter and cln-plugin both call into one `Core`.
//!
//! A db_write is answered `continue` only once its batch is on stable storage. Any failure,
//! or a version that the backup cannot vouch for, halts: the answer is not `continue`, so
//! lightningd stops without committing. A halt is final for the process.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use super::options::{self, Settings};
use super::protocol::{self, DbWrite, HookAnswer};
use super::stats::Latency;
use crate::clock::fmt_time;
use crate::compact::{self, lock, Outcome};
use crate::destination::replicas::{self, Replicas};
use crate::destination::LockFile;
use crate::layout::Layout;
use crate::writer::{Applied, Writer};

pub const LOCK_NAME: &str = "backup.lock";

enum Backend {
    Ready(Arc<Mutex<Replicas>>),
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
    /// A background thread is bringing lagging destinations up to date.
    catching_up: Arc<AtomicBool>,
    /// backup.lock as read at open.
    lock_file: Option<LockFile>,
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
            catching_up: Arc::new(AtomicBool::new(false)),
            lock_file: None,
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
            Ok(r) => Backend::Ready(r),
            Err(reason) => {
                warn!("{reason}");
                Backend::Halted(reason)
            }
        };
    }

    fn try_open(&mut self) -> Result<Arc<Mutex<Replicas>>, String> {
        let lock_path = self.lock_path();
        let text = match fs::read_to_string(&lock_path) {
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
            Err(e) => return Err(format!("Cannot read {}: {e}", lock_path.display())),
        };
        let lf = LockFile::parse(&text, &lock_path)?;
        self.url = Some(crate::destination::shown(&lf.urls[0]));
        for u in &lf.urls {
            crate::destination::parse(u, &self.lightning_dir)
                .map_err(|e| format!("backup.lock names an unusable backup URL: {e}"))?;
        }
        // Before init the options are not known: the rule in force is the one recorded in
        // backup.lock at the last init (or by backup-cli).
        let min = lf.min_destinations.unwrap_or(0);
        let timeout = lf.reconnect_timeout_s.map_or(crate::destination::DEFAULT_RECONNECT_TIMEOUT, Duration::from_secs);
        let replicas = Replicas::open(&lf.urls, &self.lightning_dir, min, timeout);
        if lf.urls.len() == 1 {
            if let Some(e) = &replicas.slots()[0].last_error {
                return Err(e.clone());
            }
        }
        self.lock_file = Some(lf);
        let replicas = Arc::new(Mutex::new(replicas));
        let (behind, unopened) = {
            let r = lock(&replicas);
            (r.any_behind(), r.status().iter().any(|d| d["state"] == "failed"))
        };
        // Local copies usually catch up in moments: try before the first write is answered.
        // Not when one could not be opened just now: opening it again here would hold the
        // first write for another whole reconnect bound; the background retries do it.
        if behind && !unopened {
            replicas::catch_up(&replicas, &self.lightning_dir);
        }
        for d in lock(&replicas).status() {
            info!(
                "Opened backup {} ({}, generation {}, data_version {})",
                d["url"].as_str().unwrap_or("?"),
                d["state"].as_str().unwrap_or("?"),
                d["generation"],
                d["latest_version"]
            );
        }
        self.start_catch_up(&replicas);
        Ok(replicas)
    }

    /// Starts the background thread that retries lagging destinations, if one is needed.
    fn start_catch_up(&self, replicas: &Arc<Mutex<Replicas>>) {
        if !lock(replicas).any_behind() || self.catching_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let (r, flag, base) = (replicas.clone(), self.catching_up.clone(), self.lightning_dir.clone());
        let spawned = std::thread::Builder::new().name("cln-backup-catch-up".into()).spawn(move || {
            crate::fsutil::background_priority();
            loop {
                std::thread::sleep(replicas::RETRY_EVERY);
                if replicas::catch_up(&r, &base) {
                    break;
                }
            }
            flag.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.catching_up.store(false, Ordering::Release);
        }
    }

    /// lightningd's init came with these settings: automatic compaction may start now.
    pub fn initialized(&mut self, settings: Settings) {
        self.open_backend();
        self.settings = settings;
        self.initialized = true;
        if let Backend::Ready(r) = &self.backend {
            let mut r = lock(r);
            r.set_min(settings.min_destinations);
            r.set_reconnect_timeout(std::time::Duration::from_secs(settings.reconnect_timeout_s));
        }
        self.record_rules();
    }

    /// Writes the rules in force (backup-min-destinations, backup-reconnect-timeout) into
    /// backup.lock, so that the writes of the next start, which come before its init, go on
    /// under them too.
    fn record_rules(&mut self) {
        // A backup.lock from before pins existed gets the sealed backup's id now (trust on
        // first use), so that no copy can be swapped for plaintext from here on.
        let pin = match (&self.backend, self.lock_file.as_ref().map(|l| l.sealed_backup_id.is_none())) {
            (Backend::Ready(r), Some(true)) => lock(r).sealed_backup_id().map(|id| crate::keys::hex(&id)),
            _ => None,
        };
        let Some(lf) = &mut self.lock_file else { return };
        let want = (self.settings.min_destinations != 0).then_some(self.settings.min_destinations);
        let default_s = crate::destination::DEFAULT_RECONNECT_TIMEOUT.as_secs();
        let timeout = (self.settings.reconnect_timeout_s != default_s).then_some(self.settings.reconnect_timeout_s);
        if lf.min_destinations == want && lf.reconnect_timeout_s == timeout && pin.is_none() {
            return;
        }
        lf.min_destinations = want;
        lf.reconnect_timeout_s = timeout;
        if pin.is_some() {
            lf.sealed_backup_id = pin;
        }
        let text = lf.to_json();
        let path = self.lightning_dir.join(LOCK_NAME);
        let r = crate::fsutil::write_atomic(&path, true, |f, tmp| {
            std::io::Write::write_all(f, text.as_bytes()).map_err(crate::error::StoreError::io("write", tmp))
        });
        match r {
            Ok(()) => info!(
                "Recorded {}={} and {}={} in {}",
                options::MIN_DESTINATIONS.name,
                self.settings.min_destinations,
                options::RECONNECT_TIMEOUT.name,
                self.settings.reconnect_timeout_s,
                path.display()
            ),
            Err(e) => warn!(
                "Could not record {} and {} in {}: {}",
                options::MIN_DESTINATIONS.name,
                options::RECONNECT_TIMEOUT.name,
                path.display(),
                e.explain()
            ),
        }
    }

    /// Changes the compaction pace; it applies from the next compaction.
    pub fn set_io_rate(&mut self, rate: u64) {
        self.settings.io_rate = rate;
    }

    /// Handles one db_write call (parsed borrowed from the message, or why it could not be)
    /// and gives the answer.
    ///
    /// `received`: when its message was read, so that the latency in `backup-status` covers
    /// reading the call too.
    pub fn db_write(&mut self, received: Instant, call: Result<DbWrite<'_>, String>) -> HookAnswer {
        self.open_backend();
        let result = call.and_then(|c| self.apply(c));
        self.first_write_done = true;
        let answer = match result {
            Ok(()) => HookAnswer::CONTINUE,
            Err(reason) => {
                if !matches!(self.backend, Backend::Halted(_)) {
                    warn!("{reason}");
                }
                self.backend = Backend::Halted(reason.clone());
                warn!("Refusing the db_write so that lightningd stops without committing it");
                HookAnswer::halt(format!("cln-backup: {reason}"))
            }
        };
        self.latency.record(received.elapsed().as_micros() as u64);
        self.maybe_autocompact();
        answer
    }

    /// The same, for params that are already a JSON value (cln-plugin's hook callback).
    pub fn db_write_value(&mut self, params: &Value) -> Value {
        let received = Instant::now();
        let call = DbWrite::deserialize(params).map_err(protocol::malformed_db_write);
        let answer = self.db_write(received, call);
        serde_json::to_value(answer).unwrap_or_else(|e| json!({"result": "halt", "reason": e.to_string()}))
    }

    fn apply(&mut self, call: DbWrite<'_>) -> Result<(), String> {
        let replicas = match &self.backend {
            Backend::Ready(r) => r.clone(),
            Backend::Halted(reason) => return Err(reason.clone()),
        };
        let mut r = lock(&replicas);
        if self.compacting.load(Ordering::Relaxed) {
            // How long compaction's switch keeps this call from the journal.
            if let Some((_, w)) = r.in_sync_writers().first() {
                let waited = Instant::now();
                drop(lock(w));
                let us = waited.elapsed().as_micros() as u64;
                let mut st = lock(&self.compaction);
                st.max_hook_stall_us = st.max_hook_stall_us.max(us);
            }
        }
        let result = r.apply(call.data_version, &call.writes);
        let behind = r.any_behind();
        drop(r);
        if behind {
            self.start_catch_up(&replicas);
        }
        match result {
            Ok((Applied::Appended, before)) => {
                if !self.first_write_done {
                    info!("Versions match up: backup at {before}, lightningd sent {}", call.data_version);
                }
                Ok(())
            }
            Ok((Applied::Replaced, before)) => {
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
        let (writers, remote) = match &self.backend {
            Backend::Ready(r) => {
                let r = lock(r);
                (r.in_sync_writers(), r.background_compactions())
            }
            Backend::Halted(reason) => return json!({"result": "backup halted", "reason": reason}),
        };
        if self.compacting.load(Ordering::Relaxed) {
            return json!({"result": "compaction already running", "compaction": *lock(&self.compaction)});
        }
        let Some((_, writer)) = writers.first().cloned() else {
            if remote.is_empty() {
                return json!({"result": "nothing to compact", "reason": "no destination in sync can be compacted"});
            }
            let urls: Vec<String> = remote.iter().map(|(u, _)| u.clone()).collect();
            self.start_compaction(writers, remote, "requested by backup-compact".into());
            return json!({"result": "compaction started", "destinations": urls});
        };
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
        self.start_compaction(writers, remote, "requested by backup-compact".into());
        json!({"result": "compaction started", "journal_bytes": len, "records": records})
    }

    fn maybe_autocompact(&mut self) {
        if !self.initialized || self.compacting.load(Ordering::Relaxed) {
            return;
        }
        let Backend::Ready(r) = &self.backend else { return };
        let Some(writer) = lock(r).first_in_sync_writer() else { return };
        let (journal, snapshot) = {
            let w = lock(&writer);
            (w.journal_len(), w.snapshot_len())
        };
        if journal < self.auto_backoff {
            return;
        }
        if let Some(reason) = self.settings.reason_to_compact(journal, snapshot) {
            self.auto_backoff = journal + self.settings.min_journal.max(1 << 20);
            let (writers, remote) = {
                let r = lock(r);
                (r.in_sync_writers(), r.background_compactions())
            };
            self.start_compaction(writers, remote, reason);
        }
    }

    /// Compacts each in-sync file destination in turn, in the background.
    fn start_compaction(
        &mut self,
        writers: Vec<(String, Arc<Mutex<Writer>>)>,
        remote: Vec<(String, crate::destination::BackgroundCompaction)>,
        reason: String,
    ) {
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
            let many = writers.len() > 1;
            for (i, (url, writer)) in writers.iter().enumerate() {
                if many {
                    info!("Compacting {url}");
                }
                if i > 0 {
                    lock(&status).begin();
                }
                match compact::run_tracked(writer, &status, &log, &mut crate::fsutil::Throttle::new(rate)) {
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
            }
            // Network destinations fold on their own side, beside the writer.
            for (url, job) in remote {
                info!("Compacting {url} beside its writer");
                let work = std::env::temp_dir().join(format!("cln-backup-compact-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&work);
                if let Err(e) = std::fs::create_dir_all(&work) {
                    warn!("Compaction of {url} not started: cannot create {}: {e}", work.display());
                    continue;
                }
                match job(&work) {
                    Ok(done) => info!("Compaction done: {done}"),
                    Err(e) => warn!("Compaction failed; the backup is unchanged and complete, db_write goes on: {e}"),
                }
                let _ = std::fs::remove_dir_all(&work);
            }
            lock(&status).state = "idle";
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
            Backend::Ready(r) => {
                let r = lock(r);
                v["destinations"] = json!(r.status());
                v["min_destinations"] = json!(r.required());
                v["state"] = json!(if r.any_behind() { "degraded" } else { "ok" });
                v["compaction"] = json!(*lock(&self.compaction));
                // Today's fields, for the first destination.
                if let Some((_, w)) = r.in_sync_writers().first() {
                    let w = lock(w);
                    let h = w.header();
                    let layout: &Layout = w.layout();
                    let journal_bytes = w.journal_len();
                    let snapshot = w.snapshot_path().map(|p| (p, w.snapshot_len(), h.base.version()));
                    let mut files = vec![json!({"path": w.journal_path(), "bytes": journal_bytes})];
                    if let Some((p, bytes, _)) = &snapshot {
                        files.push(json!({"path": p, "bytes": bytes}));
                    }
                    v["path"] = json!(layout.root);
                    v["files"] = json!(files);
                    v["total_bytes"] = json!(journal_bytes + snapshot.as_ref().map_or(0, |s| s.1));
                    v["generation"] = json!(h.generation);
                    v["snapshot_version"] = json!(snapshot.as_ref().map(|s| s.2));
                    v["latest_version"] = json!(w.position().version);
                    v["records_since_snapshot"] = json!(w.records());
                    v["last_write"] = json!(w.last_write.map(fmt_time));
                    v["encryption"] = json!({"sealed": w.is_sealed(), "key_fingerprint": w.key_fingerprint()});
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn statements_are_borrowed_unless_escaped() {
        let params =
            r#"{"data_version": 7, "writes": ["INSERT INTO t VALUES ('a')", "UPDATE t SET s = 'say \"hi\"\\n'"]}"#;
        let call = protocol::parse_db_write(params).unwrap();
        assert_eq!(call.data_version, 7);
        assert!(matches!(call.writes[0].0, Cow::Borrowed(_)));
        assert_eq!(call.writes[1].as_ref(), r#"UPDATE t SET s = 'say "hi"\n'"#);
        // the same from a parsed value (cln-plugin's hook callback)
        let v: Value = serde_json::from_str(params).unwrap();
        let call = DbWrite::deserialize(&v).unwrap();
        assert_eq!(call.writes[1].as_ref(), r#"UPDATE t SET s = 'say "hi"\n'"#);
        assert!(protocol::parse_db_write("[1]").is_err());
    }
}
