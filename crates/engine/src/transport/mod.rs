//! Path transports: how one path reaches the storage.
//!
//! A path is named by a URI (docs/OPERATIONS.md, paths): `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`
//! (both served by [`lunmpio_nbd::client`]) or `file:///PATH` (a local regular file or block device, I/O
//! on the blocking thread pool so the async runtime never waits on the disk).
//!
//! The engine sees every transport through one small surface, enum-dispatched (no boxing on the per-I/O
//! path): a [`PathTarget`] knows how to connect; a [`PathConnection`] carries requests. Requests and
//! replies are the NBD client's own [`Request`] / [`Reply`]: the export decodes NBD, the engine routes,
//! and an NBD path forwards without translation. A request that fails comes back inside [`Failed`],
//! with whether it may have reached the storage; the engine keeps its own copy of every request it
//! sends (a clone: payloads are `Bytes` handles) and re-drives that one.
//!
//! One conformance suite (`tests/conformance.rs`) runs against every transport.

mod file;
mod nbd;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lunmpio_nbd::NbdErrno;
pub use lunmpio_nbd::{BlockSize, TransmissionFlags};
pub use lunmpio_nbd::{Reply, Request};

pub use self::file::{FileConnection, FileTarget};
pub use self::nbd::{NbdConnection, NbdInFlight};

/// The geometry of a volume, in one type for both sides of the LUN: what a connected path reports of
/// the volume behind it (compared across the LUN's paths: size, read-only flag and, where the
/// transport reports one, identity), and what the export shows its clients (settled from the LUN's
/// declared identity or its paths' first answers; its flags the intersection of what the paths can do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    pub read_only: bool,
    /// Capabilities in NBD terms (SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_CACHE,
    /// CAN_MULTI_CONN, ...), whatever the transport.
    pub flags: TransmissionFlags,
    pub block_size: BlockSize,
    /// Whether BLOCK_STATUS with `base:allocation` can be asked.
    pub base_allocation: bool,
    /// A stable identity of the volume (a WWID): from the config's `wwid`, or reported by the
    /// transport.
    pub identity: Option<String>,
}

impl Geometry {
    /// Whether several connections may carry I/O to this volume at once (CAN_MULTI_CONN).
    pub fn can_multi_conn(&self) -> bool {
        self.flags.contains(TransmissionFlags::CAN_MULTI_CONN)
    }
}

/// Why one request failed on one path. The kind is stable and matchable; the message is for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct PathError {
    pub kind: PathErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathErrorKind {
    /// The target answered this request with an error. The path may well be fine.
    Reply(NbdErrno),
    /// The connection broke (reset, end of stream, I/O error) or the device went away.
    Broken,
    /// The target violated the protocol; the connection was closed.
    Protocol,
    /// No reply within the deadline; the path may be hung (the connection is left open).
    Timeout,
    /// The connection was closed on purpose (fenced) before or while the request ran.
    Closed,
    /// Refused before it was sent: the request does not fit this path (range, alignment, flags).
    Invalid,
    /// Connecting or negotiating failed.
    Connect,
}

impl std::fmt::Display for PathErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathErrorKind::Reply(errno) => write!(f, "error reply {}", errno.name()),
            PathErrorKind::Broken => f.write_str("connection broken"),
            PathErrorKind::Protocol => f.write_str("protocol violation"),
            PathErrorKind::Timeout => f.write_str("timed out"),
            PathErrorKind::Closed => f.write_str("closed"),
            PathErrorKind::Invalid => f.write_str("invalid request"),
            PathErrorKind::Connect => f.write_str("connect failed"),
        }
    }
}

impl PathError {
    pub fn new(kind: PathErrorKind, message: impl Into<String>) -> Self {
        PathError {
            kind,
            message: message.into(),
        }
    }

    /// Errors that belong to the request itself (docs/GUARANTEES.md G4): returned to the application at
    /// once, never retried on another path, and no reason to doubt the path.
    pub fn belongs_to_request(&self) -> bool {
        match self.kind {
            PathErrorKind::Reply(errno) => matches!(
                errno,
                NbdErrno::Inval
                    | NbdErrno::NoSpc
                    | NbdErrno::Perm
                    | NbdErrno::Overflow
                    | NbdErrno::NotSup
            ),
            PathErrorKind::Invalid => true,
            _ => false,
        }
    }

    /// Errors that say the path itself is down or unreliable: the engine marks it and re-drives.
    pub fn is_path_fault(&self) -> bool {
        matches!(
            self.kind,
            PathErrorKind::Broken
                | PathErrorKind::Protocol
                | PathErrorKind::Timeout
                | PathErrorKind::Closed
                | PathErrorKind::Connect
        )
    }

    /// The NBD errno the application would see if this error were final.
    pub fn errno(&self) -> NbdErrno {
        match self.kind {
            PathErrorKind::Reply(errno) => errno,
            PathErrorKind::Invalid => NbdErrno::Inval,
            _ => NbdErrno::Io,
        }
    }
}

/// A request that did not complete on a path, handed back whole so it can be re-driven.
#[derive(Debug)]
pub struct Failed {
    pub request: Request,
    pub error: PathError,
    /// Whether any of it may have reached the storage. `false`: refused before it was handed to the
    /// connection, so the target can never execute it. A write that failed with `sent` set is *in
    /// doubt*: the target may still execute it, later (see `crate::in_doubt`).
    pub sent: bool,
}

/// A request started on a path connection ([`PathConnection::start`]): resolves to its reply, or to
/// [`Failed`] with the request back. Movable while it waits, so the copy of an abandoned write can be
/// handed to a watcher that keeps listening for its answer.
pub enum Started {
    /// Handed to an NBD connection at once: no allocation.
    Nbd(NbdInFlight),
    /// Everything else (a file, a request that waits for a slot or is split): the async path.
    Other {
        future: std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, Failed>> + Send>>,
        /// Set once the request may reach the storage.
        reached: Arc<AtomicBool>,
    },
}

impl Started {
    /// Whether the request may have reached the storage: until then, dropping this means the
    /// storage never sees it.
    pub fn reached(&self) -> bool {
        match self {
            Started::Nbd(in_flight) => in_flight.sent(),
            Started::Other { reached, .. } => reached.load(Ordering::Acquire),
        }
    }
}

impl std::future::Future for Started {
    type Output = Result<Reply, Failed>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut *self {
            Started::Nbd(in_flight) => std::pin::Pin::new(in_flight).poll(cx),
            Started::Other { future, .. } => future.as_mut().poll(cx),
        }
    }
}

/// Connection settings shared by every transport.
#[derive(Debug, Clone, Copy)]
pub struct ConnectLimits {
    /// Bound on connecting plus negotiating.
    pub connect_timeout: Duration,
    /// Bound on requests in flight on one connection.
    pub in_flight_max: usize,
}

impl Default for ConnectLimits {
    fn default() -> Self {
        ConnectLimits {
            connect_timeout: Duration::from_secs(5),
            in_flight_max: 256,
        }
    }
}

/// Where a path leads and how to (re)connect to it. Cheap to clone; held by the health checker so a
/// failed path can be reconnected.
#[derive(Debug, Clone)]
pub enum PathTarget {
    Nbd {
        endpoint: lunmpio_nbd::client::Endpoint,
        export: String,
        /// `nbds://`: the connection is upgraded to TLS with this configuration.
        tls: Option<lunmpio_nbd::tls::ClientTls>,
    },
    File(FileTarget),
}

/// The files a `nbds://` path verifies its server with (`tls_ca`) and, when the server wants a
/// client certificate, proves itself with (`tls_cert`, `tls_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A path URI that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad path URI {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl PathTarget {
    /// Parses a path URI. `bind` is the local source address for TCP (the path's initiator port).
    /// A `nbds://` URI needs [`PathTarget::parse_tls`].
    pub fn parse(uri: &str, bind: Option<IpAddr>) -> Result<PathTarget, UriError> {
        PathTarget::parse_tls(uri, bind, None)
    }

    /// [`PathTarget::parse`], with the TLS files of a `nbds://` path (read now: a file that cannot
    /// be used is an error here, not at the first connect). The server's certificate must name the
    /// URI's host, or its `tls-hostname=`.
    pub fn parse_tls(
        uri: &str,
        bind: Option<IpAddr>,
        tls: Option<&TlsFiles>,
    ) -> Result<PathTarget, UriError> {
        let bad = |reason: String| UriError {
            uri: uri.to_string(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("file://") {
            if bind.is_some() {
                return Err(bad("`bind` applies to TCP paths only".into()));
            }
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file URI needs an absolute path: file:///dev/sdb".into()
                ));
            }
            return Ok(PathTarget::File(FileTarget::new(PathBuf::from(rest))));
        }
        let parsed = lunmpio_nbd::uri::parse(uri).map_err(|e| bad(e.to_string()))?;
        let tls = match (parsed.tls, tls) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(bad(
                    "tls_ca, tls_cert and tls_key apply to nbds:// paths only".into(),
                ));
            }
            (true, None) => {
                return Err(bad(
                    "an nbds:// path needs tls_ca (the CA that signed the server's certificate)"
                        .into(),
                ));
            }
            (true, Some(files)) => {
                let server_name = match (&parsed.tls_hostname, &parsed.endpoint) {
                    (Some(name), _) => name.clone(),
                    (None, lunmpio_nbd::client::Endpoint::Tcp { host, .. }) => host.clone(),
                    (None, lunmpio_nbd::client::Endpoint::Unix { .. }) => "localhost".to_string(),
                };
                let identity = files
                    .identity
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path()));
                Some(
                    lunmpio_nbd::tls::ClientTls::new(&files.ca, identity, &server_name)
                        .map_err(|e| bad(e.to_string()))?,
                )
            }
        };
        let endpoint = match (parsed.endpoint, bind) {
            (lunmpio_nbd::client::Endpoint::Tcp { host, port, .. }, bind) => {
                lunmpio_nbd::client::Endpoint::Tcp { host, port, bind }
            }
            (endpoint @ lunmpio_nbd::client::Endpoint::Unix { .. }, None) => endpoint,
            (lunmpio_nbd::client::Endpoint::Unix { .. }, Some(_)) => {
                return Err(bad("`bind` applies to TCP paths only".into()));
            }
        };
        Ok(PathTarget::Nbd {
            endpoint,
            export: parsed.export,
            tls,
        })
    }

    /// A short name of the transport for PathInfo (`tcp`, `unix`, `file`).
    pub fn transport_name(&self) -> &'static str {
        match self {
            PathTarget::Nbd {
                endpoint: lunmpio_nbd::client::Endpoint::Tcp { .. },
                ..
            } => "tcp",
            PathTarget::Nbd {
                endpoint: lunmpio_nbd::client::Endpoint::Unix { .. },
                ..
            } => "unix",
            PathTarget::File(_) => "file",
        }
    }

    /// Connects and negotiates, bounded by `limits.connect_timeout`.
    pub async fn connect(&self, limits: ConnectLimits) -> Result<PathConnection, PathError> {
        match self {
            PathTarget::Nbd {
                endpoint,
                export,
                tls,
            } => NbdConnection::connect(endpoint.clone(), export.clone(), tls.clone(), limits)
                .await
                .map(PathConnection::Nbd),
            PathTarget::File(target) => target.open().await.map(PathConnection::File),
        }
    }
}

/// One live connection of a path.
#[derive(Clone)]
pub enum PathConnection {
    Nbd(NbdConnection),
    File(FileConnection),
}

impl PathConnection {
    pub fn info(&self) -> &Geometry {
        match self {
            PathConnection::Nbd(c) => c.info(),
            PathConnection::File(c) => c.info(),
        }
    }

    /// Runs one request. On failure the request comes back inside [`Failed`].
    pub async fn submit(&self, request: Request) -> Result<Reply, Failed> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        self.submit_tracked(request, &sent).await
    }

    /// Starts one request: on an NBD connection with a free slot it is handed over at once, as a
    /// small future that may be moved while it waits (see [`Started`]).
    pub fn start(&self, request: Request) -> Started {
        let request = match self {
            PathConnection::Nbd(c) => match c.try_start(request) {
                Ok(in_flight) => return Started::Nbd(in_flight),
                Err(request) => request,
            },
            PathConnection::File(_) => request,
        };
        let reached = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&reached);
        let connection = self.clone();
        Started::Other {
            future: Box::pin(async move { connection.submit_tracked(request, &flag).await }),
            reached,
        }
    }

    /// Like [`PathConnection::submit`], and sets `sent` once the request may reach the storage (handed
    /// to the connection's writer, or its system call started). Until then, dropping the future means
    /// the storage never sees it — which is how an abandoned request is kept out of doubt.
    pub async fn submit_tracked(
        &self,
        request: Request,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, Failed> {
        match self {
            PathConnection::Nbd(c) => c.submit(request, sent).await,
            PathConnection::File(c) => c.submit(request, sent).await,
        }
    }

    /// Closes the connection now (fencing): every request still in flight fails with `Closed`
    /// (NBD), and nothing new is accepted.
    pub fn close(&self) {
        match self {
            PathConnection::Nbd(c) => c.close(),
            PathConnection::File(c) => c.close(),
        }
    }

    pub fn is_open(&self) -> bool {
        match self {
            PathConnection::Nbd(c) => c.is_open(),
            PathConnection::File(c) => c.is_open(),
        }
    }

    /// Resolves once the connection is broken or closed.
    pub async fn closed(&self) {
        match self {
            PathConnection::Nbd(c) => c.closed().await,
            PathConnection::File(c) => c.closed().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_file_uri() {
        let t = PathTarget::parse("file:///dev/sdb", None).unwrap();
        assert_eq!(t.transport_name(), "file");
        assert!(PathTarget::parse("file://relative", None).is_err());
        assert!(PathTarget::parse("file:///dev/sdb", Some("10.0.0.1".parse().unwrap())).is_err());
    }

    #[test]
    fn parse_nbd_uris_with_bind() {
        let t = PathTarget::parse(
            "nbd://127.0.0.1:10809/lun0",
            Some("127.0.0.1".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(t.transport_name(), "tcp");
        match t {
            PathTarget::Nbd {
                endpoint: lunmpio_nbd::client::Endpoint::Tcp { port, bind, .. },
                export,
                tls: None,
            } => {
                assert_eq!(port, 10809);
                assert_eq!(export, "lun0");
                assert!(bind.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        let u = PathTarget::parse("nbd+unix:///lun0?socket=/run/x.sock", None).unwrap();
        assert_eq!(u.transport_name(), "unix");
        assert!(
            PathTarget::parse(
                "nbd+unix:///lun0?socket=/run/x.sock",
                Some("::1".parse().unwrap())
            )
            .is_err()
        );
        assert!(PathTarget::parse("http://x/y", None).is_err());
    }

    #[test]
    fn error_classes_are_disjoint() {
        for errno in [NbdErrno::Inval, NbdErrno::NoSpc, NbdErrno::Perm] {
            let e = PathError::new(PathErrorKind::Reply(errno), "x");
            assert!(e.belongs_to_request() && !e.is_path_fault());
            assert_eq!(e.errno(), errno);
        }
        let io = PathError::new(PathErrorKind::Reply(NbdErrno::Io), "x");
        assert!(
            !io.belongs_to_request() && !io.is_path_fault(),
            "EIO: retry elsewhere, probe the path"
        );
        for kind in [
            PathErrorKind::Broken,
            PathErrorKind::Timeout,
            PathErrorKind::Closed,
        ] {
            let e = PathError::new(kind, "x");
            assert!(e.is_path_fault() && !e.belongs_to_request());
            assert_eq!(e.errno(), NbdErrno::Io);
        }
    }
}
