//! A stand-in for lightningd, for the demo, the tests and the benchmark: it runs the real
//! plugin binary as a child process and speaks lightningd's protocol in lightningd's order
//! (getmanifest, db_write before init, init, more db_write, passthrough commands, stdin
//! closed), and keeps its own SQLite database, committing each transaction only after the
//! plugin answered `continue`, as lightningd does.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::journal::Kind;
use crate::plugin::protocol::Framer;
use crate::versions;

#[derive(Debug, Clone, Deserialize)]
pub struct TraceRecord {
    pub data_version: u32,
    pub writes: Vec<String>,
    #[serde(default)]
    pub before_init: bool,
}

impl TraceRecord {
    pub fn kind(&self) -> Kind {
        versions::classify(self.data_version, &self.writes).unwrap_or(Kind::Outside)
    }
}

/// Reads a trace: one JSON record per line, gzip-compressed or not.
pub fn read_trace(bytes: &[u8]) -> Result<Vec<TraceRecord>> {
    let reader: Box<dyn Read + '_> =
        if bytes.starts_with(&[0x1f, 0x8b]) { Box::new(flate2::read::GzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut out = vec![];
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.context("reading trace")?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("trace line {}", i + 1))?);
    }
    Ok(out)
}

pub fn gunzip_to(bytes: &[u8], dest: &Path) -> Result<()> {
    let mut d = flate2::read::GzDecoder::new(bytes);
    let mut f = File::create(dest)?;
    std::io::copy(&mut d, &mut f)?;
    Ok(())
}

/// lightningd restarted before record `i`: startup calls (before init) after normal ones.
pub fn restarts_at(trace: &[TraceRecord], i: usize) -> bool {
    i > 0 && trace[i].before_init && !trace[i - 1].before_init
}

#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Continue,
    Halt(Value),
}

/// The plugin as a child process, driven as lightningd drives it: one thread, non-blocking
/// pipes, and a poll on the plugin's stdout while waiting for an answer. (A reader thread
/// here would add a thread wake-up to every measured round trip that lightningd's single
/// event loop does not pay: about 25 µs on a 2-core VM.)
pub struct PluginProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Framer<ChildStdout>,
    stdout_fd: RawFd,
    /// The plugin closed its stdout.
    eof: bool,
    /// Answers read while waiting for another one.
    early: Vec<(Value, Instant)>,
    /// When the last awaited response was read off the plugin's stdout.
    pub answered_at: Instant,
    logs: Vec<(String, String)>,
    /// CLN_BACKUP_SIM_LOG: print the plugin's log lines as they are read.
    echo: bool,
    next_id: u64,
    buf: Vec<u8>,
    pub timeout: Duration,
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor this process owns, with constant flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()).context("make a pipe to the plugin non-blocking")
    }
}

/// Waits until `fd` is ready for `events` or `deadline` passes; false on timeout.
fn wait_ready(fd: RawFd, events: libc::c_short, deadline: Instant) -> Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        let mut p = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll the plugin's pipe");
            }
        }
    }
}

#[derive(Serialize)]
struct DbWriteReq<'a> {
    jsonrpc: &'static str,
    id: String,
    method: &'static str,
    params: DbWriteParams<'a>,
}

#[derive(Serialize)]
struct DbWriteParams<'a> {
    data_version: u32,
    writes: &'a [String],
}

impl PluginProc {
    /// Starts `bin` as lightningd would: cwd = the lightning dir, LIGHTNINGD_PLUGIN=1.
    pub fn spawn(bin: &Path, lightning_dir: &Path, args: &[&str]) -> Result<PluginProc> {
        PluginProc::spawn_with_env(bin, lightning_dir, args, &[])
    }

    pub fn spawn_with_env(
        bin: &Path,
        lightning_dir: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<PluginProc> {
        let mut child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .current_dir(lightning_dir)
            .env("LIGHTNINGD_PLUGIN", "1")
            .env("LIGHTNINGD_VERSION", "v26.06-sim")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        set_nonblocking(stdout.as_raw_fd())?;
        set_nonblocking(stdin.as_raw_fd())?;
        Ok(PluginProc {
            child,
            stdin: Some(stdin),
            stdout_fd: stdout.as_raw_fd(),
            stdout: Framer::new(stdout),
            eof: false,
            early: Vec::new(),
            answered_at: Instant::now(),
            logs: Vec::new(),
            echo: std::env::var_os("CLN_BACKUP_SIM_LOG").is_some(),
            next_id: 20,
            buf: vec![],
            timeout: Duration::from_secs(60),
        })
    }

    /// Reads the next message off the plugin's stdout, waiting until `deadline`: a log
    /// line is kept in `logs`, anything else in `early`. False when nothing came in time.
    fn read_one(&mut self, deadline: Instant) -> Result<bool> {
        loop {
            if self.eof {
                return Ok(false);
            }
            let msg = match self.stdout.next_value() {
                Some(Ok(bytes)) => serde_json::from_slice::<Value>(bytes).map_err(|e| {
                    anyhow!("the plugin wrote what is not JSON ({e}): {}", String::from_utf8_lossy(bytes))
                }),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !wait_ready(self.stdout_fd, libc::POLLIN, deadline)? {
                        return Ok(false);
                    }
                    continue;
                }
                Some(Err(e)) => Err(anyhow!("reading the plugin's stdout: {e}")),
                None => {
                    self.eof = true;
                    return Ok(false);
                }
            };
            let msg = msg?;
            if msg["method"] == "log" {
                let level = msg["params"]["level"].as_str().unwrap_or("").to_string();
                let text = msg["params"]["message"].as_str().unwrap_or("").to_string();
                if self.echo {
                    eprintln!("plugin {level}: {text}");
                }
                self.logs.push((level, text));
            } else {
                self.early.push((msg, Instant::now()));
            }
            return Ok(true);
        }
    }

    /// Reads whatever the plugin has written so far, without waiting: with the deadline
    /// already here, `read_one` reads what the pipe holds and never polls.
    fn drain(&mut self) -> Result<()> {
        while self.read_one(Instant::now())? {}
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `buf` and the blank line that ends a message, as lightningd does.
    fn send_raw(&mut self) -> Result<()> {
        self.buf.extend_from_slice(b"\n\n");
        self.write_buf()
    }

    /// Writes `buf`; while the pipe is full, reads what the plugin writes, so that neither
    /// side waits on the other.
    fn write_buf(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut at = 0;
        while at < self.buf.len() {
            let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("stdin already closed"))?;
            match stdin.write(&self.buf[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fd = stdin.as_raw_fd();
                    self.drain()?;
                    if !wait_ready(fd, libc::POLLOUT, (Instant::now() + Duration::from_millis(5)).min(deadline))?
                        && Instant::now() >= deadline
                    {
                        bail!("the plugin did not read its stdin within {:?}", self.timeout);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("write to plugin"),
            }
        }
        Ok(())
    }

    /// Sends these bytes and nothing else (for tests of framing and malformed input).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(bytes);
        self.write_buf()
    }

    fn wait_for(&mut self, id: &str) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // an answer to another request, read before its turn, is kept for it
            if let Some(i) = self.early.iter().position(|(v, _)| v["id"] == id) {
                let (v, at) = self.early.remove(i);
                self.answered_at = at;
                return Ok(v);
            }
            if !self.read_one(deadline)? {
                if self.eof {
                    bail!("plugin exited before answering {id}");
                }
                let _ = self.child.kill();
                bail!("plugin did not answer {id} within {:?}", self.timeout)
            }
        }
    }

    /// Waits for the response with this id (to a request sent with `send_bytes`).
    pub fn response(&mut self, id: &str) -> Result<Value> {
        self.wait_for(id)
    }

    /// Sends a request; returns the whole response object.
    pub fn request(&mut self, prefix: &str, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = format!("{prefix}:{method}#{}", self.next_id);
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        self.send_raw()?;
        self.wait_for(&id)
    }

    pub fn db_write(&mut self, data_version: u32, writes: &[String]) -> Result<Answer> {
        let id = self.send_db_write(data_version, writes)?;
        self.db_write_answer(&id)
    }

    /// Sends a db_write without waiting (to kill the plugin while it works on it).
    pub fn send_db_write(&mut self, data_version: u32, writes: &[String]) -> Result<String> {
        self.next_id += 1;
        let id = format!("cln:db_write#{}", self.next_id);
        self.buf.clear();
        let req = DbWriteReq {
            jsonrpc: "2.0",
            id: id.clone(),
            method: "db_write",
            params: DbWriteParams { data_version, writes },
        };
        serde_json::to_writer(&mut self.buf, &req)?;
        self.send_raw()?;
        Ok(id)
    }

    pub fn db_write_answer(&mut self, id: &str) -> Result<Answer> {
        let v = self.wait_for(id)?;
        if v["result"] == json!({"result": "continue"}) {
            Ok(Answer::Continue)
        } else {
            Ok(Answer::Halt(v))
        }
    }

    pub fn getmanifest(&mut self) -> Result<Value> {
        let v = self.request("cln", "getmanifest", json!({"allow-deprecated-apis": false}))?;
        v.get("result").cloned().ok_or_else(|| anyhow!("getmanifest: {v}"))
    }

    pub fn init(&mut self, lightning_dir: &Path) -> Result<Value> {
        self.init_with(lightning_dir, json!({}))
    }

    pub fn init_with(&mut self, lightning_dir: &Path, options: Value) -> Result<Value> {
        let params = json!({
            "options": options,
            "configuration": {
                "lightning-dir": lightning_dir,
                "rpc-file": "lightning-rpc",
                "startup": true,
                "network": "regtest",
                "feature_set": {"init": "", "node": "", "channel": "", "invoice": ""},
            }
        });
        self.request("cln", "init", params)
    }

    /// A command passed through from lightning-cli, with lightningd's composite id.
    pub fn cli(&mut self, method: &str, params: Value) -> Result<Value> {
        let v = self.request(&format!("cli:{method}#{}/cln", self.next_id + 28000), method, params)?;
        v.get("result").cloned().ok_or_else(|| anyhow!("{method}: {v}"))
    }

    /// Every log line so far (read off the pipe now).
    pub fn logs(&mut self) -> Vec<(String, String)> {
        // A plugin that wrote garbage is caught by the next request; the lines so far stand.
        let _ = self.drain();
        self.logs.clone()
    }

    pub fn has_log(&mut self, needle: &str) -> bool {
        self.logs().iter().any(|(_, m)| m.contains(needle))
    }

    /// Closes stdin, as lightningd does at shutdown, and waits for the exit.
    pub fn close(mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            // its last log lines must not find the pipe full
            let _ = self.drain();
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("plugin did not exit after stdin was closed");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for PluginProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// lightningd's side: its own database and its plugin.
pub struct Node {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub db: Connection,
    pub plugin: Option<PluginProc>,
    pub initialized: bool,
    /// Round trip of each db_write, as lightningd waits for it.
    pub hook_times: Vec<Duration>,
    /// The plugin's options, as lightningd passes them in init.
    pub options: Value,
    /// Extra environment for the plugin process.
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn new(bin: &Path, dir: &Path) -> Result<Node> {
        // lightningd makes its hsm_secret at its first start, before any db_write.
        let hsm = dir.join(crate::keys::HSM_SECRET);
        if !hsm.exists() {
            let mut secret = [0u8; 32];
            crate::keys::random(&mut secret)?;
            std::fs::write(&hsm, secret)?;
        }
        let db = Connection::open(dir.join("lightningd.sqlite3"))?;
        // lightningd's connection has foreign keys on from the start.
        db.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = OFF;")?;
        Ok(Node {
            dir: dir.into(),
            bin: bin.into(),
            db,
            plugin: None,
            initialized: false,
            hook_times: vec![],
            options: json!({}),
            env: vec![],
        })
    }

    pub fn plugin(&mut self) -> Result<&mut PluginProc> {
        self.plugin.as_mut().ok_or_else(|| anyhow!("plugin not running"))
    }

    /// Starts the plugin and sends getmanifest, as lightningd does at startup.
    pub fn start(&mut self) -> Result<()> {
        self.stop()?;
        let mut p = PluginProc::spawn_with_env(&self.bin, &self.dir, &["--developer"], &self.env)?;
        let m = p.getmanifest()?;
        if m["hooks"][0]["name"] != "db_write" || m["dynamic"] != false {
            bail!("unexpected manifest: {m}");
        }
        self.plugin = Some(p);
        self.initialized = false;
        Ok(())
    }

    pub fn init(&mut self) -> Result<()> {
        let (dir, options) = (self.dir.clone(), self.options.clone());
        let v = self.plugin()?.init_with(&dir, options)?;
        if v["result"] != json!({}) {
            bail!("init answered {v}");
        }
        self.initialized = true;
        Ok(())
    }

    /// Closes the plugin's stdin (lightningd's shutdown) and checks it exits cleanly.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.plugin.take() {
            let s = p.close()?;
            if !s.success() {
                bail!("plugin exited with {s}");
            }
        }
        Ok(())
    }

    /// Runs one record as lightningd would: statements, hook, then commit only on continue.
    pub fn step(&mut self, rec: &TraceRecord) -> Result<Answer> {
        if !rec.before_init && !self.initialized {
            self.init()?;
        }
        let tx = rec.kind() == Kind::Transaction;
        if tx {
            self.db.execute_batch("BEGIN")?;
        }
        for w in &rec.writes {
            self.db.execute_batch(w).with_context(|| format!("node db: {w}"))?;
        }
        let t0 = Instant::now();
        let answer = self.plugin()?.db_write(rec.data_version, &rec.writes);
        // Up to when the answer was read off the pipe, as lightningd's poll loop would see
        // it; the stand-in's own thread hand-off is not the plugin's latency.
        let answered = self.plugin()?.answered_at;
        self.hook_times.push(answered.saturating_duration_since(t0));
        if tx {
            match &answer {
                Ok(Answer::Continue) => self.db.execute_batch("COMMIT")?,
                _ => self.db.execute_batch("ROLLBACK")?,
            }
        }
        answer
    }

    /// Starts the plugin where lightningd would: at first, and at each restart in the trace.
    pub fn start_if_needed(&mut self, trace: &[TraceRecord], i: usize) -> Result<()> {
        if self.plugin.is_none() || restarts_at(trace, i) {
            self.start()?;
        }
        Ok(())
    }

    /// Replays records, restarting the plugin where the trace shows lightningd restarting.
    /// Stops at the first halt and returns its index and answer.
    pub fn replay(&mut self, trace: &[TraceRecord], range: std::ops::Range<usize>) -> Result<Option<(usize, Value)>> {
        for i in range {
            let rec = &trace[i];
            self.start_if_needed(trace, i)?;
            if let Answer::Halt(v) = self.step(rec)? {
                return Ok(Some((i, v)));
            }
        }
        Ok(None)
    }

    /// lightningd dying between the hook and its commit: statements, hook, then no COMMIT.
    pub fn step_then_die(&mut self, rec: &TraceRecord) -> Result<Answer> {
        if !rec.before_init && !self.initialized {
            self.init()?;
        }
        self.db.execute_batch("BEGIN")?;
        for w in &rec.writes {
            self.db.execute_batch(w).with_context(|| format!("node db: {w}"))?;
        }
        let answer = self.plugin()?.db_write(rec.data_version, &rec.writes);
        self.db.execute_batch("ROLLBACK")?;
        answer
    }

    /// Runs a record on the node's database with no plugin (lightningd without cln-backup).
    pub fn run_without_plugin(&self, rec: &TraceRecord) -> Result<()> {
        let tx = rec.kind() == Kind::Transaction;
        if tx {
            self.db.execute_batch("BEGIN")?;
        }
        for w in &rec.writes {
            self.db.execute_batch(w).with_context(|| format!("node db: {w}"))?;
        }
        if tx {
            self.db.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("lightningd.sqlite3")
    }

    pub fn data_version(&self) -> Result<u32> {
        Ok(self.db.query_row("SELECT intval FROM vars WHERE name = 'data_version'", [], |r| r.get::<_, i64>(0))? as u32)
    }
}

/// Compares two SQLite databases: same schema, and every table holds the same rows.
/// Returns (tables, rows) compared.
pub fn compare_databases(a: &Path, b: &Path) -> Result<(usize, usize)> {
    let ca = Connection::open_with_flags(a, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let cb = Connection::open_with_flags(b, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let schema = |c: &Connection| -> Result<Vec<(String, String, Option<String>)>> {
        let mut s = c.prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")?;
        let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    let (sa, sb) = (schema(&ca)?, schema(&cb)?);
    if sa != sb {
        let only_a: Vec<_> = sa.iter().filter(|x| !sb.contains(x)).map(|x| &x.1).collect();
        let only_b: Vec<_> = sb.iter().filter(|x| !sa.contains(x)).map(|x| &x.1).collect();
        bail!("schemas differ: only in {}: {only_a:?}; only in {}: {only_b:?}", a.display(), b.display());
    }
    let rows = |c: &Connection, t: &str| -> Result<Vec<String>> {
        let mut s = c.prepare(&format!("SELECT * FROM \"{}\"", t.replace('"', "\"\"")))?;
        let n = s.column_count();
        let mut out: Vec<String> = s
            .query_map([], |r| {
                let mut row = String::new();
                for i in 0..n {
                    row.push_str(&format!("{:?}|", r.get::<_, rusqlite::types::Value>(i)?));
                }
                Ok(row)
            })?
            .collect::<Result<_, _>>()?;
        out.sort();
        Ok(out)
    };
    let mut total = 0;
    let tables: Vec<_> = sa.iter().filter(|x| x.0 == "table").map(|x| x.1.clone()).collect();
    for t in &tables {
        let (ra, rb) = (rows(&ca, t)?, rows(&cb, t)?);
        if ra != rb {
            let diff = ra.iter().find(|r| !rb.contains(r)).or_else(|| rb.iter().find(|r| !ra.contains(r)));
            bail!("table {t} differs: {} rows vs {}; first difference: {:?}", ra.len(), rb.len(), diff);
        }
        total += ra.len();
    }
    Ok((tables.len(), total))
}
