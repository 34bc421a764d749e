//! After init, checks that lightningd is set up so that the backup means something. Runs on
//! the runtime, off the hook path: while a db_write waits for its answer lightningd serves
//! no RPC, so a call from the hook path would deadlock.

use std::path::Path;

use cln_rpc::ClnRpc;
use log::{debug, warn};
use serde_json::{json, Value};

pub async fn check_config(socket: &Path) {
    let mut rpc = match ClnRpc::new(socket).await {
        Ok(r) => r,
        Err(e) => {
            debug!("Could not check lightningd's configuration: connect to {}: {e:#}", socket.display());
            return;
        }
    };
    let configs: Value = match rpc.call_raw("listconfigs", &json!({})).await {
        Ok(v) => v,
        Err(e) => {
            debug!("Could not check lightningd's configuration: listconfigs failed: {e}");
            return;
        }
    };
    let c = &configs["configs"];
    if let Some(wallet) = c["wallet"]["value_str"].as_str() {
        if !wallet.starts_with("sqlite3") {
            warn!(
                "lightningd's wallet is '{wallet}', not SQLite: lightningd never sends db_write there, so \
                 cln-backup cannot back it up. Stopping lightningd. Use your database's own replication \
                 instead, and remove cln-backup from the configuration."
            );
            if let Err(e) = rpc.call_raw::<Value, _>("stop", &json!({})).await {
                warn!("Could not stop lightningd: {e}");
            }
            return;
        }
    }
    let me = std::env::current_exe().ok().and_then(|p| std::fs::canonicalize(p).ok());
    let important = c["important-plugin"]["values_str"].as_array().is_some_and(|a| {
        a.iter().filter_map(Value::as_str).any(|p| {
            let p = std::fs::canonicalize(p).ok();
            p.is_some() && p == me
        })
    });
    if !important {
        warn!(
            "cln-backup is not loaded as an important plugin: if it stops, lightningd goes on without a \
             backup. Use important-plugin={} in the configuration instead of plugin=",
            me.map(|p| p.display().to_string()).unwrap_or_else(|| "/path/to/cln-backup".into())
        );
    }
}
