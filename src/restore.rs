//! Rebuilding lightningd.sqlite3 from a backup, and checking a backup without writing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Result, StoreError};
use crate::fsutil;
use crate::journal::{self, Kind, Payloads};
use crate::keys::KeySource;
use crate::meta::{key_err, Meta};
use crate::reader::View;
use crate::seal::Sealer;
use crate::snapshot;
use crate::versions::Position;
use crate::writer::check_chain;

pub use crate::apply::{finish_db, open_build_db, resolve_dest, sql_err, Applier, Summary, DB_NAME};

/// Where a record sits, for messages.
#[derive(Debug, Clone, Copy)]
pub struct RecordInfo {
    pub offset: u64,
    pub data_version: u32,
    pub kind: Kind,
}

/// The key of the backup at `root` for a reader. `keys` holds what the operator gave; the
/// search adds `hsm_secret` in `dest_dir` (a restore into a lightning dir), then the
/// lightning dir recorded at init. Returns the metadata and, for a sealed backup whose key
/// was found, a sealer. A missing key is an error naming where it looked when `required`.
pub fn find_sealer(
    root: &Path,
    keys: &KeySource,
    dest_dir: Option<&Path>,
    required: bool,
) -> Result<(Option<Meta>, Option<Sealer>, Option<String>)> {
    let meta = Meta::load(root)?;
    let Some(m) = meta.as_ref().filter(|m| m.sealed) else {
        return Ok((meta, None, None));
    };
    let mut src = keys.clone();
    if let Some(d) = dest_dir {
        src.search.push(d.to_path_buf());
    }
    let src = m.source_with_recorded(src);
    match m.sealer(&src).map_err(key_err(root))? {
        Some((s, key)) => Ok((meta, Some(s), Some(key.origin.clone()))),
        None if required => Err(key_err(root)(m.missing(&src))),
        None => Ok((meta, None, None)),
    }
}

/// Reads every journal record of a view in order, checking checksums and the version chain,
/// and opening sealed records with `sealer`. Without a sealer, a sealed journal's records
/// are checked by framing, checksums and chain only, and `f` is not called.
pub fn for_each_record(
    view: &mut View,
    summary: &mut Summary,
    sealer: Option<&Sealer>,
    mut f: impl FnMut(&RecordInfo, Vec<&str>) -> Result<()>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut pos = Position { version: view.header.base.version(), droppable: false };
    let path = view.journal.path().to_path_buf();
    let payloads = match (view.header.sealed, sealer) {
        (false, _) => Some(Payloads::Plain),
        (true, Some(s)) => Some(Payloads::Sealed { sealer: s, generation: view.header.generation }),
        (true, None) => None,
    };
    while let Some(mut rec) = view.journal.next_record()? {
        check_chain(&path, pos, &rec)?;
        let info = RecordInfo { offset: rec.offset, data_version: rec.data_version, kind: rec.kind };
        let end = rec.end();
        summary.records += 1;
        if rec.kind == Kind::Transaction {
            summary.transactions += 1;
            pos = Position { version: rec.data_version, droppable: true };
        }
        if let Some(payloads) = payloads {
            let plain = rec.plaintext(&path, payloads)?;
            let stmts = journal::decode_statements(plain).map_err(|what| StoreError::Damaged {
                path: path.clone(),
                offset: info.offset,
                what,
            })?;
            summary.statements += stmts.len() as u64;
            f(&info, stmts)?;
        }
        progress(end);
    }
    summary.version = pos.version;
    summary.torn_tail = view.journal.torn_tail;
    Ok(())
}

/// Restores the backup at `root` into `dest` (a new file, or a directory to put
/// lightningd.sqlite3 in). Built in a temp file, checked, then linked into place. The key
/// of a sealed backup is looked for as `find_sealer` says.
pub fn restore(root: &Path, dest: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<(PathBuf, Summary)> {
    restore_with(root, dest, &KeySource::default(), progress)
}

/// As `restore`, with the key the operator gave (`--hsm-secret`, `--key-file`).
pub fn restore_with(
    root: &Path,
    dest: &Path,
    keys: &KeySource,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary)> {
    let started = Instant::now();
    let dest = resolve_dest(dest);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(StoreError::Exists { path: dest });
    }
    let mut view = View::open(root)?;
    if view.snapshot.is_none() && view.journal.is_empty() {
        return Err(empty(root));
    }
    let (meta, sealer, origin) = find_sealer(root, keys, Some(fsutil::parent_of(&dest)), true)?;
    let total = view.total_bytes();
    let mut summary = Summary { generation: view.header.generation, bytes: total, ..Default::default() };
    let key_given = keys.hsm_secret.is_some() || keys.key_file.is_some();
    note_sealing(root, &mut summary, meta.as_ref(), view.header.sealed, origin, key_given)?;
    fsutil::write_atomic(&dest, false, |file, tmp| {
        let result = build(&mut view, file, tmp, &mut summary, total, sealer.as_ref(), progress);
        for side in ["-journal", "-wal", "-shm"] {
            let mut p = tmp.as_os_str().to_owned();
            p.push(side);
            let _ = fs::remove_file(PathBuf::from(p));
        }
        result
    })?;
    summary.bytes = view.total_bytes(); // without the journal's zero padding, now read
    summary.seconds = started.elapsed().as_secs_f64();
    Ok((dest, summary))
}

fn empty(root: &Path) -> StoreError {
    StoreError::Invalid {
        path: root.into(),
        what: "the backup is empty: no db_write has reached it yet, so there is nothing to restore".into(),
    }
}

/// Records in `summary` what sealing the backup has.
fn note_sealing(
    root: &Path,
    summary: &mut Summary,
    meta: Option<&Meta>,
    journal_sealed: bool,
    origin: Option<String>,
    key_given: bool,
) -> Result<()> {
    let meta_sealed = meta.is_some_and(|m| m.sealed);
    summary.sealed = journal_sealed || meta_sealed;
    summary.key_fingerprint = meta.and_then(|m| m.key_fingerprint.clone());
    summary.key_origin = origin;
    let refuse = |what: &str| Err(StoreError::Key { path: root.into(), what: what.into() });
    // A plaintext generation where sealed data is expected could be anyone's: not restored.
    if meta_sealed && !journal_sealed {
        return refuse(
            "backup.json says sealed, but the current generation is plaintext: either a `backup-cli encrypt` was \
             interrupted (run it again, with lightningd stopped), or the files were replaced",
        );
    }
    if journal_sealed && !meta_sealed {
        return refuse("the journal is sealed, but backup.json is missing or says plaintext: put it back from a copy");
    }
    if key_given && !summary.sealed {
        return refuse(
            "you gave a key, but this backup is not sealed (made with --no-encryption, or before encryption \
             existed, or replaced): check that it is the backup you mean; without the key option it is read as \
             plaintext",
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build(
    view: &mut View,
    file: &mut fs::File,
    tmp: &Path,
    summary: &mut Summary,
    total: u64,
    sealer: Option<&Sealer>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut snap_len = 0;
    let journal_sealed = view.header.sealed;
    if let Some((p, f)) = view.snapshot.as_mut() {
        snap_len = f.metadata().map_err(StoreError::io("stat", &*p))?.len();
        let h = fsutil::write_in_background(file, 0, tmp, |out| {
            snapshot::extract(p, f, out, &mut |n| progress(n, total), sealer.filter(|_| journal_sealed))
        })?;
        crate::compact::check_snapshot_matches(p, &h, journal_sealed)?;
        summary.snapshot_version = Some(h.data_version);
        if h.data_version != view.header.base.version() {
            return Err(StoreError::Damaged {
                path: p.clone(),
                offset: 0,
                what: format!(
                    "snapshot is at version {}, its journal starts from {}",
                    h.data_version,
                    view.header.base.version()
                ),
            });
        }
    }
    if summary.snapshot_version.is_none() && view.journal.is_empty() {
        return Err(empty(&view.layout.root));
    }
    let file: &fs::File = file;
    std::thread::scope(|s| {
        // The snapshot's writeback finishes while SQLite replays the journal and checks the
        // result from the page cache; the caller's final fsync then has little left.
        let early_sync = summary.snapshot_version.is_some().then(|| s.spawn(|| file.sync_data()));
        let built = replay(view, tmp, summary, snap_len, total, sealer, progress);
        if let Some(h) = early_sync {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("the fsync thread panicked")))
                .map_err(StoreError::io("fsync", tmp))?;
        }
        built
    })
}

/// Applies the journal on top of what `build` extracted, then checks the result.
fn replay(
    view: &mut View,
    tmp: &Path,
    summary: &mut Summary,
    snap_len: u64,
    total: u64,
    sealer: Option<&Sealer>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let conn = open_build_db(tmp)?;
    let mut applier = Applier::new(&conn);
    let jpath = view.journal.path().to_path_buf();
    for_each_record(
        view,
        summary,
        sealer,
        |rec, stmts| {
            applier.apply(rec.kind, &stmts).map_err(|e| StoreError::Apply {
                path: jpath.clone(),
                offset: rec.offset,
                version: rec.data_version,
                what: e.to_string(),
            })
        },
        &mut |n| progress(snap_len + n, total),
    )?;
    applier.commit().map_err(sql_err(tmp))?;
    finish_db(&conn, tmp, summary.version)?;
    conn.close().map_err(|(_, e)| sql_err(tmp)(e))
}

/// Reads the whole backup and checks every checksum and the version chain; writes nothing.
pub fn verify(root: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    verify_with(root, &KeySource::default(), progress)
}

/// As `verify`, with the key the operator gave. Without a key (none given, none found), a
/// sealed backup is checked by framing, checksums and version chain, and the summary says
/// what was left unchecked; a key given but wrong is an error.
pub fn verify_with(root: &Path, keys: &KeySource, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    let started = Instant::now();
    let given = keys.hsm_secret.is_some() || keys.key_file.is_some();
    let (meta, sealer, origin) = find_sealer(root, keys, None, given)?;
    let mut view = View::open(root)?;
    let total = view.total_bytes();
    let mut summary = Summary { generation: view.header.generation, bytes: total, ..Default::default() };
    note_sealing(root, &mut summary, meta.as_ref(), view.header.sealed, origin, given)?;
    let journal_sealed = view.header.sealed;
    let has_data = view.snapshot.is_some() || !view.journal.is_empty();
    if journal_sealed && sealer.is_none() && has_data {
        summary.unverified.push(
            "no key given or found: the sealed records and snapshot were checked by framing, checksums and \
             version chain, but not opened (authenticity, statements, and the snapshot's database were not \
             checked); give --hsm-secret PATH or --key-file PATH to check them"
                .into(),
        );
    }
    let mut snap_len = 0;
    if let Some((p, f)) = view.snapshot.as_mut() {
        snap_len = f.metadata().map_err(StoreError::io("stat", &*p))?.len();
        let s = sealer.as_ref().filter(|_| journal_sealed);
        let h = snapshot::extract(p, f, &mut io::sink(), &mut |n| progress(n, total), s)?;
        crate::compact::check_snapshot_matches(p, &h, journal_sealed)?;
        summary.snapshot_version = Some(h.data_version);
    }
    for_each_record(&mut view, &mut summary, sealer.as_ref(), |_, _| Ok(()), &mut |n| progress(snap_len + n, total))?;
    summary.bytes = view.total_bytes(); // without the journal's zero padding, now read
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}
