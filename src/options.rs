//! The plugin's options: each a name, a default and a description, in one place.

pub struct Opt {
    pub name: &'static str,
    /// lightningd's option type: "bool", "int" or "string".
    pub kind: &'static str,
    pub default: &'static str,
    pub description: &'static str,
}

pub const AUTOCOMPACT: Opt = Opt {
    name: "backup-autocompact",
    kind: "bool",
    default: "true",
    description: "Compact the backup in the background when the journal grows past both thresholds below.",
};

pub const COMPACT_MIN_JOURNAL: Opt = Opt {
    name: "backup-compact-min-journal",
    kind: "int",
    default: "67108864",
    description: "Automatic compaction waits until the journal holds at least this many bytes (default 64 MiB).",
};

pub const COMPACT_RATIO: Opt = Opt {
    name: "backup-compact-ratio",
    kind: "string",
    default: "2.0",
    description: "Automatic compaction waits until the journal is this many times the snapshot's size.",
};

pub const COMPACT_IO_RATE: Opt = Opt {
    name: "backup-compact-io-rate",
    kind: "int",
    default: "33554432",
    description: "Compaction writes and frees at most this many bytes a second on the backup's disk, so db_write \
                  keeps it (default 32 MiB/s; 0 = no limit).",
};

pub const ALL: [&Opt; 4] = [&AUTOCOMPACT, &COMPACT_MIN_JOURNAL, &COMPACT_RATIO, &COMPACT_IO_RATE];

/// Values in force, from init's `options` (defaults until init).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub autocompact: bool,
    pub min_journal: u64,
    pub ratio: f64,
    /// Bytes a second for compaction's disk work; 0 = no limit.
    pub io_rate: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { autocompact: true, min_journal: 64 << 20, ratio: 2.0, io_rate: 32 << 20 }
    }
}

impl Settings {
    /// Reads init's options; an unusable value is an error naming the option.
    pub fn from_init(options: &serde_json::Value) -> Result<Settings, String> {
        let mut s = Settings::default();
        let get = |o: &Opt| options.get(o.name).filter(|v| !v.is_null());
        if let Some(v) = get(&AUTOCOMPACT) {
            s.autocompact = v.as_bool().or_else(|| v.as_str().map(|t| t == "true")).unwrap_or(s.autocompact);
        }
        if let Some(v) = get(&COMPACT_MIN_JOURNAL) {
            s.min_journal = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|t| t.parse().ok()))
                .ok_or_else(|| format!("{} must be a number of bytes, not {v}", COMPACT_MIN_JOURNAL.name))?;
        }
        if let Some(v) = get(&COMPACT_IO_RATE) {
            s.io_rate = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|t| t.parse().ok()))
                .ok_or_else(|| format!("{} must be a number of bytes a second, not {v}", COMPACT_IO_RATE.name))?;
        }
        if let Some(v) = get(&COMPACT_RATIO) {
            s.ratio = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|t| t.parse().ok()))
                .filter(|r: &f64| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| format!("{} must be a number like 2.0, not {v}", COMPACT_RATIO.name))?;
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

pub fn manifest_options() -> Vec<serde_json::Value> {
    ALL.iter()
        .map(|o| {
            let default = match o.kind {
                "bool" => serde_json::json!(o.default == "true"),
                "int" => serde_json::json!(o.default.parse::<u64>().unwrap_or(0)),
                _ => serde_json::json!(o.default),
            };
            serde_json::json!({"name": o.name, "type": o.kind, "default": default, "description": o.description})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_and_thresholds() {
        let s = Settings::from_init(&json!({})).unwrap();
        assert!(s.autocompact && s.min_journal == 64 << 20);
        let s =
            Settings::from_init(&json!({"backup-compact-min-journal": 1000, "backup-compact-ratio": "0.5"})).unwrap();
        assert_eq!((s.min_journal, s.ratio), (1000, 0.5));
        assert!(s.reason_to_compact(999, 0).is_none());
        assert!(s.reason_to_compact(1000, 3000).is_none());
        assert!(s.reason_to_compact(1500, 3000).unwrap().contains("journal holds"));
        let off = Settings::from_init(&json!({"backup-autocompact": false})).unwrap();
        assert!(off.reason_to_compact(u64::MAX, 0).is_none());
        assert!(Settings::from_init(&json!({"backup-compact-ratio": "x"}))
            .unwrap_err()
            .contains("backup-compact-ratio"));
        assert_eq!(manifest_options().len(), 4);
        assert_eq!(s.io_rate, 32 << 20);
        let s = Settings::from_init(&json!({"backup-compact-io-rate": 0})).unwrap();
        assert_eq!(s.io_rate, 0);
        assert!(Settings::from_init(&json!({"backup-compact-io-rate": -1}))
            .unwrap_err()
            .contains("backup-compact-io-rate"));
        // each default parses back to the value Settings uses
        for o in ALL {
            let s = Settings::from_init(
                &json!({o.name: manifest_options().iter().find(|m| m["name"] == o.name).unwrap()["default"]}),
            )
            .unwrap();
            let d = Settings::default();
            assert_eq!(
                (s.autocompact, s.min_journal, s.ratio, s.io_rate),
                (d.autocompact, d.min_journal, d.ratio, d.io_rate),
                "{}",
                o.name
            );
        }
        assert_eq!(manifest_options()[0]["default"], json!(true));
    }
}
