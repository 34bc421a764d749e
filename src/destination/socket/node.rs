//! The node's side of a `socket:` destination: its key from hsm_secret, the server's key
//! pinned in backup.lock, and the plugin's writer connection.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::SocketDestination;
use crate::net::identity::SecretKey;
use crate::net::identity::{self, PublicKey};
use crate::net::url;
use crate::plugin::LOCK_NAME;

/// How long the command line waits for the server (the plugin's default bound).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// backup.lock for a socket: destination.
pub fn lock_body(url: &str, server_key: &PublicKey) -> serde_json::Value {
    serde_json::json!({ "backend_url": url, "server_key": identity::to_hex(server_key) })
}

/// The server key pinned in `ldir`'s backup.lock for `url`, if any.
pub fn pinned_server_key(ldir: &Path, url: &str) -> Result<Option<PublicKey>> {
    let p = ldir.join(LOCK_NAME);
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parse {}", p.display()))?;
    // `server_key` pins backend_url's server; `server_keys` the others' (add-destination)
    let k = if v["backend_url"].as_str() == Some(url) { &v["server_key"] } else { &v["server_keys"][url] };
    match k.as_str() {
        Some(k) => Ok(Some(identity::parse_public(k).map_err(|e| anyhow!("{}: server_key: {e}", p.display()))?)),
        None => Ok(None),
    }
}

/// The node's choice of sealing, as `init` of a socket URL records it in `ldir`'s
/// backup.lock (`"no_encryption"`): Some(true) for an encrypted backup, Some(false) for
/// `--no-encryption`, None where backup.lock does not say (written before it was recorded).
pub fn chosen_sealing(ldir: &Path) -> Option<bool> {
    std::fs::read(ldir.join(LOCK_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["no_encryption"].as_bool())
        .map(|plain| !plain)
}

/// The plugin's writer connection for `url` from `ldir`: the node's key from its
/// hsm_secret, the server's key pinned in its backup.lock (required).
pub fn connect_node(ldir: &Path, url: &str, reconnect_timeout: Duration) -> Result<SocketDestination> {
    let key = identity::node_key_from_lightning_dir(ldir).map_err(|e| anyhow!(e))?;
    let pin = pinned_server_key(ldir, url)?.ok_or_else(|| {
        anyhow!(
            "{}/{LOCK_NAME} pins no server key for {url}: run `backup-cli init --lightning-dir {} {url}` \
             (lightningd stopped) to pair with the server and pin its key",
            ldir.display(),
            ldir.display()
        )
    })?;
    Ok(SocketDestination::connect(url, key, Some(pin), reconnect_timeout, true)?)
}

/// Where init records which lightning dir uses which socket: URL, so a restore drill or a
/// verify on the same machine finds the node's key and pin with no flags:
/// `$XDG_STATE_HOME/cln-backup/socket-nodes.json` (or `~/.local/state/...`).
pub fn state_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("cln-backup/socket-nodes.json"))
}

pub fn recorded_dirs() -> serde_json::Map<String, serde_json::Value> {
    state_file()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
}

/// Where the node's key comes from for restore/verify: `CLN_BACKUP_LIGHTNING_DIR`, the
/// given directories, then the lightning dir recorded at init for `url`; the first with an
/// hsm_secret.
fn find_node_key(url: &str, candidates: &[PathBuf]) -> Result<(SecretKey, PathBuf)> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("CLN_BACKUP_LIGHTNING_DIR").map(PathBuf::from).into_iter().collect();
    dirs.extend(candidates.iter().cloned());
    if let Some(d) = recorded_dirs().get(url).and_then(|v| v.as_str()) {
        dirs.push(PathBuf::from(d));
    }
    for d in &dirs {
        if d.join("hsm_secret").is_file() {
            return Ok((identity::node_key_from_lightning_dir(d).map_err(|e| anyhow!(e))?, d.clone()));
        }
    }
    bail!(
        "no hsm_secret found in {}: a socket: backup only answers the node it is paired with, by a key derived from \
         hsm_secret. Put the node's hsm_secret in the lightning dir you restore into, or set CLN_BACKUP_LIGHTNING_DIR \
         to the directory that holds it",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// A reading connection for the command line (restore, verify, inspect): the node's key
/// as `find_node_key` finds it, the server's key pinned where that lightning dir's lock
/// (or the one recorded at init) names `url`.
pub fn connect_reader(url: &str, ldirs: &[PathBuf]) -> Result<SocketDestination> {
    url::parse(url).map_err(|e| anyhow!(e))?;
    let (key, ldir) = find_node_key(url, ldirs)?;
    let mut pinned = pinned_server_key(&ldir, url)?;
    if pinned.is_none() {
        if let Some(d) = recorded_dirs().get(url).and_then(|v| v.as_str()) {
            pinned = pinned_server_key(Path::new(d), url)?;
        }
    }
    let dest = SocketDestination::connect(url, key, pinned, CONNECT_TIMEOUT, false)?;
    if pinned.is_none() {
        if let Some(k) = dest.server_key() {
            eprintln!(
                "warning: no server key pinned for {url} in {}/{LOCK_NAME}: the server presented {}; check it \
                 against the key `backup-cli server` logs at start",
                ldir.display(),
                identity::to_hex(&k)
            );
        }
    }
    Ok(dest)
}
