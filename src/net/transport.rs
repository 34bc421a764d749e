//! The encrypted channel: Noise_XX_25519_ChaChaPoly_BLAKE2s over a byte stream.
//!
//! Wire, from the first byte on:
//!
//! ```text
//! frame   = u16 big-endian length, then that many bytes (a Noise message, at most 65535)
//! handshake (XX, prologue "cln-backup socket v1"):
//!   client -> server  frame: e
//!   server -> client  frame: e, ee, s, es          (the client checks the server's key here)
//!   client -> server  frame: s, se                 (the server checks the client's key here)
//! then transport frames, each a ChaChaPoly ciphertext of at most 65519 plaintext bytes.
//! ```
//!
//! An application message is `u32 little-endian length` + body, carried in as many transport
//! frames as it needs (the first starts with the length). Bodies are at most `MAX_MESSAGE`.
//! Handshake payloads are empty: nothing is said before both keys are known.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::identity::{PublicKey, SecretKey};

pub const PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
pub const PROLOGUE: &[u8] = b"cln-backup socket v1";
const MAX_FRAME: usize = 65535;
const MAX_PLAIN: usize = MAX_FRAME - 16;
/// Larger than any record or chunk either side sends.
pub const MAX_MESSAGE: usize = 64 << 20;

pub fn params() -> Result<snow::params::NoiseParams, snow::Error> {
    PARAMS.parse()
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("Noise: {0}")]
    Noise(String),
    #[error(
        "the server's key {found} is not the pinned key {pinned}: the server was reinstalled, its key file \
         was lost, or someone else answers at this address. Check the key the server prints at start \
         (`backup-cli server` logs it); if the change is expected, update server_key in backup.lock"
    )]
    ServerKeyMismatch { pinned: String, found: String },
    #[error("the peer sent a message of {0} bytes, more than this version accepts")]
    TooLarge(usize),
}

fn noise(e: snow::Error) -> TransportError {
    TransportError::Noise(e.to_string())
}

async fn read_frame<S: Stream>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<()> {
    read_frame_max(s, buf, MAX_FRAME).await
}

async fn read_frame_max<S: Stream>(s: &mut S, buf: &mut Vec<u8>, max: usize) -> io::Result<()> {
    let n = s.read_u16().await? as usize;
    if n > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a first message of {n} bytes: not a cln-backup client"),
        ));
    }
    buf.resize(n, 0);
    s.read_exact(buf).await?;
    Ok(())
}

fn put_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

pub struct Channel {
    stream: Box<dyn Stream>,
    noise: snow::TransportState,
    /// Decrypted bytes not yet consumed.
    plain: Vec<u8>,
    frame: Vec<u8>,
    scratch: Vec<u8>,
    out: Vec<u8>,
    pub remote: PublicKey,
}

impl Channel {
    /// Client side: runs the handshake; refuses a server whose key is not `pinned` (when given)
    /// before revealing our own static key.
    pub async fn client(
        mut stream: Box<dyn Stream>,
        key: &SecretKey,
        pinned: Option<&PublicKey>,
    ) -> Result<Channel, TransportError> {
        let mut hs = snow::Builder::new(params().map_err(noise)?)
            .local_private_key(&key.0)
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_initiator())
            .map_err(noise)?;
        let mut msg = vec![0u8; MAX_FRAME];
        let mut out = Vec::new();
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        put_frame(&mut out, &msg[..n]);
        stream.write_all(&out).await?;
        let mut frame = Vec::new();
        read_frame(&mut stream, &mut frame).await?;
        let mut payload = vec![0u8; MAX_FRAME];
        hs.read_message(&frame, &mut payload).map_err(noise)?;
        let remote: PublicKey = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| TransportError::Noise("the server sent no static key".into()))?;
        if let Some(p) = pinned {
            if *p != remote {
                return Err(TransportError::ServerKeyMismatch { pinned: hex::encode(p), found: hex::encode(remote) });
            }
        }
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        out.clear();
        put_frame(&mut out, &msg[..n]);
        stream.write_all(&out).await?;
        stream.flush().await?;
        let noise = hs.into_transport_mode().map_err(noise)?;
        Ok(Channel::new(stream, noise, remote))
    }

    /// Server side: runs the handshake and returns the client's static key.
    pub async fn server(mut stream: Box<dyn Stream>, key: &SecretKey) -> Result<Channel, TransportError> {
        let mut hs = snow::Builder::new(params().map_err(noise)?)
            .local_private_key(&key.0)
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_responder())
            .map_err(noise)?;
        let mut frame = Vec::new();
        let mut payload = vec![0u8; MAX_FRAME];
        // XX's first message is the bare ephemeral key: anything longer is someone else
        // (the Python plugin's protocol, a scanner), closed at once.
        read_frame_max(&mut stream, &mut frame, 32).await?;
        hs.read_message(&frame, &mut payload).map_err(noise)?;
        let mut msg = vec![0u8; MAX_FRAME];
        let n = hs.write_message(&[], &mut msg).map_err(noise)?;
        let mut out = Vec::new();
        put_frame(&mut out, &msg[..n]);
        stream.write_all(&out).await?;
        stream.flush().await?;
        read_frame(&mut stream, &mut frame).await?;
        hs.read_message(&frame, &mut payload).map_err(noise)?;
        let remote: PublicKey = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| TransportError::Noise("the client sent no static key".into()))?;
        let noise = hs.into_transport_mode().map_err(noise)?;
        Ok(Channel::new(stream, noise, remote))
    }

    fn new(stream: Box<dyn Stream>, noise: snow::TransportState, remote: PublicKey) -> Channel {
        Channel {
            stream,
            noise,
            plain: Vec::new(),
            frame: Vec::new(),
            scratch: vec![0u8; MAX_FRAME],
            out: Vec::new(),
            remote,
        }
    }

    /// Sends one application message (encrypted, in as many frames as it needs).
    pub async fn send(&mut self, body: &[u8]) -> Result<(), TransportError> {
        if body.len() > MAX_MESSAGE {
            return Err(TransportError::TooLarge(body.len()));
        }
        self.out.clear();
        let len = (body.len() as u32).to_le_bytes();
        let mut first = true;
        let mut rest = body;
        loop {
            let mut chunk = Vec::with_capacity(MAX_PLAIN.min(rest.len() + 4));
            if first {
                chunk.extend_from_slice(&len);
            }
            let take = (MAX_PLAIN - chunk.len()).min(rest.len());
            chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            let n = self.noise.write_message(&chunk, &mut self.scratch).map_err(noise)?;
            put_frame(&mut self.out, &self.scratch[..n]);
            first = false;
            if rest.is_empty() {
                break;
            }
        }
        self.stream.write_all(&self.out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn fill(&mut self, want: usize) -> Result<(), TransportError> {
        while self.plain.len() < want {
            read_frame(&mut self.stream, &mut self.frame).await?;
            let n = self.noise.read_message(&self.frame, &mut self.scratch).map_err(noise)?;
            self.plain.extend_from_slice(&self.scratch[..n]);
        }
        Ok(())
    }

    /// Receives one application message of at most `max` bytes (from a client not yet
    /// known: nothing large is buffered for it).
    pub async fn recv_max(&mut self, max: usize) -> Result<Vec<u8>, TransportError> {
        self.fill(4).await?;
        let len = u32::from_le_bytes([self.plain[0], self.plain[1], self.plain[2], self.plain[3]]) as usize;
        if len > max {
            return Err(TransportError::TooLarge(len));
        }
        self.recv().await
    }

    /// Receives one application message.
    pub async fn recv(&mut self) -> Result<Vec<u8>, TransportError> {
        self.fill(4).await?;
        let len = u32::from_le_bytes([self.plain[0], self.plain[1], self.plain[2], self.plain[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(TransportError::TooLarge(len));
        }
        self.fill(4 + len).await?;
        let body = self.plain[4..4 + len].to_vec();
        self.plain.drain(..4 + len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_and_messages_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let sk = SecretKey::generate().unwrap();
        let ck = SecretKey::generate().unwrap();
        let spub = sk.public();
        let cpub = ck.public();
        let server = tokio::spawn(async move {
            let mut ch = Channel::server(Box::new(b), &sk).await.unwrap();
            assert_eq!(ch.remote, cpub);
            let m = ch.recv().await.unwrap();
            ch.send(&m).await.unwrap();
            let big = ch.recv().await.unwrap();
            ch.send(&big).await.unwrap();
        });
        let mut ch = Channel::client(Box::new(a), &ck, Some(&spub)).await.unwrap();
        assert_eq!(ch.remote, spub);
        ch.send(b"hello").await.unwrap();
        assert_eq!(ch.recv().await.unwrap(), b"hello");
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        ch.send(&big).await.unwrap();
        assert_eq!(ch.recv().await.unwrap(), big);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_changed_server_key_is_refused() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let sk = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap().public();
        tokio::spawn(async move {
            let _ = Channel::server(Box::new(b), &sk).await;
        });
        let e = Channel::client(Box::new(a), &SecretKey::generate().unwrap(), Some(&other)).await.err().unwrap();
        assert!(matches!(e, TransportError::ServerKeyMismatch { .. }));
        assert!(e.to_string().contains("update server_key in backup.lock"), "{e}");
    }
}
