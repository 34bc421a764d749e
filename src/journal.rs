//! The journal file format. All of it is here.
//!
//! A journal starts with a 32-byte header, written once when the file is created (as a temp
//! file, fsynced, then renamed into place) and never rewritten:
//!
//! ```text
//! 0   8  magic "CLNBKJNL"
//! 8   4  format version: 1 = plaintext records, 2 = sealed records (see `seal`);
//!        little-endian like every integer here
//! 12  8  generation (the backup's compaction count; also in the file name)
//! 20  1  base kind: 0 = empty database (a fresh node), 1 = the generation's snapshot
//! 21  3  zero
//! 24  4  base data_version: the version of the snapshot (0 for an empty base)
//! 28  4  CRC32C of bytes 0..28
//! ```
//!
//! Then records, appended with one write each and fdatasynced before the plugin answers:
//!
//! ```text
//! 0   4  payload length
//! 4   4  data_version of the hook call
//! 8   1  kind: 1 = a transaction (ends with lightningd's data_version bump),
//!              2 = statements lightningd ran outside any transaction (PRAGMA foreign_keys)
//! 9   4  CRC32C of the payload
//! 13  4  CRC32C of bytes 0..13 (so a length can be trusted before it is used)
//! 17  .. payload: each statement as u32 length + UTF-8 bytes
//! ```
//!
//! Reading stops at the first record that is not whole and valid. If nothing valid follows
//! it, it is a torn tail: a write that a crash cut short, never acknowledged to lightningd,
//! so it is dropped (the writer truncates it). If a valid record follows, the file is
//! damaged before its tail: that is an error naming the file and offset, never skipped.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::seal::{RecordPlace, Sealer, NONCE_LEN};

pub const MAGIC: &[u8; 8] = b"CLNBKJNL";
/// Plaintext records (every backup made before sealing existed).
pub const FORMAT_PLAIN: u32 = 1;
/// Sealed records.
pub const FORMAT_SEALED: u32 = 2;
pub const HEADER_LEN: u64 = 32;
pub const RECORD_HEADER_LEN: usize = 17;
/// No hook call comes near this; a larger length is damage.
pub const MAX_PAYLOAD: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Transaction = 1,
    Outside = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Transaction),
            2 => Some(Kind::Outside),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Empty,
    Snapshot(u32),
}

impl Base {
    pub fn version(self) -> u32 {
        match self {
            Base::Empty => 0,
            Base::Snapshot(v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub base: Base,
    /// Format 2: every record is sealed.
    pub sealed: bool,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        let format = if self.sealed { FORMAT_SEALED } else { FORMAT_PLAIN };
        h[8..12].copy_from_slice(&format.to_le_bytes());
        h[12..20].copy_from_slice(&self.generation.to_le_bytes());
        let (kind, v) = match self.base {
            Base::Empty => (0u8, 0u32),
            Base::Snapshot(v) => (1u8, v),
        };
        h[20] = kind;
        h[24..28].copy_from_slice(&v.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(path: &Path, h: &[u8]) -> Result<Header> {
        let bad = |what: &str| StoreError::NotBackup { path: path.into(), what: what.into() };
        if h.len() < HEADER_LEN as usize || &h[0..8] != MAGIC {
            return Err(bad("no journal header (wrong magic bytes)"));
        }
        if u32le(&h[28..32]) != crc32c::crc32c(&h[0..28]) {
            return Err(StoreError::Damaged {
                path: path.into(),
                offset: 0,
                what: "journal header checksum mismatch".into(),
            });
        }
        let format = u32le(&h[8..12]);
        if format != FORMAT_PLAIN && format != FORMAT_SEALED {
            return Err(bad(&format!(
                "journal format {format}, this build reads {FORMAT_PLAIN} and {FORMAT_SEALED}: upgrade cln-backup"
            )));
        }
        let generation = u64::from_le_bytes(h[12..20].try_into().unwrap_or_default());
        let base = match h[20] {
            0 => Base::Empty,
            1 => Base::Snapshot(u32le(&h[24..28])),
            k => return Err(bad(&format!("unknown base kind {k}"))),
        };
        Ok(Header { generation, base, sealed: format == FORMAT_SEALED })
    }
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// How a journal's payloads are stored.
#[derive(Debug, Clone, Copy)]
pub enum Payloads<'s> {
    Plain,
    /// Sealed for this generation (`Header::sealed`).
    Sealed {
        sealer: &'s Sealer,
        generation: u64,
    },
}

/// Appends one framed plaintext record to `out`.
pub fn encode_record<S: AsRef<str>>(out: &mut Vec<u8>, data_version: u32, kind: Kind, writes: &[S]) {
    encode_record_as(out, 0, data_version, kind, writes, Payloads::Plain)
}

/// Appends one framed record to `out`, whose first byte goes to file offset `file_offset`
/// (a sealed record is bound to the offset of its own start). Sealing happens in place.
pub fn encode_record_as<S: AsRef<str>>(
    out: &mut Vec<u8>,
    file_offset: u64,
    data_version: u32,
    kind: Kind,
    writes: &[S],
    payloads: Payloads,
) {
    let start = out.len();
    let front = match payloads {
        Payloads::Plain => RECORD_HEADER_LEN,
        Payloads::Sealed { .. } => RECORD_HEADER_LEN + NONCE_LEN,
    };
    out.resize(start + front, 0);
    for w in writes {
        let w = w.as_ref().as_bytes();
        out.extend_from_slice(&(w.len() as u32).to_le_bytes());
        out.extend_from_slice(w);
    }
    if let Payloads::Sealed { sealer, generation } = payloads {
        let place = RecordPlace { generation, offset: file_offset, data_version, kind: kind as u8 };
        sealer.seal_record(out, start + RECORD_HEADER_LEN, place);
    }
    fill_header(&mut out[start..], data_version, kind);
}

/// Appends one framed record around a payload that is already encoded (and sealed, if it
/// is): a record read back, copied to another copy of the same backup.
pub fn frame_payload(out: &mut Vec<u8>, data_version: u32, kind: Kind, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    out.extend_from_slice(payload);
    fill_header(&mut out[start..], data_version, kind);
}

/// Writes a record's header over its first `RECORD_HEADER_LEN` bytes, from the payload after them.
fn fill_header(record: &mut [u8], data_version: u32, kind: Kind) {
    let payload_len = (record.len() - RECORD_HEADER_LEN) as u32;
    let payload_crc = crc32c::crc32c(&record[RECORD_HEADER_LEN..]);
    let h = &mut record[..RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&payload_len.to_le_bytes());
    h[4..8].copy_from_slice(&data_version.to_le_bytes());
    h[8] = kind as u8;
    h[9..13].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&h[0..13]);
    h[13..17].copy_from_slice(&header_crc.to_le_bytes());
}

/// The statements of a framed plaintext record (as `encode_record` makes it).
pub fn statements_of(record: &[u8]) -> std::result::Result<Vec<&str>, String> {
    decode_statements(record.get(RECORD_HEADER_LEN..).unwrap_or_default())
}

/// The header CRC a framed record carries (bytes 13..17). It covers the length, version,
/// kind and payload CRC, so it names a record: a copy's end is named by its last record's.
pub fn header_crc(record: &[u8]) -> u32 {
    record.get(13..17).map_or(0, u32le)
}

/// A whole record's length by its header's length field, unchecked: for walking records
/// already checked when they were stored.
pub fn framed_len(header: &[u8]) -> u64 {
    RECORD_HEADER_LEN as u64 + header.get(0..4).map_or(0, u32le) as u64
}

/// Walks the headers of records already checked when they were stored, from `from` to
/// `end`, handing each one's offset and header to `f`. Returns where the walk stopped:
/// `end`, unless a record runs past it.
pub fn walk_headers(file: &File, path: &Path, from: u64, end: u64, mut f: impl FnMut(u64, &[u8])) -> Result<u64> {
    let mut off = from;
    let mut h = [0u8; RECORD_HEADER_LEN];
    while off < end {
        file.read_exact_at(&mut h, off).map_err(StoreError::io("read journal", path))?;
        f(off, &h);
        off += framed_len(&h);
    }
    Ok(off)
}

/// A framed record checked whole (`check_framed`).
#[derive(Debug)]
pub struct Framed<'a> {
    pub data_version: u32,
    pub kind: Kind,
    pub payload_crc: u32,
    pub payload: &'a [u8],
}

impl Framed<'_> {
    /// Its length, header included.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload.len()
    }
}

/// Why bytes are not a whole valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFramed {
    Cut,
    HeaderChecksum,
    PayloadChecksum,
    UnknownKind(u8),
}

impl std::fmt::Display for NotFramed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotFramed::Cut => write!(f, "record cut short"),
            NotFramed::HeaderChecksum => write!(f, "record header checksum mismatch"),
            NotFramed::PayloadChecksum => write!(f, "record payload checksum mismatch"),
            NotFramed::UnknownKind(k) => write!(f, "unknown record kind {k}"),
        }
    }
}

/// Checks the record at the start of `buf` (more may follow): its header's checksum, its
/// payload within `buf`, the payload's checksum and its kind.
pub fn check_framed(buf: &[u8]) -> std::result::Result<Framed<'_>, NotFramed> {
    let h = buf.get(..RECORD_HEADER_LEN).ok_or(NotFramed::Cut)?;
    let rh = parse_record_header(h).ok_or(NotFramed::HeaderChecksum)?;
    let payload = buf.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + rh.len as usize).ok_or(NotFramed::Cut)?;
    if crc32c::crc32c(payload) != rh.payload_crc {
        return Err(NotFramed::PayloadChecksum);
    }
    let kind = Kind::from_byte(rh.kind).ok_or(NotFramed::UnknownKind(rh.kind))?;
    Ok(Framed { data_version: rh.data_version, kind, payload_crc: rh.payload_crc, payload })
}

/// The fields of a record header whose own checksum holds.
struct RecordHeader {
    len: u32,
    data_version: u32,
    kind: u8,
    payload_crc: u32,
}

fn parse_record_header(h: &[u8]) -> Option<RecordHeader> {
    if u32le(&h[13..17]) != crc32c::crc32c(&h[0..13]) {
        return None;
    }
    Some(RecordHeader {
        len: u32le(&h[0..4]),
        data_version: u32le(&h[4..8]),
        kind: h[8],
        payload_crc: u32le(&h[9..13]),
    })
}

/// Splits a payload into its statements.
pub fn decode_statements(payload: &[u8]) -> std::result::Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err("statement length cut short".into());
        }
        let n = u32le(rest) as usize;
        rest = &rest[4..];
        if n > rest.len() {
            return Err("statement longer than its record".into());
        }
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "statement is not UTF-8".to_string())?;
        out.push(s);
        rest = &rest[n..];
    }
    Ok(out)
}

#[derive(Debug)]
pub struct Record {
    pub offset: u64,
    pub data_version: u32,
    pub kind: Kind,
    /// CRC32C of the payload, as the header says and the payload matched.
    pub payload_crc: u32,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN as u64 + self.payload.len() as u64
    }

    /// The CRC its header carries (bytes 13..17), from the fields it covers: what a copy's
    /// end is named by (`header_crc`).
    pub fn header_crc(&self) -> u32 {
        let mut h = [0u8; 13];
        h[0..4].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&self.data_version.to_le_bytes());
        h[8] = self.kind as u8;
        h[9..13].copy_from_slice(&self.payload_crc.to_le_bytes());
        crc32c::crc32c(&h)
    }

    /// The plaintext payload: as stored, or opened when `payloads` is sealed. A seal that
    /// does not open is damage at this record (the key was checked before by fingerprint).
    pub fn plaintext<'a>(&'a mut self, path: &Path, payloads: Payloads) -> Result<&'a [u8]> {
        match payloads {
            Payloads::Plain => Ok(&self.payload),
            Payloads::Sealed { sealer, generation } => {
                let place = RecordPlace {
                    generation,
                    offset: self.offset,
                    data_version: self.data_version,
                    kind: self.kind as u8,
                };
                let offset = self.offset;
                sealer.open_record(&mut self.payload, place).map(|p| &*p).map_err(|_| StoreError::Damaged {
                    path: path.into(),
                    offset,
                    what: "sealed record fails authentication: moved or swapped, copied from another backup or \
                           generation, or altered"
                        .into(),
                })
            }
        }
    }
}

/// Re-encodes whole framed records `src` (at file offset `src_at`, stored as `from`) for
/// file offset `dst_at` in a journal stored as `to`. Sealed to sealed keeps every length,
/// so offsets shift by `dst_at - src_at` exactly. `path` names the source for errors.
pub fn transcode(path: &Path, src: &[u8], src_at: u64, from: Payloads, dst_at: u64, to: Payloads) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(src.len() + src.len() / 8);
    let mut p = 0usize;
    while p < src.len() {
        let off = src_at + p as u64;
        let damaged = |what: String| StoreError::Damaged { path: path.into(), offset: off, what };
        let f = check_framed(&src[p..]).map_err(|e| match e {
            NotFramed::Cut => damaged("record runs past the copied range".into()),
            e => damaged(e.to_string()),
        })?;
        let (n, data_version, kind) = (f.record_len(), f.data_version, f.kind);
        let mut rec = Record {
            offset: off,
            data_version: f.data_version,
            kind: f.kind,
            payload_crc: f.payload_crc,
            payload: f.payload.to_vec(),
        };
        let plain = rec.plaintext(path, from)?;
        let stmts = decode_statements(plain).map_err(damaged)?;
        let at = dst_at + out.len() as u64;
        encode_record_as(&mut out, at, data_version, kind, &stmts, to);
        p += n;
    }
    Ok(out)
}

/// The length of the longest run of whole records at the start of `buf` (by their
/// headers' lengths; checksums are checked when they are read).
pub fn whole_records_len(buf: &[u8]) -> usize {
    let mut p = 0usize;
    while let Some(h) = buf.get(p..p + RECORD_HEADER_LEN) {
        let n = framed_len(h) as usize;
        if p + n > buf.len() {
            break;
        }
        p += n;
    }
    p
}

/// What a read at the reader's position found.
enum Found {
    Whole(Record),
    /// The file shrank under the reader: the data ends here.
    End,
    /// Not a whole valid record: (offset, why).
    Invalid(u64, &'static str),
}

/// Reads a journal's records in order, up to the length the file had when opened.
pub struct JournalReader {
    path: PathBuf,
    file: BufReader<File>,
    pub header: Header,
    pos: u64,
    len: u64,
    /// Set when reading ended at a torn tail: (offset, bytes after it).
    pub torn_tail: Option<(u64, u64)>,
}

impl JournalReader {
    pub fn open(path: &Path) -> Result<JournalReader> {
        let file = File::open(path).map_err(StoreError::io("open journal", path))?;
        JournalReader::from_file(path, file)
    }

    pub fn from_file(path: &Path, mut file: File) -> Result<JournalReader> {
        let len = file.metadata().map_err(StoreError::io("stat", path))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        file.seek(SeekFrom::Start(0)).map_err(StoreError::io("seek", path))?;
        let n = read_full(&mut file, &mut h).map_err(StoreError::io("read journal header", path))?;
        let header = Header::decode(path, &h[..n])?;
        Ok(JournalReader {
            path: path.into(),
            file: BufReader::with_capacity(1 << 16, file),
            header,
            pos: HEADER_LEN,
            len,
            torn_tail: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Reads no further than `len` (a record boundary known to the caller).
    pub fn limit(&mut self, len: u64) {
        self.len = self.len.min(len);
    }
    /// Bytes of the file this reader covers.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len <= HEADER_LEN
    }
    /// Offset of the next record (the end of the valid data once reading is done).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next valid record, or None at the end (clean, or a torn tail: see `torn_tail`).
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.pos >= self.len || self.torn_tail.is_some() {
            return Ok(None);
        }
        match self.read_record()? {
            Found::Whole(rec) => Ok(Some(rec)),
            Found::End => Ok(None),
            // The buffer may hold bytes from before the writer finished this record (a
            // reader beside a live writer reads into its zero-filled room): read it again.
            Found::Invalid(..) => match self.reread()? {
                Found::Whole(rec) => Ok(Some(rec)),
                Found::End => Ok(None),
                Found::Invalid(off, what) => self.end_at(off, what),
            },
        }
    }

    /// Reads the record at `pos` again from the file, not the buffer.
    fn reread(&mut self) -> Result<Found> {
        self.file.seek(SeekFrom::Start(self.pos)).map_err(StoreError::io("seek", &self.path))?;
        self.read_record()
    }

    fn read_record(&mut self) -> Result<Found> {
        let off = self.pos;
        if self.len - off < RECORD_HEADER_LEN as u64 {
            return Ok(Found::Invalid(off, "record header cut short"));
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        if let Err(e) = self.file.read_exact(&mut h) {
            return self.cut_short(off, e);
        }
        let Some(rh) = parse_record_header(&h) else {
            return Ok(Found::Invalid(off, "record header checksum mismatch"));
        };
        let end = off + RECORD_HEADER_LEN as u64 + rh.len as u64;
        if rh.len > MAX_PAYLOAD || end > self.len {
            return Ok(Found::Invalid(off, "record runs past the end of the file"));
        }
        let mut payload = vec![0u8; rh.len as usize];
        if let Err(e) = self.file.read_exact(&mut payload) {
            return self.cut_short(off, e);
        }
        if crc32c::crc32c(&payload) != rh.payload_crc {
            return Ok(Found::Invalid(off, "record payload checksum mismatch"));
        }
        let Some(kind) = Kind::from_byte(rh.kind) else {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                offset: off,
                what: format!("unknown record kind {} (written by a newer cln-backup?)", rh.kind),
            });
        };
        self.pos = end;
        Ok(Found::Whole(Record {
            offset: off,
            data_version: rh.data_version,
            kind,
            payload_crc: rh.payload_crc,
            payload,
        }))
    }

    /// A read at `off` came up short. If the file shrank since it was opened, the writer
    /// dropped a transaction lightningd never committed (it truncates at a record
    /// boundary), so the data ends at `off`; anything else is an I/O error.
    fn cut_short(&mut self, off: u64, e: std::io::Error) -> Result<Found> {
        let now = self.file.get_ref().metadata().map(|m| m.len()).unwrap_or(self.len);
        if e.kind() == std::io::ErrorKind::UnexpectedEof && now < self.len {
            self.len = off;
            self.pos = off;
            return Ok(Found::End);
        }
        Err(StoreError::io("read journal", &self.path)(e))
    }

    /// Reading stops at `off`: the end of the data if only zeros follow (the writer's
    /// preallocation), else a torn tail if no valid record follows, else damage.
    fn end_at(&mut self, off: u64, what: &str) -> Result<Option<Record>> {
        if self.zeros_from(off)? {
            self.len = off;
            return Ok(None);
        }
        if let Some(later) = self.find_valid_record_after(off)? {
            // A live writer appends in order: if the record at `off` is whole by now, the
            // later one came after it, and nothing is damaged.
            match self.reread()? {
                Found::Whole(rec) => return Ok(Some(rec)),
                Found::End => return Ok(None),
                Found::Invalid(..) => {}
            }
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                offset: off,
                what: format!("{what}, but a valid record follows at offset {later}"),
            });
        }
        // Position stays at `off`: the valid data ends there, and the writer cuts there.
        self.torn_tail = Some((off, self.len - off));
        Ok(None)
    }

    /// Whether the file holds only zero bytes from `off` to the end this reader covers.
    fn zeros_from(&self, off: u64) -> Result<bool> {
        let file = self.file.get_ref();
        let mut buf = vec![0u8; (1 << 16).min(self.len.saturating_sub(off)) as usize];
        let mut at = off;
        while at < self.len {
            let n = ((self.len - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at).map_err(StoreError::io("read journal", &self.path))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        Ok(true)
    }

    fn find_valid_record_after(&self, off: u64) -> Result<Option<u64>> {
        let file = self.file.get_ref();
        let io = StoreError::io("read journal", &self.path);
        let mut buf = Vec::new();
        let tail_len = (self.len - off) as usize;
        buf.resize(tail_len, 0);
        // Only the part after `off` matters; a torn tail is one write, so this is small
        // unless the file is damaged.
        file.read_exact_at(&mut buf, off).map_err(io)?;
        // A record's kind byte (its 9th) is never zero: none starts in the zero padding.
        let last = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let starts = last.saturating_sub(8).min(tail_len.saturating_sub(RECORD_HEADER_LEN - 1));
        for p in 1..starts {
            let Some(rh) = parse_record_header(&buf[p..p + RECORD_HEADER_LEN]) else {
                continue;
            };
            let start = p + RECORD_HEADER_LEN;
            let end = start as u64 + rh.len as u64;
            if end <= tail_len as u64 && crc32c::crc32c(&buf[start..end as usize]) == rh.payload_crc {
                return Ok(Some(off + p as u64));
            }
        }
        Ok(None)
    }
}

/// Reads until `buf` is full or the file ends; how much it read.
pub fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_framed_tells_each_fault() {
        let mut r = Vec::new();
        encode_record(&mut r, 9, Kind::Transaction, &["INSERT INTO t VALUES (1)"]);
        let more = [r.clone(), b"next".to_vec()].concat();
        let f = check_framed(&more).unwrap();
        assert_eq!((f.data_version, f.kind, f.record_len()), (9, Kind::Transaction, r.len()));
        assert_eq!(header_crc(&r), u32le(&r[13..17]));
        assert_eq!(framed_len(&r) as usize, r.len());
        assert_eq!(check_framed(&r[..10]).unwrap_err(), NotFramed::Cut);
        assert_eq!(check_framed(&r[..r.len() - 1]).unwrap_err(), NotFramed::Cut);
        let mut bad = r.clone();
        bad[5] ^= 1;
        assert_eq!(check_framed(&bad).unwrap_err(), NotFramed::HeaderChecksum);
        let mut bad = r.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(check_framed(&bad).unwrap_err(), NotFramed::PayloadChecksum);
        let mut bad = r.clone();
        bad[8] = 7;
        let crc = crc32c::crc32c(&bad[0..13]);
        bad[13..17].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_framed(&bad).unwrap_err().to_string(), "unknown record kind 7");
    }
    use std::fs::OpenOptions;
    use std::io::Write;

    fn journal(records: &[(u32, Kind, Vec<&str>)]) -> (tempfile::TempDir, PathBuf, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut bytes = Header { generation: 1, base: Base::Empty, sealed: false }.encode().to_vec();
        let mut offs = vec![];
        for (v, k, w) in records {
            offs.push(bytes.len() as u64);
            encode_record(&mut bytes, *v, *k, w);
        }
        File::create(&p).unwrap().write_all(&bytes).unwrap();
        (dir, p, offs)
    }

    /// Every record, and the torn tail (offset, bytes) if any.
    type ReadAll = (Vec<Record>, Option<(u64, u64)>);

    fn read_all(p: &Path) -> Result<ReadAll> {
        let mut r = JournalReader::open(p)?;
        let mut v = vec![];
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok((v, r.torn_tail))
    }

    fn sample() -> Vec<(u32, Kind, Vec<&'static str>)> {
        vec![
            (1, Kind::Transaction, vec!["CREATE TABLE t(a)", "INSERT INTO t VALUES (1)"]),
            (1, Kind::Outside, vec!["PRAGMA foreign_keys = OFF;"]),
            (2, Kind::Transaction, vec!["INSERT INTO t VALUES ('é')"]),
        ]
    }

    #[test]
    fn roundtrip() {
        let (_d, p, offs) = journal(&sample());
        let (recs, torn) = read_all(&p).unwrap();
        assert!(torn.is_none());
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1].kind, Kind::Outside);
        assert_eq!(recs[2].offset, offs[2]);
        assert_eq!(decode_statements(&recs[2].payload).unwrap(), vec!["INSERT INTO t VALUES ('é')"]);
        assert_eq!(decode_statements(&recs[0].payload).unwrap().len(), 2);
    }

    #[test]
    fn every_truncation_of_last_record_is_a_torn_tail() {
        let (_d, p, offs) = journal(&sample());
        let full = std::fs::read(&p).unwrap();
        for cut in offs[2]..full.len() as u64 {
            std::fs::write(&p, &full[..cut as usize]).unwrap();
            let (recs, torn) = read_all(&p).unwrap();
            assert_eq!(recs.len(), 2, "cut at {cut}");
            assert_eq!(torn.map(|t| t.0), if cut == offs[2] { None } else { Some(offs[2]) });
            let mut r = JournalReader::open(&p).unwrap();
            while r.next_record().unwrap().is_some() {}
            assert_eq!(r.position(), offs[2], "valid data ends before the torn record");
        }
    }

    #[test]
    fn a_transaction_dropped_while_reading_ends_the_data_there() {
        let big = "x".repeat(40_000);
        let (_d, p, offs) = journal(&[
            (1, Kind::Transaction, vec![big.as_str()]),
            (2, Kind::Transaction, vec![big.as_str()]),
            (3, Kind::Transaction, vec![big.as_str()]),
        ]);
        for cut in [offs[1], offs[2]] {
            let full = std::fs::read(&p).unwrap();
            let mut r = JournalReader::open(&p).unwrap();
            assert_eq!(r.next_record().unwrap().unwrap().data_version, 1);
            // the writer drops the last transactions, as it does when lightningd never committed them
            OpenOptions::new().write(true).open(&p).unwrap().set_len(cut).unwrap();
            let mut n = 1;
            while r.next_record().unwrap().is_some() {
                n += 1;
            }
            assert_eq!((r.position(), r.torn_tail), (cut, None));
            assert_eq!(n, offs.iter().filter(|&&o| o < cut).count());
            std::fs::write(&p, &full).unwrap();
        }
    }

    #[test]
    fn zeroed_tail_is_torn() {
        let (_d, p, offs) = journal(&sample());
        let mut full = std::fs::read(&p).unwrap();
        for b in &mut full[offs[2] as usize + 5..] {
            *b = 0;
        }
        std::fs::write(&p, &full).unwrap();
        let (recs, torn) = read_all(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(torn.unwrap().0, offs[2]);
    }

    #[test]
    fn zero_padding_is_the_end_and_a_torn_record_in_it_is_a_torn_tail() {
        let (_d, p, offs) = journal(&sample());
        let data = std::fs::read(&p).unwrap();
        let mut padded = data.clone();
        padded.resize(data.len() + 3 * 65536 + 5, 0);
        std::fs::write(&p, &padded).unwrap();
        let mut r = JournalReader::open(&p).unwrap();
        let mut n = 0;
        while r.next_record().unwrap().is_some() {
            n += 1;
        }
        assert_eq!((n, r.position(), r.torn_tail, r.len()), (3, data.len() as u64, None, data.len() as u64));
        // a record cut short inside the padding (a crash mid-append): torn, at its start
        for cut in [offs[2] as usize + 3, offs[2] as usize + 20, data.len() - 1] {
            let mut torn = data[..cut].to_vec();
            torn.resize(padded.len(), 0);
            std::fs::write(&p, &torn).unwrap();
            let (recs, t) = read_all(&p).unwrap();
            assert_eq!((recs.len(), t.map(|t| t.0)), (2, Some(offs[2])), "cut at {cut}");
        }
        // zeros over a record that a valid one follows: damage, not padding
        let mut holed = padded.clone();
        holed[offs[1] as usize..offs[2] as usize].fill(0);
        std::fs::write(&p, &holed).unwrap();
        let e = read_all(&p).unwrap_err();
        assert!(matches!(e, StoreError::Damaged { offset, .. } if offset == offs[1]), "{e}");
        // stray bytes after the padding are not the end of the data either
        let mut stray = padded;
        *stray.last_mut().unwrap() = 7;
        std::fs::write(&p, &stray).unwrap();
        let (recs, t) = read_all(&p).unwrap();
        assert_eq!((recs.len(), t.map(|t| t.0)), (3, Some(data.len() as u64)));
    }

    #[test]
    fn flipped_byte_before_tail_is_damage_naming_offset() {
        let (_d, p, offs) = journal(&sample());
        let full = std::fs::read(&p).unwrap();
        // every byte of records 0 and 1, header and payload alike
        for i in offs[0]..offs[2] {
            let mut bad = full.clone();
            bad[i as usize] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            let err = read_all(&p).unwrap_err();
            let StoreError::Damaged { offset, .. } = err else { panic!("byte {i}: {err}") };
            assert!(offset == offs[0] || offset == offs[1], "byte {i}: offset {offset}");
        }
    }

    #[test]
    fn header_damage_and_foreign_files() {
        let (_d, p, _) = journal(&sample());
        let mut full = std::fs::read(&p).unwrap();
        full[13] ^= 1;
        std::fs::write(&p, &full).unwrap();
        assert!(matches!(read_all(&p).unwrap_err(), StoreError::Damaged { offset: 0, .. }));
        std::fs::write(&p, b"SQLite format 3\0 and more bytes than a header needs").unwrap();
        assert!(matches!(read_all(&p).unwrap_err(), StoreError::NotBackup { .. }));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(read_all(&p).unwrap_err(), StoreError::NotBackup { .. }));
    }

    #[test]
    fn unknown_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut bytes = Header { generation: 1, base: Base::Snapshot(7), sealed: false }.encode().to_vec();
        let off = bytes.len();
        encode_record(&mut bytes, 8, Kind::Transaction, &["x"]);
        bytes[off + 8] = 9;
        let crc = crc32c::crc32c(&bytes[off..off + 13]);
        bytes[off + 13..off + 17].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = read_all(&p).unwrap_err();
        assert!(e.to_string().contains("unknown record kind 9"), "{e}");
    }
}
