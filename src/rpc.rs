//! A minimal client for lightningd's JSON-RPC socket. Used only off the hook path: while a
//! db_write waits for its answer, lightningd serves nobody, so a call from there deadlocks.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = json!({"jsonrpc": "2.0", "id": format!("cln-backup:{method}#1"), "method": method, "params": params});
    s.write_all(serde_json::to_string(&req)?.as_bytes())?;
    let mut input = crate::protocol::Framer::new(&s);
    let bytes = input.next_value().ok_or_else(|| anyhow!("lightningd closed the RPC socket"))??;
    let resp: Value = serde_json::from_slice(bytes)?;
    if let Some(e) = resp.get("error") {
        return Err(anyhow!("{method} failed: {e}"));
    }
    resp.get("result").cloned().ok_or_else(|| anyhow!("{method}: answer without result"))
}

/// True when something answers on the RPC socket: lightningd is running on that dir.
pub fn lightningd_running(lightning_dir: &Path) -> bool {
    UnixStream::connect(lightning_dir.join("lightning-rpc")).is_ok()
}
