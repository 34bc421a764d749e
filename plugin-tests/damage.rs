//! A damaged backup: torn tails are cut and forgotten, damage before the tail is refused
//! with its offset, and a failed restore leaves nothing behind.

use std::path::{Path, PathBuf};

use crate::common::*;
use cln_backup::journal::JournalReader;
use cln_backup::layout::Layout;
use cln_backup::sim::Answer;

/// A backup of the whole small trace; returns (setup, node db copy, journal, last record's offset).
fn small_backup() -> (Setup, PathBuf, PathBuf, u64) {
    let s = Setup::new();
    let trace = trace("small");
    let mut node = s.node();
    node.replay(trace, 0..trace.len()).unwrap();
    node.stop().unwrap();
    let journal = Layout::new(&s.root).list().unwrap().journal;
    let mut r = JournalReader::open(&journal).unwrap();
    let mut last = 0;
    while let Some(rec) = r.next_record().unwrap() {
        last = rec.offset;
    }
    // The writer keeps zero-filled room after its data; these tests cut and flip the data.
    let (data_end, physical) = (r.position(), std::fs::metadata(&journal).unwrap().len());
    assert!(r.torn_tail.is_none() && physical > data_end, "journal not preallocated: {physical} <= {data_end}");
    let padding = std::fs::read(&journal).unwrap().split_off(data_end as usize);
    assert!(padding.iter().all(|&b| b == 0), "the room after the data is not zero-filled");
    std::fs::OpenOptions::new().write(true).open(&journal).unwrap().set_len(data_end).unwrap();
    let db = s.tmp.path().join("node-final.sqlite3");
    std::fs::copy(node.db_path(), &db).unwrap();
    (s, db, journal, last)
}

fn copy_dir(from: &Path, to: &Path) {
    assert!(std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
}

#[test]
fn journal_truncated_at_every_offset_of_its_last_record() {
    let (s, _db, journal, last) = small_backup();
    let full = std::fs::read(&journal).unwrap();
    let trace = trace("small");
    let prev_version = trace[trace.len() - 2].data_version;
    for cut in last..full.len() as u64 {
        std::fs::write(&journal, &full[..cut as usize]).unwrap();
        let sum = cln_backup::restore::verify(&s.root, &mut |_, _| {}).unwrap();
        assert_eq!(sum.version, prev_version, "cut at {cut}");
        assert_eq!(sum.torn_tail.is_some(), cut > last, "cut at {cut}");
        if (cut - last) % 23 == 0 || cut == full.len() as u64 - 1 {
            let dest = s.tmp.path().join(format!("cut-{cut}.sqlite3"));
            let (_, r) = cln_backup::restore::restore(&s.root, &dest, &mut |_, _| {}).unwrap();
            assert_eq!(r.version, prev_version);
        }
    }
    // The plugin opening such a journal cuts the torn record, says so, and takes the call again.
    let cut = last + (full.len() as u64 - last) / 2;
    for cut in [last + 1, cut, full.len() as u64 - 1] {
        let work = s.tmp.path().join(format!("work-{cut}"));
        copy_dir(&s.root, &work);
        let wj = work.join(journal.file_name().unwrap());
        std::fs::write(&wj, &full[..cut as usize]).unwrap();
        let ldir = s.tmp.path().join(format!("ldir-{cut}"));
        std::fs::create_dir(&ldir).unwrap();
        std::fs::write(ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&work))).unwrap();
        let mut p = cln_backup::sim::PluginProc::spawn(Path::new(BIN), &ldir, &[]).unwrap();
        p.getmanifest().unwrap();
        let rec = &trace[trace.len() - 1];
        assert_eq!(p.db_write(rec.data_version, &rec.writes).unwrap(), Answer::Continue);
        assert!(p.has_log("Cut a torn record"), "{:?}", p.logs());
        p.close().unwrap();
        let now = std::fs::read(&wj).unwrap();
        // The record is sealed anew (a fresh nonce): its length matches, and all before it;
        // zero-filled room follows.
        assert!(
            now.len() > full.len()
                && now[..last as usize] == full[..last as usize]
                && now[full.len()..].iter().all(|&b| b == 0)
                && cln_backup::restore::verify(&work, &mut |_, _| {}).unwrap().version == rec.data_version,
            "cut at {cut}: the journal is not whole again ({} bytes, want {})",
            now.len(),
            full.len()
        );
    }
}

#[test]
fn flipped_byte_mid_journal_is_refused_and_leaves_no_file() {
    let (s, _db, journal, _last) = small_backup();
    let mut bytes = std::fs::read(&journal).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&journal, &bytes).unwrap();
    let dest = s.tmp.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    let o = cli(&["restore", &url(&s.root), dest.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("damaged data at offset"), "{err}");
    assert!(err.contains(journal.file_name().unwrap().to_str().unwrap()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0, "restore left a file behind");
    let o = cli(&["verify", &url(&s.root)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("damaged data at offset"));
    // the plugin refuses to write after damage
    let mut node = s.node();
    node.start().unwrap();
    let rec = &trace("small")[0];
    match node.plugin().unwrap().db_write(rec.data_version, &rec.writes).unwrap() {
        Answer::Halt(v) => assert!(v.to_string().contains("damaged data at offset"), "{v}"),
        a => panic!("{a:?}"),
    }
}

#[test]
fn damaged_snapshot_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    let db = ldir.join("lightningd.sqlite3");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER, blobval BLOB, PRIMARY KEY (name));
         INSERT INTO vars VALUES ('data_version', NULL, 42, NULL);
         CREATE TABLE t (x); INSERT INTO t SELECT value FROM generate_series(1, 5000);",
    )
    .ok();
    // generate_series may be missing; fill rows another way
    conn.execute_batch(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 5000) INSERT INTO t SELECT x FROM c",
    )
    .unwrap();
    drop(conn);
    std::fs::write(ldir.join("hsm_secret"), [7u8; 32]).unwrap();
    let root = tmp.path().join("b.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = Layout::new(&root).list().unwrap();
    let snap = listing.snapshot.unwrap();
    let good = std::fs::read(&snap).unwrap();
    let o = cli(&["restore", &url(&root), tmp.path().join("ok.sqlite3").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Restored data_version 42"));
    for at in [20, 100, good.len() / 2, good.len() - 3] {
        let mut bad = good.clone();
        bad[at] ^= 0x08;
        std::fs::write(&snap, &bad).unwrap();
        let dest = tmp.path().join(format!("bad-{at}.sqlite3"));
        let o = cli(&["restore", &url(&root), dest.to_str().unwrap()]);
        assert!(!o.status.success(), "flip at {at} not noticed");
        assert!(stderr(&o).contains("damaged data"), "{}", stderr(&o));
        assert!(!dest.exists());
        assert_no_tmp_left(tmp.path());
    }
}
