//! The PostgreSQL destination behind the destination seam.

use std::time::SystemTime;

use super::transfer::{self, PreparedGeneration};
use super::{PgDestination, PgError};
use crate::compact::lock;
use crate::destination::{BackgroundCompaction, Destination, GenerationFiles, Shared, Tip};
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
            journal_len: self.journal_len(),
            tail: self.tail(),
            last_tx_offset: self.last_tx_offset(),
        }
    }
    fn append(&mut self, data_version: u32, kind: Kind, replace_last: bool, record: &[u8]) -> Result<(), StoreError> {
        let mut buf = std::mem::take(&mut self.seal_buf);
        let r = super::super::seal_and_append(self, &mut buf, data_version, kind, replace_last, record);
        self.seal_buf = buf;
        r
    }
    fn seal_for_next(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        statements: &[&str],
        out: &mut Vec<u8>,
    ) -> Result<bool, StoreError> {
        Ok(PgDestination::seal_for_next(self, data_version, kind, replace_last, statements, out)?)
    }
    fn append_copy(
        &mut self,
        data_version: u32,
        kind: Kind,
        replace_last: bool,
        record: &[u8],
    ) -> Result<(), StoreError> {
        Ok(PgDestination::append_copy(self, data_version, kind, replace_last, record)?)
    }
    fn backup_id(&self) -> Option<crate::seal::BackupId> {
        PgDestination::sealed_backup_id(self)
    }
    fn bytes(&self) -> u64 {
        0
    }
    fn last_write(&self) -> Option<SystemTime> {
        PgDestination::last_write(self)
    }
    fn details(&self) -> serde_json::Value {
        self.status()
    }
    fn set_reconnect_timeout(&mut self, timeout: std::time::Duration) {
        PgDestination::set_reconnect_timeout(self, timeout);
    }
    /// Builds the next generation on its own connection (download up to the fold point,
    /// rebuild, upload the snapshot in chunks), then switches in one short transaction with
    /// this destination's lock held, then removes old generations in steps.
    fn background_compaction(&self, me: Shared) -> Option<BackgroundCompaction> {
        let plan = self.plan()?;
        let (url, name, shown) = (self.raw_url.clone(), self.name().to_string(), PgDestination::url(self).to_string());
        // a sealed backup is folded with the key the writer read
        let sealer = self.compaction_sealer();
        let keys = self.keys();
        Some(Box::new(move |work| {
            let why = |e: PgError| format!("{shown}: {}", e.explain());
            let sealer = sealer.map_err(why)?;
            let sealing = sealer.as_deref().map(|s| (s, &keys));
            let next = transfer::build_generation(&url, &name, plan, work, sealing, &mut |_, _, _| {}).map_err(why)?;
            let generation = next.generation;
            lock(&me).switch_generation(Box::new(next)).map_err(|e| format!("{shown}: {}", e.explain()))?;
            let removed = transfer::remove_old_generations(&url, &name, &mut |_| {}).map_err(why)?;
            Ok(format!("{shown}: compacted into generation {generation}; {removed} old rows removed in steps"))
        }))
    }
    fn switch_generation(&mut self, prepared: Box<dyn std::any::Any + Send>) -> Result<(), StoreError> {
        let next = prepared.downcast::<PreparedGeneration>().map_err(|_| StoreError::Invalid {
            path: PgDestination::url(self).into(),
            what: "not a generation built for PostgreSQL".into(),
        })?;
        self.install_generation(&next)?;
        // the records after the fold point moved into the new generation as they were
        Ok(())
    }
    fn install(&mut self, from: &GenerationFiles) -> Result<(), StoreError> {
        Ok(self.install_files(from)?)
    }
}
