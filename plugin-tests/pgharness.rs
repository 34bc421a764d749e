//! A real PostgreSQL for the tests, started by the tests themselves: `initdb` + `pg_ctl` in a
//! temp dir, on a free loopback port, with its Unix socket in that dir, run as an
//! unprivileged user (PostgreSQL refuses root: as root we run it as `postgres` through
//! `runuser`). One shared cluster per test process (stopped at exit); private clusters for
//! tests that stop or restart the server. If PostgreSQL cannot start, the test FAILS with
//! the reason: `.ci/run` installs it (apt-get install postgresql) where it is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "cln-test-pw";

/// Data dirs to stop when the test process exits (the shared cluster lives that long).
static RUNNING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_all_at_exit() {
    let list = RUNNING.lock().map(|l| l.clone()).unwrap_or_default();
    for (data, root) in list {
        if let Ok(b) = bindir() {
            let _ = as_pg(&b.join("pg_ctl")).args(["stop", "-m", "immediate", "-w", "-D"]).arg(&data).output();
        }
        let _ = std::fs::remove_dir_all(root);
    }
}

/// The directory of initdb/pg_ctl: Debian keeps them in /usr/lib/postgresql/<ver>/bin.
pub fn bindir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let b = e.path().join("bin");
                b.join("initdb").exists().then_some((v, b))
            })
            .collect();
        found.sort();
        if let Some((_, b)) = found.pop() {
            return Ok(b);
        }
        if let Ok(o) = Command::new("pg_config").arg("--bindir").output() {
            let b = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if b.join("initdb").exists() {
                return Ok(b);
            }
        }
        let on_path = std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("initdb")).find(|p| p.exists()));
        if let Some(initdb) = on_path.and_then(|p| std::fs::canonicalize(p).ok()) {
            if let Some(dir) = initdb.parent() {
                return Ok(dir.to_path_buf());
            }
        }
        Err("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin, from pg_config or on PATH): \
             install it with `apt-get install -y postgresql` (.ci/run does)"
            .into())
    })
    .clone()
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the unprivileged user PostgreSQL needs.
fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) -> Result<Output, String> {
    let o = c.output().map_err(|e| format!("{what}: cannot run: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(o)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(54329)
}

fn chown_to_postgres(p: &Path) -> Result<(), String> {
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(p);
                c
            },
            "chown to postgres",
        )?;
    }
    Ok(())
}

/// initdb once per process; clusters start from copies of it (initdb takes seconds).
fn template() -> Result<PathBuf, String> {
    static T: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    T.get_or_init(|| {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| unsafe {
            libc::atexit(stop_all_at_exit);
        });
        let b = bindir()?;
        let root = tempfile::Builder::new().prefix("clnpg-tpl").tempdir().map_err(|e| e.to_string())?.keep();
        RUNNING.lock().map_err(|e| e.to_string())?.push((root.join("none"), root.clone()));
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, PASSWORD).map_err(|e| e.to_string())?;
        chown_to_postgres(&root)?;
        let data = root.join("data");
        let mut c = as_pg(&b.join("initdb"));
        c.args(["-N", "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data);
        run(c, "initdb")?;
        Ok(data)
    })
    .clone()
}

pub struct Cluster {
    pub root: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    shared: bool,
}

impl Cluster {
    /// A new private cluster (stopped and removed on drop).
    pub fn start_new() -> Result<Cluster, String> {
        let root = tempfile::Builder::new().prefix("clnpg").tempdir().map_err(|e| e.to_string())?.keep();
        let data = root.join("data");
        let tpl = template()?;
        run(
            {
                let mut c = Command::new("cp");
                c.arg("-a").arg(&tpl).arg(&data);
                c
            },
            "copy the template cluster",
        )?;
        let c = Cluster { root, data, port: free_port(), shared: false };
        c.configure(&[])?;
        chown_to_postgres(&c.root)?;
        c.start()?;
        Ok(c)
    }

    fn configure(&self, extra: &[&str]) -> Result<(), String> {
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nmax_connections = 40\n\
             shared_buffers = 16MB\nwal_level = replica\nmax_wal_senders = 4\nlog_min_messages = warning\n",
            self.port,
            self.root.display()
        );
        for e in extra {
            conf.push_str(e);
            conf.push('\n');
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.auto.conf"))
            .map_err(|e| e.to_string())?;
        f.write_all(conf.as_bytes()).map_err(|e| e.to_string())
    }

    pub fn start(&self) -> Result<(), String> {
        let b = bindir()?;
        let mut c = as_pg(&b.join("pg_ctl"));
        c.args(["start", "-w", "-t", "30", "-D"]).arg(&self.data).arg("-l").arg(self.root.join("log"));
        run(c, "pg_ctl start").map_err(|e| format!("{e}; log: {}", self.log()))?;
        if let Ok(mut l) = RUNNING.lock() {
            if !l.iter().any(|(d, _)| *d == self.data) {
                l.push((self.data.clone(), self.root.clone()));
            }
        }
        Ok(())
    }

    /// Stops the server: "immediate" is a crash (no checkpoint), "fast" a clean stop.
    pub fn stop(&self, mode: &str) {
        let b = bindir().unwrap();
        let mut c = as_pg(&b.join("pg_ctl"));
        c.args(["stop", "-w", "-m", mode, "-D"]).arg(&self.data);
        run(c, "pg_ctl stop").unwrap();
    }

    /// Makes a standby the primary (failover).
    pub fn promote(&self) {
        let b = bindir().unwrap();
        let mut c = as_pg(&b.join("pg_ctl"));
        c.args(["promote", "-w", "-D"]).arg(&self.data);
        run(c, "pg_ctl promote").unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// Runs SQL as the superuser over the Unix socket; panics with psql's message on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let b = bindir().unwrap();
        let mut c = Command::new(b.join("psql"));
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&self.root).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ]);
        let o = run(c, &format!("psql {sql}")).unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// A new empty database; returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// A streaming standby made with pg_basebackup -R, and this server made to wait for it
    /// (synchronous_standby_names = '*').
    pub fn add_sync_standby(&self) -> Result<Cluster, String> {
        let b = bindir()?;
        let root = tempfile::Builder::new().prefix("clnpg-sb").tempdir().map_err(|e| e.to_string())?.keep();
        chown_to_postgres(&root)?;
        let data = root.join("data");
        let mut c = as_pg(&b.join("pg_basebackup"));
        c.arg("-h")
            .arg(&self.root)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "-D"])
            .arg(&data);
        run(c, "pg_basebackup")?;
        let sb = Cluster { root, data, port: free_port(), shared: false };
        sb.configure(&["cluster_name = 'standby1'"])?;
        chown_to_postgres(&sb.root)?;
        sb.start()?;
        self.psql("postgres", "ALTER SYSTEM SET synchronous_standby_names = '*'");
        self.psql("postgres", "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.psql("postgres", "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1" {
            if Instant::now() > deadline {
                return Err(format!("the standby never became synchronous; its log: {}", sb.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sb)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.shared {
            return;
        }
        if let Ok(b) = bindir() {
            let _ = as_pg(&b.join("pg_ctl")).args(["stop", "-m", "immediate", "-w", "-D"]).arg(&self.data).output();
        }
        if let Ok(mut l) = RUNNING.lock() {
            l.retain(|(d, _)| *d != self.data);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The process's shared cluster. Panics (fails the test) with the reason if it cannot start.
pub fn shared() -> &'static Cluster {
    static C: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let r = C.get_or_init(|| {
        let mut c = Cluster::start_new()?;
        c.shared = true;
        Ok(c)
    });
    match r {
        Ok(c) => c,
        Err(e) => panic!("cannot start the tests' PostgreSQL: {e}"),
    }
}

/// A private cluster, or a failing test with the reason.
pub fn private() -> Cluster {
    Cluster::start_new().unwrap_or_else(|e| panic!("cannot start a private PostgreSQL: {e}"))
}

/// A fresh database in the shared cluster, named for the test.
pub fn fresh_db(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    shared().create_db(&format!("t_{tag}_{n}"))
}
