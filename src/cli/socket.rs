//! `backup-cli init|restore|verify` for `socket:` URLs: the node side of a remote backup.
//! The node's key comes from its hsm_secret (`net::identity`); the server's key is learned
//! at init and pinned in backup.lock (`server_key`), as SSH's known_hosts does.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::destination::socket::node::{connect_reader, lock_body, recorded_dirs, state_file};
use crate::destination::socket::SocketDestination;
use crate::error::StoreError;
use crate::keys::KeySource;
use crate::net::identity;
use crate::restore::{self, Summary};
use crate::seal::Sealer;
use crate::{fsutil, journal, snapshot};

pub use crate::destination::socket::node::CONNECT_TIMEOUT;

/// `backup-cli init --lightning-dir DIR socket:HOST:PORT`: pairs with the server, pins its
/// key, uploads the node's database as the first generation (if it has one), writes backup.lock.
pub fn init(lightning_dir: Option<&Path>, url: &str, sealing: &super::Sealing) -> Result<()> {
    crate::net::url::parse(url).map_err(|e| anyhow!(e))?;
    let Some(ldir) = lightning_dir else {
        bail!(
            "init of a socket: backup needs --lightning-dir DIR: the node authenticates to the server with a key \
             derived from DIR/hsm_secret"
        );
    };
    let lock = super::ready_for_init(ldir)?;
    let db = ldir.join(restore::DB_NAME);
    if !ldir.join("hsm_secret").exists() && !db.exists() {
        return init_new_node(ldir, url, &lock, sealing);
    }
    // The node's backup.json goes to the server: one backup id and key for every copy.
    let (meta, seal_key) = sealing.prepare(Some(ldir), db.exists())?;
    let sealer = seal_key.map(|k| crate::seal::Sealer::new(&k, meta.id().unwrap_or_default())).transpose()?;
    let key = identity::node_key_from_lightning_dir(ldir).map_err(|e| anyhow!(e))?;
    let mut dest = SocketDestination::connect(url, key.clone(), None, CONNECT_TIMEOUT, true)?;
    let server_key = dest.server_key().ok_or_else(|| anyhow!("{url}: the server sent no key"))?;
    println!("Connected to {url}: server key {}", identity::to_hex(&server_key));
    println!(
        "This node's key: {} (pass it to `backup-cli server --client-key` to pin it there)",
        identity::to_hex(&key.public())
    );
    dest.put_meta(&meta)?;
    if db.exists() {
        let work = fsutil::tmp_path(&ldir.join("backup-init"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        let r = upload_first(&mut dest, &db, &work, sealer.as_ref());
        let _ = std::fs::remove_dir_all(&work);
        r?;
    } else {
        println!("No database in {} yet: the server's backup stays empty until lightningd writes", ldir.display());
    }
    super::print_sealing(&meta, Some(ldir));
    let mut body = lock_body(url, &server_key);
    // The node's choice, for the plugin's connections: an empty server backup takes it,
    // and an encrypted node never writes into a plaintext one.
    body["no_encryption"] = serde_json::json!(!meta.sealed);
    let body = serde_json::to_vec(&body)?;
    fsutil::write_atomic(&lock, false, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))?;
    remember_lightning_dir(url, ldir);
    println!("Wrote {}. Now add to lightningd's config: important-plugin=/path/to/cln-backup", lock.display());
    Ok(())
}

/// A node that has not started yet has no hsm_secret, so no key: pin the server's key now;
/// the plugin's first connection (with the key from the hsm_secret lightningd then makes)
/// pairs with the server's empty backup.
/// The node's choice of sealing goes into backup.lock (`no_encryption`) for that first
/// connection, which sends the backup.json.
fn init_new_node(ldir: &Path, url: &str, lock: &Path, sealing: &super::Sealing) -> Result<()> {
    if let super::Sealing::KeyFile(_) = sealing {
        bail!(
            "{} has no hsm_secret yet, so the node cannot pair with the server now; with --key-file, run init \
             after lightningd's first start (stop it first)",
            ldir.display()
        );
    }
    let server_key = crate::destination::socket::client::learn_server_key(url, CONNECT_TIMEOUT)?;
    println!("Connected to {url}: server key {}", identity::to_hex(&server_key));
    println!(
        "No hsm_secret in {} yet: the node pairs with the server when the plugin first connects, after \
         lightningd made it (the server logs the pairing)",
        ldir.display()
    );
    let mut body = lock_body(url, &server_key);
    let plain = matches!(sealing, super::Sealing::None);
    if plain {
        sealing.prepare(Some(ldir), false)?; // says what plaintext means
    }
    body["no_encryption"] = serde_json::json!(plain);
    let body = serde_json::to_vec(&body)?;
    fsutil::write_atomic(lock, false, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))?;
    remember_lightning_dir(url, ldir);
    println!("Wrote {}. Now add to lightningd's config: important-plugin=/path/to/cln-backup", lock.display());
    Ok(())
}

/// Uploads the node's database as the server's next generation, sealed by `sealer` for it.
fn upload_first(dest: &mut SocketDestination, db: &Path, work: &Path, sealer: Option<&Sealer>) -> Result<()> {
    let img = work.join("db");
    let dv = snapshot::copy_live_database(db, &img)?;
    println!("Found an existing database with data_version {dv} at {}", db.display());
    let st = dest.server_state();
    let snap = work.join("first.snapshot");
    snapshot::write(&snap, st.generation + 1, dv, &img, &mut fsutil::Throttle::unlimited(), sealer)?;
    dest.install_generation(st.generation, dv, journal::HEADER_LEN, &snap, &mut |_, _| {})?;
    println!("Successfully written initial snapshot to {}", dest.url());
    Ok(())
}

/// Best effort: a convenience for drills, never needed for a restore.
fn remember_lightning_dir(url: &str, ldir: &Path) {
    let Some(p) = state_file() else { return };
    let abs = std::path::absolute(ldir).unwrap_or_else(|_| ldir.to_path_buf());
    let mut map = recorded_dirs();
    map.insert(url.to_string(), serde_json::Value::String(abs.display().to_string()));
    let Ok(body) = serde_json::to_vec_pretty(&map) else { return };
    let _ = std::fs::create_dir_all(fsutil::parent_of(&p));
    let _ = fsutil::write_atomic(&p, true, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)));
}

/// Downloads a consistent copy next to `near` and runs `f` on it; the copy is removed after.
fn with_copy<T>(
    dest: &mut SocketDestination,
    near: &Path,
    progress: &mut dyn FnMut(u64, u64),
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let dir = fsutil::tmp_path(&near.join(format!(".socket-download-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    dest.download(&dir, 0, progress)?;
    let url = dest.url().to_string();
    // The copy's path is gone when this is read: say whose files it names.
    let r = f(&dir).map_err(|e| {
        let m = e.downcast_ref::<StoreError>().map_or_else(|| format!("{e:#}"), |se| se.explain());
        anyhow!("{m} (in the backup at {url}: those are its files as downloaded from the server)")
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// `backup-cli restore socket:... DEST`: materializes the remote backup, then restores it
/// with the local engine.
/// The key of a sealed backup is found as for a file backup (`restore::find_sealer`): the
/// one given, hsm_secret beside DEST, the lightning dir recorded at init.
/// `ldir`: the lightning dir `restore --lightning-dir` chose the copy from, whose key and
/// pin are used as when the copy was inspected.
pub fn restore(
    url: &str,
    dest: &Path,
    ldir: Option<&Path>,
    keys: &KeySource,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary)> {
    let dest_dir = if dest.is_dir() { dest.to_path_buf() } else { fsutil::parent_of(dest).to_path_buf() };
    let mut dirs = vec![dest_dir.clone()];
    dirs.extend(ldir.map(Path::to_path_buf));
    let mut d = connect_reader(url, &dirs)?;
    with_copy(&mut d, &dest_dir, progress, |copy| Ok(restore::restore_with(copy, dest, keys, &mut |_, _| {})?))
}

/// `backup-cli verify socket:...`: checks a consistent copy of the remote backup.
pub fn verify(url: &str, keys: &KeySource, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    let cwd = std::env::current_dir()?;
    let mut d = connect_reader(url, std::slice::from_ref(&cwd))?;
    let tmp = std::env::temp_dir();
    with_copy(&mut d, &tmp, progress, |copy| Ok(restore::verify_with(copy, keys, &mut |_, _| {})?))
}

/// `backup-cli add-destination --lightning-dir DIR socket:...`: pairs with the server, pins
/// its key in backup.lock (`server_keys`), and seeds its empty backup from `best` as it is
/// (same backup id and key: the seals hold), then checks the server's copy.
pub fn add_destination(
    ldir: &Path,
    url: &str,
    lf: &mut crate::destination::LockFile,
    best: &crate::destination::inspect::Copy,
) -> Result<()> {
    use crate::destination::Destination;
    let key = identity::node_key_from_lightning_dir(ldir).map_err(|e| anyhow!(e))?;
    let dest = SocketDestination::connect(url, key.clone(), None, CONNECT_TIMEOUT, true)?;
    let server_key = dest.server_key().ok_or_else(|| anyhow!("{url}: the server sent no key"))?;
    println!("Connected to {url}: server key {}", identity::to_hex(&server_key));
    let mut s = crate::destination::socket::seam::Socket::open(dest, ldir)?;
    s.install(&best.files)?;
    let tip = s.tip();
    drop(s);
    let mut d = SocketDestination::connect(url, key, Some(server_key), CONNECT_TIMEOUT, false)?;
    let keys = KeySource::lightning_dir(ldir);
    let check = with_copy(&mut d, &std::env::temp_dir(), &mut |_, _| {}, |copy| {
        Ok(restore::verify_with(copy, &keys, &mut |_, _| {})?)
    })?;
    if check.version != best.tip.position.version || tip.position.version != check.version {
        bail!(
            "the copy at {url} holds data_version {}, not {}: not added (the server's backup is left as it is)",
            check.version,
            best.tip.position.version
        );
    }
    lf.urls.push(url.to_string());
    let keys_map = lf.extra.entry("server_keys").or_insert_with(|| serde_json::json!({}));
    if let Some(m) = keys_map.as_object_mut() {
        m.insert(url.to_string(), serde_json::json!(identity::to_hex(&server_key)));
    }
    super::write_lock(ldir, lf)?;
    remember_lightning_dir(url, ldir);
    println!(
        "Added {url} at data_version {} ({} destinations), {}. Start lightningd: every write now goes to all of them.",
        check.version,
        lf.urls.len(),
        if check.sealed {
            "sealed with the backup's key (the server holds no key)"
        } else {
            "in plaintext, as the backup is"
        }
    );
    Ok(())
}
