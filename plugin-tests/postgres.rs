//! The postgres:// destination against a real PostgreSQL (started by `pgharness`): real
//! traces in, restored row for row; restarts, a server gone for good, a synchronous standby,
//! a second writer, crashes between hook and commit, compaction, clear errors.

use std::path::Path;
use std::time::{Duration, Instant};

use cln_backup::destination::postgres::{self as pg, PgDestination};
use cln_backup::destination::Destination;
use cln_backup::error::StoreError;
use cln_backup::journal::{encode_record, Kind};
use cln_backup::sim::TraceRecord;
use cln_backup::versions::{self, Decision};

use crate::common::*;
#[path = "pgcatchup.rs"]
mod pgcatchup;
#[path = "pgharness.rs"]
mod pgharness;

const BOUND: Duration = Duration::from_secs(20);

fn framed(dv: u32, kind: Kind, writes: &[String]) -> Vec<u8> {
    let mut b = vec![];
    encode_record(&mut b, dv, kind, writes);
    b
}

/// Makes an empty backup `name` the way init does: a local generation, uploaded.
fn new_backup(url: &str, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    cln_backup::writer::create(&dir, None, None, None).unwrap();
    pg::create(url, name, &dir, &mut |_, _| {}).unwrap();
}

/// What the plugin does per call: the version decision, then the destination.
fn feed_one(d: &mut PgDestination, r: &TraceRecord) -> Result<(), StoreError> {
    let kind = r.kind();
    let replace = match versions::decide(d.position(), r.data_version, kind) {
        Decision::Append => false,
        Decision::ReplaceLast => true,
        other => panic!("halt at data_version {}: {other:?}", r.data_version),
    };
    d.append(r.data_version, kind, replace, &framed(r.data_version, kind, &r.writes))
}

fn feed(d: &mut PgDestination, recs: &[TraceRecord]) {
    for r in recs {
        if let Err(e) = feed_one(d, r) {
            panic!("append of data_version {} failed: {}", r.data_version, e.explain());
        }
    }
}

/// Downloads + restores backup `name` and returns the database path.
fn restore(url: &str, name: &str, dir: &Path, file: &str) -> (std::path::PathBuf, pg::Downloaded) {
    let dest = dir.join(file);
    let (p, _, d) = pg::restore_from(url, Some(name), &dest, &Default::default(), &mut |_, _| {}, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("restore failed: {}", e.explain()));
    (p, d)
}

fn err_of<T>(r: Result<T, impl Into<StoreError>>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.into().explain(),
    }
}

#[test]
fn pg_replays_real_traces_restores_row_for_row_and_keeps_backups_apart() {
    let url = pgharness::fresh_db("replay");
    let tmp = tempfile::tempdir().unwrap();
    // two nodes' backups in one database
    new_backup(&url, "node-small");
    new_backup(&url, "node-channels");
    let mut a = PgDestination::open(&url, "node-small", BOUND).unwrap();
    let mut b = PgDestination::open(&url, "node-channels", BOUND).unwrap();
    let (small, channels) = (trace("small"), trace("channels"));
    // interleaved, as two nodes would write
    let n = small.len().max(channels.len());
    for i in 0..n {
        if let Some(r) = small.get(i) {
            feed(&mut a, std::slice::from_ref(r));
        }
        if let Some(r) = channels.get(i) {
            feed(&mut b, std::slice::from_ref(r));
        }
    }
    let st = b.status();
    assert_eq!(st["kind"], "postgres");
    assert_eq!(st["backup"], "node-channels");
    assert_eq!(st["database"], url.rsplit('/').next().unwrap().split('?').next().unwrap());
    assert_eq!(st["commit_latency"]["count"], channels.len() as u64);
    assert!(st["commit_latency"]["p99_us"].as_u64().unwrap() >= st["commit_latency"]["p50_us"].as_u64().unwrap());
    assert_eq!(st["synchronous_replication"], false);
    assert_eq!(st["reconnects"], 0);
    assert!(!st["url"].as_str().unwrap().contains(pgharness::PASSWORD), "password shown: {st}");
    let last_tx = channels.iter().rev().find(|r| r.kind() == Kind::Transaction).unwrap();
    assert_eq!(b.position().version, last_tx.data_version);
    let (ra, da) = restore(&url, "node-small", tmp.path(), "a.sqlite3");
    let (rb, db) = restore(&url, "node-channels", tmp.path(), "b.sqlite3");
    assert_eq!(da.records, small.len() as u64);
    assert_eq!(db.records, channels.len() as u64);
    assert_same(&ra, &final_db("small", tmp.path()));
    let (tables, rows) = assert_same(&rb, &final_db("channels", tmp.path()));
    assert!(tables > 30 && rows > 50, "{tables} tables {rows} rows");
}

#[test]
fn pg_restart_mid_trace_loses_nothing_and_doubles_nothing_then_gone_for_good_fails_in_bound() {
    let c = pgharness::private();
    let url = c.create_db("node");
    new_backup(&url, "n");
    let tmp = tempfile::tempdir().unwrap();
    let mut d = PgDestination::open(&url, "n", BOUND).unwrap();
    let t = trace("channels");
    let (first, second) = (400, 800);
    feed(&mut d, &t[..first]);
    // a crash of the server between two calls
    c.stop("immediate");
    c.start().unwrap();
    feed(&mut d, &t[first..second]);
    // and one during a call: the server dies while writes go on, and comes back
    let data = c.data.clone();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        let b = pgharness::bindir().unwrap();
        let pgctl = b.join("pg_ctl");
        let run = |args: &[&str]| {
            let mut cmd = if unsafe { libc::geteuid() } == 0 {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&pgctl);
                c
            } else {
                std::process::Command::new(&pgctl)
            };
            assert!(cmd.args(args).arg("-D").arg(&data).output().unwrap().status.success());
        };
        run(&["stop", "-w", "-m", "immediate"]);
        std::thread::sleep(Duration::from_millis(500));
        let log = data.parent().unwrap().join("log");
        run(&["start", "-w", "-l", log.to_str().unwrap()]);
    });
    feed(&mut d, &t[second..]);
    restarter.join().unwrap();
    assert!(d.reconnects() >= 1, "no reconnect seen: {}", d.status());
    let (r, dl) = restore(&url, "n", tmp.path(), "r.sqlite3");
    assert_eq!(dl.records, t.len() as u64, "records lost or doubled");
    assert_same(&r, &final_db("channels", tmp.path()));

    // gone for good: the write fails within the bound, not later, and says so
    d.set_reconnect_timeout(Duration::from_millis(1500));
    c.stop("immediate");
    let extra = vec!["PRAGMA foreign_keys = ON;".to_string()];
    let at = d.position().version;
    let started = Instant::now();
    let e = err_of(d.append(at, Kind::Outside, false, &framed(at, Kind::Outside, &extra)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(5), "took {took:?}");
    assert!(e.contains("did not complete within 1.5 s"), "{e}");
    assert!(d.status()["last_error"].as_str().unwrap().contains("1.5 s"));
}

#[test]
fn pg_second_writer_refused_and_hook_then_crash_replaces_the_last_transaction() {
    let url = pgharness::fresh_db("lock");
    new_backup(&url, "n");
    let tmp = tempfile::tempdir().unwrap();
    let t = trace("small");
    let mut d = PgDestination::open(&url, "n", BOUND).unwrap();
    let e = err_of(PgDestination::open(&url, "n", BOUND));
    assert!(e.contains("in use by another writer") && e.contains("advisory lock"), "{e}");
    // the same name given in the URL is the same backup
    let e = err_of(PgDestination::open(&format!("{url}&backup=n"), "other", BOUND));
    assert!(e.contains("in use by another writer"), "{e}");
    feed(&mut d, &t[..40]);
    // the hook for a transaction answered, then lightningd died before its commit
    let last = t[..40].iter().rev().find(|r| r.kind() == Kind::Transaction).unwrap().data_version;
    let never = vec![
        "INSERT INTO vars (name, val) VALUES ('never-committed', 'x');".to_string(),
        format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {last}"),
    ];
    let k = versions::classify(last + 1, &never).unwrap();
    d.append(last + 1, k, false, &framed(last + 1, k, &never)).unwrap();
    drop(d); // the plugin is gone with lightningd: its session and lock go too
    let mut d = PgDestination::open(&url, "n", BOUND).unwrap();
    assert_eq!(d.position(), versions::Position { version: last + 1, droppable: true });
    // lightningd restarts at `last` and replays from there: the first call replaces it
    let replace = matches!(versions::decide(d.position(), t[40].data_version, t[40].kind()), Decision::ReplaceLast);
    assert!(replace || t[40].kind() == Kind::Outside, "expected a replacement at {}", t[40].data_version);
    feed(&mut d, &t[40..]);
    let (r, dl) = restore(&url, "n", tmp.path(), "r.sqlite3");
    assert_eq!(dl.records, t.len() as u64);
    assert_same(&r, &final_db("small", tmp.path()));
    let conn = rusqlite::Connection::open(&r).unwrap();
    let n: i64 = conn.query_row("SELECT count(*) FROM vars WHERE name = 'never-committed'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
    // the server refuses what does not follow from what it holds, whatever the caller says
    let at = d.position().version;
    let e = err_of(d.append(at + 5, Kind::Transaction, false, b"x"));
    assert!(e.contains("refusing a transaction at data_version"), "{e}");
    let e = err_of(d.append(at + 1, Kind::Transaction, true, b"x"));
    assert!(e.contains("refusing"), "{e}");
    // called from inside a tokio task (an async hook handler), it works, without panicking
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pragma = vec!["PRAGMA foreign_keys = ON;".to_string()];
    rt.block_on(async { d.append(at, Kind::Outside, false, &framed(at, Kind::Outside, &pragma)) }).unwrap();
    // sequence numbers are never reused: the trace, the replaced record, this one
    assert_eq!(d.status()["next_seq"], t.len() as u64 + 2);
}

#[test]
fn pg_sync_standby_has_what_was_acknowledged_and_a_stopped_standby_bounds_the_write() {
    let primary = pgharness::private();
    let url = primary.create_db("node");
    new_backup(&url, "n");
    let standby = primary.add_sync_standby().unwrap_or_else(|e| panic!("{e}"));
    // remote_apply: acknowledged means visible on the standby (at least "on" is kept)
    let url_apply = format!("{url}&options=-c%20synchronous_commit%3Dremote_apply");
    let t = trace("small");
    let mut d = PgDestination::open(&url_apply, "n", Duration::from_secs(2)).unwrap();
    let st = d.status();
    assert_eq!(st["synchronous_replication"], true, "{st}");
    assert_eq!(st["synchronous_commit"], "remote_apply");
    assert_eq!(st["sync_standbys_connected"], 1);
    feed(&mut d, &t[..30]);
    let on_standby = standby.psql("node", "SELECT max(seq) + 1 FROM cln_backup.records WHERE name = 'n'");
    assert_eq!(on_standby, "30");
    let last = standby.psql("node", "SELECT last_version FROM cln_backup.backups WHERE name = 'n'");
    assert_eq!(last, d.position().version.to_string());
    drop(d);
    // with plain "on" too (the default the destination sets), the standby has it flushed
    let mut d = PgDestination::open(&url, "n", Duration::from_secs(2)).unwrap();
    assert_eq!(d.status()["synchronous_commit"], "on");
    feed(&mut d, &t[30..60]);
    // the standby gone: the commit does not return; the write fails within the bound
    standby.stop("fast");
    let started = Instant::now();
    let r = feed_one(&mut d, &t[60]);
    let took = started.elapsed();
    let e = err_of(r);
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(5), "took {took:?}");
    assert!(e.contains("did not complete within 2.0 s"), "{e}");
    // back: the uncommitted-by-lightningd record is the droppable last one, so a retry of
    // the same call replaces it and the chain goes on
    standby.start().unwrap();
    drop(d);
    let mut d = PgDestination::open(&url, "n", Duration::from_secs(10)).unwrap();
    feed(&mut d, &t[60..]);
    let tmp = tempfile::tempdir().unwrap();
    let (r, _) = restore(&url, "n", tmp.path(), "r.sqlite3");
    assert_same(&r, &final_db("small", tmp.path()));
    drop(standby);
}

#[test]
fn pg_bad_urls_wrong_password_missing_database_or_schema_are_clear_errors() {
    let c = pgharness::shared();
    let good = pgharness::fresh_db("errors");
    for (url, says) in [
        ("postgres://nobody@/db".to_string(), "no host"),
        ("postgres://127.0.0.1/db".to_string(), "no user"),
        (format!("postgres://postgres@127.0.0.1:{}/x?sslmode=verify-ca", c.port), "verify-full"),
        (format!("postgres://postgres@127.0.0.1:{}/x?backup=two%20words", c.port), "may hold only"),
    ] {
        let e = err_of(PgDestination::open(&url, "n", BOUND));
        assert!(e.contains("bad PostgreSQL URL") && e.contains(says), "{url}: {e}");
    }
    // refusals fail at once, not after the reconnect bound
    let started = Instant::now();
    let wrong = format!("postgres://postgres:wrong@127.0.0.1:{}/postgres", c.port);
    let e = err_of(PgDestination::open(&wrong, "n", BOUND));
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong"), "password in message: {e}");
    let e = err_of(PgDestination::open(&c.url("no_such_db"), "n", BOUND));
    assert!(e.contains("database \"no_such_db\" does not exist"), "{e}");
    let e = err_of(PgDestination::open(&good, "n", BOUND));
    assert!(e.contains("no cln_backup schema") && e.contains("backup-cli init"), "{e}");
    new_backup(&good, "somebody");
    let e = err_of(PgDestination::open(&good, "n", BOUND));
    assert!(e.contains("no backup named 'n'") && e.contains("somebody"), "{e}");
    let e = err_of(pg::create(&good, "somebody", Path::new("/nonexistent"), &mut |_, _| {}));
    assert!(e.contains("does not exist"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // nobody listening: bounded
    let closed = format!("postgres://postgres:x@127.0.0.1:{}/db", free_closed_port());
    let started = Instant::now();
    let e = err_of(PgDestination::open(&closed, "n", Duration::from_millis(800)));
    assert!(e.contains("did not complete within 0.8 s") && e.contains("onnection refused"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // the password comes from PGPASSFILE when the URL has none
    let tmp = tempfile::tempdir().unwrap();
    let passfile = tmp.path().join("pgpass");
    std::fs::write(&passfile, format!("127.0.0.1:{}:*:postgres:{}\n", c.port, pgharness::PASSWORD)).unwrap();
    let nopw = good.replace(&format!(":{}@", pgharness::PASSWORD), "@");
    let o = std::process::Command::new(CLI)
        .args(["verify", &format!("{nopw}&backup=somebody")])
        .env("PGPASSFILE", &passfile)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

fn free_closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn pg_compaction_builds_beside_the_writer_switches_briefly_and_removes_old_rows() {
    let url = pgharness::fresh_db("compact");
    new_backup(&url, "n");
    let tmp = tempfile::tempdir().unwrap();
    let t = trace("channels");
    let mut d = PgDestination::open(&url, "n", BOUND).unwrap();
    feed(&mut d, &t[..700]);
    let plan = d.plan().unwrap();
    // the new generation is built on its own connection while appends go on
    let (u2, work) = (url.clone(), tmp.path().to_path_buf());
    let builder = std::thread::spawn(move || pg::build_generation(&u2, "n", plan, &work, None, &mut |_, _, _| {}));
    feed(&mut d, &t[700..900]);
    let next = builder.join().unwrap().unwrap();
    assert!(next.snapshot_bytes > 0);
    d.install_generation(&next).unwrap();
    assert_eq!(d.generation(), 2);
    feed(&mut d, &t[900..]);
    let removed = pg::remove_old_generations(&url, "n", &mut |_| {}).unwrap();
    assert!(removed >= 700, "removed {removed}");
    let (r, dl) = restore(&url, "n", tmp.path(), "r.sqlite3");
    assert_eq!(dl.generation, 2);
    assert!(dl.records < 600, "{} records after compaction", dl.records);
    assert_same(&r, &final_db("channels", tmp.path()));
    // a stale build (from an older generation) is refused
    let e = err_of(d.install_generation(&next));
    assert!(e.contains("built from generation 1"), "{e}");
}

#[test]
fn pg_cli_init_from_a_node_restore_and_verify() {
    let url = pgharness::fresh_db("cli");
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    let t = trace("channels");
    let half = 500;
    let node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    for r in &t[..half] {
        node.run_without_plugin(r).unwrap();
    }
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Found an existing database"), "{}", stdout(&o));
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    let backend = lock["backend_url"].as_str().unwrap().to_string();
    assert!(backend.contains("backup=regtest"), "{backend}");
    // init again under the same name is refused
    std::fs::remove_file(ldir.join("backup.lock")).unwrap();
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("a backup named 'regtest' already exists"), "{}", stderr(&o));
    let mut d = PgDestination::open(&backend, "ignored", BOUND).unwrap();
    assert_eq!(d.name(), "regtest");
    assert_eq!(d.position(), versions::Position { version: t[half - 1].data_version, droppable: false });
    feed(&mut d, &t[half..]);
    // restore and verify through the real binary while the writer holds its lock
    let dest = tmp.path().join("restored.sqlite3");
    let o = cli(&["restore", &backend, dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Restored data_version"), "{}", stdout(&o));
    assert_same(&dest, &final_db("channels", tmp.path()));
    let o = cli(&["verify", &backend]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Verified data_version"), "{}", stdout(&o));
    // errors from the command line say what and where
    let o = cli(&["verify", &format!("{url}&backup=nope")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no backup named 'nope'") && stderr(&o).contains("regtest"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(pgharness::PASSWORD), "{}", stderr(&o));
}

/// A CA and a server certificate for `localhost`, made with the openssl tool.
fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let o = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    };
    for ca in ["ca", "other-ca"] {
        sh(&format!(
            "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN={ca} -keyout {ca}.key -out {ca}.crt 2>/dev/null"
        ));
    }
    sh("openssl req -new -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null");
    sh("printf 'subjectAltName=DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext && \
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out server.crt 2>/dev/null");
}

#[test]
fn pg_tls_require_encrypts_and_verify_full_checks_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    make_certs(tmp.path());
    let c = pgharness::private();
    for f in ["server.crt", "server.key"] {
        let to = c.data.join(f);
        std::fs::copy(tmp.path().join(f), &to).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            assert!(std::process::Command::new("chown").arg("postgres:postgres").arg(&to).status().unwrap().success());
        }
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    c.psql("postgres", "ALTER SYSTEM SET ssl = on");
    c.psql("postgres", "SELECT pg_reload_conf()");
    let plain = c.create_db("node");
    new_backup(&plain, "n");
    let base = plain.split('?').next().unwrap().replace("127.0.0.1", "localhost");
    let ca = tmp.path().join("ca.crt");
    // require: encrypted, certificate not checked (libpq's meaning)
    let mut d = PgDestination::open(&format!("{base}?sslmode=require"), "n", BOUND).unwrap();
    feed(&mut d, &trace("small")[..5]);
    let ssl = c.psql(
        "postgres",
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'cln-backup'",
    );
    assert_eq!(ssl, "t");
    drop(d);
    // verify-full with the right CA and host name
    let mut d = PgDestination::open(&format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display()), "n", BOUND)
        .unwrap_or_else(|e| panic!("{}", e.explain()));
    feed(&mut d, &trace("small")[5..10]);
    drop(d);
    // another CA: refused at once, saying why
    let other = tmp.path().join("other-ca.crt");
    let started = Instant::now();
    let e =
        err_of(PgDestination::open(&format!("{base}?sslmode=verify-full&sslrootcert={}", other.display()), "n", BOUND));
    assert!(e.contains("invalid peer certificate") && e.contains("UnknownIssuer"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "a bad certificate is not retried");
    // the host name not in the certificate
    let by_ip = format!("{}?sslmode=verify-full&sslrootcert={}", base.replace("localhost", "127.0.0.1"), ca.display());
    let e = err_of(PgDestination::open(&by_ip, "n", BOUND));
    assert!(e.contains("certificate not valid for name \"127.0.0.1\"") && e.contains("sslrootcert"), "{e}");
    // a missing root file
    let e =
        err_of(PgDestination::open(&format!("{base}?sslmode=verify-full&sslrootcert=/nonexistent.pem"), "n", BOUND));
    assert!(e.contains("cannot read sslrootcert /nonexistent.pem"), "{e}");
}

/// The trace's first records applied to a fresh SQLite, as the node's database would be.
fn reference(trace: &[TraceRecord], dir: &Path, file: &str) -> std::path::PathBuf {
    let p = dir.join(file);
    let conn = rusqlite::Connection::open(&p).unwrap();
    conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
    let mut a = cln_backup::restore::Applier::new(&conn);
    for r in trace {
        a.apply(r.kind(), &r.writes).unwrap();
    }
    a.commit().unwrap();
    p
}

/// The real plugin with a `postgres://` destination in backup.lock: SIGKILLed with a
/// db_write in flight, then restarted by lightningd. PostgreSQL holds an exact prefix, the
/// advisory lock went with the process, and the node goes on to the real final database.
#[test]
fn pg_plugin_sigkilled_mid_write_leaves_a_consistent_prefix_and_the_lock_free() {
    let url = pgharness::fresh_db("sigkill");
    new_backup(&url, "n");
    let u = if url.contains('?') { format!("{url}&backup=n") } else { format!("{url}?backup=n") };
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("backup.lock"), serde_json::json!({ "backend_url": u }).to_string()).unwrap();
    let t = trace("channels");
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    let k = 300;
    assert_eq!(node.replay(t, 0..k).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][0]["kind"], "postgres", "{st:#}");
    assert_eq!(st["destinations"][0]["state"], "in-sync", "{st:#}");
    // a write in flight, and the plugin SIGKILLed under it
    node.start_if_needed(t, k).unwrap();
    node.plugin().unwrap().send_db_write(t[k].data_version, &t[k].writes).unwrap();
    node.plugin.take().unwrap().kill().unwrap();
    if !node.db.is_autocommit() {
        node.db.execute_batch("ROLLBACK").unwrap();
    }
    // the lock went with it; what is there is a prefix of the trace, exactly
    let d = PgDestination::open(&url, "n", BOUND).unwrap_or_else(|e| panic!("{}", e.explain()));
    drop(d);
    let (r, dl) = restore(&url, "n", tmp.path(), "r.sqlite3");
    let n = dl.records as usize;
    assert!(n == k || n == k + 1, "{n} records after {k} acknowledged");
    assert_same(&r, &reference(&t[..n], tmp.path(), "ref.sqlite3"));
    // lightningd restarts the plugin, sends the uncommitted write again, and goes on
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(t, k..t.len()).unwrap(), None);
    node.stop().unwrap();
    let (r, _) = restore(&url, "n", tmp.path(), "r2.sqlite3");
    assert_same(&r, &final_db("channels", tmp.path()));
}

#[test]
fn pg_failover_to_the_promoted_synchronous_standby_within_the_bound_loses_nothing() {
    let primary = pgharness::private();
    let url = primary.create_db("node");
    new_backup(&url, "n");
    let standby = primary.add_sync_standby().unwrap_or_else(|e| panic!("{e}"));
    let multi = format!(
        "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/node?target_session_attrs=read-write&sslmode=disable",
        pgharness::PASSWORD,
        primary.port,
        standby.port
    );
    let t = trace("channels");
    let mut d = PgDestination::open(&multi, "n", BOUND).unwrap();
    assert_eq!(d.status()["host"], format!("127.0.0.1:{}", primary.port));
    feed(&mut d, &t[..400]);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            primary.stop("immediate");
            std::thread::sleep(Duration::from_millis(300));
            standby.promote();
        });
        feed(&mut d, &t[400..]);
    });
    assert!(d.reconnects() >= 1);
    assert_eq!(d.status()["host"], format!("127.0.0.1:{}", standby.port));
    let tmp = tempfile::tempdir().unwrap();
    let (r, dl) = restore(&multi, "n", tmp.path(), "r.sqlite3");
    assert_eq!(dl.records, t.len() as u64, "records lost or doubled");
    assert_same(&r, &final_db("channels", tmp.path()));
}

#[test]
fn pg_restore_while_the_writer_writes_gives_a_consistent_prefix() {
    let url = pgharness::fresh_db("live");
    new_backup(&url, "n");
    let tmp = tempfile::tempdir().unwrap();
    let t = trace("channels");
    let mut d = PgDestination::open(&url, "n", BOUND).unwrap();
    feed(&mut d, &t[..50]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let restores = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut out = vec![];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || out.len() < 3 {
                let (p, dl) = restore(&url, "n", tmp.path(), &format!("live-{}.sqlite3", out.len()));
                out.push((p, dl.records));
            }
            out
        });
        feed(&mut d, &t[50..]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(restores.len() >= 3);
    let mut seen = std::collections::BTreeSet::new();
    for (i, (p, records)) in restores.iter().enumerate().step_by((restores.len() / 4).max(1)) {
        let reference = reference(&t[..*records as usize], tmp.path(), &format!("ref-{i}.sqlite3"));
        assert_same(p, &reference);
        seen.insert(*records);
    }
    assert!(seen.len() >= 2, "every restore saw the same records: {seen:?}");
}

/// A node backed up in PostgreSQL gets a file copy too: `add-destination` seeds it from the
/// database (the most advanced copy), and from then on every write goes to both.
#[test]
fn pg_then_a_file_copy_added_and_both_written() {
    let url = pgharness::fresh_db("addfile");
    new_backup(&url, "n");
    let u = if url.contains('?') { format!("{url}&backup=n") } else { format!("{url}?backup=n") };
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("backup.lock"), serde_json::json!({ "backend_url": u }).to_string()).unwrap();
    let t = trace("channels");
    let half = t.len() / 2;
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(t, 0..half).unwrap(), None);
    node.stop().unwrap();
    let copy = tmp.path().join("copy.bkp");
    let o = cli(&["add-destination", "--lightning-dir", ldir.to_str().unwrap(), &url_of(&copy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(t, half..t.len()).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    let kinds: Vec<_> = st["destinations"].as_array().unwrap().iter().map(|d| d["kind"].clone()).collect();
    assert_eq!(kinds, vec![serde_json::json!("postgres"), serde_json::json!("file")], "{st:#}");
    assert!(st["destinations"].as_array().unwrap().iter().all(|d| d["state"] == "in-sync"), "{st:#}");
    // compaction from the plugin: the file copy through its writer, PostgreSQL beside its writer
    let v = node.plugin().unwrap().cli("backup-compact", serde_json::json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    wait_for_log(node.plugin().unwrap(), "info", "compacted into generation 2");
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert_eq!(st["destinations"][0]["generation"], 2, "{st:#}");
    // the password never reaches lightningd's log nor the status
    let logs = node.plugin().unwrap().logs();
    assert!(!logs.iter().any(|(_, m)| m.contains(pgharness::PASSWORD)), "{logs:?}");
    assert!(!st.to_string().contains(pgharness::PASSWORD), "{st:#}");
    node.stop().unwrap();
    let fin = final_db("channels", tmp.path());
    let (r, _) = restore(&url, "n", tmp.path(), "from-pg.sqlite3");
    assert_same(&r, &fin);
    let dest = tmp.path().join("from-file.sqlite3");
    let o = cli(&["restore", &url_of(&copy), dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &fin);
}

fn url_of(p: &Path) -> String {
    format!("file://{}", p.display())
}

// ---- sealed PostgreSQL backups (issues 10 and 12) ----

use crate::sealed::{fp_of, mnemonic_hsm, needles, readable, LEGACY_FP_KEY, LEGACY_HSM, MNEMONIC_FP_KEY};

fn db_of(url: &str) -> String {
    url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string()
}

/// Every value the database stores in schema cln_backup, into files under `dir`: per table,
/// the values of all rows as text (bytea as raw bytes), and each bytea column's values
/// concatenated in key order (the records as a journal, the chunks as a snapshot file), so
/// zstd frames are found whole.
fn dump_schema(url: &str, dir: &Path) -> usize {
    let c = pgharness::shared();
    let db = db_of(url);
    std::fs::create_dir_all(dir).unwrap();
    let tables = c.psql(&db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'cln_backup'");
    let mut n = 0;
    for t in tables.lines() {
        let rows = c.psql(&db, &format!("SELECT row_to_json(t)::text FROM cln_backup.{t} t ORDER BY 1"));
        let (mut text, mut raw) = (Vec::new(), Vec::new());
        for line in rows.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for (_, val) in v.as_object().unwrap() {
                match val.as_str() {
                    Some(s) if s.starts_with("\\x") => raw.extend(cln_backup::keys::unhex(&s[2..]).unwrap()),
                    Some(s) => text.extend_from_slice(s.as_bytes()),
                    None => text.extend_from_slice(val.to_string().as_bytes()),
                }
                text.push(b'\n');
            }
            n += 1;
        }
        let cols = c.psql(
            &db,
            &format!(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'cln_backup' \
                 AND table_name = '{t}' AND data_type = 'bytea'"
            ),
        );
        let third = c.psql(
            &db,
            &format!(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'cln_backup' \
                 AND table_name = '{t}' AND ordinal_position = 3"
            ),
        );
        for col in cols.lines() {
            let hex = c.psql(
                &db,
                &format!("SELECT encode({col}, 'hex') FROM cln_backup.{t} ORDER BY name, generation, {third}"),
            );
            let mut all = vec![];
            for h in hex.lines() {
                all.extend(cln_backup::keys::unhex(h).unwrap());
            }
            std::fs::write(dir.join(format!("{t}.{col}.concat")), all).unwrap();
        }
        std::fs::write(dir.join(format!("{t}.values")), text).unwrap();
        std::fs::write(dir.join(format!("{t}.bytea")), raw).unwrap();
    }
    n
}

/// A node whose lightning dir has `hsm`, backed up in PostgreSQL by the real `backup-cli
/// init` (with `extra` arguments), the whole `name` trace replayed through the real
/// plugin, compacted by it half way. Returns (tmp, ldir, backend URL).
fn sealed_node(url: &str, hsm: &[u8], extra: &[&str], name: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), hsm).unwrap();
    let mut args = vec!["init", "--lightning-dir", ldir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(url);
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lock: serde_json::Value = serde_json::from_slice(&std::fs::read(ldir.join("backup.lock")).unwrap()).unwrap();
    let backend = lock["backend_url"].as_str().unwrap().to_string();
    let t = trace(name);
    let half = t.len() / 2;
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(t, 0..half).unwrap(), None);
    let v = node.plugin().unwrap().cli("backup-compact", serde_json::json!({})).unwrap();
    assert_eq!(v["result"], "compaction started", "{v}");
    wait_for_log(node.plugin().unwrap(), "info", "compacted into generation 2");
    assert_eq!(node.replay(t, half..t.len()).unwrap(), None);
    node.stop().unwrap();
    (tmp, ldir, backend)
}

fn pg_restore(backend: &str, dest: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore", backend, dest.to_str().unwrap()];
    args.extend_from_slice(extra);
    cli(&args)
}

#[test]
fn pg_sealed_plugin_writes_nothing_readable_and_restores_only_with_the_key() {
    let url = pgharness::fresh_db("sealed");
    let (tmp, ldir, backend) = sealed_node(&url, LEGACY_HSM, &[], "channels");
    let rows = dump_schema(&url, &tmp.path().join("dump"));
    assert!(rows > 100, "{rows} rows");
    let found = readable(&tmp.path().join("dump"), &needles("channels"));
    assert!(found.is_empty(), "readable in PostgreSQL: {found:?}");
    // the control: the same scan over a --no-encryption backup finds the node's data
    let plain = pgharness::fresh_db("plain");
    let (ptmp, _pl, pbackend) = sealed_node(&plain, LEGACY_HSM, &["--no-encryption"], "small");
    dump_schema(&plain, &ptmp.path().join("dump"));
    let found = readable(&ptmp.path().join("dump"), &needles("small"));
    assert!(found.len() > 10, "the scan finds plaintext: {found:?}");
    let r = ptmp.path().join("plain.sqlite3");
    assert!(pg_restore(&pbackend, &r, &[]).status.success());
    assert_same(&r, &final_db("small", ptmp.path()));

    // the key is found in the lightning dir recorded at init
    let dest = tmp.path().join("r.sqlite3");
    let o = pg_restore(&backend, &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &final_db("channels", tmp.path()));
    let o = cli(&["verify", &backend]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("key fingerprint {}", fp_of(LEGACY_FP_KEY))), "{}", stdout(&o));
    // a new machine without the key: a clear error, nothing written
    std::fs::rename(&ldir, tmp.path().join("old-ldir")).unwrap();
    let newdir = tmp.path().join("new-ldir");
    std::fs::create_dir(&newdir).unwrap();
    let o = pg_restore(&backend, &newdir, &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("no key for this sealed backup"), "{e}");
    assert!(e.contains("backup 'regtest'") && !e.contains(pgharness::PASSWORD), "names the backup: {e}");
    assert!(std::fs::read_dir(&newdir).unwrap().next().is_none(), "something written");
    // the wrong key: refused by fingerprint, nothing written
    let wrong = tmp.path().join("wrong_hsm_secret");
    std::fs::write(&wrong, mnemonic_hsm()).unwrap();
    let o = pg_restore(&backend, &newdir, &["--hsm-secret", wrong.to_str().unwrap()]);
    let want = format!("this backup was sealed with key {}, you gave {}", fp_of(LEGACY_FP_KEY), fp_of(MNEMONIC_FP_KEY));
    assert!(!o.status.success() && stderr(&o).contains(&want), "{}", stderr(&o));
    assert!(std::fs::read_dir(&newdir).unwrap().next().is_none(), "something written");
    let o = cli(&["verify", &backend, "--hsm-secret", wrong.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains(&want), "{}", stderr(&o));
    // hsm_secret put back in DEST: restored
    std::fs::write(newdir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let o = pg_restore(&backend, &newdir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&newdir.join("lightningd.sqlite3"), &final_db("channels", tmp.path()));

    // a record row altered, or two swapped, in the database: refused, naming the row
    let db = db_of(&url);
    let c = pgharness::shared();
    let q = |sql: &str| c.psql(&db, sql);
    let g = q("SELECT generation FROM cln_backup.backups WHERE name = 'regtest'");
    let recs: Vec<(i64, u32, i16, Vec<u8>)> = q(&format!(
        "SELECT seq || ',' || data_version || ',' || kind || ',' || encode(data, 'hex') FROM cln_backup.records \
         WHERE name = 'regtest' AND generation = {g} ORDER BY seq"
    ))
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap(), cln_backup::keys::unhex(f[3]).unwrap())
    })
    .collect();
    let key = tmp.path().join("hsm");
    std::fs::write(&key, LEGACY_HSM).unwrap();
    let put = |seq: i64, data: &[u8]| {
        q(&format!(
            "UPDATE cln_backup.records SET data = decode('{}', 'hex') WHERE name = 'regtest' AND generation = {g} \
             AND seq = {seq}",
            cln_backup::keys::hex(data)
        ));
    };
    let refused = |what: &str, seq: i64| {
        let dest = tmp.path().join(format!("{}.sqlite3", what.replace(' ', "-")));
        let o = pg_restore(&backend, &dest, &["--hsm-secret", key.to_str().unwrap()]);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains("fails authentication"), "{what}: {e}");
        assert!(e.contains(&format!("record at seq {seq} of generation {g}")), "{what} names the row: {e}");
        assert!(!dest.exists(), "{what}");
        let o = cli(&["verify", &backend, "--hsm-secret", key.to_str().unwrap()]);
        assert!(!o.status.success() && stderr(&o).contains(&format!("seq {seq}")), "{what}: {}", stderr(&o));
    };
    let h = cln_backup::journal::RECORD_HEADER_LEN;
    let reframe = |dv: u32, kind: i16, payload: &[u8]| {
        let k = if kind == Kind::Transaction as i16 { Kind::Transaction } else { Kind::Outside };
        let mut b = vec![];
        cln_backup::journal::frame_payload(&mut b, dv, k, payload);
        b
    };
    // one ciphertext byte flipped, the checksums made valid again
    let (seq, dv, kind, data) = recs.iter().find(|r| r.3.len() > h + 60).unwrap().clone();
    let mut p = data[h..].to_vec();
    p[30] ^= 1;
    put(seq, &reframe(dv, kind, &p));
    refused("altered", seq);
    put(seq, &data);
    // two payloads of the same length swapped, with valid checksums
    let (a, b) = (0..recs.len())
        .flat_map(|i| (i + 1..recs.len()).map(move |k| (i, k)))
        .find(|&(i, k)| recs[i].3.len() == recs[k].3.len() && recs[i].3[h..] != recs[k].3[h..])
        .expect("two records of the same length");
    put(recs[a].0, &reframe(recs[a].1, recs[a].2, &recs[b].3[h..]));
    put(recs[b].0, &reframe(recs[b].1, recs[b].2, &recs[a].3[h..]));
    refused("swapped", recs[a].0);
    put(recs[a].0, &recs[a].3);
    put(recs[b].0, &recs[b].3);
    let dest = tmp.path().join("again.sqlite3");
    let o = pg_restore(&backend, &dest, &["--hsm-secret", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The journal bytes of backup `name`'s current generation, as a download rebuilds them.
fn pg_journal(url: &str, name: &str, dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let d = pg::download(url, Some(name), &dir.join(format!("dl-{name}")), &mut |_, _| {}).unwrap();
    let j = cln_backup::layout::Layout::new(&d.dir).list().unwrap().journal;
    std::fs::read(j).unwrap()
}

/// `init` with a file and a postgres URL makes one backup (one id, one key); the plugin
/// seals each record once and both copies store the same bytes; `add-destination` of
/// another postgres URL next to them is seeded sealed with the same id.
#[test]
fn pg_init_beside_a_file_copy_shares_one_backup_id_and_the_same_sealed_bytes() {
    let url = pgharness::fresh_db("withfile");
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let t = trace("small");
    let node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    for r in &t[..40] {
        node.run_without_plugin(r).unwrap();
    }
    drop(node);
    let copy = tmp.path().join("copy.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url_of(&copy), &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let urls = lock_urls(&ldir);
    assert_eq!(urls.len(), 2);
    assert!(urls[1].contains("backup=regtest"), "{:?}", urls);
    let file_meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("backup.json")).unwrap()).unwrap();
    let pg_meta: serde_json::Value = serde_json::from_str(
        &pgharness::shared().psql(&db_of(&url), "SELECT meta FROM cln_backup.backups WHERE name = 'regtest'"),
    )
    .unwrap();
    assert_eq!(pg_meta["backup_id"], file_meta["backup_id"]);
    assert_eq!(pg_meta["sealed"], true);
    assert_eq!(pg_meta["key_fingerprint"], fp_of(LEGACY_FP_KEY));
    // the rest of the trace through the plugin, to both
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(t, 40..t.len()).unwrap(), None);
    let st = node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap();
    assert!(st["destinations"].as_array().unwrap().iter().all(|d| d["state"] == "in-sync"), "{st:#}");
    assert_eq!(st["destinations"][1]["details"]["sealed"], true, "{st:#}");
    assert_eq!(st["destinations"][1]["details"]["key_fingerprint"], fp_of(LEGACY_FP_KEY), "{st:#}");
    node.stop().unwrap();
    // one seal per record: the database holds exactly the file copy's journal
    let file_journal = journal_data(&copy);
    assert_eq!(pg_journal(&urls[1], "regtest", tmp.path()), file_journal);
    assert!(readable(&copy, &needles("small")).is_empty());
    let fin = final_db("small", tmp.path());
    let dest = tmp.path().join("from-pg.sqlite3");
    let o = pg_restore(&urls[1], &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &fin);

    // another database added beside them: seeded from the most advanced copy, sealed, same id
    let url2 = pgharness::fresh_db("added");
    let o = cli(&["add-destination", "--lightning-dir", ldir.to_str().unwrap(), &url2]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sealed with the backup's key"), "{}", stdout(&o));
    let meta2: serde_json::Value = serde_json::from_str(
        &pgharness::shared().psql(&db_of(&url2), "SELECT meta FROM cln_backup.backups WHERE name = 'regtest'"),
    )
    .unwrap();
    assert_eq!(meta2["backup_id"], file_meta["backup_id"]);
    let urls = lock_urls(&ldir);
    assert_eq!(urls.len(), 3);
    let dest = tmp.path().join("from-added.sqlite3");
    let o = pg_restore(&urls[2], &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &fin);
    // and the node goes on writing to all three
    let more = vec![format!(
        "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}",
        t.last().unwrap().data_version
    )];
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    node.start().unwrap();
    let rec = TraceRecord { data_version: t.last().unwrap().data_version + 1, writes: more, before_init: false };
    node.start_if_needed(std::slice::from_ref(&rec), 0).unwrap();
    assert_eq!(node.step(&rec).unwrap(), cln_backup::sim::Answer::Continue);
    node.stop().unwrap();
    let file_journal = journal_data(&copy);
    assert_eq!(pg_journal(&urls[1], "regtest", &tmp.path().join("a")), file_journal);
    assert_eq!(pg_journal(&urls[2], "regtest", &tmp.path().join("b")), file_journal);
}

/// A PostgreSQL copy far behind a compacted file copy is re-seeded with the file copy's
/// whole generation (catch-up's `install`): stored as it is, in one transaction. A
/// generation of another backup, or one that fails half way, leaves it as it was.
#[test]
fn pg_install_reseeds_a_generation_as_it_is_and_refuses_another_backup() {
    use cln_backup::destination::Destination;
    let url = pgharness::fresh_db("install");
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let copy = tmp.path().join("copy.bkp");
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url_of(&copy), &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = trace("small");
    let mut node = cln_backup::sim::Node::new(Path::new(BIN), &ldir).unwrap();
    assert_eq!(node.replay(t, 0..60).unwrap(), None);
    node.stop().unwrap();
    // the database is dropped from backup.lock; the file copy goes on and is compacted
    let backend = lock_urls(&ldir)[1].clone();
    let o = cli(&["remove-destination", "--lightning-dir", ldir.to_str().unwrap(), &backend]);
    assert!(o.status.success(), "{}", stderr(&o));
    node.start().unwrap();
    node.initialized = false;
    assert_eq!(node.replay(t, 60..t.len()).unwrap(), None);
    node.stop().unwrap();
    let o = cli(&["compact", &url_of(&copy)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let keys = cln_backup::keys::KeySource::lightning_dir(&ldir);
    let mut d = PgDestination::open_with(&backend, "regtest", BOUND, &keys).unwrap();
    assert!(d.is_sealed());
    assert_eq!(d.generation(), 1);
    let before = d.tip();
    let held = pg_journal(&backend, "regtest", &tmp.path().join("w"));
    let (w, _) = cln_backup::writer::Writer::open(&copy, &keys).unwrap();
    let files = cln_backup::destination::file::FileDestination::generation_files(&w);
    let file_tip = cln_backup::destination::file::tip_of(&w);
    assert_eq!(files.generation, 2);

    // a failure half way (the snapshot gone) changes nothing
    let mut broken = files.clone();
    broken.snapshot = Some(tmp.path().join("no-such.snapshot"));
    let e = d.install(&broken).unwrap_err().explain();
    assert!(e.contains("no-such.snapshot"), "{e}");
    assert_eq!(pg_journal(&backend, "regtest", &tmp.path().join("x")), held);
    assert_eq!(d.refresh().unwrap(), before.position);
    assert_eq!(d.tip(), before);
    // another backup's generation (same key, another id) is refused
    let other_l = tmp.path().join("other");
    std::fs::create_dir_all(&other_l).unwrap();
    std::fs::write(other_l.join("hsm_secret"), LEGACY_HSM).unwrap();
    let other = tmp.path().join("other.bkp");
    let o = cli(&["init", "--lightning-dir", other_l.to_str().unwrap(), &url_of(&other)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ow, _) = cln_backup::writer::Writer::open(&other, &keys).unwrap();
    let e = d.install(&cln_backup::destination::file::FileDestination::generation_files(&ow)).unwrap_err().explain();
    assert!(e.contains("is not this backup"), "{e}");
    assert_eq!(d.tip(), before);

    d.install(&files).unwrap_or_else(|e| panic!("{}", e.explain()));
    assert_eq!(d.tip(), file_tip);
    assert!(d.tip().same_place(&file_tip));
    drop(w);
    drop(d);
    let journal = journal_data(&copy);
    assert_eq!(pg_journal(&backend, "regtest", tmp.path()), journal);
    let gens = pgharness::shared()
        .psql(&db_of(&url), "SELECT string_agg(DISTINCT generation::text, ',') FROM cln_backup.records");
    assert_eq!(gens, "2", "old generations removed");
    let dest = tmp.path().join("r.sqlite3");
    let o = pg_restore(&backend, &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &final_db("small", tmp.path()));
}

/// A backup made before sealing existed (schema without `backups.meta`) stays readable as
/// plaintext, and writable; creating a new backup in that database adds the column (the
/// schema's migration) without changing how the old one reads.
#[test]
fn pg_backup_from_before_sealing_reads_as_plaintext_across_the_schema_migration() {
    let url = pgharness::fresh_db("oldschema");
    new_backup(&url, "old");
    pgharness::shared().psql(&db_of(&url), "ALTER TABLE cln_backup.backups DROP COLUMN meta");
    let t = trace("small");
    let mut d = PgDestination::open(&url, "old", BOUND).unwrap();
    assert!(!d.is_sealed());
    feed(&mut d, &t[..50]);
    let tmp = tempfile::tempdir().unwrap();
    let (r, dl) = restore(&url, "old", tmp.path(), "a.sqlite3");
    assert!(!dl.sealed);
    assert_same(&r, &reference(&t[..50], tmp.path(), "ref-a.sqlite3"));
    // a key given for it is refused (it is not sealed), as for a file backup
    let key = tmp.path().join("hsm");
    std::fs::write(&key, LEGACY_HSM).unwrap();
    let keys = cln_backup::keys::KeySource { hsm_secret: Some(key), ..Default::default() };
    let dest = tmp.path().join("k.sqlite3");
    let e = err_of(pg::restore_from(&url, Some("old"), &dest, &keys, &mut |_, _| {}, &mut |_, _| {}));
    assert!(e.contains("not sealed"), "{e}");
    assert!(!dest.exists());
    new_backup(&url, "new");
    let cols = pgharness::shared().psql(
        &db_of(&url),
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'backups' AND column_name = 'meta'",
    );
    assert_eq!(cols, "1");
    feed(&mut d, &t[50..]);
    drop(d);
    let (r, _) = restore(&url, "old", tmp.path(), "b.sqlite3");
    assert_same(&r, &final_db("small", tmp.path()));
}

/// A compaction's switch of a sealed PostgreSQL backup seals again the records that came
/// after its fold point (their places moved): the end the destination reports afterwards
/// (what catch-up and the start compare copies by) is the one of the records as stored,
/// read back, not the one from before the switch.
#[test]
fn pg_sealed_switch_reports_the_end_of_the_records_as_resealed() {
    let url = pgharness::fresh_db("sealedswitch");
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("regtest");
    std::fs::create_dir_all(&ldir).unwrap();
    std::fs::write(ldir.join("hsm_secret"), LEGACY_HSM).unwrap();
    let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let urls = lock_urls(&ldir);
    let keys = cln_backup::keys::KeySource::lightning_dir(&ldir);
    let mut d = PgDestination::open_with(&urls[0], "regtest", BOUND, &keys).unwrap();
    assert!(d.is_sealed());
    let t = trace("small");
    // through the seam, as the plugin writes: sealed for each record's place
    let sealed_feed = |d: &mut PgDestination, recs: &[TraceRecord]| {
        for r in recs {
            let kind = r.kind();
            let replace = versions::decide(d.position(), r.data_version, kind) == Decision::ReplaceLast;
            Destination::append(d, r.data_version, kind, replace, &framed(r.data_version, kind, &r.writes))
                .unwrap_or_else(|e| panic!("data_version {}: {}", r.data_version, e.explain()));
        }
    };
    sealed_feed(&mut d, &t[..30]);
    let plan = d.plan().unwrap();
    let sealer = d.sealer().unwrap().unwrap();
    let next =
        pg::build_generation(&urls[0], "regtest", plan, tmp.path(), Some((&sealer, &keys)), &mut |_, _, _| {}).unwrap();
    // records after the fold point, written while it was built
    sealed_feed(&mut d, &t[30..45]);
    let before = d.tail();
    d.install_generation(&next).unwrap();
    assert_eq!(d.generation(), 2);
    let journal = tmp.path().join("journal");
    std::fs::write(&journal, pg_journal(&urls[0], "regtest", &tmp.path().join("dl"))).unwrap();
    let mut r = cln_backup::journal::JournalReader::open(&journal).unwrap();
    let mut last = None;
    while let Some(rec) = r.next_record().unwrap() {
        last = Some(rec.header_crc());
    }
    let stored = last.unwrap();
    assert_ne!(stored, before, "the records after the fold point were not sealed again");
    assert_eq!(d.tail(), stored, "the end reported is not the stored records'");
    // and it goes on from there, sealed, and restores to the end
    sealed_feed(&mut d, &t[45..]);
    drop(d);
    let dest = tmp.path().join("r.sqlite3");
    let o = pg_restore(&urls[0], &dest, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same(&dest, &final_db("small", tmp.path()));
}
