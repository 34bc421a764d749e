//! `backup-cli`: the operator's commands. Errors become messages with what to do.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::destination::socket;
use crate::error::StoreError;
use crate::layout;
use crate::net::url::is_socket_url;
use crate::plugin::LOCK_NAME;
use crate::restore::{self, Summary};
use crate::{fsutil, rpc, sim, snapshot, writer};

#[derive(Parser)]
#[command(
    name = "backup-cli",
    version,
    about = "Create, check and restore cln-backup backups of lightningd's database"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new backup (and backup.lock in the lightning dir). Run with lightningd stopped.
    Init {
        /// The network's lightning dir (e.g. ~/.lightning/bitcoin); its database becomes the
        /// backup's first snapshot. Without it, an empty backup for a new node is made.
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
        /// [LIGHTNING_DIR] BACKEND_URL: the backup's place, file:///path/to/backup (the
        /// lightning dir may also come first, as the Python backup-cli accepted).
        #[arg(num_args = 1..=2, required = true, value_name = "BACKEND_URL")]
        args: Vec<String>,
    },
    /// Rebuild lightningd.sqlite3 from a backup. DEST is a new file, or a directory.
    Restore { backend_url: String, restore_destination: PathBuf },
    /// Read the whole backup and check every checksum and the version chain. Writes nothing.
    Verify { backend_url: String },
    /// Fold the journal into a new compressed snapshot, offline (lightningd stopped, or on a
    /// backup server). With the plugin running, use `lightning-cli backup-compact`.
    Compact { backend_url: String },
    /// Convert a backup of the Python backup plugin (a v1 file) into a cln-backup backup at
    /// the same data_version. Run with lightningd stopped.
    Migrate {
        old_url: String,
        new_url: String,
        /// Also point this lightning dir's backup.lock at the new backup.
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
    },
    /// Serve file backups to paired nodes over an encrypted connection, for their
    /// socket:HOST:PORT URLs. Runs in the foreground; stops on SIGTERM.
    Server {
        /// FILE_URL [FILE_URL...] HOST:PORT: the backups (made by `backup-cli init` here)
        /// and the address to listen on (`::` or `localhost`: IPv4 and IPv6).
        #[arg(num_args = 2.., required = true, value_name = "FILE_URL")]
        args: Vec<String>,
        /// The node's public key (hex) to pair with, for the backup in the same position;
        /// without it, the first node to connect pairs.
        #[arg(long)]
        client_key: Vec<String>,
    },
    /// Show the main job on a bundled real trace, with no lightningd needed.
    Demo {
        /// Which bundled trace: small or channels.
        #[arg(long, default_value = "channels")]
        trace: String,
    },
}

/// Both binaries: the plugin when lightningd runs them (it sets LIGHTNINGD_PLUGIN=1 and may
/// add `--developer`), the command line otherwise.
pub fn entry() -> ExitCode {
    if std::env::var_os("LIGHTNINGD_PLUGIN").is_some_and(|v| v == "1") {
        return match crate::plugin::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = match e.downcast_ref::<StoreError>() {
                Some(se) => se.explain(),
                None => format!("{e:#}"),
            };
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let url_path = |u: &str| layout::parse_url(u, &cwd).map_err(|e| anyhow!(e));
    match cmd {
        Cmd::Init { lightning_dir, mut args } => {
            let backend_url = args.pop().unwrap_or_default();
            let ldir = match (lightning_dir, args.pop()) {
                (Some(_), Some(_)) => {
                    bail!("give the lightning dir once: either --lightning-dir DIR or as the first argument")
                }
                (l, p) => l.or(p.map(PathBuf::from)),
            };
            if is_socket_url(&backend_url) {
                return socket::cli::init(ldir.as_deref(), &backend_url);
            }
            init(ldir.as_deref(), &url_path(&backend_url)?)
        }
        Cmd::Restore { backend_url, restore_destination } => {
            let (dest, s) = if is_socket_url(&backend_url) {
                socket::cli::restore(&backend_url, &restore_destination, &mut progress_bar("Restoring"))?
            } else {
                restore::restore(&url_path(&backend_url)?, &restore_destination, &mut progress_bar("Restoring"))?
            };
            finish_progress();
            print_summary("Restored", &s);
            println!("Wrote {}", dest.display());
            Ok(())
        }
        Cmd::Verify { backend_url } => {
            let s = if is_socket_url(&backend_url) {
                socket::cli::verify(&backend_url, &mut progress_bar("Verifying"))?
            } else {
                restore::verify(&url_path(&backend_url)?, &mut progress_bar("Verifying"))?
            };
            finish_progress();
            print_summary("Verified", &s);
            Ok(())
        }
        Cmd::Migrate { old_url, new_url, lightning_dir } => {
            migrate(&url_path(&old_url)?, &url_path(&new_url)?, lightning_dir.as_deref())
        }
        Cmd::Compact { backend_url } => compact_offline(&url_path(&backend_url)?),
        Cmd::Server { args, client_key } => crate::server::cli(&args, &client_key, &cwd),
        Cmd::Demo { trace } => demo(&trace),
    }
}

fn init(lightning_dir: Option<&Path>, root: &Path) -> Result<()> {
    let url = layout::url_for(root);
    let Some(ldir) = lightning_dir else {
        writer::create(root, None)?;
        println!("Created an empty backup at {url} for a new node.");
        println!("Put {{\"backend_url\": \"{url}\"}} into {LOCK_NAME} in the node's lightning dir, or run init with --lightning-dir.");
        return Ok(());
    };
    if !ldir.is_dir() {
        bail!(
            "lightning dir {} does not exist: give the network's directory, e.g. ~/.lightning/bitcoin",
            ldir.display()
        );
    }
    if rpc::lightningd_running(ldir) {
        bail!("lightningd is running on {}: stop it first (lightning-cli stop), then run init again", ldir.display());
    }
    let lock = ldir.join(LOCK_NAME);
    if lock.exists() {
        bail!(
            "{} already exists: this node already has a backup. To start a new one, stop lightningd and move {} away first",
            lock.display(),
            lock.display()
        );
    }
    let db = ldir.join(restore::DB_NAME);
    if db.exists() {
        let tmp = fsutil::tmp_path(&root.with_extension("snapshot-source"));
        let _ = fs::remove_file(&tmp);
        let result = (|| -> Result<()> {
            let dv = snapshot::copy_live_database(&db, &tmp)?;
            println!("Found an existing database with data_version {dv} at {}", db.display());
            writer::create(root, Some((&tmp, dv)))?;
            println!("Successfully written initial snapshot to {url}");
            Ok(())
        })();
        let _ = fs::remove_file(&tmp);
        result?;
    } else {
        writer::create(root, None)?;
        println!("No database in {} yet: created an empty backup at {url}", ldir.display());
    }
    let body = serde_json::to_vec(&serde_json::json!({ "backend_url": url }))?;
    fsutil::write_atomic(&lock, false, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))?;
    println!("Wrote {}. Now add to lightningd's config: important-plugin=/path/to/cln-backup", lock.display());
    Ok(())
}

fn compact_offline(root: &Path) -> Result<()> {
    let (w, report) = match writer::Writer::open(root) {
        Err(StoreError::Locked { path }) => bail!(
            "{} is in use by a running cln-backup plugin: compact it there, with `lightning-cli backup-compact`",
            path.display()
        ),
        r => r?,
    };
    if !report.removed.is_empty() {
        println!("Removed {} leftover file(s) of an interrupted compaction", report.removed.len());
    }
    let writer = std::sync::Mutex::new(w);
    let status = std::sync::Mutex::new(crate::compact::Status::idle());
    println!("Starting compaction of {}", root.display());
    let outcome = std::thread::scope(|s| {
        let run = s.spawn(|| {
            crate::compact::compact(&writer, &status, &|m| println!("{m}"), &mut crate::fsutil::Throttle::unlimited())
        });
        // one bar per phase, from the status the compaction keeps
        let (mut shown, mut bar): (_, Box<dyn FnMut(u64, u64)>) = (None, Box::new(|_, _| {}));
        while !run.is_finished() {
            let (phase, done, total) = {
                let st = crate::compact::lock(&status);
                (st.phase, st.progress_bytes, st.total_bytes)
            };
            if let Some(phase) = phase {
                if shown != Some(phase) {
                    finish_progress();
                    shown = Some(phase);
                    bar = Box::new(progress_bar(format!("Compacting: {phase:<9}")));
                }
                bar(done, total);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        run.join()
            .unwrap_or_else(|_| Err(StoreError::Invalid { path: root.into(), what: "compaction panicked".into() }))
    });
    finish_progress();
    match outcome? {
        crate::compact::Outcome::Nothing(why) => println!("{why}"),
        crate::compact::Outcome::Done(s) => println!(
            "Compacted: folded {} records into generation {} at data_version {}; {:.1} MB -> {:.1} MB in {:.2} s",
            s.records_folded,
            s.generation,
            s.snapshot_version,
            s.before_bytes as f64 / 1e6,
            s.after_bytes as f64 / 1e6,
            s.seconds
        ),
    }
    Ok(())
}

fn migrate(old: &Path, new: &Path, lightning_dir: Option<&Path>) -> Result<()> {
    if !crate::legacy::is_v1_file(old) {
        if old.is_dir() {
            bail!("{} is already a cln-backup backup: nothing to migrate", old.display());
        }
        bail!("{} is not a backup file of the Python backup plugin (v1)", old.display());
    }
    let lock = lightning_dir.map(|d| d.join(LOCK_NAME));
    if let (Some(ldir), Some(lock)) = (lightning_dir, &lock) {
        if rpc::lightningd_running(ldir) {
            bail!("lightningd is running on {}: stop it first (lightning-cli stop), then migrate", ldir.display());
        }
        let text = fs::read_to_string(lock).with_context(|| format!("read {}", lock.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parse {}", lock.display()))?;
        let points_at = v["backend_url"].as_str().and_then(|u| layout::parse_url(u, ldir).ok());
        let same = points_at.as_ref().and_then(|p| fs::canonicalize(p).ok()) == fs::canonicalize(old).ok();
        if !same {
            bail!(
                "{} points at {:?}, not at {}: check which backup this node uses",
                lock.display(),
                v["backend_url"],
                old.display()
            );
        }
    }
    let s = crate::legacy::migrate(old, new, &mut progress_bar("Migrating"))?;
    finish_progress();
    let check = restore::verify(new, &mut |_, _| {})?;
    if check.version != s.version {
        bail!("the new backup ends at {}, the old one at {}: not switching", check.version, s.version);
    }
    let url = layout::url_for(new);
    println!(
        "Migrated {} ({} records, data_version {}) to {url}: a snapshot at {} and {} pending record(s)",
        old.display(),
        s.records,
        s.version,
        check.snapshot_version.map_or("none".into(), |v| v.to_string()),
        check.records
    );
    if let Some(lock) = lock {
        let body = serde_json::to_vec(&serde_json::json!({ "backend_url": url }))?;
        fsutil::write_atomic(&lock, true, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))?;
        println!("{} now points at {url}", lock.display());
    }
    println!(
        "Next: in lightningd's config replace plugin=/path/to/backup.py with important-plugin=/path/to/cln-backup, \
         then start lightningd; it logs \"Versions match up\". {} is left untouched: remove it once cln-backup runs.",
        old.display()
    );
    Ok(())
}

fn print_summary(what: &str, s: &Summary) {
    let snap = s.snapshot_version.map_or("none (empty base)".to_string(), |v| v.to_string());
    println!(
        "{what} data_version {}: generation {}, snapshot at {snap}, {} records ({} transactions, {} statements), {:.1} MB, in {:.2} s",
        s.version,
        s.generation,
        s.records,
        s.transactions,
        s.statements,
        s.bytes as f64 / 1e6,
        s.seconds
    );
    if let Some((off, len)) = s.torn_tail {
        println!(
            "Note: the journal ends with {len} bytes of an incomplete record at offset {off} (a write in progress, or cut by a crash); it was never acknowledged and is not part of the backup."
        );
    }
    for u in &s.unverified {
        println!("Not verifiable: {u}");
    }
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
fn progress_bar(label: impl std::fmt::Display) -> impl FnMut(u64, u64) {
    let tty = std::io::stderr().is_terminal();
    let mut last = Instant::now() - Duration::from_secs(1);
    move |done, total| {
        if !tty || last.elapsed() < Duration::from_millis(100) || total == 0 {
            return;
        }
        last = Instant::now();
        let frac = (done as f64 / total as f64).min(1.0);
        let filled = (frac * 30.0) as usize;
        eprint!(
            "\r{label} [{}{}] {:3.0}% {:.1}/{:.1} MB",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            frac * 100.0,
            done as f64 / 1e6,
            total as f64 / 1e6
        );
    }
}

fn finish_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

const DEMO_TRACES: &[(&str, &[u8], &[u8])] = &[
    (
        "small",
        include_bytes!("../plugin-tests/fixtures/small/trace.jsonl.gz"),
        include_bytes!("../plugin-tests/fixtures/small/final.sqlite3.gz"),
    ),
    (
        "channels",
        include_bytes!("../plugin-tests/fixtures/channels/trace.jsonl.gz"),
        include_bytes!("../plugin-tests/fixtures/channels/final.sqlite3.gz"),
    ),
];

/// Plays lightningd's part from a real trace, then restores and compares.
fn demo(name: &str) -> Result<()> {
    let (_, trace_gz, final_gz) = DEMO_TRACES
        .iter()
        .find(|t| t.0 == name)
        .ok_or_else(|| anyhow!("no bundled trace '{name}': use small or channels"))?;
    let trace = sim::read_trace(trace_gz)?;
    let tmp = std::env::temp_dir().join(format!("cln-backup-demo-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let result = demo_in(&tmp, name, &trace, final_gz);
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Asks the plugin to compact and waits for it; returns `backup-status`'s compaction part.
fn demo_compaction(plugin: &mut sim::PluginProc) -> Result<serde_json::Value> {
    let r = plugin.cli("backup-compact", serde_json::json!({}))?;
    if r["result"] != "compaction started" {
        bail!("backup-compact answered {r}");
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let c = plugin.cli("backup-status", serde_json::json!({}))?["compaction"].clone();
        if c["state"] == "idle" {
            if !c["last_error"].is_null() {
                bail!("compaction failed: {}", c["last_error"]);
            }
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("compaction did not finish in 2 minutes: {c}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn demo_in(tmp: &Path, name: &str, trace: &[sim::TraceRecord], final_gz: &[u8]) -> Result<()> {
    let ldir = tmp.join("regtest");
    fs::create_dir_all(&ldir)?;
    let root = tmp.join("node.bkp");
    println!("== cln-backup demo: a real lightningd v26.06 trace ('{name}', {} db_write calls)", trace.len());
    println!("   lightning dir {}, backup {}", ldir.display(), layout::url_for(&root));
    init(Some(&ldir), &root)?;
    let bin = std::env::current_exe().context("find own binary")?;
    let mut node = sim::Node::new(&bin, &ldir)?;
    let t0 = Instant::now();
    let restarts = (0..trace.len()).filter(|&i| sim::restarts_at(trace, i)).count();
    if let Some((i, v)) = node.replay(trace, 0..trace.len())? {
        bail!("the plugin halted lightningd at call {i}: {v}");
    }
    let replay_s = t0.elapsed().as_secs_f64();
    let status = node.plugin()?.cli("backup-status", serde_json::json!({}))?;
    let compaction = demo_compaction(node.plugin()?)?;
    let logs = node.plugin()?.logs();
    node.stop()?;
    let mut times: Vec<_> = node.hook_times.iter().map(|d| d.as_micros() as u64).collect();
    times.sort_unstable();
    let pct = |q: f64| times[((q * times.len() as f64) as usize).min(times.len() - 1)];
    println!(
        "-- replayed {} calls ({} lightningd restarts) in {replay_s:.2} s; every answer came after write+fdatasync",
        trace.len(),
        restarts
    );
    println!("   hook round trip: p50 {} µs, p99 {} µs, max {} µs", pct(0.5), pct(0.99), times[times.len() - 1]);
    for (level, msg) in logs.iter().filter(|(_, m)| m.starts_with("Versions match up") || m.starts_with("Opened")) {
        println!("   plugin {level}: {msg}");
    }
    println!(
        "-- backup-status: latest_version {}, records {}, {} bytes",
        status["latest_version"], status["records_since_snapshot"], status["total_bytes"]
    );
    let last = &compaction["last"];
    println!(
        "-- backup-compact (runs in the background): {} records folded, {:.2} MB -> {:.2} MB \
         in {:.2} s; the final switch held db_write {} µs",
        last["records_folded"],
        last["before_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        last["after_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        last["seconds"].as_f64().unwrap_or(0.0),
        last["switch_hold_us"]
    );
    let dest = tmp.join("restored");
    fs::create_dir_all(&dest)?;
    let (db, s) = restore::restore(&root, &dest, &mut |_, _| {})?;
    println!(
        "-- restored data_version {} (the snapshot, then {} journal record(s), {} statement(s)) in {:.3} s",
        s.version, s.records, s.statements, s.seconds
    );
    let (tables, rows) = sim::compare_databases(&db, &node.db_path())?;
    println!("   identical to the node's own committed database: {tables} tables, {rows} rows");
    let final_db = tmp.join("final.sqlite3");
    sim::gunzip_to(final_gz, &final_db)?;
    sim::compare_databases(&db, &final_db)?;
    println!("   identical to the real node's final lightningd.sqlite3");
    println!("== demo OK");
    Ok(())
}
