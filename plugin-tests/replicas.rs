//! Several destinations: every write on all of them, the failure policy, catching up,
//! choosing the most advanced copy, adding one, and the operator's mistakes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use cln_backup::sim::{Answer, Node};

/// A lightning dir whose backup has a destination at each of `roots`.
fn init_multi(tmp: &Path, roots: &[PathBuf], extra: &[&str]) -> PathBuf {
    let ldir = tmp.join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let mut args = vec!["init".to_string(), "--lightning-dir".into(), ldir.to_str().unwrap().into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(roots.iter().map(|r| url(r)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cli(&args);
    assert!(o.status.success(), "init failed: {}", stderr(&o));
    ldir
}

/// `restore --lightning-dir` into `dest`: it must restore from `from`. Its output.
fn restore_picks(ldir: &Path, dest: &Path, from: &Path) -> String {
    let o = cli(&["restore", "--lightning-dir", ldir.to_str().unwrap(), dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("Restoring from {}", url(from))), "{out}");
    out
}

fn restore_alone(root: &Path, dest: &Path) -> cln_backup::restore::Summary {
    let o = cli(&["restore", &url(root), dest.to_str().unwrap()]);
    assert!(o.status.success(), "restore of {} failed: {}", root.display(), stderr(&o));
    assert!(stdout(&o).contains("last written"), "{}", stdout(&o));
    cln_backup::restore::verify(root, &mut |_, _| {}).unwrap()
}

#[test]
fn three_destinations_each_restore_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let roots: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("d{i}/node.bkp"))).collect();
    roots.iter().for_each(|r| std::fs::create_dir_all(r.parent().unwrap()).unwrap());
    let ldir = init_multi(tmp.path(), &roots, &[]);
    let lock: Value = serde_json::from_str(&std::fs::read_to_string(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["backend_url"], url(&roots[0]), "backend_url stays the first, for the Python tools");
    assert_eq!(lock["destinations"].as_array().unwrap().len(), 3);
    let trace = trace("channels");
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
    let st = status(&mut node);
    let dests = st["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 3);
    for d in dests {
        assert_eq!(d["state"], "in-sync", "{d}");
        assert_eq!(d["kind"], "file");
        assert_eq!(d["latest_version"], st["latest_version"]);
        assert!(d["bytes"].as_u64().unwrap() > 0 && d["hook_p50_us"].as_u64().is_some(), "{d}");
    }
    node.stop().unwrap();
    // sealed once: every copy holds the same bytes, and none of them plaintext
    let journals: Vec<Vec<u8>> = roots
        .iter()
        .map(|r| {
            let j = std::fs::read_dir(r)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "journal"));
            std::fs::read(j.unwrap()).unwrap()
        })
        .collect();
    assert!(journals.iter().all(|j| j == &journals[0]), "the copies' journals differ");
    assert!(!journals[0].windows(11).any(|w| w == b"UPDATE vars"), "plaintext in a sealed journal");
    let fin = final_db("channels", tmp.path());
    for (i, r) in roots.iter().enumerate() {
        let dest = tmp.path().join(format!("restored-{i}.sqlite3"));
        restore_alone(r, &dest);
        assert_same(&dest, &fin);
    }
    // verify --lightning-dir checks each
    let o = cli(&["verify", "--lightning-dir", ldir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).matches("Verified data_version").count(), 3, "{}", stdout(&o));
}

/// By default a write is acknowledged only when every destination holds it: a full second
/// disk halts lightningd, and the first still restores to what was committed.
#[test]
fn a_full_destination_halts_by_default() {
    let disk = SmallDisk::mount("1m");
    let tmp = tempfile::tempdir().unwrap();
    let roots = vec![tmp.path().join("node.bkp"), disk.path().join("node.bkp")];
    let ldir = init_multi(tmp.path(), &roots, &[]);
    let trace = trace("channels");
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    let (i, v) = node.replay(trace, 0..trace.len()).unwrap().expect("a 1 MB disk must fill up");
    let msg = v.to_string();
    assert!(msg.contains(&url(&roots[1])) && msg.contains("disk is full"), "{msg}");
    assert!(msg.contains("1 of 2 destinations"), "{msg}");
    node.plugin.take().unwrap().close().unwrap();
    if !node.db.is_autocommit() {
        node.db.execute_batch("ROLLBACK").unwrap();
    }
    assert!(i > 10);
    let committed = node.data_version().unwrap();
    let dest = tmp.path().join("r.sqlite3");
    let s = restore_alone(&roots[0], &dest);
    // what was committed, or that plus the one write lightningd was asked about
    assert!(s.version == committed || s.version == committed + 1, "{} vs {committed}", s.version);
    if s.version == committed {
        assert_same(&dest, &node.db_path());
    }
    // a restart with the disk still full: still halted, and the log says which and why
    node.start().unwrap();
    let rec = &trace[i];
    let a = node.step(rec).unwrap();
    assert!(matches!(a, cln_backup::sim::Answer::Halt(_)), "{a:?}");
}

/// With backup-min-destinations=1 the node goes on; the full destination is behind, catches
/// up once there is space, survives a SIGKILL while catching up, and restores equal.
#[test]
fn a_full_destination_falls_behind_and_catches_up() {
    let disk = SmallDisk::mount("1m");
    let tmp = tempfile::tempdir().unwrap();
    let roots = vec![tmp.path().join("node.bkp"), disk.path().join("node.bkp")];
    let ldir = init_multi(tmp.path(), &roots, &["--min-destinations", "1"]);
    let trace = trace("channels");
    let half = trace.len() * 3 / 4;
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    node.options = json!({"backup-min-destinations": 1});
    assert_eq!(node.replay(trace, 0..half).unwrap(), None, "min 1: lightningd goes on");
    let st = status(&mut node);
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    assert_eq!(st["destinations"][1]["state"], "behind", "{st:#}");
    assert_eq!(st["state"], "degraded");
    assert!(st["destinations"][1]["last_error"].as_str().unwrap().contains("disk is full"), "{st:#}");
    let logs = node.plugin().unwrap().logs();
    // said at warn when it fell behind, and again by each start of the plugin since
    assert!(logs.iter().any(|(l, m)| l == "warn" && m.contains("behind") && m.contains(&url(&roots[1]))), "{logs:?}");
    // space again: it catches up in the background and is written synchronously again
    let grown = std::process::Command::new("mount").args(["-o", "remount,size=64m"]).arg(disk.path()).status().unwrap();
    assert!(grown.success());
    wait_state(&mut node, 1, "in-sync", Duration::from_secs(30));
    wait_for_log(node.plugin().unwrap(), "info", "is up to date again");
    // fill it up again, then SIGKILL the plugin while it may be catching up
    let filler = disk.path().join("filler");
    let free = fs_free(disk.path());
    std::fs::write(&filler, vec![0u8; free.saturating_sub(64 << 10) as usize]).unwrap();
    let three_q = half + (trace.len() - half) / 2;
    assert_eq!(node.replay(trace, half..three_q).unwrap(), None);
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(4900));
    node.plugin.take().unwrap().kill().unwrap();
    // lightningd restarts: the lagging copy is caught up before the first write is answered
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(trace, three_q..trace.len()).unwrap(), None);
    let st = wait_state(&mut node, 1, "in-sync", Duration::from_secs(30));
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"]);
    node.stop().unwrap();
    let fin = final_db("channels", tmp.path());
    for (i, r) in roots.iter().enumerate() {
        let dest = tmp.path().join(format!("r{i}.sqlite3"));
        restore_alone(r, &dest);
        assert_same(&dest, &fin);
    }
}

fn fs_free(p: &Path) -> u64 {
    let o = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

/// restore --lightning-dir reads every destination and takes the most advanced, whatever
/// the order in backup.lock, and says why.
#[test]
fn restore_from_the_most_advanced_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let roots = vec![tmp.path().join("a.bkp"), tmp.path().join("b.bkp")];
    let ldir = init_multi(tmp.path(), &roots, &[]);
    let trace = trace("channels");
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    let half = trace.len() / 2;
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    let stale = tmp.path().join("stale.bkp");
    assert!(std::process::Command::new("cp").arg("-a").arg(&roots[0]).arg(&stale).status().unwrap().success());
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    node.stop().unwrap();
    // the first destination is now an old copy
    std::fs::remove_dir_all(&roots[0]).unwrap();
    std::fs::rename(&stale, &roots[0]).unwrap();
    let dest = tmp.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    let out = restore_picks(&ldir, &dest, &roots[1]);
    assert!(out.contains(&format!("{} holds only up to data_version", url(&roots[0]))), "{out}");
    assert_same(&dest.join("lightningd.sqlite3"), &final_db("channels", tmp.path()));
    // and the plugin, started on these copies, brings the stale one up to date at once
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    node.start().unwrap();
    let st = status(&mut node);
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    assert_eq!(st["destinations"][0]["latest_version"], st["destinations"][1]["latest_version"]);
    node.stop().unwrap();
}

#[test]
fn add_a_destination_then_go_on() {
    let s = Setup::new();
    let trace = trace("channels");
    let mut node = s.node();
    let half = trace.len() / 2;
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    let added = s.tmp.path().join("added.bkp");
    let l = s.ldir.to_str().unwrap();
    let o = cli(&["add-destination", "--lightning-dir", l, &url(&added)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Seeding"), "{}", stdout(&o));
    // adding it twice is refused
    let o = cli(&["add-destination", "--lightning-dir", l, &url(&added)]);
    assert!(stderr(&o).contains("same destination"), "{}", stderr(&o));
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    node.stop().unwrap();
    let dest = s.tmp.path().join("r.sqlite3");
    restore_alone(&added, &dest);
    assert_same(&dest, &final_db("channels", s.tmp.path()));
    // removing: not the last one, and never an unknown one
    let o = cli(&["remove-destination", "--lightning-dir", l, "file:///nowhere.bkp"]);
    assert!(stderr(&o).contains("is not one of this node's destinations"), "{}", stderr(&o));
    let o = cli(&["remove-destination", "--lightning-dir", l, &url(&s.root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lock: Value = serde_json::from_str(&std::fs::read_to_string(s.ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["backend_url"], url(&added));
    let o = cli(&["remove-destination", "--lightning-dir", l, &url(&added)]);
    assert!(stderr(&o).contains("only destination"), "{}", stderr(&o));
}

#[test]
fn operator_mistakes_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let l = ldir.to_str().unwrap();
    let a = tmp.path().join("a.bkp");
    // the same URL twice
    let o = cli(&["init", "--lightning-dir", l, &url(&a), &url(&a)]);
    assert!(stderr(&o).contains("same destination"), "{}", stderr(&o));
    assert!(!a.exists() && !ldir.join("backup.lock").exists());
    // another node's backup
    let other = Setup::new();
    let o = cli(&["init", "--lightning-dir", l, &url(&a), &url(&other.root)]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(!a.exists(), "nothing is created when one destination is refused");
    // a missing directory
    let o = cli(&["init", "--lightning-dir", l, &url(&a), "file:///nonexistent-dir/b.bkp"]);
    assert!(stderr(&o).contains("parent directory does not exist"), "{}", stderr(&o));
    assert!(!a.exists());
    // more required than given
    let o = cli(&["init", "--lightning-dir", l, "--min-destinations", "3", &url(&a)]);
    assert!(stderr(&o).contains("more than the 1 destination"), "{}", stderr(&o));
    // adding another node's backup as a destination
    let s = Setup::new();
    let o = cli(&["add-destination", "--lightning-dir", s.ldir.to_str().unwrap(), &url(&other.root)]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

/// backup.lock pins the sealed backup: a copy whose storage was rewritten as a plaintext
/// backup, or replaced by another backup, gets nothing written, and the node halts rather
/// than send it plaintext. A lock from before pins existed is pinned at the first start.
#[test]
fn a_copy_swapped_for_plaintext_or_another_backup_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let roots: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("d{i}/node.bkp"))).collect();
    roots.iter().for_each(|r| std::fs::create_dir_all(r.parent().unwrap()).unwrap());
    let ldir = init_multi(tmp.path(), &roots, &[]);
    let lockp = ldir.join("backup.lock");
    let read_lock = || -> Value { serde_json::from_str(&std::fs::read_to_string(&lockp).unwrap()).unwrap() };
    let meta: Value = serde_json::from_slice(&std::fs::read(roots[0].join("backup.json")).unwrap()).unwrap();
    assert_eq!(read_lock()["sealed_backup_id"], meta["backup_id"], "init pins the sealed backup");
    // an older lock without the pin: the plugin records it at its start
    let mut old = read_lock();
    old.as_object_mut().unwrap().remove("sealed_backup_id");
    std::fs::write(&lockp, old.to_string()).unwrap();
    let trace = trace("small");
    let half = trace.len() / 2;
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    assert_eq!(read_lock()["sealed_backup_id"], meta["backup_id"], "the plugin pins an unpinned lock");
    let kept = tmp.path().join("kept.bkp");
    std::fs::rename(&roots[1], &kept).unwrap();
    for swap in [&["--no-encryption"][..], &[][..]] {
        // the second copy's storage now holds a plaintext backup, then another sealed one
        let _ = std::fs::remove_dir_all(&roots[1]);
        let mut args = vec!["init"];
        args.extend_from_slice(swap);
        let u = url(&roots[1]);
        args.push(&u);
        let o = cli(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        node.start_if_needed(trace, half).unwrap();
        match node.step(&trace[half]).unwrap() {
            Answer::Halt(_) => {}
            a => panic!("went on with a swapped copy: {a:?}"),
        }
        let p = node.plugin().unwrap();
        let what = if swap.is_empty() { "another sealed backup" } else { "a plaintext backup" };
        assert!(p.has_log("pins this node's backup as sealed backup") && p.has_log(what), "{:?}", p.logs());
        node.stop().unwrap();
        let v = cln_backup::restore::verify(&roots[1], &mut |_, _| {}).unwrap().version;
        assert_eq!(v, 0, "the swapped copy was written to");
    }
    // the real copy back: the node goes on, and both restore equal
    std::fs::remove_dir_all(&roots[1]).unwrap();
    std::fs::rename(&kept, &roots[1]).unwrap();
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    node.stop().unwrap();
    let fin = final_db("small", tmp.path());
    for (i, r) in roots.iter().enumerate() {
        let dest = tmp.path().join(format!("r{i}.sqlite3"));
        restore_alone(r, &dest);
        assert_same(&dest, &fin);
    }
}

/// A copy replaced by a plaintext backup holding more versions (a forged database, say) is
/// never the most advanced one for a node whose backup.lock pins its sealed backup: `restore
/// --lightning-dir` lists it as not used, says why, and restores from the sealed copy; nor
/// does `add-destination` seed from it.
#[test]
fn a_plaintext_copy_ahead_is_not_restored_from_for_an_encrypted_node() {
    let tmp = tempfile::tempdir().unwrap();
    let roots = vec![tmp.path().join("a.bkp"), tmp.path().join("b.bkp")];
    let ldir = init_multi(tmp.path(), &roots, &[]);
    let trace = trace("channels");
    let half = trace.len() / 2;
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    let at_half = tmp.path().join("at-half");
    std::fs::create_dir(&at_half).unwrap();
    assert!(cli(&["restore", &url(&roots[0]), at_half.to_str().unwrap()]).status.success());
    // another node's plaintext backup, further on, in place of the second copy
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let forged = tmp.path().join("forged.bkp");
    let o = cli(&["init", "--no-encryption", "--lightning-dir", other.to_str().unwrap(), &url(&forged)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut o_node = Node::new(Path::new(BIN), &other).unwrap();
    assert_eq!(o_node.replay(trace, 0..trace.len()).unwrap(), None);
    o_node.stop().unwrap();
    std::fs::remove_dir_all(&roots[1]).unwrap();
    std::fs::rename(&forged, &roots[1]).unwrap();
    let dest = tmp.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    let out = restore_picks(&ldir, &dest, &roots[0]);
    assert!(out.contains(&format!("{} holds a plaintext backup, but", url(&roots[1]))), "{out}");
    assert_same(&dest.join("lightningd.sqlite3"), &at_half.join("lightningd.sqlite3"));
    let third = tmp.path().join("c.bkp");
    let o = cli(&["add-destination", "--lightning-dir", ldir.to_str().unwrap(), &url(&third)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = cln_backup::destination::inspect::inspect(&url(&third), &ldir).unwrap();
    let a = cln_backup::destination::inspect::inspect(&url(&roots[0]), &ldir).unwrap();
    assert_eq!(c.tip.position.version, a.tip.position.version, "seeded from the sealed copy");
}

/// A transaction at `version` (one after the node's), inserting `tag` with `len` bytes.
fn tx_at(version: u32, tag: &str, len: usize) -> cln_backup::sim::TraceRecord {
    cln_backup::sim::TraceRecord {
        data_version: version,
        writes: vec![
            format!("INSERT INTO vars (name, val) VALUES ('missed-{tag}', '{}')", "x".repeat(len)),
            format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", version - 1),
        ],
        before_init: false,
    }
}

/// A copy away (its disk unplugged) while lightningd replaced its last, never-committed
/// transaction still holds the old one, at the same data_version and here longer. At the
/// next start it must still be the copy that is behind: restored, or copied onto the
/// others, it would give a transaction lightningd never committed.
#[test]
fn a_copy_that_missed_a_replaced_transaction_is_still_behind_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let roots: Vec<PathBuf> = ["a", "b"].iter().map(|d| tmp.path().join(d).join("node.bkp")).collect();
    roots.iter().for_each(|r| std::fs::create_dir_all(r.parent().unwrap()).unwrap());
    let ldir = init_multi(tmp.path(), &roots, &["--min-destinations", "1"]);
    let trace = trace("channels");
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    node.options = json!({"backup-min-destinations": 1});
    assert_eq!(node.replay(trace, 0..trace.len() / 2).unwrap(), None);
    let v = node.data_version().unwrap();
    // lightningd dies between the hook and its commit of X
    assert_eq!(node.step_then_die(&tx_at(v + 1, "x", 6000)).unwrap(), Answer::Continue);
    node.plugin.take().unwrap().kill().unwrap();
    // it starts again with the second disk gone, and sends Y at the same version instead
    let away = tmp.path().join("b.away");
    std::fs::rename(tmp.path().join("b"), &away).unwrap();
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.step(&tx_at(v + 1, "y", 10)).unwrap(), Answer::Continue);
    assert_eq!(status(&mut node)["destinations"][1]["state"], "failed", "it cannot be opened");
    node.stop().unwrap();
    // the disk is back: it holds X at v + 1, the first copy Y
    std::fs::rename(&away, tmp.path().join("b")).unwrap();
    let listed = std::fs::read_to_string(ldir.join("backup-behind.json")).unwrap();
    assert!(listed.contains(&url(&roots[1])) && !listed.contains(&url(&roots[0])), "{listed}");
    // restore --lightning-dir takes the copy that holds every write, and says why not the other
    let dest = tmp.path().join("picked.sqlite3");
    let out = restore_picks(&ldir, &dest, &roots[0]);
    assert!(
        out.contains(&format!(
            "{} is not used: it lacks writes lightningd committed: it fell behind at data_version {}",
            url(&roots[1]),
            v + 1
        )),
        "{out}"
    );
    assert_same(&dest, &node.db_path());
    // the complete copy cannot be removed while the other one lacks writes
    let o = cli(&["remove-destination", "--lightning-dir", ldir.to_str().unwrap(), &url(&roots[0])]);
    assert!(
        !o.status.success() && stderr(&o).contains("the only destination that holds every write"),
        "{}",
        stderr(&o)
    );
    // with that copy gone too, the stale one is not restored from: the error says why
    let gone = tmp.path().join("a.gone");
    std::fs::rename(tmp.path().join("a"), &gone).unwrap();
    let o = cli(&[
        "restore",
        "--lightning-dir",
        ldir.to_str().unwrap(),
        tmp.path().join("stale.sqlite3").to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("every copy that can be read missed writes") && err.contains(&url(&roots[1])), "{err}");
    assert!(!tmp.path().join("stale.sqlite3").exists());
    std::fs::rename(&gone, tmp.path().join("a")).unwrap();
    node.start().unwrap();
    node.initialized = false;
    let st = status(&mut node);
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    assert_eq!(node.step(&tx_at(v + 2, "z", 10)).unwrap(), Answer::Continue);
    wait_state(&mut node, 1, "in-sync", Duration::from_secs(30));
    node.stop().unwrap();
    let listed = std::fs::read_to_string(ldir.join("backup-behind.json")).unwrap();
    assert!(!listed.contains("file://"), "taken off once up to date: {listed}");
    for (i, r) in roots.iter().enumerate() {
        let dest = tmp.path().join(format!("r{i}.sqlite3"));
        restore_alone(r, &dest);
        assert_same(&dest, &node.db_path());
    }
}
