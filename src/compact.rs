//! Compaction: folds the journal into a new snapshot while lightningd keeps running.
//!
//! 1. plan (writer's lock, microseconds): fold everything before the last transaction; those
//!    bytes never change, and the last transaction stays droppable in the new journal;
//! 2. build (no lock): the old snapshot plus the folded records, into a database on disk;
//! 3. snapshot (no lock): compress it into the next generation's snapshot, durably;
//! 4. pre-copy (no lock): the journal's tail into the next generation's temp journal;
//! 5. switch (writer's lock, milliseconds): copy what arrived since, fsync, rename the
//!    journal into place (the commit point), fsync the directory, continue on it;
//! 6. remove the old generation.
//!
//! A crash anywhere leaves the old generation current, or the new one complete; the
//! leftovers are removed by the next writer. Readers pick the highest generation with a
//! journal, so they never see a half-built one.

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::fsutil::{self, Stepped, Throttle};
use crate::journal::{self, Base, Header, JournalReader, Kind};
use crate::layout::GenName;
use crate::restore::{finish_db, open_build_db, sql_err, Applier};
use crate::snapshot;
use crate::versions::Position;
use crate::writer::{check_chain, NextGeneration, Writer};

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub generation: u64,
    pub snapshot_version: u32,
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub records_folded: u64,
    pub seconds: f64,
    /// How long the final switch held the writer (the longest a hook could wait).
    pub switch_hold_us: u64,
}

#[derive(Debug)]
pub enum Outcome {
    /// Nothing to fold, and why.
    Nothing(String),
    Done(Stats),
}

/// What `backup-status` shows of compaction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub state: &'static str,
    pub phase: Option<&'static str>,
    pub started: Option<String>,
    pub progress_bytes: u64,
    pub total_bytes: u64,
    pub runs: u64,
    pub last: Option<Stats>,
    pub last_error: Option<String>,
    /// The longest any db_write waited for the writer while a compaction ran.
    pub max_hook_stall_us: u64,
}

impl Status {
    pub fn idle() -> Status {
        Status { state: "idle", ..Default::default() }
    }

    /// Marks a run as started. The caller does this before it spawns the run, so a
    /// `backup-status` right after `backup-compact` already says "running".
    pub fn begin(&mut self) {
        self.state = "running";
        self.started = Some(crate::clock::fmt_time(SystemTime::now()));
        self.max_hook_stall_us = 0;
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a temp file unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// For the crash tests: stop at a phase, so the process can be killed there.
fn pause_point(phase: &str, log: &dyn Fn(&str)) {
    if std::env::var("CLN_BACKUP_TEST_PAUSE").is_ok_and(|p| p == phase) {
        log(&format!("test pause at compaction phase {phase}"));
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Pre-copy stops when less than this is left for the switch to copy under the lock.
const PRECOPY_DONE: u64 = 64 << 10;
const PRECOPY_ROUNDS: usize = 8;

/// Compacts the backup `writer` holds. All disk work outside the switch is paced by
/// `throttle`: a writer lock is held only to plan and to switch.
pub fn compact(
    writer: &Mutex<Writer>,
    status: &Mutex<Status>,
    log: &dyn Fn(&str),
    throttle: &mut Throttle,
) -> Result<Outcome> {
    let started = Instant::now();
    let (plan, layout, journal_len, records) = {
        let w = lock(writer);
        (w.plan(), w.layout().clone(), w.journal_len(), w.records())
    };
    let Some(plan) = plan else {
        return Ok(Outcome::Nothing(format!(
            "nothing to compact: the journal holds {records} record(s), and its last transaction stays in the \
             journal until lightningd commits the next one"
        )));
    };
    let snap_len = match &plan.snapshot {
        Some(p) => fs::metadata(p).map_err(StoreError::io("stat", p))?.len(),
        None => 0,
    };
    let set = |phase: &'static str, done: u64, total: u64| {
        let mut s = lock(status);
        s.phase = Some(phase);
        s.progress_bytes = done;
        s.total_bytes = total;
    };
    let total = snap_len + plan.fold_end;
    set("build", 0, total);

    // 2. build
    let next = plan.generation + 1;
    let build = layout.root.join(format!("compact-{next:016x}.build.tmp"));
    let _ = fs::remove_file(&build);
    let build_guard = TempFile(Some(build.clone()));
    let db = fsutil::create_private(&build)?;
    if let Some(p) = &plan.snapshot {
        let mut f = File::open(p).map_err(StoreError::io("open snapshot", p))?;
        let mut out = BufWriter::with_capacity(1 << 20, Stepped::paced(&db, 0, throttle));
        snapshot::extract(p, &mut f, &mut out, &mut |n| set("build", n, total))?;
        std::io::Write::flush(&mut out).map_err(StoreError::io("write", &build))?;
    }
    // SQLite's writes to the build database reach the disk in paced steps too: each step
    // is charged what was read from the journal or what the file grew, whichever is more.
    let mut build_len = db.metadata().map_err(StoreError::io("stat", &build))?.len();
    let mut pace = |read: u64, throttle: &mut Throttle| -> Result<()> {
        db.sync_data().map_err(StoreError::io("fsync", &build))?;
        let len = db.metadata().map_err(StoreError::io("stat", &build))?.len();
        throttle.charge(read.max(len.saturating_sub(build_len)));
        build_len = len;
        Ok(())
    };
    let mut unpaced = 0u64;
    let conn = open_build_db(&build)?;
    let mut reader = JournalReader::open(&plan.journal)?;
    reader.limit(plan.fold_end);
    let mut pos = Position { version: plan.base.version(), droppable: false };
    let mut applier = Applier::new(&conn);
    let mut folded = 0u64;
    while let Some(rec) = reader.next_record()? {
        check_chain(&plan.journal, pos, &rec)?;
        let stmts = journal::decode_statements(&rec.payload).map_err(|what| StoreError::Damaged {
            path: plan.journal.clone(),
            offset: rec.offset,
            what,
        })?;
        applier.apply(rec.kind, &stmts).map_err(|e| StoreError::Apply {
            path: plan.journal.clone(),
            offset: rec.offset,
            version: rec.data_version,
            what: e.to_string(),
        })?;
        if rec.kind == Kind::Transaction {
            pos = Position { version: rec.data_version, droppable: true };
        }
        folded += 1;
        unpaced += rec.end() - rec.offset;
        if unpaced >= Throttle::STEP {
            pace(unpaced, throttle)?;
            unpaced = 0;
        }
        if folded.is_multiple_of(256) {
            set("build", snap_len + rec.end(), total);
        }
    }
    if reader.position() != plan.fold_end {
        return Err(StoreError::Damaged {
            path: plan.journal.clone(),
            offset: reader.position(),
            what: "the journal ends before the record the compaction planned to keep".into(),
        });
    }
    applier.commit().map_err(sql_err(&build))?;
    pace(unpaced, throttle)?;
    pause_point("build", log);
    finish_db(&conn, &build, pos.version)?;
    conn.close().map_err(|(_, e)| sql_err(&build)(e))?;
    pace(0, throttle)?;

    // 3. snapshot
    set("snapshot", 0, 0);
    let g = GenName { generation: next, base_version: pos.version };
    let snap_path = layout.snapshot_path(g);
    let _ = fs::remove_file(&snap_path); // a leftover of an earlier, interrupted try
    let snap_guard = TempFile(Some(snap_path.clone()));
    let snap = snapshot::write(&snap_path, next, pos.version, &build, throttle)?;
    fsutil::remove_gradually(&build, throttle, &mut |_| {})?;
    drop(build_guard);
    pause_point("snapshot", log);

    // 4. pre-copy
    let final_path = layout.journal_path(g);
    let tmp_path = fsutil::tmp_path(&final_path);
    let _ = fs::remove_file(&tmp_path);
    let mut tmp_guard = TempFile(Some(tmp_path.clone()));
    let tmp = fsutil::create_private(&tmp_path)?;
    let header = Header { generation: next, base: Base::Snapshot(pos.version) };
    tmp.write_all_at(&header.encode(), 0).map_err(StoreError::io("write", &tmp_path))?;
    let src = File::open(&plan.journal).map_err(StoreError::io("open journal", &plan.journal))?;
    let mut copied_to = plan.fold_end;
    let mut buf = vec![0u8; Throttle::STEP as usize];
    let mut unthrottled = Throttle::unlimited();
    for round in 0..PRECOPY_ROUNDS {
        let end = lock(writer).journal_len();
        if round > 0 && end - copied_to < PRECOPY_DONE {
            break;
        }
        // Rounds after the first two are small; paced, they could fall behind db_write.
        let t = if round < 2 { &mut *throttle } else { &mut unthrottled };
        set("pre-copy", copied_to - plan.fold_end, end - plan.fold_end);
        while copied_to < end {
            let n = ((end - copied_to) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], copied_to).map_err(StoreError::io("read journal", &plan.journal))?;
            tmp.write_all_at(&buf[..n], journal::HEADER_LEN + copied_to - plan.fold_end)
                .map_err(StoreError::io("write", &tmp_path))?;
            copied_to += n as u64;
            tmp.sync_data().map_err(StoreError::io("fsync", &tmp_path))?;
            t.charge(n as u64);
        }
    }
    pause_point("pre-copy", log);

    // 5. switch
    set("switch", 0, 0);
    let next_gen = NextGeneration {
        header,
        tmp,
        tmp_path: tmp_path.clone(),
        final_path: final_path.clone(),
        fold_end: plan.fold_end,
        copied_to,
        truncations: plan.truncations,
        records_folded: folded,
    };
    let hold = {
        let mut w = lock(writer);
        let t = Instant::now();
        w.switch_to(next_gen)?;
        t.elapsed()
    };
    tmp_guard.0 = None;
    std::mem::forget(snap_guard); // the snapshot is part of the backup now
    pause_point("switch", log);

    // 6. the old generation goes
    let old_bytes = std::iter::once(&plan.journal)
        .chain(&plan.snapshot)
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut freed = 0;
    set("cleanup", 0, old_bytes);
    let mut remove = |p: &PathBuf| {
        fsutil::remove_gradually(p, throttle, &mut |n| {
            freed += n;
            set("cleanup", freed, old_bytes);
        })
    };
    remove(&plan.journal)?;
    pause_point("cleanup", log); // a crash here leaves the old snapshot for the next start
    if let Some(p) = &plan.snapshot {
        remove(p)?;
    }
    fsutil::fsync_dir(&layout.root)?;
    let after_journal = lock(writer).journal_len();
    Ok(Outcome::Done(Stats {
        generation: next,
        snapshot_version: pos.version,
        before_bytes: snap_len + journal_len,
        after_bytes: snap.compressed_len + snapshot::HEADER_LEN + after_journal,
        records_folded: folded,
        seconds: started.elapsed().as_secs_f64(),
        switch_hold_us: hold.as_micros() as u64,
    }))
}

/// Runs one compaction and keeps `status` up to date; the caller has called
/// `Status::begin`. Returns the outcome's message.
pub fn run_tracked(
    writer: &Mutex<Writer>,
    status: &Mutex<Status>,
    log: &dyn Fn(&str),
    throttle: &mut Throttle,
) -> std::result::Result<Outcome, String> {
    let r = compact(writer, status, log, throttle);
    let mut s = lock(status);
    s.state = "idle";
    s.phase = None;
    match r {
        Ok(Outcome::Done(stats)) => {
            s.runs += 1;
            s.last = Some(stats.clone());
            s.last_error = None;
            Ok(Outcome::Done(stats))
        }
        Ok(o) => Ok(o),
        Err(e) => {
            let m = e.explain();
            s.last_error = Some(m.clone());
            Err(m)
        }
    }
}
