//! lightningd's side: the plugin lightningd runs. It sends getmanifest, then db_write calls
//! (some before init), init, more db_write calls and passthrough commands, then closes stdin.
//!
//! - `preinit`: the adapter between stdio and cln-plugin (why it exists is written there);
//! - `hook`: the work itself, `Core` (db_write, status, compaction), called by both;
//! - `options`: the options, as cln-plugin typed options; `logger`: `log` to lightningd;
//! - `checks`: configuration checks through cln-rpc after init; `protocol`, `stats`.
//!
//! A db_write is answered `continue` only once its batch is on stable storage. Any failure,
//! or a version that the backup cannot vouch for, halts: the answer is not `continue`, so
//! lightningd stops without committing. A halt is final for the process.

pub mod checks;
pub mod hook;
pub mod logger;
pub mod options;
mod preinit;
pub mod protocol;
pub mod stats;

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cln_plugin::{Builder, Plugin, RpcMethodBuilder};
use log::{debug, info, warn};
use serde_json::{json, Value};

pub use hook::{Core, LOCK_NAME};
use options::Settings;
use protocol::Output;

use crate::compact::lock;

type State = Arc<Mutex<Core>>;

/// Runs the plugin on stdin/stdout until lightningd closes stdin.
pub fn run() -> Result<()> {
    let out = Output::stdout();
    logger::install(out.clone());
    let core: State = Arc::new(Mutex::new(Core::new(std::env::current_dir()?)));
    let (to_plugin, plugin_input) = UnixStream::pair().context("in-memory pipe to cln-plugin")?;
    let (plugin_output, from_plugin) = UnixStream::pair().context("in-memory pipe from cln-plugin")?;
    let relay_out = out.clone();
    std::thread::Builder::new().name("cln-plugin-out".into()).spawn(move || preinit::relay(from_plugin, &relay_out))?;
    let plugin_core = core.clone();
    std::thread::Builder::new().name("cln-plugin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return warn!("Cannot start the plugin's runtime: {e}"),
        };
        if let Err(e) = rt.block_on(serve(plugin_core, plugin_input, plugin_output)) {
            debug!("cln-plugin ended: {e:#}");
        }
    })?;
    preinit::serve(io::stdin().lock(), &out, &core, to_plugin)?;
    Ok(())
}

/// cln-plugin's side: manifest, init and options, our methods and setconfig.
async fn serve(core: State, input: UnixStream, output: UnixStream) -> Result<()> {
    input.set_nonblocking(true)?;
    output.set_nonblocking(true)?;
    let input = tokio::net::UnixStream::from_std(input)?;
    let output = tokio::net::UnixStream::from_std(output)?;
    let configured = Builder::new(input, output)
        // Our logger writes in order with our answers (see `logger`); cln-plugin's goes
        // through a channel and a task, so a line could land after the answer it explains.
        .with_logging(false)
        .option(options::AUTOCOMPACT)
        .option(options::COMPACT_MIN_JOURNAL)
        .option(options::COMPACT_RATIO)
        .option(options::COMPACT_IO_RATE.dynamic())
        .option(options::MIN_DESTINATIONS)
        .option(options::RECONNECT_TIMEOUT)
        .option(options::LEGACY_DESTINATION)
        .hook("db_write", |p: Plugin<State>, v: Value| async move { Ok(preinit::hook_answer(p.state(), &v)) })
        .rpcmethod_from_builder(
            RpcMethodBuilder::new("backup-status", |p: Plugin<State>, _v: Value| async move {
                Ok(lock(p.state()).status())
            })
            .description(
                "Show the backup: destination, files and sizes, versions, hook latency, last write, compaction.",
            )
            .usage(""),
        )
        .rpcmethod_from_builder(
            RpcMethodBuilder::new("backup-compact", |p: Plugin<State>, _v: Value| async move {
                Ok(lock(p.state()).compact_command())
            })
            .description("Fold the journal into a new compressed snapshot, in the background; db_write goes on.")
            .usage(""),
        )
        .setconfig_callback(setconfig)
        .configure()
        .await?;
    let Some(configured) = configured else {
        return Ok(()); // lightningd closed before init
    };
    let get = |name: &str| configured.option_str(name).ok().flatten();
    if get(options::LEGACY_DESTINATION.name).is_some() {
        warn!("{}", options::LEGACY_DESTINATION_WARNING);
    }
    match Settings::from_values(get) {
        Ok(s) => lock(&core).initialized(s),
        Err(e) => {
            warn!("{e}");
            configured.disable(&e).await?;
            return Ok(());
        }
    }
    let conf = configured.configuration();
    let plugin = configured.start(core).await?;
    let socket = Path::new(&conf.lightning_dir).join(&conf.rpc_file);
    tokio::spawn(async move { checks::check_config(&socket).await });
    plugin.join().await
}

/// `lightning-cli setconfig NAME VALUE` for our dynamic options.
async fn setconfig(p: Plugin<State>, v: Value) -> Result<Value> {
    let name = v["config"].as_str().unwrap_or_default();
    let value = options::from_json(&v["val"]);
    if name != options::COMPACT_IO_RATE.name {
        anyhow::bail!("{name} cannot change while lightningd runs; dynamic: {}", options::DYNAMIC.join(", "));
    }
    let rate = options::parse_io_rate(&value).map_err(anyhow::Error::msg)?;
    p.set_option_str(name, value)?;
    lock(p.state()).set_io_rate(rate);
    info!("{name} is now {rate} bytes a second, from the next compaction");
    Ok(json!({}))
}
