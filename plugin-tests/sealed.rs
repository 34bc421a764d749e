//! Sealed backups (issue 10): real traces through the real binaries with an hsm_secret of
//! each format; nothing of the node readable in the backup's bytes; restore needs the key;
//! moved, swapped, foreign and truncated data is refused; key files, --no-encryption,
//! encrypt and migrate.

use std::path::{Path, PathBuf};

use crate::common::*;
use cln_backup::journal::{JournalReader, RECORD_HEADER_LEN};
use cln_backup::layout::Layout;
use cln_backup::sim::{Node, TraceRecord};

pub(crate) const LEGACY_HSM: &[u8] = b"lightning-1\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
pub(crate) const LEGACY_FP_KEY: &str = "1184b49ee56f7823c642e19e8db783b9c1a9f61a0cbc46044f0cf47e5f6bdefb";
pub(crate) const WORDS: &str = "hockey enroll sure trip track rescue original plate abandon abandon abandon account";
pub(crate) const MNEMONIC_FP_KEY: &str = "f2dc78f604fed97ec979e67293ce63b9252acdd2be51221d93e8069b30c807d7";

pub(crate) fn mnemonic_hsm() -> Vec<u8> {
    let mut v = vec![0u8; 32];
    v.extend_from_slice(WORDS.as_bytes());
    v
}

/// The fingerprint of a key given as hex: first 16 hex digits of its SHA-256.
pub(crate) fn fp_of(key_hex: &str) -> String {
    let k: [u8; 32] = cln_backup::keys::unhex(key_hex).unwrap().try_into().unwrap();
    cln_backup::keys::fingerprint(&k)
}

/// A lightning dir, optionally with an hsm_secret before init, and a backup made by the
/// real `backup-cli init` with `extra` arguments.
fn setup(hsm_before_init: Option<&[u8]>, extra: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    if let Some(h) = hsm_before_init {
        std::fs::write(ldir.join("hsm_secret"), h).unwrap();
    }
    let root = tmp.path().join("node.bkp");
    let mut args = vec!["init", "--lightning-dir", ldir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let u = url(&root);
    args.push(&u);
    let o = cli(&args);
    assert!(o.status.success(), "init failed: {}", stderr(&o));
    Setup { tmp, ldir, root }
}

fn replay_all(s: &Setup, name: &str) -> Node {
    let mut node = s.node();
    let trace = trace(name);
    assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
    node.stop().unwrap();
    node
}

/// What must not be readable in a sealed backup of `name`: SQL, table names, and every
/// 33-byte key (node ids among them) of the trace, as hex text and as raw bytes.
pub(crate) fn needles(name: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = ["CREATE TABLE", "INSERT INTO", "UPDATE vars", "data_version", "SQLite format 3"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for t in ["channel_htlcs", "shachains", "channel_configs", "invoices", "peers (", "outputs"] {
        v.push(t.as_bytes().to_vec());
    }
    let mut ids = std::collections::BTreeSet::new();
    for r in trace(name) {
        for w in &r.writes {
            let lower = w.to_ascii_lowercase();
            let mut rest = lower.as_str();
            while let Some(i) = rest.find("x'0") {
                let hex = &rest[i + 2..];
                if hex.len() >= 67 && hex.as_bytes()[66] == b'\'' && hex[..66].bytes().all(|c| c.is_ascii_hexdigit()) {
                    ids.insert(hex[..66].to_string());
                }
                rest = &rest[i + 3..];
            }
        }
    }
    assert!(!ids.is_empty(), "the trace has node ids to look for");
    for id in ids {
        v.push(cln_backup::keys::unhex(&id).unwrap());
        v.push(id.as_bytes().to_vec());
    }
    v
}

/// Every byte of every file under `dir`, plus the output of any zstd frame found in them.
pub(crate) fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
            continue;
        }
        let b = std::fs::read(&p).unwrap();
        for i in 0..b.len().saturating_sub(4) {
            if b[i..i + 4] == [0x28, 0xb5, 0x2f, 0xfd] {
                let mut dec = zstd::stream::read::Decoder::new(&b[i..]).unwrap();
                let mut plain = vec![];
                let _ = std::io::Read::read_to_end(&mut dec, &mut plain); // a partial frame still counts
                out.push((p.with_extension(format!("zstd-frame-at-{i}")), plain));
            }
        }
        out.push((p, b));
    }
    out
}

/// The needles found in the backup's bytes, as (file, needle) strings. Every needle is at
/// least 6 bytes: positions are looked up by their first 6 bytes, one pass per file.
pub(crate) fn readable(dir: &Path, needles: &[Vec<u8>]) -> Vec<String> {
    let mut by_prefix: std::collections::HashMap<&[u8], Vec<&[u8]>> = Default::default();
    for n in needles {
        assert!(n.len() >= 6);
        by_prefix.entry(&n[..6]).or_default().push(n);
    }
    let mut found = std::collections::BTreeSet::new();
    for (p, b) in all_bytes(dir) {
        for i in 0..b.len().saturating_sub(5) {
            if let Some(ns) = by_prefix.get(&b[i..i + 6]) {
                for n in ns {
                    if b[i..].starts_with(n) {
                        found.insert(format!("{}: {}", p.display(), String::from_utf8_lossy(n)));
                    }
                }
            }
        }
    }
    found.into_iter().collect()
}

fn restore_args(s: &Setup, dest: &Path, extra: &[&str]) -> std::process::Output {
    let u = url(&s.root);
    let mut args = vec!["restore", u.as_str(), dest.to_str().unwrap()];
    args.extend_from_slice(extra);
    cli(&args)
}

fn verify_out(s: &Setup, extra: &[&str]) -> std::process::Output {
    let u = url(&s.root);
    let mut args = vec!["verify", u.as_str()];
    args.extend_from_slice(extra);
    cli(&args)
}

fn meta(root: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap()
}

fn compact_offline(root: &Path) {
    let o = cli(&["compact", &url(root)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn channels_trace_with_a_legacy_hsm_secret_leaves_nothing_readable() {
    // hsm_secret exists at init: the fingerprint is recorded then
    let s = setup(Some(LEGACY_HSM), &[]);
    assert_eq!(meta(&s.root)["key_fingerprint"], fp_of(LEGACY_FP_KEY));
    let node = replay_all(&s, "channels");
    let before = readable(&s.root, &needles("channels"));
    assert!(before.is_empty(), "readable in the sealed journal: {before:?}");
    compact_offline(&s.root);
    assert!(Layout::new(&s.root).list().unwrap().snapshot.is_some());
    let found = readable(&s.root, &needles("channels"));
    assert!(found.is_empty(), "readable in the sealed backup: {found:?}");
    // the key is found in the lightning dir recorded at init
    let r = s.restore("restored.sqlite3");
    assert_same(&r, &node.db_path());
    assert_same(&r, &final_db("channels", s.tmp.path()));
    let o = verify_out(&s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("key fingerprint {}", fp_of(LEGACY_FP_KEY))), "{}", stdout(&o));
}

#[test]
fn small_trace_with_a_mnemonic_hsm_secret_made_after_init() {
    // init before lightningd's first start: no hsm_secret yet, the plugin reads it at its
    // first db_write
    let s = setup(None, &[]);
    assert!(meta(&s.root)["key_fingerprint"].is_null());
    assert_eq!(meta(&s.root)["sealed"], true);
    std::fs::write(s.ldir.join("hsm_secret"), mnemonic_hsm()).unwrap();
    let node = replay_all(&s, "small");
    assert_eq!(meta(&s.root)["key_fingerprint"], fp_of(MNEMONIC_FP_KEY));
    compact_offline(&s.root);
    let found = readable(&s.root, &needles("small"));
    assert!(found.is_empty(), "readable in the sealed backup: {found:?}");
    // a new machine: the lightning dir is gone; hsm_secret goes back first, then restore
    std::fs::rename(&s.ldir, s.tmp.path().join("old-ldir")).unwrap();
    let newdir = s.tmp.path().join("new-ldir");
    std::fs::create_dir(&newdir).unwrap();
    let o = restore_args(&s, &newdir, &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("no key for this sealed backup") && e.contains(&newdir.join("hsm_secret").display().to_string()),
        "{e}"
    );
    assert!(e.contains("regtest/hsm_secret"), "names the recorded lightning dir too: {e}");
    assert!(!newdir.join("lightningd.sqlite3").exists());
    assert_no_tmp_left(&newdir);
    std::fs::write(newdir.join("hsm_secret"), mnemonic_hsm()).unwrap();
    let o = restore_args(&s, &newdir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(node);
    assert_same(&newdir.join("lightningd.sqlite3"), &s.tmp.path().join("old-ldir/lightningd.sqlite3"));
}

#[test]
fn wrong_or_missing_key_writes_nothing_and_verify_says_what_it_could_not_check() {
    let s = setup(Some(LEGACY_HSM), &[]);
    let node = replay_all(&s, "small");
    compact_offline(&s.root);
    replay_more(&s, node);
    std::fs::remove_file(s.ldir.join("hsm_secret")).unwrap();
    let wrong = s.tmp.path().join("other_hsm_secret");
    std::fs::write(&wrong, mnemonic_hsm()).unwrap();
    let dest = s.tmp.path().join("out.sqlite3");
    let o = restore_args(&s, &dest, &["--hsm-secret", wrong.to_str().unwrap()]);
    assert!(!o.status.success());
    let want = format!("this backup was sealed with key {}, you gave {}", fp_of(LEGACY_FP_KEY), fp_of(MNEMONIC_FP_KEY));
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(!dest.exists());
    let o = restore_args(&s, &dest, &[]);
    assert!(stderr(&o).contains("no key for this sealed backup: looked for"), "{}", stderr(&o));
    assert!(!dest.exists());
    assert_no_tmp_left(s.tmp.path());
    // verify without a key checks framing and chain, and says what it could not check
    let o = verify_out(&s, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Verified data_version") && out.contains("not opened (no key)"), "{out}");
    assert!(out.contains(&format!("key fingerprint {}", fp_of(LEGACY_FP_KEY))), "{out}");
    assert!(out.contains("Not verifiable: no key given or found"), "{out}");
    let o = verify_out(&s, &["--hsm-secret", wrong.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains(&want), "{}", stderr(&o));
    let right = s.tmp.path().join("right_hsm_secret");
    std::fs::write(&right, LEGACY_HSM).unwrap();
    let o = verify_out(&s, &["--hsm-secret", right.to_str().unwrap()]);
    assert!(o.status.success() && !stdout(&o).contains("Not verifiable"), "{}", stdout(&o));
    // the plugin of a node with another hsm_secret refuses to write
    std::fs::write(s.ldir.join("hsm_secret"), mnemonic_hsm()).unwrap();
    let mut node = s.node();
    node.start().unwrap();
    let rec = TraceRecord { data_version: 1, writes: vec!["SELECT 1".into()], before_init: true };
    match node.step(&rec).unwrap() {
        cln_backup::sim::Answer::Halt(v) => assert!(v.to_string().contains(&want), "{v}"),
        a => panic!("{a:?}"),
    }
}

/// Continues the trace's node with a few more transactions (so the journal has records
/// after the snapshot), each with 40 kB of hard-to-compress text.
fn replay_more(s: &Setup, mut node: Node) {
    let v = node.data_version().unwrap();
    node.start().unwrap();
    let mut rng = Rng(0x5eed + v as u64);
    for i in 0..6u32 {
        let filler: String = (0..40_000).map(|_| char::from(b'a' + rng.below(26) as u8)).collect();
        let rec = TraceRecord {
            data_version: v + i + 1,
            writes: vec![
                format!("INSERT INTO vars (name, val) VALUES ('sealed-test-{i:03}', '{filler}')"),
                format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", v + i),
            ],
            before_init: false,
        };
        node.start_if_needed(std::slice::from_ref(&rec), 0).unwrap();
        assert_eq!(node.step(&rec).unwrap(), cln_backup::sim::Answer::Continue);
    }
    node.stop().unwrap();
    let _ = s;
}

/// (offset, payload length) of each record of the current journal.
fn records(root: &Path) -> (PathBuf, Vec<(u64, usize)>) {
    let j = Layout::new(root).list().unwrap().journal;
    let mut r = JournalReader::open(&j).unwrap();
    let mut v = vec![];
    while let Some(rec) = r.next_record().unwrap() {
        v.push((rec.offset, rec.payload.len()));
    }
    (j, v)
}

/// Puts `payload` at record `off` with valid checksums, as an attacker with the disk can.
pub(crate) fn put_payload(bytes: &mut [u8], off: usize, payload: &[u8]) {
    let h = RECORD_HEADER_LEN;
    bytes[off + h..off + h + payload.len()].copy_from_slice(payload);
    let crc = crc32c::crc32c(payload);
    bytes[off + 9..off + 13].copy_from_slice(&crc.to_le_bytes());
    let hc = crc32c::crc32c(&bytes[off..off + 13]);
    bytes[off + 13..off + 17].copy_from_slice(&hc.to_le_bytes());
}

fn assert_refused(s: &Setup, what: &str) {
    let dest = s.tmp.path().join(format!("{}.sqlite3", what.replace(' ', "-")));
    let o = restore_args(s, &dest, &[]);
    assert!(!o.status.success(), "{what}: restored");
    assert!(stderr(&o).contains("fails authentication"), "{what}: {}", stderr(&o));
    assert!(!dest.exists(), "{what}");
    let o = verify_out(s, &[]);
    assert!(!o.status.success(), "{what}: verified");
}

#[test]
fn swapped_foreign_and_truncated_data_is_refused() {
    // two backups of the same node with the same hsm_secret: same key, different backups
    let a = setup(Some(LEGACY_HSM), &[]);
    let b = setup(Some(LEGACY_HSM), &[]);
    let node_a = replay_all(&a, "small");
    let _ = replay_all(&b, "small");
    replay_more(&a, node_a);
    let (ja, ra) = records(&a.root);
    let (jb, rb) = records(&b.root);
    let good = std::fs::read(&ja).unwrap();
    let other = std::fs::read(&jb).unwrap();

    // two records of the same length, their sealed payloads swapped, checksums made valid
    let (i, k) = (0..ra.len())
        .flat_map(|i| (i + 1..ra.len()).map(move |k| (i, k)))
        .find(|&(i, k)| ra[i].1 == ra[k].1 && ra[i].1 > 40)
        .expect("two records of the same length");
    let (oi, ok, len) = (ra[i].0 as usize, ra[k].0 as usize, ra[i].1);
    let h = RECORD_HEADER_LEN;
    let mut bad = good.clone();
    let (pi, pk) = (good[oi + h..oi + h + len].to_vec(), good[ok + h..ok + h + len].to_vec());
    put_payload(&mut bad, oi, &pk);
    put_payload(&mut bad, ok, &pi);
    std::fs::write(&ja, &bad).unwrap();
    let o = verify_out(&a, &["--hsm-secret", a.ldir.join("hsm_secret").to_str().unwrap()]);
    assert!(stderr(&o).contains(&format!("offset {oi}")), "{}", stderr(&o));
    assert_refused(&a, "swapped");

    // a record copied from the other backup: same key, same place, same statements
    let (off, len) = rb[3];
    assert_eq!(ra[3], (off, len), "both backups hold the same record at the same place");
    let mut bad = good.clone();
    put_payload(&mut bad, off as usize, &other[off as usize + h..off as usize + h + len]);
    std::fs::write(&ja, &bad).unwrap();
    assert_refused(&a, "foreign record");
    std::fs::write(&ja, &good).unwrap();
    a.restore("intact.sqlite3");

    // a snapshot from the other backup
    compact_offline(&a.root);
    compact_offline(&b.root);
    let sa = Layout::new(&a.root).list().unwrap().snapshot.unwrap();
    let sb = Layout::new(&b.root).list().unwrap().snapshot.unwrap();
    let snap_good = std::fs::read(&sa).unwrap();
    std::fs::copy(&sb, &sa).unwrap();
    assert_refused(&a, "foreign snapshot");

    // a snapshot cut at a chunk boundary, its header made to agree (sizes and checksums)
    let chunk = cln_backup::seal::CHUNK + cln_backup::seal::OVERHEAD;
    let body = snap_good.len() - 64;
    assert!(body > chunk, "the snapshot spans more than one chunk ({body} bytes)");
    let cut = 64 + (body - 1) / chunk * chunk;
    let mut t = snap_good[..cut].to_vec();
    let crc = crc32c::crc32c(&t[64..]);
    t[32..36].copy_from_slice(&crc.to_le_bytes());
    t[36..44].copy_from_slice(&((cut - 64) as u64).to_le_bytes());
    let hc = crc32c::crc32c(&t[0..60]);
    t[60..64].copy_from_slice(&hc.to_le_bytes());
    std::fs::write(&sa, &t).unwrap();
    assert_refused(&a, "truncated snapshot");
    // and cut without fixing the header: damage, found without the key
    std::fs::write(&sa, &snap_good[..snap_good.len() - 100]).unwrap();
    let o = verify_out(&a, &[]);
    assert!(stderr(&o).contains("damaged data"), "{}", stderr(&o));
    std::fs::write(&sa, &snap_good).unwrap();
    a.restore("intact-after.sqlite3");
}

#[test]
fn key_file_no_encryption_and_encrypt() {
    // --key-file: created 0600, recorded, found by restore
    let kf = std::env::temp_dir().join(format!("cln-backup-test-key-{}", std::process::id()));
    let _ = std::fs::remove_file(&kf);
    let s = setup(None, &["--key-file", kf.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777, 0o600);
    let node = replay_all(&s, "small");
    assert!(readable(&s.root, &needles("small")).is_empty());
    assert_same(&s.restore("kf.sqlite3"), &node.db_path());
    let moved = s.tmp.path().join("key-copy");
    std::fs::rename(&kf, &moved).unwrap();
    let dest = s.tmp.path().join("kf2.sqlite3");
    let o = restore_args(&s, &dest, &[]);
    assert!(stderr(&o).contains("key file recorded at init"), "{}", stderr(&o));
    assert!(!dest.exists());
    let o = restore_args(&s, &dest, &["--key-file", moved.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // the node's hsm_secret is not this backup's key
    let o = restore_args(
        &s,
        &s.tmp.path().join("x.sqlite3"),
        &["--hsm-secret", s.ldir.join("hsm_secret").to_str().unwrap()],
    );
    assert!(stderr(&o).contains("this backup was sealed with key"), "{}", stderr(&o));

    // --no-encryption says what it means, and the scan finds the node in plaintext (so the
    // scan can fail)
    let p = tempfile::tempdir().unwrap();
    let ldir = p.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    let root = p.path().join("plain.bkp");
    let o = cli(&["init", "--no-encryption", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Encryption is OFF"), "{}", stdout(&o));
    let s = Setup { tmp: p, ldir, root };
    let node = replay_all(&s, "small");
    assert!(readable(&s.root, &needles("small")).len() > 10);
    compact_offline(&s.root);
    assert!(!readable(&s.root, &needles("small")).is_empty(), "the plaintext snapshot is readable");
    assert!(stdout(&verify_out(&s, &[])).contains("Plaintext backup"));
    // a key given for a plaintext backup: not the backup the operator means, perhaps replaced
    let hsm = s.ldir.join("hsm_secret");
    let o = restore_args(&s, &s.tmp.path().join("p.sqlite3"), &["--hsm-secret", hsm.to_str().unwrap()]);
    assert!(stderr(&o).contains("you gave a key, but this backup is not sealed"), "{}", stderr(&o));
    assert!(!s.tmp.path().join("p.sqlite3").exists());
    // encrypt converts it offline into a new, sealed generation
    let gen_before = Layout::new(&s.root).list().unwrap().current.generation;
    let o = cli(&["encrypt", &url(&s.root), "--lightning-dir", s.ldir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Sealed"), "{}", stdout(&o));
    assert_eq!(Layout::new(&s.root).list().unwrap().current.generation, gen_before + 1);
    let found = readable(&s.root, &needles("small"));
    assert!(found.is_empty(), "readable after encrypt: {found:?}");
    assert_same(&s.restore("enc.sqlite3"), &node.db_path());
    // and the plugin continues on it, sealed
    replay_more(&s, node);
    assert!(readable(&s.root, &needles("small")).is_empty());
    let again = s.restore("enc2.sqlite3");
    let v: i64 = rusqlite::Connection::open(&again)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM vars WHERE name LIKE 'sealed-test-%'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 6);
}

#[test]
fn passphrase_hsm_secret_asks_for_a_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), [9u8; 73]).unwrap();
    let root = tmp.path().join("b.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--key-file"), "{}", stderr(&o));
    assert!(!root.exists());
}

#[test]
fn migrate_a_v1_backup_into_a_sealed_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), mnemonic_hsm()).unwrap();
    let gz = std::fs::read(fixture("legacy", "v1-channels.bkp.gz")).unwrap();
    let v1 = tmp.path().join("v1.bkp");
    cln_backup::sim::gunzip_to(&gz, &v1).unwrap();
    let committed = tmp.path().join("committed.sqlite3");
    cln_backup::sim::gunzip_to(
        &std::fs::read(fixture("legacy", "v1-channels-committed.sqlite3.gz")).unwrap(),
        &committed,
    )
    .unwrap();
    std::fs::write(ldir.join("backup.lock"), format!("{{\"backend_url\": \"{}\"}}", url(&v1))).unwrap();
    let new = tmp.path().join("node.bkp");
    let o = cli(&["migrate", &url(&v1), &url(&new), "--lightning-dir", ldir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(meta(&new)["key_fingerprint"], fp_of(MNEMONIC_FP_KEY));
    let found = readable(&new, &needles("channels"));
    assert!(found.is_empty(), "readable after migrate: {found:?}");
    let hsm = ldir.join("hsm_secret");
    let dest = tmp.path().join("r.sqlite3");
    let o = cli(&["restore", &url(&new), dest.to_str().unwrap(), "--hsm-secret", hsm.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &committed);
    // without a key, migrate into a sealed backup is refused before anything is written
    let o = cli(&["migrate", &url(&v1), &url(&tmp.path().join("n2.bkp"))]);
    assert!(!o.status.success() && stderr(&o).contains("--lightning-dir"), "{}", stderr(&o));
    assert!(!tmp.path().join("n2.bkp").exists());
}

#[test]
fn an_interrupted_encrypt_is_refused_by_the_plugin_and_resumed() {
    let p = tempfile::tempdir().unwrap();
    let ldir = p.path().join("regtest");
    std::fs::create_dir(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let root = p.path().join("plain.bkp");
    let o = cli(&["init", "--no-encryption", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = Setup { tmp: p, ldir, root };
    let node = replay_all(&s, "small");
    // encrypt crashed after recording the sealed metadata, while building the next
    // generation: its snapshot is there, its journal is not
    let m = cln_backup::meta::Meta::new_sealed(Some(fp_of(LEGACY_FP_KEY)), None, Some(s.ldir.clone())).unwrap();
    m.store(&s.root).unwrap();
    let stray = s.root.join("0000000000000002-00000001.snapshot");
    std::fs::write(&stray, b"half a snapshot").unwrap();
    // the plugin will not append plaintext to a backup marked sealed
    let mut n2 = s.node();
    n2.start().unwrap();
    let rec = TraceRecord { data_version: 1, writes: vec!["SELECT 1".into()], before_init: true };
    match n2.step(&rec).unwrap() {
        cln_backup::sim::Answer::Halt(v) => assert!(v.to_string().contains("backup-cli encrypt"), "{v}"),
        a => panic!("{a:?}"),
    }
    n2.stop().unwrap();
    // nor does restore trust a plaintext generation in a backup marked sealed (it could
    // be anyone's): it says why, and writes nothing
    let dest = s.tmp.path().join("mid.sqlite3");
    let o = restore_args(&s, &dest, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("a `backup-cli encrypt` was interrupted (run it again"), "{}", stderr(&o));
    assert!(!dest.exists());
    // running encrypt again finishes the job, with the id it recorded
    let o = cli(&["encrypt", &url(&s.root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stray.exists());
    assert_eq!(meta(&s.root)["backup_id"], serde_json::json!(m.backup_id));
    assert!(readable(&s.root, &needles("small")).is_empty());
    assert_same(&s.restore("after.sqlite3"), &node.db_path());
}
