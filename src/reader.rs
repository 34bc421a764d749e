//! A consistent view of a backup for readers (restore, verify, compaction), taken without
//! the writer's lock, so it works on a live backup.
//!
//! The view opens the current generation's snapshot and journal and reads the journal only
//! up to the length it had then: a prefix of acknowledged records, with at most a torn
//! record in progress at its end, which is left out. If the writer drops a transaction
//! lightningd never committed while the view reads, the view ends where it was cut, a
//! prefix too. If a compaction switches generations
//! between listing and opening, the old files are gone: list again. Once open, files stay
//! whole even if a compaction removes them: the view holds a shared lock on each, which
//! the removal waits for before it frees anything (`fsutil::remove_gradually`).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::journal::{Base, Header, JournalReader};
use crate::layout::{Layout, Listing};

pub struct View {
    pub layout: Layout,
    pub listing: Listing,
    pub header: Header,
    pub snapshot: Option<(PathBuf, File)>,
    pub journal: JournalReader,
}

impl View {
    pub fn open(root: &Path) -> Result<View> {
        let layout = Layout::new(root);
        for _ in 0..20 {
            let listing = layout.list()?;
            let snapshot = match &listing.snapshot {
                Some(p) => match fsutil::open_for_reading(p) {
                    Ok(Some(f)) => Some((p.clone(), f)),
                    Ok(None) => continue,
                    Err(e) => return Err(StoreError::io("open snapshot", p)(e)),
                },
                None => None,
            };
            let jfile = match fsutil::open_for_reading(&listing.journal) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => return Err(StoreError::io("open journal", &listing.journal)(e)),
            };
            let journal = JournalReader::from_file(&listing.journal, jfile)?;
            let header = journal.header;
            if header.generation != listing.current.generation || header.base.version() != listing.current.base_version
            {
                return Err(StoreError::Damaged {
                    path: listing.journal.clone(),
                    offset: 0,
                    what: "journal header does not match its file name".into(),
                });
            }
            if matches!(header.base, Base::Snapshot(_)) && snapshot.is_none() {
                return Err(StoreError::Invalid {
                    path: layout.snapshot_path(listing.current),
                    what: "the journal's snapshot is missing".into(),
                });
            }
            return Ok(View { layout, listing, header, snapshot, journal });
        }
        Err(StoreError::Invalid {
            path: root.into(),
            what: "the backup kept changing while being opened (compactions in a loop?)".into(),
        })
    }

    /// Bytes a full read covers (compressed snapshot and journal).
    pub fn total_bytes(&self) -> u64 {
        let snap = self.snapshot.as_ref().and_then(|(_, f)| f.metadata().ok()).map_or(0, |m| m.len());
        snap + self.journal.len()
    }
}
