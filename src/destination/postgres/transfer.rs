//! Moving whole generations: create (upload a file-layout generation), download (into a
//! file-layout directory, from one REPEATABLE READ snapshot), restore/verify through the
//! local engine, and compaction (build a new generation beside the live one, switch in
//! one short transaction, remove old rows in small steps).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use futures_util::{pin_mut, StreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::{
    check_schema, connect, db_err, known_names, load_meta, lock_key, runtime, store_meta, tls, url, PgError, State,
    CHUNK,
};
use crate::error::StoreError;
use crate::fsutil;
use crate::journal::{self, Base, Header, JournalReader, Kind, Payloads};
use crate::keys::KeySource;
use crate::layout::{GenName, Layout};
use crate::meta::Meta;
use crate::restore::{self, Summary};
use crate::seal::Sealer;
use crate::versions::Position;

const SCHEMA_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS cln_backup;
CREATE TABLE IF NOT EXISTS cln_backup.backups (
    name text PRIMARY KEY,
    generation bigint NOT NULL,
    next_seq bigint NOT NULL,
    last_version bigint NOT NULL,
    droppable boolean NOT NULL,
    last_tx_seq bigint NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS cln_backup.generations (
    name text NOT NULL,
    generation bigint NOT NULL,
    base_version bigint NOT NULL,
    journal_header bytea NOT NULL,
    snapshot_len bigint NOT NULL,
    chunks integer NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, generation));
CREATE TABLE IF NOT EXISTS cln_backup.snapshot_chunks (
    name text NOT NULL,
    generation bigint NOT NULL,
    idx integer NOT NULL,
    bytes bytea NOT NULL,
    PRIMARY KEY (name, generation, idx));
ALTER TABLE cln_backup.snapshot_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS cln_backup.records (
    name text NOT NULL,
    generation bigint NOT NULL,
    seq bigint NOT NULL,
    data_version bigint NOT NULL,
    kind smallint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (name, generation, seq));
ALTER TABLE cln_backup.backups ADD COLUMN IF NOT EXISTS meta text;
";

fn params<'a>(s: &'a [&'a (dyn ToSql + Sync)]) -> impl ExactSizeIterator<Item = &'a dyn ToSql> + 'a {
    s.iter().map(|p| *p as &dyn ToSql)
}

/// A one-off session (no retries): init, download, compaction's side work.
struct OneOff {
    rt: tokio::runtime::Runtime,
    session: super::Session,
    pg: url::PgUrl,
}

fn one_off(url_str: &str) -> Result<OneOff, PgError> {
    let pg = url::parse(url_str)?;
    let tls = tls::connector(&pg.tls, &pg.display)?;
    let rt = runtime()?;
    let session = rt.block_on(connect(&pg, &tls))?;
    Ok(OneOff { rt, session, pg })
}

fn name_of(pg: &url::PgUrl, name: Option<&str>) -> Result<Option<String>, PgError> {
    let n = pg.backup.clone().or(name.map(str::to_string));
    if let Some(n) = &n {
        url::check_name(n).map_err(|what| PgError::Url { url: pg.display.clone(), what })?;
    }
    Ok(n)
}

/// One generation of a local file layout, read for upload.
pub(super) struct LocalGeneration {
    header: Header,
    header_bytes: Vec<u8>,
    snapshot: Option<PathBuf>,
    /// (data_version, kind, framed bytes) of each record
    records: Vec<(u32, Kind, Vec<u8>)>,
    position: Position,
    last_tx: Option<usize>,
}

fn read_local(dir: &Path) -> Result<LocalGeneration, PgError> {
    let listing = Layout::new(dir).list()?;
    read_generation(&listing.journal, listing.snapshot, None)
}

/// Reads a generation's journal (up to `limit` bytes, when given) and names its snapshot.
fn read_generation(
    journal_path: &Path,
    snapshot: Option<PathBuf>,
    limit: Option<u64>,
) -> Result<LocalGeneration, PgError> {
    let mut bytes = fs::read(journal_path).map_err(StoreError::io("read journal", journal_path))?;
    let mut reader = JournalReader::open(journal_path)?;
    if let Some(n) = limit {
        reader.limit(n);
        bytes.truncate(n as usize);
    }
    let header = reader.header;
    let mut position = Position { version: header.base.version(), droppable: false };
    let mut records = vec![];
    let mut last_tx = None;
    while let Some(rec) = reader.next_record()? {
        crate::writer::check_chain(journal_path, position, &rec)?;
        if rec.kind == Kind::Transaction {
            position = Position { version: rec.data_version, droppable: true };
            last_tx = Some(records.len());
        }
        records.push((rec.data_version, rec.kind, bytes[rec.offset as usize..rec.end() as usize].to_vec()));
    }
    if reader.torn_tail.is_some() {
        return Err(StoreError::Damaged {
            path: journal_path.into(),
            offset: reader.position(),
            what: "torn record at the end of a journal to upload".into(),
        }
        .into());
    }
    Ok(LocalGeneration {
        header,
        header_bytes: bytes[..journal::HEADER_LEN as usize].to_vec(),
        snapshot,
        records,
        position,
        last_tx,
    })
}

/// Uploads a generation's snapshot chunks and its generations row, inside the caller's transaction.
async fn upload_generation<P: FnMut(u64, u64) + ?Sized>(
    client: &Client,
    url: &str,
    name: &str,
    generation: i64,
    local: &LocalGeneration,
    progress: &mut P,
) -> Result<(), PgError> {
    let mut snapshot_len = 0u64;
    let mut chunks = 0i32;
    if let Some(path) = &local.snapshot {
        let mut f = File::open(path).map_err(StoreError::io("open snapshot", path))?;
        let total = f.metadata().map_err(StoreError::io("stat", path))?.len();
        let insert = client
            .prepare("INSERT INTO cln_backup.snapshot_chunks (name, generation, idx, bytes) VALUES ($1, $2, $3, $4)")
            .await
            .map_err(db_err(url, "prepare the snapshot upload"))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = crate::journal::read_full(&mut f, &mut buf).map_err(StoreError::io("read snapshot", path))?;
            if n == 0 {
                break;
            }
            client
                .execute(&insert, &[&name, &generation, &chunks, &&buf[..n]])
                .await
                .map_err(db_err(url, "upload a snapshot chunk"))?;
            chunks += 1;
            snapshot_len += n as u64;
            progress(snapshot_len, total);
        }
    }
    client
        .execute(
            "INSERT INTO cln_backup.generations (name, generation, base_version, journal_header, snapshot_len, chunks)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &name,
                &generation,
                &(local.header.base.version() as i64),
                &local.header_bytes,
                &(snapshot_len as i64),
                &chunks,
            ],
        )
        .await
        .map_err(db_err(url, "record the generation"))?;
    Ok(())
}

/// Creates backup `name` (the URL's `backup=` wins) from a local file-layout directory
/// made by `writer::create`, creating the schema if needed. Refuses a name in use.
pub fn create(
    url_str: &str,
    name: &str,
    from_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String, PgError> {
    let o = one_off(url_str)?;
    let name = name_of(&o.pg, Some(name))?.unwrap_or_default();
    let url = o.pg.display.as_str();
    let local = read_local(from_dir)?;
    let meta = Meta::load(from_dir)?;
    if local.header.sealed && !meta.as_ref().is_some_and(|m| m.sealed) {
        return Err(StoreError::Invalid {
            path: Meta::path(from_dir),
            what: "the journal to upload is sealed, but backup.json is missing or says plaintext".into(),
        }
        .into());
    }
    let client = &o.session.client;
    o.rt.block_on(async {
        client.batch_execute(SCHEMA_DDL).await.map_err(db_err(url, "create schema cln_backup"))?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(&name)])
            .await
            .map_err(db_err(url, "take the backup's advisory lock"))?
            .get(0);
        if !locked {
            return Err(PgError::Locked { url: url.into(), name: name.clone() });
        }
        client.batch_execute("BEGIN").await.map_err(db_err(url, "begin"))?;
        let generation = local.header.generation as i64;
        let next_seq = local.records.len() as i64;
        let last_tx_seq = local.last_tx.map_or(-1, |i| i as i64);
        let r = client
            .execute(
                "INSERT INTO cln_backup.backups (name, generation, next_seq, last_version, droppable, last_tx_seq)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &name,
                    &generation,
                    &next_seq,
                    &(local.position.version as i64),
                    &local.position.droppable,
                    &last_tx_seq,
                ],
            )
            .await;
        if let Err(e) = r {
            let _ = client.batch_execute("ROLLBACK").await;
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                return Err(PgError::Exists { url: url.into(), name: name.clone() });
            }
            return Err(db_err(url, "create the backup row")(e));
        }
        // the backup's id and key fingerprint (backup.json) go with it, in the same transaction
        if let Some(m) = &meta {
            store_meta(client, url, &name, m).await?;
        }
        upload_generation(client, url, &name, generation, &local, progress).await?;
        insert_records(client, url, &name, generation, 0, &local.records).await?;
        client.batch_execute("COMMIT").await.map_err(db_err(url, "commit the new backup"))?;
        Ok(())
    })?;
    Ok(name)
}

async fn insert_records(
    client: &Client,
    url: &str,
    name: &str,
    generation: i64,
    first_seq: i64,
    records: &[(u32, Kind, Vec<u8>)],
) -> Result<(), PgError> {
    let insert = client
        .prepare(
            "INSERT INTO cln_backup.records (name, generation, seq, data_version, kind, data)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await
        .map_err(db_err(url, "prepare the record upload"))?;
    for (i, (dv, kind, bytes)) in records.iter().enumerate() {
        client
            .execute(&insert, &[&name, &generation, &(first_seq + i as i64), &(*dv as i64), &(*kind as i16), bytes])
            .await
            .map_err(db_err(url, "upload a record"))?;
    }
    Ok(())
}

/// What a download fetched.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub name: String,
    pub generation: u64,
    pub base_version: u32,
    pub records: u64,
    pub bytes: u64,
    pub dir: PathBuf,
    /// Whether its metadata says sealed.
    pub sealed: bool,
    /// (journal offset, seq) of each record, to name a damaged one by its row.
    pub offsets: Vec<(u64, i64)>,
}

impl Downloaded {
    /// A damage found in the downloaded files, said of the rows it came from.
    fn locate(&self, url: &str, e: StoreError) -> PgError {
        let (layout, g) =
            (Layout::new(&self.dir), GenName { generation: self.generation, base_version: self.base_version });
        let (journal, snapshot) = (layout.journal_path(g), layout.snapshot_path(g));
        let at = |path: &Path| path == journal.as_path();
        let what = match &e {
            StoreError::Damaged { path, offset, what } if at(path) => {
                let i = self.offsets.partition_point(|(o, _)| o <= offset);
                match i.checked_sub(1).map(|i| self.offsets[i]) {
                    Some((o, seq)) if o == *offset => format!(
                        "the record at seq {seq} of generation {} (table cln_backup.records): {what}",
                        self.generation
                    ),
                    Some((_, seq)) => format!(
                        "inside the record at seq {seq} of generation {} (table cln_backup.records): {what}",
                        self.generation
                    ),
                    None => format!(
                        "the journal header of generation {} (table cln_backup.generations): {what}",
                        self.generation
                    ),
                }
            }
            StoreError::Apply { path, offset, version, what } if at(path) => {
                let seq = self.offsets.iter().find(|(o, _)| o == offset).map_or(-1, |(_, s)| *s);
                format!(
                    "the record at seq {seq} of generation {} (data_version {version}) does not apply: {what}",
                    self.generation
                )
            }
            e if e.to_string().contains(&*snapshot.to_string_lossy()) => format!(
                "the snapshot of generation {} (table cln_backup.snapshot_chunks): {}",
                self.generation,
                e.to_string().replace(&*snapshot.to_string_lossy(), "snapshot")
            ),
            _ => return e.into(),
        };
        PgError::Damaged { url: url.into(), name: self.name.clone(), what }
    }
}

/// Downloads backup `name` (the URL's `backup=` wins; with neither, the database's only
/// backup) into a new file-layout directory `to_dir`, from one consistent REPEATABLE READ
/// view, streaming (never a whole snapshot in memory). All or nothing.
pub fn download(
    url_str: &str,
    name: Option<&str>,
    to_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Downloaded, PgError> {
    let o = one_off(url_str)?;
    let name = name_of(&o.pg, name)?;
    o.rt.block_on(download_in(&o.session.client, &o.pg.display, name, None, to_dir, progress))
}

async fn download_in(
    client: &Client,
    url: &str,
    name: Option<String>,
    only: Option<(i64, i64)>,
    to_dir: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Downloaded, PgError> {
    check_schema(client, url).await?;
    if fs::symlink_metadata(to_dir).is_ok() {
        return Err(StoreError::Exists { path: to_dir.into() }.into());
    }
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(db_err(url, "begin a consistent read"))?;
    let tmp = fsutil::tmp_path(to_dir);
    let _ = fs::remove_dir_all(&tmp);
    let r = async {
        let name = match name {
            Some(n) => n,
            None => {
                let rows = client
                    .query("SELECT name FROM cln_backup.backups ORDER BY name", &[])
                    .await
                    .map_err(db_err(url, "list backups"))?;
                if rows.len() != 1 {
                    return Err(PgError::NotFound {
                        url: url.into(),
                        name: "(none given)".into(),
                        known: format!(
                            "{}; add ?backup=NAME to the URL",
                            known_names(client).await
                        ),
                    });
                }
                rows[0].get(0)
            }
        };
        let (generation, upto) = match only {
            Some((g, upto)) => (g, upto),
            None => {
                let row = client
                    .query_opt("SELECT generation FROM cln_backup.backups WHERE name = $1", &[&name])
                    .await
                    .map_err(db_err(url, "read the backup"))?;
                let Some(row) = row else {
                    return Err(PgError::NotFound { url: url.into(), name, known: known_names(client).await });
                };
                (row.get(0), i64::MAX)
            }
        };
        let damaged = |what: String| PgError::Damaged { url: url.into(), name: name.clone(), what };
        let g = client
            .query_opt(
                "SELECT base_version, journal_header, snapshot_len, chunks FROM cln_backup.generations
                  WHERE name = $1 AND generation = $2",
                &[&name, &generation],
            )
            .await
            .map_err(db_err(url, "read the generation"))?
            .ok_or_else(|| damaged(format!("generation {generation} has no row in cln_backup.generations")))?;
        let meta = load_meta(client, url, &name).await?;
        let base_version = g.get::<_, i64>(0) as u32;
        let header_bytes: Vec<u8> = g.get(1);
        let snapshot_len = g.get::<_, i64>(2) as u64;
        let chunks = g.get::<_, i32>(3);
        let sums = client
            .query_one(
                "SELECT coalesce(sum(length(data)), 0)::bigint, count(*) FROM cln_backup.records
                  WHERE name = $1 AND generation = $2 AND seq < $3",
                &[&name, &generation, &upto],
            )
            .await
            .map_err(db_err(url, "size the records"))?;
        let total = snapshot_len + sums.get::<_, i64>(0) as u64 + header_bytes.len() as u64;
        fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(StoreError::io("create directory", &tmp))?;
        if let Some(m) = &meta {
            m.store(&tmp)?;
        }
        let layout = Layout::new(&tmp);
        let gname = GenName { generation: generation as u64, base_version };
        let mut done = 0u64;
        if chunks > 0 {
            let path = layout.snapshot_path(gname);
            let mut f = fsutil::create_private(&path)?;
            let stream = client
                .query_raw(
                    "SELECT idx, bytes FROM cln_backup.snapshot_chunks WHERE name = $1 AND generation = $2 ORDER BY idx",
                    params(&[&name, &generation]),
                )
                .await
                .map_err(db_err(url, "read the snapshot"))?;
            pin_mut!(stream);
            let mut want = 0i32;
            while let Some(row) = stream.next().await {
                let row = row.map_err(db_err(url, "read the snapshot"))?;
                if row.get::<_, i32>(0) != want {
                    return Err(damaged(format!("snapshot chunk {want} of generation {generation} is missing")));
                }
                let bytes: &[u8] = row.get(1);
                f.write_all(bytes).map_err(StoreError::io("write snapshot", &path))?;
                done += bytes.len() as u64;
                want += 1;
                progress(done, total);
            }
            if want != chunks || done != snapshot_len {
                return Err(damaged(format!(
                    "snapshot of generation {generation} has {want} chunks and {done} bytes, expected {chunks} and {snapshot_len}"
                )));
            }
            f.sync_all().map_err(StoreError::io("fsync", &path))?;
        }
        let path = layout.journal_path(gname);
        let mut f = fsutil::create_private(&path)?;
        f.write_all(&header_bytes).map_err(StoreError::io("write journal", &path))?;
        done += header_bytes.len() as u64;
        let stream = client
            .query_raw(
                "SELECT data, seq FROM cln_backup.records WHERE name = $1 AND generation = $2 AND seq < $3 ORDER BY seq",
                params(&[&name, &generation, &upto]),
            )
            .await
            .map_err(db_err(url, "read the records"))?;
        pin_mut!(stream);
        let mut records = 0u64;
        let mut offsets = Vec::new();
        let mut at = header_bytes.len() as u64;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut f);
        while let Some(row) = stream.next().await {
            let row = row.map_err(db_err(url, "read the records"))?;
            let bytes: &[u8] = row.get(0);
            offsets.push((at, row.get::<_, i64>(1)));
            at += bytes.len() as u64;
            out.write_all(bytes).map_err(StoreError::io("write journal", &path))?;
            done += bytes.len() as u64;
            records += 1;
            if records.is_multiple_of(256) {
                progress(done, total);
            }
        }
        out.flush().map_err(StoreError::io("write journal", &path))?;
        drop(out);
        f.sync_all().map_err(StoreError::io("fsync", &path))?;
        progress(done, total);
        fsutil::fsync_dir(&tmp)?;
        Ok(Downloaded {
            name,
            generation: generation as u64,
            base_version,
            records,
            bytes: done,
            dir: to_dir.into(),
            sealed: meta.is_some_and(|m| m.sealed),
            offsets,
        })
    }
    .await;
    let _ = client.batch_execute("COMMIT").await;
    match r {
        Ok(d) => {
            fs::rename(&tmp, to_dir).map_err(StoreError::io("rename into place", to_dir))?;
            fsutil::fsync_dir(fsutil::parent_of(to_dir))?;
            Ok(d)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// A scratch directory beside `near`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(near: &Path, what: &str) -> Result<Scratch, PgError> {
        let parent = fsutil::parent_of(near);
        let base = near.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let p = parent.join(format!(".{base}.{what}.{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::DirBuilder::new().mode(0o700).create(&p).map_err(StoreError::io("create directory", &p))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Restores backup `name` into `dest` (a new file or a directory): downloads it beside
/// `dest`, then runs the local restore on it, with the key rules of a file backup (`keys`,
/// then hsm_secret beside `dest`, then where the metadata says it was at init). Nothing is
/// written at `dest` unless every record opens. `fetched` sees the download's progress.
pub fn restore_from(
    url_str: &str,
    name: Option<&str>,
    dest: &Path,
    keys: &KeySource,
    fetched: &mut dyn FnMut(u64, u64),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary, Downloaded), PgError> {
    let dest_file = restore::resolve_dest(dest);
    if fs::symlink_metadata(&dest_file).is_ok() {
        return Err(StoreError::Exists { path: dest_file }.into());
    }
    let scratch = Scratch::new(&dest_file, "download")?;
    let dir = scratch.0.join("backup");
    let d = download(url_str, name, &dir, fetched)?;
    let shown = url::redact(url_str);
    let (path, summary) = restore::restore_with(&dir, dest, keys, progress).map_err(|e| on_pg(&shown, &d, e))?;
    Ok((path, summary, d))
}

/// Verifies backup `name`: downloads it to a scratch dir under `work` and checks every
/// checksum and the version chain, and with the key (as for a file backup) every seal.
pub fn verify_from(
    url_str: &str,
    name: Option<&str>,
    work: &Path,
    keys: &KeySource,
    fetched: &mut dyn FnMut(u64, u64),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Summary, Downloaded), PgError> {
    let scratch = Scratch::new(&work.join("verify"), "download")?;
    let dir = scratch.0.join("backup");
    let d = download(url_str, name, &dir, fetched)?;
    let shown = url::redact(url_str);
    let summary = restore::verify_with(&dir, keys, progress).map_err(|e| on_pg(&shown, &d, e))?;
    Ok((summary, d))
}

/// An error of the local engine on a download, said of the backup in PostgreSQL (the
/// scratch directory means nothing to the operator).
fn on_pg(url: &str, d: &Downloaded, e: StoreError) -> PgError {
    match e {
        StoreError::Key { what, .. } => {
            StoreError::Key { path: format!("{url} (backup '{}')", d.name).into(), what }.into()
        }
        e => d.locate(url, e),
    }
}

/// What a compaction may fold: generation `generation`'s records before `fold_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgPlan {
    pub generation: i64,
    pub fold_seq: i64,
}

/// A new generation uploaded beside the live one, not yet current.
#[derive(Debug, Clone)]
pub struct PreparedGeneration {
    pub from_generation: i64,
    pub generation: i64,
    pub fold_seq: i64,
    pub base_version: u32,
    pub snapshot_bytes: u64,
}

/// Builds the next generation of `plan` in the background, on its own connection: downloads
/// what it folds (one consistent view), rebuilds the database in `work_dir`, compresses a new
/// snapshot and uploads it in chunks under the next generation number. Appends go on
/// meanwhile; `PgDestination::install_generation` then makes it current.
/// A sealed backup's records are opened with the key `keys` finds (the writer's), and the
/// new snapshot is sealed by `sealer` (None: plaintext).
pub fn build_generation(
    url_str: &str,
    name: &str,
    plan: PgPlan,
    work_dir: &Path,
    sealing: Option<(&Sealer, &KeySource)>,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<PreparedGeneration, PgError> {
    let o = one_off(url_str)?;
    let name = name_of(&o.pg, Some(name))?.unwrap_or_default();
    let url = o.pg.display.as_str();
    let client = &o.session.client;
    let scratch = Scratch::new(&work_dir.join("compact"), "build")?;
    let src = scratch.0.join("fold");
    o.rt.block_on(download_in(
        client,
        url,
        Some(name.clone()),
        Some((plan.generation, plan.fold_seq)),
        &src,
        &mut |a, b| progress("download", a, b),
    ))?;
    let db = scratch.0.join("db.sqlite3");
    let keys = sealing.map(|(_, k)| k.clone()).unwrap_or_default();
    let (_, summary) = restore::restore_with(&src, &db, &keys, &mut |a, b| progress("rebuild", a, b))?;
    if summary.sealed != sealing.is_some() {
        return Err(PgError::Chain {
            url: url.into(),
            name: name.clone(),
            what: format!(
                "the backup is {} but the writer holds it as {}: it was replaced meanwhile",
                if summary.sealed { "sealed" } else { "plaintext" },
                if sealing.is_some() { "sealed" } else { "plaintext" }
            ),
        });
    }
    let sealer = sealing.map(|(s, _)| s);
    let generation = plan.generation + 1;
    let next = scratch.0.join("next");
    fs::DirBuilder::new().mode(0o700).create(&next).map_err(StoreError::io("create directory", &next))?;
    let header =
        Header { generation: generation as u64, base: Base::Snapshot(summary.version), sealed: sealer.is_some() };
    let gname = GenName { generation: generation as u64, base_version: summary.version };
    let layout = Layout::new(&next);
    crate::snapshot::write(
        &layout.snapshot_path(gname),
        generation as u64,
        summary.version,
        &db,
        &mut fsutil::Throttle::unlimited(),
        sealer,
    )?;
    crate::writer::write_journal(&layout.journal_path(gname), &header, &[])?;
    let local = read_local(&next)?;
    let snapshot_bytes = local.snapshot.as_ref().and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len());
    o.rt.block_on(async {
        // leftovers of an interrupted compaction (never current) go first
        client
            .execute(
                "DELETE FROM cln_backup.snapshot_chunks WHERE name = $1 AND generation >= $2",
                &[&name, &generation],
            )
            .await
            .map_err(db_err(url, "remove an unfinished generation"))?;
        client
            .execute("DELETE FROM cln_backup.records WHERE name = $1 AND generation >= $2", &[&name, &generation])
            .await
            .map_err(db_err(url, "remove an unfinished generation"))?;
        client
            .execute("DELETE FROM cln_backup.generations WHERE name = $1 AND generation >= $2", &[&name, &generation])
            .await
            .map_err(db_err(url, "remove an unfinished generation"))?;
        upload_generation(client, url, &name, generation, &local, &mut |a, b| progress("upload", a, b)).await
    })?;
    Ok(PreparedGeneration {
        from_generation: plan.generation,
        generation,
        fold_seq: plan.fold_seq,
        base_version: summary.version,
        snapshot_bytes,
    })
}

/// The switch: one transaction that copies the records after the fold into the new
/// generation and makes it current. Appends wait on the backups row for just this long.
pub(super) async fn switch(
    client: &Client,
    url: &str,
    name: &str,
    state: State,
    next: &PreparedGeneration,
    sealer: Option<&Sealer>,
) -> Result<(), PgError> {
    let chain = |what: String| PgError::Chain { url: url.into(), name: name.into(), what };
    if state.generation != next.from_generation {
        return Err(chain(format!(
            "the new generation was built from generation {} but the backup is at {}",
            next.from_generation, state.generation
        )));
    }
    client.batch_execute("BEGIN").await.map_err(db_err(url, "begin the switch"))?;
    let r = async {
        let g: i64 = client
            .query_one("SELECT generation FROM cln_backup.backups WHERE name = $1 FOR UPDATE", &[&name])
            .await
            .map_err(db_err(url, "lock the backup row"))?
            .get(0);
        if g != next.from_generation {
            return Err(chain(format!("the backup moved to generation {g} during the compaction")));
        }
        match sealer {
            None => {
                client
                    .execute(
                        "INSERT INTO cln_backup.records (name, generation, seq, data_version, kind, data)
                         SELECT name, $3, seq, data_version, kind, data FROM cln_backup.records
                          WHERE name = $1 AND generation = $2 AND seq >= $4",
                        &[&name, &g, &next.generation, &next.fold_seq],
                    )
                    .await
                    .map_err(db_err(url, "copy the records after the fold"))?;
            }
            Some(s) => reseal_after_fold(client, url, name, g, next, s).await?,
        }
        client
            .execute(
                "UPDATE cln_backup.backups SET generation = $2, updated = now() WHERE name = $1",
                &[&name, &next.generation],
            )
            .await
            .map_err(db_err(url, "switch generations"))?;
        client.batch_execute("COMMIT").await.map_err(db_err(url, "commit the switch"))
    }
    .await;
    if r.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    r
}

/// Sealed records are bound to their generation and offset: the ones after the fold point
/// are opened and sealed again for their place in the new generation (same lengths), as
/// the file writer's switch does.
async fn reseal_after_fold(
    client: &Client,
    url: &str,
    name: &str,
    from: i64,
    next: &PreparedGeneration,
    sealer: &Sealer,
) -> Result<(), PgError> {
    let fold_at: i64 = client
        .query_one(
            "SELECT coalesce(sum(length(data)), 0)::bigint FROM cln_backup.records
              WHERE name = $1 AND generation = $2 AND seq < $3",
            &[&name, &from, &next.fold_seq],
        )
        .await
        .map_err(db_err(url, "size the folded records"))?
        .get(0);
    let rows = client
        .query(
            "SELECT seq, data FROM cln_backup.records WHERE name = $1 AND generation = $2 AND seq >= $3 ORDER BY seq",
            &[&name, &from, &next.fold_seq],
        )
        .await
        .map_err(db_err(url, "read the records after the fold"))?;
    let mut old = Vec::new();
    let mut seqs = Vec::with_capacity(rows.len());
    for r in &rows {
        let data: &[u8] = r.get(1);
        seqs.push((r.get::<_, i64>(0), data.len()));
        old.extend_from_slice(data);
    }
    let src = Path::new(url);
    let old_at = journal::HEADER_LEN + fold_at as u64;
    let from_p = Payloads::Sealed { sealer, generation: from as u64 };
    let to_p = Payloads::Sealed { sealer, generation: next.generation as u64 };
    let new = journal::transcode(src, &old, old_at, from_p, journal::HEADER_LEN, to_p)?;
    let insert = client
        .prepare(
            "INSERT INTO cln_backup.records (name, generation, seq, data_version, kind, data)
             SELECT name, $3, seq, data_version, kind, $5 FROM cln_backup.records
              WHERE name = $1 AND generation = $2 AND seq = $4",
        )
        .await
        .map_err(db_err(url, "prepare the resealed records"))?;
    let mut p = 0usize;
    for (seq, len) in seqs {
        let data = new.get(p..p + len).ok_or_else(|| PgError::Damaged {
            url: url.into(),
            name: name.into(),
            what: format!("the record at seq {seq} changed length when sealed again"),
        })?;
        client
            .execute(&insert, &[&name, &from, &next.generation, &seq, &data])
            .await
            .map_err(db_err(url, "copy the records after the fold"))?;
        p += len;
    }
    Ok(())
}

/// A whole generation of a file copy of this backup (`files`: up to its `journal_len`),
/// read for `install`. Its metadata must be this backup's (same sealing, same id): its
/// seals are stored as they are.
pub(super) fn read_install(
    files: &crate::destination::GenerationFiles,
    sealed: bool,
    backup_id: Option<crate::seal::BackupId>,
) -> Result<LocalGeneration, String> {
    let local =
        read_generation(&files.journal, files.snapshot.clone(), Some(files.journal_len)).map_err(|e| e.to_string())?;
    let meta = Meta::load(fsutil::parent_of(&files.journal)).map_err(|e| e.to_string())?;
    let (their_sealed, their_id) = (meta.as_ref().is_some_and(|m| m.sealed), meta.as_ref().and_then(|m| m.id()));
    if local.header.generation != files.generation {
        return Err("the copy's generation changed while it was read".into());
    }
    if local.header.sealed != sealed || their_sealed != sealed || (sealed && their_id != backup_id) {
        return Err(format!(
            "the copy at {} is not this backup ({} backup, id {}): not installed",
            files.journal.display(),
            if their_sealed { "a sealed" } else { "a plaintext" },
            meta.map_or("none".into(), |m| m.backup_id)
        ));
    }
    Ok(local)
}

/// Makes `local` (from `read_install`) the backup's current generation in one
/// transaction: its rows replace any of that generation or newer, and the position moves
/// with them. Older generations are left for `remove_old_generations`.
pub(super) async fn install(client: &Client, url: &str, name: &str, local: &LocalGeneration) -> Result<(), PgError> {
    let generation = local.header.generation as i64;
    client.batch_execute("BEGIN").await.map_err(db_err(url, "begin the install"))?;
    let r = async {
        client
            .query_one("SELECT generation FROM cln_backup.backups WHERE name = $1 FOR UPDATE", &[&name])
            .await
            .map_err(db_err(url, "lock the backup row"))?;
        for table in ["snapshot_chunks", "records", "generations"] {
            client
                .execute(
                    &format!("DELETE FROM cln_backup.{table} WHERE name = $1 AND generation >= $2"),
                    &[&name, &generation],
                )
                .await
                .map_err(db_err(url, "remove what the install replaces"))?;
        }
        upload_generation(client, url, name, generation, local, &mut |_: u64, _: u64| {}).await?;
        insert_records(client, url, name, generation, 0, &local.records).await?;
        let last_tx_seq = local.last_tx.map_or(-1, |i| i as i64);
        client
            .execute(
                "UPDATE cln_backup.backups SET generation = $2, next_seq = $3, last_version = $4, droppable = $5,
                        last_tx_seq = $6, updated = now() WHERE name = $1",
                &[
                    &name,
                    &generation,
                    &(local.records.len() as i64),
                    &(local.position.version as i64),
                    &local.position.droppable,
                    &last_tx_seq,
                ],
            )
            .await
            .map_err(db_err(url, "switch to the installed generation"))?;
        client.batch_execute("COMMIT").await.map_err(db_err(url, "commit the install"))
    }
    .await;
    if r.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    r
}

/// Removes the rows of generations before the current one, in small transactions so
/// no step holds locks or WAL for long. Returns the rows removed.
pub fn remove_old_generations(url_str: &str, name: &str, progress: &mut dyn FnMut(u64)) -> Result<u64, PgError> {
    let o = one_off(url_str)?;
    let name = name_of(&o.pg, Some(name))?.unwrap_or_default();
    let url = o.pg.display.as_str();
    let client = &o.session.client;
    o.rt.block_on(async {
        let current: i64 = client
            .query_opt("SELECT generation FROM cln_backup.backups WHERE name = $1", &[&name])
            .await
            .map_err(db_err(url, "read the backup"))?
            .ok_or_else(|| PgError::NotFound { url: url.into(), name: name.clone(), known: String::new() })?
            .get(0);
        let mut removed = 0u64;
        for (table, step) in [("snapshot_chunks", 8i64), ("records", 2000), ("generations", 100)] {
            let sql = format!(
                "DELETE FROM cln_backup.{table} WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM cln_backup.{table} WHERE name = $1 AND generation < $2 LIMIT $3))"
            );
            loop {
                let n =
                    client.execute(&sql, &[&name, &current, &step]).await.map_err(db_err(url, "remove old rows"))?;
                if n == 0 {
                    break;
                }
                removed += n;
                progress(removed);
            }
        }
        Ok(removed)
    })
}

/// The SQL that deletes every row of one backup: the tables that hold its bytes first,
/// its `backups` row last.
const DROP_BACKUP: [&str; 4] = [
    "DELETE FROM cln_backup.snapshot_chunks WHERE name = $1",
    "DELETE FROM cln_backup.records WHERE name = $1",
    "DELETE FROM cln_backup.generations WHERE name = $1",
    "DELETE FROM cln_backup.backups WHERE name = $1",
];

/// Deletes every row of backup `name` (the URL's `backup=` wins) in one transaction: undoes
/// a `create` whose copy is not kept (init or add-destination failing after it). Refuses
/// while a writer holds the backup's advisory lock. Returns the rows deleted.
pub fn drop_backup(url_str: &str, name: &str) -> Result<u64, PgError> {
    let o = one_off(url_str)?;
    let name = name_of(&o.pg, Some(name))?.unwrap_or_default();
    let url = o.pg.display.as_str();
    let client = &o.session.client;
    o.rt.block_on(async {
        check_schema(client, url).await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(&name)])
            .await
            .map_err(db_err(url, "take the backup's advisory lock"))?
            .get(0);
        if !locked {
            return Err(PgError::Locked { url: url.into(), name: name.clone() });
        }
        client.batch_execute("BEGIN").await.map_err(db_err(url, "begin"))?;
        let r = async {
            let mut removed = 0u64;
            for sql in DROP_BACKUP {
                removed += client.execute(sql, &[&name]).await.map_err(db_err(url, "delete the backup's rows"))?;
            }
            client.batch_execute("COMMIT").await.map_err(db_err(url, "commit the removal"))?;
            Ok(removed)
        }
        .await;
        if r.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        r
    })
}
