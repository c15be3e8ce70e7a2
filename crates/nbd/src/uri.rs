//! NBD URIs (NBD's `doc/uri.md`): `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`,
//! and their TLS forms `nbds://` and `nbds+unix://` (with `?tls-hostname=NAME` for the name the
//! server's certificate must carry, when it is not the host).

use crate::client::Endpoint;
use crate::proto::NBD_DEFAULT_PORT;
use std::path::PathBuf;

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
    /// `nbds://` or `nbds+unix://`: the connection must be upgraded to TLS (STARTTLS).
    pub tls: bool,
    /// `tls-hostname=`: the name to verify in the server's certificate instead of the host.
    pub tls_hostname: Option<String>,
}

/// Longest URI accepted (a sanity bound).
pub const URI_BYTES_MAX: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not an NBD URI (expected nbd:// or nbd+unix://): {0}")]
    Scheme(String),
    #[error("bad host: {0}")]
    Host(String),
    #[error("bad port: {0}")]
    Port(String),
    #[error("bad query: {0}")]
    Query(String),
    #[error("nbd+unix:// needs ?socket=PATH")]
    MissingSocket,
    #[error("bad percent-encoding: {0}")]
    Encoding(String),
    #[error("URI longer than {URI_BYTES_MAX} bytes")]
    TooLong,
}

/// Parses an NBD URI.
pub fn parse(s: &str) -> Result<NbdUri, UriError> {
    if s.len() > URI_BYTES_MAX {
        return Err(UriError::TooLong);
    }
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| UriError::Scheme(s.to_string()))?;
    let scheme = scheme.to_ascii_lowercase();
    let tls = match scheme.as_str() {
        "nbd" | "nbd+unix" => false,
        "nbds" | "nbds+unix" => true,
        _ => return Err(UriError::Scheme(s.to_string())),
    };
    let unix = scheme.ends_with("+unix");
    // Fragment is ignored; query comes after the path.
    let rest = rest.split('#').next().unwrap_or_default();
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    let export = percent_decode(path)?;
    let mut socket = None;
    let mut tls_hostname = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "socket" => socket = Some(percent_decode(v)?),
            "tls-hostname" if tls => tls_hostname = Some(percent_decode(v)?),
            // Accepted for compatibility with libnbd's URIs; lunmpio takes its TLS files from its
            // config (tls_ca, tls_cert, tls_key).
            "tls-certificates" | "tls-psk-file" | "tls-username" | "tls-hostname" => {}
            other => return Err(UriError::Query(format!("unknown parameter {other:?}"))),
        }
    }
    if unix {
        if !authority.is_empty() {
            return Err(UriError::Host(format!(
                "nbd+unix:// takes no host, got {authority:?}"
            )));
        }
        let path = socket
            .filter(|p| !p.is_empty())
            .ok_or(UriError::MissingSocket)?;
        return Ok(NbdUri {
            endpoint: Endpoint::Unix {
                path: PathBuf::from(path),
            },
            export,
            tls,
            tls_hostname,
        });
    }
    if socket.is_some() {
        return Err(UriError::Query("socket= is only for nbd+unix://".into()));
    }
    let (host, port) = parse_authority(authority)?;
    Ok(NbdUri {
        endpoint: Endpoint::Tcp {
            host,
            port,
            bind: None,
        },
        export,
        tls,
        tls_hostname,
    })
}

fn parse_authority(a: &str) -> Result<(String, u16), UriError> {
    if a.contains('@') {
        return Err(UriError::Host("user info is not allowed".into()));
    }
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| UriError::Host(format!("unclosed '[' in {a:?}")))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(UriError::Host(format!("bad IPv6 address {h:?}")));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| UriError::Host(format!("junk after ']' in {a:?}")))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (a.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(UriError::Host("empty host".into()));
    }
    if host.contains(['/', ' ', '[', ']']) || (host.contains(':') && !a.starts_with('[')) {
        return Err(UriError::Host(format!("bad host {host:?}")));
    }
    let port = match port {
        None | Some("") => NBD_DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(UriError::Port(p.to_string())),
            Ok(v) => v,
        },
    };
    Ok((host, port))
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or_else(|| UriError::Encoding(s.to_string()))?;
            let hex = std::str::from_utf8(hex).map_err(|_| UriError::Encoding(s.to_string()))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| UriError::Encoding(s.to_string()))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| UriError::Encoding(format!("{s:?} is not UTF-8 once decoded")))
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
            bind: None,
        }
    }

    #[test]
    fn tcp_forms() {
        let u = parse("nbd://localhost/disk").unwrap();
        assert_eq!(
            u,
            NbdUri {
                endpoint: tcp("localhost", 10809),
                export: "disk".into(),
                tls: false,
                tls_hostname: None,
            }
        );
        assert_eq!(parse("nbd://10.0.0.1:10900/a%20b").unwrap().export, "a b");
        assert_eq!(
            parse("nbd://10.0.0.1:10900/a%20b").unwrap().endpoint,
            tcp("10.0.0.1", 10900)
        );
        assert_eq!(
            parse("nbd://[::1]:1234/x").unwrap().endpoint,
            tcp("::1", 1234)
        );
        assert_eq!(parse("nbd://[::1]/x").unwrap().endpoint, tcp("::1", 10809));
        assert_eq!(parse("nbd://h").unwrap().export, "");
        assert_eq!(parse("nbd://h/").unwrap().export, "");
        assert_eq!(parse("nbd://h/a/b").unwrap().export, "a/b");
    }

    #[test]
    fn unix_forms() {
        let u = parse("nbd+unix:///lun0?socket=/tmp/s.sock").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Unix {
                path: "/tmp/s.sock".into()
            }
        );
        assert_eq!(u.export, "lun0");
        assert_eq!(parse("nbd+unix://?socket=/s").unwrap().export, "");
        assert_eq!(parse("nbd+unix:///").unwrap_err(), UriError::MissingSocket);
        assert!(matches!(
            parse("nbd+unix://host/x?socket=/s"),
            Err(UriError::Host(_))
        ));
    }

    #[test]
    fn errors() {
        let t = parse("nbds://h:10900/x?tls-hostname=storage.example").unwrap();
        assert_eq!(
            (t.tls, t.tls_hostname.as_deref()),
            (true, Some("storage.example"))
        );
        assert_eq!(t.endpoint, tcp("h", 10900));
        let u = parse("nbds+unix:///x?socket=/s").unwrap();
        assert!(u.tls && u.tls_hostname.is_none());
        assert!(
            !parse("nbd://h/x?tls-hostname=y").unwrap().tls,
            "plain stays plain"
        );
        assert_eq!(
            parse("nbd://h/x?tls-hostname=y").unwrap().tls_hostname,
            None
        );
        assert!(matches!(parse("http://h/x"), Err(UriError::Scheme(_))));
        assert!(matches!(parse("h/x"), Err(UriError::Scheme(_))));
        assert!(matches!(parse("nbd://h:0/x"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://h:99999/x"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://h:x/x"), Err(UriError::Port(_))));
        assert!(matches!(parse("nbd://[::1/x"), Err(UriError::Host(_))));
        assert!(matches!(parse("nbd://[zz]/x"), Err(UriError::Host(_))));
        assert!(matches!(parse("nbd:///x"), Err(UriError::Host(_))));
        assert!(matches!(parse("nbd://h/%zz"), Err(UriError::Encoding(_))));
        assert!(matches!(parse("nbd://h/x?foo=1"), Err(UriError::Query(_))));
        assert!(matches!(
            parse("nbd://h/x?socket=/s"),
            Err(UriError::Query(_))
        ));
    }
}
