//! The Python backup plugin's file format ("v1"): read, restore, verify, and convert.
//!
//! ```text
//! header, 512 bytes, big-endian, rewritten in place after every append (never fsynced):
//!   u32 format = 1 | u32 version | u64 end of data | u32 prev_version | u64 offset of the
//!   last record | u64 version count | zero padding
//! records from byte 512:
//!   u32 payload length | u32 data_version | u8 kind | payload
//!   kind 1: a db_write call, its statements joined by NUL bytes
//!   kind 2: a snapshot, the raw bytes of a SQLite database
//! ```
//!
//! Bytes after the header's end offset are leftovers of a rewind and do not count. v1 has no
//! checksums; what can be checked is: the header's offsets against the file, every record's
//! length against the end, the kinds, the version chain, UTF-8, and the integrity of the
//! restored database. Backups written before Core Lightning PR 4090 hold statements that
//! lost a space before `WHERE`; they get the same fix-up the Python plugin applies.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apply::{finish_db, open_build_db, resolve_dest, sql_err, Applier, Summary};
use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::journal::{self, Kind};
use crate::versions::{self, Decision, Position};

pub const HEADER_LEN: u64 = 512;

/// True when `path` is a regular file starting with a v1 header (u32 big-endian 1).
pub fn is_v1_file(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return false;
    }
    let mut h = [0u8; 4];
    f.read_exact(&mut h).is_ok() && u32::from_be_bytes(h) == 1
}

#[derive(Debug, Clone, Copy)]
pub struct V1Header {
    pub version: u32,
    pub end: u64,
    pub prev_version: u32,
    pub last: u64,
    pub count: u64,
}

pub enum V1Payload {
    Statements(Vec<String>),
    /// A database image: its offset and length in the file.
    Snapshot {
        offset: u64,
        len: u64,
    },
}

pub struct V1Record {
    pub offset: u64,
    pub version: u32,
    pub payload: V1Payload,
}

pub struct V1Reader {
    path: PathBuf,
    file: BufReader<File>,
    pub header: V1Header,
    pos: u64,
}

fn damaged(path: &Path, offset: u64, what: String) -> StoreError {
    StoreError::Damaged { path: path.into(), offset, what }
}

impl V1Reader {
    pub fn open(path: &Path) -> Result<V1Reader> {
        let mut f = File::open(path).map_err(StoreError::io("open", path))?;
        let len = f.metadata().map_err(StoreError::io("stat", path))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        f.read_exact(&mut h).map_err(|_| damaged(path, 0, format!("v1 header cut short: the file has {len} bytes")))?;
        let u32at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().unwrap_or_default());
        if u32at(0) != 1 {
            return Err(StoreError::NotBackup { path: path.into(), what: format!("unknown v1 format {}", u32at(0)) });
        }
        let header =
            V1Header { version: u32at(4), end: u64at(8), prev_version: u32at(16), last: u64at(20), count: u64at(28) };
        if header.end > len || header.end < HEADER_LEN {
            return Err(damaged(
                path,
                0,
                format!(
                    "v1 header says the data ends at offset {}, but the file has {len} bytes (truncated?)",
                    header.end
                ),
            ));
        }
        if header.end > HEADER_LEN && (header.last < HEADER_LEN || header.last >= header.end) {
            return Err(damaged(
                path,
                0,
                format!(
                    "v1 header puts the last record at offset {}, outside the data (512..{})",
                    header.last, header.end
                ),
            ));
        }
        Ok(V1Reader { path: path.into(), file: BufReader::with_capacity(1 << 16, f), header, pos: HEADER_LEN })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next record, or None after the last one the header counts.
    pub fn next_record(&mut self) -> Result<Option<V1Record>> {
        let (off, end) = (self.pos, self.header.end);
        if off >= end {
            return Ok(None);
        }
        if end - off < 9 {
            return Err(damaged(
                &self.path,
                off,
                format!("truncated mid-record: {} bytes left for a 9-byte record header", end - off),
            ));
        }
        let mut h = [0u8; 9];
        self.file.seek(SeekFrom::Start(off)).map_err(StoreError::io("seek", &self.path))?;
        self.file.read_exact(&mut h).map_err(StoreError::io("read", &self.path))?;
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as u64;
        let version = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let rec_end = off + 9 + len;
        if rec_end > end {
            return Err(damaged(
                &self.path,
                off,
                format!("truncated mid-record: a {len}-byte record runs past the end of the data at {end}"),
            ));
        }
        let payload = match h[8] {
            1 => {
                let mut buf = vec![0u8; len as usize];
                self.file.read_exact(&mut buf).map_err(StoreError::io("read", &self.path))?;
                let mut stmts = vec![];
                for part in buf.split(|b| *b == 0) {
                    let s = std::str::from_utf8(part)
                        .map_err(|_| damaged(&self.path, off, "a statement is not UTF-8".into()))?;
                    stmts.push(fix_pre_4090(s));
                }
                V1Payload::Statements(stmts)
            }
            2 => V1Payload::Snapshot { offset: off + 9, len },
            k => {
                return Err(damaged(
                    &self.path,
                    off,
                    format!("record kind {k} is neither 1 (transaction) nor 2 (snapshot)"),
                ))
            }
        };
        self.pos = rec_end;
        if rec_end == end && (off != self.header.last || version != self.header.version) {
            return Err(damaged(
                &self.path,
                off,
                format!(
                    "the last record (version {version} at offset {off}) is not the one the header names \
                     (version {} at offset {})",
                    self.header.version, self.header.last
                ),
            ));
        }
        Ok(Some(V1Record { offset: off, version, payload }))
    }

    /// Copies a snapshot record's database image into `out`.
    pub fn copy_snapshot(&mut self, offset: u64, len: u64, out: &mut dyn Write) -> Result<()> {
        let f = self.file.get_mut();
        f.seek(SeekFrom::Start(offset)).map_err(StoreError::io("seek", &self.path))?;
        let mut head = [0u8; 16];
        let n = f.read(&mut head).map_err(StoreError::io("read", &self.path))?;
        if len < 100 || n < 16 || &head != b"SQLite format 3\0" {
            return Err(damaged(&self.path, offset, "snapshot record is not a SQLite database".into()));
        }
        out.write_all(&head).map_err(StoreError::io("write", &self.path))?;
        io::copy(&mut (&mut *f).take(len - 16), out).map_err(StoreError::io("copy snapshot", &self.path))?;
        self.file.seek(SeekFrom::Start(self.pos)).map_err(StoreError::io("seek", &self.path))?;
        Ok(())
    }
}

/// Core Lightning before PR 4090 expanded some statements without the space before WHERE.
pub fn fix_pre_4090(stmt: &str) -> String {
    let mut s = insert_space_before_where(stmt, "reserved_til=", "WHERE");
    s = insert_space_before_where(&s, "peer_id=", "WHERE channels.id=");
    s
}

fn insert_space_before_where(s: &str, key: &str, tail: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let mut rest = s;
    while let Some(i) = rest.find(key) {
        let after = &rest[i + key.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..i + key.len() + digits]);
        rest = &after[digits..];
        if digits > 0 && rest.starts_with(tail) {
            out.push(' ');
        }
    }
    out.push_str(rest);
    out
}

/// What was read and how far the database was built.
pub struct Built {
    pub summary: Summary,
    /// Records left out of the database (from `keep_tail_from` on), re-encoded.
    pub tail: Vec<u8>,
    /// Version of the database built (before the tail).
    pub db_version: u32,
    pub has_db: bool,
}

const UNVERIFIED: &str = "the Python plugin's format (v1) has no checksums, so a flipped byte inside a statement or \
                          a snapshot cannot be detected; lengths, offsets, kinds, the version chain and UTF-8 were \
                          checked, and a restore also runs PRAGMA integrity_check";

/// Reads a v1 file and builds its database into `tmp`, leaving out the last transaction
/// and what follows it when `keep_tail` is set (they go to `Built::tail`).
pub fn build(path: &Path, tmp: Option<&Path>, keep_tail: bool, progress: &mut dyn FnMut(u64, u64)) -> Result<Built> {
    let mut reader = V1Reader::open(path)?;
    let total = reader.header.end;
    // A first pass finds where the last transaction starts (records are in version order).
    let mut tail_from = u64::MAX;
    if keep_tail {
        let mut scan = V1Reader::open(path)?;
        while let Some(r) = scan.next_record()? {
            if let V1Payload::Statements(s) = &r.payload {
                if versions::classify(r.version, s) == Ok(Kind::Transaction) {
                    tail_from = r.offset;
                }
            }
        }
    }
    let mut summary = Summary { bytes: total, unverified: vec![UNVERIFIED.into()], ..Default::default() };
    let mut conn: Option<rusqlite::Connection> = None;
    let mut applier_tx = false;
    let mut pos: Option<Position> = None;
    let mut db_version = 0;
    let mut tail = vec![];
    while let Some(rec) = reader.next_record()? {
        summary.records += 1;
        match rec.payload {
            V1Payload::Snapshot { offset, len } => {
                if rec.offset >= tail_from {
                    return Err(damaged(path, rec.offset, "a snapshot after the last transaction".into()));
                }
                if let Some(tmp) = tmp {
                    if let Some(c) = conn.take() {
                        drop(c);
                    }
                    let mut f = File::create(tmp).map_err(StoreError::io("create", tmp))?;
                    reader.copy_snapshot(offset, len, &mut f)?;
                    f.sync_all().map_err(StoreError::io("fsync", tmp))?;
                    conn = Some(open_build_db(tmp)?);
                } else {
                    reader.copy_snapshot(offset, len, &mut io::sink())?;
                }
                summary.snapshot_version = Some(rec.version);
                pos = Some(Position { version: rec.version, droppable: false });
                db_version = rec.version;
            }
            V1Payload::Statements(stmts) => {
                let kind = versions::classify(rec.version, &stmts).map_err(|e| damaged(path, rec.offset, e))?;
                let p = pos.unwrap_or(Position { version: 0, droppable: false });
                if versions::decide(p, rec.version, kind) != Decision::Append {
                    return Err(damaged(
                        path,
                        rec.offset,
                        format!("version chain broken: version {} follows {}", rec.version, p.version),
                    ));
                }
                summary.statements += stmts.len() as u64;
                if kind == Kind::Transaction {
                    summary.transactions += 1;
                    pos = Some(Position { version: rec.version, droppable: true });
                }
                if rec.offset >= tail_from {
                    journal::encode_record(&mut tail, rec.version, kind, &stmts);
                } else if let Some(tmp) = tmp {
                    if conn.is_none() {
                        conn = Some(open_build_db(tmp)?);
                    }
                    let c = conn.as_ref().ok_or_else(|| sql_err(tmp)(rusqlite::Error::InvalidQuery))?;
                    let mut a = Applier::resume(c, applier_tx);
                    a.apply(kind, &stmts).map_err(|e| StoreError::Apply {
                        path: path.into(),
                        offset: rec.offset,
                        version: rec.version,
                        what: e.to_string(),
                    })?;
                    applier_tx = a.in_transaction();
                    if kind == Kind::Transaction {
                        db_version = rec.version;
                    }
                } else if kind == Kind::Transaction {
                    db_version = rec.version;
                }
            }
        }
        progress(reader.position(), total);
    }
    summary.version = pos.map_or(0, |p| p.version);
    if summary.records == 0 {
        return Err(StoreError::Invalid {
            path: path.into(),
            what: "the v1 backup holds no records: nothing to restore".into(),
        });
    }
    let has_db = conn.is_some();
    if let (Some(c), Some(tmp)) = (conn, tmp) {
        if applier_tx {
            c.execute_batch("COMMIT").map_err(sql_err(tmp))?;
        }
        finish_db(&c, tmp, db_version)?;
        c.close().map_err(|(_, e)| sql_err(tmp)(e))?;
    }
    Ok(Built { summary, tail, db_version, has_db })
}

pub fn restore(path: &Path, dest: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<(PathBuf, Summary)> {
    let started = Instant::now();
    let dest = resolve_dest(dest);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(StoreError::Exists { path: dest });
    }
    let mut summary = None;
    fsutil::write_atomic(&dest, false, |_, tmp| {
        summary = Some(build(path, Some(tmp), false, progress)?.summary);
        Ok(())
    })?;
    let mut summary = summary.unwrap_or_default();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok((dest, summary))
}

pub fn verify(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    let started = Instant::now();
    let mut s = build(path, None, false, progress)?.summary;
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_4090_fixup() {
        assert_eq!(
            fix_pre_4090("UPDATE outputs SET status=1, reserved_til=1891733WHERE prev_out_tx=x'ab'"),
            "UPDATE outputs SET status=1, reserved_til=1891733 WHERE prev_out_tx=x'ab'"
        );
        assert_eq!(
            fix_pre_4090("UPDATE channels SET peer_id=5WHERE channels.id=3"),
            "UPDATE channels SET peer_id=5 WHERE channels.id=3"
        );
        for ok in [
            "UPDATE outputs SET reserved_til=12 WHERE x",
            "reserved_til=WHERE",
            "peer_id=5WHERE other",
            "SELECT 'reserved_til=1WHERE' || é",
        ] {
            let fixed = fix_pre_4090(ok);
            if ok.contains("reserved_til=1WHERE") {
                assert_eq!(fixed, "SELECT 'reserved_til=1 WHERE' || é");
            } else {
                assert_eq!(fixed, ok);
            }
        }
    }
}
