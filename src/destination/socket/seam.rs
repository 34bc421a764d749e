//! The `socket:` destination behind the destination seam.

use std::time::SystemTime;

use super::client::{SocketDestination, SocketError};
use crate::destination::{BackgroundCompaction, Destination, GenerationFiles, Shared, Tip};
use crate::error::StoreError;
use crate::journal::Kind;
use crate::versions::Position;

impl From<SocketError> for StoreError {
    fn from(e: SocketError) -> StoreError {
        let hint = if e.is_versions() {
            "the backup server's copy disagrees with the node: see the message, and `backup-cli verify` the server's copy"
        } else {
            "check the network path to the backup server and that `backup-cli server` runs there"
        };
        StoreError::Remote { what: e.to_string(), hint, retryable: !e.is_versions() }
    }
}

/// A socket destination and what the plugin knows of its last record.
pub struct Socket {
    pub dest: SocketDestination,
    /// Payload CRC of the last record this process sent (0: unknown, as after a start).
    last_crc: u32,
    last_write: Option<SystemTime>,
}

impl Socket {
    pub fn new(dest: SocketDestination) -> Socket {
        Socket { dest, last_crc: 0, last_write: None }
    }
}

impl Destination for Socket {
    fn url(&self) -> &str {
        self.dest.url()
    }
    fn kind(&self) -> &'static str {
        "socket"
    }
    fn tip(&self) -> Tip {
        let st = self.dest.server_state();
        Tip {
            position: Position { version: st.version, droppable: st.droppable },
            generation: st.generation,
            journal_len: st.journal_len,
            last_crc: self.last_crc,
            last_tx_offset: st.droppable.then_some(st.last_tx_offset),
        }
    }
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError> {
        self.dest.append(data_version, kind, replace_last, record)?;
        self.last_crc = crate::journal::payload_crc(record);
        self.last_write = Some(SystemTime::now());
        Ok(())
    }
    fn bytes(&self) -> u64 {
        self.dest.server_state().journal_len
    }
    fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }
    fn details(&self) -> serde_json::Value {
        self.dest.status()
    }
    /// On a second connection: the node reads the backup back, folds it, uploads the new
    /// snapshot, and the server swaps generations; the writer's appends go on meanwhile.
    fn background_compaction(&self, _me: Shared) -> Option<BackgroundCompaction> {
        let url = self.dest.url().to_string();
        let reader = self.dest.reader();
        Some(Box::new(move |work| {
            let mut r = reader.connect().map_err(|e| format!("{url}: {e}"))?;
            match r.compact(work, &mut |_, _| {}) {
                Ok(Some(st)) => Ok(format!(
                    "{url}: compacted on the server into generation {} at data_version {} ({} journal bytes left)",
                    st.generation, st.version, st.journal_len
                )),
                Ok(None) => Ok(format!("{url}: nothing to fold yet")),
                Err(e) => Err(format!("{url}: {e}")),
            }
        }))
    }
    fn install(&mut self, _from: &GenerationFiles) -> Result<(), StoreError> {
        Err(StoreError::Remote {
            what: format!(
                "{}: a socket destination that lacks more than the records after its position cannot be brought up \
                 to date from another copy yet",
                self.dest.url()
            ),
            hint: "stop lightningd, remove this destination with backup-cli remove-destination, and init it again",
            retryable: false,
        })
    }
}
