//! The rules that decide what a db_write call means for the backup.
//!
//! Every call has a *base*: the data_version the node's database had when the call's
//! statements ran. A transaction carries lightningd's bump `... AND intval = N` as its last
//! statement and the version N+1, so its base is N. A statement run outside any transaction
//! (the `PRAGMA foreign_keys` pairs around migrations) carries the version of the last
//! commit and no bump, so its base is its own version. The backup holds everything up to
//! its last transaction's version L. Then:
//!
//! * base == L: the node is where the backup is: append.
//! * base == L-1 and the journal's last transaction is L: lightningd died (or the call was
//!   refused) between the hook and its commit, so L never happened: drop it, then append.
//! * base > L: the node has versions the backup lacks: halt, "Backup is out of date".
//! * otherwise the backup holds versions the node lacks: halt, the node "lost some state".
//!
//! Versions are u32 and wrap, so "greater" means ahead by less than 2^31.

use crate::journal::Kind;

const BUMP_PREFIX: &str = "UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = ";

/// What a call is, from its statements; an error if its bump disagrees with its version.
pub fn classify<S: AsRef<str>>(data_version: u32, writes: &[S]) -> Result<Kind, String> {
    let Some(last) = writes.last() else {
        return Err("db_write call with no statements".into());
    };
    let Some(n) = last.as_ref().trim_end().trim_end_matches(';').strip_prefix(BUMP_PREFIX) else {
        return Ok(Kind::Outside);
    };
    match n.trim().parse::<u32>() {
        Ok(n) if n.wrapping_add(1) == data_version => Ok(Kind::Transaction),
        _ => Err(format!(
            "db_write call with data_version {data_version} ends with a bump from '{}': \
             lightningd and the call disagree",
            n.trim()
        )),
    }
}

pub fn base_of(data_version: u32, kind: Kind) -> u32 {
    match kind {
        Kind::Transaction => data_version.wrapping_sub(1),
        Kind::Outside => data_version,
    }
}

/// Where the backup stands, as far as the rules need to know.
/// Whether version `a` comes before `b`: data_version wraps at 2^32, so "before" is within
/// half the range behind.
pub fn before(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a);
    d != 0 && d < 1 << 31
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Version of the last transaction the backup holds (the snapshot's if none since).
    pub version: u32,
    /// True when that last transaction is a journal record that can still be dropped.
    pub droppable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Append,
    /// Drop the last transaction (and what follows it), then append.
    ReplaceLast,
    /// The node is ahead of the backup.
    OutOfDate {
        node: u32,
        backup: u32,
    },
    /// The backup is ahead of the node.
    LostState {
        node: u32,
        backup: u32,
    },
}

pub fn decide(pos: Position, data_version: u32, kind: Kind) -> Decision {
    let base = base_of(data_version, kind);
    let l = pos.version;
    if base == l {
        Decision::Append
    } else if pos.droppable && base == l.wrapping_sub(1) {
        Decision::ReplaceLast
    } else if base.wrapping_sub(l) < 1 << 31 {
        Decision::OutOfDate { node: base, backup: l }
    } else {
        Decision::LostState { node: base, backup: l }
    }
}

impl Decision {
    /// The halt message for the log, in the Python plugin's words plus what to do.
    pub fn halt_message(&self) -> Option<String> {
        match *self {
            Decision::OutOfDate { node, backup } => Some(format!(
                "Backup is out of date: the node is at data_version {node} but the backup only holds up to \
                 {backup}, so {} committed change(s) are missing from it. Refusing to let lightningd go on \
                 without a complete backup. To recover: stop lightningd, move backup.lock away, make a new \
                 backup from the current database with `backup-cli init --lightning-dir <lightning-dir> \
                 file:///path/to/new-backup`, then start lightningd.",
                node.wrapping_sub(backup)
            )),
            Decision::LostState { node, backup } => Some(format!(
                "Aborting: the node has lost some state. Its database is at data_version {node} but the backup \
                 already holds version {backup}: the database is older than the backup (restored from an old \
                 copy?). Running on it risks broadcasting revoked states. Do NOT start lightningd on this \
                 database: restore the latest state with `backup-cli restore <backup-url> <lightning-dir>` \
                 after moving the old lightningd.sqlite3 away."
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bump(n: u32) -> String {
        format!("{BUMP_PREFIX}{n}")
    }

    #[test]
    fn classify_calls() {
        assert_eq!(classify(5, &["INSERT", &bump(4)]), Ok(Kind::Transaction));
        assert_eq!(classify(5, &["PRAGMA foreign_keys = OFF;"]), Ok(Kind::Outside));
        assert_eq!(classify(0, &[bump(u32::MAX)]), Ok(Kind::Transaction));
        assert!(classify(5, &[bump(7)]).unwrap_err().contains("disagree"));
        assert!(classify::<&str>(5, &[]).is_err());
    }

    #[test]
    fn rules() {
        let at = |v, droppable| Position { version: v, droppable };
        use Decision::*;
        use Kind::*;
        assert_eq!(decide(at(7, true), 8, Transaction), Append);
        assert_eq!(decide(at(7, true), 7, Outside), Append);
        assert_eq!(decide(at(7, true), 7, Transaction), ReplaceLast);
        // after a restart, a migration pragma comes at the node's committed version
        assert_eq!(decide(at(7, true), 6, Outside), ReplaceLast);
        assert_eq!(decide(at(7, false), 7, Transaction), LostState { node: 6, backup: 7 });
        assert_eq!(decide(at(7, true), 5, Transaction), LostState { node: 4, backup: 7 });
        assert_eq!(decide(at(7, true), 10, Transaction), OutOfDate { node: 9, backup: 7 });
        // wrap-around
        assert_eq!(decide(at(u32::MAX, true), 0, Transaction), Append);
        assert_eq!(decide(at(u32::MAX, true), 5, Transaction), OutOfDate { node: 4, backup: u32::MAX });
        assert_eq!(decide(at(2, true), u32::MAX, Transaction), LostState { node: u32::MAX - 1, backup: 2 });
        assert!(OutOfDate { node: 9, backup: 7 }.halt_message().unwrap().starts_with("Backup is out of date"));
        assert!(LostState { node: 4, backup: 7 }.halt_message().unwrap().contains("lost some state"));
    }
}
