//! Backups of the Python backup plugin (v1): restore, verify, migrate, and continue.

use std::path::{Path, PathBuf};

use crate::common::*;
use cln_backup::sim::{self, Answer, Node, TraceRecord};

fn gunzip(name: &str, dir: &Path) -> PathBuf {
    let p = dir.join(name.trim_end_matches(".gz"));
    sim::gunzip_to(&std::fs::read(fixture("legacy", name)).unwrap(), &p).unwrap();
    p
}

/// A v1 file as the Python plugin writes it (test-only: we never write v1).
fn write_v1(path: &Path, records: &[&TraceRecord]) {
    let mut body = vec![0u8; 512];
    let (mut last, mut prev, mut version) = (0u64, 0u32, 0u32);
    for r in records {
        let payload = r.writes.join("\0");
        last = body.len() as u64;
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(&r.data_version.to_be_bytes());
        body.push(1);
        body.extend_from_slice(payload.as_bytes());
        prev = version;
        version = r.data_version;
    }
    let mut h = vec![];
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&version.to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&prev.to_be_bytes());
    h.extend_from_slice(&last.to_be_bytes());
    h.extend_from_slice(&(records.len() as u64).to_be_bytes());
    body[..h.len()].copy_from_slice(&h);
    std::fs::write(path, body).unwrap();
}

#[test]
fn restore_and_verify_pre_4090_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("legacy", "pre-4090-backup.dbak");
    let o = cli(&["verify", &url(&src)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Verified data_version 46"), "{}", stdout(&o));
    assert!(stdout(&o).contains("Not verifiable"), "{}", stdout(&o));
    let dest = tmp.path().join("r.sqlite3");
    let o = cli(&["restore", &url(&src), dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = rusqlite::Connection::open(&dest).unwrap();
    let dv: i64 = c.query_row("SELECT intval FROM vars WHERE name='data_version'", [], |r| r.get(0)).unwrap();
    assert_eq!(dv, 46);
    // the fixed-up statement reached the database
    let reserved: i64 =
        c.query_row("SELECT count(*) FROM outputs WHERE reserved_til IS NOT NULL", [], |r| r.get(0)).unwrap();
    assert!(reserved > 0);
}

#[test]
fn restore_v1_backup_of_a_real_node() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = gunzip("v1-channels.bkp.gz", tmp.path());
    let committed = gunzip("v1-channels-committed.sqlite3.gz", tmp.path());
    let dest = tmp.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    let o = cli(&["restore", &url(&v1), dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Restored data_version 1190"), "{}", stdout(&o));
    assert_same(&dest.join("lightningd.sqlite3"), &committed);
    assert_same(&dest.join("lightningd.sqlite3"), &final_db("channels", tmp.path()));
}

#[test]
fn migrate_real_v1_backup_then_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    let v1 = gunzip("v1-channels.bkp.gz", tmp.path());
    std::fs::copy(final_db("channels", tmp.path()), ldir.join("lightningd.sqlite3")).unwrap();
    std::fs::write(ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&v1))).unwrap();
    let before = std::fs::read(&v1).unwrap();
    // the plugin refuses to write into a v1 file, and says how to migrate
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    node.start().unwrap();
    let next = TraceRecord {
        data_version: 1191,
        writes: vec![
            "INSERT INTO vars (name, val) VALUES ('after-migration', 'yes')".into(),
            "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 1190".into(),
        ],
        before_init: true,
    };
    match node.step(&next).unwrap() {
        Answer::Halt(v) => assert!(v.to_string().contains("backup-cli migrate"), "{v}"),
        a => panic!("{a:?}"),
    }
    node.stop().unwrap();
    assert_eq!(std::fs::read(&v1).unwrap(), before, "the v1 file was written to");
    // Read-only, it is still a destination: verify and restore find it through backup.lock,
    // and it cannot seed a copy
    let l = ldir.to_str().unwrap();
    let o = cli(&["verify", "--lightning-dir", l]);
    assert!(o.status.success() && stdout(&o).contains("1190"), "{}{}", stdout(&o), stderr(&o));
    let out = tmp.path().join("from-lock.sqlite3");
    let o = cli(&["restore", "--lightning-dir", l, out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("data_version 1190") && stdout(&o).contains("it is the only copy"), "{}", stdout(&o));
    assert_same(&out, &final_db("channels", tmp.path()));
    let extra = tmp.path().join("extra.bkp");
    let o = cli(&["add-destination", "--lightning-dir", l, &url(&extra)]);
    assert!(!o.status.success() && stderr(&o).contains("backup-cli migrate"), "{}", stderr(&o));
    assert!(!extra.exists());
    let new = tmp.path().join("node.bkp");
    let o = cli(&["migrate", &url(&v1), &url(&new), "--lightning-dir", ldir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("data_version 1190"), "{}", stdout(&o));
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["backend_url"], url(&new));
    node.start().unwrap();
    assert_eq!(node.step(&next).unwrap(), Answer::Continue);
    assert!(node.plugin().unwrap().has_log("Versions match up"));
    node.stop().unwrap();
    let dest = tmp.path().join("r.sqlite3");
    let o = cli(&["restore", &url(&new), dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &node.db_path());
}

#[test]
fn migrate_prefix_then_continue_the_same_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    let trace = trace("channels");
    let half = 700;
    // the node ran the first part with the Python plugin writing v1
    let node = Node::new(Path::new(BIN), &ldir).unwrap();
    for r in &trace[..half] {
        node.run_without_plugin(r).unwrap();
    }
    drop(node);
    let v1 = tmp.path().join("backup.dbak");
    write_v1(&v1, &trace[..half].iter().collect::<Vec<_>>());
    std::fs::write(ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&v1))).unwrap();
    let new = tmp.path().join("node.bkp");
    // refuses while lightningd runs
    {
        let _sock = std::os::unix::net::UnixListener::bind(ldir.join("lightning-rpc")).unwrap();
        let o = cli(&["migrate", &url(&v1), &url(&new), "--lightning-dir", ldir.to_str().unwrap()]);
        assert!(stderr(&o).contains("lightningd is running"), "{}", stderr(&o));
        assert!(!new.exists());
    }
    std::fs::remove_file(ldir.join("lightning-rpc")).unwrap();
    let o = cli(&["migrate", &url(&v1), &url(&new), "--lightning-dir", ldir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    node.start().unwrap();
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    assert!(node.plugin().unwrap().has_log("Versions match up"));
    node.stop().unwrap();
    let dest = tmp.path().join("r.sqlite3");
    cln_backup::restore::restore(&new, &dest, &mut |_, _| {}).unwrap();
    assert_same(&dest, &node.db_path());
    assert_same(&dest, &final_db("channels", tmp.path()));
}

#[test]
fn damaged_v1_files_get_clear_errors_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("legacy", "pre-4090-backup.dbak")).unwrap();
    let end = u64::from_be_bytes(good[8..16].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![];
    // cut mid-record: the header still counts the whole data
    cases.push(("truncated", good[..end - 100].to_vec(), "truncated"));
    // offsets past the end
    let mut past = good.clone();
    past[8..16].copy_from_slice(&((end as u64) + 5000).to_be_bytes());
    cases.push(("offsets", past, "file has"));
    let mut last_past = good.clone();
    last_past[20..28].copy_from_slice(&((end as u64) + 10).to_be_bytes());
    cases.push(("last offset", last_past, "outside the data"));
    // a kind byte that is neither 1 nor 2, on the second record
    let mut kind = good.clone();
    let first_len = u32::from_be_bytes(good[512..516].try_into().unwrap()) as usize;
    let second = 512 + 9 + first_len;
    kind[second + 8] = 3;
    cases.push(("kind", kind, "neither 1 (transaction) nor 2 (snapshot)"));
    // a record length that runs past the end
    let mut long = good.clone();
    long[second..second + 4].copy_from_slice(&(10_000_000u32).to_be_bytes());
    cases.push(("length", long, "runs past the end"));
    for (name, bytes, phrase) in cases {
        let p = tmp.path().join(format!("{name}.dbak"));
        std::fs::write(&p, &bytes).unwrap();
        let dest = tmp.path().join(format!("{name}.sqlite3"));
        for args in [vec!["restore", &url(&p), dest.to_str().unwrap()], vec!["verify", &url(&p)]] {
            let o = cli(&args.iter().map(|s| s.as_ref()).collect::<Vec<&str>>());
            assert!(!o.status.success(), "{name}: accepted");
            let e = stderr(&o);
            assert!(e.contains(phrase), "{name}: {e}");
            assert!(!e.contains("panicked"), "{name}: {e}");
        }
        assert!(!dest.exists(), "{name}: restore left output");
        let o = cli(&["migrate", &url(&p), &url(&tmp.path().join(format!("{name}.bkp")))]);
        assert!(!o.status.success(), "{name}: migrated");
        assert!(!tmp.path().join(format!("{name}.bkp")).exists());
        assert_no_tmp_left(tmp.path());
    }
}
