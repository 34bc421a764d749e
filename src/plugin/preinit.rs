//! The pre-init adapter: sits between the real stdin/stdout and cln-plugin.
//!
//! Why it exists: lightningd sends `getmanifest`, then a `db_write` for every startup
//! transaction, and only then `init`. cln-plugin (0.7.0, and CLN master) reads exactly
//! `getmanifest` then `init` in `Builder::configure()` and fails on anything between them,
//! and its hooks are only callable with a `Plugin<S>`, which exists after init. What would
//! let this module go: cln-plugin accepting a hook that may be called before init, without
//! `Plugin<S>` (e.g. `Builder::early_hook(name, Fn(Request) -> Response)`), dispatched while
//! `configure()` waits for init.
//!
//! What it does:
//! - `getmanifest`, `init` and every other message are passed to cln-plugin unchanged, through
//!   an in-memory socket pair; cln-plugin owns the manifest, options, methods and setconfig.
//! - `db_write` is answered here, before and after init, through the one `Core` handler
//!   (cln-plugin's registered hook calls the same one). After init this is also where
//!   cln-plugin cannot give us what we need: its dispatch parses every SQL string into a
//!   `serde_json::Value`, spawns a task and routes the answer through a channel to its
//!   writer task, each a thread hop and allocations per record on the path lightningd waits
//!   on. Answered here, a db_write costs what it did before cln-plugin.
//! - Our own RPC methods sent before init (lightningd does not, but an operator's tooling may
//!   replay them) are answered here too, from the same handlers; cln-plugin would fail on them.
//! - One writer owns stdout (`Output`): cln-plugin's output comes back through the socket
//!   pair, is cut into whole messages, and written a message at a time, so its messages and
//!   ours never interleave mid-message.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::value::RawValue;

use super::hook::Core;
use super::protocol::{parse_db_write, DbWriteRequest, Framer, HookAnswer, Incoming, Output};
use crate::compact::lock;

/// Reads lightningd's messages from `input` until EOF, answering db_write (and our methods
/// before init) with `core`, forwarding the rest to cln-plugin through `to_plugin`.
pub fn serve(input: impl Read, out: &Output, core: &Arc<Mutex<Core>>, mut to_plugin: UnixStream) -> io::Result<()> {
    let mut input = Framer::new(input);
    let mut after_init = false;
    let mut forward = Vec::with_capacity(4096);
    while let Some(msg) = input.next_value() {
        let bytes = match msg {
            Ok(b) => b,
            Err(e) => {
                log::warn!("cannot read what lightningd sent ({e}); exiting");
                return Err(e);
            }
        };
        let received = Instant::now();
        // A db_write is read in one pass and answered here: lightningd waits on it. (An id
        // of null reads as no id below, as it always has: such a call gets no answer.)
        if let Ok(call) = serde_json::from_slice::<DbWriteRequest>(bytes) {
            if call.method == "db_write" && call.id.get() != "null" {
                let answer = lock(core).db_write(received, Ok(call.params));
                // A failed write means lightningd is gone; stdin EOF follows.
                let _ = if answer.is_continue() {
                    out.respond_raw(call.id, HookAnswer::CONTINUE_JSON)
                } else {
                    out.respond(call.id, &answer)
                };
                continue;
            }
        }
        let msg = match serde_json::from_slice::<Incoming>(bytes) {
            Ok(m) => m,
            Err(e) if e.is_data() => {
                log::warn!(
                    "Ignoring a message from lightningd that is not a JSON-RPC object: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                );
                continue;
            }
            Err(e) => {
                log::warn!("cannot parse what lightningd sent ({e}); exiting");
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        };
        match (msg.method.as_deref(), msg.id) {
            (Some("db_write"), Some(id)) => {
                // params the one-pass read did not fit: the handler says what is wrong
                let answer = lock(core).db_write(received, parse_db_write(msg.params.map_or("null", RawValue::get)));
                let _ = out.respond(id, &answer);
            }
            (Some(m), _) if after_init || m == "getmanifest" || m == "init" => {
                if m == "getmanifest" {
                    // Open the backup before any db_write, so a broken setup is logged at once.
                    lock(core).open_backend();
                }
                after_init |= m == "init";
                forward.clear();
                forward.extend_from_slice(bytes);
                forward.extend_from_slice(b"\n\n");
                if to_plugin.write_all(&forward).is_err() {
                    log::warn!("cln-plugin stopped reading lightningd's messages; exiting");
                    return Ok(());
                }
            }
            (Some(m @ ("backup-status" | "backup-compact")), Some(id)) => {
                let answer = if m == "backup-status" { lock(core).status() } else { lock(core).compact_command() };
                let _ = out.respond(id, &answer);
            }
            (Some(m), Some(id)) => {
                let _ = out.respond_error(id, -32601, &format!("cln-backup cannot serve '{m}' before init"));
            }
            // Notifications before init, and responses (we send no requests): nothing to do.
            _ => {}
        }
    }
    Ok(())
}

/// Copies cln-plugin's output to stdout a whole message at a time, until it closes.
pub fn relay(from_plugin: UnixStream, out: &Output) {
    let mut input = Framer::new(from_plugin);
    while let Some(Ok(bytes)) = input.next_value() {
        if out.send_raw(bytes).is_err() {
            return;
        }
    }
}

/// The answer cln-plugin's registered db_write hook gives: the same handler.
pub fn hook_answer(core: &Arc<Mutex<Core>>, params: &serde_json::Value) -> serde_json::Value {
    lock(core).db_write_value(params)
}
