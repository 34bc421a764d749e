//! Sealing: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) over journal records and
//! snapshot chunks, keyed by `keys::Key`.
//!
//! Framing and CRC32Cs stay outside the seal: a torn tail or a flipped byte is found
//! without the key. Inside a sealed journal (format 2) each record's payload is
//!
//! ```text
//! 24  nonce (a random 16-byte prefix per process, then a 64-bit counter)
//! ..  ciphertext of the plaintext payload (the statements)
//! 16  Poly1305 tag
//! ```
//!
//! and its associated data binds it to its place: `"CLNBKREC"`, the backup id (random, made
//! at init), the generation, the record's offset in its journal, its data_version and its
//! kind. A record moved, swapped with another, replayed from another generation or copied
//! from another backup fails to open.
//!
//! A sealed snapshot (format 2) is one zstd stream cut into 64 KiB chunks, each sealed as
//! `nonce(24) | ciphertext | tag(16)` with associated data `"CLNBKSNP"`, backup id,
//! generation, data_version, chunk index and a last-chunk flag (a STREAM-like
//! construction): chunks cannot be reordered, and a snapshot cut at a chunk boundary fails
//! because its new last chunk was not sealed as the last. Memory stays at one chunk.
//!
//! What a destination sees: file names (generation, base data_version), the journal
//! header (generation, base data_version, sealed), each record's length, data_version,
//! kind and CRCs, each snapshot's generation, data_version, database size, sealed size
//! and CRC, and `backup.json` (backup id, key fingerprint, lightning dir, key file path).
//! Never a statement, a table, a node id or a byte of the database.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::keys::Key;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a seal adds to what it seals.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Plaintext bytes of a snapshot chunk (all but the last are exactly this long).
pub const CHUNK: usize = 64 << 10;

/// The random identity of one backup, made at init and bound into every seal.
pub type BackupId = [u8; 16];

/// Seals and opens with one key and one backup id. The AEAD key schedule runs once, here.
pub struct Sealer {
    aead: XChaCha20Poly1305,
    backup_id: BackupId,
    prefix: [u8; 16],
    counter: AtomicU64,
    fingerprint: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(key {})", self.fingerprint)
    }
}

/// Where a journal record sits, bound into its seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPlace {
    pub generation: u64,
    pub offset: u64,
    pub data_version: u32,
    pub kind: u8,
}

/// A seal did not open: the wrong key, or bytes that are not where they were sealed.
#[derive(Debug, thiserror::Error)]
#[error("authentication failed")]
pub struct OpenError;

impl Sealer {
    pub fn new(key: &Key, backup_id: BackupId) -> io::Result<Sealer> {
        let aead = XChaCha20Poly1305::new(key.bytes().into());
        let mut prefix = [0u8; 16];
        crate::keys::random(&mut prefix)?;
        Ok(Sealer { aead, backup_id, prefix, counter: AtomicU64::new(0), fingerprint: key.fingerprint() })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    pub fn backup_id(&self) -> &BackupId {
        &self.backup_id
    }

    /// A new sealer with the same key and backup, and its own nonce prefix.
    pub fn fork(&self) -> io::Result<Sealer> {
        let mut prefix = [0u8; 16];
        crate::keys::random(&mut prefix)?;
        Ok(Sealer {
            aead: self.aead.clone(),
            backup_id: self.backup_id,
            prefix,
            counter: AtomicU64::new(0),
            fingerprint: self.fingerprint.clone(),
        })
    }

    fn next_nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..16].copy_from_slice(&self.prefix);
        n[16..].copy_from_slice(&self.counter.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        n
    }

    fn record_ad(&self, p: RecordPlace) -> [u8; 45] {
        let mut ad = [0u8; 45];
        ad[0..8].copy_from_slice(b"CLNBKREC");
        ad[8..24].copy_from_slice(&self.backup_id);
        ad[24..32].copy_from_slice(&p.generation.to_le_bytes());
        ad[32..40].copy_from_slice(&p.offset.to_le_bytes());
        ad[40..44].copy_from_slice(&p.data_version.to_le_bytes());
        ad[44] = p.kind;
        ad
    }

    fn chunk_ad(&self, generation: u64, data_version: u32, index: u64, last: bool) -> [u8; 45] {
        let mut ad = [0u8; 45];
        ad[0..8].copy_from_slice(b"CLNBKSNP");
        ad[8..24].copy_from_slice(&self.backup_id);
        ad[24..32].copy_from_slice(&generation.to_le_bytes());
        ad[32..36].copy_from_slice(&data_version.to_le_bytes());
        ad[36..44].copy_from_slice(&index.to_le_bytes());
        ad[44] = last as u8;
        ad
    }

    /// Seals `buf[start..]` in place: `buf[start..start + NONCE_LEN]` must be reserved (its
    /// bytes are overwritten with the nonce); the tag is appended.
    fn seal_tail(&self, buf: &mut Vec<u8>, start: usize, ad: &[u8]) {
        let nonce = self.next_nonce();
        buf[start..start + NONCE_LEN].copy_from_slice(&nonce);
        // XChaCha20-Poly1305 fails only past 256 GiB of plaintext; records are < 1 GiB.
        let tag = self
            .aead
            .encrypt_inout_detached(&XNonce::from(nonce), ad, (&mut buf[start + NONCE_LEN..]).into())
            .unwrap_or_default();
        buf.extend_from_slice(&tag);
    }

    fn open_in_place<'a>(&self, sealed: &'a mut [u8], ad: &[u8]) -> Result<&'a mut [u8], OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        let nonce = XNonce::try_from(&*nonce).map_err(|_| OpenError)?;
        let tag = Tag::try_from(&*tag).map_err(|_| OpenError)?;
        self.aead.decrypt_inout_detached(&nonce, ad, (&mut *body).into(), &tag).map_err(|_| OpenError)?;
        Ok(body)
    }

    /// Seals a record payload written at `buf[start + NONCE_LEN..]` (with `NONCE_LEN` bytes
    /// reserved at `start`), in place.
    pub fn seal_record(&self, buf: &mut Vec<u8>, start: usize, place: RecordPlace) {
        let ad = self.record_ad(place);
        self.seal_tail(buf, start, &ad);
    }

    /// Opens a sealed record payload in place; returns the plaintext within it.
    pub fn open_record<'a>(&self, sealed: &'a mut [u8], place: RecordPlace) -> Result<&'a mut [u8], OpenError> {
        let ad = self.record_ad(place);
        self.open_in_place(sealed, &ad)
    }
}

/// Seals a snapshot's (compressed) bytes in chunks as they are written through it.
pub struct SealWriter<'s, W: Write> {
    inner: W,
    sealer: &'s Sealer,
    generation: u64,
    data_version: u32,
    index: u64,
    /// Reserved nonce space, then up to CHUNK plaintext bytes, then room for the tag.
    buf: Vec<u8>,
}

impl<'s, W: Write> SealWriter<'s, W> {
    pub fn new(inner: W, sealer: &'s Sealer, generation: u64, data_version: u32) -> Self {
        let mut buf = Vec::with_capacity(CHUNK + OVERHEAD);
        buf.resize(NONCE_LEN, 0);
        SealWriter { inner, sealer, generation, data_version, index: 0, buf }
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        let ad = self.sealer.chunk_ad(self.generation, self.data_version, self.index, last);
        self.sealer.seal_tail(&mut self.buf, 0, &ad);
        self.inner.write_all(&self.buf)?;
        self.buf.truncate(NONCE_LEN);
        self.index += 1;
        Ok(())
    }

    /// Seals the last chunk (possibly short, or empty) and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit(true)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == NONCE_LEN + CHUNK && !data.is_empty() {
            // More follows, so the full chunk is not the last one.
            self.emit(false)?;
        }
        let n = data.len().min(NONCE_LEN + CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens a sealed snapshot body of `len` bytes chunk by chunk, as a reader of the plaintext.
/// A chunk that fails to open is an `InvalidData` error naming it.
pub struct OpenReader<'s, R: Read> {
    inner: R,
    sealer: &'s Sealer,
    generation: u64,
    data_version: u32,
    index: u64,
    left: u64,
    buf: Vec<u8>,
    /// Plaintext in `buf[pos..end]` not yet read.
    pos: usize,
    end: usize,
    done: bool,
}

impl<'s, R: Read> OpenReader<'s, R> {
    pub fn new(inner: R, len: u64, sealer: &'s Sealer, generation: u64, data_version: u32) -> Self {
        OpenReader {
            inner,
            sealer,
            generation,
            data_version,
            index: 0,
            left: len,
            buf: vec![0u8; CHUNK + OVERHEAD],
            pos: 0,
            end: 0,
            done: false,
        }
    }

    fn refill(&mut self) -> io::Result<()> {
        let n = (self.left as usize).min(CHUNK + OVERHEAD);
        let last = n as u64 == self.left;
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        if n < OVERHEAD {
            return Err(bad(format!("sealed chunk {} is cut short ({n} bytes)", self.index)));
        }
        self.inner.read_exact(&mut self.buf[..n])?;
        let ad = self.sealer.chunk_ad(self.generation, self.data_version, self.index, last);
        let plain = self.sealer.open_in_place(&mut self.buf[..n], &ad).map_err(|_| {
            bad(format!(
                "sealed chunk {} fails authentication{} (the snapshot was cut short, reordered, taken from \
                 another backup or generation, or damaged)",
                self.index,
                if last { ", as the last chunk" } else { "" }
            ))
        })?;
        self.end = NONCE_LEN + plain.len();
        self.pos = NONCE_LEN;
        self.left -= n as u64;
        self.index += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for OpenReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.end {
            if self.done {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(b: u8) -> Sealer {
        Sealer::new(&Key::from_bytes([b; 32], "test"), [7; 16]).unwrap()
    }

    #[test]
    fn record_binds_place() {
        let s = sealer(1);
        let p = RecordPlace { generation: 3, offset: 32, data_version: 9, kind: 1 };
        let mut buf = vec![0u8; 5 + NONCE_LEN];
        buf.extend_from_slice(b"INSERT INTO t VALUES (1)");
        s.seal_record(&mut buf, 5, p);
        assert!(!buf.windows(6).any(|w| w == b"INSERT"));
        let sealed = buf[5..].to_vec();
        assert_eq!(s.open_record(&mut sealed.clone(), p).unwrap(), b"INSERT INTO t VALUES (1)");
        for q in [
            RecordPlace { generation: 4, ..p },
            RecordPlace { offset: 33, ..p },
            RecordPlace { data_version: 10, ..p },
            RecordPlace { kind: 2, ..p },
        ] {
            assert!(s.open_record(&mut sealed.clone(), q).is_err(), "{q:?}");
        }
        assert!(sealer(2).open_record(&mut sealed.clone(), p).is_err(), "another key");
        let other = Sealer::new(&Key::from_bytes([1; 32], "t"), [8; 16]).unwrap();
        assert!(other.open_record(&mut sealed.clone(), p).is_err(), "another backup");
        // nonces never repeat within a sealer, nor across forks
        let f = s.fork().unwrap();
        assert_ne!(s.next_nonce(), s.next_nonce());
        assert_ne!(s.next_nonce()[..16], f.next_nonce()[..16]);
    }

    #[test]
    fn chunks_roundtrip_and_truncation() {
        let s = sealer(1);
        for len in [0usize, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut w = SealWriter::new(Vec::new(), &s, 2, 5);
            for part in data.chunks(1000) {
                w.write_all(part).unwrap();
            }
            let sealed = w.finish().unwrap();
            assert_eq!(sealed.len(), len + len.div_ceil(CHUNK).max(1) * OVERHEAD, "len {len}");
            let mut out = vec![];
            OpenReader::new(&sealed[..], sealed.len() as u64, &s, 2, 5).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
            assert!(OpenReader::new(&sealed[..], sealed.len() as u64, &s, 3, 5).read_to_end(&mut vec![]).is_err());
            // cut at every chunk boundary, and mid-chunk
            let mut cuts: Vec<usize> = (1..=len / CHUNK).map(|i| i * (CHUNK + OVERHEAD)).collect();
            cuts.push(sealed.len() - 1);
            for cut in cuts.into_iter().filter(|&c| c < sealed.len()) {
                let r = OpenReader::new(&sealed[..cut], cut as u64, &s, 2, 5).read_to_end(&mut vec![]);
                assert!(r.is_err(), "len {len} cut at {cut}");
            }
        }
    }
}
