//! Converting the Python plugin's v1 backup (read by `legacy`) into a cln-backup backup
//! (made by `writer`), without a gap in protection.

use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::apply::Summary;
use crate::error::{Result, StoreError};
use crate::{fsutil, legacy};

/// Converts a v1 backup into a new cln-backup backup at `new_root`, at the same version:
/// a snapshot of everything before the last transaction, and that transaction (with what
/// follows it) as the journal. Kept out of the snapshot, it can still be dropped if
/// lightningd never committed it, exactly as in a backup cln-backup wrote itself.
/// With a sealed `meta` (and its `sealer`) the new backup is sealed.
pub fn migrate(old: &Path, new_root: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    migrate_to(old, new_root, None, None, progress)
}

/// As `migrate`, recording `meta` in the new backup and sealing it when `meta` says so.
pub fn migrate_to(
    old: &Path,
    new_root: &Path,
    meta: Option<&crate::meta::Meta>,
    sealer: Option<&crate::seal::Sealer>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary> {
    let started = Instant::now();
    if fs::symlink_metadata(new_root).is_ok() {
        return Err(StoreError::Exists { path: new_root.into() });
    }
    let tmp = fsutil::tmp_path(&new_root.with_extension("migrate-db"));
    let _ = fs::remove_file(&tmp);
    let result = (|| -> Result<Summary> {
        let built = legacy::build(old, Some(&tmp), true, progress)?;
        let base = built.has_db.then_some((tmp.as_path(), built.db_version));
        crate::writer::create_with_records(new_root, base, &built.tail, meta, sealer)?;
        Ok(built.summary)
    })();
    let _ = fs::remove_file(&tmp);
    let mut s = result?;
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}
