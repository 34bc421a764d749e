//! Real traces, replayed in lightningd's order, restored, compared row by row.

use serde_json::json;

use crate::common::*;
use cln_backup::sim::Answer;

fn replay_and_compare(name: &str) {
    let s = Setup::new();
    let mut node = s.node();
    let trace = trace(name);
    assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
    let p = node.plugin().unwrap();
    assert!(p.has_log("Versions match up"));
    // passthrough from lightning-cli, composite string id echoed
    let st = p.cli("backup-status", json!({})).unwrap();
    let last_tx = trace.iter().rev().find(|r| r.kind() == cln_backup::journal::Kind::Transaction).unwrap();
    assert_eq!(st["latest_version"], last_tx.data_version);
    assert_eq!(st["state"], "ok");
    assert_eq!(st["backend"], "file");
    assert_eq!(st["destination"], url(&s.root));
    assert!(st["hooks"]["count"].as_u64().unwrap() > 0);
    assert!(st["hooks"]["p99_us"].as_u64().unwrap() >= st["hooks"]["p50_us"].as_u64().unwrap());
    assert!(st["last_write"].as_str().unwrap().ends_with('Z'));
    assert!(st["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(st["compaction"]["state"], "idle");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    node.stop().unwrap();
    let restored = s.restore("restored.sqlite3");
    let (tables, rows) = assert_same(&restored, &node.db_path());
    assert!(tables > 30 && rows > 50, "{tables} tables {rows} rows");
    assert_same(&restored, &final_db(name, s.tmp.path()));
    // a plain database: no sidecar next to it
    assert!(!s.tmp.path().join("restored.sqlite3-wal").exists());
    assert!(!s.tmp.path().join("restored.sqlite3-journal").exists());
}

#[test]
fn replay_small_trace_restores_every_row() {
    replay_and_compare("small");
}

#[test]
fn replay_channels_trace_restores_every_row() {
    replay_and_compare("channels");
}

#[test]
fn restore_to_a_directory_and_verify() {
    let s = Setup::new();
    let mut node = s.node();
    let trace = trace("small");
    node.replay(trace, 0..trace.len()).unwrap();
    node.stop().unwrap();
    let dir = s.tmp.path().join("restore-dir");
    std::fs::create_dir(&dir).unwrap();
    let o = cli(&["restore", &url(&s.root), dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dir.join("lightningd.sqlite3"), &node.db_path());
    let o = cli(&["verify", &url(&s.root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Verified data_version 79"), "{}", stdout(&o));
}

#[test]
fn init_from_an_existing_node_then_continue() {
    // A node that ran half the trace without any backup...
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let trace = trace("channels");
    let half = 600;
    // lightningd left its latest pages in the -wal file (it crashed, or runs in WAL mode):
    // the connection stays open and never checkpoints, so they are only there.
    let node = cln_backup::sim::Node::new(std::path::Path::new(BIN), &ldir).unwrap();
    node.db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;").unwrap();
    for r in &trace[..half] {
        node.run_without_plugin(r).unwrap();
    }
    assert!(std::fs::metadata(ldir.join("lightningd.sqlite3-wal")).unwrap().len() > 100_000);
    let root = tmp.path().join("node.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Found an existing database"), "{out}");
    assert!(out.contains("Successfully written initial snapshot"), "{out}");
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["backend_url"], url(&root));
    drop(node);
    let s = Setup { tmp, ldir, root };
    let mut node = s.node();
    node.start().unwrap();
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    assert!(node.plugin().unwrap().has_log("Versions match up"));
    let st = node.plugin().unwrap().cli("backup-status", json!({})).unwrap();
    assert_eq!(st["snapshot_version"], trace[half - 1].data_version);
    node.stop().unwrap();
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &node.db_path());
    assert_same(&restored, &final_db("channels", s.tmp.path()));
}

#[test]
fn restore_while_the_plugin_writes_gives_a_consistent_prefix() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    // a first part, so the backup is never empty
    node.replay(trace, 0..50).unwrap();
    let root = s.root.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let tmpdir = s.tmp.path().to_path_buf();
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        let mut versions = vec![];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) || n < 3 {
            let dest = tmpdir.join(format!("live-{n}.sqlite3"));
            let (_, sum) = cln_backup::restore::restore(&root, &dest, &mut |_, _| {}).unwrap();
            cln_backup::restore::verify(&root, &mut |_, _| {}).unwrap();
            versions.push((dest, sum.records));
            n += 1;
        }
        versions
    });
    assert_eq!(node.replay(trace, 50..trace.len()).unwrap(), None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let restores = reader.join().unwrap();
    node.stop().unwrap();
    assert!(restores.len() >= 3);
    // each live restore equals the trace's first `records` calls applied in order
    for (dest, records) in restores.iter().step_by((restores.len() / 4).max(1)) {
        let reference = s.tmp.path().join(format!("ref-{records}.sqlite3"));
        let conn = rusqlite::Connection::open(&reference).unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        let mut a = cln_backup::restore::Applier::new(&conn);
        for r in &trace[..*records as usize] {
            a.apply(r.kind(), &r.writes).unwrap();
        }
        a.commit().unwrap();
        drop(conn);
        assert_same(dest, &reference);
    }
}

#[test]
fn status_is_served_before_init_and_halted_state_is_reported() {
    let s = Setup::new();
    std::fs::remove_file(s.ldir.join("backup.lock")).unwrap();
    let mut node = s.node();
    node.start().unwrap();
    let p = node.plugin().unwrap();
    let st = p.cli("backup-status", json!([])).unwrap();
    assert_eq!(st["state"], "halted");
    assert!(st["halt_reason"].as_str().unwrap().contains("Could not find backup.lock in the lightning-dir"));
    let t = &trace("small")[0];
    match node.step(t).unwrap() {
        Answer::Halt(v) => assert!(v.to_string().contains("backup-cli init --lightning-dir"), "{v}"),
        a => panic!("expected a halt, got {a:?}"),
    }
    // lightningd did not commit it
    assert!(node.db.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).unwrap() == 0);
    let logs = node.plugin().unwrap().logs();
    assert!(logs.iter().any(|(l, m)| l == "warn" && m.contains("Could not find backup.lock")), "{logs:?}");
    assert!(!logs.iter().any(|(l, _)| l == "error"), "halts are not BROKEN: {logs:?}");
    let said = logs.iter().filter(|(_, m)| m.contains("Could not find backup.lock")).count();
    assert_eq!(said, 1, "said once: {logs:?}");
}
