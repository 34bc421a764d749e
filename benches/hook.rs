//! `cargo bench`: the figures of the README, each next to a baseline measured in the same
//! run on the same filesystem, as a ratio.
//!
//! 1. db_write round trip through the real plugin binary over stdio, on the largest real
//!    trace (soak), against a bare write+fdatasync of the same record bytes. The two are
//!    interleaved call by call so machine noise hits both alike.
//! 2. Restore speed (statements/s) against SQLite executing the same statements in one
//!    transaction with the same settings.
//! 3. The plugin's RSS after the whole trace.
//! 4. A `socket:` append over loopback to the real `backup-cli server`, against one bare
//!    round trip on the same connection plus a write+fdatasync of the same bytes on the
//!    server's filesystem, interleaved call by call (CLN_BACKUP_BENCH_ONLY=socket: only this).
//!
//! Set CLN_BACKUP_BENCH_DIR to measure on another filesystem (default: target/bench-tmp),
//! and CLN_BACKUP_BENCH_GB to size the compaction-stall journal (default 1; 0 skips it).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cln_backup::compact::{self, Outcome};
use cln_backup::fsutil::Throttle;
use cln_backup::journal::{self, Kind};
use cln_backup::layout::Layout;
use cln_backup::restore::{self, Applier};
use cln_backup::sim::{self, Answer, Node, PluginProc};
use cln_backup::snapshot;
use cln_backup::writer::Writer;
use std::sync::Mutex;

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

fn hook_restore_and_compaction(base: &Path) {
    let base = base.to_path_buf();
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
        node.start_if_needed(&trace, i).unwrap();
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

    record_compression(&trace, h50);
    compaction_size_and_restore(&base, &root, &ldir);
    compaction_stall(&base);
}

/// Would compressing each journal record pay? The bytes it saves against the time it adds
/// to every hook (the format does not compress records; this decides whether it should).
fn record_compression(trace: &[sim::TraceRecord], hook_p50_us: f64) {
    let mut raw = 0u64;
    let mut packed = 0u64;
    let mut times = Vec::with_capacity(trace.len());
    let mut buf = Vec::new();
    for r in trace {
        buf.clear();
        journal::encode_record(&mut buf, r.data_version, r.kind(), &r.writes);
        let t = Instant::now();
        let z = zstd::bulk::compress(&buf[journal::RECORD_HEADER_LEN..], 1).unwrap();
        times.push(t.elapsed());
        raw += buf.len() as u64;
        packed += (journal::RECORD_HEADER_LEN + z.len()) as u64;
    }
    let (c50, c99) = (pct(&mut times, 0.5), pct(&mut times, 0.99));
    println!();
    println!("journal record compression (zstd level 1, one record at a time), evaluated on the soak trace:");
    println!(
        "  journal {:.1} MB -> {:.1} MB ({:.2}x); {c50:.1} µs p50, {c99:.1} µs p99 per record = {:.1}% of the hook p50",
        raw as f64 / 1e6,
        packed as f64 / 1e6,
        packed as f64 / raw as f64,
        100.0 * c50 / hook_p50_us
    );
}

fn main() {
    let base = std::env::var_os("CLN_BACKUP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp"));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).unwrap();
    let only = std::env::var("CLN_BACKUP_BENCH_ONLY").unwrap_or_default();
    if only == "stall" {
        compaction_stall(&base);
    } else if only == "socket" {
        socket_append(&base);
    } else {
        hook_restore_and_compaction(&base);
        socket_append(&base.join("socket"));
    }
    let _ = fs::remove_dir_all(&base);
}

fn secs<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

/// Copies a file and fsyncs it: the baseline for a restore.
fn copy_synced(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap();
    fs::File::open(to).unwrap().sync_all().unwrap();
}

/// The soak backup, compacted: its size against the database's, and its restore time
/// against a plain copy of the database file.
fn compaction_size_and_restore(base: &Path, root: &Path, ldir: &Path) {
    let before: u64 = fs::read_dir(root).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let (w, _) = Writer::open(root).unwrap();
    let (writer, status) = (Mutex::new(w), Mutex::new(compact::Status::idle()));
    let (out, cs) = secs(|| compact::compact(&writer, &status, &|_| {}, &mut Throttle::unlimited()).unwrap());
    let Outcome::Done(stats) = out else { panic!("nothing compacted") };
    drop(writer);
    let db = ldir.join("lightningd.sqlite3");
    let db_len = fs::metadata(&db).unwrap().len();
    println!();
    println!("compaction of the soak backup ({} records folded in {cs:.2} s)", stats.records_folded);
    println!(
        "  backup before        {:>10.1} MB ({:.1}x the database)",
        before as f64 / 1e6,
        before as f64 / db_len as f64
    );
    println!("  backup after         {:>10.3} MB", stats.after_bytes as f64 / 1e6);
    println!("  raw database         {:>10.3} MB", db_len as f64 / 1e6);
    println!("  ratio after/raw      {:>10.2}  target <= 0.5", stats.after_bytes as f64 / db_len as f64);
    let (_, rsec) = secs(|| restore::restore(root, &base.join("compacted-restore.sqlite3"), &mut |_, _| {}).unwrap());
    let (_, csec) = secs(|| copy_synced(&db, &base.join("copied.sqlite3")));
    println!("  restore compacted    {rsec:>10.3} s vs copying the database file {csec:.3} s: {:.1}x", rsec / csec);
}

/// Hook latency while a compaction folds a journal of at least 1 GB (grown synthetically
/// with datastore rows on the real schema), against the same run before it started.
fn compaction_stall(base: &Path) {
    let gb: f64 = std::env::var("CLN_BACKUP_BENCH_GB").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    if gb <= 0.0 {
        return;
    }
    let dir = base.join("big");
    let ldir = dir.join("regtest");
    fs::create_dir_all(&ldir).unwrap();
    let root = dir.join("big.bkp");
    cln_backup::writer::create(&root, None).unwrap();
    fs::write(ldir.join("backup.lock"), format!("{{\"backend_url\": \"file://{}\"}}", root.display())).unwrap();
    // the real schema first: the small trace
    let small = sim::read_trace(
        &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-tests/fixtures/small/trace.jsonl.gz")).unwrap(),
    )
    .unwrap();
    let (mut w, _) = Writer::open(&root).unwrap();
    let mut dv = 0;
    for r in &small {
        w.apply(r.data_version, &r.writes).unwrap();
        dv = r.data_version;
    }
    // then datastore rows of 32 KiB (64 KiB of hex SQL each), 6 bits of entropy a byte
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut row = |dv: u32, size: usize| -> Vec<String> {
        let mut hex = String::with_capacity(size * 2);
        for _ in 0..size {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            hex.push_str(&format!("{:02x}", (rng & 0x3f) as u8));
        }
        vec![
            format!(
                "INSERT OR REPLACE INTO datastore (key, data, generation) VALUES (x'{:08x}', x'{hex}', 0)",
                dv % 20_000
            ),
            format!("UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {}", dv - 1),
        ]
    };
    let target = (gb * 1e9) as u64;
    let (_, grow_s) = secs(|| {
        while w.journal_len() < target {
            dv += 1;
            w.apply(dv, &row(dv, 32 << 10)).unwrap();
        }
    });
    let journal_len = w.journal_len();
    drop(w);
    println!();
    println!("hook latency during compaction of a {:.2} GB journal (grown in {grow_s:.0} s: small trace + {} datastore rows)", journal_len as f64 / 1e9, dv - 79);
    let mut p = PluginProc::spawn(Path::new(BIN), &ldir, &[]).unwrap();
    p.getmanifest().unwrap();
    p.init_with(&ldir, serde_json::json!({"backup-autocompact": false})).unwrap();
    let mut call = |p: &mut PluginProc, dv: u32| -> Duration {
        let writes = row(dv, 512);
        let t = Instant::now();
        assert_eq!(p.db_write(dv, &writes).unwrap(), Answer::Continue);
        p.answered_at.saturating_duration_since(t)
    };
    // warm up; the quiet baseline comes after the compaction, as long as it took, so both
    // windows meet the machine's own rare hiccups alike
    let tq = Instant::now();
    while tq.elapsed() < Duration::from_secs(5) {
        dv += 1;
        call(&mut p, dv);
    }
    let (_, peak_before) = rss_kb(p.pid());
    assert_eq!(p.cli("backup-compact", serde_json::json!({})).unwrap()["result"], "compaction started");
    let t0 = Instant::now();
    let mut busy = vec![];
    // which phase each slow hook fell in (the status is read every 50 calls)
    let mut slow: Vec<(Duration, String)> = vec![];
    let mut by_phase = std::collections::BTreeMap::new();
    let status = loop {
        let mut worst = Duration::ZERO;
        let mut over = 0;
        for _ in 0..50 {
            dv += 1;
            let d = call(&mut p, dv);
            worst = worst.max(d);
            over += (d > Duration::from_millis(2)) as usize;
            busy.push(d);
        }
        let st = p.cli("backup-status", serde_json::json!({})).unwrap();
        let phase = st["compaction"]["phase"].as_str().unwrap_or("done").to_string();
        if worst > Duration::from_millis(20) {
            slow.push((worst, phase.clone()));
        }
        *by_phase.entry(phase).or_insert(0) += over;
        if st["compaction"]["state"] == "idle" {
            break st;
        }
    };
    println!("  hooks over 2 ms by the phase seen right after: {by_phase:?}");
    if !slow.is_empty() {
        println!("  hooks over 20 ms, with the phase seen right after: {slow:?}");
    }
    let compact_s = t0.elapsed().as_secs_f64();
    let mut quiet = vec![];
    let tq = Instant::now();
    while tq.elapsed() < Duration::from_secs_f64(compact_s) {
        dv += 1;
        quiet.push(call(&mut p, dv));
    }
    let (rss_after, peak_after) = rss_kb(p.pid());
    p.close().unwrap();
    let (q50, q99, qmax) = (pct(&mut quiet, 0.5), pct(&mut quiet, 0.99), pct(&mut quiet, 1.0));
    let (b50, b99, bmax) = (pct(&mut busy, 0.5), pct(&mut busy, 0.99), pct(&mut busy, 1.0));
    let last = &status["compaction"]["last"];
    println!(
        "  compaction took {compact_s:.1} s; {} hooks answered meanwhile; the final switch held the writer {} µs",
        busy.len(),
        last["switch_hold_us"]
    );
    println!("  {:<6} {:>14} {:>14} {:>8}  target", "", "compacting µs", "quiet after µs", "ratio");
    println!("  {:<6} {:>14.0} {:>14.0} {:>8.2}", "p50", b50, q50, b50 / q50);
    println!("  {:<6} {:>14.0} {:>14.0} {:>8.2}  <= 2", "p99", b99, q99, b99 / q99);
    println!("  {:<6} {:>14.0} {:>14.0} {:>8.2}  max <= 20000 µs", "max", bmax, qmax, bmax / qmax);
    let over = |v: &[Duration], ms: u64| v.iter().filter(|d| **d > Duration::from_millis(ms)).count();
    println!(
        "  hooks over 2 ms: {} of {} compacting, {} of {} quiet; over 20 ms: {} compacting, {} quiet ({compact_s:.0} s each)",
        over(&busy, 2),
        busy.len(),
        over(&quiet, 2),
        quiet.len(),
        over(&busy, 20),
        over(&quiet, 20)
    );
    println!(
        "  after: {:.1} MB (from {:.1} MB), {} records folded",
        last["after_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        last["before_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        last["records_folded"]
    );
    println!(
        "  plugin memory: peak {:.1} MB through the compaction (RSS {:.1} MB after it) against {:.1} MB before it, \
         with the 1 GB journal open: {:.2}x",
        peak_after as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        peak_before as f64 / 1024.0,
        peak_after as f64 / peak_before as f64
    );
    // Once more offline, so almost nothing follows the snapshot: restore against decompressing
    // the snapshot alone and against copying the database file.
    let (w, _) = Writer::open(&root).unwrap();
    let (writer, st) = (Mutex::new(w), Mutex::new(compact::Status::idle()));
    compact::compact(&writer, &st, &|_| {}, &mut Throttle::unlimited()).unwrap();
    drop(writer);
    let dest2 = dir.join("restored2.sqlite3");
    let (sum2, rsec2) = secs(|| restore::restore(&root, &dest2, &mut |_, _| {}).unwrap().1);
    let snap = Layout::new(&root).list().unwrap().snapshot.unwrap();
    let (_, dsec2) = secs(|| {
        snapshot::extract(&snap, &mut fs::File::open(&snap).unwrap(), &mut std::io::sink(), &mut |_| {}).unwrap()
    });
    let (_, csec) = secs(|| copy_synced(&dest2, &dir.join("copied.sqlite3")));
    println!(
        "  after one more (offline) compaction, restore {rsec2:.2} s ({} record after the snapshot, {:.0} MB database): decompressing the snapshot alone {dsec2:.2} s ({:.2}x), copying the database file {csec:.2} s ({:.2}x)",
        sum2.records,
        fs::metadata(&dest2).unwrap().len() as f64 / 1e6,
        rsec2 / dsec2,
        rsec2 / csec
    );
    let _ = fs::remove_dir_all(&dir);
}

/// 4. `socket:` append over loopback vs bare round trip + fdatasync of the same bytes.
fn socket_append(base: &Path) {
    use cln_backup::destination::socket::SocketDestination;
    use cln_backup::net::identity::SecretKey;
    use cln_backup::versions::{self, Decision};
    use std::io::BufRead;
    fs::create_dir_all(base).unwrap();
    let trace_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-tests/fixtures/soak/trace.jsonl.gz");
    let trace = sim::read_trace(&fs::read(&trace_path).unwrap()).unwrap();
    let root = base.join("server.bkp");
    let o = std::process::Command::new(CLI).args(["init", &format!("file://{}", root.display())]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new(CLI)
        .args(["server", &format!("file://{}", root.display()), &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited");
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let key = SecretKey::generate().unwrap();
    let mut d =
        SocketDestination::connect(&format!("socket:127.0.0.1:{port}"), key, None, Duration::from_secs(60), true)
            .unwrap();
    let baseline_file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(base.join("socket-baseline.bin"))
        .unwrap();
    let (mut off, mut buf) = (0u64, Vec::new());
    let (mut appends, mut baseline) = (Vec::with_capacity(trace.len()), Vec::with_capacity(trace.len()));
    let t0 = Instant::now();
    for rec in &trace {
        let kind = rec.kind();
        let replace = match versions::decide(d.position(), rec.data_version, kind) {
            Decision::Append => false,
            Decision::ReplaceLast => true,
            other => panic!("{other:?}"),
        };
        buf.clear();
        journal::encode_record(&mut buf, rec.data_version, kind, &rec.writes);
        let rtt = d.ping().unwrap();
        let b0 = Instant::now();
        baseline_file.write_all_at(&buf, off).unwrap();
        baseline_file.sync_data().unwrap();
        baseline.push(rtt + b0.elapsed());
        off += buf.len() as u64;
        let a0 = Instant::now();
        d.append(rec.data_version, kind, replace, &buf).unwrap();
        appends.push(a0.elapsed());
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(d);
    let _ = server.kill();
    let _ = server.wait();
    let (a50, a99) = (pct(&mut appends, 0.5), pct(&mut appends, 0.99));
    let (b50, b99) = (pct(&mut baseline, 0.5), pct(&mut baseline, 0.99));
    println!();
    println!(
        "socket: append over loopback vs bare round trip + write+fdatasync of the same bytes, {} calls, {secs:.1} s",
        trace.len()
    );
    println!("  {:<6} {:>12} {:>12} {:>8}  target", "", "append µs", "baseline µs", "ratio");
    println!("  {:<6} {:>12.0} {:>12.0} {:>8.2}  <= 1.2", "p50", a50, b50, a50 / b50);
    println!("  {:<6} {:>12.0} {:>12.0} {:>8.2}  <= 1.2", "p99", a99, b99, a99 / b99);
}
