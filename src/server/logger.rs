//! Log lines on stderr: `LEVEL message`, or `<N>message` (syslog priority) when stderr is
//! the systemd journal, which then records the level itself.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    journald: bool,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Info
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.journald {
            let p = match r.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                _ => 7,
            };
            format!("<{p}>{}\n", r.args())
        } else {
            format!("{:<5} {}\n", r.level(), r.args())
        };
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

/// Installs the logger once (later calls do nothing).
pub fn init() {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    if log::set_boxed_logger(Box::new(Stderr { journald })).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}
