//! The PostgreSQL destination behind the destination seam.

use std::time::SystemTime;

use super::{PgDestination, PgError};
use crate::destination::{Destination, GenerationFiles, Tip};
use crate::error::StoreError;
use crate::journal::Kind;

impl From<PgError> for StoreError {
    fn from(e: PgError) -> StoreError {
        match e {
            PgError::Store(s) => s,
            e => StoreError::Remote { what: e.to_string(), hint: e.hint(), retryable: e.retryable() },
        }
    }
}

impl Destination for PgDestination {
    fn url(&self) -> &str {
        PgDestination::url(self)
    }
    fn kind(&self) -> &'static str {
        "postgres"
    }
    fn tip(&self) -> Tip {
        Tip {
            position: self.position(),
            generation: self.generation(),
            journal_len: self.state.next_seq.max(0) as u64,
            last_crc: self.last_crc,
            last_tx_offset: None,
        }
    }
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError> {
        PgDestination::append(self, data_version, kind, replace_last, record)?;
        self.last_crc = crate::journal::payload_crc(record);
        self.last_write = Some(SystemTime::now());
        Ok(())
    }
    fn bytes(&self) -> u64 {
        0
    }
    fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }
    fn details(&self) -> serde_json::Value {
        self.status()
    }
    fn set_reconnect_timeout(&mut self, timeout: std::time::Duration) {
        PgDestination::set_reconnect_timeout(self, timeout);
    }
    fn install(&mut self, _from: &GenerationFiles) -> Result<(), StoreError> {
        Err(StoreError::Remote {
            what: format!(
                "{}: a postgres destination that lacks more than the records after its position cannot be \
                 brought up to date from a file copy yet",
                PgDestination::url(self)
            ),
            hint: "stop lightningd, remove this destination with backup-cli remove-destination, and init it again",
            retryable: false,
        })
    }
}
