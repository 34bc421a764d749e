//! lightningd's plugin protocol over stdio: JSON-RPC 2.0 objects, each followed by a blank
//! line. Stdout belongs to this protocol; everything the plugin says (its own answers,
//! cln-plugin's messages and log lines) goes through the one `Output`, a message at a time.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

/// A message from lightningd, parsed without copying: params stay raw until the method is known.
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(borrow)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    pub params: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Response<'a> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a Value>,
}

/// Splits a byte stream into whole JSON values, reading in large blocks; each value's bytes
/// are handed out as a slice so callers can parse them borrowed (no per-byte reads, no
/// copies of the SQL strings).
pub struct Framer<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: Read> Framer<R> {
    pub fn new(r: R) -> Framer<R> {
        Framer { r, buf: vec![0; 1 << 16], start: 0, end: 0 }
    }

    /// The next whole value, None at a clean EOF, or an error for bytes that are not JSON.
    pub fn next_value(&mut self) -> Option<io::Result<&[u8]>> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let mut it = serde_json::Deserializer::from_slice(avail).into_iter::<serde::de::IgnoredAny>();
            match it.next() {
                Some(Ok(_)) => {
                    let len = it.byte_offset();
                    let v = &avail[..len];
                    let skip = v.iter().take_while(|b| b.is_ascii_whitespace()).count();
                    let (s, e) = (self.start + skip, self.start + len);
                    self.start = e;
                    return Some(Ok(&self.buf[s..e]));
                }
                Some(Err(e)) if !e.is_eof() => return Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
                _ => {}
            }
            // Need more bytes: make room, then read.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    let rest = &self.buf[self.start..self.end];
                    if rest.iter().all(|b| b.is_ascii_whitespace()) {
                        return None;
                    }
                    return Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "input ends inside a message")));
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The plugin's stdout, shared between threads; one message is written and flushed whole.
/// The sink and a reused buffer, so a message goes out in one write.
type Sink = (Box<dyn Write + Send>, Vec<u8>);

#[derive(Clone)]
pub struct Output {
    inner: Arc<Mutex<Sink>>,
}

impl Output {
    pub fn new(w: Box<dyn Write + Send>) -> Output {
        Output { inner: Arc::new(Mutex::new((w, Vec::with_capacity(4096)))) }
    }

    pub fn stdout() -> Output {
        Output::new(Box::new(io::stdout()))
    }

    pub fn send<T: Serialize>(&self, msg: &T) -> io::Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (w, buf) = &mut *guard;
        buf.clear();
        serde_json::to_writer(&mut *buf, msg)?;
        buf.extend_from_slice(b"\n\n");
        w.write_all(buf)?;
        w.flush()
    }

    /// Answers a request; `id` is echoed byte for byte.
    pub fn respond(&self, id: &RawValue, result: &Value) -> io::Result<()> {
        self.send(&Response { jsonrpc: "2.0", id, result: Some(result), error: None })
    }

    pub fn respond_error(&self, id: &RawValue, code: i64, message: &str) -> io::Result<()> {
        let error = json!({"code": code, "message": message});
        self.send(&Response { jsonrpc: "2.0", id, result: None, error: Some(&error) })
    }

    /// Writes one whole message that is already JSON (cln-plugin's output, re-framed).
    pub fn send_raw(&self, json: &[u8]) -> io::Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (w, buf) = &mut *guard;
        buf.clear();
        buf.extend_from_slice(json);
        buf.extend_from_slice(b"\n\n");
        w.write_all(buf)?;
        w.flush()
    }

    /// A `log` notification; lightningd writes it to its log at `level`.
    pub fn log(&self, level: &str, message: &str) {
        // A failed log write means lightningd is gone; the read loop will see EOF.
        let _ = self.send(&json!({
            "jsonrpc": "2.0",
            "method": "log",
            "params": {"level": level, "message": message},
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes a few at a time, like a pipe.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(self.0.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn framer_splits_values_across_reads() {
        // Each read rescans the pending bytes: fine for pipe-sized reads, quadratic for
        // byte-sized ones, so the big message goes with realistic read sizes.
        for (step, size) in [(1, 3000), (7, 3000), (4096, 200_000), (1 << 20, 200_000)] {
            let big = "x".repeat(size);
            let input = format!("{{\"a\": 1}}\n\n {{\"id\": \"cli:x#1/cln:y#2\", \"s\": \"{big}\"}}\n\n[1,2]\n\n");
            let mut f = Framer::new(Trickle(input.as_bytes(), step));
            assert_eq!(f.next_value().unwrap().unwrap(), br#"{"a": 1}"#);
            let v: Value = serde_json::from_slice(f.next_value().unwrap().unwrap()).unwrap();
            assert_eq!(v["s"].as_str().unwrap().len(), size);
            assert_eq!(f.next_value().unwrap().unwrap(), b"[1,2]");
            assert!(f.next_value().is_none());
        }
        let mut f = Framer::new(Trickle(b"{\"a\": }", 3));
        assert_eq!(f.next_value().unwrap().unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut f = Framer::new(Trickle(b"{\"a\": 1", 3));
        assert_eq!(f.next_value().unwrap().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
