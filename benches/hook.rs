//! `cargo bench`: the figures of the README, each next to a baseline measured in the same
//! run on the same filesystem, as a ratio.
//!
//! 1. db_write round trip through the real plugin binary over stdio, on the largest real
//!    trace (soak), against a bare write+fdatasync of the same record bytes. The two are
//!    interleaved call by call so machine noise hits both alike.
//! 2. Restore speed (statements/s) against SQLite executing the same statements in one
//!    transaction with the same settings.
//! 3. The plugin's RSS after the whole trace.
//!
//! Set CLN_BACKUP_BENCH_DIR to measure on another filesystem (default: target/bench-tmp).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cln_backup::journal::{self, Kind};
use cln_backup::restore::{self, Applier};
use cln_backup::sim::{self, Answer, Node};

const BIN: &str = env!("CARGO_BIN_EXE_cln-backup");
const CLI: &str = env!("CARGO_BIN_EXE_backup-cli");

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort_unstable();
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e6
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

fn main() {
    let base = std::env::var_os("CLN_BACKUP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp"));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let trace_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-tests/fixtures/soak/trace.jsonl.gz");
    let trace = sim::read_trace(&fs::read(&trace_path).unwrap()).unwrap();
    let stmts: usize = trace.iter().map(|r| r.writes.len()).sum();
    println!(
        "cln-backup benchmark: trace soak ({} db_write calls, {stmts} statements), dir {}",
        trace.len(),
        base.display()
    );

    // 1. hook round trip vs write+fdatasync
    let ldir = base.join("regtest");
    fs::create_dir_all(&ldir).unwrap();
    let root = base.join("node.bkp");
    let o = std::process::Command::new(CLI)
        .args(["init", "--lightning-dir", ldir.to_str().unwrap(), &format!("file://{}", root.display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let baseline_file =
        OpenOptions::new().create(true).truncate(true).read(true).write(true).open(base.join("baseline.bin")).unwrap();
    let mut baseline_off = 0u64;
    let mut baseline = Vec::with_capacity(trace.len());
    let mut buf = Vec::new();
    let mut node = Node::new(Path::new(BIN), &ldir).unwrap();
    let t0 = Instant::now();
    for (i, rec) in trace.iter().enumerate() {
        if node.plugin.is_none() || (rec.before_init && i > 0 && !trace[i - 1].before_init) {
            node.start().unwrap();
        }
        buf.clear();
        journal::encode_record(&mut buf, rec.data_version, rec.kind(), &rec.writes);
        let b0 = Instant::now();
        baseline_file.write_all_at(&buf, baseline_off).unwrap();
        baseline_file.sync_data().unwrap();
        baseline.push(b0.elapsed());
        baseline_off += buf.len() as u64;
        assert_eq!(node.step(rec).unwrap(), Answer::Continue, "call {i}");
    }
    let replay_s = t0.elapsed().as_secs_f64();
    let pid = node.plugin().unwrap().pid();
    let (rss, hwm) = rss_kb(pid);
    node.stop().unwrap();
    let mut hooks = node.hook_times.clone();
    let (h50, h99, hmax) = (pct(&mut hooks, 0.5), pct(&mut hooks, 0.99), pct(&mut hooks, 1.0));
    let (b50, b99, bmax) = (pct(&mut baseline, 0.5), pct(&mut baseline, 0.99), pct(&mut baseline, 1.0));
    println!();
    println!(
        "db_write round trip (plugin over stdio) vs bare write+fdatasync of the same bytes, {} calls, {replay_s:.1} s",
        trace.len()
    );
    println!("  {:<6} {:>12} {:>12} {:>8}  target", "", "plugin µs", "baseline µs", "ratio");
    println!("  {:<6} {:>12.0} {:>12.0} {:>8.2}  <= 1.3", "p50", h50, b50, h50 / b50);
    println!("  {:<6} {:>12.0} {:>12.0} {:>8.2}  <= 1.5", "p99", h99, b99, h99 / b99);
    println!("  {:<6} {:>12.0} {:>12.0} {:>8.2}", "max", hmax, bmax, hmax / bmax);
    println!(
        "plugin memory after the whole trace: RSS {:.1} MB (peak {:.1} MB), target <= 16 MB",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    // 2. restore speed vs SQLite executing the same statements in one transaction
    let mut best_restore = f64::MAX;
    let mut best_sqlite = f64::MAX;
    let mut restored_stmts = 0;
    for round in 0..3 {
        let dest = base.join(format!("restored-{round}.sqlite3"));
        let t = Instant::now();
        let (_, s) = restore::restore(&root, &dest, &mut |_, _| {}).unwrap();
        best_restore = best_restore.min(t.elapsed().as_secs_f64());
        restored_stmts = s.statements;
        let plain = base.join(format!("sqlite-{round}.sqlite3"));
        let t = Instant::now();
        let conn = restore::open_build_db(&plain).unwrap();
        let mut a = Applier::new(&conn);
        // one transaction for everything but the statements SQLite cannot run inside one
        for r in &trace {
            let kind = if r.kind() == Kind::Outside { Kind::Outside } else { Kind::Transaction };
            a.apply(kind, &r.writes).unwrap();
        }
        a.commit().unwrap();
        drop(conn);
        best_sqlite = best_sqlite.min(t.elapsed().as_secs_f64());
        sim::compare_databases(&dest, &plain).unwrap();
    }
    let rs = restored_stmts as f64 / best_restore;
    let ss = restored_stmts as f64 / best_sqlite;
    println!();
    println!("restore (best of 3): {restored_stmts} statements");
    println!(
        "  cln-backup restore   {:>10.0} stmt/s ({best_restore:.3} s, includes reading, checksums, integrity check)",
        rs
    );
    println!("  SQLite alone         {:>10.0} stmt/s ({best_sqlite:.3} s)", ss);
    println!("  ratio                {:>10.2}  target >= 0.9", rs / ss);
    let _ = fs::remove_dir_all(&base);
}
