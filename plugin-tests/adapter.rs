//! The pre-init adapter between lightningd's stdio and cln-plugin: what reaches stdout is
//! whole messages in every interleaving, and each message goes to the right handler.

use std::path::Path;

use serde_json::{json, Value};

use crate::common::*;
use cln_backup::sim::{Answer, PluginProc};

fn init_params(ldir: &Path, options: Value) -> Value {
    json!({
        "options": options,
        "configuration": {
            "lightning-dir": ldir, "rpc-file": "lightning-rpc", "startup": true, "network": "regtest",
            "feature_set": {"init": "", "node": "", "channel": "", "invoice": ""},
        }
    })
}

/// A lightning dir with a backup and the hsm_secret that lightningd makes at its first start.
fn setup() -> Setup {
    let s = Setup::new();
    std::fs::write(s.ldir.join("hsm_secret"), [7u8; 32]).unwrap();
    s
}

fn msg(id: &str, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string() + "\n\n"
}

#[test]
fn options_are_in_the_manifest_with_types_and_defaults() {
    let s = Setup::new();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &["--developer"]).unwrap();
    let m = p.getmanifest().unwrap();
    let opt = |name: &str| m["options"].as_array().unwrap().iter().find(|o| o["name"] == name).cloned().unwrap();
    for (name, kind, default, dynamic) in [
        ("backup-autocompact", "bool", json!(true), false),
        ("backup-compact-min-journal", "int", json!(64 << 20), false),
        ("backup-compact-ratio", "string", json!("2.0"), false),
        ("backup-compact-io-rate", "int", json!(32 << 20), true),
    ] {
        let o = opt(name);
        assert_eq!(o["type"], kind, "{o}");
        assert_eq!(o["default"], default, "{o}");
        assert_eq!(o["dynamic"], dynamic, "{o}");
        assert!(o["description"].as_str().unwrap().len() > 20, "{o}");
    }
    let legacy = opt("backup-destination");
    assert_eq!(legacy["type"], "string");
    assert!(legacy.get("default").is_none_or(Value::is_null), "{legacy}");
    assert!(legacy["description"].as_str().unwrap().contains("Deprecated"));
    assert_eq!(m["dynamic"], false);
    let methods: Vec<_> = m["rpcmethods"].as_array().unwrap().iter().map(|r| r["name"].clone()).collect();
    assert!(methods.contains(&json!("backup-status")) && methods.contains(&json!("backup-compact")));
    p.close().unwrap();
}

/// The Python plugin's option in an old config: accepted, its own warning, then ignored.
#[test]
fn backup_destination_is_accepted_with_the_python_warning() {
    let s = Setup::new();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    let v = p.init_with(&s.ldir, json!({"backup-destination": "file:///elsewhere/backup.dbak"})).unwrap();
    assert!(v["result"].get("disable").is_none(), "{v}");
    wait_for_log(
        &mut p,
        "warn",
        "The `--backup-destination` option is deprecated and will be removed in future versions of the backup plugin.",
    );
    let st = p.cli("backup-status", json!({})).unwrap();
    assert_eq!(st["destination"], url(&s.root), "backup.lock decides, not the old option: {st}");
    p.close().unwrap();
}

/// A pre-init db_write logs ("Versions match up") while it is answered: both arrive whole,
/// the log line before the answer, and the answer carries the id byte for byte.
#[test]
fn a_log_line_while_a_pre_init_db_write_is_answered() {
    let s = setup();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    let t = &trace("small")[0];
    let id = "cln:db_write#7/cln:\"quoted\"\\id";
    let mut bytes = msg(id, "db_write", json!({"data_version": t.data_version, "writes": t.writes}));
    // and the first half of a status request in the same write, the rest after the answer
    let status = msg("cli:backup-status#1/cln:3", "backup-status", json!({}));
    let (a, b) = status.split_at(status.len() / 2);
    bytes.push_str(a);
    p.send_bytes(bytes.as_bytes()).unwrap();
    let v = p.response(id).unwrap();
    assert_eq!(v["result"], json!({"result": "continue"}), "{v}");
    assert!(p.has_log("Versions match up"), "the log line came after the answer: {:?}", p.logs());
    // the rest, up to the blank line that ends it
    p.send_bytes(b.as_bytes()).unwrap();
    let st = p.response("cli:backup-status#1/cln:3").unwrap();
    assert_eq!(st["result"]["latest_version"], t.data_version, "{st}");
    p.close().unwrap();
}

/// A message ends at its blank line, even when the blank line's two newlines come in two
/// reads: nothing is written before it, and the answer follows it. Valid JSON that is not
/// a JSON-RPC object is skipped, and the messages after it are answered.
#[test]
fn a_db_write_is_taken_at_its_blank_line_even_split_across_reads() {
    let s = setup();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    let t = &trace("small")[0];
    let whole = msg("cln:db_write#1", "db_write", json!({"data_version": t.data_version, "writes": t.writes}));
    let held = journal_data(&s.root);
    p.send_bytes(whole.trim_end().as_bytes()).unwrap();
    p.send_bytes(b"\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(journal_data(&s.root), held, "written before its blank line was whole");
    // then JSON that is no JSON-RPC object: each skipped, with a warning
    let status = msg("cli:backup-status#2/cln:3", "backup-status", json!({}));
    p.send_bytes(format!("\n[1, 2]\n\n\"x\"\n\nnull\n\n{status}").as_bytes()).unwrap();
    let v = p.response("cln:db_write#1").unwrap();
    assert_eq!(v["result"], json!({"result": "continue"}), "{v}");
    assert!(journal_data(&s.root).len() > held.len());
    let st = p.response("cli:backup-status#2/cln:3").unwrap();
    assert_eq!(st["result"]["latest_version"], t.data_version, "{st}");
    let skipped = p.logs().iter().filter(|(_, m)| m.contains("not a JSON-RPC object")).count();
    assert_eq!(skipped, 3, "{:?}", p.logs());
    p.close().unwrap();
}

/// init and a db_write in one read; then an RPC call right after init goes through
/// cln-plugin; setconfig changes the dynamic option.
#[test]
fn init_and_db_write_in_one_read_then_calls_through_cln_plugin() {
    let s = setup();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    let tr = trace("small");
    let (first, second) = (&tr[0], &tr[1]);
    let mut bytes = msg("cln:init#1", "init", init_params(&s.ldir, json!({"backup-compact-io-rate": 1000000})));
    bytes += &msg("cln:db_write#2", "db_write", json!({"data_version": first.data_version, "writes": first.writes}));
    bytes += &msg("cli:backup-status#3/cln:4", "backup-status", json!({}));
    bytes += &msg("cln:db_write#5", "db_write", json!({"data_version": second.data_version, "writes": second.writes}));
    p.send_bytes(bytes.as_bytes()).unwrap();
    let init = p.response("cln:init#1").unwrap();
    assert_eq!(init["result"], json!({}), "{init}");
    for id in ["cln:db_write#2", "cln:db_write#5"] {
        let v = p.response(id).unwrap();
        assert_eq!(v["result"], json!({"result": "continue"}), "{id}: {v}");
    }
    let st = p.response("cli:backup-status#3/cln:4").unwrap();
    assert!(st["result"]["state"] == "ok", "{st}");
    // setconfig on the dynamic option, and a refusal for a static one
    let v = p.request("cli", "setconfig", json!({"config": "backup-compact-io-rate", "val": 2000000})).unwrap();
    assert_eq!(v["result"], json!({}), "{v}");
    wait_for_log(&mut p, "info", "backup-compact-io-rate is now 2000000 bytes a second");
    let v = p.request("cli", "setconfig", json!({"config": "backup-autocompact", "val": false})).unwrap();
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("cannot change"), "{v}");
    // a later db_write still goes the direct way, and status still answers
    assert_eq!(p.db_write(tr[2].data_version, &tr[2].writes).unwrap(), Answer::Continue);
    assert_eq!(p.cli("backup-status", json!({})).unwrap()["latest_version"], tr[2].data_version);
    p.close().unwrap();
}

/// A bad option value disables the plugin at init, with the option named.
#[test]
fn an_unusable_option_value_is_named() {
    let s = Setup::new();
    let mut p = PluginProc::spawn(Path::new(BIN), &s.ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    let v = p.init_with(&s.ldir, json!({"backup-compact-ratio": "lots"})).unwrap();
    assert!(v["result"]["disable"].as_str().unwrap_or("").contains("backup-compact-ratio"), "{v}");
    p.close().unwrap();
}
