//! Compaction while lightningd keeps writing, crashes in every phase, the automatic trigger,
//! the offline command, and readers across the switch.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use cln_backup::layout::Layout;
use cln_backup::sim::{Answer, Node};

/// Waits until no compaction runs and the backup reached `generation` (the plugin may have
/// been restarted meanwhile, so its own run counter is no guide).
fn wait_generation(node: &mut Node, generation: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = node.plugin().unwrap().cli("backup-status", json!({})).unwrap();
        if st["compaction"]["state"] == "idle" && st["generation"].as_u64().unwrap() >= generation {
            return st;
        }
        if st["compaction"]["state"] == "idle" && st["compaction"]["runs"] == 0 {
            // lightningd restarted meanwhile and the plugin exited at once: ask again
            node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
        }
        assert!(st["compaction"]["last_error"].is_null(), "{st}");
        assert!(Instant::now() < deadline, "compaction did not finish: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The files of a backup: exactly one journal, and at most one snapshot, of one generation.
fn assert_one_generation(root: &Path) {
    let names: Vec<String> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let journals = names.iter().filter(|n| n.ends_with(".journal")).count();
    let snapshots = names.iter().filter(|n| n.ends_with(".snapshot")).count();
    assert_eq!(journals, 1, "{names:?}");
    assert!(snapshots <= 1, "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn compactions_during_replay_with_live_readers() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    node.replay(trace, 0..150).unwrap();
    // readers restore and verify in a loop the whole time, across every switch
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (root, dir, stop2) = (s.root.clone(), s.tmp.path().to_path_buf(), stop.clone());
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let dest = dir.join(format!("live-{n}.sqlite3"));
            let (_, sum) = cln_backup::restore::restore(&root, &dest, &mut |_, _| {})
                .unwrap_or_else(|e| panic!("live restore {n}: {}", e.explain()));
            assert!(sum.version > 0);
            std::fs::remove_file(&dest).unwrap();
            cln_backup::restore::verify(&root, &mut |_, _| {}).unwrap_or_else(|e| panic!("live verify {n}: {e}"));
            n += 1;
        }
        n
    });
    let mut runs = 0;
    let mut at = 150;
    while at < trace.len() {
        let r = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
        assert_eq!(r["result"], "compaction started", "{r}");
        runs += 1;
        // hooks keep coming while it runs
        let until = (at + 120).min(trace.len());
        assert_eq!(node.replay(trace, at..until).unwrap(), None);
        at = until;
        let st = wait_generation(&mut node, runs + 1);
        assert_eq!(st["generation"], runs + 1, "{st}");
        let last = &st["compaction"]["last"];
        assert!(last["records_folded"].as_u64().unwrap() > 0, "{st}");
        // (no size check here: records that arrive during the run count only in "after")
        assert!(st["snapshot_version"].as_u64().is_some());
        // a restore after each compaction equals the committed database
        let dest = s.tmp.path().join(format!("after-{runs}.sqlite3"));
        cln_backup::restore::restore(&s.root, &dest, &mut |_, _| {}).unwrap();
        assert_same(&dest, &node.db_path());
        assert_one_generation(&s.root);
        let until = (at + 80).min(trace.len());
        node.replay(trace, at..until).unwrap();
        at = until;
    }
    assert!(runs >= 4, "only {runs} compactions");
    node.stop().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads >= 3, "{reads} live restores");
    let restored = s.restore("final.sqlite3");
    assert_same(&restored, &final_db("channels", s.tmp.path()));
    // a damaged compacted snapshot is refused
    let snap = Layout::new(&s.root).list().unwrap().snapshot.unwrap();
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&snap, &bytes).unwrap();
    let o = cli(&["restore", &url(&s.root), s.tmp.path().join("bad.sqlite3").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("damaged data"), "{}", stderr(&o));
    assert!(!s.tmp.path().join("bad.sqlite3").exists());
}

#[test]
fn sigkill_in_every_compaction_phase() {
    let trace = trace("channels");
    for phase in ["build", "snapshot", "pre-copy", "switch", "cleanup"] {
        let s = Setup::new();
        let mut node = s.node();
        let mut first = 0;
        if phase == "cleanup" {
            // a first compaction, so the old generation has a snapshot to leave behind
            node.replay(trace, 0..300).unwrap();
            node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
            wait_generation(&mut node, 2);
            node.stop().unwrap();
            first = 300;
        }
        node.env = vec![("CLN_BACKUP_TEST_PAUSE".into(), phase.into())];
        node.replay(trace, first..400).unwrap();
        let r = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
        assert_eq!(r["result"], "compaction started");
        // lightningd keeps going until the compaction reaches the phase
        node.replay(trace, 400..420).unwrap();
        wait_for_log(node.plugin().unwrap(), "info", &format!("test pause at compaction phase {phase}"));
        node.plugin.take().unwrap().kill().unwrap();
        // the backup restores to the latest acknowledged version right now
        let dest = s.tmp.path().join("now.sqlite3");
        let (_, sum) = cln_backup::restore::restore(&s.root, &dest, &mut |_, _| {}).unwrap();
        assert_eq!(sum.version, node.data_version().unwrap(), "{phase}");
        assert_same(&dest, &node.db_path());
        // the next start cleans up and says so in one line
        node.env.clear();
        node.start().unwrap();
        let removed: Vec<_> =
            node.plugin().unwrap().logs().into_iter().filter(|(_, m)| m.starts_with("Removed")).collect();
        assert_eq!(removed.len(), 1, "{phase}: {removed:?}");
        assert_eq!(node.replay(trace, 420..trace.len()).unwrap(), None, "{phase}");
        node.stop().unwrap();
        assert_one_generation(&s.root);
        let restored = s.restore("r.sqlite3");
        assert_same(&restored, &final_db("channels", s.tmp.path()));
    }
}

#[test]
fn automatic_compaction_triggers_at_its_threshold() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    node.options = json!({"backup-compact-min-journal": 1_500_000, "backup-compact-ratio": "1.0"});
    let mut first_trigger_len = None;
    for i in 0..trace.len() {
        node.start_if_needed(trace, i).unwrap();
        assert_eq!(node.step(&trace[i]).unwrap(), Answer::Continue);
        if first_trigger_len.is_none() && node.plugin().unwrap().has_log("Starting compaction: the journal holds") {
            let st = node.plugin().unwrap().cli("backup-status", json!({})).unwrap();
            first_trigger_len = Some(i);
            assert!(st["total_bytes"].as_u64().unwrap() >= 1_500_000, "{st}");
            assert!(node.plugin().unwrap().has_log("disk work paced to 33.6 MB/s by backup-compact-io-rate"));
        }
    }
    assert!(first_trigger_len.is_some(), "never triggered");
    let st = wait_generation(&mut node, 2);
    assert!(st["compaction"]["last_error"].is_null());
    node.stop().unwrap();
    let restored = s.restore("r.sqlite3");
    assert_same(&restored, &final_db("channels", s.tmp.path()));

    // switched off: never
    let s = Setup::new();
    let mut node = s.node();
    node.options = json!({"backup-autocompact": false, "backup-compact-min-journal": 1000});
    node.replay(trace, 0..300).unwrap();
    assert!(!node.plugin().unwrap().has_log("Starting compaction"));
    node.stop().unwrap();
}

/// The pace is a floor on the duration: compaction reads the whole journal, and every byte
/// read is charged, so it cannot finish sooner than journal bytes / rate.
#[test]
fn io_rate_paces_compaction() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    let rate = 2_000_000u64;
    node.options = json!({"backup-autocompact": false, "backup-compact-io-rate": rate});
    node.replay(trace, 0..trace.len()).unwrap();
    let journal = node.plugin().unwrap().cli("backup-status", json!({})).unwrap()["total_bytes"].as_u64().unwrap();
    assert!(journal > 2 * rate, "the trace is too small to see the pace: {journal} bytes");
    let r = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
    assert_eq!(r["result"], "compaction started", "{r}");
    assert!(node.plugin().unwrap().has_log("disk work paced to 2.0 MB/s"));
    // the slow cleanup shows its progress
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = node.plugin().unwrap().cli("backup-status", json!({})).unwrap()["compaction"].clone();
        if c["phase"] == "cleanup" && c["progress_bytes"].as_u64().unwrap() > 0 {
            assert!(c["progress_bytes"].as_u64() <= c["total_bytes"].as_u64(), "{c}");
            assert!(c["total_bytes"].as_u64().unwrap() >= journal / 2, "{c}");
            break;
        }
        assert!(c["state"] == "running" && Instant::now() < deadline, "cleanup progress never shown: {c}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = wait_generation(&mut node, 2);
    let secs = st["compaction"]["last"]["seconds"].as_f64().unwrap();
    assert!(secs >= (journal / rate) as f64 * 0.9, "{journal} bytes compacted in {secs} s at {rate} B/s");
    node.stop().unwrap();
    assert_same(&s.restore("r.sqlite3"), &final_db("channels", s.tmp.path()));
}

#[test]
fn compact_command_answers() {
    let s = Setup::new();
    let trace = trace("small");
    let mut node = s.node();
    node.options = json!({"backup-compact-io-rate": 0});
    node.replay(trace, 0..1).unwrap();
    let r = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
    assert_eq!(r["result"], "nothing to compact", "{r}");
    node.replay(trace, 1..trace.len()).unwrap();
    let r = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
    assert_eq!(r["result"], "compaction started", "{r}");
    assert!(node
        .plugin()
        .unwrap()
        .has_log("Starting compaction: requested by backup-compact; disk work not rate-limited"));
    let st = wait_generation(&mut node, 2);
    assert!(st["compaction"]["last"]["records_folded"].as_u64().unwrap() > 0, "{st}");
    // the offline command refuses a backup in use
    let o = cli(&["compact", &url(&s.root)]);
    assert!(stderr(&o).contains("lightning-cli backup-compact"), "{}", stderr(&o));
    node.stop().unwrap();
    // and works with lightningd stopped, on a backup with more records
    let more = s.tmp.path().join("more.bkp");
    let o = cli(&["init", &url(&more)]);
    assert!(o.status.success());
    std::fs::write(s.ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&more))).unwrap();
    std::fs::remove_file(node.db_path()).unwrap();
    let mut node = s.node();
    node.replay(trace, 0..trace.len()).unwrap();
    node.stop().unwrap();
    let size = |p: &Path| -> u64 { std::fs::read_dir(p).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum() };
    let before = size(&more);
    let o = cli(&["compact", &url(&more)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(size(&more) * 2 < before, "{} -> {} bytes", before, size(&more));
    assert!(stdout(&o).contains("Compacted: folded"), "{}", stdout(&o));
    assert_one_generation(&more);
    let dest = s.tmp.path().join("r.sqlite3");
    cln_backup::restore::restore(&more, &dest, &mut |_, _| {}).unwrap();
    assert_same(&dest, &final_db("small", s.tmp.path()));
    // the node goes on after an offline compaction
    let mut node = s.node();
    node.start().unwrap();
    let next = cln_backup::sim::TraceRecord {
        data_version: 80,
        writes: vec![
            "INSERT INTO vars (name, val) VALUES ('after-compact', 'x')".into(),
            "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 79".into(),
        ],
        before_init: false,
    };
    assert_eq!(node.step(&next).unwrap(), Answer::Continue);
    assert!(node.plugin().unwrap().has_log("Versions match up"));
    node.stop().unwrap();
}

/// The disk fills up during a compaction (the journal fits, the new snapshot does not): the
/// compaction fails and says why, leaves nothing behind, and db_write goes on.
#[test]
fn full_disk_during_compaction_leaves_the_backup_whole() {
    let disk = SmallDisk::mount("4m");
    let s = Setup::at(tempfile::tempdir().unwrap(), Some(disk.path().join("node.bkp")));
    let trace = trace("small");
    let mut node = s.node();
    node.replay(trace, 0..trace.len()).unwrap();
    // 2.4 MB of incompressible datastore rows: the journal fits, a snapshot of them does not
    let mut rng = Rng(7);
    let mut dv = trace.last().unwrap().data_version;
    let p = node.plugin().unwrap();
    for _ in 0..8 {
        dv += 1;
        let hex: String = (0..150_000).map(|_| format!("{:02x}", rng.below(256))).collect();
        let writes = vec![
            format!("INSERT INTO datastore (key, data, generation) VALUES (x'{dv:08x}', x'{hex}', 0)"),
            format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1),
        ];
        assert_eq!(p.db_write(dv, &writes).unwrap(), Answer::Continue);
    }
    let before: Vec<_> = std::fs::read_dir(&s.root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(p.cli("backup-compact", json!({})).unwrap()["result"], "compaction started");
    wait_for_log(p, "warn", "Compaction failed");
    let st = p.cli("backup-status", json!({})).unwrap();
    let err = st["compaction"]["last_error"].as_str().unwrap();
    assert!(err.contains("disk is full"), "{err}");
    assert_eq!(st["generation"], 1);
    let mut after: Vec<_> = std::fs::read_dir(&s.root).unwrap().map(|e| e.unwrap().file_name()).collect();
    after.sort();
    let mut before = before;
    before.sort();
    assert_eq!(before, after, "a failed compaction left files behind");
    // db_write goes on
    dv += 1;
    let writes = vec![
        "INSERT INTO vars (name, val) VALUES ('after-failed-compaction', 'x')".to_string(),
        format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1),
    ];
    assert_eq!(p.db_write(dv, &writes).unwrap(), Answer::Continue);
    let dest = s.tmp.path().join("r.sqlite3");
    let (_, sum) = cln_backup::restore::restore(&s.root, &dest, &mut |_, _| {}).unwrap();
    assert_eq!(sum.version, dv);
}
