//! The node's side of a `socket:` destination: its key from hsm_secret, the server's key
//! pinned in backup.lock, and the plugin's writer connection.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::SocketDestination;
use crate::net::identity::{self, PublicKey};
use crate::plugin::LOCK_NAME;

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

/// Whether `ldir`'s backup.lock says the node chose a plaintext backup (`init
/// --no-encryption` before its first start).
pub fn plaintext_chosen(ldir: &Path) -> bool {
    std::fs::read(ldir.join(LOCK_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["no_encryption"] == serde_json::json!(true))
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
