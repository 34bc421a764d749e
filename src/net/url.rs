//! `socket:` URLs, in the Python backup plugin's syntax:
//!
//! ```text
//! socket:127.0.0.1:8700
//! socket:[::1]:8700                                 IPv6 literals in brackets
//! socket:backup.example:8700
//! socket:xyz.onion:8700?proxy=socks5:127.0.0.1:9050 the proxy resolves the name (Tor)
//! ```

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name (or .onion), resolved here or, behind a proxy, by the proxy.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Endpoint {
    /// The host as a connect target: an IP literal without brackets, or the name.
    pub fn host_str(&self) -> String {
        match &self.host {
            Host::Ip(a) => a.to_string(),
            Host::Name(n) => n.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketUrl {
    pub server: Endpoint,
    /// A SOCKS5 proxy to connect through (Tor's is 127.0.0.1:9050).
    pub socks5: Option<Endpoint>,
}

impl fmt::Display for SocketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "socket:{}", self.server)?;
        if let Some(p) = &self.socks5 {
            write!(f, "?proxy=socks5:{p}")?;
        }
        Ok(())
    }
}

pub fn is_socket_url(url: &str) -> bool {
    url.starts_with("socket:")
}

/// Parses `HOST:PORT`, `[IPV6]:PORT`; `what` names the part in errors.
pub fn parse_endpoint(s: &str, what: &str, url: &str) -> Result<Endpoint, String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("'{url}': the {what} '{s}' opens '[' but never closes it; write [IPV6]:PORT"))?;
        let ip: std::net::Ipv6Addr =
            addr.parse().map_err(|_| format!("'{url}': '{addr}' in the {what} is not an IPv6 address"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("'{url}': the {what} '{s}' has no port; write [{addr}]:PORT"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!("'{url}': the {what} '{s}' has no port; write {s}:PORT (e.g. {s}:8700)"));
        };
        if host.contains(':') {
            return Err(format!(
                "'{url}': the {what} '{s}' looks like an IPv6 address without brackets; write [ADDRESS]:PORT, e.g. [::1]:8700"
            ));
        }
        if host.is_empty() {
            return Err(format!("'{url}': the {what} '{s}' has no host"));
        }
        let h = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => {
                if !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_') {
                    return Err(format!("'{url}': '{host}' in the {what} is not a valid host name"));
                }
                Host::Name(host.to_string())
            }
        };
        (h, port)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("'{url}': '{port}' in the {what} is not a port (1-65535)")),
    };
    Ok(Endpoint { host, port })
}

/// Parses a `socket:` URL; errors say what is wrong and how to write it.
pub fn parse(url: &str) -> Result<SocketUrl, String> {
    let rest =
        url.strip_prefix("socket:").ok_or_else(|| format!("'{url}' is not a socket: URL; write socket:HOST:PORT"))?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (addr, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if addr.is_empty() {
        return Err(format!("'{url}' names no server; write socket:HOST:PORT"));
    }
    let server = parse_endpoint(addr, "server", url)?;
    let mut socks5 = None;
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        if k != "proxy" {
            return Err(format!("'{url}': unknown parameter '{k}'; the only one is ?proxy=socks5:HOST:PORT"));
        }
        let (kind, target) = v.split_once(':').unwrap_or((v, ""));
        if kind != "socks5" && kind != "socks5h" {
            return Err(format!(
                "'{url}': unknown proxy type '{kind}'; only SOCKS5 is supported: ?proxy=socks5:127.0.0.1:9050"
            ));
        }
        let target = target.strip_prefix("//").unwrap_or(target);
        socks5 = Some(parse_endpoint(target, "proxy", url)?);
    }
    Ok(SocketUrl { server, socks5 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls() {
        let u = parse("socket:127.0.0.1:8700").unwrap();
        assert_eq!(u.server, Endpoint { host: Host::Ip("127.0.0.1".parse().unwrap()), port: 8700 });
        assert_eq!(u.socks5, None);
        let u = parse("socket:[::1]:8700").unwrap();
        assert_eq!(u.server.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(u.server.host_str(), "::1");
        assert_eq!(u.to_string(), "socket:[::1]:8700");
        let u = parse("socket:backup.example:8700").unwrap();
        assert_eq!(u.server.host, Host::Name("backup.example".into()));
        let u = parse("socket:abcdefxyz.onion:8700?proxy=socks5:127.0.0.1:9050").unwrap();
        assert_eq!(u.server.host, Host::Name("abcdefxyz.onion".into()));
        assert_eq!(u.socks5.as_ref().unwrap().port, 9050);
        assert_eq!(u.to_string(), "socket:abcdefxyz.onion:8700?proxy=socks5:127.0.0.1:9050");
        let u = parse("socket:h:1?proxy=socks5:[::1]:9050").unwrap();
        assert_eq!(u.socks5.unwrap().host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(parse("socket://h:1").unwrap().server.port, 1);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let e = |u: &str| parse(u).unwrap_err();
        assert!(e("socket:localhost").contains("has no port"), "{}", e("socket:localhost"));
        assert!(e("socket:[::1]").contains("has no port"));
        assert!(e("socket:::1:8700").contains("without brackets"));
        assert!(e("socket:fe80::1:8700").contains("[ADDRESS]:PORT"));
        assert!(e("socket:h:8700?proxy=http:127.0.0.1:8080").contains("unknown proxy type 'http'"));
        assert!(e("socket:h:8700?proxy=socks4:1.2.3.4:1").contains("only SOCKS5"));
        assert!(e("socket:h:99999").contains("not a port"));
        assert!(e("socket:h:0").contains("not a port"));
        assert!(e("socket:h:abc").contains("not a port"));
        assert!(e("socket:h:8700?proxy=socks5:127.0.0.1").contains("proxy '127.0.0.1' has no port"));
        assert!(e("socket:h:8700?foo=bar").contains("unknown parameter 'foo'"));
        assert!(e("socket:").contains("names no server"));
        assert!(e("socket:[::1:8700").contains("never closes"));
        assert!(e("socket:[nothex]:1").contains("not an IPv6"));
        assert!(e("socket::8700").contains("no host"));
        assert!(e("socket:a b:1").contains("not a valid host name"));
        assert!(e("file:///x").contains("not a socket: URL"));
    }
}
