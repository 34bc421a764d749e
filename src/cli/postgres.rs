//! `backup-cli init|add-destination|restore|verify postgres://...`: the command-line edge of the
//! PostgreSQL destination (messages for the operator; storage work in `transfer`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::destination::postgres::url::{default_name, with_backup_name};
use crate::destination::postgres::{transfer, url, PgError};
use crate::keys::KeySource;
use crate::restore::Summary;

fn explain(e: PgError) -> anyhow::Error {
    anyhow!(e.explain())
}

/// A `postgres://` destination of a new backup: its name and the URL backup.lock gets.
pub struct NewPg {
    pub name: String,
    pub backend_url: String,
}

impl NewPg {
    /// The backup's name: the URL's `backup=`, else made from the lightning dir.
    pub fn plan(lightning_dir: Option<&Path>, url_str: &str) -> Result<NewPg> {
        let pg = url::parse(url_str).map_err(explain)?;
        let name = match (&pg.backup, lightning_dir) {
            (Some(n), _) => n.clone(),
            (None, Some(l)) => default_name(l).ok_or_else(|| {
                anyhow!("cannot make a backup name from {}: add ?backup=NAME to the URL", l.display())
            })?,
            (None, None) => bail!("name the backup: add ?backup=NAME to the URL (or give --lightning-dir)"),
        };
        Ok(NewPg { backend_url: with_backup_name(url_str, &name), name })
    }

    pub fn shown(&self) -> String {
        url::redact(&self.backend_url)
    }

    /// Uploads the generation a file backup `from` holds (with its backup.json: one backup
    /// id and key for every copy), in one transaction.
    pub fn upload(&self, from: &Path) -> Result<()> {
        transfer::create(&self.backend_url, &self.name, from, &mut |_, _| {}).map_err(explain)?;
        Ok(())
    }

    /// Deletes what `upload` created (in one transaction), because of `why`: the error says
    /// both, and what to do if the rows could not be deleted.
    pub fn undo(&self, why: anyhow::Error) -> anyhow::Error {
        match transfer::drop_backup(&self.backend_url, &self.name) {
            Ok(_) => {
                anyhow!("{why:#}. Undone: the backup '{}' uploaded to {} was deleted again", self.name, self.shown())
            }
            Err(e) => anyhow!(
                "{why:#}. The backup '{}' uploaded to {} could not be deleted again ({}): delete its rows \
                 (DELETE FROM cln_backup.T WHERE name = '{}' for T = snapshot_chunks, records, generations, \
                 backups) before trying again",
                self.name,
                self.shown(),
                e.explain(),
                self.name
            ),
        }
    }
}

/// Downloads (one consistent view) then restores with the local engine.
pub fn restore(
    url_str: &str,
    dest: &Path,
    keys: &KeySource,
    fetched: &mut dyn FnMut(u64, u64),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary)> {
    let (p, s, d) = transfer::restore_from(url_str, None, dest, keys, fetched, progress).map_err(explain)?;
    println!(
        "Downloaded backup '{}': generation {}, {} records, {:.1} MB",
        d.name,
        d.generation,
        d.records,
        d.bytes as f64 / 1e6
    );
    Ok((p, s))
}

pub fn verify(
    url_str: &str,
    keys: &KeySource,
    fetched: &mut dyn FnMut(u64, u64),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary> {
    let (s, d) =
        transfer::verify_from(url_str, None, &std::env::temp_dir(), keys, fetched, progress).map_err(explain)?;
    println!(
        "Downloaded backup '{}': generation {}, {} records, {:.1} MB",
        d.name,
        d.generation,
        d.records,
        d.bytes as f64 / 1e6
    );
    Ok(s)
}
