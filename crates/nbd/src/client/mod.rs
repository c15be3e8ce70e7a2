//! Async NBD client (tokio).
//!
//! One connection carries many requests at once. Callers register a pending entry keyed by
//! cookie and hand the encoded header to a writer task, which coalesces queued requests into
//! few socket writes. A reader task with a large receive buffer parses replies (simple or
//! structured, in any order) and completes each caller's oneshot. No lock is held across an
//! await. A broken connection, or [`Client::close`], fails every in-flight request at once.

mod conn;
mod negotiate;

use crate::{BlockSize, CommandFlags, Extent, NbdErrno, TransmissionFlags};
use bytes::{Bytes, BytesMut};
use conn::Shared;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// TCP; `bind` is the local source address (the path's initiator port).
    Tcp {
        host: String,
        port: u16,
        bind: Option<IpAddr>,
    },
    Unix {
        path: PathBuf,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port, .. } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub endpoint: Endpoint,
    pub export: String,
    /// Covers the TCP connect and the whole handshake.
    pub connect_timeout: Duration,
    /// Per request, including the wait for an in-flight slot. `None`: no timeout.
    pub request_timeout: Option<Duration>,
    pub structured_replies: bool,
    /// Ask for extended headers first (NBD_OPT_EXTENDED_HEADERS: 32-byte headers, 64-bit lengths),
    /// and fall back to structured replies when the server does not have them. Needs
    /// `structured_replies`.
    pub extended_headers: bool,
    /// Ask for `base:allocation` (needs structured replies).
    pub base_allocation: bool,
    pub max_in_flight: usize,
    /// Upgrade the connection to TLS (NBD_OPT_STARTTLS) before anything else is negotiated; the
    /// handshake fails if the server refuses or its certificate does not verify.
    pub tls: Option<crate::tls::ClientTls>,
}

impl ConnectOptions {
    pub fn new(endpoint: Endpoint, export: impl Into<String>) -> Self {
        ConnectOptions {
            endpoint,
            export: export.into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
            structured_replies: true,
            extended_headers: true,
            base_allocation: true,
            max_in_flight: 256,
            tls: None,
        }
    }

    pub fn from_uri(uri: &crate::NbdUri) -> Self {
        ConnectOptions::new(uri.endpoint.clone(), uri.export.clone())
    }
}

/// Upper bound on `max_in_flight`.
pub const IN_FLIGHT_MAX: usize = 1 << 16;

/// How the export was selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Negotiation {
    Go,
    ExportName,
}

/// What the handshake settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub flags: TransmissionFlags,
    /// As advertised, except `max_payload`, which is capped at [`crate::MAX_PAYLOAD_BYTES`]
    /// and rounded down to a multiple of `min`.
    pub block_size: BlockSize,
    /// Simple replies, structured replies or extended headers: what the server agreed to.
    pub mode: crate::TransmissionMode,
    /// The context id of `base:allocation`, when negotiated.
    pub base_allocation: Option<u32>,
    pub negotiated_with: Negotiation,
}

pub use crate::request::{Reply, Request};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// An error reply; the connection stays usable.
    #[error("server error {errno}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Server {
        errno: NbdErrno,
        message: Option<String>,
    },
    /// Reset, EOF, I/O error: the connection is dead.
    #[error("connection failed: {0}")]
    Connection(String),
    /// Malformed reply: the connection was closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// `request_timeout` passed; the connection stays open.
    #[error("request timed out")]
    Timeout,
    /// `close()` was called or the client disconnected.
    #[error("connection closed")]
    Closed,
    /// Refused locally before sending.
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("handshake failed: {0}")]
    Handshake(String),
}

impl ClientError {
    /// True when the error is the path's fault, not the LUN's: connection loss, protocol
    /// violation, timeout, a closed or never-established connection, and ESHUTDOWN (the
    /// server is going away). Server error replies otherwise and local refusals are not.
    pub fn is_path_fault(&self) -> bool {
        match self {
            ClientError::Server { errno, .. } => *errno == NbdErrno::Shutdown,
            ClientError::Invalid(_) => false,
            ClientError::Connection(_)
            | ClientError::Protocol(_)
            | ClientError::Timeout
            | ClientError::Closed
            | ClientError::Handshake(_) => true,
        }
    }

    /// The NBD error value to pass on to a downstream client.
    pub fn errno(&self) -> NbdErrno {
        match self {
            ClientError::Server { errno, .. } => *errno,
            ClientError::Invalid(_) => NbdErrno::Inval,
            _ => NbdErrno::Io,
        }
    }
}

/// A failed request, handed back for re-drive on another path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{request}: {error}")]
pub struct RequestError {
    pub request: Request,
    pub error: ClientError,
    /// Whether any part of it may have reached the server. `false` means it was refused before it was
    /// handed to the connection (closed, invalid): the server can never execute it. A write that
    /// failed with `sent` may still be executed by the server later, even after the connection broke.
    pub sent: bool,
}

/// A request handed to a connection by [`Client::try_start`]: resolves to its reply, or to the
/// request back with why it failed. It holds a handle to the connection, so the connection stays
/// open while someone waits for the reply.
pub struct InFlight {
    client: Client,
    /// Handed back on failure; taken once the future is done.
    request: Option<Request>,
    sent: bool,
    state: InFlightState,
}

enum InFlightState {
    Waiting(conn::ReplyRx),
    /// Failed as it was handed over (the connection had just died).
    Failed(ClientError),
}

impl InFlight {
    /// Whether the request may have reached the server (see [`RequestError::sent`]). Known when
    /// the request is handed over: dropping an `InFlight` whose request was sent does not unsend it.
    pub fn sent(&self) -> bool {
        self.sent
    }
}

impl std::future::Future for InFlight {
    type Output = Result<Reply, RequestError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        let result = match &mut this.state {
            InFlightState::Waiting(reply) => match std::pin::Pin::new(reply).poll(cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Ok(result)) => result,
                // The reader ended without answering: the connection is dead.
                std::task::Poll::Ready(Err(_)) => {
                    Err(this.client.close_reason().unwrap_or(ClientError::Closed))
                }
            },
            InFlightState::Failed(error) => Err(error.clone()),
        };
        let request = this
            .request
            .take()
            .expect("InFlight polled after it completed");
        std::task::Poll::Ready(result.map_err(|error| RequestError {
            request,
            error,
            sent: this.sent,
        }))
    }
}

/// A cheap, cloneable handle to one connection. Dropping the last handle closes it.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Owns the connection: its drop closes it (the I/O tasks only hold `Shared`).
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.fail_all(ClientError::Closed);
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("info", self.info())
            .field("open", &self.is_open())
            .finish()
    }
}

impl Client {
    /// Connects and negotiates (within `connect_timeout`).
    pub async fn connect(options: ConnectOptions) -> Result<Client, ClientError> {
        let timeout = options.connect_timeout;
        match tokio::time::timeout(timeout, negotiate::connect(&options)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connection(format!(
                "connect to {} timed out after {timeout:?}",
                options.endpoint
            ))),
        }
    }

    /// Negotiates over an already-connected stream (`options.endpoint` is only a label).
    pub async fn connect_stream<S>(
        stream: S,
        options: ConnectOptions,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let timeout = options.connect_timeout;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let fut = negotiate::negotiate(&mut rd, &mut wr, &options);
        let (info, leftover) = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ClientError::Handshake(format!(
                    "timed out after {timeout:?}"
                )));
            }
        };
        Ok(Client::start(rd, wr, leftover, info, &options))
    }

    fn start<R, W>(
        rd: R,
        wr: W,
        leftover: BytesMut,
        info: ExportInfo,
        options: &ConnectOptions,
    ) -> Client
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let shared = Shared::start(rd, wr, leftover, info, options);
        Client {
            handle: Arc::new(Handle { shared }),
        }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.handle.shared.info
    }

    /// Hands `request` to the connection now, when that needs no waiting: one wire request (no
    /// split), a free in-flight slot, no client-side timeout. The returned [`InFlight`] is a small
    /// future of its own (no allocation), which may be moved while it waits — for example to a task
    /// that keeps listening for the reply after its caller gave up. `Err` hands the request back:
    /// run it with [`Client::submit_tracked`].
    pub fn try_start(&self, request: Request) -> Result<InFlight, Request> {
        let queued = std::sync::atomic::AtomicBool::new(false);
        let (state, sent) = match self.handle.shared.try_queue(&request, &queued) {
            None => return Err(request),
            Some(Ok(reply)) => (InFlightState::Waiting(reply), true),
            Some(Err(failure)) => (InFlightState::Failed(failure.error), failure.sent),
        };
        Ok(InFlight {
            client: self.clone(),
            request: Some(request),
            sent,
            state,
        })
    }

    /// Runs one request (split above the maximum payload). On failure the request comes back.
    pub async fn submit(&self, request: Request) -> Result<Reply, RequestError> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        self.submit_tracked(request, &sent).await
    }

    /// Like [`Client::submit`], and sets `sent` the moment any part of the request is handed to the
    /// connection's writer. A caller that gives up on the request while `sent` is still false may
    /// drop the future: the server will never see the request. Once `sent` is set, the server may
    /// execute it even if nobody waits for the reply.
    pub async fn submit_tracked(
        &self,
        request: Request,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, RequestError> {
        match self.handle.shared.execute_tracked(&request, sent).await {
            Ok(r) => Ok(r),
            Err(failure) => Err(RequestError {
                request,
                error: failure.error,
                sent: failure.sent,
            }),
        }
    }

    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ClientError> {
        match self
            .handle
            .shared
            .execute(&Request::Read { offset, length })
            .await?
        {
            Reply::Read(b) => Ok(b),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply {other:?} to READ"
            ))),
        }
    }

    pub async fn write(
        &self,
        offset: u64,
        data: Bytes,
        flags: CommandFlags,
    ) -> Result<(), ClientError> {
        self.done(Request::Write {
            offset,
            data,
            flags,
        })
        .await
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.done(Request::Flush {
            flags: CommandFlags::empty(),
        })
        .await
    }

    pub async fn trim(
        &self,
        offset: u64,
        length: u32,
        flags: CommandFlags,
    ) -> Result<(), ClientError> {
        self.done(Request::Trim {
            offset,
            length,
            flags,
        })
        .await
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: CommandFlags,
    ) -> Result<(), ClientError> {
        self.done(Request::WriteZeroes {
            offset,
            length,
            flags,
        })
        .await
    }

    pub async fn block_status(
        &self,
        offset: u64,
        length: u32,
        flags: CommandFlags,
    ) -> Result<Vec<Extent>, ClientError> {
        match self
            .handle
            .shared
            .execute(&Request::BlockStatus {
                offset,
                length,
                flags,
            })
            .await?
        {
            Reply::BlockStatus(e) => Ok(e),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply {other:?} to BLOCK_STATUS"
            ))),
        }
    }

    pub async fn cache(&self, offset: u64, length: u32) -> Result<(), ClientError> {
        self.done(Request::Cache { offset, length }).await
    }

    async fn done(&self, request: Request) -> Result<(), ClientError> {
        self.handle.shared.execute(&request).await.map(|_| ())
    }

    /// Hard close now: every in-flight request fails with `Closed`.
    pub fn close(&self) {
        self.handle.shared.fail_all(ClientError::Closed);
    }

    /// Soft disconnect: waits (bounded) for in-flight requests, sends NBD_CMD_DISC, closes.
    pub async fn disconnect(&self) {
        self.handle.shared.disconnect().await;
    }

    pub fn is_open(&self) -> bool {
        !self.handle.shared.closed.is_cancelled()
    }

    /// Requests sent and not yet answered (including timed-out ones still owed a reply).
    pub fn in_flight(&self) -> usize {
        self.handle.shared.in_flight()
    }

    /// Resolves once the connection is broken or closed.
    pub async fn closed(&self) {
        self.handle.shared.closed.cancelled().await;
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ClientError> {
        self.handle.shared.close_reason()
    }
}
