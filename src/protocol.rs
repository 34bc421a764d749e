//! lightningd's plugin protocol over stdio: JSON-RPC 2.0 objects, each followed by a blank
//! line. Stdout belongs to this protocol; everything the plugin says goes through `Output`.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// Reads one message after another until EOF.
pub fn messages<R: Read>(r: R) -> impl Iterator<Item = serde_json::Result<Value>> {
    serde_json::Deserializer::from_reader(r).into_iter::<Value>()
}

#[derive(Debug, Clone, Copy)]
pub enum Level {
    Debug,
    Info,
    /// lightningd's UNUSUAL: for halts and operator mistakes (BROKEN is for bugs).
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// The plugin's stdout, shared between threads; one message is written and flushed whole.
#[derive(Clone)]
pub struct Output {
    inner: Arc<Mutex<(Box<dyn Write + Send>, Vec<u8>)>>,
}

impl Output {
    pub fn new(w: Box<dyn Write + Send>) -> Output {
        Output { inner: Arc::new(Mutex::new((w, Vec::with_capacity(4096)))) }
    }

    pub fn stdout() -> Output {
        Output::new(Box::new(io::stdout()))
    }

    pub fn send(&self, msg: &Value) -> io::Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (w, buf) = &mut *guard;
        buf.clear();
        serde_json::to_writer(&mut *buf, msg)?;
        buf.extend_from_slice(b"\n\n");
        w.write_all(buf)?;
        w.flush()
    }

    pub fn respond(&self, id: &Value, result: Value) -> io::Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    pub fn respond_error(&self, id: &Value, code: i64, message: &str) -> io::Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
    }

    pub fn log(&self, level: Level, message: &str) {
        // A failed log write means lightningd is gone; the read loop will see EOF.
        let _ = self.send(&json!({
            "jsonrpc": "2.0",
            "method": "log",
            "params": {"level": level.as_str(), "message": message},
        }));
    }
}
