//! `socket:` destinations against the real `backup-cli server` on loopback: real traces,
//! restores compared row for row, a server SIGKILLed mid-trace, strangers, changed keys,
//! several backups in one server, a SOCKS5 proxy, bad URLs.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cln_backup::destination::socket::{SocketDestination, SocketError};
use cln_backup::journal;
use cln_backup::net::identity::{self, PublicKey, SecretKey};
use cln_backup::sim::TraceRecord;
use cln_backup::versions::{self, Decision};

use crate::common::*;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `backup-cli server` as a child process; SIGKILLed on drop.
struct Server {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
}

impl Server {
    fn start(backups: &[&Path], listen: &str, extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec!["server".into()];
        args.extend(backups.iter().map(|b| url(b)));
        args.push(listen.into());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server { child: None, lines: Arc::new(Mutex::new(vec![])), args };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut child =
            Command::new(CLI).args(&self.args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = self.lines.clone();
        let mark = lines.lock().unwrap().len();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                lines.lock().unwrap().push(l);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.lines.lock().unwrap()[mark..].iter().any(|l| l.contains("listening on")) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                panic!("server exited ({st}) before listening: {:?}", self.lines());
            }
            assert!(Instant::now() < deadline, "server did not listen: {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.lines().iter().any(|l| l.contains(needle)) {
            assert!(Instant::now() < deadline, "no server log with '{needle}': {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn public_key(&self) -> PublicKey {
        let l = self.lines().into_iter().rfind(|l| l.contains("server public key: ")).unwrap();
        identity::parse_public(l.rsplit(' ').next().unwrap()).unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server-side backup made by the real `backup-cli init` (empty, for a new node).
fn server_backup(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    // The server stores what the node sends; it holds no key (see README: what the server sees).
    let o = cli(&["init", "--no-encryption", &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    root
}

/// A server's empty `--no-encryption` backup, served on a free port: (its root, the
/// server, its URL, the port).
fn serve_plaintext_backup(dir: &Path) -> (PathBuf, Server, String, u16) {
    let root = server_backup(dir, "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    (root, server, format!("socket:127.0.0.1:{port}"), port)
}

/// A lightning dir with an hsm_secret; the node's transport key derives from it.
fn node_dir(dir: &Path, name: &str, seed: u8) -> (PathBuf, SecretKey) {
    let ldir = dir.join(name);
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), [seed; 32]).unwrap();
    let k = identity::node_key_from_lightning_dir(&ldir).unwrap();
    (ldir, k)
}

fn connect(u: &str, key: &SecretKey, pin: Option<PublicKey>, bound: Duration, writer: bool) -> SocketDestination {
    SocketDestination::connect(u, key.clone(), pin, bound, writer).unwrap()
}

/// What the plugin does for one db_write: the version decision, then the append.
fn push(d: &mut SocketDestination, r: &TraceRecord) -> Result<(), SocketError> {
    let kind = r.kind();
    let replace = match versions::decide(d.position(), r.data_version, kind) {
        Decision::Append => false,
        Decision::ReplaceLast => true,
        other => panic!("data_version {}: {other:?}", r.data_version),
    };
    let mut rec = vec![];
    journal::encode_record(&mut rec, r.data_version, kind, &r.writes);
    d.append(r.data_version, kind, replace, &rec)
}

fn restore_cli(u: &str, ldir: &Path) -> PathBuf {
    let o = cli(&["restore", u, ldir.to_str().unwrap()]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    assert!(stdout(&o).contains("Restored data_version"), "{}", stdout(&o));
    ldir.join("lightningd.sqlite3")
}

const BOUND: Duration = Duration::from_secs(20);

#[test]
fn replay_through_the_server_and_restore_row_for_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, server, u, _port) = serve_plaintext_backup(tmp.path());
    let (ldir, key) = node_dir(tmp.path(), "node", 1);
    let mut d = connect(&u, &key, Some(server.public_key()), BOUND, true);
    server.wait_log("paired");
    let trace = trace("channels");
    for r in trace {
        push(&mut d, r).unwrap();
    }
    let st = d.status();
    assert_eq!(st["peer"], u);
    assert_eq!(st["reconnects"], 0);
    assert!(st["rtt_p99_us"].as_u64().unwrap() >= st["rtt_p50_us"].as_u64().unwrap());
    assert_eq!(st["server_key_fingerprint"], identity::fingerprint(&server.public_key()));
    // the pin is recorded for the CLI's restore
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(
            &serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&server.public_key())}),
        )
        .unwrap(),
    )
    .unwrap();
    let db = restore_cli(&u, &ldir);
    let (tables, rows) = assert_same(&db, &final_db("channels", tmp.path()));
    assert!(tables > 30 && rows > 50);
    let o = Command::new(CLI).args(["verify", &u]).env("XDG_STATE_HOME", tmp.path().join("state")).output().unwrap();
    assert!(!o.status.success(), "verify found no key but succeeded");
    assert!(stderr(&o).contains("no hsm_secret found"), "{}", stderr(&o));
    let o = Command::new(CLI).args(["verify", &u]).env("CLN_BACKUP_LIGHTNING_DIR", &ldir).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Verified data_version"), "{}", stdout(&o));
    // the server's copy is a plain file backup: the local engine agrees
    drop(d);
    drop(server);
    let local = tmp.path().join("local.sqlite3");
    cln_backup::restore::restore(&root, &local, &mut |_, _| {}).unwrap();
    assert_same(&local, &db);
}

#[test]
fn server_sigkilled_mid_trace_again_and_again_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Arc::new(Mutex::new(Server::start(&[&root], &format!("127.0.0.1:{port}"), &[])));
    let pin = server.lock().unwrap().public_key();
    let (ldir, key) = node_dir(tmp.path(), "node", 2);
    let u = format!("socket:127.0.0.1:{port}");
    let mut d = connect(&u, &key, Some(pin), BOUND, true);
    let trace = trace("channels");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (killer_server, killer_done) = (server.clone(), done.clone());
    // SIGKILL at arbitrary moments, some between the server's fdatasync and its answer
    let killer = std::thread::spawn(move || {
        let mut rng = Rng(7);
        let mut kills = 0;
        while !killer_done.load(std::sync::atomic::Ordering::Relaxed) && kills < 12 {
            std::thread::sleep(Duration::from_millis(20 + rng.below(60)));
            killer_server.lock().unwrap().restart();
            kills += 1;
        }
        kills
    });
    for r in trace {
        push(&mut d, r).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();
    assert!(kills >= 3, "only {kills} kills during the trace");
    assert!(d.status()["reconnects"].as_u64().unwrap() >= 1, "{}", d.status());
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(&serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&pin)})).unwrap(),
    )
    .unwrap();
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("channels", tmp.path()));
}

#[test]
fn server_gone_for_good_fails_within_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let mut server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (_, key) = node_dir(tmp.path(), "node", 3);
    let bound = Duration::from_millis(800);
    let mut d = connect(&format!("socket:127.0.0.1:{port}"), &key, None, bound, true);
    let trace = trace("small");
    push(&mut d, &trace[0]).unwrap();
    server.kill();
    let t = Instant::now();
    let e = push(&mut d, &trace[1]).unwrap_err();
    let took = t.elapsed();
    assert!(took >= bound && took < bound + Duration::from_secs(3), "{took:?}");
    assert!(matches!(e, SocketError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("backup-cli server"), "{e}");
    // connecting is bounded the same way
    let t = Instant::now();
    let e = SocketDestination::connect(&format!("socket:127.0.0.1:{port}"), key, None, bound, true).err().unwrap();
    assert!(t.elapsed() < bound + Duration::from_secs(3));
    assert!(matches!(e, SocketError::Unreachable { .. }), "{e}");
}

#[test]
fn strangers_get_nothing_beyond_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let (_, key) = node_dir(tmp.path(), "node", 4);
    let server =
        Server::start(&[&root], &format!("127.0.0.1:{port}"), &["--client-key", &identity::to_hex(&key.public())]);
    let u = format!("socket:127.0.0.1:{port}");
    let mut d = connect(&u, &key, Some(server.public_key()), BOUND, true);
    push(&mut d, &trace("small")[0]).unwrap();
    // the Python plugin's RESTORE request: type 5, length 0
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&[5, 0, 0, 0, 0]).unwrap();
    let mut got = vec![];
    let _ = raw.read_to_end(&mut got);
    assert!(got.is_empty(), "a raw client got {} bytes", got.len());
    server.wait_log("no Noise handshake");
    // a Noise client with another key: the handshake, then the door closes
    let (_, other) = node_dir(tmp.path(), "other", 5);
    let t = Instant::now();
    let e = SocketDestination::connect(&u, other.clone(), None, BOUND, false).err().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "a refusal is not retried");
    assert!(e.to_string().contains("no backup paired with this node's key"), "{e}");
    server.wait_log(&format!("refused client {}", identity::fingerprint(&other.public())));
    // restore through the CLI with the stranger's hsm_secret: refused, nothing written
    let o = cli(&["restore", &u, tmp.path().join("other").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no backup paired"), "{}", stderr(&o));
    assert!(!tmp.path().join("other/lightningd.sqlite3").exists());
    // and the real client still works
    push(&mut d, &trace("small")[1]).unwrap();
}

#[test]
fn a_changed_server_key_is_refused_with_what_to_check() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let mut server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (ldir, key) = node_dir(tmp.path(), "node", 6);
    let u = format!("socket:127.0.0.1:{port}");
    let pin = server.public_key();
    drop(connect(&u, &key, Some(pin), BOUND, true));
    // the server is reinstalled: its key file is gone, a new one is made
    server.kill();
    std::fs::remove_file(tmp.path().join("node.bkp.server-key")).unwrap();
    server.spawn();
    assert_ne!(server.public_key(), pin);
    let e = SocketDestination::connect(&u, key, Some(pin), BOUND, true).err().unwrap();
    assert!(matches!(e, SocketError::ServerKey { .. }), "{e}");
    assert!(e.to_string().contains("update server_key in backup.lock"), "{e}");
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(&serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&pin)})).unwrap(),
    )
    .unwrap();
    let o = cli(&["restore", &u, ldir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not the pinned key"), "{}", stderr(&o));
}

#[test]
fn restore_while_the_node_writes_and_a_second_writer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let pin = server.public_key();
    let (_, key) = node_dir(tmp.path(), "node", 7);
    let u = format!("socket:127.0.0.1:{port}");
    let mut w = connect(&u, &key, Some(pin), BOUND, true);
    let trace = trace("channels");
    for r in &trace[..50] {
        push(&mut w, r).unwrap();
    }
    let e = SocketDestination::connect(&u, key.clone(), Some(pin), Duration::from_millis(500), true).err().unwrap();
    assert!(e.to_string().contains("already has a writer connected"), "{e}");
    let writer = std::thread::spawn(move || {
        for r in &trace[50..] {
            push(&mut w, r).unwrap();
        }
    });
    let mut reader = connect(&u, &key, Some(pin), BOUND, false);
    let mut restores = vec![];
    let mut n = 0;
    while !writer.is_finished() || n < 3 {
        let dl = tmp.path().join(format!("copy-{n}"));
        reader.download(&dl, 0, &mut |_, _| {}).unwrap();
        let dest = tmp.path().join(format!("live-{n}.sqlite3"));
        let (_, sum) = cln_backup::restore::restore(&dl, &dest, &mut |_, _| {}).unwrap();
        restores.push((dest, sum.records));
        n += 1;
    }
    writer.join().unwrap();
    assert!(restores.len() >= 3);
    for (dest, records) in restores.iter().step_by((restores.len() / 4).max(1)) {
        let reference = tmp.path().join(format!("ref-{records}.sqlite3"));
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
fn one_server_hosts_two_backups_each_seeing_only_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let a_root = server_backup(tmp.path(), "a.bkp");
    let b_root = server_backup(tmp.path(), "b.bkp");
    let port = free_port();
    let (_, ka) = node_dir(tmp.path(), "a", 8);
    let (_, kb) = node_dir(tmp.path(), "b", 9);
    // b is pinned ahead of time; a pairs on first contact
    let mut server = Server::start(&[&a_root, &b_root], &format!("127.0.0.1:{port}"), &[]);
    server.kill();
    server.args = vec![
        "server".into(),
        url(&a_root),
        url(&b_root),
        format!("127.0.0.1:{port}"),
        "--client-key".into(),
        identity::to_hex(&ka.public()),
        "--client-key".into(),
        identity::to_hex(&kb.public()),
    ];
    server.spawn();
    let u = format!("socket:127.0.0.1:{port}");
    let mut a = connect(&u, &ka, None, BOUND, true);
    let mut b = connect(&u, &kb, None, BOUND, true);
    let trace = trace("small");
    for r in trace {
        push(&mut a, r).unwrap();
    }
    push(&mut b, &trace[0]).unwrap();
    assert_eq!(b.refresh().unwrap().version, trace[0].data_version);
    assert!(a.refresh().unwrap().version > 50);
    let dl = tmp.path().join("b-copy");
    let m = b.download(&dl, 0, &mut |_, _| {}).unwrap();
    assert_eq!(m.snapshot_len, 0);
    let (_, sum) = cln_backup::restore::restore(&dl, &tmp.path().join("b.sqlite3"), &mut |_, _| {}).unwrap();
    assert_eq!(sum.records, 1);
    // a third node is nobody's
    let (_, kc) = node_dir(tmp.path(), "c", 10);
    assert!(SocketDestination::connect(&u, kc, None, BOUND, false).is_err());
    // pairings survive a restart
    drop((a, b));
    server.restart();
    let mut a = connect(&u, &ka, None, BOUND, false);
    assert!(a.refresh().unwrap().version > 50);
}

#[test]
fn init_uploads_the_database_then_compaction_over_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    // over IPv6, listening on every address
    let server = Server::start(&[&root], &format!("[::]:{port}"), &[]);
    let u = format!("socket:[::1]:{port}");
    // a node that ran part of the trace without a backup
    let (ldir, key) = node_dir(tmp.path(), "regtest", 11);
    let trace = trace("channels");
    let half = 500;
    let node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    for r in &trace[..half] {
        node.run_without_plugin(r).unwrap();
    }
    drop(node);
    let state_home = tmp.path().join("state");
    let with_state = |args: &[&str]| Command::new(CLI).args(args).env("XDG_STATE_HOME", &state_home).output().unwrap();
    // plaintext: this test drives the client API with plain records (sealed: below)
    let o = with_state(&["init", "--no-encryption", "--lightning-dir", ldir.to_str().unwrap(), &u]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Successfully written initial snapshot"), "{}", stdout(&o));
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["backend_url"], u);
    assert_eq!(lock["server_key"], identity::to_hex(&server.public_key()));
    // a second init into the same (no longer empty) backup is refused
    let (ldir2, _) = node_dir(tmp.path(), "again", 11);
    std::fs::copy(ldir.join("lightningd.sqlite3"), ldir2.join("lightningd.sqlite3")).unwrap();
    let o = with_state(&["init", "--no-encryption", "--lightning-dir", ldir2.to_str().unwrap(), &u]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("only into an empty backup"), "{}", stderr(&o));
    let pin = identity::parse_public(lock["server_key"].as_str().unwrap()).unwrap();
    // as the plugin will: key from hsm_secret, pin from backup.lock
    let mut d = cln_backup::destination::socket::node::connect_node(&ldir, &u, BOUND).unwrap();
    assert_eq!(d.node_public_key(), key.public());
    assert_eq!(d.position().version, trace[half - 1].data_version);
    for r in &trace[half..1000] {
        push(&mut d, r).unwrap();
    }
    // compaction on a second connection while the node goes on writing: read back, fold,
    // install; the appends continue on the new generation
    let before = d.server_state();
    let mut c = connect(&u, &key, Some(pin), BOUND, false);
    let last = trace.len() - 10;
    let writer = std::thread::spawn(move || {
        for r in &trace[1000..last] {
            push(&mut d, r).unwrap();
        }
        d
    });
    let st = c.compact(&tmp.path().join("work"), &mut |_, _| {}).unwrap().unwrap();
    assert_eq!(st.generation, before.generation + 1);
    let mut d = writer.join().unwrap();
    for r in &trace[last..] {
        push(&mut d, r).unwrap();
    }
    let after = d.server_state();
    assert_eq!(after.generation, before.generation + 1, "the writer went on in the new generation");
    assert_eq!(d.position().version, trace.last().unwrap().data_version);
    // the old generation is freed in the background
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let count = |ext: &str| files.iter().filter(|f| f.ends_with(ext)).count();
        if count(".journal") == 1 && count(".snapshot") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "old generation not freed: {files:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(d);
    // a drill on the same machine: the lightning dir recorded at init gives key and pin
    let restored = tmp.path().join("drill.sqlite3");
    let o = with_state(&["restore", &u, restored.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("no server key pinned"), "{}", stderr(&o));
    assert_same(&restored, &final_db("channels", tmp.path()));
    let o = with_state(&["verify", &u]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("Verified data_version {}", trace.last().unwrap().data_version)),
        "{}",
        stdout(&o)
    );
    // elsewhere, with nothing recorded: restore says what it needs
    let o = Command::new(CLI)
        .args(["restore", &u, tmp.path().join("x.sqlite3").to_str().unwrap()])
        .env("XDG_STATE_HOME", tmp.path().join("empty"))
        .env("HOME", tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no hsm_secret found") && stderr(&o).contains("CLN_BACKUP_LIGHTNING_DIR"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn localhost_listens_on_ipv4_and_ipv6() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("localhost:{port}"), &[]);
    let (_, key) = node_dir(tmp.path(), "node", 12);
    connect(&format!("socket:127.0.0.1:{port}"), &key, Some(server.public_key()), BOUND, false);
    if server.lines().iter().any(|l| l.contains(&format!("listening on [::1]:{port}"))) {
        connect(&format!("socket:[::1]:{port}"), &key, Some(server.public_key()), BOUND, false);
    } else {
        eprintln!("NOTE: localhost has no IPv6 address here; IPv6 is checked by init_uploads_the_database_then_compaction_over_the_wire");
    }
    connect(&format!("socket:localhost:{port}"), &key, Some(server.public_key()), BOUND, false);
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let mut server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (_, key) = node_dir(tmp.path(), "node", 13);
    let mut d = connect(&format!("socket:127.0.0.1:{port}"), &key, None, BOUND, true);
    push(&mut d, &trace("small")[0]).unwrap();
    let mut child = server.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(server.lines().iter().any(|l| l.contains("SIGTERM: stopping")), "{:?}", server.lines());
    assert!(server.lines().iter().any(|l| l.ends_with("stopped")), "{:?}", server.lines());
    // the key file is private
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(tmp.path().join("node.bkp.server-key")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    // the backup's lock is free again
    cln_backup::writer::Writer::open(&root, &Default::default()).unwrap();
}

/// A minimal SOCKS5 proxy (no auth, CONNECT): records the target it was asked for.
fn socks5_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(vec![]));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 262];
                c.read_exact(&mut b[..2]).unwrap();
                let n = b[1] as usize;
                c.read_exact(&mut b[..n]).unwrap();
                c.write_all(&[5, 0]).unwrap();
                c.read_exact(&mut b[..4]).unwrap();
                assert_eq!(&b[..2], &[5, 1]);
                let host = match b[3] {
                    1 => {
                        c.read_exact(&mut b[..4]).unwrap();
                        std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
                    }
                    3 => {
                        c.read_exact(&mut b[..1]).unwrap();
                        let n = b[0] as usize;
                        c.read_exact(&mut b[..n]).unwrap();
                        String::from_utf8_lossy(&b[..n]).into_owned()
                    }
                    t => panic!("address type {t}"),
                };
                c.read_exact(&mut b[..2]).unwrap();
                let port = u16::from_be_bytes([b[0], b[1]]);
                seen.lock().unwrap().push(format!("{host}:{port}"));
                // the proxy resolves the name (as Tor does for .onion)
                let target = if host == "backup.test" { "127.0.0.1".to_string() } else { host };
                let up = TcpStream::connect((target.as_str(), port)).unwrap();
                c.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).unwrap();
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                let mut up = up;
                let _ = std::io::copy(&mut c, &mut up);
                let _ = up.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, seen)
}

#[test]
fn through_a_socks5_proxy_the_proxy_resolves_the_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (pport, seen) = socks5_proxy();
    let (ldir, key) = node_dir(tmp.path(), "node", 14);
    // a name only the proxy knows, like a .onion
    let u = format!("socket:backup.test:{port}?proxy=socks5:127.0.0.1:{pport}");
    let mut d = connect(&u, &key, Some(server.public_key()), BOUND, true);
    let trace = trace("small");
    for r in trace {
        push(&mut d, r).unwrap();
    }
    assert_eq!(seen.lock().unwrap()[0], format!("backup.test:{port}"));
    drop(d);
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(
            &serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&server.public_key())}),
        )
        .unwrap(),
    )
    .unwrap();
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("small", tmp.path()));
    assert!(seen.lock().unwrap().len() >= 2);
}

#[test]
fn bad_socket_urls_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ldir, _) = node_dir(tmp.path(), "node", 15);
    let d = ldir.to_str().unwrap();
    for (u, says) in [
        ("socket:localhost", "has no port"),
        ("socket:::1:8700", "without brackets"),
        ("socket:h:8700?proxy=http:127.0.0.1:8080", "unknown proxy type 'http'"),
        ("socket:h:70000", "not a port"),
    ] {
        for args in [vec!["restore", u, d], vec!["init", "--lightning-dir", d, u], vec!["verify", u]] {
            let o = Command::new(CLI).args(&args).env("CLN_BACKUP_LIGHTNING_DIR", &ldir).output().unwrap();
            assert!(!o.status.success(), "{args:?}");
            assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        }
    }
    let o = cli(&["server", &url(&tmp.path().join("nope")), "127.0.0.1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no port"), "{}", stderr(&o));
}

/// A relay between client and server that reads the Noise frames (u16 length + bytes) and,
/// on its `cut_after`-th client frame after the handshake, forwards it, waits for the
/// server's answer, and then drops both sides without passing the answer on: the record
/// is on the server's disk but the client never heard so. Later connections pass freely.
fn cutting_relay(server_port: u16, cut_after: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut first = true;
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let mut up = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
            if !first {
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c, &mut up);
                    let _ = up.shutdown(std::net::Shutdown::Both);
                });
                continue;
            }
            first = false;
            let frame = |s: &mut TcpStream| -> Vec<u8> {
                let mut h = [0u8; 2];
                s.read_exact(&mut h).unwrap();
                let mut b = vec![0u8; u16::from_be_bytes(h) as usize];
                s.read_exact(&mut b).unwrap();
                [h.to_vec(), b].concat()
            };
            // handshake: client, server, client; then Hello and its answer
            for from_client in [true, false, true, true, false] {
                let (src, dst) = if from_client { (&mut c, &mut up) } else { (&mut up, &mut c) };
                let f = frame(src);
                dst.write_all(&f).unwrap();
            }
            for i in 1..=cut_after {
                let f = frame(&mut c);
                up.write_all(&f).unwrap();
                let answer = frame(&mut up);
                if i == cut_after {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    let _ = up.shutdown(std::net::Shutdown::Both);
                    break;
                }
                c.write_all(&answer).unwrap();
            }
        }
    });
    port
}

#[test]
fn a_record_that_landed_before_the_drop_is_not_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let relay = cutting_relay(port, 30);
    let (ldir, key) = node_dir(tmp.path(), "node", 16);
    let u = format!("socket:127.0.0.1:{relay}");
    let mut d = connect(&u, &key, Some(server.public_key()), BOUND, true);
    let trace = trace("small");
    for r in trace {
        push(&mut d, r).unwrap();
    }
    let st = d.status();
    assert_eq!(st["reconnects"], 1, "{st}");
    assert_eq!(st["resumed_landed"], 1, "{st}");
    assert_eq!(st["resumed_resent"], 0, "{st}");
    drop(d);
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(
            &serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&server.public_key())}),
        )
        .unwrap(),
    )
    .unwrap();
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("small", tmp.path()));
}

#[test]
fn version_rules_hold_over_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (ldir, key) = node_dir(tmp.path(), "node", 17);
    let u = format!("socket:127.0.0.1:{port}");
    let mut d = connect(&u, &key, Some(server.public_key()), BOUND, true);
    let trace = trace("small");
    let n = 40;
    for r in &trace[..n] {
        push(&mut d, r).unwrap();
    }
    let st = d.status();
    assert!(st["connected_since"].as_str().unwrap().ends_with('Z'), "{st}");
    let last = trace[..n].iter().rev().find(|r| r.kind() == journal::Kind::Transaction).unwrap();
    let rec = |dv: u32, writes: &[String]| {
        let mut b = vec![];
        journal::encode_record(&mut b, dv, journal::Kind::Transaction, writes);
        b
    };
    let bump =
        |dv: u32| format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1);
    let v = d.position().version;
    // the server checks the chain itself, whatever the client claims
    let e = d.append(v + 5, journal::Kind::Transaction, false, &rec(v + 5, &[bump(v + 5)])).unwrap_err();
    assert!(e.is_versions() && e.to_string().contains("Backup is out of date"), "{e}");
    let e = d.append(v - 3, journal::Kind::Transaction, false, &rec(v - 3, &[bump(v - 3)])).unwrap_err();
    assert!(e.is_versions() && e.to_string().contains("lost some state"), "{e}");
    let e = d.append(v, journal::Kind::Transaction, false, &rec(v, &[bump(v)])).unwrap_err();
    assert!(e.is_versions() && e.to_string().contains("client and backup disagree"), "{e}");
    // hook-then-crash: lightningd died before committing `last`; after its restart the same
    // version comes again with other statements and replaces it
    assert_eq!(v, last.data_version);
    let other = vec!["CREATE TABLE after_crash (x INTEGER)".to_string(), bump(v)];
    d.append(v, journal::Kind::Transaction, true, &rec(v, &other)).unwrap();
    assert_eq!(d.position(), versions::Position { version: v, droppable: true });
    for r in &trace[n..] {
        push(&mut d, r).unwrap();
    }
    drop(d);
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(
            &serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&server.public_key())}),
        )
        .unwrap(),
    )
    .unwrap();
    let db = restore_cli(&u, &ldir);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let has = |t: &str| {
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = ?1", [t], |r| r.get::<_, i64>(0)).unwrap()
    };
    assert_eq!(has("after_crash"), 1, "the replacement is in the backup");
}

#[test]
fn usable_from_the_plugins_tokio_runtime_through_spawn_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let (_, key) = node_dir(tmp.path(), "node", 18);
    let pin = server.public_key();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let u = format!("socket:127.0.0.1:{port}");
        let mut d = tokio::task::spawn_blocking(move || connect(&u, &key, Some(pin), BOUND, true)).await.unwrap();
        for r in &trace("small")[..5] {
            d = tokio::task::spawn_blocking(move || {
                push(&mut d, r).unwrap();
                d
            })
            .await
            .unwrap();
        }
        assert_eq!(d.position().version, trace("small")[4].data_version);
        drop(d); // on an async worker thread
    });
}

#[test]
fn server_sigkilled_during_compactions_over_the_wire_keeps_every_write() {
    let tmp = tempfile::tempdir().unwrap();
    let root = server_backup(tmp.path(), "node.bkp");
    let port = free_port();
    let server = Arc::new(Mutex::new(Server::start(&[&root], &format!("127.0.0.1:{port}"), &[])));
    let pin = server.lock().unwrap().public_key();
    let (ldir, key) = node_dir(tmp.path(), "node", 19);
    let u = format!("socket:127.0.0.1:{port}");
    let mut d = connect(&u, &key, Some(pin), BOUND, true);
    let trace = trace("channels");
    let mut rng = Rng(11);
    let mut compacted = 0;
    // The first compaction runs undisturbed: how long one takes on this machine, so the
    // SIGKILLs after it land inside theirs (later ones fold more, so take longer).
    let mut took = Duration::ZERO;
    for (i, chunk) in trace.chunks(trace.len() / 10 + 1).enumerate() {
        for r in chunk {
            push(&mut d, r).unwrap();
        }
        // a compaction on its own connection, and a SIGKILL at some point of it
        let (u2, k2, work) = (u.clone(), key.clone(), tmp.path().join(format!("work-{i}")));
        let compaction = std::thread::spawn(move || {
            let mut c = SocketDestination::connect(&u2, k2, Some(pin), Duration::from_secs(2), false).ok()?;
            c.compact(&work, &mut |_, _| {}).ok().flatten()
        });
        if i == 0 {
            let t = std::time::Instant::now();
            assert!(compaction.join().unwrap().is_some(), "the undisturbed compaction failed");
            took = t.elapsed();
            continue;
        }
        // in the first half: the first compaction, on a cold cache, can take twice as long
        // as the next ones, which would then all finish before their SIGKILL
        std::thread::sleep(Duration::from_micros(rng.below((took.as_micros() / 2).max(1) as u64)));
        server.lock().unwrap().restart();
        if compaction.join().unwrap().is_some() {
            compacted += 1;
        }
        let files: Vec<String> =
            std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(!files.iter().any(|f| f.ends_with(".tmp")), "{files:?}");
    }
    let killed = trace.chunks(trace.len() / 10 + 1).len() - 1;
    eprintln!("{compacted} of {killed} compactions finished before their SIGKILL (one took {took:?})");
    assert!(compacted < killed, "no compaction was cut by the SIGKILL: the test proved nothing");
    std::fs::write(
        ldir.join("backup.lock"),
        serde_json::to_vec(&serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&pin)})).unwrap(),
    )
    .unwrap();
    drop(d);
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("channels", tmp.path()));
}

#[test]
fn init_before_the_nodes_first_start_pins_the_server_and_pairs_at_first_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let (_root, server, u, _port) = serve_plaintext_backup(tmp.path());
    // a new node: no hsm_secret, no database yet
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let o = Command::new(CLI)
        .args(["init", "--lightning-dir", ldir.to_str().unwrap(), &u])
        .env("XDG_STATE_HOME", tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("pairs with the server when the plugin first connects"), "{}", stdout(&o));
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["server_key"], identity::to_hex(&server.public_key()));
    // learning the key paired nothing
    std::thread::sleep(Duration::from_millis(100));
    assert!(!server.lines().iter().any(|l| l.contains("paired file:")), "{:?}", server.lines());
    assert!(!tmp.path().join("node.bkp.paired-client").exists());
    // lightningd's first start makes hsm_secret; the plugin connects and pairs
    std::fs::write(ldir.join("hsm_secret"), [20u8; 32]).unwrap();
    let mut d = cln_backup::destination::socket::node::connect_node(&ldir, &u, BOUND).unwrap();
    server.wait_log("paired");
    for r in trace("small") {
        push(&mut d, r).unwrap();
    }
    drop(d);
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("small", tmp.path()));
}

/// The real plugin with a `socket:` destination in backup.lock: the trace through lightningd's
/// stand-in, the server SIGKILLed and restarted mid-trace (the hook waits and resumes), a
/// SIGKILL of the plugin itself, then a restore through the socket compared row for row.
#[test]
fn the_plugin_writes_through_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, mut server, u, port) = serve_plaintext_backup(tmp.path());
    let (ldir, _) = node_dir(tmp.path(), "regtest", 5);
    let state_home = tmp.path().join("state");
    let o = Command::new(CLI)
        .args(["init", "--lightning-dir", ldir.to_str().unwrap(), &u])
        .env("XDG_STATE_HOME", &state_home)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = trace("channels");
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    let third = trace.len() / 3;
    assert_eq!(node.replay(trace, 0..third).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    let d = &st["destinations"][0];
    assert_eq!(d["kind"], "socket", "{st:#}");
    assert_eq!(d["state"], "in-sync", "{st:#}");
    assert_eq!(d["details"]["connected"], true, "{st:#}");
    // the server dies and comes back while lightningd waits on a hook
    server.kill();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.spawn();
        server
    });
    assert!(!cln_backup::sim::restarts_at(trace, third));
    let t0 = Instant::now();
    assert_eq!(node.replay(trace, third..third + 1).unwrap(), None);
    assert!(t0.elapsed() >= Duration::from_millis(250), "the hook did not wait for the server");
    let server = restart.join().unwrap();
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert!(st["destinations"][0]["details"]["reconnects"].as_u64().unwrap() >= 1, "{st:#}");
    assert_eq!(node.replay(trace, third + 1..2 * third).unwrap(), None);
    // the plugin SIGKILLed mid-write; lightningd restarts it and goes on
    let rec = &trace[2 * third];
    node.start_if_needed(trace, 2 * third).unwrap();
    node.plugin().unwrap().send_db_write(rec.data_version, &rec.writes).unwrap();
    node.plugin.take().unwrap().kill().unwrap();
    if !node.db.is_autocommit() {
        node.db.execute_batch("ROLLBACK").unwrap();
    }
    node.start().unwrap();
    node.initialized = false;
    let near_end = trace.len() - 20;
    assert_eq!(node.replay(trace, 2 * third..near_end).unwrap(), None);
    // compaction over the wire: on a second connection, beside the writer
    let v = node.plugin().unwrap().cli("backup-compact", serde_json::json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    assert_eq!(node.replay(trace, near_end..trace.len()).unwrap(), None);
    wait_for_log(node.plugin().unwrap(), "info", "compacted on the server into generation 2");
    node.stop().unwrap();
    drop(server);
    let _ = std::fs::remove_file(ldir.join("lightningd.sqlite3"));
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let out = tmp.path().join("restored");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("hsm_secret"), [5u8; 32]).unwrap();
    std::fs::copy(ldir.join("backup.lock"), out.join("backup.lock")).unwrap();
    let db = restore_cli(&u, &out);
    assert_same(&db, &final_db("channels", tmp.path()));
    drop(server);
}

/// What the Python plugin's README and tests run, against our binaries: the server's backup
/// made by a bare `backup-cli init file://...` (sealed by default, no key), `backup-cli
/// server file://... HOST:PORT`, the node's `backup-cli init socket:... --lightning-dir DIR`
/// (its database uploaded), the real plugin through a real trace with a compaction over the
/// wire, and `backup-cli restore socket:... DIR`. Every byte the server stores is scanned:
/// nothing of the node is readable; without the key or with a wrong one nothing is written;
/// a record tampered with on the server is found, by offset.
#[test]
fn sealed_through_the_server_the_python_plugins_command_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("node.bkp");
    let o = cli(&["init", &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let u = format!("socket:127.0.0.1:{port}");
    let (ldir, _) = node_dir(tmp.path(), "regtest", 7);
    let trace = trace("channels");
    let half = trace.len() / 2;
    let node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    for r in &trace[..half] {
        node.run_without_plugin(r).unwrap();
    }
    drop(node);
    let state_home = tmp.path().join("state");
    let o = Command::new(CLI)
        .args(["init", &u, "--lightning-dir", ldir.to_str().unwrap()])
        .env("XDG_STATE_HOME", &state_home)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Found an existing database"), "{}", stdout(&o));
    assert!(stdout(&o).contains("Successfully written initial snapshot"), "{}", stdout(&o));
    assert!(stdout(&o).contains("encrypted with a key derived from the node's hsm_secret"), "{}", stdout(&o));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap();
    assert_eq!(meta["sealed"], true);
    assert_eq!(meta["lightning_dir"], ldir.to_str().unwrap(), "{meta}");
    assert!(meta["key_fingerprint"].is_string(), "{meta}");
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    let near_end = trace.len() - 20;
    assert_eq!(node.replay(trace, half..near_end).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    // compaction over the wire: read back, opened and folded by the node, sealed snapshot
    // staged, then the switch with the tail resealed; the node goes on writing meanwhile
    let v = node.plugin().unwrap().cli("backup-compact", serde_json::json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    assert_eq!(node.replay(trace, near_end..trace.len()).unwrap(), None);
    wait_for_log(node.plugin().unwrap(), "info", "compacted on the server into generation 3");
    node.stop().unwrap();
    drop(node);
    drop(server);
    // nothing the server stores is readable (the scan is shown to work by the control below)
    let found = crate::sealed::readable(&root, &crate::sealed::needles("channels"));
    assert!(found.is_empty(), "readable on the server: {found:?}");
    let _server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    // the Python plugin's restore: into a lightning dir holding hsm_secret
    let out = tmp.path().join("restored");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(ldir.join("hsm_secret"), out.join("hsm_secret")).unwrap();
    std::fs::copy(ldir.join("backup.lock"), out.join("backup.lock")).unwrap();
    let db = restore_cli(&u, &out);
    assert_same(&db, &final_db("channels", tmp.path()));
    let o = Command::new(CLI).args(["verify", &u]).env("CLN_BACKUP_LIGHTNING_DIR", &ldir).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Verified data_version"), "{}", stdout(&o));
    // a wrong key: refused by its fingerprint, nothing written
    let wrong = tmp.path().join("wrong_hsm_secret");
    std::fs::write(&wrong, [8u8; 32]).unwrap();
    let dest = tmp.path().join("wrong.sqlite3");
    let o = Command::new(CLI)
        .args(["restore", &u, dest.to_str().unwrap(), "--hsm-secret", wrong.to_str().unwrap()])
        .env("CLN_BACKUP_LIGHTNING_DIR", &ldir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("this backup was sealed with key"), "{}", stderr(&o));
    assert!(!dest.exists());
    // no key: the transport key comes from a copy of hsm_secret elsewhere, the backup's key
    // is found nowhere (not beside DEST, not in the lightning dir recorded at init)
    let transport = tmp.path().join("transport");
    std::fs::create_dir_all(&transport).unwrap();
    std::fs::rename(ldir.join("hsm_secret"), transport.join("hsm_secret")).unwrap();
    std::fs::copy(ldir.join("backup.lock"), transport.join("backup.lock")).unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = Command::new(CLI)
        .args(["restore", &u, empty.to_str().unwrap()])
        .env("CLN_BACKUP_LIGHTNING_DIR", &transport)
        .env("XDG_STATE_HOME", tmp.path().join("nostate"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no key for this sealed backup"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing written");
    std::fs::rename(transport.join("hsm_secret"), ldir.join("hsm_secret")).unwrap();
    drop(_server);
    // a record's sealed payload changed on the server, its checksums made valid (as anyone
    // with the server's disk can); two of the same length swapped when there are two
    let j = cln_backup::layout::Layout::new(&root).list().unwrap().journal;
    let good = std::fs::read(&j).unwrap();
    let mut r = journal::JournalReader::open(&j).unwrap();
    let mut recs = vec![];
    while let Some(rec) = r.next_record().unwrap() {
        recs.push((rec.offset as usize, rec.payload.len()));
    }
    let h = journal::RECORD_HEADER_LEN;
    let mut bad = good.clone();
    let pair = (0..recs.len())
        .flat_map(|i| (i + 1..recs.len()).map(move |k| (i, k)))
        .find(|&(i, k)| recs[i].1 == recs[k].1 && recs[i].1 > 40);
    let oi = match pair {
        Some((i, k)) => {
            let (oi, ok, len) = (recs[i].0, recs[k].0, recs[i].1);
            let (pi, pk) = (good[oi + h..oi + h + len].to_vec(), good[ok + h..ok + h + len].to_vec());
            crate::sealed::put_payload(&mut bad, oi, &pk);
            crate::sealed::put_payload(&mut bad, ok, &pi);
            oi
        }
        None => {
            let (oi, len) = *recs.iter().find(|r| r.1 > 40).expect("a record on the server");
            let mut p = good[oi + h..oi + h + len].to_vec();
            p[len / 2] ^= 0x40;
            crate::sealed::put_payload(&mut bad, oi, &p);
            oi
        }
    };
    std::fs::write(&j, &bad).unwrap();
    let _server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let dest = tmp.path().join("tampered.sqlite3");
    let o = Command::new(CLI)
        .args(["restore", &u, dest.to_str().unwrap()])
        .env("CLN_BACKUP_LIGHTNING_DIR", &ldir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("fails authentication") && stderr(&o).contains(&format!("offset {oi}")),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains(&u), "names the server: {}", stderr(&o));
    assert!(!dest.exists());
    let o = Command::new(CLI).args(["verify", &u]).env("CLN_BACKUP_LIGHTNING_DIR", &ldir).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("offset {oi}")), "{}", stderr(&o));
}

/// The control: the same path with `--no-encryption` leaves the node readable on the
/// server, so the scan above finds what is there.
#[test]
fn no_encryption_through_the_server_is_readable_there() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("node.bkp");
    let o = cli(&["init", &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let u = format!("socket:127.0.0.1:{port}");
    let (ldir, _) = node_dir(tmp.path(), "regtest", 9);
    let o = Command::new(CLI)
        .args(["init", "--no-encryption", &u, "--lightning-dir", ldir.to_str().unwrap()])
        .env("XDG_STATE_HOME", tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    let trace = trace("channels");
    assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    drop(server);
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap();
    assert_eq!(meta["sealed"], false);
    let found = crate::sealed::readable(&root, &crate::sealed::needles("channels"));
    assert!(found.iter().any(|f| f.contains("INSERT INTO")), "{found:?}");
    assert!(found.len() > 10, "{found:?}");
    let _server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    assert_restores_equal(&u, &ldir, tmp.path(), "channels");
}

/// add-destination of a `socket:` URL next to a sealed file backup: the server's empty
/// backup is seeded with the file copy's generation as it is (same backup id: the seals
/// hold), the plugin then writes both (the file copy seals once, the server stores the same
/// bytes), and a restore from the server alone equals the node; nothing is readable there.
#[test]
fn add_destination_socket_next_to_a_sealed_file_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (ldir, file) = node_with_file_copy(tmp.path(), 12);
    let trace = trace("channels");
    let half = trace.len() / 2;
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    let root = tmp.path().join("server.bkp");
    let o = cli(&["init", &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let u = format!("socket:127.0.0.1:{port}");
    let state_home = tmp.path().join("state");
    let add = || {
        Command::new(CLI)
            .args(["add-destination", "--lightning-dir", ldir.to_str().unwrap(), &u])
            .env("XDG_STATE_HOME", &state_home)
            .output()
            .unwrap()
    };
    // the file copy is at generation 1, as the server's empty backup: the records go over as they are
    let o = add();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sealed with the backup's key"), "{}", stdout(&o));
    let file_meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.join("backup.json")).unwrap()).unwrap();
    let server_meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap();
    assert_eq!(server_meta, file_meta, "one backup id and key for every copy");
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["server_keys"][&u], identity::to_hex(&server.public_key()), "{lock}");
    // a second add into the (no longer empty) server backup is refused
    let o = add();
    assert!(!o.status.success());
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    for d in st["destinations"].as_array().unwrap() {
        assert_eq!(d["state"], "in-sync", "{st:#}");
    }
    assert_eq!(st["destinations"][1]["kind"], "socket", "{st:#}");
    node.stop().unwrap();
    drop(node);
    drop(server);
    let found = crate::sealed::readable(&root, &crate::sealed::needles("channels"));
    assert!(found.is_empty(), "readable on the server: {found:?}");
    let _server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let dest = tmp.path().join("from-server.sqlite3");
    let o = Command::new(CLI)
        .args(["restore", &u, dest.to_str().unwrap()])
        .env("XDG_STATE_HOME", &state_home)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &final_db("channels", tmp.path()));
}

/// Sealed compactions over the wire through the seam the plugin uses (stage on a second
/// connection, then the switch with the tail resealed under the writer's lock), the server
/// SIGKILLed at a random point of each: every write kept, and the server's copy restores
/// equal with the key.
#[test]
fn server_sigkilled_during_sealed_compactions_keeps_every_write() {
    use cln_backup::destination::{Destination, Shared};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("node.bkp");
    assert!(cli(&["init", &url(&root)]).status.success());
    let port = free_port();
    let mut server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let u = format!("socket:127.0.0.1:{port}");
    let (ldir, _) = node_dir(tmp.path(), "node", 23);
    let o = Command::new(CLI)
        .args(["init", "--lightning-dir", ldir.to_str().unwrap(), &u])
        .env("XDG_STATE_HOME", tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let d = cln_backup::destination::socket::node::connect_node(&ldir, &u, BOUND).unwrap();
    let s = cln_backup::destination::socket::seam::Socket::open(d, &ldir).unwrap();
    let shared: Shared = Arc::new(Mutex::new(Box::new(s) as Box<dyn Destination>));
    let trace = trace("channels");
    let mut rng = Rng(29);
    let mut compacted = 0;
    let append = |records: &[cln_backup::sim::TraceRecord]| {
        let mut buf = vec![];
        for r in records {
            let mut g = shared.lock().unwrap();
            let replace = match versions::decide(g.tip().position, r.data_version, r.kind()) {
                Decision::Append => false,
                Decision::ReplaceLast => true,
                other => panic!("data_version {}: {other:?}", r.data_version),
            };
            buf.clear();
            journal::encode_record(&mut buf, r.data_version, r.kind(), &r.writes);
            g.append(r.data_version, r.kind(), replace, &buf).unwrap();
        }
    };
    // The last records come after the SIGKILLs, so that the last, undisturbed compaction
    // has something to fold even when the last killed one finished.
    let (head, rest) = trace.split_at(trace.len() - 5);
    // the first compaction undisturbed: how long one takes here (see the plaintext test)
    let mut took = Duration::ZERO;
    for (i, chunk) in head.chunks(head.len() / 10 + 1).enumerate() {
        append(chunk);
        let job = shared.lock().unwrap().background_compaction(shared.clone()).expect("a sealed compaction job");
        let work = tmp.path().join(format!("work-{i}"));
        if i == 0 {
            let t = std::time::Instant::now();
            let m = job(&work).unwrap_or_else(|e| panic!("the undisturbed compaction failed: {e}"));
            assert!(m.contains("compacted on the server"), "{m}");
            took = t.elapsed();
            continue;
        }
        let compaction = std::thread::spawn(move || job(&work));
        // in the first half: the first compaction, on a cold cache, can take twice as long
        // as the later ones, and a SIGKILL during the local fold is ridden out by reconnecting
        std::thread::sleep(Duration::from_micros(rng.below((took.as_micros() / 2).max(1) as u64)));
        server.restart();
        if compaction.join().unwrap().is_ok_and(|m| m.contains("compacted on the server")) {
            compacted += 1;
        }
    }
    let killed = head.chunks(head.len() / 10 + 1).len() - 1;
    eprintln!("{compacted} of {killed} sealed compactions finished before their SIGKILL (one took {took:?})");
    assert!(compacted < killed, "no compaction was cut by the SIGKILL: the test proved nothing");
    // the rest of the way, and one more, undisturbed
    append(rest);
    let job = shared.lock().unwrap().background_compaction(shared.clone()).unwrap();
    let m = job(&tmp.path().join("work-last")).unwrap();
    assert!(m.contains("compacted on the server"), "{m}");
    drop(shared);
    let found = crate::sealed::readable(&root, &crate::sealed::needles("channels"));
    assert!(found.is_empty(), "readable on the server: {found:?}");
    let db = restore_cli(&u, &ldir);
    assert_same(&db, &final_db("channels", tmp.path()));
}

/// A new node's `init` against `u` (no hsm_secret yet, so the server's key is only
/// pinned), then the hsm_secret lightningd's first start makes: its lightning dir.
fn new_node(tmp: &Path, u: &str, plain: bool, seed: u8) -> PathBuf {
    let ldir = tmp.join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let mut args = vec!["init", "--lightning-dir", ldir.to_str().unwrap(), u];
    if plain {
        args.insert(1, "--no-encryption");
    }
    let o = Command::new(CLI).args(&args).env("XDG_STATE_HOME", tmp.join("state")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(ldir.join("hsm_secret"), [seed; 32]).unwrap();
    ldir
}

/// The server's copy restored with the node's key, equal to `fixture`'s final database.
fn assert_restores_equal(u: &str, ldir: &Path, tmp: &Path, fixture: &str) {
    let out = tmp.join("out.sqlite3");
    let o = Command::new(CLI)
        .args(["restore", u, out.to_str().unwrap()])
        .env("CLN_BACKUP_LIGHTNING_DIR", ldir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&out, &final_db(fixture, tmp));
}

/// A new node (no hsm_secret at init) with an empty server backup, made with or without
/// `--no-encryption`: the plugin's first connection sends a backup.json before the first
/// write, sealed unless the node's init said `--no-encryption`. The node's choice rules the
/// empty backup, whatever the server's init chose.
#[test]
fn a_new_nodes_first_connection_seals_unless_it_chose_plaintext() {
    for (server_plain, plain) in [(true, false), (true, true), (false, false), (false, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let root = if server_plain {
            server_backup(tmp.path(), "node.bkp")
        } else {
            let root = tmp.path().join("node.bkp");
            assert!(cli(&["init", &url(&root)]).status.success());
            root
        };
        let port = free_port();
        let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
        let u = format!("socket:127.0.0.1:{port}");
        let ldir = new_node(tmp.path(), &u, plain, 31);
        let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
        let trace = trace("small");
        assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
        node.stop().unwrap();
        drop(node);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap();
        assert_eq!(meta["sealed"], !plain, "server_plain={server_plain}: {meta}");
        let j = std::fs::read(cln_backup::layout::Layout::new(&root).list().unwrap().journal).unwrap();
        assert_eq!(j.windows(11).any(|w| w == b"INSERT INTO"), plain, "server_plain={server_plain} plain={plain}");
        assert_restores_equal(&u, &ldir, tmp.path(), "small");
        drop(server);
    }
}

/// A node with a sealed file copy and a socket copy (added by `add-destination`),
/// `backup-min-destinations=1`: the server is SIGKILLed mid-trace, the node goes on and
/// compacts its file copy into generation 2, so the server's copy (generation 1) can no
/// longer be caught up record by record. Returned with the node running, the server down.
struct LeftBehind {
    tmp: tempfile::TempDir,
    ldir: PathBuf,
    file: PathBuf,
    root: PathBuf,
    server: Server,
    u: String,
    node: cln_backup::sim::Node,
    /// The file copy as it was when the socket copy was added, and halfway before that.
    at_add: PathBuf,
    older: PathBuf,
}

/// A node's lightning dir with a file copy made by `init`: (the dir, the copy's root).
fn node_with_file_copy(tmp: &Path, seed: u8) -> (PathBuf, PathBuf) {
    let (ldir, _) = node_dir(tmp, "regtest", seed);
    let file = tmp.join("file.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&file)]);
    assert!(o.status.success(), "{}", stderr(&o));
    (ldir, file)
}

/// A server's empty backup, served, and added to the node's destinations by
/// `add-destination` (seeded from its file copy): (its root, the server, its URL).
fn add_socket_copy(tmp: &Path, ldir: &Path) -> (PathBuf, Server, String) {
    let root = tmp.join("server.bkp");
    assert!(cli(&["init", &url(&root)]).status.success());
    let port = free_port();
    let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
    let u = format!("socket:127.0.0.1:{port}");
    let o = Command::new(CLI)
        .args(["add-destination", "--lightning-dir", ldir.to_str().unwrap(), &u])
        .env("XDG_STATE_HOME", tmp.join("state"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (root, server, u)
}

fn left_behind(seed: u8, upto: usize) -> LeftBehind {
    let tmp = tempfile::tempdir().unwrap();
    let (ldir, _) = node_dir(tmp.path(), "regtest", seed);
    let file = tmp.path().join("file.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&file)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = trace("channels");
    let (q, half) = (trace.len() / 8, trace.len() / 4);
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..q).unwrap(), None);
    node.stop().unwrap();
    let older = tmp.path().join("older.bkp");
    assert!(Command::new("cp").arg("-a").arg(&file).arg(&older).status().unwrap().success());
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(trace, q..half).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    let at_add = tmp.path().join("at-add.bkp");
    assert!(Command::new("cp").arg("-a").arg(&file).arg(&at_add).status().unwrap().success());
    let (root, mut server, u) = add_socket_copy(tmp.path(), &ldir);
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    node.options = serde_json::json!({"backup-min-destinations": 1, "backup-reconnect-timeout": 1});
    let third = half + (trace.len() - half) / 3;
    assert_eq!(node.replay(trace, half..third).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][1]["state"], "in-sync", "{st:#}");
    server.kill();
    assert_eq!(node.replay(trace, third..upto).unwrap(), None, "min 1: lightningd goes on");
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][1]["state"], "behind", "{st:#}");
    let v = node.plugin().unwrap().cli("backup-compact", serde_json::json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    wait_for_log(node.plugin().unwrap(), "info", "into generation 2");
    LeftBehind { tmp, ldir, file, root, server, u, node, at_add, older }
}

/// The node's key and the server's pin, beside a restore's destination.
fn restore_into(lb: &LeftBehind, name: &str) -> PathBuf {
    let out = lb.tmp.path().join(name);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(lb.ldir.join("hsm_secret"), out.join("hsm_secret")).unwrap();
    std::fs::copy(lb.ldir.join("backup.lock"), out.join("backup.lock")).unwrap();
    out
}

/// The socket copy left behind by a compaction is re-seeded with the file copy's new
/// generation when the server is back, is in sync again, takes the rest of the trace, and
/// restores equal to the node row for row.
#[test]
fn a_socket_copy_left_behind_by_a_compaction_is_reseeded() {
    let trace = trace("channels");
    let two_thirds = trace.len() * 2 / 3;
    let mut lb = left_behind(41, two_thirds);
    let st = lb.node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][0]["generation"], 2, "{st:#}");
    assert_eq!(st["destinations"][1]["generation"], 1, "{st:#}");
    lb.server.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = lb.node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
        if st["destinations"][1]["state"] == "in-sync" {
            break st;
        }
        assert!(Instant::now() < deadline, "the socket copy never caught up: {st:#}\n{:?}", lb.server.lines());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["destinations"][1]["generation"], 2, "{st:#}");
    assert_eq!(st["destinations"][1]["latest_version"], st["destinations"][0]["latest_version"], "{st:#}");
    lb.server.wait_log("re-seeded with generation 2");
    wait_for_log(lb.node.plugin().unwrap(), "info", "is up to date again");
    assert_eq!(lb.node.replay(trace, two_thirds..trace.len()).unwrap(), None);
    let st = lb.node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    for d in st["destinations"].as_array().unwrap() {
        assert_eq!(d["state"], "in-sync", "{st:#}");
    }
    lb.node.stop().unwrap();
    // the old generation is gone from the server, and nothing is readable there
    let files: Vec<String> =
        std::fs::read_dir(&lb.root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!files.iter().any(|f| f.starts_with("0000000000000001-")), "{files:?}");
    let found = crate::sealed::readable(&lb.root, &crate::sealed::needles("channels"));
    assert!(found.is_empty(), "readable on the server: {found:?}");
    let out = restore_into(&lb, "restored");
    let db = restore_cli(&lb.u, &out);
    assert_same(&db, &final_db("channels", lb.tmp.path()));
    let _ = &lb.file;
}

/// What a restore of `u` gives: its data_version.
fn restored_version(lb: &LeftBehind, u: &str, name: &str) -> (u32, PathBuf) {
    let out = restore_into(lb, name);
    let o = cli(&["restore", u, out.to_str().unwrap()]);
    assert!(o.status.success(), "restore failed: {}", stderr(&o));
    let s = cln_backup::restore::verify_with(&out, &cln_backup::keys::KeySource::lightning_dir(&out), &mut |_, _| {});
    drop(s);
    let text = stdout(&o);
    let v = text
        .split("Restored data_version ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no version in: {text}"));
    (v, out.join("lightningd.sqlite3"))
}

/// A server SIGKILLed in the middle of a re-seed (its snapshot or journal on the way, or at
/// a random moment) restores to the old copy or to the new one, never a mix; and what must
/// never go there is refused with the copy left as it was: another backup's generation, an
/// older copy of the same backup.
#[test]
fn a_reseed_cut_by_sigkill_leaves_the_old_or_the_new_copy() {
    use cln_backup::destination::Destination;
    let trace = trace("channels");
    let mut lb = left_behind(43, trace.len());
    lb.node.stop().unwrap();
    let saved = lb.tmp.path().join("server-saved.bkp");
    assert!(Command::new("cp").arg("-a").arg(&lb.root).arg(&saved).status().unwrap().success());
    let new = cln_backup::destination::inspect::inspect(&url(&lb.file), &lb.ldir).unwrap();
    assert_eq!(new.files.generation, 2);
    let fin = final_db("channels", lb.tmp.path());
    lb.server.spawn();
    let (old_v, old_db) = restored_version(&lb, &lb.u.clone(), "old");
    assert!(old_v < new.tip.position.version, "{old_v}");
    let open = |lb: &LeftBehind| {
        let d = cln_backup::destination::socket::node::connect_node(&lb.ldir, &lb.u, Duration::from_secs(2)).unwrap();
        cln_backup::destination::socket::seam::Socket::open(d, &lb.ldir).unwrap()
    };
    let mut rng = Rng(43);
    let (mut cut, mut done) = (0, 0);
    for round in 0..8 {
        lb.server.kill();
        std::fs::remove_dir_all(&lb.root).unwrap();
        assert!(Command::new("cp").arg("-a").arg(&saved).arg(&lb.root).status().unwrap().success());
        lb.server.spawn();
        let mut s = open(&lb);
        let files = new.files.clone();
        let job = std::thread::spawn(move || s.install(&files).map_err(|e| e.explain()));
        if round % 2 == 0 {
            // the moment the first of its files arrives on the server
            let deadline = Instant::now() + Duration::from_secs(10);
            while !job.is_finished() && Instant::now() < deadline {
                let tmp_there = std::fs::read_dir(&lb.root)
                    .unwrap()
                    .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
                if tmp_there {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(120)));
        }
        lb.server.kill();
        match job.join().unwrap() {
            Ok(()) => done += 1,
            Err(_) => cut += 1,
        }
        lb.server.spawn();
        assert_no_tmp_left(&lb.root);
        let (v, db) = restored_version(&lb, &lb.u.clone(), &format!("round-{round}"));
        if v == old_v {
            assert_same(&db, &old_db);
        } else {
            assert_eq!(v, new.tip.position.version, "round {round}: neither the old copy nor the new");
            assert_same(&db, &fin);
        }
    }
    eprintln!("{cut} re-seeds cut by the SIGKILL, {done} finished before it");
    assert!(cut >= 1, "no re-seed was cut: the test proved nothing");
    // undisturbed: the new copy
    let mut s = open(&lb);
    s.install(&new.files).unwrap();
    assert_eq!(s.tip().position.version, new.tip.position.version);
    assert_eq!(s.tip().generation, 2);
    // another backup's generation: refused, nothing changed
    let (other_ldir, _) = node_dir(lb.tmp.path(), "other", 44);
    let other = lb.tmp.path().join("other.bkp");
    let o = cli(&["init", "--lightning-dir", other_ldir.to_str().unwrap(), &url(&other)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut onode = cln_backup::sim::Node::new(Path::new(BIN), &other_ldir).unwrap();
    assert_eq!(onode.replay(trace, 0..trace.len()).unwrap(), None);
    onode.stop().unwrap();
    let theirs = cln_backup::destination::inspect::inspect(&url(&other), &other_ldir).unwrap();
    let e = s.install(&theirs.files).unwrap_err().explain();
    assert!(e.contains("another backup"), "{e}");
    // an older copy of the same backup (generation 1, a quarter of the trace): never a roll back
    let older = cln_backup::destination::inspect::inspect(&url(&lb.older), &lb.ldir).unwrap();
    let e = s.install(&older.files).unwrap_err().explain();
    assert!(e.contains("never rolled back"), "{e}");
    drop(s);
    let (v, db) = restored_version(&lb, &lb.u.clone(), "after-refusals");
    assert_eq!(v, new.tip.position.version);
    assert_same(&db, &fin);
    let _ = &lb.at_add;
}

/// `restore --lightning-dir` reads a socket copy too (downloaded with the node's key and
/// the pinned server key from that dir) and takes it when it is ahead of the file copy, or
/// when it is the only one, and says why.
#[test]
fn restore_from_the_lightning_dir_takes_the_socket_copy_when_it_is_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let (ldir, file) = node_with_file_copy(tmp.path(), 45);
    let trace = trace("small");
    let half = trace.len() / 2;
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    let stale = tmp.path().join("stale.bkp");
    assert!(Command::new("cp").arg("-a").arg(&file).arg(&stale).status().unwrap().success());
    let (_root, server, u) = add_socket_copy(tmp.path(), &ldir);
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, half..trace.len()).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    // the file copy is found stale (as after its disk was put back from an older copy)
    std::fs::remove_dir_all(&file).unwrap();
    assert!(Command::new("cp").arg("-a").arg(&stale).arg(&file).status().unwrap().success());
    let restore = |name: &str| {
        let out = tmp.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let dest = out.join("lightningd.sqlite3");
        let o = Command::new(CLI)
            .args(["restore", "--lightning-dir", ldir.to_str().unwrap(), dest.to_str().unwrap()])
            .env("XDG_STATE_HOME", tmp.path().join("nothing-recorded"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
        assert_same(&dest, &final_db("small", tmp.path()));
        stdout(&o)
    };
    let out = restore("ahead");
    assert!(out.contains(&format!("Restoring from {u}: it holds data_version")), "{out}");
    assert!(out.contains(&format!("{} holds only up to data_version", url(&file))), "{out}");
    // a lock that names the socket copy alone
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    let pin = lock["server_keys"][&u].clone();
    let alone = serde_json::json!({"backend_url": u, "server_key": pin});
    std::fs::write(ldir.join("backup.lock"), alone.to_string()).unwrap();
    let out = restore("alone");
    assert!(out.contains(&format!("Restoring from {u}: it is the only copy")), "{out}");
    // a server key that is not the pinned one: the copy is unreadable, said so
    let wrong = serde_json::json!({"backend_url": u, "server_key": identity::to_hex(&[7u8; 32])});
    std::fs::write(ldir.join("backup.lock"), wrong.to_string()).unwrap();
    let o =
        cli(&["restore", "--lightning-dir", ldir.to_str().unwrap(), tmp.path().join("x.sqlite3").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("unreadable"), "{}", stdout(&o));
    drop(server);
}

/// A node whose backup.lock pins its sealed backup, and the server's copy replaced by an
/// empty plaintext one: the plugin refuses it as it is (lightningd halts, nothing is
/// written), and does not make it a new sealed backup of its own.
#[test]
fn an_empty_plaintext_copy_put_in_place_of_a_pinned_one_is_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, mut server, u, _port) = serve_plaintext_backup(tmp.path());
    let ldir = new_node(tmp.path(), &u, false, 31);
    let trace = trace("small");
    let half = trace.len() / 2;
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(trace, 0..half).unwrap(), None);
    node.stop().unwrap();
    drop(node);
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    let pin = lock["sealed_backup_id"].as_str().expect("the first start pins the sealed backup").to_string();
    // the server's copy swapped for an empty plaintext backup (same server key, same pairing)
    let why = halts_with_the_copy_untouched(&ldir, &root, &mut server, half..trace.len(), || {
        std::fs::remove_dir_all(&root).unwrap();
        server_backup(tmp.path(), "node.bkp");
    });
    assert!(why.contains("a plaintext backup") && why.contains(&pin), "{why}");
    let st = cln_backup::layout::Layout::new(&root).list().unwrap();
    assert_eq!(std::fs::metadata(st.journal).unwrap().len(), cln_backup::journal::HEADER_LEN);
}

/// Starts the node on `ldir` after `swap` changed its server's copy (the server down
/// meanwhile): lightningd must halt at the first write of `range`, and the copy's journal
/// and backup.json stay as `swap` left them. The halt's answer and the plugin's log.
fn halts_with_the_copy_untouched(
    ldir: &Path,
    root: &Path,
    server: &mut Server,
    range: std::ops::Range<usize>,
    swap: impl FnOnce(),
) -> String {
    server.kill();
    swap();
    let before = (journal_data(root), std::fs::read(root.join("backup.json")).ok());
    server.spawn();
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), ldir).unwrap();
    let start = range.start;
    let (at, halt) = node.replay(trace("small"), range).unwrap().expect("lightningd went on");
    assert_eq!(at, start, "{halt}");
    let logs = node.plugin().unwrap().logs();
    drop(node);
    let after = (journal_data(root), std::fs::read(root.join("backup.json")).ok());
    assert!(!after.0.windows(11).any(|w| w == b"INSERT INTO"), "plaintext written to the server");
    assert_eq!(after, before, "the copy was written or stamped");
    format!("{halt}\n{logs:?}")
}

/// Records in a backup's current journal.
fn records_in(root: &Path) -> u64 {
    let path = cln_backup::layout::Layout::new(root).list().unwrap().journal;
    let mut r = journal::JournalReader::open(&path).unwrap();
    let mut n = 0;
    while r.next_record().unwrap().is_some() {
        n += 1;
    }
    n
}

/// A socket copy left behind while its server was down (`backup-min-destinations=1`) is
/// brought up to date at the node's next start with exactly the records it lacks: the
/// server names its last record, so nothing it holds goes over again, not even its last
/// transaction (which a catch-up that could not tell would replace). Then both copies hold
/// the same bytes, take the rest of the trace, and the server's restores equal.
#[test]
fn a_socket_copy_behind_at_a_restart_gets_only_what_it_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let (ldir, file) = node_with_file_copy(tmp.path(), 47);
    let (root, mut server, u) = add_socket_copy(tmp.path(), &ldir);
    let trace = trace("channels");
    let (a, b) = (trace.len() / 3, trace.len() / 2);
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    node.options = serde_json::json!({"backup-min-destinations": 1, "backup-reconnect-timeout": 1});
    assert_eq!(node.replay(trace, 0..a).unwrap(), None);
    assert_eq!(status(&mut node)["destinations"][1]["state"], "in-sync");
    server.kill();
    assert_eq!(node.replay(trace, a..b).unwrap(), None, "min 1: lightningd goes on");
    // behind, or failed when the trace restarted lightningd meanwhile (it could not be opened)
    assert_ne!(status(&mut node)["destinations"][1]["state"], "in-sync");
    node.stop().unwrap();
    let lacking = records_in(&file) - records_in(&root);
    assert!(lacking > 10, "{lacking}");
    server.spawn();
    node.start().unwrap();
    let line = wait_for_log(node.plugin().unwrap(), "info", "is up to date again");
    assert!(line.contains(&format!("; {lacking} record(s) copied")), "{lacking} expected: {line}");
    assert_eq!(journal_data(&file), journal_data(&root), "the copies differ");
    assert_eq!(node.replay(trace, b..trace.len()).unwrap(), None);
    let st = status(&mut node);
    for d in st["destinations"].as_array().unwrap() {
        assert_eq!(d["state"], "in-sync", "{st:#}");
    }
    node.stop().unwrap();
    assert_restores_equal(&u, &ldir, tmp.path(), "channels");
}

/// A server stopped between the two steps of storing a node's backup.json in an empty
/// backup (the journal's header first, then backup.json) finds the header disagreeing with
/// backup.json over an empty journal. At its next start it puts the backup back as it was
/// and says so; the node's backup.json then goes in, and the trace through the server
/// restores equal. Both cuts: a plaintext backup's header already sealed, and a sealed one's
/// already plaintext.
#[test]
fn a_sealing_change_cut_between_its_two_steps_is_undone_at_the_next_start() {
    for server_plain in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("node.bkp");
        let ru = url(&root);
        let o = cli(&if server_plain { vec!["init", "--no-encryption", &ru] } else { vec!["init", &ru] });
        assert!(o.status.success(), "{}", stderr(&o));
        let meta_before = std::fs::read(root.join("backup.json")).ok();
        // the cut: the header rewritten with the other sealing, backup.json not yet
        let journal = cln_backup::layout::Layout::new(&root).list().unwrap().journal;
        let h = journal::JournalReader::open(&journal).unwrap().header;
        assert_eq!(h.sealed, !server_plain);
        cln_backup::writer::replace_empty_journal(&journal, journal::Header { sealed: !h.sealed, ..h }).unwrap();
        let port = free_port();
        let server = Server::start(&[&root], &format!("127.0.0.1:{port}"), &[]);
        server.wait_log("the empty backup is back as it was");
        assert_eq!(journal::JournalReader::open(&journal).unwrap().header, h, "server_plain={server_plain}");
        assert_eq!(std::fs::read(root.join("backup.json")).ok(), meta_before);
        let u = format!("socket:127.0.0.1:{port}");
        let ldir = new_node(tmp.path(), &u, false, 32);
        let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
        let trace = trace("small");
        assert_eq!(node.replay(trace, 0..trace.len()).unwrap(), None);
        node.stop().unwrap();
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("backup.json")).unwrap()).unwrap();
        assert_eq!(meta["sealed"], true, "{meta}");
        assert_restores_equal(&u, &ldir, tmp.path(), "small");
        drop(server);
    }
}

/// A new node that chose encryption at init, before its first start has pinned its sealed
/// backup, and a server whose copy is swapped for a plaintext one that is not empty (here
/// one PRAGMA record at version 0, which the node's first transaction would follow): the
/// plugin refuses it at the first start (lightningd halts, nothing is written there)
/// instead of following it and writing the node's records in plaintext.
#[test]
fn a_node_that_chose_encryption_never_writes_into_a_plaintext_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, mut server, u, _port) = serve_plaintext_backup(tmp.path());
    let ldir = new_node(tmp.path(), &u, false, 51);
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    assert_eq!(lock["no_encryption"], false, "{lock}");
    let why = halts_with_the_copy_untouched(&ldir, &root, &mut server, 0..trace("small").len(), || {
        let keys = cln_backup::keys::KeySource::default();
        let (mut w, _) = cln_backup::writer::Writer::open(&root, &keys).unwrap();
        w.apply(0, &["PRAGMA foreign_keys = ON".to_string()]).unwrap();
    });
    assert!(why.contains("holds a plaintext backup, but this node's backup is encrypted"), "{why}");
}
