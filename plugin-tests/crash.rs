//! Crashes and halts: SIGKILL anywhere, lightningd dying between hook and commit, lost
//! state, gaps, a second writer, a full disk.

use std::path::Path;
use std::time::Duration;

use crate::common::*;
use cln_backup::journal::Kind;
use cln_backup::sim::{Answer, Node};

/// What lightningd does after a crash: its in-flight transaction is rolled back, it starts
/// again and starts the plugin again.
fn restart_after_crash(node: &mut Node) {
    if let Some(p) = node.plugin.take() {
        p.kill().unwrap();
    }
    // A transaction whose hook was in flight was never committed.
    if !node.db.is_autocommit() {
        node.db.execute_batch("ROLLBACK").unwrap();
    }
    node.start().unwrap();
}

#[test]
fn sigkill_at_random_points_then_restart() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    let mut rng = Rng(0x5eed_c1b4_0001);
    let mut kills = 0;
    let mut i = 0;
    while i < trace.len() {
        node.start_if_needed(trace, i).unwrap();
        if rng.below(40) == 0 {
            // Kill while the plugin works on this call: before, during or after its write.
            let r = &trace[i];
            let tx = r.kind() == Kind::Transaction;
            if !node.initialized && !r.before_init {
                node.init().unwrap();
            }
            if tx {
                node.db.execute_batch("BEGIN").unwrap();
            }
            for w in &r.writes {
                node.db.execute_batch(w).unwrap();
            }
            node.plugin().unwrap().send_db_write(r.data_version, &r.writes).unwrap();
            std::thread::sleep(Duration::from_micros(rng.below(400)));
            restart_after_crash(&mut node);
            kills += 1;
            continue; // lightningd sends the same call again
        }
        let a = node.step(&trace[i]).unwrap();
        assert_eq!(a, Answer::Continue, "call {i}");
        i += 1;
    }
    assert!(kills >= 10, "only {kills} kills");
    node.stop().unwrap();
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &node.db_path());
    assert_same(&restored, &final_db("channels", s.tmp.path()));
}

#[test]
fn lightningd_dies_between_hook_and_commit() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    let mut replaced = 0;
    for k in [5usize, 300, 301, 800] {
        let start = if k == 5 { 0 } else { node.data_version().unwrap() as usize + 2 };
        node.replay(trace, start..k).unwrap();
        // hook answered continue, then lightningd dies before COMMIT
        let r = &trace[k];
        assert_eq!(r.kind(), Kind::Transaction);
        assert_eq!(node.step_then_die(r).unwrap(), Answer::Continue);
        node.plugin.take().unwrap().close().unwrap();
        // on restart it sends the same data_version again
        node.start().unwrap();
        assert_eq!(node.step(r).unwrap(), Answer::Continue);
        assert!(node.plugin().unwrap().has_log("Last changes not applied"));
        replaced += 1;
    }
    let at = node.data_version().unwrap() as usize + 2;
    assert_eq!(node.replay(trace, at..trace.len()).unwrap(), None);
    node.stop().unwrap();
    assert_eq!(replaced, 4);
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &node.db_path());
    assert_same(&restored, &final_db("channels", s.tmp.path()));
}

#[test]
fn after_a_crash_lightningd_may_send_a_different_batch_at_the_same_version() {
    let s = Setup::new();
    let trace = trace("small");
    let mut node = s.node();
    node.replay(trace, 0..30).unwrap();
    let r = &trace[30];
    assert_eq!(node.step_then_die(r).unwrap(), Answer::Continue);
    restart_after_crash(&mut node);
    let mut other = r.clone();
    other.writes.insert(0, "INSERT INTO vars (name, val) VALUES ('after-crash', 'x')".into());
    assert_eq!(node.step(&other).unwrap(), Answer::Continue);
    node.stop().unwrap();
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &node.db_path());
}

fn assert_halted(node: &mut Node, i: usize, rec: &cln_backup::sim::TraceRecord, phrase: &str) {
    let before = node.data_version().unwrap();
    match node.step(rec).unwrap() {
        Answer::Halt(v) => assert!(v.to_string().contains(phrase), "call {i}: {v}"),
        Answer::Continue => panic!("call {i} was not refused"),
    }
    assert_eq!(node.data_version().unwrap(), before, "a refused call must not be committed");
    let logs = node.plugin().unwrap().logs();
    assert!(logs.iter().any(|(l, m)| l == "warn" && m.contains(phrase)), "{logs:?}");
    // halting is final for the process
    assert!(matches!(node.step(rec).unwrap(), Answer::Halt(_)));
}

#[test]
fn node_restored_from_an_old_copy_lost_state_halts() {
    let s = Setup::new();
    let trace = trace("small");
    let mut node = s.node();
    node.replay(trace, 0..40).unwrap();
    node.stop().unwrap();
    let old = s.tmp.path().join("old.sqlite3");
    std::fs::copy(node.db_path(), &old).unwrap();
    node.replay(trace, 40..60).unwrap();
    node.stop().unwrap();
    drop(node);
    std::fs::copy(&old, s.ldir.join("lightningd.sqlite3")).unwrap();
    let mut node = s.node();
    node.start().unwrap();
    assert_halted(&mut node, 40, &trace[40], "lost some state");
}

#[test]
fn node_ahead_of_the_backup_halts_out_of_date() {
    let s = Setup::new();
    let trace = trace("small");
    let mut node = s.node();
    node.replay(trace, 0..40).unwrap();
    node.stop().unwrap();
    // the node runs without the plugin for a while
    for r in &trace[40..45] {
        node.run_without_plugin(r).unwrap();
    }
    node.start().unwrap();
    assert_halted(&mut node, 45, &trace[45], "Backup is out of date");
}

#[test]
fn a_second_writer_is_refused() {
    let s = Setup::new();
    let trace = trace("small");
    let mut a = s.node();
    a.replay(trace, 0..10).unwrap();
    // a second lightning dir pointing at the same backup
    let ldir2 = s.tmp.path().join("other");
    std::fs::create_dir(&ldir2).unwrap();
    std::fs::copy(s.ldir.join("backup.lock"), ldir2.join("backup.lock")).unwrap();
    std::fs::copy(a.db_path(), ldir2.join("lightningd.sqlite3")).unwrap();
    let mut b = Node::new(Path::new(BIN), &ldir2).unwrap();
    b.start().unwrap();
    assert_halted(&mut b, 10, &trace[10], "in use by another writer");
    // the first keeps going
    assert_eq!(a.replay(trace, 10..trace.len()).unwrap(), None);
    a.stop().unwrap();
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &a.db_path());
}

/// A real full disk: the backup on a small tmpfs. Needs root to mount it, as .ci/run has.
#[test]
fn full_disk_halts_and_everything_acknowledged_restores() {
    let disk = SmallDisk::mount("1m");
    let s = Setup::at(tempfile::tempdir().unwrap(), Some(disk.path().join("node.bkp")));
    let trace = trace("channels");
    let mut node = s.node();
    let (i, v) = node.replay(trace, 0..trace.len()).unwrap().expect("a 1 MB disk must fill up");
    assert!(v.to_string().contains("disk is full"), "{v}");
    let logs = node.plugin().unwrap().logs();
    assert!(logs.iter().any(|(l, m)| l == "warn" && m.contains("No space left") && m.contains("node.bkp")), "{logs:?}");
    node.plugin.take().unwrap().close().unwrap();
    if !node.db.is_autocommit() {
        node.db.execute_batch("ROLLBACK").unwrap();
    }
    assert!(i > 10);
    // everything that was acknowledged (and so committed) is in the backup
    let dest = s.tmp.path().join("r.sqlite3");
    let (_, sum) = cln_backup::restore::restore(&s.root, &dest, &mut |_, _| {}).unwrap();
    assert_eq!(sum.version, node.data_version().unwrap());
    assert_same(&dest, &node.db_path());
    // with space again, the node goes on where it stopped
    let big = s.tmp.path().join("big.bkp");
    let o = std::process::Command::new("cp").arg("-a").arg(&s.root).arg(&big).status().unwrap();
    assert!(o.success());
    std::fs::write(s.ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&big))).unwrap();
    node.start().unwrap();
    assert_eq!(node.replay(trace, i..trace.len()).unwrap(), None);
    node.stop().unwrap();
    let dest2 = s.tmp.path().join("r2.sqlite3");
    cln_backup::restore::restore(&big, &dest2, &mut |_, _| {}).unwrap();
    assert_same(&dest2, &final_db("channels", s.tmp.path()));
}
