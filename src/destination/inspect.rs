//! What a copy of the backup holds, read without the writer's lock: for choosing the most
//! advanced copy to restore from, and for `add-destination` to seed from it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::behind::{Behind, Listing};
use super::{GenerationFiles, Target, Tip};
use crate::journal::Kind;
use crate::reader::View;
use crate::versions::Position;

#[derive(Debug, Clone)]
pub struct Copy {
    pub url: String,
    /// A remote copy's local download, which `files` points into; removed with the Copy.
    pub scratch: Option<std::sync::Arc<Scratch>>,
    pub tip: Tip,
    /// When its journal was last written (the file's mtime).
    pub last_write: Option<SystemTime>,
    pub files: GenerationFiles,
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new, not yet existing path in the temp directory.
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch = Scratch(std::env::temp_dir().join(format!("cln-backup-inspect-{}-{n}", std::process::id())));
        let _ = std::fs::remove_dir_all(&scratch.0);
        scratch
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a copy's current generation to its end (checksums included). A copy that cannot
/// be the node's backup as `base`'s backup.lock records it is an error (`check_sealing`).
pub fn inspect(url: &str, base: &Path) -> Result<Copy, String> {
    let c = inspect_unchecked(url, base)?;
    let meta_dir = match &c.scratch {
        Some(s) => Some(s.0.clone()),
        None if c.tip.generation == 0 => None, // a v1 file: plaintext, no backup.json
        None => Some(crate::fsutil::parent_of(&c.files.journal).to_path_buf()),
    };
    check_sealing(url, meta_dir.as_deref(), base)?;
    Ok(c)
}

/// Never restored nor seeded from: a copy that cannot be this node's backup (`check_copy`),
/// e.g. a forged plaintext database at a higher version, for `restore --lightning-dir`.
fn check_sealing(url: &str, meta_dir: Option<&Path>, base: &Path) -> Result<(), String> {
    let meta = match meta_dir {
        Some(d) => crate::meta::Meta::load(d).map_err(|e| format!("{url}: {}", e.explain()))?,
        None => None,
    };
    super::check_copy(base, url, meta.filter(|m| m.sealed).and_then(|m| m.id()).map(|id| crate::keys::hex(&id)))
}

fn inspect_unchecked(url: &str, base: &Path) -> Result<Copy, String> {
    match super::parse(url, base)? {
        Target::File(root) => inspect_dir(url, &root),
        Target::Legacy(path) => inspect_v1(url, &path),
        // A remote copy is read through a local download, kept while the Copy lives.
        Target::Postgres(u) => {
            let scratch = Scratch::new();
            super::postgres::transfer::download(&u, None, &scratch.0, &mut |_, _| {}).map_err(|e| e.explain())?;
            let mut c = inspect_dir(url, &scratch.0)?;
            c.scratch = Some(std::sync::Arc::new(scratch));
            Ok(c)
        }
        // With the node's key and the server's pin as `backup-cli restore socket:...` finds
        // them, from `base` (the lightning dir) first.
        Target::Socket(u) => {
            let scratch = Scratch::new();
            let mut d = super::socket::node::connect_reader(&u, &[base.to_path_buf()]).map_err(|e| format!("{e:#}"))?;
            d.download(&scratch.0, 0, &mut |_, _| {}).map_err(|e| e.to_string())?;
            let mut c = inspect_dir(url, &scratch.0)?;
            c.last_write = None; // the download's time, not the server's last write
            c.scratch = Some(std::sync::Arc::new(scratch));
            Ok(c)
        }
    }
}

fn inspect_dir(url: &str, root: &Path) -> Result<Copy, String> {
    let why = |e: crate::error::StoreError| format!("{url}: {}", e.explain());
    let mut view = View::open(root).map_err(why)?;
    let journal: PathBuf = view.journal.path().to_path_buf();
    let mut position = Position { version: view.header.base.version(), droppable: false };
    let mut tail = 0;
    let mut last_tx_offset = None;
    let mut end = crate::journal::HEADER_LEN;
    while let Some(rec) = view.journal.next_record().map_err(why)? {
        if rec.kind == Kind::Transaction {
            position = Position { version: rec.data_version, droppable: true };
            last_tx_offset = Some(rec.offset);
        }
        tail = rec.header_crc();
        end = rec.end();
    }
    let last_write = std::fs::metadata(&journal).and_then(|m| m.modified()).ok();
    let generation = view.header.generation;
    Ok(Copy {
        url: url.to_string(),
        scratch: None,
        tip: Tip { position, generation, journal_len: end, tail, last_tx_offset },
        last_write,
        files: GenerationFiles {
            generation,
            snapshot: view.snapshot.as_ref().map(|(p, _)| p.clone()),
            journal,
            journal_len: end,
        },
    })
}

/// A v1 file's version, read through it whole. Its `files` name the v1 file itself: it
/// cannot seed a copy (`add-destination` refuses it; `migrate` converts it).
fn inspect_v1(url: &str, path: &Path) -> Result<Copy, String> {
    let s = crate::legacy::verify(path, &mut |_, _| {}).map_err(|e| format!("{url}: {}", e.explain()))?;
    let len = std::fs::metadata(path).map_err(|e| format!("{url}: {e}"))?.len();
    Ok(Copy {
        url: url.to_string(),
        scratch: None,
        tip: Tip {
            position: Position { version: s.version, droppable: false },
            generation: 0,
            journal_len: len,
            tail: 0,
            last_tx_offset: None,
        },
        last_write: std::fs::metadata(path).and_then(|m| m.modified()).ok(),
        files: GenerationFiles { generation: 0, snapshot: None, journal: path.to_path_buf(), journal_len: len },
    })
}

/// The most advanced of the copies that could be read and are not listed in
/// `backup-behind.json`, and why it was chosen, in words. A listed copy lacks writes the
/// others hold, even at the same data_version; when every readable copy is listed, the error
/// says so and none is chosen. Without a list (a backup from before it), copies at the
/// latest version that end differently are an error too: nothing says which is right.
pub fn most_advanced<'a>(
    copies: &'a [Result<Copy, String>],
    listing: &Listing,
    base: &Path,
) -> Result<(&'a Copy, String), String> {
    let none = Behind::default();
    let behind = match listing {
        Listing::Kept(b) => b,
        Listing::Missing => &none,
        Listing::Unreadable(e) => return Err(e.clone()),
    };
    let ok: Vec<&Copy> = copies.iter().filter_map(|c| c.as_ref().ok()).collect();
    let (listed, trusted): (Vec<&Copy>, Vec<&Copy>) = ok.iter().partition(|c| behind.find(&c.url, base).is_some());
    let Some(best) = super::replicas::most_advanced(trusted.iter().copied(), |c| &c.tip) else {
        if listed.is_empty() {
            return Err("none of them can be read".into());
        }
        let each: Vec<String> = listed
            .iter()
            .filter_map(|c| {
                behind.find(&c.url, base).map(|e| format!("{}: {}", super::shown(&c.url), Behind::describe(e)))
            })
            .collect();
        return Err(format!(
            "every copy that can be read missed writes that lightningd committed, so none of them is the node's \
             latest state, and starting lightningd on an old state can lose the funds in its channels: {}. \
             If the copies that hold every write are lost, restore one of these by its URL \
             (`backup-cli restore URL DEST`) only to recover funds as an old state allows (see README)",
            each.join("; ")
        ));
    };
    if *listing == Listing::Missing {
        let differ: Vec<String> = trusted
            .iter()
            .filter(|c| c.tip.position.version == best.tip.position.version && !c.tip.same_end(&best.tip))
            .map(|c| super::shown(&c.url))
            .collect();
        if !differ.is_empty() {
            return Err(format!(
                "{} and {} hold data_version {} but end with different records, and there is no {} (a backup \
                 made before it) to say which one missed writes: one of them may hold a transaction lightningd \
                 never committed. Restore the one you know held every write, by its URL (backup-cli restore URL DEST)",
                super::shown(&best.url),
                differ.join(" and "),
                best.tip.position.version,
                super::behind::FILE_NAME
            ));
        }
    }
    let others: Vec<String> = ok
        .iter()
        .filter(|c| c.url != best.url)
        .map(|c| match behind.find(&c.url, base) {
            Some(e) => format!("{} is not used: {}", super::shown(&c.url), Behind::describe(e)),
            None if c.tip.same_end(&best.tip) => format!("{} holds the same", super::shown(&c.url)),
            None if c.tip.position.version == best.tip.position.version => format!(
                "{} holds data_version {} too, ending with another record (sealed for another place, or a \
                 transaction lightningd never committed)",
                super::shown(&c.url),
                c.tip.position.version
            ),
            None => format!("{} holds only up to data_version {}", super::shown(&c.url), c.tip.position.version),
        })
        .chain(copies.iter().filter_map(|c| c.as_ref().err().map(|e| format!("unreadable: {e}"))))
        .collect();
    let why = if others.is_empty() {
        "it is the only copy".to_string()
    } else {
        format!("it holds data_version {}, the latest; {}", best.tip.position.version, others.join("; "))
    };
    Ok((best, why))
}
