//! The durability routines, each in exactly one place.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// How far ahead of its data a journal is allocated and zero-filled.
pub const PREALLOC: u64 = 1 << 20;

/// Appends `bytes` at `offset` durably; `alloc` is how far the file is already allocated and
/// zero-filled. Sequence: write; if that passed `alloc`, zero-fill up to the next `PREALLOC`
/// boundary and fsync (the new length is metadata); else fdatasync, which then has only data
/// blocks to write: no allocation, no length, no journal commit of the filesystem.
/// Readers take trailing zeros for the end of the data (`journal::JournalReader`).
pub fn append_durable(file: &File, offset: u64, bytes: &[u8], alloc: &mut u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let end = offset + bytes.len() as u64;
    file.write_all_at(bytes, offset)?;
    if end <= *alloc {
        return file.sync_data();
    }
    let grown = (end / PREALLOC + 1) * PREALLOC;
    let zeros = [0u8; 64 << 10];
    let mut at = end;
    // Short of space for the padding, the record alone still goes in (padding is optional).
    while at < grown {
        let n = (grown - at).min(zeros.len() as u64) as usize;
        if file.write_all_at(&zeros[..n], at).is_err() {
            break;
        }
        at += n as u64;
    }
    file.sync_all()?;
    *alloc = at;
    Ok(())
}

/// Paces background I/O to `rate` bytes a second (0: no limit), so the disk stays free
/// most of the time for db_write's small fdatasyncs. A step charges its bytes once done,
/// then sleeps off what it got ahead; idle time is not saved up for a burst.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    next: Instant,
}

impl Throttle {
    /// Bytes moved between two flushes. Each flush of a step is a stall for a db_write that
    /// arrives meanwhile (about 10 ms for 4 MiB measured here), so steps are few and bounded.
    pub const STEP: u64 = 4 << 20;

    pub fn new(rate: u64) -> Throttle {
        Throttle { rate, next: Instant::now() }
    }

    pub fn unlimited() -> Throttle {
        Throttle::new(0)
    }

    pub fn is_limited(&self) -> bool {
        self.rate > 0
    }

    pub fn charge(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        self.next = self.next.max(now) + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
    }
}

/// Writes a large file from `pos` on in steps of `Throttle::STEP` bytes, so it reaches the
/// disk as it is written: one big flush at the end would make a concurrent small fdatasync
/// (a db_write) wait behind all of it.
pub struct Stepped<'a> {
    file: &'a File,
    pos: u64,
    step_start: u64,
    throttle: Option<&'a mut Throttle>,
}

impl<'a> Stepped<'a> {
    /// Background work beside db_write: each step is fdatasynced, then charged to `throttle`.
    pub fn paced(file: &'a File, pos: u64, throttle: &'a mut Throttle) -> Stepped<'a> {
        Stepped { file, pos, step_start: pos, throttle: Some(throttle) }
    }

    /// A file fsynced once at the end (a restore): each step's writeback starts without
    /// waiting, so the disk works while the caller computes and the final fsync is short.
    pub fn streaming(file: &'a File, pos: u64) -> Stepped<'a> {
        Stepped { file, pos, step_start: pos, throttle: None }
    }
}

impl io::Write for Stepped<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        let len = self.pos - self.step_start;
        if len >= Throttle::STEP {
            match self.throttle.as_deref_mut() {
                Some(t) => {
                    self.file.sync_data()?;
                    t.charge(len);
                }
                None => start_writeback(self.file, self.step_start, len),
            }
            self.step_start = self.pos;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `produce` with a writer whose bytes a second thread writes to `file` from `pos` on
/// (through `Stepped::streaming`), so producing them (decompression) and copying them into the page
/// cache run on two cores. At most a few MiB are in flight. Errors name `path`.
pub fn write_in_background<T>(
    file: &File,
    pos: u64,
    path: &Path,
    produce: impl FnOnce(&mut dyn io::Write) -> Result<T>,
) -> Result<T> {
    use std::sync::mpsc::sync_channel;
    let (full_tx, full_rx) = sync_channel::<Vec<u8>>(4);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(8);
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<()> {
            let mut out = Stepped::streaming(file, pos);
            for mut buf in full_rx {
                io::Write::write_all(&mut out, &buf)?;
                buf.clear();
                let _ = free_tx.try_send(buf);
            }
            Ok(())
        });
        let mut w = Handoff { full: full_tx, free: free_rx, buf: Vec::with_capacity(Handoff::CHUNK) };
        let produced = produce(&mut w);
        let sent = w.send();
        drop(w); // closes the channel: the writer finishes
        let written = writer.join().unwrap_or_else(|_| Err(io::Error::other("the writing thread panicked")));
        // The writer's error comes first: the producer then only saw a closed channel.
        written.map_err(StoreError::io("write", path))?;
        let v = produced?;
        sent.map_err(StoreError::io("write", path))?;
        Ok(v)
    })
}

/// The producing side of `write_in_background`: fills buffers and hands them over.
struct Handoff {
    full: std::sync::mpsc::SyncSender<Vec<u8>>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Handoff {
    const CHUNK: usize = 1 << 20;

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self.free.try_recv().unwrap_or_else(|_| Vec::with_capacity(Handoff::CHUNK));
        let full = std::mem::replace(&mut self.buf, next);
        self.full.send(full).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the writing thread stopped"))
    }
}

impl io::Write for Handoff {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(Handoff::CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == Handoff::CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts writing a range of dirty pages to disk without waiting (a hint: errors show up
/// at the fsync that follows).
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor we own, with no pointers.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Opens a file of a backup for reading, with a shared lock held until it is closed, so
/// `remove_gradually` never shrinks it under the reader. None if the file is gone or being
/// removed: its generation was replaced, so the caller lists the backup again.
pub fn open_for_reading(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match f.try_lock_shared() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Ok(None),
        // No locks on this filesystem (some network mounts): read anyway. Its writer could
        // not lock the backup either, so no compaction frees files under us there.
        Err(fs::TryLockError::Error(_)) => {}
    }
    // Unlinked between our open and our lock: being removed.
    if f.metadata()?.nlink() == 0 {
        return Ok(None);
    }
    Ok(Some(f))
}

/// Removes a file of a replaced generation, freeing its blocks 1 MiB at a time: unlink
/// (new readers no longer find it), wait for readers that opened it before (their shared
/// lock), then truncate step by step, charging each step.
///
/// Why in steps: freed blocks cost the disk more than written ones where the filesystem
/// discards them (ext4 `discard`, most VM disks). Freeing a gigabyte at once stalled a
/// concurrent fdatasync (a db_write) 140 ms here; 4 MiB steps at 16 MiB/s still 20-37 ms
/// every few seconds; 1 MiB steps at 8 MiB/s never over 8 ms. So a freed byte is charged as
/// `FREE_COST` written ones (8 made the cleanup twice as long with no fewer slow hooks in
/// the benchmark). Without a limit: a plain unlink.
/// `freed` gets the bytes of each step; together, the file's whole length.
pub fn remove_gradually(path: &Path, throttle: &mut Throttle, freed: &mut dyn FnMut(u64)) -> Result<()> {
    const FREE_STEP: u64 = 1 << 20;
    const FREE_COST: u64 = 4;
    if !throttle.is_limited() {
        let len = fs::metadata(path).map_err(StoreError::io("stat", path))?.len();
        fs::remove_file(path).map_err(StoreError::io("remove", path))?;
        freed(len);
        return Ok(());
    }
    let f = OpenOptions::new().write(true).open(path).map_err(StoreError::io("open for removal", path))?;
    fs::remove_file(path).map_err(StoreError::io("remove", path))?;
    f.lock().map_err(StoreError::io("wait for readers of", path))?;
    let mut len = f.metadata().map_err(StoreError::io("stat", path))?.len();
    while len > FREE_STEP {
        len -= FREE_STEP;
        f.set_len(len).map_err(StoreError::io("truncate", path))?;
        freed(FREE_STEP);
        throttle.charge(FREE_STEP * FREE_COST);
    }
    drop(f); // the last step: the inode goes with its last open file
    freed(len);
    Ok(())
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

/// Keeps the calling thread from preempting the thread that wakes it (SCHED_BATCH; best
/// effort). For a replica worker: woken on the caller's CPU, it would otherwise run its
/// whole append before the caller starts its own, which then waits for both in turn.
/// Instead it runs as soon as the caller blocks in its fdatasync, or on another CPU.
pub fn no_wakeup_preemption() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0), with a valid sched_param.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
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
    fn throttle_paces_and_unlimited_does_not() {
        // a lower bound only: sleeping never takes less than asked
        let mut t = Throttle::new(16 << 20);
        let start = Instant::now();
        for _ in 0..4 {
            t.charge(1 << 20);
        }
        assert!(start.elapsed() >= Duration::from_millis(240), "{:?}", start.elapsed());
        let mut u = Throttle::unlimited();
        assert!(!u.is_limited());
        let start = Instant::now();
        u.charge(u64::MAX);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn stepped_writes_everything_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
        for streaming in [false, true] {
            let p = dir.path().join(format!("f{streaming}"));
            let f = create_private(&p).unwrap();
            let mut t = Throttle::new(1 << 30);
            {
                let mut w: Box<dyn Write> = if streaming {
                    Box::new(Stepped::streaming(&f, 7))
                } else {
                    Box::new(Stepped::paced(&f, 7, &mut t))
                };
                for chunk in data.chunks(100_000) {
                    w.write_all(chunk).unwrap();
                }
            }
            let got = fs::read(&p).unwrap();
            assert_eq!(&got[..7], &[0u8; 7]);
            assert!(got[7..] == data[..], "streaming={streaming}");
        }
    }

    #[test]
    fn write_in_background_writes_everything_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bg");
        let f = create_private(&p).unwrap();
        let data: Vec<u8> = (0..(5u32 << 20) + 3).map(|i| (i % 253) as u8).collect();
        let n = write_in_background(&f, 3, &p, |w| {
            for c in data.chunks(77_777) {
                w.write_all(c).map_err(StoreError::io("write", "x"))?;
            }
            Ok(42)
        })
        .unwrap();
        assert_eq!(n, 42);
        let got = fs::read(&p).unwrap();
        assert!(got[3..] == data[..]);
        // the producer's error comes back
        let e = write_in_background(&f, 0, &p, |_| -> Result<()> {
            Err(StoreError::Invalid { path: "y".into(), what: "producer failed".into() })
        })
        .unwrap_err();
        assert!(e.to_string().contains("producer failed"), "{e}");
        // a writer that cannot write (read-only handle): its error, naming the path
        let ro = File::open(&p).unwrap();
        let e = write_in_background(&ro, 0, &p, |w| {
            for _ in 0..64 {
                if w.write_all(&[0u8; 1 << 20]).is_err() {
                    break;
                }
            }
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }) && e.to_string().contains("bg"), "{e}");
    }

    #[test]
    fn readers_keep_a_file_whole_until_they_close_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.journal");
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 249) as u8).collect();
        fs::write(&p, &data).unwrap();
        let reader = open_for_reading(&p).unwrap().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = p.clone();
        let remover = std::thread::spawn(move || {
            let r = remove_gradually(&p2, &mut Throttle::new(1 << 30), &mut |_| {});
            tx.send(()).unwrap();
            r
        });
        // the name goes at once; the remover then waits for us
        while p.exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(open_for_reading(&p).unwrap().is_none(), "a removed file must not be opened");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "truncated under a reader");
        use std::os::unix::fs::FileExt;
        let mut back = vec![0u8; data.len()];
        reader.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data);
        drop(reader);
        remover.join().unwrap().unwrap();
    }

    #[test]
    fn remove_gradually_removes_with_and_without_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        for rate in [0, 1 << 30] {
            let p = dir.path().join(format!("big{rate}"));
            fs::write(&p, vec![1u8; (Throttle::STEP * 2 + 5) as usize]).unwrap();
            let mut freed = 0;
            remove_gradually(&p, &mut Throttle::new(rate), &mut |n| freed += n).unwrap();
            assert_eq!(freed, Throttle::STEP * 2 + 5, "rate {rate}: every byte is reported freed");
            assert!(!p.exists());
        }
        let e = remove_gradually(&dir.path().join("missing"), &mut Throttle::new(1 << 30), &mut |_| {}).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
    }

    #[test]
    fn write_atomic_in_missing_dir_is_io_error() {
        let e = write_atomic(Path::new("/nonexistent-dir-xyz/f"), false, |_, _| Ok(())).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert!(e.explain().contains("What to do"));
    }
}
