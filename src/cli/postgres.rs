//! `backup-cli init|restore|verify postgres://...`: the command-line edge of the
//! PostgreSQL destination (messages for the operator; storage work in `transfer`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::destination::postgres::url::{default_name, with_backup_name};
use crate::destination::postgres::{transfer, url, PgError};
use crate::error::StoreError;
use crate::plugin::LOCK_NAME;
use crate::restore::{self, Summary};
use crate::{fsutil, snapshot, writer};

fn explain(e: PgError) -> anyhow::Error {
    anyhow!(e.explain())
}

/// Creates the backup in PostgreSQL from the node's database (or empty for a new node) and
/// points backup.lock at it. Returns the URL written there.
pub fn init(lightning_dir: Option<&Path>, url_str: &str) -> Result<String> {
    let pg = url::parse(url_str).map_err(explain)?;
    let name = match (&pg.backup, lightning_dir) {
        (Some(n), _) => n.clone(),
        (None, Some(l)) => default_name(l)
            .ok_or_else(|| anyhow!("cannot make a backup name from {}: add ?backup=NAME to the URL", l.display()))?,
        (None, None) => bail!("name the backup: add ?backup=NAME to the URL (or give --lightning-dir)"),
    };
    let backend_url = with_backup_name(url_str, &name);
    let display = url::redact(&backend_url);
    let scratch_parent = std::env::temp_dir();
    let scratch = scratch_parent.join(format!("cln-backup-init-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).map_err(StoreError::io("create directory", &scratch))?;
    let result = (|| -> Result<()> {
        let local = scratch.join("backup");
        let Some(ldir) = lightning_dir else {
            writer::create(&local, None, None, None)?;
            transfer::create(&backend_url, &name, &local, &mut |_, _| {}).map_err(explain)?;
            println!("Created an empty backup '{name}' at {display} for a new node.");
            println!("Put {{\"backend_url\": \"{display}\"}} into {LOCK_NAME} in the node's lightning dir.");
            return Ok(());
        };
        let lock = super::ready_for_init(ldir)?;
        let db = ldir.join(restore::DB_NAME);
        if db.exists() {
            let tmp = scratch.join("db.sqlite3");
            let dv = snapshot::copy_live_database(&db, &tmp)?;
            println!("Found an existing database with data_version {dv} at {}", db.display());
            writer::create(&local, Some((&tmp, dv)), None, None)?;
            transfer::create(&backend_url, &name, &local, &mut |_, _| {}).map_err(explain)?;
            println!("Successfully written initial snapshot to backup '{name}' at {display}");
        } else {
            writer::create(&local, None, None, None)?;
            transfer::create(&backend_url, &name, &local, &mut |_, _| {}).map_err(explain)?;
            println!("No database in {} yet: created an empty backup '{name}' at {display}", ldir.display());
        }
        let body = serde_json::to_vec(&serde_json::json!({ "backend_url": backend_url }))?;
        fsutil::write_atomic(&lock, false, |f, tmp| f.write_all(&body).map_err(StoreError::io("write", tmp)))?;
        println!("Wrote {}. Now add to lightningd's config: important-plugin=/path/to/cln-backup", lock.display());
        Ok(())
    })();
    let _ = fs::remove_dir_all(&scratch);
    result.map(|_| backend_url)
}

/// Downloads (one consistent view) then restores with the local engine.
pub fn restore(
    url_str: &str,
    dest: &Path,
    fetched: &mut dyn FnMut(u64, u64),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary)> {
    let (p, s, d) = transfer::restore_from(url_str, None, dest, fetched, progress).map_err(explain)?;
    println!(
        "Downloaded backup '{}': generation {}, {} records, {:.1} MB",
        d.name,
        d.generation,
        d.records,
        d.bytes as f64 / 1e6
    );
    Ok((p, s))
}

pub fn verify(url_str: &str, fetched: &mut dyn FnMut(u64, u64), progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    let (s, d) = transfer::verify_from(url_str, None, &std::env::temp_dir(), fetched, progress).map_err(explain)?;
    println!(
        "Downloaded backup '{}': generation {}, {} records, {:.1} MB",
        d.name,
        d.generation,
        d.records,
        d.bytes as f64 / 1e6
    );
    Ok(s)
}
