//! Snapshot files: a whole SQLite database at one data_version, zstd-compressed.
//!
//! ```text
//! 0   8  magic "CLNBKSNP"
//! 8   4  format version: 1 = plaintext, 2 = sealed; little-endian like every integer here
//! 12  8  generation
//! 20  4  data_version of the database
//! 24  8  database size in bytes
//! 32  4  format 1: CRC32C of the database bytes; format 2: CRC32C of the bytes after
//!        this header (as stored, sealed), so damage is found without the key
//! 36  8  stored size (bytes after this header)
//! 44 16  zero
//! 60  4  CRC32C of bytes 0..60
//! 64  .. one zstd stream of the database; format 2: that stream sealed in chunks
//!        (`seal::SealWriter`), bound to the backup, generation and data_version
//! ```
//!
//! Written whole to a temp file, fsynced and renamed (never changed in place). Readers
//! stream it: open, decompress, count and checksum, and refuse any mismatch.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::seal::{OpenReader, SealWriter, Sealer};

pub const MAGIC: &[u8; 8] = b"CLNBKSNP";
pub const FORMAT_PLAIN: u32 = 1;
pub const FORMAT_SEALED: u32 = 2;
pub const HEADER_LEN: u64 = 64;
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub generation: u64,
    pub data_version: u32,
    pub raw_len: u64,
    /// Plaintext: CRC32C of the database; sealed: CRC32C of the stored bytes.
    pub crc: u32,
    pub compressed_len: u64,
    pub sealed: bool,
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        let format = if self.sealed { FORMAT_SEALED } else { FORMAT_PLAIN };
        h[8..12].copy_from_slice(&format.to_le_bytes());
        h[12..20].copy_from_slice(&self.generation.to_le_bytes());
        h[20..24].copy_from_slice(&self.data_version.to_le_bytes());
        h[24..32].copy_from_slice(&self.raw_len.to_le_bytes());
        h[32..36].copy_from_slice(&self.crc.to_le_bytes());
        h[36..44].copy_from_slice(&self.compressed_len.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(path: &Path, h: &[u8; HEADER_LEN as usize]) -> Result<SnapshotHeader> {
        if &h[0..8] != MAGIC {
            return Err(StoreError::NotBackup { path: path.into(), what: "not a snapshot (wrong magic bytes)".into() });
        }
        let u32at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
        if u32at(60) != crc32c::crc32c(&h[0..60]) {
            return Err(damaged(path, 0, "snapshot header checksum mismatch"));
        }
        if u32at(8) != FORMAT_PLAIN && u32at(8) != FORMAT_SEALED {
            return Err(StoreError::NotBackup {
                path: path.into(),
                what: format!(
                    "snapshot format {}, this build reads {FORMAT_PLAIN} and {FORMAT_SEALED}: upgrade cln-backup",
                    u32at(8)
                ),
            });
        }
        Ok(SnapshotHeader {
            generation: u64at(12),
            data_version: u32at(20),
            raw_len: u64at(24),
            crc: u32at(32),
            compressed_len: u64at(36),
            sealed: u32at(8) == FORMAT_SEALED,
        })
    }
}

fn damaged(path: &Path, offset: u64, what: &str) -> StoreError {
    StoreError::Damaged { path: path.into(), offset, what: what.into() }
}

/// Counts and checksums what passes through.
struct Crc<T> {
    inner: T,
    crc: u32,
    len: u64,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses the database file `db` into a new snapshot file at `dest`, durably, sealed
/// when `sealer` is given. Its writes are paced by `throttle`.
pub fn write(
    dest: &Path,
    generation: u64,
    data_version: u32,
    db: &Path,
    throttle: &mut fsutil::Throttle,
    sealer: Option<&Sealer>,
) -> Result<SnapshotHeader> {
    let src = File::open(db).map_err(StoreError::io("open database image", db))?;
    let mut header = None;
    fsutil::write_atomic(dest, false, |f, tmp| {
        let io = StoreError::io("write snapshot", tmp);
        f.write_all(&[0u8; HEADER_LEN as usize]).map_err(StoreError::io("write snapshot", tmp))?;
        let mut input = Crc { inner: BufReader::with_capacity(1 << 20, &src), crc: 0, len: 0 };
        let out = Crc {
            inner: BufWriter::with_capacity(1 << 20, fsutil::Stepped::paced(f, HEADER_LEN, throttle)),
            crc: 0,
            len: 0,
        };
        let body_crc = match sealer {
            None => {
                let mut enc = zstd::stream::Encoder::new(out, ZSTD_LEVEL).map_err(StoreError::io("start zstd", tmp))?;
                io::copy(&mut input, &mut enc).map_err(StoreError::io("compress snapshot", tmp))?;
                let mut out = enc.finish().map_err(StoreError::io("write snapshot", tmp))?;
                out.flush().map_err(StoreError::io("write snapshot", tmp))?;
                out.crc
            }
            Some(s) => {
                let sealed = SealWriter::new(out, s, generation, data_version);
                let mut enc =
                    zstd::stream::Encoder::new(sealed, ZSTD_LEVEL).map_err(StoreError::io("start zstd", tmp))?;
                io::copy(&mut input, &mut enc).map_err(StoreError::io("compress snapshot", tmp))?;
                let mut out = enc.finish().and_then(|w| w.finish()).map_err(StoreError::io("write snapshot", tmp))?;
                out.flush().map_err(StoreError::io("write snapshot", tmp))?;
                out.crc
            }
        };
        let total = f.seek(SeekFrom::End(0)).map_err(StoreError::io("seek", tmp))?;
        let h = SnapshotHeader {
            generation,
            data_version,
            raw_len: input.len,
            crc: if sealer.is_some() { body_crc } else { input.crc },
            compressed_len: total - HEADER_LEN,
            sealed: sealer.is_some(),
        };
        // Filling in the header of a temp file that nobody reads yet: not an in-place update.
        f.write_all_at(&h.encode(), 0).map_err(io)?;
        header = Some(h);
        Ok(())
    })?;
    header.ok_or_else(|| StoreError::Invalid { path: dest.into(), what: "snapshot not written".into() })
}

pub fn read_header(path: &Path, file: &mut File) -> Result<SnapshotHeader> {
    let mut h = [0u8; HEADER_LEN as usize];
    file.seek(SeekFrom::Start(0)).map_err(StoreError::io("seek", path))?;
    file.read_exact(&mut h).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            damaged(path, 0, "snapshot shorter than its header")
        } else {
            StoreError::io("read snapshot", path)(e)
        }
    })?;
    SnapshotHeader::decode(path, &h)
}

/// Decompresses a snapshot into `out` (or nowhere, to check it), verifying size and checksum.
/// `progress` gets compressed bytes read so far. A sealed snapshot needs `sealer`; without
/// one, only its stored bytes' checksum is checked (`out` gets nothing).
pub fn extract(
    path: &Path,
    file: &mut File,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
    sealer: Option<&Sealer>,
) -> Result<SnapshotHeader> {
    let h = read_header(path, file)?;
    let len = file.metadata().map_err(StoreError::io("stat", path))?.len();
    if len != HEADER_LEN + h.compressed_len {
        return Err(damaged(
            path,
            len.min(HEADER_LEN + h.compressed_len),
            &format!("snapshot is {len} bytes, its header says {}", HEADER_LEN + h.compressed_len),
        ));
    }
    struct Progress<'a, R> {
        inner: R,
        n: u64,
        f: &'a mut dyn FnMut(u64),
    }
    impl<R: Read> Read for Progress<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.inner.read(buf)?;
            self.n += k as u64;
            (self.f)(self.n);
            Ok(k)
        }
    }
    let buffered = BufReader::with_capacity(1 << 20, Progress { inner: &mut *file, n: 0, f: progress });
    let decode_err = |e: io::Error| match e.kind() {
        io::ErrorKind::Other | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => {
            damaged(path, HEADER_LEN, &format!("compressed database does not decode: {e}"))
        }
        _ => StoreError::io("extract snapshot", path)(e),
    };
    let mut sink = Crc { inner: out, crc: 0, len: 0 };
    match (h.sealed, sealer) {
        (false, _) => {
            let mut dec = zstd::stream::Decoder::with_buffer(buffered).map_err(StoreError::io("start zstd", path))?;
            io::copy(&mut dec, &mut sink).map_err(decode_err)?;
            if sink.len != h.raw_len || sink.crc != h.crc {
                return Err(damaged(path, HEADER_LEN, "decompressed database fails its size or checksum"));
            }
        }
        (true, None) => {
            let mut input = Crc { inner: buffered, crc: 0, len: 0 };
            io::copy(&mut input, &mut io::sink()).map_err(StoreError::io("read snapshot", path))?;
            if input.crc != h.crc {
                return Err(damaged(path, HEADER_LEN, "sealed snapshot fails its checksum"));
            }
        }
        (true, Some(s)) => {
            let mut input = Crc { inner: buffered, crc: 0, len: 0 };
            let open = OpenReader::new(&mut input, h.compressed_len, s, h.generation, h.data_version);
            let mut dec = zstd::stream::Decoder::new(open).map_err(StoreError::io("start zstd", path))?;
            io::copy(&mut dec, &mut sink).map_err(decode_err)?;
            // The zstd frame may end before the last chunk is opened: open the rest, which
            // must hold nothing more (truncation shows here as a missing last chunk).
            let extra = io::copy(&mut dec.finish(), &mut io::sink()).map_err(decode_err)?;
            if extra != 0 {
                return Err(damaged(path, HEADER_LEN, "bytes after the compressed database"));
            }
            if sink.len != h.raw_len || input.crc != h.crc {
                return Err(damaged(path, HEADER_LEN, "opened database fails its size or the snapshot its checksum"));
            }
        }
    }
    Ok(h)
}

/// Copies a live SQLite database to `tmp` with SQLite's online backup API (so pages still
/// in its `-wal` count) and returns the copy's data_version.
pub fn copy_live_database(db: &Path, tmp: &Path) -> Result<u32> {
    use rusqlite::{Connection, OpenFlags};
    let err = |e: rusqlite::Error| StoreError::Invalid { path: db.into(), what: format!("SQLite: {e}") };
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    let mut dst = Connection::open(tmp).map_err(err)?;
    rusqlite::backup::Backup::new(&src, &mut dst)
        .and_then(|b| b.run_to_completion(4096, std::time::Duration::ZERO, None))
        .map_err(err)?;
    dst.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(())).map_err(err)?;
    let dv: Option<i64> = dst
        .query_row("SELECT intval FROM vars WHERE name = 'data_version'", [], |r| r.get(0))
        .map_err(|e| StoreError::Invalid {
            path: db.into(),
            what: format!("not a lightningd database (no data_version in its vars table): {e}"),
        })?;
    let dv = dv.ok_or_else(|| StoreError::Invalid { path: db.into(), what: "data_version is NULL".into() })?;
    dst.close().map_err(|(_, e)| err(e))?;
    Ok(dv as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("db");
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        std::fs::write(&db, &data).unwrap();
        let snap = d.path().join("s");
        let h = write(&snap, 4, 77, &db, &mut fsutil::Throttle::unlimited(), None).unwrap();
        assert_eq!((h.generation, h.data_version, h.raw_len), (4, 77, data.len() as u64));
        assert!(h.compressed_len < data.len() as u64 / 4);
        let mut out = vec![];
        let h2 = extract(&snap, &mut File::open(&snap).unwrap(), &mut out, &mut |_| {}, None).unwrap();
        assert_eq!(h, h2);
        assert_eq!(out, data);
        // refuses to overwrite
        assert!(matches!(
            write(&snap, 4, 77, &db, &mut fsutil::Throttle::unlimited(), None),
            Err(StoreError::Exists { .. })
        ));
        let good = std::fs::read(&snap).unwrap();
        for i in [5usize, 30, 70, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&snap, &bad).unwrap();
            let r = extract(&snap, &mut File::open(&snap).unwrap(), &mut io::sink(), &mut |_| {}, None);
            assert!(r.is_err(), "flip at {i} went unnoticed");
        }
        std::fs::write(&snap, &good[..good.len() - 10]).unwrap();
        let e = extract(&snap, &mut File::open(&snap).unwrap(), &mut io::sink(), &mut |_| {}, None).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
    }
}
