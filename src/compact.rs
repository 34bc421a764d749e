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
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::apply::{finish_db, open_build_db, sql_err, Applier};
use crate::error::{Result, StoreError};
use crate::fsutil::{self, Stepped, Throttle};
use crate::journal::{self, Base, Header, JournalReader, Kind, Payloads};
use crate::keys::KeyError;
use crate::layout::GenName;
use crate::meta::key_err;
use crate::seal::Sealer;
use crate::snapshot;
use crate::versions::Position;
use crate::writer::{check_chain, NextGeneration, Plan, Writer};

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

/// Builds the database of `plan`'s snapshot plus its records up to `fold_end` into `build`
/// (a new file), paced by `throttle`. Returns the version reached and the records folded.
fn build_db(
    plan: &Plan,
    build: &Path,
    sealer: Option<&Sealer>,
    throttle: &mut Throttle,
    progress: &mut dyn FnMut(u64),
) -> Result<(Position, u64)> {
    let snap_len = match &plan.snapshot {
        Some(p) => fs::metadata(p).map_err(StoreError::io("stat", p))?.len(),
        None => 0,
    };
    let _ = fs::remove_file(build);
    let db = fsutil::create_private(build)?;
    if let Some(p) = &plan.snapshot {
        let mut f = File::open(p).map_err(StoreError::io("open snapshot", p))?;
        let mut out = BufWriter::with_capacity(1 << 20, Stepped::paced(&db, 0, throttle));
        let h = snapshot::extract(p, &mut f, &mut out, &mut *progress, sealer)?;
        std::io::Write::flush(&mut out).map_err(StoreError::io("write", build))?;
        check_snapshot_matches(p, &h, plan.sealed)?;
    }
    // SQLite's writes to the build database reach the disk in paced steps too: each step
    // is charged what was read from the journal or what the file grew, whichever is more.
    let mut build_len = db.metadata().map_err(StoreError::io("stat", build))?.len();
    let mut pace = |read: u64, throttle: &mut Throttle| -> Result<()> {
        db.sync_data().map_err(StoreError::io("fsync", build))?;
        let len = db.metadata().map_err(StoreError::io("stat", build))?.len();
        throttle.charge(read.max(len.saturating_sub(build_len)));
        build_len = len;
        Ok(())
    };
    let payloads = match sealer {
        Some(s) => Payloads::Sealed { sealer: s, generation: plan.generation },
        None => Payloads::Plain,
    };
    let mut unpaced = 0u64;
    let conn = open_build_db(build)?;
    let mut reader = JournalReader::open(&plan.journal)?;
    reader.limit(plan.fold_end);
    let mut pos = Position { version: plan.base.version(), droppable: false };
    let mut applier = Applier::new(&conn);
    let mut folded = 0u64;
    while let Some(mut rec) = reader.next_record()? {
        check_chain(&plan.journal, pos, &rec)?;
        let (kind, offset, version, end) = (rec.kind, rec.offset, rec.data_version, rec.end());
        let plain = rec.plaintext(&plan.journal, payloads)?;
        let stmts = journal::decode_statements(plain).map_err(|what| StoreError::Damaged {
            path: plan.journal.clone(),
            offset,
            what,
        })?;
        applier.apply(kind, &stmts).map_err(|e| StoreError::Apply {
            path: plan.journal.clone(),
            offset,
            version,
            what: e.to_string(),
        })?;
        if kind == Kind::Transaction {
            pos = Position { version, droppable: true };
        }
        folded += 1;
        unpaced += end - offset;
        if unpaced >= Throttle::STEP {
            pace(unpaced, throttle)?;
            unpaced = 0;
        }
        if folded.is_multiple_of(256) {
            progress(snap_len + end);
        }
    }
    if reader.position() != plan.fold_end {
        return Err(StoreError::Damaged {
            path: plan.journal.clone(),
            offset: reader.position(),
            what: "the journal ends before the record the compaction planned to keep".into(),
        });
    }
    applier.commit().map_err(sql_err(build))?;
    pace(unpaced, throttle)?;
    finish_db(&conn, build, pos.version)?;
    conn.close().map_err(|(_, e)| sql_err(build)(e))?;
    pace(0, throttle)?;
    Ok((pos, folded))
}

/// A sealed journal's snapshot must be sealed too, and a plaintext one's plaintext: a
/// plaintext snapshot slipped into a sealed backup is refused, not restored.
pub fn check_snapshot_matches(path: &Path, h: &snapshot::SnapshotHeader, journal_sealed: bool) -> Result<()> {
    if h.sealed != journal_sealed {
        return Err(StoreError::Damaged {
            path: path.into(),
            offset: 0,
            what: format!(
                "the snapshot is {}, its journal {}",
                if h.sealed { "sealed" } else { "plaintext" },
                if journal_sealed { "sealed" } else { "plaintext" }
            ),
        });
    }
    Ok(())
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
        let mut w = lock(writer);
        // A sealed backup whose key is not read yet (offline, or before the first write):
        // read it now, or say where it was looked for.
        if w.is_sealed() {
            w.sealer()?;
        }
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
    if plan.sealed && plan.sealer.is_none() {
        return Err(key_err(&layout.root)(KeyError::Missing {
            looked: vec!["(the plugin has not read the key yet)".into()],
        }));
    }
    let sealer = plan.sealer.as_deref().filter(|_| plan.sealed);

    // 2. build
    let next = plan.generation + 1;
    let build = layout.root.join(format!("compact-{next:016x}.build.tmp"));
    let build_guard = TempFile(Some(build.clone()));
    let (pos, folded) = build_db(&plan, &build, sealer, throttle, &mut |n| set("build", n, total))?;
    pause_point("build", log);

    // 3. snapshot
    set("snapshot", 0, 0);
    let g = GenName { generation: next, base_version: pos.version };
    let snap_path = layout.snapshot_path(g);
    let _ = fs::remove_file(&snap_path); // a leftover of an earlier, interrupted try
    let snap_guard = TempFile(Some(snap_path.clone()));
    let snap = snapshot::write(&snap_path, next, pos.version, &build, throttle, sealer)?;
    fsutil::remove_gradually(&build, throttle, &mut |_| {})?;
    drop(build_guard);
    pause_point("snapshot", log);

    // 4. pre-copy
    let final_path = layout.journal_path(g);
    let tmp_path = fsutil::tmp_path(&final_path);
    let _ = fs::remove_file(&tmp_path);
    let mut tmp_guard = TempFile(Some(tmp_path.clone()));
    let tmp = fsutil::create_private(&tmp_path)?;
    let header = Header { generation: next, base: Base::Snapshot(pos.version), sealed: plan.sealed };
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
            let mut n = ((end - copied_to) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], copied_to).map_err(StoreError::io("read journal", &plan.journal))?;
            let at = journal::HEADER_LEN + copied_to - plan.fold_end;
            if let Some(s) = sealer {
                // Sealed records are bound to generation and offset: reseal whole ones.
                n = journal::whole_records_len(&buf[..n]);
                if n == 0 {
                    // One record longer than the buffer: read it whole.
                    let mut h = [0u8; journal::RECORD_HEADER_LEN];
                    src.read_exact_at(&mut h, copied_to).map_err(StoreError::io("read journal", &plan.journal))?;
                    buf.resize(journal::framed_len(&h) as usize, 0);
                    continue;
                }
                let from = Payloads::Sealed { sealer: s, generation: plan.generation };
                let to = Payloads::Sealed { sealer: s, generation: next };
                let sealed = journal::transcode(&plan.journal, &buf[..n], copied_to, from, at, to)?;
                tmp.write_all_at(&sealed, at).map_err(StoreError::io("write", &tmp_path))?;
            } else {
                tmp.write_all_at(&buf[..n], at).map_err(StoreError::io("write", &tmp_path))?;
            }
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

/// Converts the plaintext backup `writer` holds (offline: nothing else writes it) into a
/// sealed one by writing a new generation: everything before the last transaction in a
/// sealed snapshot, the rest sealed in its journal. The commit point is the new journal
/// appearing (as in compaction); the old generation is removed after. The caller has
/// recorded the sealed metadata (backup.json) first, with `sealer`'s backup id.
pub fn seal_offline(writer: Writer, sealer: &Sealer, progress: &mut dyn FnMut(u64)) -> Result<Stats> {
    let started = Instant::now();
    let plan = writer.plan_all();
    let layout = writer.layout().clone();
    let journal_len = writer.journal_len();
    if plan.sealed {
        return Err(StoreError::Invalid { path: layout.root.clone(), what: "the backup is sealed already".into() });
    }
    let next = plan.generation + 1;
    let mut throttle = Throttle::unlimited();
    let snap_len = plan.snapshot.as_ref().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len());
    let (header, snap, folded, version) = if plan.snapshot.is_none() && plan.fold_end == journal::HEADER_LEN {
        (Header { generation: next, base: Base::Empty, sealed: true }, None, 0, 0)
    } else {
        let build = layout.root.join(format!("encrypt-{next:016x}.build.tmp"));
        let build_guard = TempFile(Some(build.clone()));
        let (pos, folded) = build_db(&plan, &build, None, &mut throttle, progress)?;
        let g = GenName { generation: next, base_version: pos.version };
        let snap_path = layout.snapshot_path(g);
        let _ = fs::remove_file(&snap_path);
        snapshot::write(&snap_path, next, pos.version, &build, &mut throttle, Some(sealer))?;
        drop(build_guard);
        (
            Header { generation: next, base: Base::Snapshot(pos.version), sealed: true },
            Some(snap_path),
            folded,
            pos.version,
        )
    };
    let snap_guard = TempFile(snap.clone());
    let g = GenName { generation: next, base_version: header.base.version() };
    let mut tail = vec![0u8; (journal_len - plan.fold_end) as usize];
    File::open(&plan.journal)
        .and_then(|f| f.read_exact_at(&mut tail, plan.fold_end))
        .map_err(StoreError::io("read journal", &plan.journal))?;
    let to = Payloads::Sealed { sealer, generation: next };
    let tail = journal::transcode(&plan.journal, &tail, plan.fold_end, Payloads::Plain, journal::HEADER_LEN, to)?;
    crate::writer::write_journal(&layout.journal_path(g), &header, &tail)?;
    std::mem::forget(snap_guard); // part of the backup now
    drop(writer);
    for p in std::iter::once(&plan.journal).chain(&plan.snapshot) {
        fs::remove_file(p).map_err(StoreError::io("remove old generation", p))?;
    }
    fsutil::fsync_dir(&layout.root)?;
    let after = snap.as_ref().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len())
        + fs::metadata(layout.journal_path(g)).map_or(0, |m| m.len());
    Ok(Stats {
        generation: next,
        snapshot_version: version,
        before_bytes: snap_len + journal_len,
        after_bytes: after,
        records_folded: folded,
        seconds: started.elapsed().as_secs_f64(),
        switch_hold_us: 0,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Key, KeySource};
    use crate::meta::Meta;

    fn tx(v: u32, stmts: &[&str]) -> Vec<String> {
        let mut w: Vec<String> = stmts.iter().map(|s| s.to_string()).collect();
        w.push(format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v - 1));
        w
    }

    #[test]
    fn sealed_compaction_reseals_a_tail_record_larger_than_a_copy_step() {
        let d = tempfile::tempdir().unwrap();
        let (root, ldir) = (d.path().join("b.bkp"), d.path().join("ln"));
        std::fs::create_dir(&ldir).unwrap();
        std::fs::write(ldir.join("hsm_secret"), [3u8; 32]).unwrap();
        let meta = Meta::new_sealed(None, None, Some(ldir.clone())).unwrap();
        crate::writer::create(&root, None, Some(&meta), None).unwrap();
        let (mut w, _) = Writer::open(&root, &KeySource::lightning_dir(&ldir)).unwrap();
        w.apply(
            1,
            &tx(
                1,
                &[
                    "CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER, PRIMARY KEY (name))",
                    "INSERT INTO vars VALUES ('data_version', NULL, 0)",
                    "CREATE TABLE t (x)",
                ],
            ),
        )
        .unwrap();
        let big = format!("INSERT INTO t VALUES ('{}')", "z".repeat((4 << 20) + 1000));
        assert!(big.len() as u64 > Throttle::STEP);
        w.apply(2, &tx(2, &[&big])).unwrap();
        let writer = Mutex::new(w);
        let status = Mutex::new(Status::idle());
        let out = compact(&writer, &status, &|_| {}, &mut Throttle::unlimited()).unwrap();
        assert!(matches!(out, Outcome::Done(ref s) if s.records_folded == 1), "{out:?}");
        // the end is named by the resealed record, as a copy read from the file names it
        let last_in_file = || {
            let path = crate::layout::Layout::new(&root).list().unwrap().journal;
            let mut r = crate::journal::JournalReader::open(&path).unwrap();
            let mut tail = 0;
            while let Some(rec) = r.next_record().unwrap() {
                tail = rec.header_crc();
            }
            tail
        };
        assert_eq!(lock(&writer).tail(), last_in_file());
        lock(&writer).apply(3, &tx(3, &["INSERT INTO t VALUES ('after')"])).unwrap();
        assert_eq!(lock(&writer).tail(), last_in_file());
        drop(writer);
        let bytes: Vec<u8> =
            std::fs::read_dir(&root).unwrap().flat_map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
        assert!(!bytes.windows(8).any(|x| x == b"zzzzzzzz"), "plaintext in the sealed backup");
        let dest = d.path().join("r.sqlite3");
        let (_, sum) = crate::restore::restore(&root, &dest, &mut |_, _| {}).unwrap();
        assert_eq!((sum.version, sum.records), (3, 2));
        let c = rusqlite::Connection::open(&dest).unwrap();
        let n: i64 = c.query_row("SELECT SUM(LENGTH(x)) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, (4 << 20) + 1000 + 5);
        // the key was read at the first write and recorded by its fingerprint
        let k = Key::from_bytes(crate::keys::makesecret(&[3u8; 32], crate::keys::LABEL), "t");
        assert_eq!(Meta::load(&root).unwrap().unwrap().key_fingerprint, Some(k.fingerprint()));
    }
}
