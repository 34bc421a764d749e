//! A file copy and a PostgreSQL copy with backup-min-destinations=1, through the real
//! plugin: the cluster crashes mid-trace, the node goes on, and the PostgreSQL copy is
//! brought back (its missing records appended, or re-seeded with a new generation after a
//! compaction), also across a SIGKILLed plugin; then both restore row for row. And
//! init and add-destination, failing after an upload, delete the rows they made.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::pgharness::{self, Cluster};
use super::{db_of, pg_journal, pg_restore, url_of};
use crate::common::*;
use crate::sealed::LEGACY_HSM;
use cln_backup::sim::Node;

/// A lightning dir with a file copy and a PostgreSQL copy (database `node` of `c`) made by
/// `init --min-destinations 1`. Returns (tmp, ldir, file copy root, backend URL).
fn two_copies(c: &Cluster) -> (tempfile::TempDir, PathBuf, PathBuf, String) {
    let url = c.create_db("node");
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let copy = tmp.path().join("copy.bkp");
    let l = ldir.to_str().unwrap();
    let o = cli(&["init", "--lightning-dir", l, "--min-destinations", "1", &url_of(&copy), &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let backend = lock_urls(&ldir)[1].clone();
    (tmp, ldir, copy, backend)
}

fn node_of(ldir: &Path) -> Node {
    let mut node = Node::new(Path::new(BIN), ldir).unwrap();
    // a short bound, so a write to the stopped cluster fails fast and the node goes on
    node.options = json!({"backup-min-destinations": 1, "backup-reconnect-timeout": 2});
    node
}

/// Both copies restore to the trace's final database, and hold the same sealed bytes.
fn both_restore_to_the_end(tmp: &Path, copy: &Path, backend: &str) {
    let fin = final_db("channels", tmp);
    let from_pg = tmp.join("from-pg.sqlite3");
    let o = pg_restore(backend, &from_pg, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&from_pg, &fin);
    let from_file = tmp.join("from-file.sqlite3");
    let o = cli(&["restore", &url_of(copy), from_file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&from_file, &fin);
    assert_eq!(pg_journal(backend, "regtest", &tmp.join("dl")), journal_data(copy), "the copies' journals differ");
}

/// Goes on through the outage: the PostgreSQL copy is behind (said in status and at warn),
/// the file copy holds every write.
fn outage(node: &mut Node, c: &Cluster, t: &[cln_backup::sim::TraceRecord], range: std::ops::Range<usize>) {
    c.stop("immediate");
    assert_eq!(node.replay(t, range).unwrap(), None, "min 1: lightningd goes on without PostgreSQL");
    let st = status(node);
    assert_eq!(st["state"], "degraded", "{st:#}");
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    assert_eq!(st["destinations"][1]["state"], "behind", "{st:#}");
    assert!(st["destinations"][1]["last_error"].is_string(), "{st:#}");
    assert!(!st.to_string().contains(pgharness::PASSWORD), "{st:#}");
    let logs = node.plugin().unwrap().logs();
    assert!(
        logs.iter().any(|(l, m)| l == "warn" && m.contains("is now behind") && m.contains("/node?")),
        "no warning that PostgreSQL fell behind: {logs:?}"
    );
}

/// PostgreSQL crashes mid-trace and comes back soon: the records it missed are appended,
/// it is written synchronously again, and restores row for row.
#[test]
fn pg_crashed_mid_trace_is_behind_then_caught_up_by_the_plugin() {
    let c = pgharness::private();
    let (tmp, ldir, copy, backend) = two_copies(&c);
    let t = trace("channels");
    let mut node = node_of(&ldir);
    assert_eq!(node.replay(t, 0..200).unwrap(), None);
    let st = status(&mut node);
    assert!(st["destinations"].as_array().unwrap().iter().all(|d| d["state"] == "in-sync"), "{st:#}");
    outage(&mut node, &c, t, 200..400);
    // status answers while the catch-up holds the lagging copy, reconnecting in vain (it
    // holds lightningd's db_write too, so it must not wait for the catch-up)
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut node)["destinations"][1]["catching_up"] != true {
        assert!(Instant::now() < deadline, "status never answered during a catch-up attempt");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(node.replay(t, 400..420).unwrap(), None);
    c.start().unwrap();
    let st = wait_state(&mut node, 1, "in-sync", Duration::from_secs(60));
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"], "{st:#}");
    assert_eq!(st["destinations"][1]["generation"], 1, "appended, not re-seeded: {st:#}");
    assert_eq!(st["state"], "ok", "{st:#}");
    wait_for_log(node.plugin().unwrap(), "info", "is up to date again");
    // written synchronously again, across the trace's restart of lightningd too
    assert_eq!(node.replay(t, 420..t.len()).unwrap(), None);
    let st = status(&mut node);
    assert!(st["destinations"].as_array().unwrap().iter().all(|d| d["state"] == "in-sync"), "{st:#}");
    node.stop().unwrap();
    both_restore_to_the_end(tmp.path(), &copy, &backend);
}

/// The file copy is compacted while PostgreSQL is down: the PostgreSQL copy is re-seeded
/// with the new generation (`install`), and a plugin SIGKILLed while it catches up still
/// converges after lightningd restarts it (nothing about the lag is kept outside the copy).
#[test]
fn pg_crashed_while_the_file_copy_is_compacted_is_reseeded_also_across_a_sigkill() {
    let c = pgharness::private();
    let (tmp, ldir, copy, backend) = two_copies(&c);
    let t = trace("channels");
    let mut node = node_of(&ldir);
    assert_eq!(node.replay(t, 0..200).unwrap(), None);
    outage(&mut node, &c, t, 200..300);
    let v = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    wait_for_log(node.plugin().unwrap(), "info", "Compaction done");
    assert_eq!(node.replay(t, 300..400).unwrap(), None);
    let st = status(&mut node);
    assert_eq!(st["destinations"][0]["generation"], 2, "{st:#}");
    assert_eq!(st["destinations"][1]["state"], "behind", "{st:#}");

    // back: re-seeded with generation 2, then written synchronously again
    c.start().unwrap();
    let st = wait_state(&mut node, 1, "in-sync", Duration::from_secs(60));
    assert_eq!(st["destinations"][1]["generation"], 2, "{st:#}");
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"], "{st:#}");
    let gens = c.psql("node", "SELECT string_agg(DISTINCT generation::text, ',') FROM cln_backup.records");
    assert_eq!(gens, "2", "generation 1's rows removed after the install");
    assert_eq!(node.replay(t, 400..500).unwrap(), None);

    // again, and the plugin SIGKILLed as soon as its catch-up holds the backup's lock
    let db = db_of(&backend);
    c.stop("immediate");
    assert_eq!(node.replay(t, 500..520).unwrap(), None);
    let v = node.plugin().unwrap().cli("backup-compact", json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    wait_for_log(node.plugin().unwrap(), "info", "into generation 3");
    assert_eq!(node.replay(t, 520..540).unwrap(), None);
    c.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.psql(&db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == "0" {
        assert!(Instant::now() < deadline, "the catch-up never reconnected");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.plugin.take().unwrap().kill().unwrap();
    // lightningd restarts it: the copy is brought up to date before the first write is answered
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(t, 540..t.len()).unwrap(), None);
    let st = wait_state(&mut node, 1, "in-sync", Duration::from_secs(60));
    assert_eq!(st["destinations"][1]["generation"], 3, "{st:#}");
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"], "{st:#}");
    node.stop().unwrap();
    both_restore_to_the_end(tmp.path(), &copy, &backend);
}

/// lightningd restarts during the outage: the database copy cannot be opened, and the node
/// goes on within the bound recorded in backup.lock at the last init (not the 60 s default,
/// and not twice). The catch-up opens it once the cluster is back, with the configured bound,
/// which then holds in the next outage too.
#[test]
fn pg_down_when_the_plugin_starts_is_opened_later_with_the_configured_bound() {
    let c = pgharness::private();
    let (tmp, ldir, copy, backend) = two_copies(&c);
    let t = trace("channels");
    let mut node = node_of(&ldir);
    assert_eq!(node.replay(t, 0..200).unwrap(), None);
    let lock: Value = serde_json::from_str(&std::fs::read_to_string(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["reconnect_timeout_s"], 2, "{lock}");
    c.stop("immediate");
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(t, 200..300).unwrap(), None, "min 1: lightningd goes on without PostgreSQL");
    let st = status(&mut node);
    assert_eq!(st["destinations"][1]["state"], "failed", "{st:#}");
    assert!(!st.to_string().contains(pgharness::PASSWORD), "{st:#}");
    let logs = node.plugin().unwrap().logs();
    assert!(
        logs.iter().any(|(l, m)| l == "warn" && m.contains("Cannot open the backup at") && m.contains("within 2.0 s")),
        "{logs:?}"
    );
    c.start().unwrap();
    let st = wait_state(&mut node, 1, "in-sync", Duration::from_secs(60));
    assert_eq!(st["destinations"][1]["details"]["reconnect_timeout_s"], 2.0, "{st:#}");
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"], "{st:#}");
    assert_eq!(node.replay(t, 300..400).unwrap(), None);
    // the next outage is noticed within that bound too
    outage(&mut node, &c, t, 400..450);
    c.start().unwrap();
    wait_state(&mut node, 1, "in-sync", Duration::from_secs(60));
    assert_eq!(node.replay(t, 450..t.len()).unwrap(), None);
    node.stop().unwrap();
    both_restore_to_the_end(tmp.path(), &copy, &backend);
}

// ---- init and add-destination leave no rows behind when they fail ----

/// Rows of backup `name` in each of the schema's tables of database `db` (shared cluster).
fn rows_of(db: &str, name: &str) -> String {
    pgharness::shared().psql(
        db,
        &format!(
            "SELECT (SELECT count(*) FROM cln_backup.backups WHERE name = '{name}') || ',' ||
                    (SELECT count(*) FROM cln_backup.generations WHERE name = '{name}') || ',' ||
                    (SELECT count(*) FROM cln_backup.snapshot_chunks WHERE name = '{name}') || ',' ||
                    (SELECT count(*) FROM cln_backup.records WHERE name = '{name}')"
        ),
    )
}

/// `init` with a file copy and two databases, the second unusable (no such database, a
/// wrong password): nothing is left, also not in the first database, so init can run again.
#[test]
fn pg_init_failing_on_a_later_database_deletes_what_it_uploaded_before() {
    let good = pgharness::fresh_db("initundo");
    let db = db_of(&good);
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let node = Node::new(Path::new(BIN), &ldir).unwrap();
    let t = trace("small");
    for r in &t[..30] {
        node.run_without_plugin(r).unwrap();
    }
    let copy = tmp.path().join("copy.bkp");
    let l = ldir.to_str().unwrap();
    let no_db = pgharness::shared().url("no_such_database");
    let bad_pw = good.replace(pgharness::PASSWORD, "wrong-password");
    for (bad, says) in [(&no_db, "no_such_database"), (&bad_pw, "password")] {
        let o = cli(&["init", "--lightning-dir", l, &url_of(&copy), &good, bad]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(says) && e.contains("Undone: the backup 'regtest'"), "{e}");
        assert!(!e.contains(pgharness::PASSWORD), "{e}");
        assert_eq!(rows_of(&db, "regtest"), "0,0,0,0", "rows left in the first database");
        assert!(!copy.exists() && !ldir.join("backup.lock").exists());
    }
    // nothing in the way: the same init without the bad database works
    let o = cli(&["init", "--lightning-dir", l, &url_of(&copy), &good]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows_of(&db, "regtest").split(',').next(), Some("1"));
}

/// `add-destination` of a database whose check after the upload fails (the lightning dir's
/// hsm_secret is not the backup's key, so the seals do not open): its rows are deleted again
/// and backup.lock is unchanged; with the right key back, the same database is added.
#[test]
fn pg_add_destination_whose_check_fails_deletes_its_rows_again() {
    let url = pgharness::fresh_db("addundo");
    let db = db_of(&url);
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let copy = tmp.path().join("copy.bkp");
    let l = ldir.to_str().unwrap();
    let o = cli(&["init", "--lightning-dir", l, &url_of(&copy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = trace("small");
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(t, 0..t.len()).unwrap(), None);
    node.stop().unwrap();
    let lock_before = std::fs::read_to_string(ldir.join("backup.lock")).unwrap();
    std::fs::rename(ldir.join("hsm_secret"), tmp.path().join("hsm_secret.away")).unwrap();
    std::fs::write(ldir.join("hsm_secret"), [0x42u8; 32]).unwrap();
    let o = cli(&["add-destination", "--lightning-dir", l, &url]);
    assert!(!o.status.success(), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains("does not verify") && e.contains("Undone: the backup 'regtest'"), "{e}");
    assert_eq!(rows_of(&db, "regtest"), "0,0,0,0", "the unchecked copy's rows were left");
    assert_eq!(std::fs::read_to_string(ldir.join("backup.lock")).unwrap(), lock_before);
    // the key back: the same database is added (nothing left in the way), and restores
    std::fs::rename(tmp.path().join("hsm_secret.away"), ldir.join("hsm_secret")).unwrap();
    let o = cli(&["add-destination", "--lightning-dir", l, &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let backend = lock_urls(&ldir)[1].clone();
    let dest = tmp.path().join("r.sqlite3");
    let o = pg_restore(&backend, &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &node.db_path());
}
