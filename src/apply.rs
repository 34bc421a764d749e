//! Building a database from statements: the one place where restore, compaction and the
//! Python plugin's v1 reader run SQL, and check what they built.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::error::{Result, StoreError};
use crate::journal::Kind;

pub const DB_NAME: &str = "lightningd.sqlite3";

/// What a restore or verify went through.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub generation: u64,
    pub snapshot_version: Option<u32>,
    pub version: u32,
    pub records: u64,
    pub transactions: u64,
    pub statements: u64,
    pub bytes: u64,
    pub torn_tail: Option<(u64, u64)>,
    pub seconds: f64,
    /// What could not be checked (older formats without checksums, sealed data without the key).
    pub unverified: Vec<String>,
    /// Whether the backup is sealed, and the fingerprint of its key (from backup.json).
    pub sealed: bool,
    pub key_fingerprint: Option<String>,
    /// Where the key that opened the backup came from.
    pub key_origin: Option<String>,
}

/// Where a restore writes: DEST itself, or DEST/lightningd.sqlite3 when DEST is a directory.
pub fn resolve_dest(dest: &Path) -> PathBuf {
    if dest.is_dir() {
        dest.join(DB_NAME)
    } else {
        dest.to_path_buf()
    }
}

/// Executes records on a database the way lightningd did: transactions inside one
/// (consecutive ones share a single SQLite transaction, for speed), statements that ran
/// outside any transaction outside one.
pub struct Applier<'c> {
    conn: &'c Connection,
    in_tx: bool,
    pub statements: u64,
}

impl<'c> Applier<'c> {
    pub fn new(conn: &'c Connection) -> Applier<'c> {
        Applier { conn, in_tx: false, statements: 0 }
    }

    /// Continues on a connection whose transaction an earlier applier left open.
    pub fn resume(conn: &'c Connection, in_tx: bool) -> Applier<'c> {
        Applier { conn, in_tx, statements: 0 }
    }

    pub fn in_transaction(&self) -> bool {
        self.in_tx
    }

    pub fn apply<S: AsRef<str>>(&mut self, kind: Kind, statements: &[S]) -> rusqlite::Result<()> {
        match (kind, self.in_tx) {
            (Kind::Transaction, false) => {
                self.conn.execute_batch("BEGIN")?;
                self.in_tx = true;
            }
            (Kind::Outside, true) => self.commit()?,
            _ => {}
        }
        for s in statements {
            self.conn.execute_batch(s.as_ref())?;
            self.statements += 1;
        }
        Ok(())
    }

    pub fn commit(&mut self) -> rusqlite::Result<()> {
        if self.in_tx {
            self.conn.execute_batch("COMMIT")?;
            self.in_tx = false;
        }
        Ok(())
    }
}

/// Opens a database being rebuilt: no rollback journal (a failed build is thrown away),
/// and foreign keys on, as on lightningd's own connection.
pub fn open_build_db(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(sql_err(path))?;
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA foreign_keys = ON; PRAGMA cache_size = -16384;",
    )
    .map_err(sql_err(path))?;
    Ok(conn)
}

pub fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Invalid { path: path.into(), what: format!("SQLite: {e}") }
}

/// Final checks of a rebuilt database: a plain file (no WAL), intact, at the expected version.
pub fn finish_db(conn: &Connection, path: &Path, version: u32) -> Result<()> {
    let e = sql_err(path);
    conn.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(())).map_err(&e)?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(&e)?;
    if check != "ok" {
        return Err(StoreError::Invalid { path: path.into(), what: format!("integrity check failed: {check}") });
    }
    let dv: Option<i64> =
        conn.query_row("SELECT intval FROM vars WHERE name = 'data_version'", [], |r| r.get(0)).map_err(&e)?;
    if dv != Some(version as i64) {
        return Err(StoreError::Invalid {
            path: path.into(),
            what: format!("restored database says data_version {dv:?}, the backup's last version is {version}"),
        });
    }
    Ok(())
}
