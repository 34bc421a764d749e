//! `backup-cli server FILE_URL... HOST:PORT`: serves file backups to paired nodes over the
//! encrypted transport of `net` (wire format: `net::transport`, `net::message`).
//!
//! - `hosted`: one backup: its writer, its paired client, what sessions do to it.
//! - `session`: one connection: handshake, pairing, requests.
//! - `logger`: plain (or systemd-style) log lines on stderr.
//!
//! The server's static key lives beside the first backup (`<backup>.server-key`, 0600),
//! made at first start; each backup's paired client beside it (`<backup>.paired-client`).
//! One process may host several backups; a client reaches only the one paired with its key.

pub mod hosted;
pub mod logger;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use crate::net::identity::{self, PublicKey, SecretKey};
use crate::net::url::{self, Host};
use hosted::Hosted;

/// Connections open at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;

pub struct Options {
    /// Backup directories with the client key pinned for each (--client-key), if any.
    pub backups: Vec<(PathBuf, Option<PublicKey>)>,
    /// HOST:PORT to listen on.
    pub listen: String,
}

pub struct Shared {
    pub key: SecretKey,
    pub backups: Vec<Arc<Hosted>>,
    pairing: Mutex<()>,
    sessions: AtomicU64,
}

impl Shared {
    pub fn next_session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The backup paired with `key`, if any.
    pub fn find(&self, key: &PublicKey) -> Option<Arc<Hosted>> {
        self.backups.iter().find(|h| h.client() == Some(*key)).cloned()
    }

    /// The backup paired with `key`; else the first one with no client, now paired with it.
    pub fn pair(&self, key: &PublicKey) -> Option<Arc<Hosted>> {
        if let Some(h) = self.find(key) {
            return Some(h);
        }
        let _one_at_a_time = self.pairing.lock().unwrap_or_else(|p| p.into_inner());
        for h in &self.backups {
            if h.client().is_none() {
                match h.pair(key) {
                    Ok(true) => {
                        log::info!(
                            "paired {} with client {} (recorded in {})",
                            h.url,
                            identity::to_hex(key),
                            h.pairing_path.display()
                        );
                        return Some(h.clone());
                    }
                    Ok(false) => {}
                    Err(e) => log::error!("could not record the pairing of {}: {e:#}", h.url),
                }
            }
        }
        None
    }
}

/// Opens the backups and the key: everything that can fail before listening.
pub fn prepare(opts: &Options) -> Result<Shared> {
    if opts.backups.is_empty() {
        bail!("give at least one backup: backup-cli server file:///path/to/backup HOST:PORT");
    }
    let mut backups = vec![];
    for (root, pinned) in &opts.backups {
        if backups.iter().any(|h: &Arc<Hosted>| h.root == *root) {
            bail!("{} is given twice", root.display());
        }
        backups.push(Arc::new(Hosted::open(root, *pinned)?));
    }
    let key_path = hosted::beside(&opts.backups[0].0, ".server-key");
    let (key, made) = identity::load_or_create_server_key(&key_path).map_err(|e| anyhow::anyhow!(e.explain()))?;
    let public = identity::to_hex(&key.public());
    if made {
        log::info!("made a new server key in {}", key_path.display());
    }
    log::info!("server public key: {public}");
    for h in &backups {
        match h.client() {
            Some(c) => log::info!("serving {} to client {}", h.url, identity::to_hex(&c)),
            None => log::info!("serving {}: not paired yet, the first client to connect pairs", h.url),
        }
    }
    Ok(Shared { key, backups, pairing: Mutex::new(()), sessions: AtomicU64::new(0) })
}

/// The addresses to bind for HOST:PORT: every address of a name (localhost: IPv4 and
/// IPv6), or the literal. `::` binds both families (one dual-stack socket).
async fn addresses(listen: &str) -> Result<Vec<SocketAddr>> {
    let ep = url::parse_endpoint(listen, "listen address", listen).map_err(|e| anyhow::anyhow!(e))?;
    let mut addrs: Vec<SocketAddr> = match &ep.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, ep.port)],
        Host::Name(n) => {
            tokio::net::lookup_host((n.as_str(), ep.port)).await.with_context(|| format!("resolve {n}"))?.collect()
        }
    };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

async fn bind(addrs: &[SocketAddr]) -> Result<Vec<tokio::net::TcpListener>> {
    let mut out = vec![];
    let mut errors = vec![];
    for a in addrs {
        let sock = if a.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
        let r = sock.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(*a)?;
            s.listen(128)
        });
        match r {
            Ok(l) => {
                log::info!("listening on {a}");
                out.push(l);
            }
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    if out.is_empty() {
        bail!("could not listen on any address: {}", errors.join("; "));
    }
    for e in errors {
        log::warn!("not listening on {e}");
    }
    Ok(out)
}

/// TCP keepalive (idle 30 s, then 3 probes 10 s apart): a client that vanished without a
/// word (power cut, NAT timeout) releases its writer claim within about a minute, so the
/// node's reconnect is not refused as a second writer for longer than that.
fn keepalive(s: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level: i32, opt: i32, v: i32| {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live i32 and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as u32,
            );
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// Runs the server in the foreground until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<()> {
    logger::init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let shared = Arc::new(prepare(&opts)?);
    rt.block_on(async move {
        let listeners = bind(&addresses(&opts.listen).await?).await?;
        // Bounds open connections (file descriptors, memory) whoever opens them.
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        for l in listeners {
            let (shared, slots) = (shared.clone(), slots.clone());
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, peer)) => {
                            let Ok(permit) = slots.clone().try_acquire_owned() else {
                                log::warn!("{peer}: closed: already {MAX_CONNECTIONS} connections open");
                                continue;
                            };
                            let _ = s.set_nodelay(true);
                            keepalive(&s);
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                session::serve(Box::new(s), peer, shared).await;
                                drop(permit);
                            });
                        }
                        Err(e) => {
                            log::warn!("accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: stopping"),
            _ = int.recv() => log::info!("SIGINT: stopping"),
        }
        anyhow::Ok(())
    })?;
    // Sessions end with the runtime; every acknowledged append is already on disk.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    log::info!("stopped");
    Ok(())
}

/// `backup-cli server FILE_URL... HOST:PORT [--client-key HEX]...`: the n-th --client-key
/// pins the n-th backup's client.
pub fn cli(args: &[String], client_keys: &[String], cwd: &std::path::Path) -> Result<()> {
    let Some((listen, urls)) = args.split_last() else {
        bail!("usage: backup-cli server FILE_URL [FILE_URL...] HOST:PORT");
    };
    if urls.is_empty() {
        bail!("give the backup and the address to listen on: backup-cli server file:///path/to/backup HOST:PORT");
    }
    if client_keys.len() > urls.len() {
        bail!(
            "{} --client-key given for {} backup(s): one at most per backup, in the same order",
            client_keys.len(),
            urls.len()
        );
    }
    url::parse_endpoint(listen, "listen address", listen).map_err(|e| anyhow::anyhow!(e))?;
    let mut backups = vec![];
    for (i, u) in urls.iter().enumerate() {
        let root = crate::layout::parse_url(u, cwd).map_err(|e| anyhow::anyhow!(e))?;
        let pinned = match client_keys.get(i) {
            Some(k) => Some(identity::parse_public(k).map_err(|e| anyhow::anyhow!("--client-key: {e}"))?),
            None => None,
        };
        backups.push((root, pinned));
    }
    run(Options { backups, listen: listen.clone() })
}
