//! What an operator can get wrong, and what lightningd can send: each gets a clear answer.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;

use serde_json::{json, Value};

use crate::common::*;
use cln_backup::sim::{Answer, PluginProc};

#[test]
fn manifest_declares_a_static_db_write_plugin() {
    let s = Setup::new();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &["--developer"]).unwrap();
    let m = p.getmanifest().unwrap();
    assert_eq!(m["dynamic"], false);
    assert_eq!(m["nonnumericids"], true);
    let hooks = m["hooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["name"], "db_write");
    assert!(m["rpcmethods"].as_array().unwrap().iter().any(|r| r["name"] == "backup-status"));
    // unknown methods get a JSON-RPC error, and the plugin goes on
    let v = p.request("cln", "no-such-method", json!({})).unwrap();
    assert_eq!(v["error"]["code"], -32601);
    let start = std::time::Instant::now();
    assert!(p.close().unwrap().success());
    assert!(start.elapsed() < std::time::Duration::from_secs(2), "did not exit at once on EOF");
}

#[test]
fn malformed_hook_params_halt_without_panic() {
    let bad: Vec<Value> = vec![
        json!({"writes": ["x"]}),
        json!({"data_version": "7", "writes": ["x"]}),
        json!({"data_version": 7}),
        json!({"data_version": 7, "writes": [1, 2]}),
        json!({"data_version": 4294967296u64, "writes": ["x"]}),
        json!({"data_version": 7, "writes": []}),
        json!(null),
        json!([7, ["x"]]),
        json!({"data_version": 7, "writes": ["INSERT", "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = 9"]}),
    ];
    for params in bad {
        let s = Setup::new();
        let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
        p.getmanifest().unwrap();
        let v = p.request("cln", "db_write", params.clone()).unwrap();
        assert_ne!(v["result"], json!({"result": "continue"}), "{params}");
        let msg = v.to_string();
        assert!(
            msg.contains("Malformed db_write") || msg.contains("disagree") || msg.contains("no statements"),
            "{params}: {msg}"
        );
        // still alive, still answering
        assert_eq!(p.cli("backup-status", json!({})).unwrap()["state"], "halted");
        assert!(p.close().unwrap().success());
    }
}

#[test]
fn garbage_on_stdin_exits_cleanly() {
    let s = Setup::new();
    let out = std::process::Command::new(BIN)
        .current_dir(&s.ldir)
        .env("LIGHTNINGD_PLUGIN", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": }\n\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(so.contains("cannot parse what lightningd sent"), "{so}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn bad_urls_and_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out.sqlite3");
    let d = dest.to_str().unwrap();
    let o = cli(&["restore", "s3://bucket/node", d]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown backup URL scheme 's3'"), "{}", stderr(&o));
    // socket: URLs are parsed by the socket destination (more in socket.rs)
    let o = cli(&["restore", "socket:localhost", d]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no port"), "{}", stderr(&o));
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"hello, not a backup").unwrap();
    let o = cli(&["restore", &url(&junk), d]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a cln-backup backup"), "{}", stderr(&o));
    let o = cli(&["verify", &url(&tmp.path().join("missing"))]);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    let o = cli(&["restore", &url(tmp.path()), d]);
    assert!(stderr(&o).contains("no journal file"), "{}", stderr(&o));
    assert!(!dest.exists());
    // a backup.lock with a bad URL halts the node at its first write
    let ldir = tmp.path().join("ln");
    std::fs::create_dir(&ldir).unwrap();
    for (lock, phrase) in [
        (r#"{"backend_url": "s3://x"}"#, "unknown backup URL scheme"),
        (r#"{"backend": 1}"#, "is not valid"),
        (r#"{"backend_url": "file:///nonexistent/b.bkp"}"#, "does not exist"),
    ] {
        std::fs::write(ldir.join("backup.lock"), lock).unwrap();
        let mut p = PluginProc::spawn(Path::new(BIN), &ldir, &[]).unwrap();
        p.getmanifest().unwrap();
        match p.db_write(1, &["PRAGMA foreign_keys = OFF;".into()]).unwrap() {
            Answer::Halt(v) => assert!(v.to_string().contains(phrase), "{v}"),
            a => panic!("{a:?}"),
        }
        p.close().unwrap();
    }
}

#[test]
fn init_refusals_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let ldir = tmp.path().join("ln");
    std::fs::create_dir(&ldir).unwrap();
    let root = tmp.path().join("b.bkp");
    let l = ldir.to_str().unwrap();
    // missing parent directory
    let o = cli(&["init", "--lightning-dir", l, "file:///nonexistent-dir/b.bkp"]);
    assert!(stderr(&o).contains("parent directory does not exist"), "{}", stderr(&o));
    // missing lightning dir
    let o = cli(&["init", "--lightning-dir", "/nonexistent-ln", &url(&root)]);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    // lightningd running there
    {
        let _sock = UnixListener::bind(ldir.join("lightning-rpc")).unwrap();
        let o = cli(&["init", "--lightning-dir", l, &url(&root)]);
        assert!(stderr(&o).contains("lightningd is running"), "{}", stderr(&o));
        assert!(!root.exists());
    }
    std::fs::remove_file(ldir.join("lightning-rpc")).unwrap();
    let o = cli(&["init", "--lightning-dir", l, &url(&root)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // the backup exists now
    let o = cli(&["init", &url(&root)]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    // backup.lock exists
    let o = cli(&["init", "--lightning-dir", l, &url(&tmp.path().join("c.bkp"))]);
    assert!(stderr(&o).contains("backup.lock already exists"), "{}", stderr(&o));
    // an empty backup has nothing to restore
    let o = cli(&["restore", &url(&root), tmp.path().join("x").to_str().unwrap()]);
    assert!(stderr(&o).contains("the backup is empty"), "{}", stderr(&o));
    // init without a lightning dir makes an empty backup
    let o = cli(&["init", &url(&tmp.path().join("d.bkp"))]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("empty backup"));
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(&root).unwrap() {
        let e = e.unwrap();
        let mode = e.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{:?}", e.file_name());
    }
}

#[test]
fn restore_refuses_an_existing_destination() {
    let s = Setup::new();
    let mut node = s.node();
    node.replay(trace("small"), 0..10).unwrap();
    node.stop().unwrap();
    let dest = s.tmp.path().join("exists.sqlite3");
    std::fs::write(&dest, b"precious").unwrap();
    let o = cli(&["restore", &url(&s.root), dest.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
    // a directory that already has lightningd.sqlite3
    let o = cli(&["restore", &url(&s.root), s.ldir.to_str().unwrap()]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
}

/// A fake lightningd RPC socket answering listconfigs; records the methods called.
fn fake_rpc(dir: &Path, configs: Value) -> std::sync::mpsc::Receiver<String> {
    let l = UnixListener::bind(dir.join("lightning-rpc")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { break };
            let mut input = cln_backup::plugin::protocol::Framer::new(c.try_clone().unwrap());
            // Like lightningd, several requests on one connection.
            while let Some(Ok(bytes)) = input.next_value() {
                let req: Value = serde_json::from_slice(bytes).unwrap();
                let method = req["method"].as_str().unwrap_or("").to_string();
                let result = if method == "listconfigs" { json!({"configs": configs}) } else { json!({}) };
                // lightningd ends each message with a blank line; cln-rpc reads up to it.
                let answer = json!({"jsonrpc": "2.0", "id": req["id"], "result": result}).to_string() + "\n\n";
                let _ = c.write_all(answer.as_bytes());
                let _ = tx.send(method);
            }
        }
    });
    rx
}

#[test]
fn postgres_wallet_stops_lightningd_and_plain_plugin_warns() {
    let s = Setup::new();
    let calls = fake_rpc(&s.ldir, json!({"wallet": {"value_str": "postgres://user@localhost/ln"}}));
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    p.init(&s.ldir).unwrap();
    let t = std::time::Duration::from_secs(10);
    assert_eq!(calls.recv_timeout(t).unwrap(), "listconfigs");
    assert_eq!(calls.recv_timeout(t).unwrap(), "stop");
    wait_for_log(&mut p, "warn", "not SQLite");
    p.close().unwrap();

    let s = Setup::new();
    let calls = fake_rpc(&s.ldir, json!({"important-plugin": {"values_str": ["/some/other/plugin"]}}));
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    p.init(&s.ldir).unwrap();
    assert_eq!(calls.recv_timeout(t).unwrap(), "listconfigs");
    wait_for_log(&mut p, "warn", "not loaded as an important plugin");
    p.close().unwrap();

    // loaded as important: no warning
    let s = Setup::new();
    let calls = fake_rpc(&s.ldir, json!({"important-plugin": {"values_str": [BIN]}}));
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    p.init(&s.ldir).unwrap();
    assert_eq!(calls.recv_timeout(t).unwrap(), "listconfigs");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!p.has_log("not loaded as an important plugin"), "{:?}", p.logs());
    p.close().unwrap();
}

/// The README's first command: a real trace through the plugin, a compaction, a restore
/// compared row by row.
#[test]
fn the_readme_demo_runs() {
    let o = cli(&["demo"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("-- backup-compact (runs in the background):"), "{out}");
    assert!(out.contains("identical to the real node's final lightningd.sqlite3"), "{out}");
    assert!(out.ends_with("== demo OK\n"), "{out}");
}
