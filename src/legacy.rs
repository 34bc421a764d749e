//! The Python backup plugin's file format ("v1"): detection, and (later) reading.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::restore::Summary;

/// True when `path` is a regular file starting with a v1 header (u32 big-endian 1).
pub fn is_v1_file(path: &Path) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return false;
    }
    let mut h = [0u8; 4];
    f.read_exact(&mut h).is_ok() && u32::from_be_bytes(h) == 1
}

pub fn restore(
    path: &Path,
    _dest: &Path,
    _progress: &mut dyn FnMut(u64, u64),
) -> Result<(PathBuf, Summary)> {
    Err(StoreError::NotBackup {
        path: path.into(),
        what: "reading Python backup plugin files is not supported yet".into(),
    })
}

pub fn verify(path: &Path, _progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    Err(StoreError::NotBackup {
        path: path.into(),
        what: "reading Python backup plugin files is not supported yet".into(),
    })
}
