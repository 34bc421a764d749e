//! `postgres://` URLs: libpq's form, plus our own `backup=NAME`, with `sslmode` and
//! `sslrootcert` handled here (tokio-postgres knows no `verify-full`), and the password
//! from the URL, `PGPASSWORD` or the passfile (`PGPASSFILE`, else `~/.pgpass`).

use std::path::{Path, PathBuf};

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;

use super::PgError;

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// `sslmode=disable`.
    Off,
    /// `prefer` (libpq's default) or `require`: encrypted, certificate not checked.
    Unverified { required: bool },
    /// `verify-full`: the chain against `sslrootcert` (or the system's roots) and the host name.
    VerifyFull { root_cert: Option<PathBuf> },
}

#[derive(Clone)]
pub struct PgUrl {
    pub config: Config,
    pub tls: Tls,
    /// `backup=NAME`, when given.
    pub backup: Option<String>,
    /// The URL with its password hidden, for messages and status.
    pub display: String,
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth_host, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let auth_host = match auth_host.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => auth_host.to_string(),
        },
        None => auth_host.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, q)) => {
            let q: Vec<&str> =
                q.split('&').map(|kv| if kv.starts_with("password=") { "password=***" } else { kv }).collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{auth_host}{tail}")
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A backup name: what `backup=` may hold (it also names the advisory lock).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!("backup name '{name}' must be 1 to 200 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
        return Err(format!("backup name '{name}' may hold only letters, digits and - _ . /"));
    }
    Ok(())
}

pub fn parse(url: &str) -> Result<PgUrl, PgError> {
    let display = redact(url);
    let bad = |what: String| PgError::Url { url: display.clone(), what };
    if !is_postgres_url(url) {
        return Err(bad("not a postgres:// URL".into()));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = vec![];
    let mut backup = None;
    let mut sslmode = "prefer".to_string();
    let mut root_cert = None;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("query parameter '{kv}' has no '='")))?;
        let value =
            percent_decode(v).ok_or_else(|| bad(format!("query parameter '{k}' is not valid percent-encoding")))?;
        match k {
            "backup" => {
                check_name(&value).map_err(bad)?;
                backup = Some(value);
            }
            "sslmode" => sslmode = value,
            "sslrootcert" => root_cert = Some(PathBuf::from(value)),
            _ => kept.push(kv),
        }
    }
    let tls = match sslmode.as_str() {
        "disable" => Tls::Off,
        "allow" | "prefer" => Tls::Unverified { required: false },
        "require" => Tls::Unverified { required: true },
        "verify-full" => Tls::VerifyFull { root_cert },
        "verify-ca" => {
            return Err(bad(
                "sslmode=verify-ca is not supported: use sslmode=verify-full (checks the host name too)".into()
            ))
        }
        m => return Err(bad(format!("unknown sslmode '{m}': use disable, prefer, require or verify-full"))),
    };
    let stripped = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    let mut config: Config = stripped.parse().map_err(|e| bad(format!("{e}")))?;
    config.ssl_mode(match tls {
        Tls::Off => SslMode::Disable,
        Tls::Unverified { required: false } => SslMode::Prefer,
        _ => SslMode::Require,
    });
    if config.get_hosts().is_empty() {
        return Err(bad("no host: write postgres://USER@HOST[:PORT]/DB".into()));
    }
    if config.get_user().is_none() {
        return Err(bad("no user: write postgres://USER@HOST[:PORT]/DB".into()));
    }
    if config.get_dbname().is_none() {
        return Err(bad("no database: write postgres://USER@HOST[:PORT]/DB".into()));
    }
    if config.get_password().is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            config.password(p);
        } else if let Some(p) = passfile_password(&config) {
            config.password(p);
        }
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.application_name("cln-backup");
    Ok(PgUrl { config, tls, backup, display })
}

/// Host names as written, for status and messages.
pub fn hosts(config: &Config) -> Vec<String> {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(p) => format!("{}:{port}", p.display()),
            }
        })
        .collect()
}

/// The password of the first matching passfile line (libpq's format: host:port:db:user:password,
/// `*` matches anything, `\` escapes).
fn passfile_password(config: &Config) -> Option<String> {
    let path = match std::env::var_os("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".pgpass"),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let db = config.get_dbname()?;
    let user = config.get_user()?;
    let ports = config.get_ports();
    let candidates: Vec<(String, String)> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(h) => h.clone(),
                Host::Unix(_) => "localhost".to_string(),
            };
            (host, ports.get(i).or(ports.first()).copied().unwrap_or(5432).to_string())
        })
        .collect();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_passfile_line(line);
        if fields.len() != 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if candidates.iter().any(|(h, p)| m(&fields[0], h) && m(&fields[1], p))
            && m(&fields[2], db)
            && m(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(s)) = (chars.next(), out.last_mut()) {
                    s.push(n);
                }
            }
            ':' if out.len() < 5 => out.push(String::new()),
            c => {
                if let Some(s) = out.last_mut() {
                    s.push(c);
                }
            }
        }
    }
    out
}

/// The URL with `backup=NAME` added when it has none, so every later user agrees.
pub fn with_backup_name(url_str: &str, name: &str) -> String {
    let has = url_str.split_once('?').is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("backup=")));
    if has {
        url_str.to_string()
    } else if url_str.contains('?') {
        format!("{url_str}&backup={name}")
    } else {
        format!("{url_str}?backup={name}")
    }
}

/// The default backup name for a node: its lightning dir's name (e.g. `bitcoin`).
pub fn default_name(lightning_dir: &Path) -> Option<String> {
    let abs = std::path::absolute(lightning_dir).ok()?;
    let n = abs.file_name()?.to_string_lossy().into_owned();
    check_name(&n).ok().map(|_| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libpq_urls() {
        let u = parse(
            "postgres://alice:s3cret@db1:5433,db2/lnd?target_session_attrs=read-write&backup=node-1&sslmode=require",
        )
        .unwrap();
        assert_eq!(u.backup.as_deref(), Some("node-1"));
        assert_eq!(u.tls, Tls::Unverified { required: true });
        assert_eq!(hosts(&u.config), vec!["db1:5433", "db2:5432"]);
        assert_eq!(u.config.get_dbname(), Some("lnd"));
        assert_eq!(u.config.get_password(), Some(&b"s3cret"[..]));
        assert!(!u.display.contains("s3cret"), "{}", u.display);
        let u = parse("postgresql://bob@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(u.tls, Tls::VerifyFull { root_cert: Some("/etc/ca.pem".into()) });
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, says) in [
            ("postgres://h/db", "no user"),
            ("postgres://u@h", "no database"),
            ("postgres://u@h/db?sslmode=verify-ca", "verify-full"),
            ("postgres://u@h/db?sslmode=sometimes", "unknown sslmode"),
            ("postgres://u@h/db?backup=a%20b", "may hold only"),
            ("postgres://u@h/db?nonsense=1", "nonsense"),
            ("postgres://u@h:notaport/db", "port"),
            ("mysql://u@h/db", "not a postgres"),
        ] {
            let e = match parse(url) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{url} parsed"),
            };
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://a:pw@h:1/db?x=1"), "postgres://a:***@h:1/db?x=1");
        assert_eq!(redact("postgres://a@h/db?password=pw&x=1"), "postgres://a@h/db?password=***&x=1");
        assert_eq!(redact("postgres://a@h/db"), "postgres://a@h/db");
    }

    #[test]
    fn passfile_lines() {
        assert_eq!(split_passfile_line(r"h:*:db:u:p\:w"), vec!["h", "*", "db", "u", "p:w"]);
    }
}
