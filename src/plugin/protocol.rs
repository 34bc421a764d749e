//! lightningd's plugin protocol over stdio: JSON-RPC 2.0 objects, each followed by a blank
//! line. Stdout belongs to this protocol; everything the plugin says (its own answers,
//! cln-plugin's messages and log lines) goes through the one `Output`, a message at a time.

use std::borrow::Cow;
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

/// lightningd's db_write params. The statements are borrowed from the message (copied
/// only if they hold JSON escapes).
#[derive(Debug)]
pub struct DbWrite<'a> {
    pub data_version: u32,
    pub writes: Vec<Statement<'a>>,
}

/// By hand, because derived structs also take a JSON array (`[7, ["..."]]`): lightningd's
/// params are an object, and anything else is refused as malformed.
impl<'de: 'a, 'a> Deserialize<'de> for DbWrite<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DbWrite<'a>, D::Error> {
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Fields<'a> {
            type Value = DbWrite<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object with data_version and writes")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut m: M) -> Result<DbWrite<'a>, M::Error> {
                use serde::de::Error;
                // keys as an enum: a key read as a string would be copied
                #[derive(Deserialize)]
                #[serde(field_identifier, rename_all = "snake_case")]
                enum Field {
                    DataVersion,
                    Writes,
                    #[serde(other)]
                    Other,
                }
                let (mut data_version, mut writes) = (None, None);
                while let Some(key) = m.next_key::<Field>()? {
                    match key {
                        Field::DataVersion if data_version.is_some() => {
                            return Err(M::Error::duplicate_field("data_version"))
                        }
                        Field::Writes if writes.is_some() => return Err(M::Error::duplicate_field("writes")),
                        Field::DataVersion => data_version = Some(m.next_value()?),
                        Field::Writes => writes = Some(m.next_value()?),
                        Field::Other => drop(m.next_value::<serde::de::IgnoredAny>()?),
                    }
                }
                Ok(DbWrite {
                    data_version: data_version.ok_or_else(|| M::Error::missing_field("data_version"))?,
                    writes: writes.ok_or_else(|| M::Error::missing_field("writes"))?,
                })
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
    }
}

/// serde borrows a `Cow` only where it is a field of its own, never as a `Vec`'s item.
#[derive(Deserialize, Debug)]
pub struct Statement<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl AsRef<str> for Statement<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A db_write request, read in one pass: lightningd waits on it. Anything this does not
/// fit (another method, malformed params) is read again as an `Incoming`.
#[derive(Deserialize)]
pub struct DbWriteRequest<'a> {
    #[serde(borrow)]
    pub id: &'a RawValue,
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    #[serde(borrow)]
    pub params: DbWrite<'a>,
}

/// db_write params that did not fit `DbWriteRequest`, read again to say what is wrong.
pub fn parse_db_write(params: &str) -> Result<DbWrite<'_>, String> {
    if !params.trim_start().starts_with('{') {
        return Err(format!("Malformed db_write call from lightningd: params are {params}, not an object"));
    }
    serde_json::from_str(params).map_err(malformed_db_write)
}

pub fn malformed_db_write(e: serde_json::Error) -> String {
    format!("Malformed db_write call from lightningd ({e}); expected {{\"data_version\": u32, \"writes\": [SQL, ...]}}")
}

/// The db_write hook's answer: `continue`, or anything else, which makes lightningd stop
/// without committing.
#[derive(Serialize, Debug, PartialEq)]
pub struct HookAnswer {
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl HookAnswer {
    pub const CONTINUE: HookAnswer = HookAnswer { result: "continue", reason: None };
    pub const CONTINUE_JSON: &'static str = r#"{"result":"continue"}"#;

    pub fn halt(reason: String) -> HookAnswer {
        HookAnswer { result: "halt", reason: Some(reason) }
    }

    pub fn is_continue(&self) -> bool {
        self.reason.is_none()
    }
}

#[derive(Serialize)]
struct Response<'a, T> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a Value>,
}

/// Splits a byte stream into messages at the blank lines that end them, reading in large
/// blocks; each message's bytes are handed out as a slice, so callers parse them borrowed,
/// once (no per-byte reads, no copies of the SQL strings). lightningd, cln-plugin and
/// cln-rpc all end each message with "\n\n" and put no blank line inside one (JSON strings
/// cannot hold a raw newline), so the cut needs no JSON scan; judging the bytes is the
/// parser's work.
pub struct Framer<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Where the search for the next blank line goes on (bytes before it hold none).
    scanned: usize,
}

impl<R: Read> Framer<R> {
    pub fn new(r: R) -> Framer<R> {
        Framer { r, buf: vec![0; 1 << 16], start: 0, end: 0, scanned: 0 }
    }

    /// The next message, without the whitespace around it; None at EOF. A last message
    /// without its blank line is handed out at EOF too: the parser tells if it is whole.
    pub fn next_value(&mut self) -> Option<io::Result<&[u8]>> {
        loop {
            let from = self.scanned.max(self.start);
            if let Some(e) = blank_line(&self.buf[..self.end], from) {
                let s = self.start;
                self.start = e + 2;
                self.scanned = self.start;
                match trim(&self.buf[s..e]) {
                    (_, 0) => continue, // more blank lines
                    (skip, len) => return Some(Ok(&self.buf[s + skip..s + skip + len])),
                }
            }
            // A "\n" at the end may start the blank line: search it again with the next read.
            self.scanned = self.end.saturating_sub(1).max(self.start);
            // Need more bytes: make room, then read.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.scanned -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    let (s, e) = (self.start, self.end);
                    self.start = e;
                    self.scanned = e;
                    return match trim(&self.buf[s..e]) {
                        (_, 0) => None,
                        (skip, len) => Some(Ok(&self.buf[s + skip..s + skip + len])),
                    };
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Where the first "\n\n" in `b` at or after `from` starts. lightningd's messages hold no
/// raw newline but the one that ends them, so the first newline found is nearly always it.
fn blank_line(b: &[u8], from: usize) -> Option<usize> {
    memchr::memchr_iter(b'\n', &b[from..]).map(|i| from + i).find(|&i| b.get(i + 1) == Some(&b'\n'))
}

/// Where the non-whitespace part of `b` starts, and its length.
fn trim(b: &[u8]) -> (usize, usize) {
    let skip = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let tail = b[skip..].iter().rev().take_while(|c| c.is_ascii_whitespace()).count();
    (skip, b.len() - skip - tail)
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
    pub fn respond<T: Serialize>(&self, id: &RawValue, result: &T) -> io::Result<()> {
        self.send(&Response { jsonrpc: "2.0", id, result: Some(result), error: None })
    }

    /// Answers a request with a result that is already JSON (the db_write hook's `continue`,
    /// on lightningd's clock: no serializer).
    pub fn respond_raw(&self, id: &RawValue, result: &str) -> io::Result<()> {
        let parts = [r#"{"jsonrpc":"2.0","id":"#, id.get(), r#","result":"#, result, "}"];
        self.send_parts(&parts.map(str::as_bytes))
    }

    pub fn respond_error(&self, id: &RawValue, code: i64, message: &str) -> io::Result<()> {
        let error = json!({"code": code, "message": message});
        self.send(&Response::<()> { jsonrpc: "2.0", id, result: None, error: Some(&error) })
    }

    /// Writes one whole message that is already JSON (cln-plugin's output, re-framed).
    pub fn send_raw(&self, json: &[u8]) -> io::Result<()> {
        self.send_parts(&[json])
    }

    /// One message from pieces that are already JSON, and the blank line that ends it.
    fn send_parts(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (w, buf) = &mut *guard;
        buf.clear();
        parts.iter().for_each(|p| buf.extend_from_slice(p));
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

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Hands out its bytes a few at a time, like a pipe; with `hiccups`, every other read
    /// fails with WouldBlock or Interrupted first (a non-blocking pipe, a signal).
    struct Trickle<'a>(&'a [u8], usize, bool, u32);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.3 += 1;
            if self.2 && self.3 % 2 == 1 {
                let kind = if self.3 % 4 == 1 { io::ErrorKind::WouldBlock } else { io::ErrorKind::Interrupted };
                return Err(io::Error::from(kind));
            }
            let n = self.1.min(self.0.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn framer_cuts_at_blank_lines_across_reads() {
        // Skips the failed reads a caller retries (WouldBlock: the stand-in polls, then asks again).
        fn next<R: Read>(f: &mut Framer<R>) -> Option<Vec<u8>> {
            loop {
                match f.next_value()? {
                    Ok(b) => return Some(b.to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        for (step, size) in [(1, 3000), (2, 3000), (7, 3000), (4096, 200_000), (1 << 20, 200_000)] {
            for hiccups in [false, true] {
                let big = "x".repeat(size);
                // a string may hold an escaped blank line; only a raw one ends a message
                let input = format!(
                    "{{\"a\": 1}}\n\n\n\n {{\"id\": \"cli:x#1/cln:y#2\", \"s\": \"{big}\\n\\n\"}}\n\n[1,\n2]\n\n"
                );
                let mut f = Framer::new(Trickle(input.as_bytes(), step, hiccups, 0));
                assert_eq!(next(&mut f).unwrap(), br#"{"a": 1}"#);
                let v: Value = serde_json::from_slice(&next(&mut f).unwrap()).unwrap();
                assert_eq!(v["s"].as_str().unwrap().len(), size + 2);
                assert_eq!(next(&mut f).unwrap(), b"[1,\n2]");
                assert!(next(&mut f).is_none());
            }
        }
        // The framer only cuts; the parser judges what it hands out, a last message without
        // its blank line included.
        let mut f = Framer::new(Trickle(b"{\"a\": }\n\n{\"a\": 1", 3, true, 0));
        assert_eq!(next(&mut f).unwrap(), b"{\"a\": }");
        assert_eq!(next(&mut f).unwrap(), b"{\"a\": 1");
        assert!(next(&mut f).is_none());
        assert!(next(&mut Framer::new(Trickle(b" \n\n\n ", 2, false, 0))).is_none());
    }

    /// Random messages (stray single newlines, runs of blank lines, some large) through
    /// random read sizes with WouldBlock and Interrupted between them: the framer hands out
    /// what cutting the whole input at each blank line gives, no more, no less.
    #[test]
    fn framer_agrees_with_cutting_the_whole_input() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..300 {
            let mut input = String::new();
            for _ in 0..next(6) {
                let len = if next(10) == 0 { 70_000 + next(100_000) } else { next(300) };
                let body: String = (0..len)
                    .map(|k| match next(40) {
                        0 if k > 0 => '\n',
                        1 => ' ',
                        _ => char::from(b'a' + next(26) as u8),
                    })
                    .collect();
                // no blank line inside a message: a stray newline never follows another
                input += &body.replace("\n\n", "\n");
                input += &"\n".repeat(2 + next(3) as usize);
            }
            if next(2) == 0 {
                input += "{\"last\": true"; // a last message cut short, then EOF
            }
            let mut want = Vec::new();
            let mut rest = input.as_str();
            while let Some(i) = rest.find("\n\n") {
                want.push(rest[..i].trim().to_string());
                rest = &rest[i + 2..];
            }
            want.push(rest.trim().to_string());
            want.retain(|m| !m.is_empty());
            let step = [1, 2, 3, 64, 4096, 1 << 20][next(6) as usize];
            let mut f = Framer::new(Trickle(input.as_bytes(), step, next(2) == 0, 0));
            let mut got = Vec::new();
            while let Some(r) = f.next_value() {
                match r {
                    Ok(b) => got.push(String::from_utf8(b.to_vec()).unwrap()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got.len(), want.len(), "step {step}");
            assert!(got == want, "step {step}: the messages differ");
        }
    }

    #[test]
    fn a_db_write_is_read_in_one_pass_in_any_field_order() {
        let msg = br#"{"params": {"writes": ["INSERT INTO t VALUES (1)"], "data_version": 9}, "id": "cln:db_write#7", "jsonrpc": "2.0", "method": "db_write"}"#;
        let call: DbWriteRequest = serde_json::from_slice(msg).unwrap();
        assert_eq!((call.id.get(), &*call.method, call.params.data_version), ("\"cln:db_write#7\"", "db_write", 9));
        assert!(matches!(call.params.writes[0].0, Cow::Borrowed("INSERT INTO t VALUES (1)")));
        // malformed params do not fit it; the message is read again to answer them
        for (params, why) in [
            (r#"{"writes": ["x"]}"#, "missing field `data_version`"),
            (r#"[7, ["x"]]"#, "not an object"),
            (r#"{"data_version": 7, "writes": ["x"], "data_version": 8}"#, "duplicate field `data_version`"),
            (r#"{"data_version": 7, "writes": [1]}"#, "invalid type"),
        ] {
            let bad = format!(r#"{{"jsonrpc": "2.0", "id": 3, "method": "db_write", "params": {params}}}"#);
            assert!(serde_json::from_str::<DbWriteRequest>(&bad).is_err(), "{params}");
            let msg: Incoming = serde_json::from_str(&bad).unwrap();
            let e = parse_db_write(msg.params.unwrap().get()).unwrap_err();
            assert!(e.contains(why), "{params}: {e}");
            // a parsed value (cln-plugin's hook) has no duplicate keys left
            let v: Value = serde_json::from_str(params).unwrap();
            assert_eq!(DbWrite::deserialize(&v).is_err(), !why.starts_with("duplicate"), "{params}");
        }
    }

    #[test]
    fn hook_answers_are_what_lightningd_reads() {
        assert_eq!(serde_json::to_string(&HookAnswer::CONTINUE).unwrap(), HookAnswer::CONTINUE_JSON);
        // written by hand and by serde, the same bytes, the id echoed as it came
        for id in
            [r#""cln:db_write#12""#, r#""cln:db_write#7/cln:\"quoted\"\\id""#, r#""\u00e9""#, "7", r#"{"a": [1, 2]}"#]
        {
            let id: Box<RawValue> = serde_json::from_str(id).unwrap();
            let (sink, by_hand) = (Shared::default(), Shared::default());
            Output::new(Box::new(sink.clone())).respond(&id, &HookAnswer::CONTINUE).unwrap();
            Output::new(Box::new(by_hand.clone())).respond_raw(&id, HookAnswer::CONTINUE_JSON).unwrap();
            assert_eq!(*sink.0.lock().unwrap(), *by_hand.0.lock().unwrap(), "{id}");
            assert!(by_hand.0.lock().unwrap().ends_with(b"}}\n\n"));
            let v: Value = serde_json::from_slice(&by_hand.0.lock().unwrap()).unwrap();
            assert_eq!(v["id"], serde_json::from_str::<Value>(id.get()).unwrap());
        }
        let halt = serde_json::to_string(&HookAnswer::halt("why".into())).unwrap();
        assert_eq!(halt, r#"{"result":"halt","reason":"why"}"#);
    }
}
