//! The plugin's options: each a name, a default and a description, declared once as
//! cln-plugin typed options, so that `lightning-cli listconfigs` and `help` show them.

use cln_plugin::options::{
    DefaultBooleanConfigOption, DefaultIntegerConfigOption, DefaultStringConfigOption, StringConfigOption,
    Value as OptValue,
};

pub const AUTOCOMPACT: DefaultBooleanConfigOption = DefaultBooleanConfigOption::new_bool_with_default(
    "backup-autocompact",
    true,
    "Compact the backup in the background when the journal grows past both thresholds below.",
);

pub const COMPACT_MIN_JOURNAL: DefaultIntegerConfigOption = DefaultIntegerConfigOption::new_i64_with_default(
    "backup-compact-min-journal",
    64 << 20,
    "Automatic compaction waits until the journal holds at least this many bytes (default 64 MiB).",
);

pub const COMPACT_RATIO: DefaultStringConfigOption = DefaultStringConfigOption::new_str_with_default(
    "backup-compact-ratio",
    "2.0",
    "Automatic compaction waits until the journal is this many times the snapshot's size.",
);

/// Dynamic: `lightning-cli setconfig backup-compact-io-rate N` applies from the next compaction.
pub const COMPACT_IO_RATE: DefaultIntegerConfigOption = DefaultIntegerConfigOption::new_i64_with_default(
    "backup-compact-io-rate",
    32 << 20,
    "Compaction writes and frees at most this many bytes a second on the backup's disk, so db_write keeps it \
     (default 32 MiB/s; 0 = no limit). Can be changed at runtime with setconfig.",
);

pub const MIN_DESTINATIONS: DefaultIntegerConfigOption = DefaultIntegerConfigOption::new_i64_with_default(
    "backup-min-destinations",
    0,
    "How many backup destinations must hold every write for lightningd to go on (0 = all of them). With \
     fewer than all, a failed destination is marked behind and brought up to date in the background.",
);

pub const RECONNECT_TIMEOUT: DefaultIntegerConfigOption = DefaultIntegerConfigOption::new_i64_with_default(
    "backup-reconnect-timeout",
    60,
    "Seconds a network destination (postgres://, socket:) may take to reconnect, or to commit a write, while \
     lightningd waits; after that the write counts as failed there (halt, or behind under backup-min-destinations).",
);

/// The Python plugin's option, still found in old configs: accepted, warned about, ignored.
pub const LEGACY_DESTINATION: StringConfigOption = StringConfigOption::new_str_no_default(
    "backup-destination",
    "Deprecated (the Python backup plugin's option): ignored; the destination is read from backup.lock.",
);

/// The Python plugin's own words, so operators searching their logs find them.
pub const LEGACY_DESTINATION_WARNING: &str =
    "The `--backup-destination` option is deprecated and will be removed in future versions of the backup plugin.";

/// Names of the options that `setconfig` may change while the plugin runs.
pub const DYNAMIC: [&str; 1] = [COMPACT_IO_RATE.name];

/// Values in force, from init's `options` (defaults until init).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub autocompact: bool,
    pub min_journal: u64,
    pub ratio: f64,
    /// Bytes a second for compaction's disk work; 0 = no limit.
    pub io_rate: u64,
    /// Destinations that must hold every write; 0 = all.
    pub min_destinations: usize,
    /// The bound on a network destination's reconnects and commits, in seconds.
    pub reconnect_timeout_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            autocompact: true,
            min_journal: 64 << 20,
            ratio: 2.0,
            io_rate: 32 << 20,
            min_destinations: 0,
            reconnect_timeout_s: 60,
        }
    }
}

/// One option's value as lightningd gave it. cln-plugin's typed getters panic on a type they
/// do not expect, so values are read through this instead.
fn as_u64(v: &OptValue) -> Option<u64> {
    match v {
        OptValue::Integer(i) => u64::try_from(*i).ok(),
        OptValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn shown(v: &OptValue) -> String {
    match v {
        OptValue::Integer(i) => i.to_string(),
        OptValue::String(s) => format!("'{s}'"),
        OptValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

impl Settings {
    /// Reads the options (`get` gives a value by name, None for the default); an unusable
    /// value is an error naming the option.
    pub fn from_values(get: impl Fn(&str) -> Option<OptValue>) -> Result<Settings, String> {
        let mut s = Settings::default();
        if let Some(v) = get(AUTOCOMPACT.name) {
            s.autocompact = match &v {
                OptValue::Boolean(b) => *b,
                OptValue::String(t) if t == "true" || t == "false" => t == "true",
                _ => return Err(format!("{} must be true or false, not {}", AUTOCOMPACT.name, shown(&v))),
            };
        }
        if let Some(v) = get(COMPACT_MIN_JOURNAL.name) {
            s.min_journal = as_u64(&v)
                .ok_or_else(|| format!("{} must be a number of bytes, not {}", COMPACT_MIN_JOURNAL.name, shown(&v)))?;
        }
        if let Some(v) = get(COMPACT_IO_RATE.name) {
            s.io_rate = parse_io_rate(&v)?;
        }
        if let Some(v) = get(RECONNECT_TIMEOUT.name) {
            s.reconnect_timeout_s = as_u64(&v).filter(|n| *n > 0).ok_or_else(|| {
                format!("{} must be a number of seconds above 0, not {}", RECONNECT_TIMEOUT.name, shown(&v))
            })?;
        }
        if let Some(v) = get(MIN_DESTINATIONS.name) {
            s.min_destinations = as_u64(&v).map(|n| n as usize).ok_or_else(|| {
                format!("{} must be a number of destinations (0 = all), not {}", MIN_DESTINATIONS.name, shown(&v))
            })?;
        }
        if let Some(v) = get(COMPACT_RATIO.name) {
            let text = match &v {
                OptValue::String(t) => t.clone(),
                OptValue::Integer(i) => i.to_string(),
                _ => String::new(),
            };
            s.ratio = text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| format!("{} must be a number like 2.0, not {}", COMPACT_RATIO.name, shown(&v)))?;
        }
        Ok(s)
    }

    /// Why the backup should be compacted now, in words, or None.
    pub fn reason_to_compact(&self, journal: u64, snapshot: u64) -> Option<String> {
        if !self.autocompact || journal < self.min_journal || (journal as f64) < self.ratio * snapshot as f64 {
            return None;
        }
        Some(format!(
            "the journal holds {:.1} MB, over {} (min {:.1} MB, ratio {} of the {:.1} MB snapshot)",
            journal as f64 / 1e6,
            COMPACT_MIN_JOURNAL.name,
            self.min_journal as f64 / 1e6,
            self.ratio,
            snapshot as f64 / 1e6
        ))
    }
}

pub fn parse_io_rate(v: &OptValue) -> Result<u64, String> {
    as_u64(v).ok_or_else(|| format!("{} must be a number of bytes a second, not {}", COMPACT_IO_RATE.name, shown(v)))
}

/// A `setconfig` value (JSON) as an option value.
pub fn from_json(v: &serde_json::Value) -> OptValue {
    match v {
        serde_json::Value::Bool(b) => OptValue::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => OptValue::Integer(i),
            None => OptValue::String(n.to_string()),
        },
        serde_json::Value::String(s) => OptValue::String(s.clone()),
        other => OptValue::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, OptValue)]) -> Result<Settings, String> {
        let m: HashMap<String, OptValue> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Settings::from_values(|n| m.get(n).cloned())
    }

    #[test]
    fn settings_and_thresholds() {
        let s = settings(&[]).unwrap();
        assert_eq!(s, Settings::default());
        let s = settings(&[
            ("backup-compact-min-journal", OptValue::Integer(1000)),
            ("backup-compact-ratio", OptValue::String("0.5".into())),
        ])
        .unwrap();
        assert_eq!((s.min_journal, s.ratio), (1000, 0.5));
        assert!(s.reason_to_compact(999, 0).is_none());
        assert!(s.reason_to_compact(1000, 3000).is_none());
        assert!(s.reason_to_compact(1500, 3000).unwrap().contains("journal holds"));
        let off = settings(&[("backup-autocompact", OptValue::Boolean(false))]).unwrap();
        assert!(off.reason_to_compact(u64::MAX, 0).is_none());
        assert!(settings(&[("backup-compact-ratio", OptValue::String("x".into()))])
            .unwrap_err()
            .contains("backup-compact-ratio"));
        let s = settings(&[("backup-compact-io-rate", OptValue::Integer(0))]).unwrap();
        assert_eq!(s.io_rate, 0);
        assert!(settings(&[("backup-compact-io-rate", OptValue::Integer(-1))])
            .unwrap_err()
            .contains("backup-compact-io-rate"));
        assert!(settings(&[("backup-autocompact", OptValue::String("maybe".into()))])
            .unwrap_err()
            .contains("true or false"));
    }

    #[test]
    fn declared_defaults_are_the_settings_defaults() {
        let d = Settings::default();
        let from_decl = settings(&[
            ("backup-autocompact", AUTOCOMPACT.build().default().clone().unwrap()),
            ("backup-compact-min-journal", COMPACT_MIN_JOURNAL.build().default().clone().unwrap()),
            ("backup-compact-ratio", COMPACT_RATIO.build().default().clone().unwrap()),
            ("backup-compact-io-rate", COMPACT_IO_RATE.build().default().clone().unwrap()),
            ("backup-min-destinations", MIN_DESTINATIONS.build().default().clone().unwrap()),
            ("backup-reconnect-timeout", RECONNECT_TIMEOUT.build().default().clone().unwrap()),
        ])
        .unwrap();
        assert_eq!(from_decl, d);
        assert!(matches!(from_json(&serde_json::json!(5)), OptValue::Integer(5)));
    }
}
