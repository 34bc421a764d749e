//! The replicated journal: every db_write goes to every destination at once, and is
//! acknowledged only when enough of them hold it durably.
//!
//! - A record is framed once; the first destination appends it on the caller's thread,
//!   each other one on a thread of its own, so a write costs the slowest destination, not
//!   the sum, and one destination costs no thread hop at all. A destination whose appends
//!   take less than handing one to another thread (a wake-up: a few µs on bare metal, about
//!   16 µs on a VM without halt-polling) is written on the caller's thread after the first:
//!   both are measured as they go, so a tmpfs or a disk with a fast write cache costs its
//!   own few µs, not a hand-off.
//! - Policy: with `min` = 0 (the default) every destination must hold every write, else the
//!   write is refused and lightningd halts. With `min` = N, lightningd goes on while at least
//!   N destinations hold every write; the others are `behind` and are brought back up to date
//!   in the background (`catch_up`), then are written synchronously again.
//! - A lagging destination is listed in `backup-behind.json` (`behind`) before the first
//!   write it lacks is acknowledged, and taken off once it holds every write again. At a
//!   start, a listed copy is behind whatever it holds, and of the others those at the most
//!   advanced data_version are in sync. Their last records may differ: sealed for another
//!   place, or each an uncommitted transaction that lightningd sends again.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{json, Value};

use super::behind::{Behind, Listing};
use super::{Shared, Tip};
use crate::clock::fmt_time;
use crate::compact::lock;
use crate::error::StoreError;
use crate::journal::{self, JournalReader, Kind};
use crate::plugin::stats::Latency;
use crate::versions::{self, Decision};
use crate::writer::{Applied, Refusal, Writer};

/// How often a lagging destination is retried, and how often it is logged while it lags.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);
pub const WARN_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    InSync,
    /// Reachable or not, it lacks writes the others hold.
    Behind,
}

pub struct Slot {
    /// As shown in logs and status (no password).
    pub url: String,
    /// As written in backup.lock, to open it again.
    raw: String,
    dest: Option<Shared>,
    pub state: State,
    pub last_error: Option<String>,
    latency: Latency,
    behind_since: Option<Instant>,
    last_warned: Option<Instant>,
    worker: Option<Sender<Job>>,
    /// Its recent append time (moving average, µs); None before the first.
    recent_us: Option<f64>,
    /// Listed in `backup-behind.json` (on disk).
    listed: bool,
    /// Found behind at open: the first data_version it lacks, when its end is known.
    lacks_from: Option<u32>,
}

struct Job {
    slot: usize,
    dest: Shared,
    /// The record framed in plaintext (sealed by the copy for its own place, if it is sealed
    /// and `sealed` no longer fits it).
    plain: Arc<[u8]>,
    /// The record sealed once, for `place`.
    sealed: Option<Arc<[u8]>>,
    place: Tip,
    data_version: u32,
    kind: Kind,
    replace_last: bool,
}

type Done = (usize, Result<(), StoreError>, Duration);

pub struct Replicas {
    slots: Vec<Slot>,
    /// Destinations that must hold every write (0 = all of them).
    min: usize,
    /// `backup-reconnect-timeout`: also for a destination the catch-up opens later.
    reconnect_timeout: Duration,
    buf: Vec<u8>,
    sealed_buf: Vec<u8>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// What handing an append to a worker costs this thread (moving average, µs).
    handoff_us: f64,
    /// The lightning dir: URLs are relative to it, and `backup-behind.json` is in it.
    base: std::path::PathBuf,
    /// `backup-behind.json` as it is on disk (or will be at the first change).
    list: Behind,
    /// Why no write may be acknowledged (the list cannot be read and the copies differ).
    refuse: Option<String>,
}

/// Moving average over about the last 4 samples: quick to follow a destination that slows.
fn ewma(avg: Option<f64>, sample: f64) -> f64 {
    avg.map_or(sample, |a| a + (sample - a) / 4.0)
}

impl Replicas {
    /// Opens every destination. One that cannot be opened is `behind` (and named in the
    /// log); whether that halts lightningd is the policy's to say at the first write.
    pub fn open(urls: &[String], base: &std::path::Path, min: usize, reconnect_timeout: Duration) -> Replicas {
        let (done_tx, done_rx) = mpsc::channel();
        let mut slots = Vec::new();
        for url in urls {
            let (dest, error) = match super::open(url, base, reconnect_timeout) {
                Ok((d, notes)) => {
                    notes.iter().for_each(|n| info!("{n}"));
                    (Some(Arc::new(Mutex::new(d))), None)
                }
                Err(e) => {
                    warn!("{e}");
                    (None, Some(e))
                }
            };
            slots.push(Slot {
                url: super::shown(url),
                raw: url.clone(),
                dest,
                state: State::InSync,
                last_error: error,
                latency: Latency::default(),
                behind_since: None,
                last_warned: None,
                worker: None,
                recent_us: None,
                listed: false,
                lacks_from: None,
            });
        }
        let mut r = Replicas {
            slots,
            min,
            reconnect_timeout,
            buf: Vec::with_capacity(1 << 16),
            sealed_buf: Vec::with_capacity(1 << 16),
            done_tx,
            done_rx,
            handoff_us: 10.0,
            base: base.to_path_buf(),
            list: Behind::default(),
            refuse: None,
        };
        r.classify_at_open(Behind::load(base));
        r.start_workers();
        r
    }

    /// A copy listed in `backup-behind.json` is behind; of the others, those at the most
    /// advanced data_version are in sync, and the rest (and those not opened) are behind.
    /// Without a list (a backup from before it), or with one that cannot be read, a copy is
    /// in sync only if it ends exactly as the most advanced one, and no write goes on while
    /// copies at the latest version end differently.
    fn classify_at_open(&mut self, listing: Listing) {
        let base = self.base.clone();
        if let Listing::Kept(b) = &listing {
            for s in &mut self.slots {
                s.listed = b.find(&s.raw, &base).is_some();
            }
        }
        let tips: Vec<Option<Tip>> = self.slots.iter().map(|s| s.dest.as_ref().map(|d| lock(d).tip())).collect();
        let pick = |trusted_only: bool| {
            let open = tips.iter().zip(&self.slots).filter(|(_, s)| !trusted_only || !s.listed);
            most_advanced(open.filter_map(|(t, _)| *t), |t| t)
        };
        let trusted = pick(true);
        let best = trusted.or_else(|| pick(false));
        let kept = matches!(listing, Listing::Kept(_));
        for (slot, tip) in self.slots.iter_mut().zip(&tips) {
            let in_sync = !slot.listed
                && matches!((tip, &best), (Some(t), Some(b))
                    if t.same_end(b) || (kept && t.position.version == b.position.version));
            if in_sync {
                continue;
            }
            slot.state = State::Behind;
            slot.behind_since = Some(Instant::now());
            // its last transaction may be one lightningd replaced: that version is in doubt
            slot.lacks_from = tip.map(|t| t.position.version.wrapping_add(u32::from(!t.position.droppable)));
            if slot.last_error.is_some() {
                continue;
            }
            slot.last_error = match (&listing, tip, &best) {
                (Listing::Kept(b), _, _) if slot.listed => b.find(&slot.raw, &base).map(|e| {
                    let mut why = Behind::describe(e);
                    if trusted.is_none() {
                        why.push_str(
                            ". No copy that holds every write can be read: bring one back (or add it again), or \
                             make a new backup (lightningd stopped: move backup.lock away, then backup-cli init)",
                        );
                    }
                    why
                }),
                (_, Some(t), Some(b)) if t.position.version == b.position.version => Some(format!(
                    "holds data_version {} as the most advanced copy does, but ends with another record{}",
                    t.position.version,
                    match t.generation == b.generation {
                        true => String::new(),
                        false => format!("; it is at generation {}, that copy at {}", t.generation, b.generation),
                    }
                )),
                (_, Some(t), Some(b)) => Some(format!(
                    "holds up to data_version {}, the most advanced copy {}",
                    t.position.version, b.position.version
                )),
                _ => None,
            };
        }
        let top: Vec<&Slot> = match &best {
            Some(b) => self
                .slots
                .iter()
                .zip(&tips)
                .filter(|(_, t)| t.is_some_and(|t| t.position.version == b.position.version))
                .map(|(s, _)| s)
                .collect(),
            None => vec![],
        };
        match listing {
            Listing::Kept(b) => self.list = b,
            // Copies at the latest version that end differently, and nothing says which one
            // missed writes: one may hold a transaction lightningd never committed.
            Listing::Missing | Listing::Unreadable(_) if top.iter().any(|s| s.state == State::Behind) => {
                let names: Vec<&str> = top.iter().map(|s| s.url.as_str()).collect();
                let version = best.map_or(0, |b| b.position.version);
                let cause = match &listing {
                    Listing::Unreadable(e) => e.clone(),
                    _ => format!("there is no {} (a backup made before it)", super::behind::FILE_NAME),
                };
                let why = format!(
                    "{} hold data_version {version} but end with different records, and {cause}: one of them may \
                     hold a transaction lightningd never committed. With lightningd stopped, remove the copy that \
                     was away or failed last (backup-cli remove-destination), start lightningd, then add it again \
                     (backup-cli add-destination)",
                    names.join(" and ")
                );
                for s in &mut self.slots {
                    s.state = State::Behind;
                    s.behind_since.get_or_insert_with(Instant::now);
                }
                self.refuse = Some(why);
            }
            // Each copy is in sync or plainly behind in versions: the list starts here.
            listing => {
                if let Listing::Unreadable(e) = &listing {
                    warn!("{e}. The copies at the latest version end alike, so a new list replaces it");
                }
                if let Err(e) = self.list.save(&base) {
                    warn!("Cannot start {}: {}", super::behind::FILE_NAME, e.explain());
                }
            }
        }
        // Said at warn once an attempt to bring them up to date has failed (`catch_up`).
    }

    /// Lists every lagging copy in `backup-behind.json` that is not yet, before a write
    /// it lacks is acknowledged. A copy not listed could pass for a complete one at the
    /// next start, so a failure to list it refuses the write.
    fn list_lagging(&mut self, data_version: u32) -> Result<(), String> {
        if self.slots.iter().all(|s| s.state == State::InSync || s.listed) {
            return Ok(());
        }
        let mut next = self.list.clone();
        for s in self.slots.iter().filter(|s| s.state == State::Behind && !s.listed) {
            // the first version it lacks: this one, or an earlier one if it was behind at open
            let from = s.lacks_from.filter(|&v| versions::before(v, data_version)).unwrap_or(data_version);
            next.add(&s.raw, from, &self.base);
        }
        next.save(&self.base).map_err(|e| {
            format!(
                "Cannot record which backup destinations missed this write: {}; refusing, so that a restart \
                 cannot take one of them for a complete copy",
                e.explain()
            )
        })?;
        self.list = next;
        for s in self.slots.iter_mut().filter(|s| s.state == State::Behind) {
            s.listed = true;
        }
        Ok(())
    }

    /// Takes a copy that holds every write again off `backup-behind.json`. If that fails it
    /// stays listed, and the next start brings it up to date again: a check, nothing lost.
    fn unlist(&mut self, i: usize) {
        if !self.slots[i].listed {
            return;
        }
        let mut next = self.list.clone();
        next.remove(&self.slots[i].raw, &self.base);
        match next.save(&self.base) {
            Ok(()) => {
                self.list = next;
                self.slots[i].listed = false;
            }
            Err(e) => warn!("{} is up to date but stays listed as behind: {}", self.slots[i].url, e.explain()),
        }
    }

    fn start_workers(&mut self) {
        for slot in self.slots.iter_mut().skip(1) {
            let (tx, rx) = mpsc::channel::<Job>();
            let done = self.done_tx.clone();
            let spawned = std::thread::Builder::new().name("cln-backup-replica".into()).spawn(move || {
                crate::fsutil::no_wakeup_preemption();
                for job in rx {
                    let t = Instant::now();
                    let mut d = lock(&job.dest);
                    let r = match &job.sealed {
                        Some(s) => d.append_at(job.data_version, job.kind, job.replace_last, s, &job.place, &job.plain),
                        None => d.append(job.data_version, job.kind, job.replace_last, &job.plain),
                    };
                    drop(d);
                    let slot = job.slot;
                    drop(job);
                    if done.send((slot, r, t.elapsed())).is_err() {
                        return;
                    }
                }
            });
            // Without a worker its appends run on the caller's thread: slower, still correct.
            slot.worker = spawned.ok().map(|_| tx);
        }
    }

    /// How many destinations must hold every write.
    pub fn required(&self) -> usize {
        if self.min == 0 {
            self.slots.len()
        } else {
            self.min.min(self.slots.len())
        }
    }

    pub fn set_min(&mut self, min: usize) {
        self.min = min;
    }

    /// `backup-reconnect-timeout` for every network destination.
    pub fn set_reconnect_timeout(&mut self, timeout: Duration) {
        self.reconnect_timeout = timeout;
        for s in &self.slots {
            let Some(d) = &s.dest else { continue };
            match s.state {
                State::InSync => lock(d).set_reconnect_timeout(timeout),
                // busy with the catch-up, which gives it the bound before its next attempt
                State::Behind => {
                    if let Ok(mut d) = d.try_lock() {
                        d.set_reconnect_timeout(timeout);
                    }
                }
            }
        }
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Applies one db_write to every in-sync destination, in parallel. Ok once at least
    /// `required()` of them hold it durably, with the version the backup held before; the
    /// ones that failed are then `behind`.
    pub fn apply<S: AsRef<str>>(&mut self, data_version: u32, writes: &[S]) -> Result<(Applied, u32), Refusal> {
        if let Some(why) = &self.refuse {
            return Err(Refusal::Versions(why.clone()));
        }
        let kind = versions::classify(data_version, writes).map_err(Refusal::Versions)?;
        let targets: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].state == State::InSync && self.slots[i].dest.is_some())
            .collect();
        let Some(first) = targets.first().and_then(|&f| self.slots[f].dest.clone()) else {
            return Err(Refusal::Versions(self.not_enough("no destination holds the backup's latest state", 0)));
        };
        // The first in-sync copy decides, and the record is sealed once, for its place;
        // every copy at that same place stores the same bytes, any other (mid-compaction)
        // seals it for its own place.
        let (tip, replace, sealed) = {
            let mut d = lock(&first);
            let tip = d.tip();
            let decision = versions::decide(tip.position, data_version, kind);
            if let Some(m) = decision.halt_message() {
                return Err(Refusal::Versions(m));
            }
            let replace = decision == Decision::ReplaceLast;
            let statements: Vec<&str> = writes.iter().map(AsRef::as_ref).collect();
            let sealed = d
                .seal_for_next(data_version, kind, replace, &statements, &mut self.sealed_buf)
                .map_err(Refusal::Store)?;
            (tip, replace, sealed)
        };
        let mut results: Vec<(usize, Result<(), StoreError>, Duration)> = Vec::with_capacity(targets.len());
        // Framed in plaintext too: for a plaintext backup, and for a copy whose next record
        // goes elsewhere by the time it writes (a compaction switched it), which then seals
        // it for its own place (`Destination::append_at` decides under the switch's lock).
        self.buf.clear();
        journal::encode_record(&mut self.buf, data_version, kind, writes);
        // shared with the workers, copied once if any is handed one
        let mut plain: Option<Arc<[u8]>> = None;
        let mut sealed_rec: Option<Arc<[u8]>> = None;
        let mut here = Vec::with_capacity(targets.len());
        let mut sent = 0;
        let handing = Instant::now();
        for (k, &i) in targets.iter().enumerate() {
            let slot = &self.slots[i];
            let quick = slot.recent_us.is_some_and(|us| us < self.handoff_us);
            let (Some(w), Some(d)) = (&slot.worker, &slot.dest) else {
                here.push(i);
                continue;
            };
            if k == 0 || quick {
                here.push(i);
                continue;
            }
            let job = Job {
                slot: i,
                dest: d.clone(),
                plain: plain.get_or_insert_with(|| Arc::from(&self.buf[..])).clone(),
                sealed: sealed.then(|| sealed_rec.get_or_insert_with(|| Arc::from(&self.sealed_buf[..])).clone()),
                place: tip,
                data_version,
                kind,
                replace_last: replace,
            };
            match w.send(job) {
                Ok(()) => sent += 1,
                // its worker is gone: written here, slower, still correct
                Err(_) => here.push(i),
            }
        }
        if sent > 0 {
            self.handoff_us = ewma(Some(self.handoff_us), handing.elapsed().as_secs_f64() * 1e6 / sent as f64);
        }
        // the first on this thread, then any quicker to write than to hand over
        for i in here {
            if let Some(d) = &self.slots[i].dest {
                let t = Instant::now();
                let r = if sealed {
                    lock(d).append_at(data_version, kind, replace, &self.sealed_buf, &tip, &self.buf)
                } else {
                    lock(d).append(data_version, kind, replace, &self.buf)
                };
                results.push((i, r, t.elapsed()));
            }
        }
        for _ in 0..sent {
            match self.done_rx.recv() {
                Ok(done) => results.push(done),
                Err(_) => break,
            }
        }
        let mut held = 0;
        let mut failures = Vec::new();
        for (i, r, took) in results {
            let slot = &mut self.slots[i];
            slot.latency.record(took.as_micros() as u64);
            slot.recent_us = Some(ewma(slot.recent_us, took.as_secs_f64() * 1e6));
            match r {
                Ok(()) => held += 1,
                Err(e) => failures.push((i, e.explain())),
            }
        }
        let (required, min) = (self.required(), self.min);
        for (i, why) in &failures {
            let slot = &mut self.slots[*i];
            slot.last_error = Some(why.clone());
            if held >= required {
                slot.state = State::Behind;
                slot.behind_since = Some(Instant::now());
                slot.last_warned = Some(Instant::now());
                warn!(
                    "Backup destination {} failed at data_version {data_version} and is now behind: {why}. \
                     lightningd goes on: {held} destination(s) hold every write (backup-min-destinations={}). \
                     It is retried every {} s and brought up to date when it can be written again",
                    slot.url,
                    min,
                    RETRY_EVERY.as_secs()
                );
            }
        }
        if held >= self.required() {
            self.list_lagging(data_version).map_err(Refusal::Versions)?;
        }
        if held < self.required() {
            let what = match failures.first() {
                Some((i, why)) => format!("{} failed: {why}", self.slots[*i].url),
                // none failed now: some were not written, being behind already
                None => self.slots.iter().find(|s| s.state != State::InSync).map_or_else(
                    || "not written".to_string(),
                    |s| format!("{} is not in sync: {}", s.url, s.last_error.as_deref().unwrap_or("not written")),
                ),
            };
            return Err(Refusal::Versions(self.not_enough(&what, held)));
        }
        Ok((if replace { Applied::Replaced } else { Applied::Appended }, tip.position.version))
    }

    fn not_enough(&self, why: &str, held: usize) -> String {
        if self.slots.len() == 1 {
            return why.to_string();
        }
        format!(
            "Backup destination {why}. {held} of {} destinations hold every write, {} required \
             (backup-min-destinations={}); refusing to let lightningd go on. Fix the destination, or set \
             backup-min-destinations lower to go on while it is brought up to date",
            self.slots.len(),
            self.required(),
            self.min
        )
    }

    /// Logs each lagging destination again every `WARN_EVERY`.
    pub fn warn_lagging(&mut self) {
        for s in self.slots.iter_mut().filter(|s| s.state == State::Behind) {
            if s.last_warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                s.last_warned = Some(Instant::now());
                let since = s.behind_since.map_or(0, |t| t.elapsed().as_secs());
                warn!(
                    "Backup destination {} is behind (for {since} s): {}",
                    s.url,
                    s.last_error.as_deref().unwrap_or("unknown")
                );
            }
        }
    }

    /// The backup id of the first in-sync copy, when it is sealed.
    pub fn sealed_backup_id(&self) -> Option<crate::seal::BackupId> {
        self.slots
            .iter()
            .filter(|s| s.state == State::InSync)
            .find_map(|s| s.dest.as_ref())
            .and_then(|d| lock(d).backup_id())
    }

    pub fn any_behind(&self) -> bool {
        self.slots.iter().any(|s| s.state == State::Behind)
    }

    /// The first in-sync file copy's writer (what automatic compaction looks at after
    /// every write: no allocation).
    pub fn first_in_sync_writer(&self) -> Option<Arc<Mutex<Writer>>> {
        self.slots
            .iter()
            .filter(|s| s.state == State::InSync)
            .find_map(|s| s.dest.as_ref().and_then(|d| lock(d).writer()))
    }

    /// The file writers of the in-sync destinations (compaction runs on each).
    pub fn in_sync_writers(&self) -> Vec<(String, Arc<Mutex<Writer>>)> {
        self.slots
            .iter()
            .filter(|s| s.state == State::InSync)
            .filter_map(|s| s.dest.as_ref().and_then(|d| lock(d).writer()).map(|w| (s.url.clone(), w)))
            .collect()
    }

    /// Compactions that in-sync network destinations run beside their writer.
    pub fn background_compactions(&self) -> Vec<(String, super::BackgroundCompaction)> {
        self.slots
            .iter()
            .filter(|s| s.state == State::InSync)
            .filter_map(|s| {
                s.dest.as_ref().and_then(|d| lock(d).background_compaction(d.clone())).map(|j| (s.url.clone(), j))
            })
            .collect()
    }

    /// Per-destination status.
    pub fn status(&self) -> Vec<Value> {
        self.slots
            .iter()
            .map(|s| {
                let mut v = json!({
                    "url": s.url,
                    "state": match (s.state, &s.dest) {
                        (State::InSync, _) => "in-sync",
                        (State::Behind, Some(_)) => "behind",
                        (State::Behind, None) => "failed",
                    },
                    "hook_p50_us": s.latency.quantile(0.5),
                    "hook_p99_us": s.latency.quantile(0.99),
                    "last_error": s.last_error,
                });
                // A lagging copy's lock is the catch-up's while it reconnects or installs (up to
                // backup-reconnect-timeout, or a whole upload): status must not wait for it.
                let held = s.dest.as_ref().and_then(|d| match s.state {
                    State::InSync => Some(lock(d)),
                    State::Behind => d.try_lock().ok(),
                });
                if s.dest.is_some() && held.is_none() {
                    v["catching_up"] = json!(true);
                }
                if let Some(d) = held {
                    let tip = d.tip();
                    v["kind"] = json!(d.kind());
                    v["latest_version"] = json!(tip.position.version);
                    v["generation"] = json!(tip.generation);
                    v["bytes"] = json!(d.bytes());
                    v["last_write"] = json!(d.last_write().map(fmt_time));
                    v["details"] = d.details();
                }
                if let Some(t) = s.behind_since {
                    v["behind_for_s"] = json!(t.elapsed().as_secs());
                }
                v
            })
            .collect()
    }
}

/// Whether `a` holds more than `b`: a later version, or the same version with more after it.
pub fn ahead(a: &Tip, b: &Tip) -> bool {
    if a.position.version == b.position.version {
        a.generation > b.generation || (a.generation == b.generation && a.journal_len > b.journal_len)
    } else {
        versions::before(b.position.version, a.position.version)
    }
}

/// The item whose tip is ahead of all others (the first of equals).
pub fn most_advanced<T>(items: impl IntoIterator<Item = T>, tip: impl Fn(&T) -> &Tip) -> Option<T> {
    items.into_iter().reduce(|a, b| if ahead(tip(&b), tip(&a)) { b } else { a })
}

/// Why a lagging copy stays behind when only copies of other kinds are in sync.
const NO_SOURCE: &str = "only a file copy in sync can bring it up to date, and none is: check each copy with \
    `backup-cli verify`, then remove this one (`backup-cli remove-destination`) and add it again \
    (`backup-cli add-destination`), lightningd stopped";

/// One round of bringing lagging destinations up to date: reopens those that could not be
/// opened, copies what they lack from an in-sync file destination without holding the
/// replicas, then takes the replicas (so no db_write runs) for the last few records and
/// marks them in sync. Returns true when none is left behind.
pub fn catch_up(replicas: &Mutex<Replicas>, base: &std::path::Path) -> bool {
    let (work, source, timeout) = {
        let r = lock(replicas);
        let work: Vec<(usize, String, Option<Shared>)> = r
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == State::Behind)
            .map(|(i, s)| (i, s.raw.clone(), s.dest.clone()))
            .collect();
        let source = r
            .slots
            .iter()
            .filter(|s| s.state == State::InSync)
            .find_map(|s| s.dest.as_ref().and_then(|d| lock(d).writer()));
        (work, source, r.reconnect_timeout)
    };
    if work.is_empty() {
        return true;
    }
    let Some(source) = source else {
        // nothing in sync to copy from: the db_write path halts meanwhile (by default)
        let mut r = lock(replicas);
        for s in r.slots.iter_mut().filter(|s| s.state == State::Behind && s.dest.is_some()) {
            let why = s.last_error.take().unwrap_or_default();
            s.last_error = Some(match why.as_str() {
                "" => NO_SOURCE.to_string(),
                w if w.contains(NO_SOURCE) => why,
                _ => format!("{why}; {NO_SOURCE}"),
            });
        }
        r.warn_lagging();
        return false;
    };
    for (i, raw, dest) in work {
        let url = super::shown(&raw);
        let dest = match dest {
            Some(d) => d,
            None => match super::open(&raw, base, timeout) {
                Ok((d, notes)) => {
                    notes.iter().for_each(|n| info!("{n}"));
                    let d: Shared = Arc::new(Mutex::new(d));
                    lock(replicas).slots[i].dest = Some(d.clone());
                    info!("Backup destination {url} can be opened again; bringing it up to date");
                    d
                }
                Err(e) => {
                    lock(replicas).slots[i].last_error = Some(e);
                    continue;
                }
            },
        };
        lock(&dest).set_reconnect_timeout(timeout);
        // the bulk, while db_write goes on
        let bulk = match copy_missing(&source, &dest, true) {
            Ok(n) => n,
            Err(e) => {
                lock(replicas).slots[i].last_error = Some(e);
                continue;
            }
        };
        // the rest, with db_write held for as long as a few records take (never a whole
        // generation: a compaction in between leaves that to the next round)
        let mut r = lock(replicas);
        match copy_missing(&source, &dest, false) {
            Ok(n) => {
                r.unlist(i);
                let slot = &mut r.slots[i];
                let lagged = slot.behind_since.map_or(0, |t| t.elapsed().as_secs());
                slot.state = State::InSync;
                slot.behind_since = None;
                slot.last_error = None;
                info!(
                    "Backup destination {url} is up to date again (behind for {lagged} s; {} record(s) copied, the \
                     last {n} while db_write waited) and is written synchronously again",
                    bulk + n
                );
            }
            Err(e) => r.slots[i].last_error = Some(e),
        }
    }
    let mut r = lock(replicas);
    r.warn_lagging();
    !r.any_behind()
}

/// Makes `dest` hold what the file destination `source` holds: the records it lacks when
/// both are in the same generation and its end is one of the source's, else the source's
/// whole generation (unless `may_install` is false: then that is an error, to retry).
/// Returns how many records were appended.
fn copy_missing(source: &Mutex<Writer>, dest: &Shared, may_install: bool) -> Result<u64, String> {
    let (files, src_tip) = {
        let w = lock(source);
        (super::file::FileDestination::generation_files(&w), super::file::tip_of(&w))
    };
    let mut d = lock(dest);
    let url = d.url().to_string();
    let why = |e: StoreError| format!("bringing {url} up to date: {}", e.explain());
    if d.tip().same_end(&src_tip) && d.tip().generation == src_tip.generation {
        return Ok(0);
    }
    let install = |d: &mut Box<dyn super::Destination>| match may_install {
        true => d.install(&files).map_err(why),
        false => Err(format!("bringing {url} up to date: it needs the source's whole generation now; retrying")),
    };
    if d.tip().generation != src_tip.generation {
        install(&mut d)?;
    }
    // Walk the source's journal to where the destination ends, then append the rest.
    let mut reader = JournalReader::open(&files.journal).map_err(why)?;
    if reader.header.generation != files.generation {
        return Err(format!("bringing {url} up to date: the source was compacted meanwhile; retrying"));
    }
    reader.limit(files.journal_len);
    let tip = d.tip();
    let mut version = reader.header.base.version();
    let mut found = tip.journal_len == journal::HEADER_LEN && tip.position.version == version;
    let mut appended = 0u64;
    let mut buf = Vec::new();
    while let Some(rec) = reader.next_record().map_err(why)? {
        if rec.kind == Kind::Transaction {
            version = rec.data_version;
        }
        if found {
            put(&mut d, &mut buf, &rec, false).map_err(why)?;
            appended += 1;
        } else if rec.end() == tip.journal_len && version == tip.position.version && rec.header_crc() == tip.tail {
            found = true; // the destination holds exactly the records up to here
        } else if rec.kind == Kind::Transaction
            && tip.position.droppable
            && rec.data_version == tip.position.version
            && tip.last_tx_offset == Some(rec.offset)
        {
            // Its last transaction is this version's, or one lightningd replaced with this
            // one, at the same place: replace it (and whatever followed it) with the source's.
            // Also when the source ends as it does further on: its end names only its last
            // record, which cannot vouch for the transaction before it.
            put(&mut d, &mut buf, &rec, true).map_err(why)?;
            appended += 1;
            found = true;
        }
    }
    if !found {
        // It ends with nothing the source has: take the source's generation whole.
        install(&mut d)?;
    }
    Ok(appended)
}

/// Appends a record read back, framed again exactly as it was written.
fn put(
    d: &mut Box<dyn super::Destination>,
    buf: &mut Vec<u8>,
    rec: &journal::Record,
    replace_last: bool,
) -> Result<(), StoreError> {
    buf.clear();
    journal::frame_payload(buf, rec.data_version, rec.kind, &rec.payload);
    d.append_copy(rec.data_version, rec.kind, replace_last, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::file::FileDestination;
    use crate::destination::Destination;
    use crate::keys::KeySource;

    /// A copy that ends with a record the source does not hold needs the source's whole
    /// generation: the bulk step installs it, the step that holds db_write never does.
    #[test]
    fn only_the_bulk_step_installs_a_whole_generation() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a.bkp"), tmp.path().join("b.bkp"));
        crate::writer::create(&a, None, None, None).unwrap();
        crate::writer::create(&b, None, None, None).unwrap();
        let keys = KeySource::default();
        let (src, _) = FileDestination::open("file://a", &a, &keys).unwrap();
        let source = src.writer().unwrap();
        let (mut lagging, _) = FileDestination::open("file://b", &b, &keys).unwrap();
        let mut rec = Vec::new();
        journal::encode_record(&mut rec, 1, Kind::Transaction, &["UPDATE vars SET intval = 1"]);
        lagging.append(1, Kind::Transaction, false, &rec).unwrap();
        let dest: Shared = Arc::new(Mutex::new(Box::new(lagging)));
        let before = lock(&dest).tip();
        let e = copy_missing(&source, &dest, false).unwrap_err();
        assert!(e.contains("whole generation") && e.contains("retrying"), "{e}");
        assert_eq!(lock(&dest).tip(), before, "the step under db_write changed the copy");
        copy_missing(&source, &dest, true).unwrap();
        assert!(lock(&dest).tip().same_end(&super::super::file::tip_of(&lock(&source))));
        assert_eq!(copy_missing(&source, &dest, false), Ok(0));
    }

    /// Three copies, written on workers and then (quicker than a hand-off) on the caller's
    /// thread: every copy holds every write either way, and a replaced last transaction too.
    #[test]
    fn copies_written_here_or_on_workers_hold_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let roots: Vec<_> = (0..3).map(|i| tmp.path().join(format!("{i}.bkp"))).collect();
        let urls: Vec<String> = roots.iter().map(|r| format!("file://{}", r.display())).collect();
        for r in &roots {
            crate::writer::create(r, None, None, None).unwrap();
        }
        let mut r = Replicas::open(&urls, tmp.path(), 0, Duration::from_secs(1));
        let bump =
            |v: u32| format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1);
        let mut v = 1;
        for handoff in [0.0, 1e12, 0.0] {
            r.handoff_us = handoff;
            for _ in 0..5 {
                r.apply(v, &[format!("INSERT INTO t VALUES ({v})"), bump(v)]).unwrap();
                v += 1;
            }
            let here = r.slots.iter().skip(1).all(|s| s.recent_us.is_some_and(|us| us < r.handoff_us));
            assert_eq!(here, handoff > 0.0, "handoff {handoff}: written on the caller's thread: {here}");
        }
        // lightningd sends the last version again: it never committed it
        let (applied, _) = r.apply(v - 1, &["INSERT INTO t VALUES (0)".to_string(), bump(v - 1)]).unwrap();
        assert_eq!(applied, Applied::Replaced);
        drop(r);
        let tips: Vec<Tip> = roots
            .iter()
            .map(|root| FileDestination::open("file://x", root, &KeySource::default()).unwrap().0.tip())
            .collect();
        assert_eq!(tips[0].position.version, v - 1);
        assert!(tips.iter().all(|t| t.same_end(&tips[0])), "{tips:?}");
    }

    /// A copy is given what follows its end when it ends exactly as the source does there.
    /// Else its last transaction is replaced, with what follows: also when it ends
    /// [transaction, PRAGMA] as the source does, since the end names only the last record
    /// and the transaction before it may be one lightningd replaced (here by one of the same
    /// length, so every offset matches).
    #[test]
    fn a_copy_gets_what_follows_its_end_else_its_last_transaction_again() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = KeySource::default();
        let rec = |v: u32, kind: Kind, sql: &str| {
            let mut r = Vec::new();
            journal::encode_record(&mut r, v, kind, &[sql]);
            (v, kind, r)
        };
        let (tx1, a, b) = (
            rec(1, Kind::Transaction, "INSERT 1"),
            rec(2, Kind::Transaction, "INSERT A"),
            rec(2, Kind::Transaction, "INSERT B"),
        );
        let (pragma, tx3) = (rec(2, Kind::Outside, "PRAGMA foreign_keys = ON"), rec(3, Kind::Transaction, "INSERT 3"));
        let copy = |name: &str, recs: &[&(u32, Kind, Vec<u8>)]| {
            let root = tmp.path().join(name);
            crate::writer::create(&root, None, None, None).unwrap();
            let mut d = FileDestination::open(name, &root, &keys).unwrap().0;
            for (v, k, r) in recs {
                d.append(*v, *k, false, r).unwrap();
            }
            (root, d)
        };
        let records = |root: &std::path::Path| {
            let mut r = JournalReader::open(&crate::layout::Layout::new(root).list().unwrap().journal).unwrap();
            std::iter::from_fn(|| r.next_record().unwrap().map(|x| (x.data_version, x.kind, x.payload)))
                .collect::<Vec<_>>()
        };
        // lightningd sent A, replaced it by B (never committing A), then the PRAGMA and tx3
        let (src_root, mut src) = copy("src.bkp", &[&tx1, &a]);
        src.append(2, Kind::Transaction, true, &b.2).unwrap();
        for (v, k, r) in [&pragma, &tx3] {
            src.append(*v, *k, false, r).unwrap();
        }
        let source = src.writer().unwrap();
        for (name, held, copied) in [
            ("exact.bkp", vec![&tx1, &b], 2),
            ("a.bkp", vec![&tx1, &a], 3),
            ("a-pragma.bkp", vec![&tx1, &a, &pragma], 3),
            ("b-pragma.bkp", vec![&tx1, &b, &pragma], 3),
        ] {
            let (root, d) = copy(name, &held);
            let d: Shared = Arc::new(Mutex::new(Box::new(d)));
            assert_eq!(copy_missing(&source, &d, false), Ok(copied), "{name}");
            drop(d);
            assert_eq!(records(&root), records(&src_root), "{name}");
        }
    }

    /// A copy found behind at open, by default, halts the first write with its name and
    /// why: fewer versions, or listed in backup-behind.json. Two copies at the same version
    /// that end differently are both in sync when neither is listed, and halt every write
    /// when there is no list to tell (none, or a damaged one).
    #[test]
    fn a_copy_behind_at_open_is_named_with_why_when_the_write_halts() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = KeySource::default();
        let bump =
            |v: u32| format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1);
        let tx = |v: u32, x: &str| {
            let mut r = Vec::new();
            journal::encode_record(&mut r, v, Kind::Transaction, &[format!("INSERT INTO t VALUES ('{x}')"), bump(v)]);
            r
        };
        let other_end = || vec![tx(1, "a"), tx(2, "c")];
        let differ = "hold data_version 2 but end with different records, and";
        for (case, (second, list, says)) in [
            (
                vec![tx(1, "a")],
                None,
                Some("is not in sync: holds up to data_version 1, the most advanced copy 2".into()),
            ),
            (
                other_end(),
                Some("[1]"),
                Some("is not in sync: it lacks writes lightningd committed: it fell behind at data_version 2".into()),
            ),
            (other_end(), Some("[]"), None),
            (
                other_end(),
                Some("{"),
                Some(format!(
                    "{differ} {} is damaged",
                    super::super::behind::path(&tmp.path().join("case-3")).display()
                )),
            ),
            (other_end(), None, Some(format!("{differ} there is no backup-behind.json"))),
        ]
        .into_iter()
        .enumerate()
        {
            let base = tmp.path().join(format!("case-{case}"));
            std::fs::create_dir(&base).unwrap();
            let roots: Vec<_> = (0..2).map(|i| base.join(format!("{i}.bkp"))).collect();
            let urls: Vec<String> = roots.iter().map(|r| format!("file://{}", r.display())).collect();
            for (root, recs) in roots.iter().zip([vec![tx(1, "a"), tx(2, "b")], second]) {
                crate::writer::create(root, None, None, None).unwrap();
                let mut d = FileDestination::open("file://x", root, &keys).unwrap().0;
                for (v, r) in recs.iter().enumerate() {
                    d.append(v as u32 + 1, Kind::Transaction, false, r).unwrap();
                }
            }
            match list {
                Some("[1]") => {
                    let mut b = Behind::default();
                    b.add(&urls[1], 2, &base);
                    b.save(&base).unwrap();
                }
                Some("[]") => Behind::default().save(&base).unwrap(),
                Some(damaged) => std::fs::write(super::super::behind::path(&base), damaged).unwrap(),
                None => {}
            }
            let mut r = Replicas::open(&urls, &base, 0, Duration::from_secs(1));
            let result = r.apply(3, &["INSERT INTO t VALUES ('d')".to_string(), bump(3)]);
            let Some(says) = says else {
                assert!(result.is_ok(), "case {case}: {:?}", result.err().map(|e| e.to_string()));
                assert!(r.slots().iter().all(|s| s.state == State::InSync));
                continue;
            };
            let Err(Refusal::Versions(m)) = result else { panic!("case {case}: a write went on with a copy behind") };
            assert!(m.contains(&urls[1]) && m.contains(&says), "case {case}: {m}");
        }
    }

    /// The list is written before a write a copy lacks is acknowledged: if it cannot be,
    /// the write is refused (lightningd halts), and the next one lists it and goes on.
    #[test]
    fn a_write_a_copy_lacks_is_refused_until_that_copy_is_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        let root = base.join("0.bkp");
        crate::writer::create(&root, None, None, None).unwrap();
        // the second copy's disk is not mounted: it cannot be opened, so lacks every write
        let urls = vec![format!("file://{}", root.display()), format!("file://{}/gone/1.bkp", base.display())];
        let mut r = Replicas::open(&urls, base, 1, Duration::from_secs(1));
        let obstacle = crate::fsutil::tmp_path(&super::super::behind::path(base));
        std::fs::create_dir(&obstacle).unwrap();
        let tx = [
            "INSERT INTO t VALUES (1)".to_string(),
            "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 0".to_string(),
        ];
        let Err(Refusal::Versions(m)) = r.apply(1, &tx) else { panic!("acknowledged before the copy was listed") };
        assert!(m.contains("Cannot record which backup destinations missed this write"), "{m}");
        assert_eq!(Behind::load(base), Listing::Kept(Behind::default()), "started empty at open, not listed since");
        std::fs::remove_dir(&obstacle).unwrap();
        let again = r.apply(1, &tx).map_err(|e| e.to_string());
        assert!(matches!(again, Ok((Applied::Replaced, _))), "lightningd sends it again: {:?}", again.err());
        let Listing::Kept(listed) = Behind::load(base) else { panic!("no list") };
        assert_eq!(listed.find(&urls[1], base).map(|e| e.since_version), Some(1));
    }

    /// Two file copies at data_version 2 in `base`: the first holds the committed 'y', the
    /// second the longer 'x' lightningd replaced while it was away, listed as `spell` says.
    fn replaced_tx(
        base: &std::path::Path,
        spell: Option<&dyn Fn(&std::path::Path) -> String>,
    ) -> (Vec<std::path::PathBuf>, Vec<String>) {
        let keys = KeySource::default();
        let tx = |v: u32, x: &str| {
            let mut r = Vec::new();
            let bump =
                format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1);
            journal::encode_record(&mut r, v, Kind::Transaction, &[format!("INSERT INTO t VALUES ('{x}')"), bump]);
            r
        };
        std::fs::create_dir_all(base).unwrap();
        let roots: Vec<_> = (0..2).map(|i| base.join(format!("{i}.bkp"))).collect();
        let urls: Vec<String> = roots.iter().map(|r| format!("file://{}", r.display())).collect();
        for (root, last) in roots.iter().zip(["y".to_string(), "x".repeat(200)]) {
            crate::writer::create(root, None, None, None).unwrap();
            let mut d = FileDestination::open("file://x", root, &keys).unwrap().0;
            d.append(1, Kind::Transaction, false, &tx(1, "a")).unwrap();
            d.append(2, Kind::Transaction, false, &tx(2, &last)).unwrap();
        }
        if let Some(spell) = spell {
            let mut b = Behind::default();
            b.add(&spell(&roots[1]), 2, base);
            b.save(base).unwrap();
        }
        (roots, urls)
    }

    fn holds(root: &std::path::Path, what: &str) -> bool {
        let mut r = JournalReader::open(&crate::layout::Layout::new(root).list().unwrap().journal).unwrap();
        std::iter::from_fn(|| r.next_record().unwrap()).any(|x| String::from_utf8_lossy(&x.payload).contains(what))
    }

    /// Without a list that says which copy missed writes (none: a backup from before it; or
    /// a damaged one), two copies at the latest version that end differently halt every
    /// write, and neither is copied onto the other; restore --lightning-dir refuses too.
    #[test]
    fn without_a_list_copies_that_disagree_at_the_top_are_neither_trusted() {
        for damaged in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let base = tmp.path().join("ldir");
            let (roots, urls) = replaced_tx(&base, None);
            if damaged {
                std::fs::write(super::super::behind::path(&base), "{").unwrap();
            }
            let r = Mutex::new(Replicas::open(&urls, &base, 1, Duration::from_secs(1)));
            let bump = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 2".to_string();
            let Err(Refusal::Versions(m)) = lock(&r).apply(3, &["INSERT INTO t VALUES ('d')".to_string(), bump]) else {
                panic!("damaged {damaged}: a write went on")
            };
            assert!(m.contains("end with different records") && m.contains("remove-destination"), "{m}");
            catch_up(&r, &base);
            drop(r);
            assert!(
                holds(&roots[0], "'y'") && !holds(&roots[0], "'xxx"),
                "damaged {damaged}: the committed copy was overwritten"
            );
            let copies: Vec<_> = urls.iter().map(|u| super::super::inspect::inspect(u, &base)).collect();
            let picked = super::super::inspect::most_advanced(&copies, &Behind::load(&base), &base);
            assert!(picked.is_err(), "damaged {damaged}: restore picked {:?}", picked.map(|(c, _)| c.url.clone()));
        }
    }

    /// An entry names the copy, not a spelling of it: a trailing slash in backup.lock (the
    /// same copy for every check) still finds it listed.
    #[test]
    fn a_listed_copy_is_found_under_another_spelling() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("ldir");
        let (_, urls) = replaced_tx(&base, Some(&|r: &std::path::Path| format!("file://{}/", r.display())));
        let r = Replicas::open(&urls, &base, 1, Duration::from_secs(1));
        assert_eq!(r.slots()[1].state, State::Behind);
        assert_eq!(r.slots()[0].state, State::InSync);
    }

    /// A listed copy left alone says what to do.
    #[test]
    fn a_listed_copy_alone_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("ldir");
        let (_, urls) = replaced_tx(&base, Some(&|r: &std::path::Path| format!("file://{}", r.display())));
        let r = Replicas::open(&urls[1..], &base, 0, Duration::from_secs(1));
        let e = r.slots()[0].last_error.clone().unwrap();
        assert!(e.contains("fell behind at data_version 2") && e.contains("backup-cli init"), "{e}");
    }

    /// A copy found behind at open is listed from the first version it may lack (its last
    /// transaction may be one lightningd replaced), not from the write that lists it.
    #[test]
    fn a_copy_behind_at_open_is_listed_from_where_it_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("ldir");
        let (_, urls) = replaced_tx(&base, None);
        let keys = KeySource::default();
        let mut d = FileDestination::open("file://x", &base.join("0.bkp"), &keys).unwrap().0;
        let mut rec = Vec::new();
        let bump =
            |v: u32| format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1);
        journal::encode_record(&mut rec, 3, Kind::Transaction, &["INSERT INTO t VALUES ('c')".to_string(), bump(3)]);
        d.append(3, Kind::Transaction, false, &rec).unwrap();
        drop(d);
        let mut r = Replicas::open(&urls, &base, 1, Duration::from_secs(1));
        assert!(r.apply(4, &["INSERT INTO t VALUES ('d')".to_string(), bump(4)]).is_ok());
        let Listing::Kept(listed) = Behind::load(&base) else { panic!("no list") };
        assert_eq!(listed.find(&urls[1], &base).map(|e| e.since_version), Some(2));
    }
}
