//! What the two sides say inside the encrypted channel. One request, then its answer(s), in
//! turn; integers little-endian; `bytes` = u32 length + bytes; `str` = bytes in UTF-8.
//!
//! ```text
//! client -> server                                 server -> client
//! 0x01 Hello    u32 proto, u8 writer(0/1)          0x81 State (below) | 0xFF Error
//! 0x02 Append   u32 dv, u8 kind, u8 replace_last,  0x81 State after it, sent after fdatasync
//!               bytes record (framed by journal::encode_record, maybe sealed)
//! 0x03 GetState                                    0x81 State
//! 0x04 Download u64 limit (0: all)                 0x82 Manifest, 0x83 Chunk..., 0x84 End
//! 0x05 Install  u64 from_generation, u32 base,     (then the client sends 0x83 Chunk... 0x84
//!               u64 fold_end, u64 snapshot_len,     End with the snapshot) 0x81 State
//!               bytes tail
//! 0x06 Ping                                        0x85 Pong
//! 0x07 Stage    u64 from_generation, u32 base,     (then 0x83 Chunk... 0x84 End with the
//!               u64 snapshot_len                    snapshot, kept for an Install) 0x81 State
//! 0x08 Tail     u64 from                           0x83 Chunk: journal bytes [from, end)
//! 0x09 GetMeta                                     0x86 Meta: bytes backup.json (empty: none)
//! 0x0A PutMeta  bytes backup.json                  0x81 State
//! 0x0B Reseed   u64 generation, u32 base,          (then 0x83 Chunk... 0x84 End with the
//!               u64 journal_len, bytes backup.json  journal) 0x81 State
//!
//! State    = u64 generation, u64 journal_len, u32 version, u8 droppable,
//!            u64 last_tx_offset (0: none), u32 tail (header CRC of the last record, 0: none)
//! Manifest = u64 generation, u32 base_version, u64 snapshot_len, u64 journal_len;
//!            then Chunks: the snapshot's bytes, then the journal's
//! Error    = u16 code, str message
//! ```
//!
//! Install with snapshot_len 0 takes the snapshot an earlier Stage of the same generation
//! and base left (no Chunks follow). `tail`, when not empty, is the journal from `fold_end`
//! to its end, sealed by the node for the new generation (a server holds no key, so cannot
//! move sealed records itself); it must cover exactly what the journal holds past
//! `fold_end` at the switch. PutMeta replaces the backup's backup.json (sealed, backup id,
//! key fingerprint, where the key was): any metadata into an empty backup (the node's
//! init), else only the same backup id and sealing with more filled in. The server never
//! reads a payload or holds a key: it checks framing, CRCs and the version rules.
//!
//! Reseed replaces the whole backup with another copy's generation, as it is: the journal
//! that follows, and the snapshot an earlier Stage (from_generation = generation - 1) left
//! when the generation has one. Only the writer session may send it. It is refused unless
//! the backup.json sent is the same backup's (same id and sealing), the generation would be
//! current (not below the backup's, and at the same generation and base only with the same
//! snapshot), and it holds at least the data_version the backup holds: a copy is never
//! rolled back. The switch is one rename: the backup is either as before or the new one.
//!
//! A client that is not paired gets no message at all: the server closes after the handshake.

pub const PROTO: u32 = 2;

/// Error codes (u16 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request made no sense (bad bytes, wrong order).
    Protocol = 1,
    /// The version rules refuse this append: halt (the message is the halt reason).
    Versions = 2,
    /// The server's disk failed; the message says where and what to do.
    Storage = 3,
    /// Another connection is this backup's writer.
    Busy = 4,
    /// This needs a writer session (Hello with writer=1).
    NotWriter = 5,
    /// An install that does not fit the backup as it is now.
    Refused = 6,
}

impl Code {
    pub fn from_u16(c: u16) -> Code {
        match c {
            2 => Code::Versions,
            3 => Code::Storage,
            4 => Code::Busy,
            5 => Code::NotWriter,
            6 => Code::Refused,
            _ => Code::Protocol,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    pub generation: u64,
    pub journal_len: u64,
    pub version: u32,
    pub droppable: bool,
    pub last_tx_offset: u64,
    pub tail: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub generation: u64,
    pub base_version: u32,
    pub snapshot_len: u64,
    pub journal_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello { proto: u32, writer: bool },
    Append { data_version: u32, kind: u8, replace_last: bool, record: Vec<u8> },
    GetState,
    Download { limit: u64 },
    Install { from_generation: u64, base_version: u32, fold_end: u64, snapshot_len: u64, tail: Vec<u8> },
    Ping,
    Stage { from_generation: u64, base_version: u32, snapshot_len: u64 },
    Tail { from: u64 },
    GetMeta,
    PutMeta(Vec<u8>),
    Reseed { generation: u64, base_version: u32, journal_len: u64, meta: Vec<u8> },
    Chunk(Vec<u8>),
    End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    State(State),
    Manifest(Manifest),
    Chunk(Vec<u8>),
    End,
    Pong,
    Meta(Vec<u8>),
    Error { code: Code, message: String },
}

struct Out(Vec<u8>);
impl Out {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

struct In<'a>(&'a [u8]);
impl In<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("message cut short".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| "u16")?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "u32")?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "u64")?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes at the end of a message", self.0.len()))
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::new());
        match self {
            Request::Hello { proto, writer } => o.u8(0x01).u32(*proto).u8(*writer as u8),
            Request::Append { data_version, kind, replace_last, record } => {
                o.0.reserve(record.len() + 16);
                o.u8(0x02).u32(*data_version).u8(*kind).u8(*replace_last as u8).bytes(record)
            }
            Request::GetState => o.u8(0x03),
            Request::Download { limit } => o.u8(0x04).u64(*limit),
            Request::Install { from_generation, base_version, fold_end, snapshot_len, tail } => {
                o.u8(0x05).u64(*from_generation).u32(*base_version).u64(*fold_end).u64(*snapshot_len).bytes(tail)
            }
            Request::Ping => o.u8(0x06),
            Request::Stage { from_generation, base_version, snapshot_len } => {
                o.u8(0x07).u64(*from_generation).u32(*base_version).u64(*snapshot_len)
            }
            Request::Tail { from } => o.u8(0x08).u64(*from),
            Request::GetMeta => o.u8(0x09),
            Request::PutMeta(b) => o.u8(0x0A).bytes(b),
            Request::Reseed { generation, base_version, journal_len, meta } => {
                o.u8(0x0B).u64(*generation).u32(*base_version).u64(*journal_len).bytes(meta)
            }
            Request::Chunk(b) => o.u8(0x83).bytes(b),
            Request::End => o.u8(0x84),
        };
        o.0
    }

    pub fn decode(b: &[u8]) -> Result<Request, String> {
        let mut i = In(b);
        let r = match i.u8()? {
            0x01 => Request::Hello { proto: i.u32()?, writer: i.u8()? != 0 },
            0x02 => Request::Append {
                data_version: i.u32()?,
                kind: i.u8()?,
                replace_last: i.u8()? != 0,
                record: i.bytes()?,
            },
            0x03 => Request::GetState,
            0x04 => Request::Download { limit: i.u64()? },
            0x05 => Request::Install {
                from_generation: i.u64()?,
                base_version: i.u32()?,
                fold_end: i.u64()?,
                snapshot_len: i.u64()?,
                tail: i.bytes()?,
            },
            0x06 => Request::Ping,
            0x07 => Request::Stage { from_generation: i.u64()?, base_version: i.u32()?, snapshot_len: i.u64()? },
            0x08 => Request::Tail { from: i.u64()? },
            0x09 => Request::GetMeta,
            0x0A => Request::PutMeta(i.bytes()?),
            0x0B => Request::Reseed {
                generation: i.u64()?,
                base_version: i.u32()?,
                journal_len: i.u64()?,
                meta: i.bytes()?,
            },
            0x83 => Request::Chunk(i.bytes()?),
            0x84 => Request::End,
            t => return Err(format!("unknown request 0x{t:02x}")),
        };
        i.end()?;
        Ok(r)
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Out(Vec::new());
        match self {
            Reply::State(s) => o
                .u8(0x81)
                .u64(s.generation)
                .u64(s.journal_len)
                .u32(s.version)
                .u8(s.droppable as u8)
                .u64(s.last_tx_offset)
                .u32(s.tail),
            Reply::Manifest(m) => {
                o.u8(0x82).u64(m.generation).u32(m.base_version).u64(m.snapshot_len).u64(m.journal_len)
            }
            Reply::Chunk(b) => o.u8(0x83).bytes(b),
            Reply::End => o.u8(0x84),
            Reply::Pong => o.u8(0x85),
            Reply::Meta(b) => o.u8(0x86).bytes(b),
            Reply::Error { code, message } => o.u8(0xFF).u16(*code as u16).bytes(message.as_bytes()),
        };
        o.0
    }

    pub fn decode(b: &[u8]) -> Result<Reply, String> {
        let mut i = In(b);
        let r = match i.u8()? {
            0x81 => Reply::State(State {
                generation: i.u64()?,
                journal_len: i.u64()?,
                version: i.u32()?,
                droppable: i.u8()? != 0,
                last_tx_offset: i.u64()?,
                tail: i.u32()?,
            }),
            0x82 => Reply::Manifest(Manifest {
                generation: i.u64()?,
                base_version: i.u32()?,
                snapshot_len: i.u64()?,
                journal_len: i.u64()?,
            }),
            0x83 => Reply::Chunk(i.bytes()?),
            0x84 => Reply::End,
            0x85 => Reply::Pong,
            0x86 => Reply::Meta(i.bytes()?),
            0xFF => Reply::Error {
                code: Code::from_u16(i.u16()?),
                message: String::from_utf8_lossy(&i.bytes()?).into_owned(),
            },
            t => return Err(format!("unknown reply 0x{t:02x}")),
        };
        i.end()?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_roundtrips() {
        let reqs = [
            Request::Hello { proto: PROTO, writer: true },
            Request::Append { data_version: 7, kind: 1, replace_last: true, record: vec![1, 2, 3] },
            Request::GetState,
            Request::Download { limit: 99 },
            Request::Install { from_generation: 3, base_version: 9, fold_end: 100, snapshot_len: 5, tail: vec![7] },
            Request::Ping,
            Request::Stage { from_generation: 3, base_version: 9, snapshot_len: 5 },
            Request::Tail { from: 40 },
            Request::GetMeta,
            Request::PutMeta(b"{}".to_vec()),
            Request::Reseed { generation: 4, base_version: 8, journal_len: 77, meta: b"{}".to_vec() },
            Request::Chunk(vec![9; 10]),
            Request::End,
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        let st = State { generation: 2, journal_len: 77, version: 5, droppable: true, last_tx_offset: 32, tail: 9 };
        let reps = [
            Reply::State(st),
            Reply::Manifest(Manifest { generation: 1, base_version: 2, snapshot_len: 3, journal_len: 4 }),
            Reply::Chunk(vec![1]),
            Reply::End,
            Reply::Pong,
            Reply::Meta(b"{}".to_vec()),
            Reply::Error { code: Code::Busy, message: "x".into() },
        ];
        for r in reps {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
        assert!(Request::decode(&[0x02, 1]).unwrap_err().contains("cut short"));
        assert!(Request::decode(&[0x42]).unwrap_err().contains("unknown request"));
        assert!(Request::decode(&[0x03, 0]).unwrap_err().contains("unexpected bytes"));
        // the Python protocol's RESTORE is nothing here
        assert!(Request::decode(b"RESTORE").is_err());
    }
}
