//! Async NBD server, generic over a [`Backend`].
//!
//! One task per connection reads and validates requests and runs them concurrently (in reused slots
//! of a `running::RunningSet` polled by that task, not a task per request), and a writer task
//! coalesces the replies (in completion order, so replies go out of order) into few socket writes. In-flight requests per connection are bounded: the reader stops
//! reading when the bound is reached. An export added with [`Server::add_export_on`] has its
//! connections moved, after the handshake, to the runtime it names (the daemon's data thread for
//! that LUN), so all of that happens on one thread.

mod admission;
mod credits;
mod gate;
mod handover;
mod handshake;
mod running;
mod transmission;

use crate::proto::ProtoError;
use crate::request::{Reply, Request};
use crate::{BlockSize, MAX_PAYLOAD_BYTES, NbdErrno, TransmissionFlags};
use bytes::BytesMut;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use admission::IDLE_EVICT_AFTER;
pub use handover::{DetachedConnection, SocketKind};
use handover::{StreamOps, log_end, tcp_ops, unix_ops};
pub use transmission::{RequestCheck, check_request};

/// The storage behind an export: one method, one request in, one reply out. Requests run
/// concurrently; each has passed [`check_request`] against the export (bounds, alignment, flags the
/// export advertises) before it gets here.
///
/// The reply a request expects: `Read` answers [`Reply::Read`] with exactly `length` bytes (anything
/// else is sent to the client as EIO); `BlockStatus` answers [`Reply::BlockStatus`] with
/// `base:allocation` extents from `offset` (the server clips them to the request, honours REQ_ONE
/// and replaces an empty list by one allocated extent); every other command answers [`Reply::Done`].
/// An `Err` is the NBD error the client gets.
pub trait Backend: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Result<Reply, NbdErrno>> + Send;
}

/// One export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    /// Advertised flags. HAS_FLAGS is always added; SEND_DF only goes out once structured
    /// replies are negotiated; SEND_RESIZE and BLOCK_STATUS_PAYLOAD are never advertised.
    pub flags: TransmissionFlags,
    pub block_size: BlockSize,
}

impl ExportConfig {
    /// A writable export with FLUSH, FUA, TRIM, WRITE_ZEROES, CACHE and default block sizes.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        ExportConfig {
            name: name.into(),
            description: None,
            size,
            flags: TransmissionFlags::HAS_FLAGS
                | TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_CACHE,
            block_size: BlockSize::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_in_flight_per_connection: usize,
    pub handshake_timeout: Duration,
    /// Connections served at once; at the bound an idle one makes room (see `admission`), else the
    /// new one is refused.
    pub max_connections: usize,
    /// Bound on the bytes of request payloads and reply data one connection holds at a time: a client
    /// that sends READs and never reads the replies stops being read from once it is reached. At least
    /// one maximum-size request always fits.
    pub connection_bytes_max: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_in_flight_per_connection: 256,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            connection_bytes_max: CONNECTION_BYTES_DEFAULT,
        }
    }
}

/// Default [`ServerOptions::connection_bytes_max`]: two maximum-size requests, or hundreds of the
/// usual 4–128 KiB ones.
pub const CONNECTION_BYTES_DEFAULT: usize = 2 * MAX_PAYLOAD_BYTES as usize;

/// Upper bound on `max_in_flight_per_connection` (a connection's running set sizes its ready bits
/// from it).
pub const IN_FLIGHT_PER_CONNECTION_MAX: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
    #[error("invalid export {name:?}: {reason}")]
    InvalidExport { name: String, reason: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("client disconnected in the middle of a message")]
    Truncated,
    #[error("refused: {0} connections (max_connections) and none of them idle")]
    TooManyConnections(usize),
    #[error("evicted: idle while the server was at max_connections")]
    Evicted,
    #[error("closed in its handshake: the server hands its connections over (live upgrade)")]
    Detaching,
}

pub(crate) struct ExportEntry<B> {
    pub(crate) config: ExportConfig,
    /// Read by a connection when it starts and when `backend_generation` moved: never per request.
    backend: std::sync::Mutex<Arc<B>>,
    /// Bumped by every backend replacement, before the hold that allowed it is released.
    pub(crate) backend_generation: std::sync::atomic::AtomicU64,
    /// Where the export's connections run once the handshake chose it (see [`Server::add_export_on`]).
    pub(crate) runtime: Option<tokio::runtime::Handle>,
    pub(crate) gate: Arc<gate::Gate>,
}

impl<B> ExportEntry<B> {
    /// The backend, and the generation it belongs to.
    pub(crate) fn backend(&self) -> (Arc<B>, u64) {
        let backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self
            .backend_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        (Arc::clone(&backend), generation)
    }
}

/// An export held at a request boundary ([`Server::hold_export`]): its connections start no request
/// until this is dropped. Nothing is failed, no connection closes.
pub struct ExportHold<B> {
    entry: Arc<ExportEntry<B>>,
}

impl<B> ExportHold<B> {
    /// Resolves once none of the export's requests runs or waits for its reply to be written.
    pub async fn quiet(&self) {
        self.entry.gate.quiet().await
    }

    /// Requests counted in now (running, or answered and not yet written).
    pub fn running(&self) -> usize {
        self.entry.gate.running()
    }

    /// Requests that arrived during the hold and wait for its end.
    pub fn parked(&self) -> usize {
        self.entry.gate.parked()
    }

    /// The backend every connection uses for its next request once the hold ends. Call once the
    /// export is [`quiet`](ExportHold::quiet): a request already running finishes on the old one.
    pub fn replace_backend(&self, backend: Arc<B>) {
        let mut current = self.entry.backend.lock().unwrap_or_else(|p| p.into_inner());
        *current = backend;
        // Under the lock, so a reader never pairs the old backend with the new generation.
        self.entry
            .backend_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl<B> Drop for ExportHold<B> {
    fn drop(&mut self) {
        self.entry.gate.release();
    }
}

/// An export taken away ([`Server::remove_export`]): its connections drain as at shutdown.
pub struct RemovedExport<B> {
    entry: Arc<ExportEntry<B>>,
}

impl<B> RemovedExport<B> {
    /// Resolves once every connection to the export has closed.
    pub async fn closed(&self) {
        self.entry.gate.no_connections().await
    }

    pub fn connections(&self) -> usize {
        self.entry.gate.connections()
    }
}

pub struct Server<B: Backend> {
    /// Looked up at handshakes only; changed by live reconfiguration.
    exports: std::sync::RwLock<HashMap<String, Arc<ExportEntry<B>>>>,
    options: ServerOptions,
    shutdown: CancellationToken,
    /// Cancelled to stop the accept loops without a drain (a live upgrade takes the listeners).
    accepting: CancellationToken,
    /// Cancelled to detach every connection at its next request boundary (live upgrade).
    detach: CancellationToken,
    detached: std::sync::Mutex<Vec<DetachedConnection>>,
    active: watch::Sender<usize>,
    admission: Arc<admission::Registry>,
    /// When (ms since start) a refusal was last logged: one warning per second at most.
    refusal_logged_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
    accept_errors: std::sync::atomic::AtomicU64,
    /// Connections that entered transmission, by the mode they negotiated (simple, structured,
    /// extended): which clients use extended headers.
    negotiated: [std::sync::atomic::AtomicU64; 3],
    /// TLS offered (or required) to new connections; replaced by a reload, which leaves the
    /// sessions already running as they are.
    tls: std::sync::RwLock<Option<Arc<crate::tls::ServerTls>>>,
}

/// Counts a live connection for `wait_idle`.
pub(crate) struct ConnGuard(watch::Sender<usize>);

impl ConnGuard {
    pub(crate) fn new(active: &watch::Sender<usize>) -> Self {
        active.send_modify(|n| *n += 1);
        ConnGuard(active.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl<B: Backend> Server<B> {
    pub fn new(options: ServerOptions) -> Self {
        let mut options = options;
        options.max_in_flight_per_connection = options
            .max_in_flight_per_connection
            .clamp(1, IN_FLIGHT_PER_CONNECTION_MAX);
        options.connection_bytes_max = options.connection_bytes_max.max(MAX_PAYLOAD_BYTES as usize);
        Server {
            exports: std::sync::RwLock::new(HashMap::new()),
            admission: admission::Registry::new(options.max_connections),
            options,
            shutdown: CancellationToken::new(),
            accepting: CancellationToken::new(),
            detach: CancellationToken::new(),
            detached: std::sync::Mutex::new(Vec::new()),
            active: watch::Sender::new(0),
            refusal_logged_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            accept_errors: std::sync::atomic::AtomicU64::new(0),
            negotiated: Default::default(),
            tls: std::sync::RwLock::new(None),
        }
    }

    /// Offers TLS to the connections that come from now on (`None`: plain only). Connections
    /// already running keep their session.
    pub fn set_tls(&self, tls: Option<crate::tls::ServerTls>) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls.map(Arc::new);
    }

    pub(crate) fn tls(&self) -> Option<Arc<crate::tls::ServerTls>> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn add_export(&self, config: ExportConfig, backend: Arc<B>) -> Result<(), ServerError> {
        self.add_export_entry(config, backend, None)
    }

    /// Like [`Server::add_export`], and the export's connections run on `runtime` after the handshake:
    /// a connection accepted by [`Server::serve_tcp`] or [`Server::serve_unix`] moves its socket there,
    /// so its requests, the backend's work and its replies share that runtime's thread (no wake-up
    /// crosses threads on the data path). Connections given to [`Server::serve_connection`] stay on
    /// the runtime that serves them.
    pub fn add_export_on(
        &self,
        config: ExportConfig,
        backend: Arc<B>,
        runtime: tokio::runtime::Handle,
    ) -> Result<(), ServerError> {
        self.add_export_entry(config, backend, Some(runtime))
    }

    fn add_export_entry(
        &self,
        config: ExportConfig,
        backend: Arc<B>,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<(), ServerError> {
        let invalid = |reason: String| ServerError::InvalidExport {
            name: config.name.clone(),
            reason,
        };
        if self.exports_read().contains_key(&config.name) {
            return Err(ServerError::DuplicateExport(config.name));
        }
        if config.name.len() > crate::proto::STRING_BYTES_MAX as usize {
            return Err(invalid("name longer than 4096 bytes".into()));
        }
        if config
            .description
            .as_ref()
            .is_some_and(|d| d.len() > crate::proto::STRING_BYTES_MAX as usize)
        {
            return Err(invalid("description longer than 4096 bytes".into()));
        }
        config.block_size.validate().map_err(invalid)?;
        // 0xffffffff advertises "no limit" (legal, if unusual); requests are still held to
        // MAX_PAYLOAD_BYTES, what this server allocates.
        if config.block_size.max_payload > MAX_PAYLOAD_BYTES
            && config.block_size.max_payload != u32::MAX
        {
            return Err(invalid(format!(
                "maximum payload above {MAX_PAYLOAD_BYTES} bytes (use 0xffffffff for no limit)"
            )));
        }
        if !config.size.is_multiple_of(config.block_size.min as u64) {
            return Err(invalid(
                "size is not a multiple of the minimum block".into(),
            ));
        }
        let mut exports = self.exports_write();
        if exports.contains_key(&config.name) {
            return Err(ServerError::DuplicateExport(config.name));
        }
        exports.insert(
            config.name.clone(),
            Arc::new(ExportEntry {
                config,
                backend: std::sync::Mutex::new(backend),
                backend_generation: std::sync::atomic::AtomicU64::new(0),
                runtime,
                gate: gate::Gate::new(),
            }),
        );
        Ok(())
    }

    fn exports_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<ExportEntry<B>>>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exports_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<ExportEntry<B>>>> {
        self.exports.write().unwrap_or_else(|p| p.into_inner())
    }

    /// An export's configuration (what its clients were told at the handshake).
    pub fn export_config(&self, name: &str) -> Option<ExportConfig> {
        self.exports_read().get(name).map(|e| e.config.clone())
    }

    /// The runtime an export's connections run on (see [`Server::add_export_on`]).
    pub fn export_runtime(&self, name: &str) -> Option<tokio::runtime::Handle> {
        self.exports_read().get(name)?.runtime.clone()
    }

    /// Holds an export's requests at a request boundary (see [`ExportHold`]); `None` if there is no
    /// such export. Holds nest.
    pub fn hold_export(&self, name: &str) -> Option<ExportHold<B>> {
        let entry = Arc::clone(self.exports_read().get(name)?);
        entry.gate.hold();
        Some(ExportHold { entry })
    }

    /// Takes an export away: new clients cannot choose it, and its connections drain as at shutdown
    /// (new requests get ESHUTDOWN, those in flight finish, then the connection closes).
    pub fn remove_export(&self, name: &str) -> Option<RemovedExport<B>> {
        let entry = self.exports_write().remove(name)?;
        entry.gate.closing.cancel();
        Some(RemovedExport { entry })
    }

    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// Export names, sorted.
    pub fn export_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exports_read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Looks an export up; the empty name is the default export: one named "" or else the
    /// only export.
    pub(crate) fn find_export(&self, name: &str) -> Option<Arc<ExportEntry<B>>> {
        let exports = self.exports_read();
        if let Some(e) = exports.get(name) {
            return Some(Arc::clone(e));
        }
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        None
    }

    /// Serves one already-accepted connection to completion (handshake + transmission). At
    /// `max_connections` it first makes room by evicting an idle connection, or is refused.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let admitted = self.admit()?;
        let guard = ConnGuard::new(&self.active);
        let r = self.serve_inner(stream, &admitted, None).await;
        drop(guard);
        r
    }

    pub(crate) fn admit(&self) -> Result<Arc<admission::Admitted>, ServerError> {
        match self.admission.admit() {
            admission::Admission::Admitted(a) => Ok(a),
            admission::Admission::Refused => {
                let now = self.epoch.elapsed().as_millis() as u64;
                let last = self
                    .refusal_logged_ms
                    .swap(now, std::sync::atomic::Ordering::Relaxed);
                if last == 0 || now.saturating_sub(last) >= 1000 {
                    tracing::warn!(
                        max_connections = self.options.max_connections,
                        refused_total = self.connections_refused(),
                        "nbd connection refused: at max_connections and none is idle"
                    );
                }
                Err(ServerError::TooManyConnections(
                    self.options.max_connections,
                ))
            }
        }
    }

    async fn serve_inner<S>(
        self: &Arc<Self>,
        stream: S,
        admitted: &Arc<admission::Admitted>,
        ops: Option<StreamOps<S>>,
    ) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut buf = BytesMut::with_capacity(crate::io_util::READ_BUFFER_BYTES);
        let end = self
            .bounded_handshake(&mut rd, &mut wr, &mut buf, admitted, None)
            .await?;
        match end {
            None => Ok(()),
            Some(handshake::HandshakeEnd::Negotiated(negotiated)) => {
                self.transmission_started(admitted, &negotiated);
                self.transmit(rd.unsplit(wr), buf, negotiated, admitted, ops)
                    .await
            }
            Some(handshake::HandshakeEnd::StartTls(state)) => {
                self.serve_tls(rd.unsplit(wr), state, admitted).await
            }
        }
    }

    /// The handshake under the handshake timeout, given up on eviction or a handover.
    async fn bounded_handshake<R, W>(
        self: &Arc<Self>,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        admitted: &Arc<admission::Admitted>,
        resume: Option<handshake::OptState>,
    ) -> Result<Option<handshake::HandshakeEnd<B>>, ServerError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let handshake = tokio::time::timeout(
            self.options.handshake_timeout,
            self.handshake(rd, wr, buf, resume),
        );
        tokio::select! {
            r = handshake => match r {
                Err(_) => Err(ServerError::HandshakeTimeout),
                Ok(r) => r,
            },
            _ = admitted.evicted.cancelled() => Err(ServerError::Evicted),
            // A handshake is not handed over: the client sees the socket close and connects again.
            _ = self.detach.cancelled() => Err(ServerError::Detaching),
        }
    }

    /// After NBD_OPT_STARTTLS: the TLS handshake, the rest of the options over TLS, then
    /// transmission. A TLS session lives in this process, so it stays on the accepting runtime and
    /// is not handed over by a live upgrade (the client reconnects).
    async fn serve_tls<S>(
        self: &Arc<Self>,
        stream: S,
        state: handshake::OptState,
        admitted: &Arc<admission::Admitted>,
    ) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some(tls) = state.tls_config().cloned() else {
            return Err(ServerError::Handshake(
                "STARTTLS without TLS configured".into(),
            ));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
        let accepted =
            tokio::time::timeout(self.options.handshake_timeout, acceptor.accept(stream))
                .await
                .map_err(|_| ServerError::HandshakeTimeout)?
                .map_err(|e| ServerError::Handshake(format!("TLS handshake: {e}")))?;
        let (mut rd, mut wr) = tokio::io::split(accepted);
        let mut buf = BytesMut::with_capacity(crate::io_util::READ_BUFFER_BYTES);
        match self
            .bounded_handshake(&mut rd, &mut wr, &mut buf, admitted, Some(state))
            .await?
        {
            None => Ok(()),
            Some(handshake::HandshakeEnd::Negotiated(negotiated)) => {
                self.transmission_started(admitted, &negotiated);
                self.transmit(rd.unsplit(wr), buf, negotiated, admitted, None)
                    .await
            }
            Some(handshake::HandshakeEnd::StartTls(_)) => {
                Err(ServerError::Handshake("a second STARTTLS".into()))
            }
        }
    }

    /// The transmission phase, on the export's runtime when it has one and the stream can move
    /// there, until the connection ends or detaches (then it is kept for [`Server::detach_all`]).
    async fn transmit<S>(
        self: &Arc<Self>,
        stream: S,
        buf: BytesMut,
        negotiated: handshake::Negotiated<B>,
        admitted: &Arc<admission::Admitted>,
        ops: Option<StreamOps<S>>,
    ) -> Result<(), ServerError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let can_detach = ops.is_some();
        let ended = match (negotiated.export.runtime.clone(), ops) {
            (Some(runtime), Some(ops)) => {
                let stream = (ops.rehome)(stream, &runtime)?;
                let (server, admitted) = (Arc::clone(self), Arc::clone(admitted));
                let moved = runtime.spawn(async move {
                    server
                        .transmission(stream, buf, negotiated, &admitted, true)
                        .await
                });
                moved.await.map_err(|e| {
                    ServerError::Io(std::io::Error::other(format!(
                        "the export's runtime ended the connection: {e}"
                    )))
                })??
            }
            _ => {
                self.transmission(stream, buf, negotiated, admitted, can_detach)
                    .await?
            }
        };
        if let (Some(detached), Some(ops)) = (ended, ops) {
            let socket = (ops.detach)(detached.stream)?;
            self.keep_detached(DetachedConnection {
                socket,
                kind: ops.kind,
                export: detached.export,
                flags: detached.flags,
                mode: detached.mode,
                context_id: detached.context_id,
                pending: detached.pending,
            });
        }
        Ok(())
    }

    fn spawn_connection<S>(self: &Arc<Self>, stream: S, ops: StreamOps<S>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Ok(admitted) = self.admit() else {
            return; // dropping the stream closes it before the greeting
        };
        // Count the connection before the task starts, so wait_idle() cannot miss it.
        let guard = ConnGuard::new(&self.active);
        let server = Arc::clone(self);
        tokio::spawn(async move {
            log_end(server.serve_inner(stream, &admitted, Some(ops)).await);
            drop(guard);
        });
    }

    /// Connections evicted to make room, and refused, since start.
    pub fn connections_evicted(&self) -> u64 {
        self.admission
            .evicted_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed accepts (EMFILE, ECONNABORTED, ...) of `serve_tcp` / `serve_unix` since start.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections that entered transmission since start having negotiated `mode`.
    pub fn connections_negotiated(&self, mode: crate::TransmissionMode) -> u64 {
        self.negotiated[mode_index(mode)].load(std::sync::atomic::Ordering::Relaxed)
    }

    fn transmission_started(&self, admitted: &admission::Admitted, n: &handshake::Negotiated<B>) {
        admitted.transmission_started();
        self.negotiated[mode_index(n.mode)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn connections_refused(&self) -> u64 {
        self.admission
            .refused_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Accepts and serves TCP connections until [`Server::shutdown`].
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        let mut backoff = AcceptBackoff::new("nbd");
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = self.accepting.cancelled() => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, _peer)) => {
                        backoff.reset();
                        let _ = stream.set_nodelay(true);
                        self.spawn_connection(stream, tcp_ops());
                    }
                    Err(e) => backoff.failed(&e, &self.accept_errors).await,
                },
            }
        }
    }

    /// Accepts and serves Unix-socket connections until [`Server::shutdown`].
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
    ) -> std::io::Result<()> {
        let mut backoff = AcceptBackoff::new("nbd");
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = self.accepting.cancelled() => return Ok(()),
                r = listener.accept() => match r {
                    Ok((stream, _peer)) => {
                        backoff.reset();
                        self.spawn_connection(stream, unix_ops());
                    }
                    Err(e) => backoff.failed(&e, &self.accept_errors).await,
                },
            }
        }
    }

    /// Drain: new requests get NBD_ESHUTDOWN, options ERR_SHUTDOWN, in-flight requests
    /// complete, then every connection closes and the accept loops return.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves once no connection is being served.
    pub async fn wait_idle(&self) {
        let mut rx = self.active.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        *self.active.borrow()
    }
}

/// Backoff of an accept loop: a failed accept (out of descriptors, above all) is counted, logged at
/// most once per 10 s, and followed by a sleep that doubles from 10 ms up to 1 s while accepts keep
/// failing, so a loop cannot spin. Shared with the daemon's own listeners.
pub struct AcceptBackoff {
    listener: &'static str,
    delay: Duration,
    logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptBackoff {
    const DELAY_MIN: Duration = Duration::from_millis(10);
    const DELAY_MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// The backoff of the listener named `listener` in the logs.
    pub fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            delay: Duration::ZERO,
            logged: None,
            unlogged: 0,
        }
    }

    /// An accept succeeded: the next failure starts from the shortest delay.
    pub fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// An accept failed: counts it in `counter`, logs now and then, and sleeps.
    pub async fn failed(&mut self, e: &std::io::Error, counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.unlogged += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(
                listener = self.listener,
                error = %e,
                failures = self.unlogged,
                "accept failed; backing off"
            );
            self.logged = Some(std::time::Instant::now());
            self.unlogged = 0;
        }
        self.delay = (self.delay * 2).clamp(Self::DELAY_MIN, Self::DELAY_MAX);
        tokio::time::sleep(self.delay).await;
    }
}

fn mode_index(mode: crate::TransmissionMode) -> usize {
    match mode {
        crate::TransmissionMode::Simple => 0,
        crate::TransmissionMode::Structured => 1,
        crate::TransmissionMode::Extended => 2,
    }
}
