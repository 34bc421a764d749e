use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cln_backup::sim::{self, Node, TraceRecord};

pub const BIN: &str = env!("CARGO_BIN_EXE_cln-backup");
pub const CLI: &str = env!("CARGO_BIN_EXE_backup-cli");

pub fn fixture(name: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-tests/fixtures").join(name).join(file)
}

pub fn trace(name: &str) -> &'static [TraceRecord] {
    static SMALL: OnceLock<Vec<TraceRecord>> = OnceLock::new();
    static CHANNELS: OnceLock<Vec<TraceRecord>> = OnceLock::new();
    let cell = match name {
        "small" => &SMALL,
        "channels" => &CHANNELS,
        _ => panic!("no trace {name}"),
    };
    cell.get_or_init(|| sim::read_trace(&std::fs::read(fixture(name, "trace.jsonl.gz")).unwrap()).unwrap())
}

pub fn final_db(name: &str, dir: &Path) -> PathBuf {
    let p = dir.join(format!("{name}-final.sqlite3"));
    if !p.exists() {
        sim::gunzip_to(&std::fs::read(fixture(name, "final.sqlite3.gz")).unwrap(), &p).unwrap();
    }
    p
}

pub fn cli(args: &[&str]) -> Output {
    Command::new(CLI).args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// A lightning dir with an empty backup made by the real `backup-cli init`.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub ldir: PathBuf,
    pub root: PathBuf,
}

impl Setup {
    pub fn new() -> Setup {
        Setup::at(tempfile::tempdir().unwrap(), None)
    }

    pub fn at(tmp: tempfile::TempDir, root: Option<PathBuf>) -> Setup {
        let ldir = tmp.path().join("regtest");
        std::fs::create_dir_all(&ldir).unwrap();
        let root = root.unwrap_or_else(|| tmp.path().join("node.bkp"));
        let o = cli(&["init", "--lightning-dir", ldir.to_str().unwrap(), &url(&root)]);
        assert!(o.status.success(), "init failed: {}", stderr(&o));
        Setup { tmp, ldir, root }
    }

    pub fn node(&self) -> Node {
        Node::new(Path::new(BIN), &self.ldir).unwrap()
    }

    pub fn restore(&self, name: &str) -> PathBuf {
        let dest = self.tmp.path().join(name);
        let o = cli(&["restore", &url(&self.root), dest.to_str().unwrap()]);
        assert!(o.status.success(), "restore failed: {}", stderr(&o));
        assert!(stdout(&o).contains("Restored data_version"), "{}", stdout(&o));
        dest
    }
}

/// Asserts the restored database equals the node's and returns (tables, rows).
pub fn assert_same(a: &Path, b: &Path) -> (usize, usize) {
    match sim::compare_databases(a, b) {
        Ok(x) => x,
        Err(e) => panic!("{} != {}: {e:#}", a.display(), b.display()),
    }
}

/// A small deterministic generator (xorshift), seeded per test so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub fn assert_no_tmp_left(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with(".tmp"), "temp file left behind: {n}");
    }
}

/// Logs arrive on the plugin's stdout asynchronously: wait for one (10 s at most).
pub fn wait_for_log(p: &mut cln_backup::sim::PluginProc, level: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some((_, m)) = p.logs().iter().find(|(l, m)| l == level && m.contains(needle)) {
            return m.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no {level} log with '{needle}': {:?}", p.logs());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A real small disk: a tmpfs of `size` mounted on a temp dir, unmounted on drop. None
/// (after saying so) where this machine does not allow mounting.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// A tmpfs of `size`, for a real full disk. Fails the test where it cannot be mounted
    /// (it needs root, as `.ci/run` has): a full-disk test is never skipped.
    pub fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => SmallDisk { dir },
            other => panic!(
                "cannot mount a {size} tmpfs at {} ({other:?}), so this full-disk test cannot run: run it as root \
                 (as .ci/run does)",
                dir.path().display()
            ),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The current journal of the backup at `root`, up to the end of its data (without the
/// writer's zero-filled room after it).
pub fn journal_data(root: &Path) -> Vec<u8> {
    let path = cln_backup::layout::Layout::new(root).list().unwrap().journal;
    let mut r = cln_backup::journal::JournalReader::open(&path).unwrap();
    while r.next_record().unwrap().is_some() {}
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(r.position() as usize);
    bytes
}

/// The plugin's `backup-status`.
pub fn status(node: &mut cln_backup::sim::Node) -> serde_json::Value {
    node.plugin().unwrap().cli("backup-status", serde_json::json!({})).unwrap()
}

/// Waits until destination `i` is in `state`; its status then.
pub fn wait_state(
    node: &mut cln_backup::sim::Node,
    i: usize,
    state: &str,
    within: std::time::Duration,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let st = status(node);
        if st["destinations"][i]["state"] == state {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "destination {i} never became {state}: {st:#}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The destination URLs that `backup.lock` in `ldir` lists, the first one first.
pub fn lock_urls(ldir: &Path) -> Vec<String> {
    let path = ldir.join("backup.lock");
    cln_backup::destination::LockFile::parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap().urls
}
