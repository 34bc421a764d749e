//! One connection to `backup-cli server`: handshake, find the client's backup (pairing it
//! if the backup has no client yet), then answer requests in turn until the client leaves.
//! A client that no backup here is paired with gets nothing after the handshake.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::hosted::{Failure, Hosted};
use super::Shared;
use crate::fsutil;
use crate::net::identity::fingerprint;
use crate::net::message::{Code, Reply, Request, PROTO};
use crate::net::transport::{Channel, Stream, TransportError};

/// A stranger gets this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 1 << 20;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub async fn serve(stream: Box<dyn Stream>, peer: SocketAddr, shared: Arc<Shared>) {
    let ch = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Channel::server(stream, &shared.key)).await {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            log::info!("{peer}: no Noise handshake ({e}); closed");
            return;
        }
        Err(_) => {
            log::info!("{peer}: no handshake within {} s; closed", HANDSHAKE_TIMEOUT.as_secs());
            return;
        }
    };
    let fp = fingerprint(&ch.remote);
    let mut ch = ch;
    let mut first = None;
    let hosted = match shared.find(&ch.remote) {
        Some(h) => h,
        None => {
            // Pairing happens on a Hello only: a handshake alone (a node learning the
            // server's key at init) pairs nothing. A Hello is small: nothing larger is read.
            let hello = match tokio::time::timeout(Duration::from_secs(5), ch.recv_max(64)).await {
                Ok(Ok(b)) => b,
                _ => {
                    log::info!("{peer}: client {fp} sent no Hello; closed");
                    return;
                }
            };
            let paired = match Request::decode(&hello) {
                Ok(Request::Hello { .. }) => blocking(|| shared.pair(&ch.remote)),
                _ => None,
            };
            match paired {
                Some(h) => {
                    first = Some(hello);
                    h
                }
                None => {
                    // Its request was read, so closing sends a plain end of stream rather
                    // than a reset: the client knows it was refused, not cut off.
                    log::warn!("{peer}: refused client {fp}: no backup here is paired with it");
                    return;
                }
            }
        }
    };
    let session = shared.next_session();
    log::info!("{peer}: client {fp} connected to {}", hosted.url);
    let r = run(ch, &hosted, session, first).await;
    hosted.release(session);
    match r {
        Ok(()) => log::info!("{peer}: client {fp} left"),
        Err(e) => log::info!("{peer}: client {fp} disconnected: {e}"),
    }
}

async fn reply(ch: &mut Channel, r: Result<Reply, Failure>) -> Result<(), TransportError> {
    let msg = match r {
        Ok(r) => r,
        Err((code, message)) => Reply::Error { code, message },
    };
    ch.send(&msg.encode()).await
}

async fn run(
    mut ch: Channel,
    hosted: &Arc<Hosted>,
    session: u64,
    mut first: Option<Vec<u8>>,
) -> Result<(), TransportError> {
    loop {
        let next = match first.take() {
            Some(b) => Ok(b),
            None => ch.recv().await,
        };
        let bytes = match next {
            Ok(b) => b,
            Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let req = match Request::decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut ch, Err((Code::Protocol, e.clone()))).await?;
                return Err(TransportError::Noise(format!("bad request: {e}")));
            }
        };
        match req {
            Request::Hello { proto, writer } => {
                let r = if proto != PROTO {
                    Err((
                        Code::Protocol,
                        format!("protocol {proto} asked, this server speaks {PROTO}: upgrade the older side"),
                    ))
                } else if writer {
                    blocking(|| hosted.claim_writer(session))
                } else {
                    blocking(|| hosted.state())
                };
                reply(&mut ch, r.map(Reply::State)).await?;
            }
            Request::GetState => reply(&mut ch, blocking(|| hosted.state()).map(Reply::State)).await?,
            Request::Ping => ch.send(&Reply::Pong.encode()).await?,
            Request::Append { data_version, kind, replace_last, record } => {
                let r = blocking(|| hosted.append(session, data_version, kind, replace_last, &record));
                if let Err((Code::Storage, m)) = &r {
                    log::error!("{}: append of data_version {data_version} failed: {m}", hosted.url);
                }
                reply(&mut ch, r.map(Reply::State)).await?;
            }
            Request::Download { limit } => download(&mut ch, hosted, limit).await?,
            Request::Install { from_generation, base_version, fold_end, snapshot_len, tail } => {
                let tmp = hosted.install_tmp(from_generation, base_version);
                let got = if snapshot_len == 0 {
                    // the snapshot an earlier Stage left
                    if tmp.is_file() {
                        Ok(())
                    } else {
                        Err((Code::Refused, format!("no snapshot was staged for generation {}", from_generation + 1)))
                    }
                } else {
                    receive_file(&mut ch, hosted, &tmp, snapshot_len).await?
                };
                let r = got.and_then(|_| {
                    blocking(|| hosted.install(session, from_generation, base_version, fold_end, &tmp, &tail))
                });
                if r.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                match &r {
                    Ok(st) => {
                        log::info!("{}: installed generation {} (base {base_version})", hosted.url, st.generation)
                    }
                    Err((_, m)) => log::warn!("{}: install refused: {m}", hosted.url),
                }
                reply(&mut ch, r.map(Reply::State)).await?;
            }
            Request::Stage { from_generation, base_version, snapshot_len } => {
                let tmp = hosted.install_tmp(from_generation, base_version);
                let r = receive_file(&mut ch, hosted, &tmp, snapshot_len).await?;
                if r.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                reply(&mut ch, r.and_then(|_| blocking(|| hosted.state())).map(Reply::State)).await?;
            }
            Request::Reseed { generation, base_version, journal_len, meta } => {
                let jtmp = hosted.reseed_tmp(generation, base_version);
                let stmp = hosted.install_tmp(generation.saturating_sub(1), base_version);
                let got = receive_file(&mut ch, hosted, &jtmp, journal_len).await?;
                let r = got
                    .and_then(|_| blocking(|| hosted.reseed(session, generation, base_version, &meta, &jtmp, &stmp)));
                // refused or done: neither file is wanted any more (renamed away if taken)
                let _ = std::fs::remove_file(&jtmp);
                let _ = std::fs::remove_file(&stmp);
                match &r {
                    Ok(st) => log::info!(
                        "{}: re-seeded with generation {generation} (base {base_version}) up to data_version {}",
                        hosted.url,
                        st.version
                    ),
                    Err((_, m)) => log::warn!("{}: re-seed refused: {m}", hosted.url),
                }
                reply(&mut ch, r.map(Reply::State)).await?;
            }
            Request::Tail { from } => reply(&mut ch, blocking(|| hosted.tail(from)).map(Reply::Chunk)).await?,
            Request::GetMeta => reply(&mut ch, blocking(|| hosted.meta()).map(Reply::Meta)).await?,
            Request::PutMeta(body) => {
                let r = blocking(|| hosted.put_meta(&body));
                if r.is_ok() {
                    log::info!("{}: stored the node's backup.json", hosted.url);
                }
                reply(&mut ch, r.map(Reply::State)).await?;
            }
            Request::Chunk(_) | Request::End => {
                reply(&mut ch, Err((Code::Protocol, "data outside an install".into()))).await?;
            }
        }
    }
}

async fn download(ch: &mut Channel, hosted: &Arc<Hosted>, limit: u64) -> Result<(), TransportError> {
    let d = match blocking(|| hosted.prepare_download(limit)) {
        Ok(d) => d,
        Err(f) => return reply(ch, Err(f)).await,
    };
    ch.send(&Reply::Manifest(d.manifest).encode()).await?;
    let mut buf = vec![0u8; CHUNK];
    if let Some(s) = &d.snapshot {
        send_file(ch, &mut buf, s, d.manifest.snapshot_len).await?;
    }
    send_file(ch, &mut buf, &d.journal, d.stable).await?;
    for c in d.tail.chunks(CHUNK) {
        ch.send(&Reply::Chunk(c.to_vec()).encode()).await?;
    }
    ch.send(&Reply::End.encode()).await
}

async fn send_file(ch: &mut Channel, buf: &mut [u8], mut f: &std::fs::File, len: u64) -> Result<(), TransportError> {
    blocking(|| f.seek(SeekFrom::Start(0)))?;
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        blocking(|| f.read_exact(&mut buf[..n]))?;
        ch.send(&Reply::Chunk(buf[..n].to_vec()).encode()).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Receives the file an install, stage or reseed sends (a snapshot, a journal) into the temp
/// file `tmp`, fsynced. The outer error is the connection's; the inner one is the answer.
async fn receive_file(
    ch: &mut Channel,
    hosted: &Arc<Hosted>,
    tmp: &std::path::Path,
    len: u64,
) -> Result<Result<(), Failure>, TransportError> {
    let _ = std::fs::remove_file(tmp);
    let file = match blocking(|| fsutil::create_private(tmp)) {
        Ok(f) => Some(f),
        Err(e) => {
            log::error!("{}: {}", hosted.url, e.explain());
            None
        }
    };
    let mut got = 0u64;
    let mut failed: Option<Failure> = None;
    // Written in fdatasynced steps, so no large flush at the end makes the writer's
    // fdatasync (a node's db_write) wait behind the whole snapshot.
    let mut throttle = fsutil::Throttle::new(super::hosted::IO_RATE);
    let mut out = file.as_ref().map(|f| fsutil::Stepped::paced(f, 0, &mut throttle));
    loop {
        let msg = match ch.recv().await {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                return Err(e);
            }
        };
        match Request::decode(&msg) {
            Ok(Request::Chunk(b)) => {
                got += b.len() as u64;
                if let Some(o) = out.as_mut() {
                    if let Err(e) = blocking(|| o.write_all(&b)) {
                        failed = Some((Code::Storage, format!("write {}: {e}", tmp.display())));
                        out = None;
                    }
                }
            }
            Ok(Request::End) => break,
            _ => {
                let _ = std::fs::remove_file(tmp);
                return Err(TransportError::Noise("an install was interrupted by another request".into()));
            }
        }
    }
    let result = (|| {
        if let Some(f) = failed {
            return Err(f);
        }
        let f = file.ok_or((Code::Storage, format!("could not create {}", tmp.display())))?;
        if got != len || len == 0 {
            return Err((Code::Protocol, format!("announced {len} bytes, sent {got}")));
        }
        blocking(|| f.sync_all()).map_err(|e| (Code::Storage, format!("fsync {}: {e}", tmp.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    Ok(result)
}
