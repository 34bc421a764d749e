//! The `log` crate's backend in the plugin: each record becomes a `log` notification to
//! lightningd, written in order through the one stdout writer.
//!
//! `warn!` is lightningd's UNUSUAL, used for halts and operator mistakes; `error!` would be
//! BROKEN (a bug: pyln-testing fails a test on it), so the plugin does not use it.

use log::{Level, LevelFilter, Log, Metadata, Record};

use super::protocol::Output;

struct Lightningd {
    out: Output,
}

impl Log for Lightningd {
    fn enabled(&self, m: &Metadata) -> bool {
        // Our own records, and warnings from the crates under us.
        m.level() <= Level::Warn || m.target().starts_with("cln_backup")
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug | Level::Trace => "debug",
        };
        self.out.log(level, &r.args().to_string());
    }

    fn flush(&self) {}
}

/// Installs the logger for the process; a second call (tests) keeps the first.
pub fn install(out: Output) {
    if log::set_boxed_logger(Box::new(Lightningd { out })).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}
