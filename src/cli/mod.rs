//! `backup-cli`: the operator's commands. Errors become messages with what to do.
//! `postgres` and `socket` are the edges of those destination kinds (init, restore, verify).

mod postgres;
mod socket;

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::destination::behind::{self, Behind, Listing};
use crate::destination::{self, inspect};
use crate::error::StoreError;
use crate::keys::{self, KeySource};
use crate::layout;
use crate::meta::Meta;
use crate::net::url::is_socket_url;
use crate::plugin::LOCK_NAME;
use crate::restore::{self, Summary};
use crate::{fsutil, sim, snapshot, writer};

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
        /// [LIGHTNING_DIR] URL [URL...]: the backup's places, e.g. file:///mnt/usb/node.bkp
        /// file:///mnt/nas/node.bkp. Each gets the same snapshot; every write goes to all. (The
        /// lightning dir may also come first, as the Python backup-cli accepted.)
        #[arg(num_args = 1.., required = true, value_name = "URL")]
        args: Vec<String>,
        /// How many destinations must hold every write for lightningd to go on (0 = all);
        /// recorded in backup.lock for the writes before lightningd's init. The plugin's
        /// option backup-min-destinations sets it from then on.
        #[arg(long)]
        min_destinations: Option<usize>,
        /// Store the backup in plaintext. Anyone who can read the backup's storage can then
        /// read every channel, peer and payment of the node. By default the backup is sealed
        /// with a key derived from the node's hsm_secret.
        #[arg(long, conflicts_with = "key_file")]
        no_encryption: bool,
        /// Seal with the key in this file instead of one derived from hsm_secret (needed when
        /// hsm_secret is passphrase-protected). Created (mode 0600) if it does not exist.
        /// Back it up like hsm_secret: without it the backup cannot be restored.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// Rebuild lightningd.sqlite3 from a backup: from URL, or with --lightning-dir from the
    /// most advanced of the destinations in its backup.lock. DEST is a new file, or a directory.
    Restore {
        /// Read backup.lock here and restore from the most advanced destination.
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
        /// [URL] DEST
        #[arg(num_args = 1..=2, required = true, value_name = "URL] [DEST")]
        args: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Read the whole backup and check every checksum and the version chain. Writes nothing.
    /// With --lightning-dir, every destination in its backup.lock.
    Verify {
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
        backend_url: Option<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Add a destination to a node's backup, seeded from the most advanced existing one.
    /// Run with lightningd stopped.
    AddDestination {
        #[arg(long)]
        lightning_dir: PathBuf,
        url: String,
    },
    /// Remove a destination from a node's backup.lock (its files are left as they are).
    /// Run with lightningd stopped.
    RemoveDestination {
        #[arg(long)]
        lightning_dir: PathBuf,
        url: String,
    },
    /// Convert a plaintext backup into a sealed one, offline (lightningd stopped): writes a
    /// new, sealed generation and removes the plaintext one.
    Encrypt {
        backend_url: String,
        #[command(flatten)]
        key: KeyArgs,
        /// The node's lightning dir: its hsm_secret keys the backup.
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
    },
    /// Fold the journal into a new compressed snapshot, offline (lightningd stopped; on a
    /// backup server only a --no-encryption backup: it holds no key for a sealed one). With
    /// the plugin running, use `lightning-cli backup-compact`.
    Compact { backend_url: String },
    /// Convert a backup of the Python backup plugin (a v1 file) into a cln-backup backup at
    /// the same data_version. Run with lightningd stopped.
    Migrate {
        old_url: String,
        new_url: String,
        /// Also point this lightning dir's backup.lock at the new backup; its hsm_secret
        /// keys the new (sealed) backup.
        #[arg(long)]
        lightning_dir: Option<PathBuf>,
        /// Make the new backup plaintext (see `init --no-encryption`).
        #[arg(long, conflicts_with = "key_file")]
        no_encryption: bool,
        /// Seal the new backup with the key in this file (see `init --key-file`).
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
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

/// The key of a sealed backup. Without either, restore looks for hsm_secret in the
/// destination's directory, then in the lightning dir recorded at init.
#[derive(clap::Args, Default)]
struct KeyArgs {
    /// The node's hsm_secret (32-byte or mnemonic format).
    #[arg(long, value_name = "PATH", conflicts_with = "key_file")]
    hsm_secret: Option<PathBuf>,
    /// The key file given to `backup-cli init --key-file`.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl KeyArgs {
    fn source(self) -> KeySource {
        KeySource { hsm_secret: self.hsm_secret, key_file: self.key_file, search: vec![] }
    }
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
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = match e.downcast_ref::<StoreError>() {
                Some(se) => se.explain(),
                None => format!("{e:#}"),
            };
            log::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// True when something answers on the RPC socket: lightningd is running on that dir.
fn lightningd_running(lightning_dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(lightning_dir.join("lightning-rpc")).is_ok()
}

/// backup-cli's log lines, through the same `log` macros as the plugin: to stderr.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn || (m.target().starts_with("cln_backup") && m.level() <= log::Level::Info)
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            match r.level() {
                log::Level::Error => eprintln!("error: {}", r.args()),
                log::Level::Warn => eprintln!("warning: {}", r.args()),
                _ => eprintln!("{}", r.args()),
            }
        }
    }
    fn flush(&self) {}
}

fn run(cmd: Cmd) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let url_path = |u: &str| layout::parse_url(u, &cwd).map_err(|e| anyhow!(e));
    match cmd {
        Cmd::Init { lightning_dir, mut args, min_destinations, no_encryption, key_file } => {
            // The Python backup-cli took the lightning dir first, as a plain path.
            let positional_dir = (args.len() > 1 && !is_url(&args[0])).then(|| PathBuf::from(args.remove(0)));
            let ldir = match (lightning_dir, positional_dir) {
                (Some(_), Some(_)) => {
                    bail!("give the lightning dir once: either --lightning-dir DIR or as the first argument")
                }
                (l, p) => l.or(p),
            };
            if args.len() == 1 && is_socket_url(&args[0]) {
                let sealing = if no_encryption { Sealing::None } else { Sealing::from_key_file(key_file) };
                return socket::init(ldir.as_deref(), &args[0], &sealing);
            }
            if args.iter().any(|u| is_socket_url(u)) {
                bail!("a socket: destination is created on its own: init it with the server's URL alone");
            }
            let sealing = if no_encryption { Sealing::None } else { Sealing::from_key_file(key_file) };
            init(ldir.as_deref(), &args, min_destinations, &cwd, sealing)
        }
        Cmd::Restore { lightning_dir, mut args, key } => {
            let dest = PathBuf::from(args.pop().unwrap_or_default());
            let url = match (args.pop(), &lightning_dir) {
                (Some(u), None) => u,
                (None, Some(ldir)) => pick_most_advanced(ldir)?,
                (Some(_), Some(_)) => bail!("give either a URL or --lightning-dir, not both"),
                (None, None) => bail!("say what to restore from: a URL, or --lightning-dir DIR to use its backup.lock"),
            };
            if is_socket_url(&url) {
                let (dest, s) = socket::restore(
                    &url,
                    &dest,
                    lightning_dir.as_deref(),
                    &key.source(),
                    &mut progress_bar("Restoring"),
                )?;
                finish_progress();
                print_summary("Restored", &s);
                println!("Wrote {}", dest.display());
                return Ok(());
            }
            if crate::destination::postgres::is_postgres_url(&url) {
                let (dest, s) = postgres::restore(
                    &url,
                    &dest,
                    &key.source(),
                    &mut progress_bar("Downloading"),
                    &mut progress_bar("Restoring"),
                )?;
                finish_progress();
                print_summary("Restored", &s);
                println!("Wrote {}", dest.display());
                return Ok(());
            }
            let root = url_path(&url)?;
            let (dest, s) = match destination::parse(&url, &cwd).map_err(|e| anyhow!(e))? {
                destination::Target::Legacy(p) => crate::legacy::restore(&p, &dest, &mut progress_bar("Restoring"))?,
                _ => restore::restore_with(&root, &dest, &key.source(), &mut progress_bar("Restoring"))?,
            };
            finish_progress();
            print_summary("Restored", &s);
            print_last_write(&root);
            println!("Wrote {}", dest.display());
            Ok(())
        }
        Cmd::Verify { lightning_dir, backend_url, key } => {
            let keys = key.source();
            let urls = match (backend_url, &lightning_dir) {
                (Some(u), None) => vec![u],
                (None, Some(ldir)) => read_lock(ldir)?.urls,
                _ => bail!("give either a URL or --lightning-dir DIR"),
            };
            let mut failed = 0;
            for u in &urls {
                if urls.len() > 1 {
                    println!("== {u}");
                }
                if is_socket_url(u) {
                    let s = socket::verify(u, &keys, &mut progress_bar("Verifying"))?;
                    finish_progress();
                    print_summary("Verified", &s);
                    continue;
                }
                if crate::destination::postgres::is_postgres_url(u) {
                    let s =
                        postgres::verify(u, &keys, &mut progress_bar("Downloading"), &mut progress_bar("Verifying"))?;
                    finish_progress();
                    print_summary("Verified", &s);
                    continue;
                }
                let root = url_path(u)?;
                let checked = match destination::parse(u, &cwd).map_err(|e| anyhow!(e))? {
                    destination::Target::Legacy(p) => crate::legacy::verify(&p, &mut progress_bar("Verifying")),
                    _ => restore::verify_with(&root, &keys, &mut progress_bar("Verifying")),
                };
                match checked {
                    Ok(s) => {
                        finish_progress();
                        print_summary("Verified", &s);
                        print_last_write(&root);
                    }
                    Err(e) if urls.len() > 1 => {
                        finish_progress();
                        failed += 1;
                        println!("FAILED: {}", e.explain());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if failed > 0 {
                bail!("{failed} of {} destinations failed to verify", urls.len());
            }
            Ok(())
        }
        Cmd::AddDestination { lightning_dir, url } => add_destination(&lightning_dir, &url),
        Cmd::RemoveDestination { lightning_dir, url } => remove_destination(&lightning_dir, &url),
        Cmd::Encrypt { backend_url, key, lightning_dir } => {
            let mut src = key.source();
            src.search.extend(lightning_dir);
            encrypt(&url_path(&backend_url)?, src)
        }
        Cmd::Migrate { old_url, new_url, lightning_dir, no_encryption, key_file } => {
            let sealing = if no_encryption { Sealing::None } else { Sealing::from_key_file(key_file) };
            migrate(&url_path(&old_url)?, &url_path(&new_url)?, lightning_dir.as_deref(), sealing)
        }
        Cmd::Compact { backend_url } => compact_offline(&url_path(&backend_url)?),
        Cmd::Server { args, client_key } => crate::server::cli(&args, &client_key, &cwd),
        Cmd::Demo { trace } => demo(&trace),
    }
}

/// A destination URL rather than a path: it has a scheme.
fn is_url(arg: &str) -> bool {
    arg.split_once(':')
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// How a new backup is sealed.
enum Sealing {
    /// Plaintext (`--no-encryption`).
    None,
    /// With the node's hsm_secret (now, or at lightningd's first start).
    HsmSecret,
    /// With a key file.
    KeyFile(PathBuf),
}

impl Sealing {
    fn from_key_file(key_file: Option<PathBuf>) -> Sealing {
        key_file.map_or(Sealing::HsmSecret, Sealing::KeyFile)
    }

    /// The new backup's metadata and, when the key is at hand, its key. `has_data`: there is
    /// a database to seal now, so the key must be at hand.
    fn prepare(&self, ldir: Option<&Path>, has_data: bool) -> Result<(Meta, Option<keys::Key>)> {
        let abs_ldir = ldir.map(|d| std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()));
        match self {
            Sealing::None => {
                println!(
                    "Encryption is OFF (--no-encryption): the backup holds every channel, peer and payment of this \
                     node in plaintext. Anyone who can read its storage can read them. Keep it on storage only you \
                     control; `backup-cli encrypt` converts it later."
                );
                Ok((Meta::new_plain(abs_ldir), None))
            }
            Sealing::KeyFile(p) => {
                let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
                let (key, created) = keys::read_or_create_key_file(&p)?;
                if created {
                    println!(
                        "Created key file {} (mode 0600). Back it up like hsm_secret: without it this backup \
                         cannot be restored.",
                        p.display()
                    );
                }
                if let Some(w) = keys::key_file_mode_warning(&p) {
                    println!("Warning: {w}");
                }
                let fp = key.fingerprint();
                Ok((Meta::new_sealed(Some(fp), Some(p), abs_ldir)?, Some(key)))
            }
            Sealing::HsmSecret => {
                let hsm = ldir.map(|d| d.join(keys::HSM_SECRET));
                let key = match &hsm {
                    Some(h) if h.exists() => Some(keys::key_from_hsm_secret(h)?),
                    _ => None,
                };
                if key.is_none() && has_data {
                    bail!(
                        "{} has a database but no hsm_secret, so the backup cannot be sealed: put the node's \
                         hsm_secret back first, or give --key-file PATH (or --no-encryption)",
                        ldir.map_or("the lightning dir".into(), |d| d.display().to_string())
                    );
                }
                let fp = key.as_ref().map(|k| k.fingerprint());
                Ok((Meta::new_sealed(fp, None, abs_ldir)?, key))
            }
        }
    }
}

/// Says how the new backup is sealed.
fn print_sealing(meta: &Meta, ldir: Option<&Path>) {
    if !meta.sealed {
        return;
    }
    match (&meta.key_fingerprint, &meta.key_file) {
        (Some(fp), Some(kf)) => {
            println!("The backup is encrypted with the key in {} (fingerprint {fp}).", kf.display())
        }
        (Some(fp), None) => println!(
            "The backup is encrypted with a key derived from the node's hsm_secret (fingerprint {fp}). To restore, \
             you need hsm_secret (which you keep anyway) and the backup."
        ),
        (None, _) => println!(
            "The backup is encrypted; the node has no hsm_secret yet, so its key is read from {} at lightningd's \
             first start, before the first write.",
            ldir.map_or("hsm_secret in the node's lightning dir".into(), |d| d
                .join(keys::HSM_SECRET)
                .display()
                .to_string())
        ),
    }
}

fn init(lightning_dir: Option<&Path>, urls: &[String], min: Option<usize>, cwd: &Path, sealing: Sealing) -> Result<()> {
    let targets = destination::check_distinct(urls, cwd).map_err(|e| anyhow!(e))?;
    let mut roots: Vec<PathBuf> = Vec::new();
    // PostgreSQL copies are uploaded from the first file copy (or a scratch one), with the
    // same backup.json: one backup id and key for all
    let mut pgs: Vec<postgres::NewPg> = Vec::new();
    // backup.lock's URLs, in the order given
    let mut abs: Vec<String> = Vec::new();
    for t in targets {
        match t {
            destination::Target::File(p) => {
                abs.push(layout::url_for(&p));
                roots.push(p);
            }
            destination::Target::Legacy(p) => {
                bail!("{} is a backup of the Python plugin (v1): convert it with `backup-cli migrate`", p.display())
            }
            destination::Target::Postgres(u) => {
                let p = postgres::NewPg::plan(lightning_dir, &u)?;
                abs.push(p.backend_url.clone());
                pgs.push(p);
            }
            destination::Target::Socket(u) => bail!("{u}: a socket: destination is initialized on its own"),
        }
    }
    let shown: Vec<String> = abs.iter().map(|u| destination::shown(u)).collect();
    if let Some(m) = min.filter(|m| *m > urls.len()) {
        bail!("--min-destinations {m} is more than the {} destination(s) given", urls.len());
    }
    // Check every place before creating any, so a refusal leaves nothing behind.
    for r in &roots {
        if !fsutil::parent_of(r).is_dir() {
            return Err(StoreError::Invalid {
                path: fsutil::parent_of(r).into(),
                what: "the backup's parent directory does not exist (is the backup disk mounted?)".into(),
            }
            .into());
        }
        if fs::symlink_metadata(r).is_ok() {
            return Err(StoreError::Exists { path: r.clone() }.into());
        }
    }
    let Some(ldir) = lightning_dir else {
        let (meta, key) = sealing.prepare(None, false)?;
        let sealer = key.map(|k| crate::seal::Sealer::new(&k, meta.id().unwrap_or_default())).transpose()?;
        create_all(&roots, &pgs, None, &meta, sealer.as_ref())?;
        for url in &shown {
            println!("Created an empty backup at {url} for a new node.");
        }
        print_sealing(&meta, None);
        let lf = destination::LockFile {
            urls: abs.clone(),
            min_destinations: min,
            reconnect_timeout_s: None,
            sealed_backup_id: meta.sealed.then(|| meta.backup_id.clone()),
            extra: Default::default(),
        };
        println!(
            "Put {} into {LOCK_NAME} in the node's lightning dir, or run init with --lightning-dir.",
            lf.to_json()
        );
        return Ok(());
    };
    let lock = ready_for_init(ldir)?;
    // what an earlier backup's copies missed says nothing about this one's
    if let Err(e) = fs::remove_file(behind::path(ldir)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            bail!("cannot remove the earlier backup's {}: {e}", behind::path(ldir).display());
        }
    }
    let db = ldir.join(restore::DB_NAME);
    let (meta, key) = sealing.prepare(Some(ldir), db.exists())?;
    let sealer = key.map(|k| crate::seal::Sealer::new(&k, meta.id().unwrap_or_default())).transpose()?;
    if db.exists() {
        let tmp = match roots.first() {
            Some(r) => fsutil::tmp_path(&r.with_extension("snapshot-source")),
            None => std::env::temp_dir().join(format!("cln-backup-init-{}.sqlite3", std::process::id())),
        };
        let _ = fs::remove_file(&tmp);
        let result = (|| -> Result<()> {
            let dv = snapshot::copy_live_database(&db, &tmp)?;
            println!("Found an existing database with data_version {dv} at {}", db.display());
            create_all(&roots, &pgs, Some((&tmp, dv)), &meta, sealer.as_ref())?;
            for url in &shown {
                println!("Successfully written initial snapshot to {url}");
            }
            Ok(())
        })();
        let _ = fs::remove_file(&tmp);
        result?;
    } else {
        create_all(&roots, &pgs, None, &meta, sealer.as_ref())?;
        for url in &shown {
            println!("No database in {} yet: created an empty backup at {url}", ldir.display());
        }
    }
    print_sealing(&meta, Some(ldir));
    let body = destination::LockFile {
        urls: abs,
        min_destinations: min,
        reconnect_timeout_s: None,
        sealed_backup_id: meta.sealed.then(|| meta.backup_id.clone()),
        extra: Default::default(),
    }
    .to_json();
    fsutil::write_atomic(&lock, false, |f, tmp| f.write_all(body.as_bytes()).map_err(StoreError::io("write", tmp)))?;
    // every copy holds every write: the list starts empty (else the plugin starts it)
    if let Err(e) = Behind::default().save(ldir) {
        eprintln!("warning: {}; the plugin makes it at its first start", e.explain());
    }
    println!("Wrote {}. Now add to lightningd's config: important-plugin=/path/to/cln-backup", lock.display());
    Ok(())
}

/// Checks that `ldir` can get a new backup (it exists, lightningd is stopped, it has no
/// backup.lock yet) and gives the path its backup.lock will have.
fn ready_for_init(ldir: &Path) -> Result<PathBuf> {
    if !ldir.is_dir() {
        bail!(
            "lightning dir {} does not exist: give the network's directory, e.g. ~/.lightning/bitcoin",
            ldir.display()
        );
    }
    if lightningd_running(ldir) {
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
    Ok(lock)
}

/// Creates every destination from the same database image, with the same metadata (one
/// backup id, which sealed records are bound to), or none of them: the file copies first,
/// then the PostgreSQL ones uploaded from the first (or a scratch copy), each in one
/// transaction.
fn create_all(
    roots: &[PathBuf],
    pgs: &[postgres::NewPg],
    base: Option<(&Path, u32)>,
    meta: &Meta,
    sealer: Option<&crate::seal::Sealer>,
) -> Result<()> {
    let undo = |done: &[PathBuf]| {
        for d in done {
            let _ = fs::remove_dir_all(d);
        }
    };
    for (i, r) in roots.iter().enumerate() {
        if let Err(e) = writer::create(r, base, Some(meta), sealer) {
            undo(&roots[..i]);
            return Err(e.into());
        }
    }
    if pgs.is_empty() {
        return Ok(());
    }
    let scratch = inspect::Scratch(std::env::temp_dir().join(format!("cln-backup-init-{}", std::process::id())));
    let local = match roots.first() {
        Some(r) => r.clone(),
        None => {
            let _ = fs::remove_dir_all(&scratch.0);
            fs::create_dir_all(&scratch.0).map_err(StoreError::io("create directory", &scratch.0))?;
            let local = scratch.0.join("backup");
            writer::create(&local, base, Some(meta), sealer)?;
            local
        }
    };
    for (i, p) in pgs.iter().enumerate() {
        if let Err(e) = p.upload(&local) {
            undo(roots);
            // the databases uploaded before this one: their rows go too
            return Err(pgs[..i].iter().fold(e, |e, done| done.undo(e)));
        }
    }
    Ok(())
}

fn read_lock(ldir: &Path) -> Result<destination::LockFile> {
    let path = ldir.join(LOCK_NAME);
    let text = fs::read_to_string(&path).with_context(|| {
        format!("read {} (is this the node's lightning dir, with a backup made by init?)", path.display())
    })?;
    destination::LockFile::parse(&text, &path).map_err(|e| anyhow!(e))
}

fn write_lock(ldir: &Path, lf: &destination::LockFile) -> Result<()> {
    let body = lf.to_json();
    let lock = ldir.join(LOCK_NAME);
    fsutil::write_atomic(&lock, true, |f, tmp| f.write_all(body.as_bytes()).map_err(StoreError::io("write", tmp)))?;
    Ok(())
}

/// Reads every destination of a node's backup.lock; says which is the most advanced and why.
fn pick_most_advanced(ldir: &Path) -> Result<String> {
    let lf = read_lock(ldir)?;
    let copies: Vec<_> = lf.urls.iter().map(|u| inspect::inspect(u, ldir)).collect();
    for c in &copies {
        match c {
            Ok(c) => println!(
                "  {}: data_version {}, generation {}, last write {}",
                destination::shown(&c.url),
                c.tip.position.version,
                c.tip.generation,
                c.last_write.map_or("unknown".into(), crate::clock::fmt_time)
            ),
            Err(e) => println!("  unreadable: {e}"),
        }
    }
    let (best, why) = inspect::most_advanced(&copies, &Behind::load(ldir), ldir)
        .map_err(|e| anyhow!("cannot restore from the {} destinations in {LOCK_NAME}: {e}", lf.urls.len()))?;
    println!("Restoring from {}: {why}", destination::shown(&best.url));
    Ok(best.url.clone())
}

/// data_version and the time of the last write: a stale copy is toxic on Lightning.
fn print_last_write(root: &Path) {
    if let Ok(c) = inspect::inspect(&layout::url_for(root), root) {
        println!(
            "The backup holds data_version {}, last written {}. Check it is the node's latest before starting lightningd on it.",
            c.tip.position.version,
            c.last_write.map_or("at an unknown time".into(), crate::clock::fmt_time)
        );
    }
}

fn add_destination(ldir: &Path, url: &str) -> Result<()> {
    if lightningd_running(ldir) {
        bail!(
            "lightningd is running on {}: stop it first (lightning-cli stop), then add the destination",
            ldir.display()
        );
    }
    let mut lf = read_lock(ldir)?;
    let mut all = lf.urls.clone();
    all.push(url.to_string());
    let targets = destination::check_distinct(&all, ldir).map_err(|e| anyhow!(e))?;
    let target = targets.last().cloned();
    let copies: Vec<_> = lf.urls.iter().map(|u| inspect::inspect(u, ldir)).collect();
    let listing = Behind::load(ldir);
    let (best, why) = inspect::most_advanced(&copies, &listing, ldir).map_err(|e| {
        anyhow!(
            "no destination in {LOCK_NAME} can seed the new one ({e}); run backup-cli verify --lightning-dir {}",
            ldir.display()
        )
    })?;
    if let Ok(destination::Target::Legacy(_)) = destination::parse(&best.url, ldir) {
        bail!(
            "{} is a backup of the Python plugin (v1), which cannot seed a new copy: convert it first with \
             `backup-cli migrate` (see README, 'Coming from the Python backup plugin')",
            best.url
        );
    }
    // an entry for a URL backup.lock does not have is a leftover: the new copy holds every write
    if let Listing::Kept(mut behind) = listing.clone() {
        if behind.remove(url, ldir) {
            behind.save(ldir)?;
        }
    }
    println!("Seeding {} from {}: {why}", destination::shown(url), destination::shown(&best.url));
    let root = match target {
        Some(destination::Target::File(root)) => root,
        Some(destination::Target::Socket(u)) => return socket::add_destination(ldir, &u, &mut lf, best),
        Some(destination::Target::Postgres(u)) => {
            // its generation as it is (same backup id, same seals), with its backup.json
            let p = postgres::NewPg::plan(Some(ldir), &u)?;
            p.upload(fsutil::parent_of(&best.files.journal))?;
            // a copy that does not check out is not kept: its rows go again
            let checked = (|| -> Result<restore::Summary> {
                let keys = KeySource::lightning_dir(ldir);
                let (check, _) = crate::destination::postgres::transfer::verify_from(
                    &p.backend_url,
                    None,
                    &std::env::temp_dir(),
                    &keys,
                    &mut |_, _| {},
                    &mut |_, _| {},
                )
                .map_err(|e| anyhow!("the copy at {} does not verify: {}", p.shown(), e.explain()))?;
                if check.version != best.tip.position.version {
                    bail!(
                        "the copy at {} holds data_version {}, not {}: not added",
                        p.shown(),
                        check.version,
                        best.tip.position.version
                    );
                }
                lf.urls.push(p.backend_url.clone());
                write_lock(ldir, &lf)?;
                Ok(check)
            })();
            let check = checked.map_err(|e| p.undo(e))?;
            println!(
                "Added {} at data_version {} ({} destinations{}). Start lightningd: every write now goes to all of them.",
                p.shown(),
                check.version,
                lf.urls.len(),
                if check.sealed { ", sealed with the backup's key" } else { "" }
            );
            return Ok(());
        }
        _ => bail!("{url}: add-destination takes a file://, postgres:// or socket: URL"),
    };
    writer::create(&root, None, None, None)?;
    if let Err(e) = writer::install_generation(&root, &best.files) {
        let _ = fs::remove_dir_all(&root);
        return Err(e.into());
    }
    let check = restore::verify_with(&root, &KeySource::lightning_dir(ldir), &mut |_, _| {})?;
    if check.version != best.tip.position.version {
        let _ = fs::remove_dir_all(&root);
        bail!("the copy at {url} holds data_version {}, not {}: not added", check.version, best.tip.position.version);
    }
    lf.urls.push(layout::url_for(&root));
    write_lock(ldir, &lf)?;
    println!(
        "Added {url} at data_version {} ({} destinations). Start lightningd: every write now goes to all of them.",
        check.version,
        lf.urls.len()
    );
    Ok(())
}

fn remove_destination(ldir: &Path, url: &str) -> Result<()> {
    if lightningd_running(ldir) {
        bail!(
            "lightningd is running on {}: stop it first (lightning-cli stop), then remove the destination",
            ldir.display()
        );
    }
    let mut lf = read_lock(ldir)?;
    let target = destination::parse(url, ldir).map_err(|e| anyhow!(e))?;
    let Some(i) = lf.urls.iter().position(|u| destination::parse(u, ldir).ok().as_ref() == Some(&target)) else {
        bail!("{url} is not one of this node's destinations: {}", lf.urls.join(", "));
    };
    if lf.urls.len() == 1 {
        bail!(
            "{url} is the node's only destination: add another first (a node without a backup is not allowed to run)"
        );
    }
    let mut behind = Behind::load_or_empty(ldir).map_err(|e| anyhow!(e))?;
    let complete = |u: &String| behind.find(u, ldir).is_none();
    if complete(&lf.urls[i]) && lf.urls.iter().filter(|u| complete(u)).count() == 1 {
        bail!(
            "{url} is the only destination that holds every write: the others are listed in {} as lacking \
             writes lightningd committed. Let lightningd bring them up to date first (backup-status shows them \
             in-sync), or add another destination, then remove this one",
            behind::FILE_NAME
        );
    }
    let removed = lf.urls.remove(i);
    if let Some(m) = lf.min_destinations.filter(|m| *m > lf.urls.len()) {
        println!("backup-min-destinations was {m}: lowered to {}", lf.urls.len());
        lf.min_destinations = Some(lf.urls.len());
    }
    write_lock(ldir, &lf)?;
    if behind.remove(&removed, ldir) {
        behind.save(ldir)?;
    }
    println!(
        "Removed {removed} from {LOCK_NAME} ({} destination(s) left; backend_url is {}). Its files are untouched: delete them when you no longer want that copy.",
        lf.urls.len(),
        lf.urls[0]
    );
    Ok(())
}

fn compact_offline(root: &Path) -> Result<()> {
    let (w, report) = match writer::Writer::open(root, &KeySource::default()) {
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

fn migrate(old: &Path, new: &Path, lightning_dir: Option<&Path>, sealing: Sealing) -> Result<()> {
    if !crate::legacy::is_v1_file(old) {
        if old.is_dir() {
            bail!("{} is already a cln-backup backup: nothing to migrate", old.display());
        }
        bail!("{} is not a backup file of the Python backup plugin (v1)", old.display());
    }
    let lock = lightning_dir.map(|d| d.join(LOCK_NAME));
    if let (Some(ldir), Some(lock)) = (lightning_dir, &lock) {
        if lightningd_running(ldir) {
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
    if matches!(sealing, Sealing::HsmSecret) && lightning_dir.is_none() {
        bail!(
            "the new backup is sealed with the node's key: give --lightning-dir DIR (its hsm_secret), or \
             --key-file PATH, or --no-encryption"
        );
    }
    let (meta, key) = sealing.prepare(lightning_dir, true)?;
    let sealer = key.map(|k| crate::seal::Sealer::new(&k, meta.id().unwrap_or_default())).transpose()?;
    let s = crate::migrate::migrate_to(old, new, Some(&meta), sealer.as_ref(), &mut progress_bar("Migrating"))?;
    print_sealing(&meta, lightning_dir);
    finish_progress();
    let check = restore::verify_with(
        new,
        &KeySource { search: lightning_dir.into_iter().map(Into::into).collect(), ..Default::default() },
        &mut |_, _| {},
    )?;
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

/// Converts a plaintext backup into a sealed one (offline).
fn encrypt(root: &Path, src: KeySource) -> Result<()> {
    if crate::legacy::is_v1_file(root) {
        bail!(
            "{} is a backup of the Python plugin (v1): convert it with `backup-cli migrate`, which seals it",
            root.display()
        );
    }
    let old = Meta::load(root)?;
    let listing = layout::Layout::new(root).list()?;
    let journal = crate::journal::JournalReader::open(&listing.journal)?;
    if journal.header.sealed {
        println!(
            "{} is sealed already (key fingerprint {})",
            root.display(),
            old.and_then(|m| m.key_fingerprint).unwrap_or_else(|| "not read yet".into())
        );
        return Ok(());
    }
    drop(journal);
    let src = match &old {
        Some(m) => m.source_with_recorded(src),
        None => src,
    };
    let Some(key) = src.find(None)? else {
        bail!(
            "no key to seal with: looked for {}. Give --lightning-dir DIR (the node's hsm_secret), --hsm-secret PATH or --key-file PATH",
            if src.places(None).is_empty() { "nothing (no lightning dir recorded in the backup)".into() } else { src.places(None).join(", ") }
        );
    };
    // An interrupted conversion left its metadata: keep its id, and its key.
    let meta = match old {
        Some(m) if m.sealed => {
            m.check(&key)?;
            m
        }
        old => {
            let key_file = src.key_file.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
            let ldir = old.and_then(|m| m.lightning_dir).or_else(|| src.search.first().cloned());
            Meta::new_sealed(Some(key.fingerprint()), key_file, ldir)?
        }
    };
    let (w, _) = match writer::Writer::open_with(root, &KeySource::default(), true) {
        Err(StoreError::Locked { path }) => {
            bail!("{} is in use by a running cln-backup plugin: stop lightningd first", path.display())
        }
        r => r?,
    };
    meta.store(root)?;
    let sealer = crate::seal::Sealer::new(&key, meta.id().unwrap_or_default())?;
    let s = crate::compact::seal_offline(w, &sealer, &mut |_| {})?;
    let check = restore::verify_with(
        root,
        &KeySource { key_file: src.key_file.clone(), hsm_secret: src.hsm_secret.clone(), search: src.search.clone() },
        &mut |_, _| {},
    )?;
    println!(
        "Sealed {}: generation {} at data_version {} ({} records folded into a sealed snapshot), key fingerprint {}; \
         verified {} record(s) after it. The plaintext generation is removed; copies of it elsewhere are still plaintext.",
        root.display(),
        s.generation,
        check.version,
        s.records_folded,
        key.fingerprint(),
        check.records
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
    if s.sealed {
        let fp =
            s.key_fingerprint.as_deref().unwrap_or("not recorded yet (the plugin reads the key at its first write)");
        match &s.key_origin {
            Some(o) => println!("Sealed backup, key fingerprint {fp}; opened with the key from {o}"),
            None => println!("Sealed backup, key fingerprint {fp}; not opened (no key)"),
        }
    } else {
        println!("Plaintext backup (not encrypted): `backup-cli encrypt` seals it (`migrate` for a v1 file)");
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
        include_bytes!("../../plugin-tests/fixtures/small/trace.jsonl.gz"),
        include_bytes!("../../plugin-tests/fixtures/small/final.sqlite3.gz"),
    ),
    (
        "channels",
        include_bytes!("../../plugin-tests/fixtures/channels/trace.jsonl.gz"),
        include_bytes!("../../plugin-tests/fixtures/channels/final.sqlite3.gz"),
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
    // lightningd makes hsm_secret at its first start; the demo's node has one from the outset.
    let mut secret = [0u8; 32];
    keys::random(&mut secret)?;
    fs::write(ldir.join(keys::HSM_SECRET), secret)?;
    init(Some(&ldir), &[layout::url_for(&root)], None, tmp, Sealing::HsmSecret)?;
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
