//! The durability routines, each in exactly one place.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

/// Creates a new file readable only by its owner; fails if it exists.
pub fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            StoreError::Exists { path: path.into() }
        } else {
            StoreError::io("create", path)(e)
        }
    })
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).map_err(StoreError::io("fsync directory", dir))
}

pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The temp name used while `path` is being written: same directory, so rename is atomic.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes a whole file durably or not at all: tmp, write, fsync, rename, fsync dir.
/// The temp file is removed on every error path. Fails if `path` exists and `replace` is false.
pub fn write_atomic(path: &Path, replace: bool, fill: impl FnOnce(&mut File, &Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    // A leftover from a crash is ours to replace: it was never renamed into place.
    let _ = fs::remove_file(&tmp);
    let mut file = create_private(&tmp)?;
    let mut cleanup = true;
    let result = (|| {
        fill(&mut file, &tmp)?;
        file.sync_all().map_err(StoreError::io("fsync", &tmp))?;
        drop(file);
        if replace {
            fs::rename(&tmp, path).map_err(StoreError::io("rename into place", path))?;
        } else {
            // link() refuses an existing target, unlike rename().
            fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    StoreError::Exists { path: path.into() }
                } else {
                    StoreError::io("link into place", path)(e)
                }
            })?;
            let _ = fs::remove_file(&tmp);
        }
        cleanup = false;
        fsync_dir(parent_of(path))
    })();
    if cleanup {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A writer that fdatasyncs every `every` bytes, so a large file reaches the disk in small
/// steps: one big flush at the end would make a concurrent small fdatasync (a db_write)
/// wait behind all of it.
pub struct Paced<'a> {
    file: &'a File,
    pos: u64,
    unsynced: u64,
    every: u64,
}

impl<'a> Paced<'a> {
    pub const STEP: u64 = 4 << 20;

    pub fn new(file: &'a File, pos: u64) -> Paced<'a> {
        Paced { file, pos, unsynced: 0, every: Paced::STEP }
    }
}

impl io::Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        self.unsynced += buf.len() as u64;
        if self.unsynced >= self.every {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Removes a large file in small steps (truncate 8 MiB, fdatasync, pause 2 ms). Unlinking
/// a gigabyte at once frees its blocks in one filesystem transaction, and a concurrent
/// fdatasync (a db_write) waits for that commit: 140 ms measured on ext4. For background
/// work only.
pub fn remove_gradually(path: &Path) -> Result<()> {
    const STEP: u64 = 8 << 20;
    if let Ok(f) = OpenOptions::new().write(true).open(path) {
        let mut len = f.metadata().map(|m| m.len()).unwrap_or(0);
        while len > STEP {
            len -= STEP;
            f.set_len(len).map_err(StoreError::io("truncate", path))?;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    fs::remove_file(path).map_err(StoreError::io("remove", path))
}

/// Lowers the calling thread's CPU and I/O priority, for background work that must not
/// slow down db_write (best effort: ignored where not permitted).
pub fn background_priority() {
    // SAFETY: plain syscalls on the calling thread, with constant arguments.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << 13)
        libc::syscall(libc::SYS_ioprio_set, 1, tid, 3 << 13);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn write_atomic_creates_private_file_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, false, |f, _| f.write_all(b"abc").map_err(StoreError::io("write", "f"))).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!tmp_path(&p).exists());
        // no replace: refuses
        let e = write_atomic(&p, false, |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, StoreError::Exists { .. }), "{e}");
        assert!(!tmp_path(&p).exists());
        // replace works, leftover tmp is overwritten
        fs::write(tmp_path(&p), b"junk").unwrap();
        write_atomic(&p, true, |f, _| f.write_all(b"new").map_err(StoreError::io("write", "f"))).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn write_atomic_failure_removes_tmp_and_keeps_old() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"old").unwrap();
        let e = write_atomic(&p, true, |f, _| {
            f.write_all(b"partial").unwrap();
            Err(StoreError::Invalid { path: "x".into(), what: "injected".into() })
        });
        assert!(e.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn write_atomic_in_missing_dir_is_io_error() {
        let e = write_atomic(Path::new("/nonexistent-dir-xyz/f"), false, |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert!(e.explain().contains("What to do"));
    }
}
