//! Typed errors of the storage layer. Each says what happened and where, carries a hint
//! for the operator, and says whether retrying the same operation may succeed.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: damaged data at offset {offset}: {what}")]
    Damaged { path: PathBuf, offset: u64, what: String },
    #[error("{path} is not a cln-backup backup: {what}")]
    NotBackup { path: PathBuf, what: String },
    #[error("{path} is in use by another writer (a running plugin or backup-cli)")]
    Locked { path: PathBuf },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    /// The key of a sealed backup is missing, wrong or unreadable.
    #[error("{path}: {what}")]
    Key { path: PathBuf, what: String },
    #[error("{path}: could not apply data_version {version} (offset {offset}): {what}")]
    Apply { path: PathBuf, offset: u64, version: u32, what: String },
    /// A network destination's failure, already worded by its own error type.
    #[error("{what}")]
    Remote { what: String, hint: &'static str, retryable: bool },
}

impl StoreError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }

    /// What the operator should do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            StoreError::Io { source, .. } => match source.raw_os_error() {
                Some(28) | Some(122) => "the backup disk is full: free space on it, then start lightningd again",
                Some(30) => "the backup filesystem is read-only: remount it read-write, then start lightningd again",
                Some(13) | Some(1) => "permission denied: give the user running lightningd access to the backup path",
                Some(5) => "the disk reported an I/O error: check the device (dmesg), and keep the backup until checked",
                Some(2) | Some(20) => "the path is gone: check that the backup filesystem is mounted",
                _ => "check the backup path and its filesystem, then try again",
            },
            StoreError::Damaged { .. } => {
                "the backup is damaged before its end: keep this copy, run `backup-cli verify`, and make a new backup with `backup-cli init`"
            }
            StoreError::NotBackup { .. } => "check the URL: it must name a backup made by `backup-cli init`",
            StoreError::Locked { .. } => "stop the other writer first (only one plugin or backup-cli may write a backup)",
            StoreError::Exists { .. } => "choose another path, or move the existing one away",
            StoreError::Invalid { .. } => "check the arguments and the backup",
            StoreError::Key { .. } => {
                "restore and verify take --hsm-secret PATH (the node's hsm_secret) or --key-file PATH; the plugin \
                 reads hsm_secret in its lightning dir, or the key file given to `backup-cli init --key-file`"
            }
            StoreError::Apply { .. } => {
                "SQLite refused statements the backup holds: keep the backup and report this message as a bug"
            }
            StoreError::Remote { hint, .. } => hint,
        }
    }

    /// Whether the same operation may succeed later without anyone repairing data.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Locked { .. } | StoreError::Remote { retryable: true, .. })
    }

    /// The message with its hint, for logs and the command line.
    pub fn explain(&self) -> String {
        format!("{self}. What to do: {}", self.hint())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
